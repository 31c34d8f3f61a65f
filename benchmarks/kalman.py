"""Benchmark: exact log-likelihood of a batch of LGSSM sequences, pyrossm against other libraries.

Cells (issue 13): B = 256 sequences of T = 1000 steps and B = 16 of T = 10,000, state and
observation dim 4, float32 on CPU, one random stable system shared by all sequences, with no
missing data and with 10% of the entries missing (NaN, drawn independently). Timed (median of
--repeats runs after one warm-up run; single thread):

* pyrossm ``kalman_filter(..., parallel=False)`` (returns the step log-likelihoods and the
  filtered and predicted moments too; compare it with ``dynamax +moments``),
  ``kalman_filter(..., predicted=False, per_step=False)`` ("filtered moments only": the
  outputs of ``dynamax +moments``, like for like), ``kalman_log_likelihood`` (the
  log-likelihood only, as ``dynamax``), each also with
  the steady-state stop of the covariance recursion turned off (``_steps.STEADY_STATE = False``;
  also ``kalman_log_likelihood`` so, without missing data),
  and ``parallel=True``; with missing data also with ``pyrossm.lgssm.set_compile(True)``
  (``torch.compile``'d time steps; the compile time, like dynamax's, is the first call's);
* dynamax 1.0.3 ``lgssm_filter`` under ``jax.jit(jax.vmap(...))``, returning the
  log-likelihood only (``dynamax``) or also the filtered means and covariances
  (``dynamax +moments``); missing entries are given to it as per-sequence time-varying
  emission weights and covariances (rows of C zeroed, R's rows/columns replaced by the
  identity, innovations 0; the N(0; 0, 1) factors removed afterwards), which is what pyrossm does
  internally. Its compile time is reported separately. Skipped with a message when
  ``dynamax``/``jax`` are not importable (``pip install dynamax==1.0.3 jax jaxlib``);
* in the B = 256 cell without missing data: Pyro's ``GaussianHMM(...).log_prob(x)``, pykalman's
  ``KalmanFilter.loglikelihood`` and statsmodels' ``KalmanFilter.loglike`` (numpy, float64,
  one sequence at a time: only --subset sequences are timed and the time is scaled by
  B / subset).

Every method's log-likelihoods are checked against pyrossm's float64 sequential filter before
timing. Prints a table and writes JSON (--out, default benchmarks/results/kalman.json).

Run (single core; about 10 minutes with pykalman, use --skip pykalman for 2)::

    taskset -c 0 python benchmarks/kalman.py --threads 1
    python benchmarks/kalman.py --cells 64x200 --missing 0 --repeats 3   # a quick run
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pyrossm.lgssm import (  # noqa: E402
    _steps,
    kalman_filter,
    kalman_log_likelihood,
    set_compile,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

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
def pyrossm_method(parallel, steady_state=True, compiled=False, moments=True, filtered_only=False):
    """``kalman_filter`` (moments too), or with ``moments=False`` ``kalman_log_likelihood``;
    ``filtered_only``: ``kalman_filter(..., predicted=False, per_step=False)``, which returns
    what dynamax's ``lgssm_filter`` does (the log-likelihood and the filtered moments)."""
    def run(p):
        _steps.STEADY_STATE = steady_state
        previous = set_compile(compiled)
        args = [p[k] for k in ("x", "A", "C", "Q", "R", "init_mean", "init_cov")]
        try:
            if not moments:
                return kalman_log_likelihood(*args)
            if filtered_only:
                return kalman_filter(*args, parallel=parallel, predicted=False,
                                     per_step=False).log_likelihood
            return kalman_filter(*args, parallel=parallel).log_likelihood
        finally:
            _steps.STEADY_STATE = True
            set_compile(previous)
    return run


def add_missing(p, frac, seed):
    """The problem with a fraction ``frac`` of the entries of x set to NaN (independently)."""
    if frac <= 0:
        return p
    g = torch.Generator().manual_seed(seed + 1)
    x = p["x"].clone()
    x[torch.rand(x.shape, generator=g, dtype=torch.float64) < frac] = float("nan")
    return dict(p, x=x)


def dynamax_params(p):
    """``A, C, Q, R, init_mean, init_cov`` of the problem as float32 jax arrays."""
    import jax.numpy as jnp

    return tuple(jnp.asarray(p[k].numpy(), dtype=jnp.float32)
                 for k in ("A", "C", "Q", "R", "init_mean", "init_cov"))


def dynamax_masked(p, C, R):
    """Missing entries as dynamax sees them: per-sequence, per-step emission weights ``H``
    (rows of C zeroed) and covariances ``Rm`` (rows/columns of R replaced by the identity),
    data ``y`` with 0 there, and the number of missing entries per sequence (whose N(0; 0, 1)
    factors are removed from dynamax's log-likelihood afterwards)."""
    import jax.numpy as jnp

    x = p["x"].numpy()
    obs = ~np.isnan(x)
    o = jnp.asarray(obs, dtype=jnp.float32)
    y = jnp.asarray(np.where(obs, x, 0.0), dtype=jnp.float32)
    H = C * o[..., :, None]
    Rm = R * o[..., :, None] * o[..., None, :] + jnp.eye(x.shape[-1]) * (1 - o)[..., None]
    return y, H, Rm, (1 - o).sum((-1, -2))


def dynamax_method(p, moments):
    """dynamax's ``lgssm_filter`` under jit + vmap (float32). Missing entries become
    per-sequence time-varying emission parameters (C rows zeroed, R rows/cols identity)."""
    import jax
    import jax.numpy as jnp
    from dynamax.linear_gaussian_ssm.inference import lgssm_filter, make_lgssm_params

    A, C, Q, R, m0, P0 = dynamax_params(p)
    x = p["x"].numpy()
    obs = ~np.isnan(x)

    def out(res, correction=0.0):
        ll = res.marginal_loglik + correction
        return (ll, res.filtered_means, res.filtered_covariances) if moments else ll

    if obs.all():
        params = make_lgssm_params(m0, P0, A, Q, C, R)
        fn = jax.jit(jax.vmap(lambda y: out(lgssm_filter(params, y))))
        args = (jnp.asarray(x, dtype=jnp.float32),)
    else:
        y, H, Rm, nmiss = dynamax_masked(p, C, R)

        def one(y, H, Rm, nm):
            params = make_lgssm_params(m0, P0, A, Q, H, Rm)
            return out(lgssm_filter(params, y), 0.5 * math.log(2 * math.pi) * nm)

        fn = jax.jit(jax.vmap(one))
        args = (y, H, Rm, nmiss)

    def run(_):
        res = jax.block_until_ready(fn(*args))
        return np.asarray(res[0] if moments else res)
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


def max_rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for mod in ("pyro", "statsmodels", "pykalman", "scipy", "jax", "dynamax"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            out[mod] = None
    return out


def set_threads(threads):
    """torch's threads; with one, XLA's too (before jax is imported). None: unchanged."""
    if threads is not None:
        torch.set_num_threads(threads)
        if threads == 1:
            os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                  "intra_op_parallelism_threads=1")


def cpu_model():
    """The CPU's model name (Linux), else None: ratios against XLA moved with the CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine():
    """The machine and libraries of a run (written into every result JSON)."""
    return dict(platform=platform.platform(), processor=platform.processor(),
                cpu_model=cpu_model(), torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                xla_flags=os.environ.get("XLA_FLAGS"),
                thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE"),
                affinity=sorted(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity") else None,
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                versions=versions())


def importable(module):
    """True if ``module`` imports; else says which contender is skipped (the optional peers
    come with the ``test`` and ``bench`` extras)."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        print(f"  {module} skipped ({err}); pip install -e '.[test]'")
        return False
    return True


def have_dynamax():
    try:
        import dynamax.linear_gaussian_ssm.inference  # noqa: F401
        import jax  # noqa: F401
    except Exception as err:  # pragma: no cover - optional
        return f"{type(err).__name__}: {err}"
    return None


CONTENDERS = ["sequential", "loglik_only", "filtered_only", "compiled", "no_steady_state",
              "parallel", "dynamax", "gaussian_hmm", "pykalman", "statsmodels"]


def run_cell(args, batch, steps, frac, dtype):
    """Time every contender on one (B, T, missing fraction) problem; returns result rows."""
    p64 = add_missing(make_problem(batch, steps, args.state_dim, args.obs_dim, args.seed),
                      frac, args.seed)
    p = cast(p64, dtype)
    ref = pyrossm_method(False)(p64).numpy()  # float64 reference log-likelihoods
    subset = min(args.subset, batch)
    rows = []
    cell = dict(batch=batch, steps=steps, missing_fraction=frac)
    print(f"\nB={batch} T={steps} n={args.state_dim} p={args.obs_dim} missing={frac:g} "
          f"dtype={args.dtype} torch threads={torch.get_num_threads()}", flush=True)

    todo = []

    def record(name, fn, arg, scale, check_ref, note, repeats=args.repeats):
        t0 = time.perf_counter()
        ll = fn(arg)  # first call (compiles jitted functions); checked against float64
        first = time.perf_counter() - t0
        ll = ll.detach().numpy() if isinstance(ll, torch.Tensor) else np.asarray(ll)
        err = max_rel_err(ll, check_ref[: len(ll)])
        todo.append((dict(cell, method=name, scale=scale, first_call_seconds=first,
                          max_rel_err_vs_float64=err, note=note), fn, arg, repeats))

    skip = set(args.skip)
    if "sequential" not in skip:
        record("pyrossm sequential", pyrossm_method(False), p, 1, ref,
               "one batched call; returns log-likelihoods and all moments")
    if "loglik_only" not in skip:
        record("pyrossm log-likelihood only", pyrossm_method(False, moments=False), p, 1, ref,
               "kalman_log_likelihood: no moments (past the Riccati fixed point the means are "
               "never written)")
    if "filtered_only" not in skip:
        record("pyrossm filtered moments only", pyrossm_method(False, filtered_only=True), p, 1,
               ref, "kalman_filter(predicted=False, per_step=False): the outputs of dynamax "
               "+moments (log-likelihood, filtered means and covariances)")
    if "compiled" not in skip and frac > 0:
        record("pyrossm sequential, compiled", pyrossm_method(False, compiled=True), p, 1, ref,
               "pyrossm.lgssm.set_compile(True): torch.compile'd time steps of the "
               "missing-data kernel; first call = compile")
    if "no_steady_state" not in skip:
        record("pyrossm sequential, no steady stop", pyrossm_method(False, False), p, 1, ref,
               "the covariance recursion never stops at the Riccati fixed point")
        if frac == 0:  # (with missing data there is no fixed point: the same as above)
            record("pyrossm log-likelihood only, no steady stop",
                   pyrossm_method(False, False, moments=False), p, 1, ref,
                   "kalman_log_likelihood without the fixed-point stop (compare with dynamax)")
            if "filtered_only" not in skip:
                record("pyrossm filtered moments only, no steady stop",
                       pyrossm_method(False, False, filtered_only=True), p, 1, ref,
                       "kalman_filter(predicted=False, per_step=False) without the fixed-point "
                       "stop (compare with dynamax +moments)")
    if "parallel" not in skip:
        record("pyrossm parallel", pyrossm_method(True), p, 1, ref, "one batched call")
    if "dynamax" not in skip:
        missing_reason = have_dynamax()
        if missing_reason is None:
            record("dynamax", dynamax_method(p, False), None, 1, ref,
                   "jit(vmap(lgssm_filter)), log-likelihood only; first call = compile")
            record("dynamax +moments", dynamax_method(p, True), None, 1, ref,
                   "jit(vmap(lgssm_filter)), log-likelihood + filtered moments")
        else:
            print(f"  dynamax skipped ({missing_reason}); pip install dynamax==1.0.3 jax jaxlib")
    if frac == 0 and batch == args.batch_old:
        if "gaussian_hmm" not in skip:
            ref_hmm = pyrossm_method(False)(hmm_equivalent(p64)).numpy()
            record("pyro GaussianHMM", gaussian_hmm_method(p), p, 1, ref_hmm,
                   "one batched call (construction included)")
        p_np = {k: v.numpy() for k, v in p64.items()}
        if "pykalman" not in skip and importable("pykalman"):
            record("pykalman (loop)", pykalman_method(p_np), p_np["x"][:subset], batch / subset,
                   ref, f"float64; {subset} sequences timed, scaled x{batch / subset:g}",
                   repeats=min(args.repeats, 2))
        if "statsmodels" not in skip and importable("statsmodels"):
            record("statsmodels (loop)", statsmodels_method(p_np), p_np["x"][:subset],
                   batch / subset, ref,
                   f"float64; {subset} sequences timed, scaled x{batch / subset:g}")
    # Timed round-robin (one run of every method per round), so that a change of the machine's
    # load during the cell affects all methods alike; the median over rounds is reported. The
    # order is shuffled every round (seeded): a method's time depends on what ran just before
    # it (its caches, and the allocator's state: in a fixed order dynamax always followed
    # pyrossm's fastest row, and measured 6.3 ms where it measured 10.8 ms after dynamax
    # +moments in another order on the same machine).
    times = [[] for _ in todo]
    shuffle = random.Random(args.seed)
    for rnd in range(max(rep for *_, rep in todo)):
        order = list(range(len(todo)))
        if args.order == "shuffled":
            shuffle.shuffle(order)
        for i in order:
            _, fn, arg, rep = todo[i]
            if rnd < rep:
                t0 = time.perf_counter()
                fn(arg)
                times[i].append(time.perf_counter() - t0)
    for (row, *_), ts in zip(todo, times):
        med = statistics.median(ts)
        rows.append(dict(row, seconds=med * row["scale"], measured_seconds=med, all_times=ts))
        print(f"  {row['method']:<47s} {med * row['scale']:9.4f} s   (rel. err. "
              f"{row['max_rel_err_vs_float64']:.1e}, first call {row['first_call_seconds']:.2f} s)",
              flush=True)
    by_name = {r["method"]: r["seconds"] for r in rows}
    for r in rows:
        for peer in ("pyrossm sequential", "dynamax", "dynamax +moments"):
            if peer in by_name:
                r[f"ratio_vs_{peer.replace(' ', '_').replace('+', '')}"] = (
                    r["seconds"] / by_name[peer])
    return rows


def print_table(rows):
    print(f"\n{'B':>4s} {'T':>6s} {'miss':>5s} {'method':<47s} {'seconds':>9s} "
          f"{'x pyrossm':>10s} {'x dynamax':>10s} {'x dyn+mom':>10s}")
    fmt = lambda r, k: f"{r[k]:10.2f}" if k in r else f"{'-':>10s}"  # noqa: E731
    for r in rows:
        print(f"{r['batch']:4d} {r['steps']:6d} {r['missing_fraction']:5.2f} "
              f"{r['method']:<47s} {r['seconds']:9.4f} {fmt(r, 'ratio_vs_pyrossm_sequential')}"
              f" {fmt(r, 'ratio_vs_dynamax')} {fmt(r, 'ratio_vs_dynamax_moments')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", nargs="*", default=["256x1000", "16x10000"],
                    help="problem sizes BxT")
    ap.add_argument("--missing", nargs="*", type=float, default=[0.0, 0.1],
                    help="fractions of missing entries")
    ap.add_argument("--state-dim", type=int, default=4)
    ap.add_argument("--obs-dim", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the torch methods (numpy libraries always use float64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method (median)")
    ap.add_argument("--subset", type=int, default=8,
                    help="sequences timed for the looping numpy libraries (scaled to B)")
    ap.add_argument("--batch-old", type=int, default=256,
                    help="batch size of the cell (without missing data) that also times "
                         "GaussianHMM, pykalman and statsmodels")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip", nargs="*", default=[], choices=CONTENDERS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", choices=("shuffled", "fixed"), default="shuffled",
                    help="the order of the methods in each timing round (fixed: as listed, as "
                         "before session 15)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kalman.json"),
                    help="JSON output path ('' to skip)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for cell in args.cells:
        batch, steps = (int(v) for v in cell.lower().split("x"))
        for frac in args.missing:
            rows += run_cell(args, batch, steps, frac, dtype)
    print_table(rows)
    result = dict(
        benchmark="kalman log-likelihood",
        command="python benchmarks/kalman.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:]),
        config=dict(cells=args.cells, missing=args.missing, state_dim=args.state_dim,
                    obs_dim=args.obs_dim, dtype=args.dtype, repeats=args.repeats,
                    subset=args.subset, seed=args.seed, order=args.order),
        machine=machine(),
        timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        results=rows,
    )
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
