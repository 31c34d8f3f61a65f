"""Benchmark: the Rauch–Tung–Striebel smoother of a batch of LGSSM sequences, pyrossm vs dynamax.

The cells of ``benchmarks/kalman.py`` (B = 256 sequences of T = 1000 steps and B = 16 of
T = 10,000, state and observation dim 4, float32 on CPU, one random stable system, 0% and 10%
missing entries), timed round-robin (median of --repeats after a warm-up call; one thread):

* ``pyrossm smoother``: ``kalman_smoother(..., parallel=False)`` (filter, gains, backward pass;
  returns smoothed means, covariances and lag-one cross-covariances);
* ``pyrossm smoother, LAPACK gains``: the same with the smoother gains from torch's batched
  Cholesky (``pyrossm.lgssm._small.MIN_BATCH`` raised), the previous code path: the gains
  take one LAPACK call per predicted covariance (B × T of them with missing data);
* ``pyrossm filter``: ``kalman_filter`` alone, for the smoother's share;
* ``dynamax smoother``: dynamax 1.0.3 ``lgssm_smoother`` under ``jax.jit(jax.vmap(...))``
  (missing entries as per-sequence time-varying emission parameters, as in ``kalman.py``);
  skipped when dynamax is absent.

Every method's log-likelihoods are checked against pyrossm's float64 filter, and pyrossm's
smoothed means against dynamax's. Prints a table, writes JSON (--out, default
``benchmarks/results/kalman_smoother.json``)::

    taskset -c 0 python benchmarks/kalman_smoother.py --threads 1
    python benchmarks/kalman_smoother.py --cells 64x200 --repeats 2      # quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kalman import (  # noqa: E402
    add_missing,
    cast,
    dynamax_masked,
    dynamax_params,
    have_dynamax,
    machine,
    make_problem,
    set_threads,
    write_result,
)

from pyrossm.lgssm import _small, kalman_filter, kalman_smoother  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")


def pyrossm_smoother(lapack_gains=False):
    def run(p):
        previous = _small.MIN_BATCH
        _small.MIN_BATCH = 10**12 if lapack_gains else previous
        try:
            res = kalman_smoother(*[p[k] for k in ARGS])
        finally:
            _small.MIN_BATCH = previous
        return res.log_likelihood, res.smoothed_means
    return run


def pyrossm_filter(p):
    res = kalman_filter(*[p[k] for k in ARGS])
    return res.log_likelihood, None


def dynamax_smoother(p):
    """jit(vmap(lgssm_smoother)) in float32; missing entries as in ``kalman.py``."""
    import jax
    from dynamax.linear_gaussian_ssm.inference import lgssm_smoother, make_lgssm_params

    A, C, Q, R, m0, P0 = dynamax_params(p)
    y, H, Rm, nmiss = dynamax_masked(p, C, R)

    def one(y, H, Rm, nm):
        post = lgssm_smoother(make_lgssm_params(m0, P0, A, Q, H, Rm), y)
        ll = post.marginal_loglik + 0.5 * math.log(2 * math.pi) * nm
        return ll, post.smoothed_means, post.smoothed_covariances

    fn = jax.jit(jax.vmap(one))

    def run(_):
        ll, means, _ = jax.block_until_ready(fn(y, H, Rm, nmiss))
        return torch.tensor(np.array(ll)), torch.tensor(np.array(means))
    return run


def run_cell(args, batch, steps, frac):
    p64 = add_missing(make_problem(batch, steps, 4, 4, args.seed), frac, args.seed)
    p = cast(p64, torch.float32)
    ref = kalman_filter(*[p64[k] for k in ARGS]).log_likelihood
    print(f"\nB={batch} T={steps} missing={frac:g} float32, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    methods = [("pyrossm smoother", pyrossm_smoother(), p),
               ("pyrossm smoother, LAPACK gains", pyrossm_smoother(True), p),
               ("pyrossm filter", pyrossm_filter, p)]
    reason = have_dynamax()
    if reason is None:
        methods.append(("dynamax smoother", dynamax_smoother(p), None))
    else:
        print(f"  dynamax skipped ({reason})")
    rows, means = [], {}
    for name, fn, arg in methods:
        t0 = time.perf_counter()
        ll, m = fn(arg)
        first = time.perf_counter() - t0
        err = float(((ll.double() - ref).abs() / ref.abs()).max())
        means[name] = m
        rows.append(dict(batch=batch, steps=steps, missing_fraction=frac, method=name,
                         first_call_seconds=first, max_rel_err_vs_float64=err))
    if "dynamax smoother" in means:
        diff = (means["pyrossm smoother"].double() - means["dynamax smoother"].double()).abs()
        print(f"  smoothed means, pyrossm vs dynamax: max |difference| {float(diff.max()):.2e}")
        rows[0]["max_abs_diff_smoothed_means_vs_dynamax"] = float(diff.max())
    times = [[] for _ in methods]
    for _ in range(args.repeats):  # round-robin: a change of load hits every method alike
        for i, (_, fn, arg) in enumerate(methods):
            t0 = time.perf_counter()
            fn(arg)
            times[i].append(time.perf_counter() - t0)
    for row, ts in zip(rows, times):
        row.update(seconds=statistics.median(ts), all_times=ts)
    by = {r["method"]: r["seconds"] for r in rows}
    for r in rows:
        for peer in ("pyrossm smoother", "dynamax smoother"):
            if peer in by:
                r[f"ratio_vs_{peer.replace(' ', '_')}"] = r["seconds"] / by[peer]
        print(f"  {r['method']:<32s} {r['seconds']:8.4f} s  (rel. err. "
              f"{r['max_rel_err_vs_float64']:.1e}, first call {r['first_call_seconds']:.2f} s)"
              + (f"  x dynamax {r['ratio_vs_dynamax_smoother']:.2f}"
                 if "ratio_vs_dynamax_smoother" in r else ""), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", nargs="*", default=["256x1000", "16x10000"])
    ap.add_argument("--missing", nargs="*", type=float, default=[0.0, 0.1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kalman_smoother.json"))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rows = []
    for cell in args.cells:
        batch, steps = (int(v) for v in cell.lower().split("x"))
        for frac in args.missing:
            rows += run_cell(args, batch, steps, frac)
    result = dict(benchmark="kalman smoother",
                  command="python benchmarks/kalman_smoother.py " + " ".join(
                      argv if argv is not None else sys.argv[1:]),
                  config=vars(args), machine=machine(),
                  timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  results=rows)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
