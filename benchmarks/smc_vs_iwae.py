"""Benchmark: three held-out estimates of log p(x) side by side -- ELBO, IWAE and SMC (issue 16).

For each case a model + structured (backward) guide is trained, or loaded, and scored on held-out
sequences, in nats per observed step (sum over sequences / observed steps):

* ``elbo``: mean over the ``K_max`` guide draws of ``log w = log p(x, z) - log q(z | x)``;
* ``iwae K``: ``logsumexp_k log w_k - log K`` (Burda et al. 2016). One set of ``K_max`` draws per
  repeat (:func:`pyrossm.infer.importance_log_weights`) gives every ``K`` that divides it: the
  IWAE-K figure is the mean over the ``K_max / K`` disjoint blocks of ``K`` draws;
* ``smc N``: ``log p̂(x)`` of :func:`pyrossm.filters.particle_filter` with ``N`` particles,
  systematic resampling at ESS < N/2 (the settings of :func:`pyrossm.infer.smc_log_likelihood`,
  which ``evaluate(..., smc_particles=N)`` calls), ``guided`` (the guide's per-step
  ``q(z_t | z_{t-1}, h_t)`` as proposal, what ``evaluate`` uses) and ``bootstrap`` (the model's
  transition). The filter is called directly to also record its effective sample size.

All three are stochastic lower bounds in expectation (``E[log p̂] <= log p``), so the larger
mean is the better estimate. Monte Carlo standard errors are over ``--repeats`` independent
repeats (the data held fixed). Diagnostics: the IWAE weights' normalised ESS
``(Σ w)² / (K Σ w²)`` per sequence, and the particle filter's mean ESS / N after weighting and
the fraction of steps at which it resampled.

Cases (all with the guide as trained with the model):

* ``lgssm_linear``: an ``LinearGaussianSSM`` (state 2, obs 2) fitted by SVI with a linear
  structured guide on data of a random stable linear system
  (:func:`pyrossm.experiments.synthetic.make_synthetic_data`); ``exact`` = the Kalman
  log-likelihood of the *fitted* model, so every estimate's gap is its own error;
* ``dmm_linear``: a small DMM (:func:`pyrossm.experiments.synthetic.build_synthetic`) on the
  same data; ``reference`` = the Kalman log-likelihood under the true parameters (not the
  DMM's own log p(x), which is unknown; on average it is an upper reference);
* ``dmm_pendulum``: the same DMM recipe on the pendulum (nonlinear, no exact value);
* ``jsb_dmm``: the DMM of Pyro's example (``build_jsb("dmm_backward", PYRO_EXAMPLE_OPTIONS)``)
  read from the newest ``checkpoint-*.pt`` under ``--jsb-checkpoint-dir`` (copied to a
  temporary directory first), on the JSB chorales test split (or its first
  ``--jsb-sequences``); data from ``$PYROSSM_DATA_DIR``.

Run from the repository root with one torch thread (``--quick``: about 20 s; the full run: 25
minutes on the shared 2-core machine at load 4-5, 23 of them for JSB, where IWAE with K = 1000
costs twice the guided SMC with N = 1000: IWAE reruns the guide's RNN for every draw, the
filter runs it once per sequence)::

    PYROSSM_DATA_DIR=/work/shared/data python benchmarks/smc_vs_iwae.py
    PYROSSM_DATA_DIR=/work/shared/data python benchmarks/smc_vs_iwae.py --quick --out ''
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

import pyro  # noqa: E402
from particle_filter import machine  # noqa: E402  (benchmarks/particle_filter.py)

from pyrossm.experiments.synthetic import build_synthetic, make_synthetic_data  # noqa: E402
from pyrossm.filters import particle_filter  # noqa: E402
from pyrossm.guides import StructuredGuide  # noqa: E402
from pyrossm.infer import fit  # noqa: E402
from pyrossm.infer.checkpoint import load_checkpoint  # noqa: E402
from pyrossm.infer.data import as_dataset  # noqa: E402
from pyrossm.infer.evaluate import importance_log_weights, observed_steps  # noqa: E402
from pyrossm.lgssm import LinearGaussianSSM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = ("lgssm_linear", "dmm_linear", "dmm_pendulum", "jsb_dmm")


def mean_se(values):
    n = len(values)
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


# ---------------------------------------------------------------------------------------------
# the estimates
def iwae_repeat(model, guide, data, ks, steps, batch_size, chunk_size):
    """ELBO and IWAE-K per step from one set of ``max(ks)`` draws, and the weights' ESS."""
    k_max = max(ks)
    lw = importance_log_weights(model, guide, data, num_samples=k_max, batch_size=batch_size,
                                chunk_size=chunk_size).double()  # (S, K_max)
    out = {"elbo": float(lw.mean(1).sum()) / steps}
    for k in ks:
        blocks = lw.reshape(lw.shape[0], k_max // k, k)
        iwae = (torch.logsumexp(blocks, -1) - math.log(k)).mean(1)
        out[f"iwae_{k}"] = float(iwae.sum()) / steps
    ess = torch.exp(2 * torch.logsumexp(lw, 1) - torch.logsumexp(2 * lw, 1)) / k_max
    out["iwae_ess_fraction"] = float(ess.mean())
    out["iwae_ess_fraction_median"] = float(ess.median())
    return out


def smc_repeat(model, guide, data, num_particles, steps, batch_size, ess_threshold=0.5):
    """``log p̂(x)`` per step of the particle filter, its mean ESS / N, fraction resampled."""
    dataset = as_dataset(data)
    total, ess_sum, res_sum, on_sum = 0.0, 0.0, 0.0, 0.0
    for start in range(0, len(dataset), batch_size):
        index = torch.arange(start, min(start + batch_size, len(dataset)))
        x, mask = dataset.batch(index, trim=True)
        res = particle_filter(model, x, mask=mask, num_particles=num_particles, guide=guide,
                              resampling="systematic", ess_threshold=ess_threshold,
                              moments=False)
        total += float(res.log_likelihood.sum())
        on = mask.to(res.ess.dtype)
        ess_sum += float((res.ess / num_particles * on).sum())
        res_sum += float((res.resampled.to(on.dtype) * on).sum())
        on_sum += float(on.sum())
    return {"smc": total / steps, "ess_fraction": ess_sum / on_sum,
            "resampled_fraction": res_sum / on_sum}


def score(name, model, guide, data, args, exact=None, reference=None, extra=None):
    """Every estimate, ``args.repeats`` times; returns the JSON-ready result of one case."""
    steps = int(observed_steps(data).sum())
    model.eval()
    guide.eval()
    rows = {}
    timings = {}

    def add(key, value):
        rows.setdefault(key, []).append(value)

    with torch.no_grad():
        for r in range(args.repeats):
            pyro.set_rng_seed(args.seed + 1000 * (r + 1))
            t0 = time.perf_counter()
            iw = iwae_repeat(model, guide, data, args.iwae_k, steps, args.batch_size,
                             args.chunk_size)
            timings.setdefault(f"iwae_{max(args.iwae_k)}_seconds", []).append(
                time.perf_counter() - t0)
            for k, v in iw.items():
                add(k, v)
            for n in args.particles:
                for kind, proposal in (("guided", guide), ("bootstrap", None)):
                    t0 = time.perf_counter()
                    sm = smc_repeat(model, proposal, data, n, steps, args.smc_batch_size)
                    timings.setdefault(f"smc_{kind}_{n}_seconds", []).append(
                        time.perf_counter() - t0)
                    add(f"smc_{kind}_{n}", sm["smc"])
                    add(f"smc_{kind}_{n}_ess_fraction", sm["ess_fraction"])
                    add(f"smc_{kind}_{n}_resampled_fraction", sm["resampled_fraction"])
                if n == min(args.particles) and n in args.iwae_k:
                    # no resampling: the guided filter is then importance sampling from the
                    # guide, the same estimator as IWAE-N (a check that the two paths agree)
                    sm = smc_repeat(model, guide, data, n, steps, args.smc_batch_size, 0.0)
                    add(f"sis_guided_{n}", sm["smc"])
            print(f"  [{name}] repeat {r + 1}/{args.repeats} done", flush=True)
    estimates = {}
    for key, values in rows.items():
        m, se = mean_se(values)
        estimates[key] = dict(mean=m, se=se, repeats=values)
    k_max, n_max = max(args.iwae_k), max(args.particles)
    best = max(["elbo"] + [f"iwae_{k}" for k in args.iwae_k]
               + [f"smc_{kind}_{n}" for kind in ("guided", "bootstrap") for n in args.particles],
               key=lambda k: estimates[k]["mean"])
    diffs = {}
    for kind in ("guided", "bootstrap"):
        a, b = estimates[f"smc_{kind}_{n_max}"], estimates[f"iwae_{k_max}"]
        d = [x - y for x, y in zip(a["repeats"], b["repeats"], strict=True)]
        m, se = mean_se(d)
        diffs[f"smc_{kind}_{n_max}_minus_iwae_{k_max}"] = dict(mean=m, se=se)
    n_min = min(args.particles)
    if f"sis_guided_{n_min}" in estimates:
        d = [x - y for x, y in zip(estimates[f"sis_guided_{n_min}"]["repeats"],
                                   estimates[f"iwae_{n_min}"]["repeats"], strict=True)]
        m, se = mean_se(d)
        diffs[f"sis_guided_{n_min}_minus_iwae_{n_min}"] = dict(mean=m, se=se)
    result = dict(case=name, sequences=int(as_dataset(data).x.shape[0]), observed_steps=steps,
                  estimates=estimates, differences=diffs, best_estimate=best,
                  seconds={k: sum(v) / len(v) for k, v in timings.items()}, **(extra or {}))
    if exact is not None:
        result["exact_per_step"] = exact
    if reference is not None:
        result["reference_per_step"] = reference
    return result


# ---------------------------------------------------------------------------------------------
# the cases
def _train(model, guide, x_train, args, lr):
    steps = args.epochs * math.ceil(x_train.shape[0] / 32)
    t0 = time.perf_counter()
    hist = fit(model, guide, x_train, epochs=args.epochs, batch_size=32, lr=lr,
               lr_decay=0.1 ** (1 / steps),
               annealing={"name": "linear", "start": 0.2, "num_steps": max(1, steps // 4)},
               device="cpu", seed=args.seed, progress=False,
               max_seconds=args.train_seconds)
    return dict(epochs_done=len(hist), train_seconds=time.perf_counter() - t0,
                final_train_elbo_per_step=-hist["train_neg_elbo_per_step"][-1])


def case_lgssm_linear(args, data):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    ssm = LinearGaussianSSM(2, data["obs_dim"])
    guide = StructuredGuide(data["obs_dim"], 2, hidden_dim=8, direction="backward",
                            combiner="linear", cell="linear")
    info = _train(ssm, guide, data["train"], args, lr=0.02)
    test = data["test"]
    mats = {k: v.detach().double() for k, v in ssm.matrices().items()}
    ssm64 = LinearGaussianSSM.from_matrices(**mats, dtype=torch.float64)
    with torch.no_grad():
        exact = float(ssm64.log_prob(test.double()).sum()) / test[..., 0].numel()
    return score("lgssm_linear", ssm, guide, test, args, exact=exact, extra=info)


def case_dmm(args, data, name):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model, guide = build_synthetic("dmm", data["obs_dim"], args.z_dim or data["state_dim"],
                                   args.hidden)
    info = _train(model, guide, data["train"], args, lr=3e-3)
    ref = data.get("exact_nll_per_frame")
    return score(name, model, guide, data["test"], args,
                 reference=None if ref is None else -ref, extra=info)


def newest_checkpoint(directory):
    found = sorted(glob.glob(os.path.join(directory, "checkpoint-*.pt")))
    if not found:
        raise FileNotFoundError(f"--jsb-checkpoint-dir: no checkpoint-*.pt in {directory!r}")
    return found[-1]


def case_jsb(args):
    from pyrossm.datasets import load_jsb_chorales
    from pyrossm.experiments.nonlinear import PYRO_EXAMPLE_OPTIONS, build_jsb, default_data_dir

    source = args.jsb_checkpoint or newest_checkpoint(args.jsb_checkpoint_dir)
    tmp = tempfile.mkdtemp(prefix="smc_vs_iwae-")
    try:  # read a copy: the training run may replace its files at any moment
        copy = shutil.copy(source, tmp)
        state = load_checkpoint(copy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pyro.clear_param_store()
    model, guide = build_jsb("dmm_backward", dict(PYRO_EXAMPLE_OPTIONS))
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    split = load_jsb_chorales("test", default_data_dir())
    n = args.jsb_sequences or len(split.lengths)
    data = (split.piano_rolls[:n], split.mask[:n])
    extra = dict(checkpoint=os.path.basename(source), checkpoint_epoch=int(state["epoch"]),
                 settings="build_jsb('dmm_backward', PYRO_EXAMPLE_OPTIONS) (--match-pyro)",
                 test_subset=f"first {n} of {len(split.lengths)} test chorales")
    return score("jsb_dmm", model, guide, data, args, extra=extra)


# ---------------------------------------------------------------------------------------------
def table(results, args):
    k_max = max(args.iwae_k)
    cols = (["elbo"] + [f"iwae_{k}" for k in args.iwae_k]
            + [f"smc_guided_{n}" for n in args.particles]
            + [f"smc_bootstrap_{n}" for n in args.particles])
    lines = [f"{'case':<13} {'estimate':<19} {'nats/step':>10} {'MC se':>8} {'vs exact':>9} "
             f"{'ESS/N':>6} {'resampled':>9}"]
    for r in results:
        truth = r.get("exact_per_step", r.get("reference_per_step"))
        sis = [c for c in r["estimates"] if c.startswith("sis_")]
        for c in cols + sis:
            e = r["estimates"][c]
            gap = f"{e['mean'] - truth:9.4f}" if truth is not None else f"{'':>9}"
            if c.startswith("smc_"):
                diag = (f"{r['estimates'][c + '_ess_fraction']['mean']:6.3f} "
                        f"{r['estimates'][c + '_resampled_fraction']['mean']:9.3f}")
            elif c == f"iwae_{k_max}":
                diag = f"{r['estimates']['iwae_ess_fraction']['mean'] * k_max:6.1f}"
                diag += f" {'(ESS)':>9}"
            else:
                diag = ""
            lines.append(f"{r['case']:<13} {c:<19} {e['mean']:10.4f} {e['se']:8.4f} {gap} {diag}")
        if truth is not None:
            label = "exact (Kalman)" if "exact_per_step" in r else "true-model Kalman"
            lines.append(f"{r['case']:<13} {label:<19} {truth:10.4f}")
        for k, d in r["differences"].items():
            lines.append(f"{r['case']:<13} {k}: {d['mean']:+.4f} +- {d['se']:.4f} nats/step")
    lines.append(f"(ESS/N: particle filter mean ESS after weighting / N; for iwae_{k_max} the "
                 f"column is the mean ESS of the {k_max} importance weights)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--quick", action="store_true",
                    help="small data, short training, K and N up to 100, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="(default 3; quick 2)")
    ap.add_argument("--iwae-k", type=int, nargs="+", default=None,
                    help="IWAE sample sizes, each dividing the largest (default 100 1000)")
    ap.add_argument("--particles", type=int, nargs="+", default=None,
                    help="SMC particle counts (default 100 1000)")
    ap.add_argument("--num-train", type=int, default=None, help="(default 400; quick 64)")
    ap.add_argument("--num-test", type=int, default=None, help="(default 64; quick 16)")
    ap.add_argument("--num-steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=None, help="(default 100; quick 10)")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="stop each synthetic model's training after this wall time")
    ap.add_argument("--z-dim", type=int, default=None, help="DMM latent size (default: true)")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--jsb-checkpoint-dir", default=str(ROOT / "runs" / "jsb_published"
                                                       / "dmm_backward"))
    ap.add_argument("--jsb-checkpoint", default=None, help="a checkpoint file (default: newest "
                    "in --jsb-checkpoint-dir)")
    ap.add_argument("--jsb-sequences", type=int, default=None,
                    help="first n test chorales (default all 77; quick 8)")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per IWAE pass")
    ap.add_argument("--chunk-size", type=int, default=250, help="draws per IWAE pass")
    ap.add_argument("--smc-batch-size", type=int, default=8, help="sequences per filter call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None,
                    help="JSON path ('' to skip; default benchmarks/results/smc_vs_iwae.json)")
    args = ap.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (2 if q else 3)
    args.iwae_k = args.iwae_k or ([10, 100] if q else [100, 1000])
    args.particles = args.particles or ([10, 100] if q else [100, 1000])
    args.num_train = args.num_train or (64 if q else 400)
    args.num_test = args.num_test or (16 if q else 64)
    args.epochs = args.epochs or (10 if q else 100)
    if args.jsb_sequences is None and q:
        args.jsb_sequences = 8
    if any(max(args.iwae_k) % k for k in args.iwae_k):
        ap.error(f"--iwae-k: each K must divide the largest, got {args.iwae_k}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # JSB's weight-decayed input weights are subnormal
    results = []
    t_start = time.perf_counter()
    linear = pendulum = None
    for case in args.cases:
        t0 = time.perf_counter()
        print(f"{case} ...", flush=True)
        if case in ("lgssm_linear", "dmm_linear"):
            linear = linear or make_synthetic_data("linear", args.num_train, args.num_test,
                                                   args.num_steps, seed=args.seed)
            r = (case_lgssm_linear(args, linear) if case == "lgssm_linear"
                 else case_dmm(args, linear, case))
        elif case == "dmm_pendulum":
            pendulum = pendulum or make_synthetic_data("pendulum", args.num_train,
                                                       args.num_test, args.num_steps,
                                                       seed=args.seed)
            r = case_dmm(args, pendulum, case)
        else:
            r = case_jsb(args)
        r["case_seconds"] = time.perf_counter() - t0
        results.append(r)
        print(table([r], args), flush=True)
    print("\n" + table(results, args))
    payload = dict(benchmark="ELBO vs IWAE vs SMC estimates of held-out log p(x) per step",
                   command="python benchmarks/smc_vs_iwae.py " + " ".join(sys.argv[1:]),
                   config={k: v for k, v in vars(args).items() if k != "out"},
                   machine=machine(),
                   timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   total_seconds=time.perf_counter() - t_start,
                   cpu_seconds=time.process_time(), results=results)
    out = RESULTS / "smc_vs_iwae.json" if args.out is None else args.out
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
