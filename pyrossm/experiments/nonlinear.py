"""Experiments of issue 4: JSB chorales and synthetic checks against Kalman baselines.

Every figure is reported both ways, and named so:

* ``neg_elbo_per_frame`` — −ELBO / frame (the variational bound, :func:`pyrossm.infer.elbo`);
* ``iwae_nll_per_frame`` — IWAE negative log-likelihood / frame, ``−log (1/K) Σ_k w_k``
  (:func:`pyrossm.infer.log_likelihood`, Burda et al. 2016; tighter, ≤ −ELBO).

"Frame" = one time step of one sequence (``mask.sum()``), as in Krishnan et al. (2017) and Pyro's
DMM example. Commands (JSON written to ``benchmarks/results/``, a table printed):

    python -m pyrossm.experiments.nonlinear jsb --minutes 60          # CPU budget per model
    python -m pyrossm.experiments.nonlinear jsb --epochs 5000         # the full published run

The published schedule (5,000 epochs, about 3.5 h of one CPU core) in resumable pieces: run the
same command again until ``epochs_done`` reaches 5000; each call trains for at most
``--minutes`` and checkpoints every epoch (the test curve of ``--eval-every`` is kept too), then
score the end with K = 1000 (``--minutes 0`` trains nothing and only evaluates):

    PYROSSM_DATA_DIR=/work/shared/data nice -n 10 python -m pyrossm.experiments.nonlinear jsb \
        --configs dmm_backward --match-pyro --epochs 5000 --minutes 60 --eval-every 50 \
        --checkpoint-dir runs/jsb_published --resume \
        --output benchmarks/results/jsb_published.json
    # ... repeated until epochs_done == 5000, then the same command with
    #     --minutes 0 --iwae-samples 1000 --output benchmarks/results/jsb_published_k1000.json

``--match-pyro`` takes Pyro's example's choices where pyrossm's defaults differ (ReLU RNN
encoder, no scale floors, Bernoulli by probabilities: :data:`PYRO_EXAMPLE_OPTIONS`); without it
the guide's encoder is an LSTM (``--encoder-cell``).
    python -m pyrossm.experiments.nonlinear synthetic --system linear
    python -m pyrossm.experiments.nonlinear synthetic --system pendulum

JSB defaults are those of the published DMM setup (Krishnan et al. 2017; Pyro's ``dmm.py``):
z 100, transition 200, emission 100, inference RNN 600, Adam lr 3e-4, betas (0.96, 0.999),
clipping 10, lr decay 0.99996 per step, weight decay 2.0 (Pyro's ClippedAdam), batch 20,
KL annealing linear from 0.2 to 1 over 1000 epochs, 5000 epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import pyro
import torch

from pyrossm.build import ModelSpec, build
from pyrossm.experiments.common import evaluate
from pyrossm.infer import elbo, fit, make_schedule

__all__ = [
    "JSB_CONFIGS",
    "JSB_DEFAULTS",
    "PYRO_EXAMPLE_OPTIONS",
    "build_jsb",
    "default_data_dir",
    "evaluate",
    "main",
    "run_jsb",
]

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"

JSB_DEFAULTS = dict(
    z_dim=100, transition_dim=200, emission_dim=100, rnn_dim=600, lr=3e-4, betas=(0.96, 0.999),
    clip_norm=10.0, lr_decay=0.99996, weight_decay=2.0, batch_size=20, annealing_epochs=1000,
    min_annealing=0.2, epochs=5000, encoder_cell="lstm", free_bits=None,
    free_bits_per="dimension", transition_scale_floor=1e-3, guide_scale_floor=1e-4,
    bernoulli="logits", num_iafs=0, iaf_dim=100,
)
# What Pyro's examples/dmm.py does where pyrossm's defaults differ (``--match-pyro``): a plain
# ReLU RNN encoder, no floor under the softplus scales, Bernoulli from (clamped) probabilities.
# Its ``--rnn-dropout-rate 0.1`` is inactive: the example sets it to 0 for a one-layer RNN.
PYRO_EXAMPLE_OPTIONS = dict(
    encoder_cell="relu", transition_scale_floor=0.0, guide_scale_floor=0.0, bernoulli="probs",
)
# name -> (model, guide) description
JSB_CONFIGS = {
    "dmm_backward": "DMM (gated transition) + backward structured guide (DKS)",
    "dmm_filtering": "DMM (gated transition) + filtering LSTM guide q(z_t | x_<=t)",
    "lstm_ssm": "LSTM-driven prior + backward structured guide (DKS)",
}


def default_data_dir() -> str | None:
    """``$PYROSSM_DATA_DIR``, else ``<repo>/../shared/data`` if it exists, else None (cache)."""
    env = os.environ.get("PYROSSM_DATA_DIR")
    if env:
        return env
    shared = REPO.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else None


def build_jsb(config: str, sizes: dict | None = None):
    """``(model, guide)`` of a JSB configuration (see :data:`JSB_CONFIGS`), 88-key piano rolls.

    ``sizes`` overrides :data:`JSB_DEFAULTS`; besides the sizes it may set ``encoder_cell``,
    ``transition_scale_floor`` (the DMM transition's floor under its softplus scale),
    ``guide_scale_floor`` (the structured guide's), ``bernoulli`` (``"logits"`` or
    ``"probs"``, see :class:`~pyrossm.nonlinear.networks.BernoulliEmission`) and ``num_iafs``,
    ``iaf_dim`` (flows on every guide step, :class:`~pyrossm.nonlinear.iaf.IAFGuide`, as Pyro's
    example's ``--num-iafs``);
    :data:`PYRO_EXAMPLE_OPTIONS` are Pyro's example's choices.

    >>> small = dict(z_dim=2, transition_dim=4, emission_dim=4, rnn_dim=4)
    >>> model, guide = build_jsb("dmm_backward", {**small, **PYRO_EXAMPLE_OPTIONS})
    >>> model.emitter.parameterization, guide.encoders[0].rnn.nonlinearity
    ('probs', 'relu')
    """
    s = {**JSB_DEFAULTS, **(sizes or {})}
    if config not in JSB_CONFIGS:
        raise ValueError(f"config: expected one of {sorted(JSB_CONFIGS)}, got {config!r}")
    if s["bernoulli"] not in ("logits", "probs"):
        raise ValueError(f"bernoulli: expected 'logits' or 'probs', got {s['bernoulli']!r}")
    for name in ("transition_scale_floor", "guide_scale_floor"):
        if not float(s[name]) >= 0:
            raise ValueError(f"{name}: expected a non-negative float, got {s[name]!r}")
    spec = ModelSpec(
        "lstm-ssm" if config == "lstm_ssm" else "dmm", obs_dim=88, state_dim=s["z_dim"],
        guide="filtering-lstm" if config == "dmm_filtering" else "backward",
        emission="bernoulli", transition_dim=s["transition_dim"],
        emission_dim=s["emission_dim"], rnn_dim=s["rnn_dim"], encoder_cell=s["encoder_cell"],
        missing_indicators=False,
    )
    model, guide = build(spec)
    model.emitter.parameterization = s["bernoulli"]
    if hasattr(model.dynamics, "transition"):  # the DMM's gated transition
        model.dynamics.transition.scale_floor = float(s["transition_scale_floor"])
    combiner = getattr(guide, "combiner", None)
    if combiner is not None:  # structured guides
        combiner.hidden_to_scale.floor = float(s["guide_scale_floor"])
    if s["num_iafs"]:
        if config == "dmm_filtering":
            raise ValueError("num_iafs: IAFs augment the structured (backward) guide, not the "
                             "filtering guide of 'dmm_filtering'")
        from pyrossm.nonlinear.iaf import IAFGuide

        guide = IAFGuide(guide, int(s["num_iafs"]), int(s["iaf_dim"]))
    return model, guide


def _log_callback(log_every, name):
    def callback(record):
        if log_every and record["epoch"] % log_every == 0:
            val = record["val_neg_elbo_per_step"]
            print(f"[{name}] epoch {record['epoch']} train -ELBO/frame "
                  f"{record['train_neg_elbo_per_step']:.4f} beta {record['beta']:.3f} "
                  + (f"val -ELBO/frame {val:.4f} " if val is not None else "")
                  + f"{record['seconds']:.1f}s", flush=True)
    return callback


class _TestCurve:
    """Callback: test −ELBO per frame every ``every`` epochs, saved to ``<ckpt>/test_curve.json``
    (and reloaded on resume, dropping points past the checkpoint's epoch)."""

    def __init__(self, model, guide, test, every, draws, ckpt, resume):
        self.model, self.guide, self.test, self.every, self.draws = model, guide, test, every, draws
        self.path = None if ckpt is None else Path(ckpt) / "test_curve.json"
        self.points = {"epoch": [], "neg_elbo_per_frame": [], "draws": draws}
        if resume and self.path is not None and self.path.is_file():
            self.points = json.loads(self.path.read_text())

    def __call__(self, record):
        epoch = record["epoch"]
        if epoch in self.points["epoch"]:  # resumed before this point was checkpointed
            keep = self.points["epoch"].index(epoch)
            for k in ("epoch", "neg_elbo_per_frame"):
                del self.points[k][keep:]
        if not self.every or epoch % self.every:
            return None
        rng = torch.get_rng_state()
        x, mask = self.test
        e = elbo(self.model, self.guide, (x, mask), num_samples=self.draws, batch_size=len(x))
        torch.set_rng_state(rng)  # scoring does not change the training's random stream
        self.points["epoch"].append(epoch)
        self.points["neg_elbo_per_frame"].append(-float(e.sum()) / float(mask.sum()))
        print(f"  test -ELBO/frame at epoch {epoch}: {self.points['neg_elbo_per_frame'][-1]:.4f}",
              flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.points))
        return None


def run_jsb(configs=tuple(JSB_CONFIGS), *, epochs: int | None = None, minutes: float | None = None,
            annealing_epochs: int | None = None, iwae_samples: int = 100, elbo_samples: int = 1,
            data_dir=None, seed: int = 0, sizes: dict | None = None,
            checkpoint_dir=None, resume: bool = False, log_every: int = 1,
            bucket: bool = False, output: str | None = None, device="cpu",
            eval_every: int = 0, curve_draws: int = 4) -> dict:
    """Train and evaluate JSB configurations; returns ``{config: result dict}``.

    Each configuration trains for ``epochs`` (default 5000) or until ``minutes`` of wall clock
    have passed (``fit``'s ``max_seconds``: a paused run that ``resume=True`` continues),
    whichever comes first; the result records the epochs
    done, seconds per epoch, training frames per second, the learning curve and the test
    ``neg_elbo_per_frame`` / ``iwae_nll_per_frame`` (see the module docstring).
    ``bucket=True`` batches sequences of similar lengths together (less padding, faster epochs;
    Pyro's example draws batches uniformly). ``eval_every=N`` also scores the test split every
    ``N`` epochs (−ELBO per frame, the mean of ``curve_draws`` guide draws) into the result's
    ``test_curve``; with a ``checkpoint_dir`` that curve is saved beside the checkpoints, so a
    resumed run keeps it.
    """
    from pyrossm.datasets import load_jsb_chorales

    s = {**JSB_DEFAULTS, **(sizes or {})}
    s["epochs"] = epochs = epochs or s["epochs"]
    s["annealing_epochs"] = annealing_epochs = annealing_epochs or s["annealing_epochs"]
    data_dir = data_dir or default_data_dir()
    splits = {k: load_jsb_chorales(k, data_dir) for k in ("train", "valid", "test")}
    train = (splits["train"].piano_rolls, splits["train"].mask)
    test = (splits["test"].piano_rolls, splits["test"].mask)
    train_frames = int(splits["train"].mask.sum())
    batches_per_epoch = math.ceil(len(splits["train"].lengths) / s["batch_size"])
    annealing = make_schedule({"name": "linear", "start": s["min_annealing"],
                               "num_steps": annealing_epochs * batches_per_epoch})
    results = {}
    for config in configs:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide = build_jsb(config, s)
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / config
        callbacks = [_log_callback(log_every, config)]
        curve = _TestCurve(model, guide, test, eval_every, curve_draws, ckpt, resume)
        if eval_every:
            callbacks.append(curve)
        t0 = time.perf_counter()
        history = fit(
            model, guide, train, epochs=epochs, batch_size=s["batch_size"], lr=s["lr"],
            betas=s["betas"], clip_norm=s["clip_norm"], lr_decay=s["lr_decay"],
            weight_decay=s["weight_decay"], annealing=annealing, device=device, seed=seed,
            free_bits=s["free_bits"], free_bits_per=s["free_bits_per"],
            checkpoint_dir=None if ckpt is None else str(ckpt),
            resume=resume, progress=False, bucket=bucket,
            max_seconds=None if minutes is None else 60.0 * minutes,
            callbacks=callbacks,
        )
        train_seconds = time.perf_counter() - t0
        seconds = history["seconds"]
        test_eval = evaluate(model, guide, test, iwae_samples=iwae_samples,
                             elbo_samples=elbo_samples, batch_size=s["batch_size"])
        results[config] = {
            "description": JSB_CONFIGS[config],
            "epochs_done": len(history),
            "epochs_planned": epochs,
            "converged": False if len(history) < epochs else None,
            "stop_reason": history.stop_reason,
            "minutes_budget": minutes,
            "train_seconds": train_seconds,
            # None when the budget was spent before the first step (e.g. a resumed run)
            "seconds_per_epoch_mean": sum(seconds) / len(seconds) if seconds else None,
            "train_frames_per_second": (train_frames * len(seconds) / sum(seconds)
                                        if seconds else None),
            "final_beta": history["beta"][-1] if len(history) else None,
            "learning_curve": {k: history[k] for k in
                               ("epoch", "train_neg_elbo_per_step", "beta", "seconds")},
            "test": test_eval,
            "test_curve": curve.points if eval_every else None,
        }
        print(f"[{config}] done: {len(history)} epochs, test -ELBO/frame "
              f"{test_eval['neg_elbo_per_frame']:.4f}, IWAE NLL/frame (K={iwae_samples}) "
              f"{test_eval['iwae_nll_per_frame']:.4f}", flush=True)
        if output:
            _write(output, _jsb_payload(results, s, annealing, data_dir, seed, bucket))
    return _jsb_payload(results, s, annealing, data_dir, seed, bucket)


def _jsb_payload(results, s, annealing, data_dir, seed, bucket):
    return {
        "experiment": "JSB chorales (test split, 77 chorales)",
        "metrics": {"neg_elbo_per_frame": "-ELBO per frame (bound)",
                    "iwae_nll_per_frame": "IWAE negative log-likelihood per frame"},
        "references": {"pyro_dmm_example_neg_elbo": 6.87, "krishnan2017_dks_is_nll": 6.388,
                       "krishnan2017_dks_bound": 6.926, "krishnan2017_stl_bound": 7.020},
        "settings": {**s, "annealing": annealing.to_dict(), "seed": seed, "bucket": bucket,
                     "threads": torch.get_num_threads(), "data_dir": data_dir},
        "results": results,
    }


def _write(path, payload):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def _jsb_table(payload) -> str:
    lines = [f"{'config':<15} {'epochs':>6} {'s/epoch':>8} {'frames/s':>9} "
             f"{'-ELBO/frame':>12} {'IWAE NLL/frame':>15}"]
    for name, r in payload["results"].items():
        sec, fps = r["seconds_per_epoch_mean"], r["train_frames_per_second"]
        speed = f"{sec:>8.1f} {fps:>9.0f}" if sec is not None else f"{'-':>8} {'-':>9}"
        lines.append(f"{name:<15} {r['epochs_done']:>6} {speed} "
                     f"{r['test']['neg_elbo_per_frame']:>12.4f} "
                     f"{r['test']['iwae_nll_per_frame']:>15.4f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pyrossm.experiments.nonlinear",
        description="Nonlinear SSM experiments (issue 4). Figures: -ELBO per frame (bound) and "
                    "IWAE NLL per frame (importance-weighted).")
    sub = parser.add_subparsers(dest="command", required=True)
    j = sub.add_parser("jsb", help="JSB chorales with the published DMM settings")
    j.add_argument("--configs", default=",".join(JSB_CONFIGS),
                   help=f"comma-separated subset of {list(JSB_CONFIGS)}")
    j.add_argument("--epochs", type=int, default=JSB_DEFAULTS["epochs"])
    j.add_argument("--minutes", type=float, default=None,
                   help="wall-clock training budget per configuration (CPU-size runs)")
    j.add_argument("--annealing-epochs", type=int, default=JSB_DEFAULTS["annealing_epochs"])
    j.add_argument("--iwae-samples", type=int, default=100)
    j.add_argument("--elbo-samples", type=int, default=1)
    j.add_argument("--data-dir", default=None,
                   help="holds jsb_chorales.pickle (default $PYROSSM_DATA_DIR, then "
                        "<repo>/../shared/data)")
    j.add_argument("--checkpoint-dir", default=None)
    j.add_argument("--resume", action="store_true")
    j.add_argument("--bucket", action="store_true",
                   help="length-bucketed batches (less padding; default: uniform batches)")
    for name in ("z_dim", "transition_dim", "emission_dim", "rnn_dim", "batch_size"):
        j.add_argument("--" + name.replace("_", "-"), type=int, default=JSB_DEFAULTS[name])
    j.add_argument("--free-bits", type=float, default=None,
                   help="free-bits threshold in nats per sequence, against posterior collapse "
                        "(not in the published setup)")
    j.add_argument("--free-bits-per", choices=("sequence", "dimension"), default="dimension",
                   help="the threshold bounds each latent coordinate's KL or the total KL")
    j.add_argument("--encoder-cell", choices=("lstm", "gru", "rnn", "relu"), default=None,
                   help="the backward guide's encoder (default lstm; rnn = tanh RNN; Pyro's DMM "
                        "example uses a ReLU RNN, 'relu')")
    j.add_argument("--transition-scale-floor", type=float, default=None,
                   help=f"floor under the transition's softplus scale "
                        f"(default {JSB_DEFAULTS['transition_scale_floor']}; Pyro's example: 0)")
    j.add_argument("--guide-scale-floor", type=float, default=None,
                   help=f"floor under the guide's softplus scale "
                        f"(default {JSB_DEFAULTS['guide_scale_floor']}; Pyro's example: 0)")
    j.add_argument("--bernoulli", choices=("logits", "probs"), default=None,
                   help="emission parameterisation (default logits; Pyro's example: probs)")
    j.add_argument("--match-pyro", action="store_true",
                   help="Pyro's example's choices where pyrossm's defaults differ: "
                        f"{PYRO_EXAMPLE_OPTIONS} (explicit flags override)")
    j.add_argument("--num-iafs", type=int, default=0,
                   help="affine autoregressive flows on every guide step (Pyro's --num-iafs)")
    j.add_argument("--iaf-dim", type=int, default=JSB_DEFAULTS["iaf_dim"])
    j.add_argument("--eval-every", type=int, default=0,
                   help="also score the test split every N epochs (-ELBO/frame, "
                        "--curve-draws guide draws; kept across --resume in the checkpoint "
                        "folder)")
    j.add_argument("--curve-draws", type=int, default=4)
    for name in ("lr", "lr_decay", "clip_norm", "weight_decay", "min_annealing"):
        j.add_argument("--" + name.replace("_", "-"), type=float, default=JSB_DEFAULTS[name],
                       help=f"(published: {JSB_DEFAULTS[name]})")
    so = sub.add_parser("synthetic", help="linear-Gaussian / nonlinear data vs Kalman baselines")
    so.add_argument("--system", choices=("linear", "pendulum", "lorenz"), default="linear")
    so.add_argument("--models", default="dmm,lstm_ssm")
    so.add_argument("--epochs", type=int, default=300)
    so.add_argument("--minutes", type=float, default=None, help="budget per model")
    so.add_argument("--iwae-samples", type=int, default=500)
    so.add_argument("--lr", type=float, default=3e-3)
    so.add_argument("--batch-size", type=int, default=32)
    so.add_argument("--num-train", type=int, default=400)
    so.add_argument("--lgssm-state-dims", default="1,2,3,4",
                    help="state dims of the MLE-fitted LGSSM baselines (nonlinear systems)")
    so.add_argument("--num-test", type=int, default=200)
    so.add_argument("--num-steps", type=int, default=50, help="time steps per sequence")
    so.add_argument("--hidden", type=int, default=32, help="hidden sizes of nets and guide RNN")
    so.add_argument("--z-dim", type=int, default=None,
                    help="latent size of the nonlinear models (default: the true state size)")
    for p in (j, so):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "jsb":
        # 37 of JSB's 88 keys never sound in the training set: their input weights get no
        # gradient, weight decay shrinks them geometrically, and after ~300 epochs they are
        # subnormal floats, which made every CPU epoch ~3x slower (2.3 s -> 7 s). Flush them.
        torch.set_flush_denormal(True)
        sizes = {k: getattr(args, k) for k in
                 ("z_dim", "transition_dim", "emission_dim", "rnn_dim", "batch_size", "lr",
                  "lr_decay", "clip_norm", "weight_decay", "min_annealing",
                  "free_bits", "free_bits_per", "num_iafs", "iaf_dim")}
        if args.match_pyro:
            sizes.update(PYRO_EXAMPLE_OPTIONS)
        for k in ("encoder_cell", "transition_scale_floor", "guide_scale_floor", "bernoulli"):
            if getattr(args, k) is not None:
                sizes[k] = getattr(args, k)
        output = args.output or str(RESULTS_DIR / "jsb.json")
        payload = run_jsb(tuple(args.configs.split(",")), epochs=args.epochs,
                          minutes=args.minutes, annealing_epochs=args.annealing_epochs,
                          iwae_samples=args.iwae_samples, elbo_samples=args.elbo_samples,
                          data_dir=args.data_dir, seed=args.seed, sizes=sizes,
                          checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                          bucket=args.bucket, output=output, eval_every=args.eval_every,
                          curve_draws=args.curve_draws)
        _write(output, payload)
        print(_jsb_table(payload))
    else:
        from pyrossm.experiments.synthetic import run_synthetic, synthetic_table

        output = args.output or str(RESULTS_DIR / f"nonlinear_synthetic_{args.system}.json")
        payload = run_synthetic(args.system, models=tuple(args.models.split(",")),
                                epochs=args.epochs, minutes=args.minutes,
                                iwae_samples=args.iwae_samples, seed=args.seed,
                                num_train=args.num_train, num_test=args.num_test,
                                num_steps=args.num_steps, hidden=args.hidden, lr=args.lr,
                                z_dim=args.z_dim,
                                batch_size=args.batch_size,
                                lgssm_state_dims=tuple(
                                    int(d) for d in args.lgssm_state_dims.split(",")))
        _write(output, payload)
        print(synthetic_table(payload))
    print(f"wrote {output}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
