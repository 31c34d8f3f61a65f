"""The commands behind :mod:`pyrossm.app.cli` (one function per sub-command, taking the parsed
arguments). Kept apart from the parser so ``pyrossm --help`` stays fast."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from pyrossm.app.runs import (
    ModelNotAvailable,
    build,
    default_config,
    load_data,
    load_run,
    log_jacobian,
    save_run,
    standardize,
    write_json,
)

__all__ = ["ModelNotAvailable", "demo", "evaluate", "forecast", "sample", "train"]


def _seed(seed):
    import pyro

    pyro.set_rng_seed(seed)


def _device(name):
    from pyrossm.infer import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' was requested but no CUDA device is available")
    return dev


def demo(args):
    from pyrossm.app.demo import run_demo

    run_demo(args.out, device=_device(args.device), quick=args.quick, seed=args.seed,
             progress=args.progress, threads=args.threads)
    return 0


# ------------------------------------------------------------------------------ data helpers
def _prepared(splits, stats, standardize_data):
    """Standardized ``(train, test)`` pairs for real data (stats from the training part)."""
    (xt, mt), (xe, me) = splits.train, splits.test
    if splits.kind != "real" or not standardize_data:
        return (xt, mt), (xe, me), None
    xt, stats = standardize(xt, stats)
    xe, _ = standardize(xe, stats)
    return (xt, mt), (xe, me), stats


def _exact_lgssm(model):
    from pyrossm.lgssm import LinearGaussianSSM

    m = {k: v.detach().to("cpu", torch.float64) for k, v in model.matrices().items()}
    return LinearGaussianSSM.from_matrices(**m, dtype=torch.float64)


def _metrics(cfg_model, model, guide, data, raw_x, stats, kind, num_samples, elbo_samples,
             device, name):
    """Held-out figures per observed step (original units for real data), by
    :func:`pyrossm.infer.evaluate` (the library's one evaluation path and "per step")."""
    from pyrossm.infer import evaluate, observed_steps

    x, mask = data
    jac = log_jacobian(raw_x, mask, stats) if kind == "real" else 0.0
    steps = max(int(observed_steps((x, mask)).sum()), 1)
    out = {"data": name, "steps": steps, "sequences": int(x.shape[0]),
           "units": ("nats; real data in its original units" if stats is not None else "nats")}
    if cfg_model["model"] == "lgssm":
        with torch.no_grad():
            ll = _exact_lgssm(model).log_prob(x.to("cpu", torch.float64), mask=mask.cpu())
        out["exact_ll_per_step"] = (float(ll.sum()) - jac) / steps
    if guide is not None:
        ev = evaluate(model, guide, (x, mask), num_samples=num_samples,
                      elbo_samples=elbo_samples, device=device)
        out["iwae_ll_per_step"] = (float(ev.log_likelihood.sum()) - jac) / steps
        out["elbo_per_step"] = (float(ev.elbo.sum()) - jac) / steps
        out["iwae_samples"], out["elbo_samples"] = num_samples, elbo_samples
        if kind == "tokens":
            out["iwae_nll_per_sentence"] = -float(ev.log_likelihood.sum()) / x.shape[0]
            out["perplexity_iwae"] = math.exp(-float(ev.log_likelihood.sum()) / steps)
    return out


def _print_metrics(m):
    labels = [("exact_ll_per_step", "exact log-likelihood per step (Kalman filter)"),
              ("iwae_ll_per_step", f"IWAE log-likelihood per step (K={m.get('iwae_samples')})"),
              ("elbo_per_step", "ELBO per step"),
              ("iwae_nll_per_sentence", "IWAE NLL per sentence"),
              ("perplexity_iwae", "perplexity (from IWAE)")]
    print(f"evaluation on {m['data']} ({m['sequences']} sequences, {m['steps']} steps; "
          f"{m['units']}; higher is better):")
    for key, label in labels:
        if key in m:
            print(f"  {label:48s} {m[key]:.4f}")


# ------------------------------------------------------------------------------ train
def train(args):
    _seed(args.seed)
    device = _device(args.device)
    # Weights that never get a gradient (e.g. the input weights of JSB keys that never sound)
    # decay under weight decay / Adam into subnormal floats, which made CPU epochs 3x slower.
    torch.set_flush_denormal(True)
    # jsb/ptb: validation (during training and at the end) on the "valid" split; the test split
    # is left for `pyrossm evaluate`
    splits = load_data(args.data, data_dir=args.data_dir, test_fraction=args.test_fraction,
                       max_vocab=args.max_vocab, split="valid")
    if args.limit:
        splits = splits._replace(train=tuple(t[: args.limit] for t in splits.train),
                                 test=tuple(t[: args.limit] for t in splits.test))
    real = splits.kind == "real"
    args.state_dim = args.state_dim or (2 if real else 16)
    args.hidden = args.hidden or (32 if real else 128)
    lr = args.lr or (1e-2 if real else 1e-3)
    obs_dim = len(splits.vocab) if splits.kind == "tokens" else splits.train[0].shape[-1]
    cfg_model = default_config(args.model, splits.kind, obs_dim, args)
    cfg_model["word_dropout"] = args.word_dropout
    train_data, test_data, stats = _prepared(splits, None, not args.no_standardize)
    model, guide = build(cfg_model, splits.vocab)
    out = Path(args.out)
    # Under torchrun every rank trains (fit shards the data); only rank 0 writes the run folder.
    is_main = int(os.environ.get("RANK", "0")) == 0
    out.mkdir(parents=True, exist_ok=True)
    if splits.vocab is not None and is_main:
        splits.vocab.save(out / "vocab.json")
    if guide is None:  # exact MLE
        if args.resume:
            print("note: --resume does not apply to --method mle (refitting; it takes seconds)")
        x, mask = train_data
        losses = model.fit(x.double(), mask=mask, num_steps=args.epochs or 10)
        history = {"mle_neg_loglik_per_step": losses}
        print(f"MLE: {len(losses)} L-BFGS steps, final -log-likelihood per step "
              f"(standardized units) {losses[-1]:.4f}")
    else:
        from pyrossm.infer import fit

        if args.max_minutes is not None and not args.max_minutes >= 0:
            raise ValueError(f"--max-minutes: expected a non-negative number of minutes, got "
                             f"{args.max_minutes}")
        held_out = not splits.test_name.startswith("in-sample")
        history = fit(model, guide, train_data, val_data=test_data if held_out else None,
                      epochs=args.epochs or 100, batch_size=args.batch_size, lr=lr,
                      annealing=args.annealing, device=device, seed=args.seed,
                      bucket=splits.kind != "real", checkpoint_dir=str(out / "checkpoints"),
                      resume=args.resume, progress=not args.no_progress,
                      max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes)
    if not is_main:
        return 0
    cfg = {"model": cfg_model,
           "data": {"source": str(args.data), "data_dir": args.data_dir, "kind": splits.kind,
                    "standardization": stats, "test_fraction": args.test_fraction,
                    "test_name": splits.test_name},
           "train": {"epochs": args.epochs, "max_minutes": args.max_minutes,
                     "batch_size": args.batch_size, "lr": lr,
                     "annealing": args.annealing, "seed": args.seed, "device": str(device)}}
    save_run(out, cfg, model.cpu(), guide.cpu() if guide is not None else None, history)
    metrics = _metrics(cfg_model, model.to(device), guide.to(device) if guide else None,
                       _on(test_data, device), splits.test[0], stats, splits.kind,
                       args.num_samples, 10, device, splits.test_name)
    write_json(out / "metrics.json", metrics)
    _print_metrics(metrics)
    print(f"wrote {out}/ (run.json, model.pt, history.json, metrics.json)")
    return 0


def _on(pair, device):
    return tuple(t.to(device) for t in pair)


def _run_data(args, cfg, split="test"):
    source = args.data or cfg["data"]["source"]
    data_dir = getattr(args, "data_dir", None) or cfg["data"].get("data_dir")
    vocab = None
    if cfg["model"]["model"] == "seqvae":
        from pyrossm.seqvae.vocab import Vocabulary

        vocab = Vocabulary.load(Path(args.run) / "vocab.json")
    splits = load_data(source, data_dir=data_dir, split=split,
                       test_fraction=cfg["data"]["test_fraction"], vocab=vocab)
    if args.data is not None and splits.kind != cfg["data"]["kind"]:
        raise ValueError(f"--data: the run was trained on {cfg['data']['kind']} data, got "
                         f"{splits.kind} data from {source!r}")
    if splits.kind != "tokens" and splits.train[0].shape[-1] != cfg["model"]["obs_dim"]:
        raise ValueError(f"--data: the run expects {cfg['model']['obs_dim']} features, got "
                         f"{splits.train[0].shape[-1]} in {source!r}")
    return splits


# ------------------------------------------------------------------------------ evaluate
def evaluate(args):
    _seed(args.seed)
    device = _device(args.device)
    cfg, model, guide, _ = load_run(args.run, device)
    splits = _run_data(args, cfg, args.split)
    if args.data is not None and splits.kind == "real" and not splits.test_name.startswith("in"):
        splits = splits._replace(test=(torch.cat([splits.train[0], splits.test[0]]),
                                       torch.cat([splits.train[1], splits.test[1]])),
                                 test_name=f"all of {args.data}")
    stats = cfg["data"]["standardization"]
    _, test_data, _ = _prepared(splits, stats, stats is not None)
    metrics = _metrics(cfg["model"], model, guide, _on(test_data, device), splits.test[0], stats,
                       splits.kind, args.num_samples, args.elbo_samples, device,
                       splits.test_name)
    write_json(args.out or Path(args.run) / "metrics.json", metrics)
    _print_metrics(metrics)
    return 0


# ------------------------------------------------------------------------------ sample / forecast
def _unstandardize(x, stats):
    if stats is None:
        return x
    scale = torch.tensor(stats["scale"], dtype=x.dtype)
    return x * scale + torch.tensor(stats["mean"], dtype=x.dtype)


def _plot_path(args):
    if args.plot and args.plot.lower() == "none":
        return None
    return Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")


def _save_fig(fig, path):
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def _agg():
    import os

    import matplotlib

    if "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_out(path, allowed):
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"--out: expected a file name ending in {' or '.join(allowed)}, got "
                         f"{str(path)!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return suffix


def sample(args):
    _seed(args.seed)
    device = _device(args.device)
    cfg, model, guide, vocab = load_run(args.run, device)
    if cfg["model"]["model"] == "seqvae":
        from pyrossm.seqvae.decoding import sample_prior, to_text

        _check_out(args.out, (".txt",))
        decoded = sample_prior(model, args.num_samples, temperature=args.temperature,
                               max_len=args.steps)
        lines = [" ".join(s) for s in to_text(vocab, decoded)]
        Path(args.out).write_text("\n".join(lines) + "\n")
        for line in lines[:5]:
            print("  " + line)
        print(f"wrote {args.out} ({len(lines)} sentences)")
        return 0
    suffix = _check_out(args.out, (".npz", ".csv"))
    with torch.no_grad():
        if getattr(model, "init", None) == "diffuse":
            z, x = _sample_after_diffuse_start(args, cfg, model)
        else:
            z, x = model.sample(args.steps, num_samples=args.num_samples)
    z, x = z.detach().cpu().double(), _unstandardize(x.detach().cpu().double(),
                                                     cfg["data"]["standardization"])
    if suffix == ".npz":
        np.savez(args.out, z=z.numpy(), x=x.numpy())
    else:
        S, T = x.shape[:2]
        cols = [np.repeat(np.arange(S), T), np.tile(np.arange(T), S)]
        table = np.column_stack(cols + [x.reshape(S * T, -1).numpy(), z.reshape(S * T, -1).numpy()])
        header = ",".join(["sample", "time"] + [f"x{j}" for j in range(x.shape[-1])]
                          + [f"z{j}" for j in range(z.shape[-1])])
        np.savetxt(args.out, table, delimiter=",", header=header, comments="", fmt="%.10g")
    print(f"wrote {args.out}: z {tuple(z.shape)}, x {tuple(x.shape)} (samples, time, dim)")
    plot = _plot_path(args)
    if plot is not None:
        plt = _agg()
        from pyrossm import plotting

        if cfg["data"]["kind"] == "binary":
            ax = plotting.plot_piano_roll(x[0], title="sample 0 from the prior")
        else:
            ax = plotting.plot_trajectories(x, dim=args.dim, label="prior samples")
            ax.set_title(f"{args.num_samples} trajectories from {cfg['model']['model']}, "
                         f"x[{args.dim}]")
        _save_fig(ax.figure, plot)
        del plt
    return 0


def _sample_after_diffuse_start(args, cfg, model):
    """Draws from a model fitted with a diffuse initial state (``fit`` on one sequence): that
    prior has no scale (variance 1e6), so the draws start from the smoothed state at the first
    step of the training data, z_1 ~ p(z_1 | x), then follow the fitted dynamics."""
    from types import SimpleNamespace

    from pyrossm.lgssm.sampling import sample_lgssm

    splits = _run_data(SimpleNamespace(data=None, data_dir=None, run=args.run), cfg, "train")
    stats = cfg["data"]["standardization"]
    (x, mask), _, _ = _prepared(splits._replace(test=splits.train), stats, stats is not None)
    dtype, device = model.init_mean.dtype, model.init_mean.device
    sm = model.smooth(x[:1].to(device=device, dtype=dtype), mask[:1].to(device))
    m = model.matrices()
    print("note: the fitted initial state is diffuse; trajectories start from the smoothed "
          "state at the first step of the training data")
    return sample_lgssm(m["A"], m["C"], m["Q"], m["R"], sm.smoothed_means[0, 0],
                        sm.smoothed_covs[0, 0], args.steps, (args.num_samples,))


def forecast(args):
    _seed(args.seed)
    device = _device(args.device)
    cfg, model, guide, _ = load_run(args.run, device)
    kind = cfg["model"]["model"]
    if kind == "seqvae":
        raise ValueError("--run: forecasting is for state-space models (lgssm, lstm-ssm, dmm); "
                         "for a seqvae use `pyrossm sample`")
    suffix = _check_out(args.out, (".npz", ".csv"))
    splits = _run_data(args, cfg)
    if splits.kind == "binary":  # benchmark data: forecast the test split
        splits = splits._replace(train=splits.test)
    elif not splits.test_name.startswith("in-sample"):  # user file: every sequence
        splits = splits._replace(train=tuple(torch.cat([a, b]) for a, b in
                                             zip(splits.train, splits.test)))
    stats = cfg["data"]["standardization"]
    (x, mask), _, _ = _prepared(splits._replace(test=splits.train), stats, stats is not None)
    with torch.no_grad():
        if kind == "lgssm":
            xm = x.to(device=device, dtype=model.init_mean.dtype)
            fc = model.forecast(xm, args.horizon, num_samples=args.num_samples,
                                mask=mask.to(device))
        else:
            fc = model.forecast(x.to(device), args.horizon, num_samples=args.num_samples,
                                guide=guide, mask=mask.to(device))
    # Each sequence's forecast starts after its own last step (right padding allowed). Bands:
    # exact Gaussian quantiles for the LGSSM, quantiles of the samples otherwise; the affine
    # un-standardisation maps quantiles to quantiles.
    samples = _unstandardize(fc.samples.detach().cpu().double(), stats)  # (S, N, H, p)
    band = fc.interval(args.level)
    lower = _unstandardize(band.lower.detach().cpu().double(), stats)
    upper = _unstandardize(band.upper.detach().cpu().double(), stats)
    mean = _unstandardize(fc.mean.detach().cpu().double(), stats)
    if suffix == ".npz":
        np.savez(args.out, samples=samples.numpy(), mean=mean.numpy(), lower=lower.numpy(),
                 upper=upper.numpy(), level=args.level)
    else:
        N, H, P = mean.shape
        idx = np.stack(np.meshgrid(np.arange(N), np.arange(H), np.arange(P), indexing="ij"), -1)
        table = np.column_stack([idx.reshape(-1, 3), mean.reshape(-1).numpy(),
                                 lower.reshape(-1).numpy(), upper.reshape(-1).numpy()])
        np.savetxt(args.out, table, delimiter=",", comments="", fmt="%.10g",
                   header="sequence,step,feature,mean,lower,upper")
    print(f"wrote {args.out}: {args.num_samples} samples of {args.horizon} steps for "
          f"{mean.shape[0]} sequence(s); {int(round(100 * args.level))}% intervals")
    plot = _plot_path(args)
    if plot is not None:
        if not 0 <= args.sequence < mean.shape[0]:
            raise ValueError(f"--sequence: expected an index below {mean.shape[0]}, got "
                             f"{args.sequence}")
        _agg()
        from pyrossm import plotting

        raw = splits.train[0][args.sequence]
        past = raw[: int(splits.train[1][args.sequence].sum())]
        if cfg["data"]["kind"] == "binary":
            roll = torch.cat([past.double(), mean[args.sequence]])
            ax = plotting.plot_piano_roll(roll, title="observed, then forecast probabilities")
            ax.axvline(len(past) - 0.5, color="C3")
        else:
            ax = plotting.plot_forecast(past, samples=samples[:, args.sequence], dim=args.dim,
                                        level=args.level)
            ax.set_title(f"{kind} forecast, sequence {args.sequence}, x[{args.dim}]")
        _save_fig(ax.figure, plot)
    return 0
