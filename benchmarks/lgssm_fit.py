"""Benchmark: maximum-likelihood fits of real series, pyrossm against statsmodels (issue 13).

Two fits, each run by both libraries in the same process, single thread, float64:

* **macrodata**: log-differences of realgdp, realcons, realinv (statsmodels' macrodata,
  T = 202), standardised, 10% of the entries set to NaN (numpy seed 0). Structure: a
  2-dimensional VAR(1) state, diagonal R, stationary initial state —
  ``LinearGaussianSSM(2, 3, init="stationary", diagonal=("R",))`` against
  ``DynamicFactor(k_factors=2, factor_order=1)`` (Q = I there; here Q and C are both free,
  the same family of likelihoods).
* **co2**: statsmodels' weekly co2 averaged by month (T = 526, 5 months missing). Structure:
  local linear trend + 12-month dummy seasonal + irregular —
  ``structural([LocalLinearTrend(), Seasonal(12)])`` against
  ``UnobservedComponents(y, "lltrend", seasonal=12)``.
* **nile** (``--series nile``): the Nile's annual flow (T = 100, no gaps; without missing
  data the log-likelihood comes from :func:`pyrossm.lgssm.kalman_log_likelihood`'s steady-state
  blocks). Structure: local level — ``structural([LocalLevel()])`` against
  ``UnobservedComponents(y, "llevel")``.

Reported: wall time of the fit (pyrossm: start values, L-BFGS, residuals; the standard errors
from the autograd Hessian, computed on first use, timed separately), the maximised
log-likelihood of both, L-BFGS iterations, convergence, and that a 24-step forecast with
bands is finite. Writes JSON (--out, default benchmarks/results/lgssm_fit.json).

Run::

    python benchmarks/lgssm_fit.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np
import torch


def macrodata():
    import statsmodels.api as sm

    d = sm.datasets.macrodata.load_pandas().data
    y = np.diff(np.log(d[["realgdp", "realcons", "realinv"]].to_numpy()), axis=0)
    y = (y - y.mean(0)) / y.std(0)
    y[np.random.default_rng(0).random(y.shape) < 0.1] = np.nan
    return y


def co2():
    import statsmodels.api as sm

    return sm.datasets.co2.load_pandas().data["co2"].resample("MS").mean().to_numpy()


def nile():
    import statsmodels.api as sm

    return sm.datasets.nile.load_pandas().data["volume"].to_numpy().astype(float)


def run(name):
    import statsmodels.api as sm

    from pyrossm.lgssm import LinearGaussianSSM, LocalLevel, LocalLinearTrend, Seasonal, structural

    if name == "macrodata":
        y = macrodata()
        x = torch.tensor(y).unsqueeze(0)
        sm_model = sm.tsa.DynamicFactor(y, k_factors=2, factor_order=1)
        ssm = LinearGaussianSSM(2, 3, init="stationary", diagonal=("R",), dtype=torch.float64)
        sm_kw = dict(disp=False, maxiter=1000)
    elif name == "nile":
        y = nile()
        x = torch.tensor(y).reshape(1, -1, 1)
        sm_model = sm.tsa.UnobservedComponents(y, "llevel")
        ssm = structural([LocalLevel()])
        sm_kw = dict(disp=False)
    else:
        y = co2()
        x = torch.tensor(y).reshape(1, -1, 1)
        sm_model = sm.tsa.UnobservedComponents(y, "lltrend", seasonal=12)
        ssm = structural([LocalLinearTrend(), Seasonal(12)])
        sm_kw = dict(disp=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        sm_res = sm_model.fit(**sm_kw)
        sm_seconds = time.perf_counter() - t0
        res = ssm.fit(x)
        t0 = time.perf_counter()
        se = res.std_errors
        se_seconds = time.perf_counter() - t0
    fc = ssm.forecast(x, 24, num_samples=200)
    finite = bool(torch.isfinite(fc.means).all() and torch.isfinite(fc.covs).all()
                  and torch.isfinite(fc.samples).all())
    return dict(
        series=name, T=int(x.shape[-2]), missing=int(torch.isnan(x).sum()),
        pyrossm_seconds=res.seconds, pyrossm_optimizer_seconds=res.seconds_optimizer,
        pyrossm_std_error_seconds=se_seconds,
        pyrossm_loglik=res.log_likelihood, pyrossm_iterations=res.iterations,
        pyrossm_converged=res.converged, pyrossm_at_boundary=res.at_boundary,
        statsmodels_seconds=sm_seconds, statsmodels_loglik=float(sm_res.llf),
        loglik_difference=res.log_likelihood - float(sm_res.llf),
        time_ratio=res.seconds / sm_seconds, forecast_finite=finite,
        params=dict(zip(res.names, res.estimates.tolist())),
        std_errors=dict(zip(res.names, se.tolist())),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "lgssm_fit.json"))
    parser.add_argument("--series", nargs="+", default=["macrodata", "co2", "nile"],
                        choices=["macrodata", "co2", "nile"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run(name) for name in args.series]
    print(f"{'series':<10} {'T':>4} {'NaN':>4} {'pyrossm s':>10} {'+ s.e. s':>9} "
          f"{'statsm. s':>10} {'ratio':>6} {'loglik pyrossm':>15} {'statsmodels':>12} "
          f"{'conv':>5} {'forecast ok':>11}")
    for r in rows:
        print(f"{r['series']:<10} {r['T']:>4} {r['missing']:>4} {r['pyrossm_seconds']:>10.2f} "
              f"{r['pyrossm_std_error_seconds']:>9.2f} {r['statsmodels_seconds']:>10.2f} "
              f"{r['time_ratio']:>6.2f} {r['pyrossm_loglik']:>15.4f} "
              f"{r['statsmodels_loglik']:>12.4f} {str(r['pyrossm_converged']):>5} "
              f"{str(r['forecast_finite']):>11}")
    payload = dict(rows=rows, torch=torch.__version__, machine=platform.machine(),
                   load_average=os.getloadavg(), threads=1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
