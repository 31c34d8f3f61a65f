"""Benchmark: exact log-likelihood of a batch of LGSSM sequences, pyrossm against other libraries.

Default problem (issue 2): B = 256 sequences, T = 1000 steps, state and observation dim 4,
float32 on CPU, one random stable system shared by all sequences. Timed (median of --repeats
runs after one warm-up run):

* pyrossm ``kalman_filter(..., parallel=False)`` and ``parallel=True`` (whole batch, one call);
* Pyro's ``GaussianHMM(...).log_prob(x)`` (whole batch, one call; construction included);
* pykalman ``KalmanFilter.loglikelihood`` and statsmodels ``KalmanFilter.loglike`` (numpy,
  float64, one sequence at a time): only --subset sequences are timed and the time is scaled
  by B / subset (the per-sequence cost does not depend on the other sequences).

Every method's log-likelihoods are checked against pyrossm's float64 sequential filter before
timing. Prints a table and writes JSON (--out, default benchmarks/results/kalman.json).

Run (about 2 minutes on 2 cores)::

    python benchmarks/kalman.py --threads 1
    python benchmarks/kalman.py --batch 64 --steps 200 --repeats 3   # a quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pyrossm.lgssm import kalman_filter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# problem
def make_problem(batch, steps, state_dim, obs_dim, seed):
    """A random stable system (spectral norm 0.9) and sequences simulated from it, float64."""
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(state_dim, state_dim, generator=g, **d))
    V, _ = torch.linalg.qr(torch.randn(state_dim, state_dim, generator=g, **d))
    s = torch.linspace(0.5, 0.9, state_dim, **d)
    A = U @ torch.diag(s) @ V.T
    C = torch.randn(obs_dim, state_dim, generator=g, **d) / math.sqrt(state_dim)
    Fq = torch.randn(state_dim, state_dim, generator=g, **d) / math.sqrt(state_dim)
    Fr = torch.randn(obs_dim, obs_dim, generator=g, **d) / math.sqrt(obs_dim)
    Q = 0.5 * Fq @ Fq.T + 0.1 * torch.eye(state_dim, **d)
    R = 0.5 * Fr @ Fr.T + 0.2 * torch.eye(obs_dim, **d)
    m0 = torch.zeros(state_dim, **d)
    P0 = torch.eye(state_dim, **d)
    LQ, LR, L0 = (torch.linalg.cholesky(M) for M in (Q, R, P0))
    z = m0 + torch.randn(batch, state_dim, generator=g, **d) @ L0.T
    xs = []
    for t in range(steps):
        if t > 0:
            z = z @ A.T + torch.randn(batch, state_dim, generator=g, **d) @ LQ.T
        xs.append(z @ C.T + torch.randn(batch, obs_dim, generator=g, **d) @ LR.T)
    x = torch.stack(xs, -2)  # (batch, time, obs_dim)
    return dict(x=x, A=A, C=C, Q=Q, R=R, init_mean=m0, init_cov=P0)


def cast(problem, dtype):
    return {k: v.to(dtype) for k, v in problem.items()}


# ---------------------------------------------------------------------------------------------
# methods: each returns a function computing the (batch,) log-likelihoods of its sequences
def pyrossm_method(parallel):
    def run(p):
        return kalman_filter(p["x"], p["A"], p["C"], p["Q"], p["R"], p["init_mean"],
                             p["init_cov"], parallel=parallel).log_likelihood
    return run


def gaussian_hmm_method(p):
    """Pyro's GaussianHMM: row vectors (transition_matrix = Aᵀ, observation_matrix = Cᵀ); its
    initial distribution N(m, S) is the state one step *before* the first observation, so its
    log-likelihoods are checked against pyrossm at (A m, A S Aᵀ + Q) (:func:`hmm_equivalent`)."""
    import pyro.distributions as dist

    def run(q):
        n, k = q["A"].shape[-1], q["C"].shape[-2]
        hmm = dist.GaussianHMM(
            dist.MultivariateNormal(q["init_mean"], q["init_cov"]),
            q["A"].T,
            dist.MultivariateNormal(torch.zeros(n, dtype=q["A"].dtype), q["Q"]),
            q["C"].T,
            dist.MultivariateNormal(torch.zeros(k, dtype=q["A"].dtype), q["R"]),
            duration=q["x"].shape[-2],
        )
        return hmm.log_prob(q["x"])
    return run


def hmm_equivalent(p):
    """pyrossm's initial moments equal to the HMM's first-step prior."""
    A, Q = p["A"], p["Q"]
    return dict(p, init_mean=A @ p["init_mean"], init_cov=A @ p["init_cov"] @ A.T + Q)


def pykalman_method(p_np):
    from pykalman import KalmanFilter

    kf = KalmanFilter(
        transition_matrices=p_np["A"], observation_matrices=p_np["C"],
        transition_covariance=p_np["Q"], observation_covariance=p_np["R"],
        initial_state_mean=p_np["init_mean"], initial_state_covariance=p_np["init_cov"],
    )

    def run(x):
        return np.array([kf.loglikelihood(xb) for xb in x])
    return run


def statsmodels_method(p_np):
    from statsmodels.tsa.statespace.kalman_filter import KalmanFilter

    n, k = p_np["A"].shape[0], p_np["C"].shape[0]

    def run(x):
        out = []
        for xb in x:
            kf = KalmanFilter(k_endog=k, k_states=n, k_posdef=n)
            kf.bind(np.asfortranarray(xb.T))
            kf["design"], kf["obs_cov"] = p_np["C"], p_np["R"]
            kf["transition"], kf["state_cov"] = p_np["A"], p_np["Q"]
            kf["selection"] = np.eye(n)
            kf.initialize_known(p_np["init_mean"], p_np["init_cov"])
            out.append(kf.loglike())
        return np.array(out)
    return run


def timeit(fn, arg, repeats):
    fn(arg)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def max_rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for mod in ("pyro", "statsmodels", "pykalman", "scipy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            out[mod] = None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="number of sequences B")
    ap.add_argument("--steps", type=int, default=1000, help="sequence length T")
    ap.add_argument("--state-dim", type=int, default=4)
    ap.add_argument("--obs-dim", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the torch methods (numpy libraries always use float64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method (median)")
    ap.add_argument("--subset", type=int, default=8,
                    help="sequences timed for the looping numpy libraries (scaled to --batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["sequential", "parallel", "gaussian_hmm", "pykalman", "statsmodels"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kalman.json"),
                    help="JSON output path ('' to skip)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    subset = min(args.subset, args.batch)

    p64 = make_problem(args.batch, args.steps, args.state_dim, args.obs_dim, args.seed)
    p = cast(p64, dtype)
    p_np = {k: v.numpy() for k, v in p64.items()}
    ref = pyrossm_method(False)(p64).numpy()  # float64 reference log-likelihoods
    ref_hmm = pyrossm_method(False)(hmm_equivalent(p64)).numpy()

    rows = []

    def record(name, fn, arg, scale, check_ref, note):
        ll = fn(arg)
        ll = ll.detach().numpy() if isinstance(ll, torch.Tensor) else ll
        err = max_rel_err(ll, check_ref[: len(ll)])
        seconds, times = timeit(fn, arg, args.repeats)
        rows.append(dict(method=name, seconds=seconds * scale, measured_seconds=seconds,
                         scale=scale, all_times=times, max_rel_err_vs_float64=err, note=note))
        print(f"  {name:<28s} {seconds * scale:9.4f} s   (rel. err. {err:.1e})", flush=True)

    print(f"B={args.batch} T={args.steps} n={args.state_dim} p={args.obs_dim} "
          f"dtype={args.dtype} torch threads={torch.get_num_threads()}", flush=True)
    if "sequential" not in args.skip:
        record("pyrossm sequential", pyrossm_method(False), p, 1, ref, "one batched call")
    if "parallel" not in args.skip:
        record("pyrossm parallel", pyrossm_method(True), p, 1, ref, "one batched call")
    if "gaussian_hmm" not in args.skip:
        record("pyro GaussianHMM", gaussian_hmm_method(p), p, 1, ref_hmm,
               "one batched call (construction included)")
    if "pykalman" not in args.skip:
        record("pykalman (loop)", pykalman_method(p_np), p_np["x"][:subset],
               args.batch / subset, ref,
               f"float64; {subset} sequences timed, scaled x{args.batch / subset:g}")
    if "statsmodels" not in args.skip:
        record("statsmodels (loop)", statsmodels_method(p_np), p_np["x"][:subset],
               args.batch / subset, ref,
               f"float64; {subset} sequences timed, scaled x{args.batch / subset:g}")

    ours = [r["seconds"] for r in rows if r["method"].startswith("pyrossm")]
    best = min(ours) if ours else float("nan")
    by_name = {r["method"]: r["seconds"] for r in rows}
    print()
    header = f"{'method':<28s} {'seconds':>10s} {'x pyrossm best':>15s}"
    for m in ("pyrossm sequential", "pyrossm parallel"):
        if m in by_name:
            header += f" {'x ' + m.split()[1][:3]:>8s}"
    print(header)
    for r in rows:
        r["ratio_vs_pyrossm_best"] = r["seconds"] / best
        line = f"{r['method']:<28s} {r['seconds']:10.4f} {r['ratio_vs_pyrossm_best']:15.1f}"
        for m in ("pyrossm sequential", "pyrossm parallel"):
            if m in by_name:
                r[f"ratio_vs_{m.replace(' ', '_')}"] = r["seconds"] / by_name[m]
                line += f" {r['seconds'] / by_name[m]:8.1f}"
        print(line)
    targets = {}
    if "pyro GaussianHMM" in by_name and ours:
        targets["speedup_vs_gaussian_hmm"] = by_name["pyro GaussianHMM"] / best
        targets["target_gaussian_hmm_5x_met"] = targets["speedup_vs_gaussian_hmm"] >= 5
    if "pykalman (loop)" in by_name and ours:
        targets["speedup_vs_pykalman"] = by_name["pykalman (loop)"] / best
        targets["target_pykalman_50x_met"] = targets["speedup_vs_pykalman"] >= 50
    if targets:
        print("\n" + ", ".join(f"{k} = {v:.1f}" if isinstance(v, float) else f"{k} = {v}"
                               for k, v in targets.items()))

    result = dict(
        benchmark="kalman log-likelihood",
        command="python benchmarks/kalman.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        config=dict(batch=args.batch, steps=args.steps, state_dim=args.state_dim,
                    obs_dim=args.obs_dim, dtype=args.dtype, repeats=args.repeats,
                    subset=subset, seed=args.seed),
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                     load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                     versions=versions()),
        timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        results=rows,
        targets=targets,
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
