"""The Nile local-level model (Durbin & Koopman 2012, ch. 2; statsmodels' reference example).

x_t = z_t + ε_t, z_t = z_{t-1} + η_t, σ²_ε = 15099, σ²_η = 1469.1; approximately diffuse
initial state (mean 0, variance 1e6) with the first observation's term dropped, as statsmodels'
``UnobservedComponents(nile, "llevel")`` does (``loglikelihood_burn = 1``).
x has shape (1, 100, 1): (batch, time, obs_dim), time at dim -2.
"""

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

from pyrossm.lgssm import LinearGaussianSSM, kalman_filter, kalman_smoother

SIGMA2_EPS, SIGMA2_ETA = 15099.0, 1469.1  # Durbin & Koopman's MLE
DIFFUSE_VAR = 1e6  # statsmodels' approximate-diffuse variance
NILE_LOGLIK = -632.5377  # Durbin & Koopman / statsmodels, first term dropped
LOGLIK_ATOL = 1e-3  # acceptance
FIT_RTOL = 0.01  # acceptance: fit recovers the variances within 1%
FIT_VS_STATSMODELS_RTOL = 1e-3  # same objective as the precise statsmodels optimum
RTOL = 1e-8


def statsmodels_nile():
    import statsmodels.api as sm

    return sm.datasets.nile.load_pandas().data["volume"].to_numpy(dtype=np.float64)


def nile_x():
    try:
        from pyrossm.datasets import load_nile
    except ImportError:  # the loader is written by another helper
        return torch.tensor(statsmodels_nile()).reshape(1, 100, 1)
    x = load_nile().flow.to(torch.float64).reshape(1, -1, 1)
    np.testing.assert_array_equal(x.reshape(-1).numpy(), statsmodels_nile())
    return x


def local_level(sigma2_eps=SIGMA2_EPS, sigma2_eta=SIGMA2_ETA):
    one = torch.ones(1, 1, dtype=torch.float64)
    return dict(A=one, C=one, Q=sigma2_eta * one, R=sigma2_eps * one,
                init_mean=torch.zeros(1, dtype=torch.float64), init_cov=DIFFUSE_VAR * one)


def statsmodels_local_level():
    import statsmodels.api as sm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = sm.tsa.UnobservedComponents(statsmodels_nile(), "llevel")
    # the convention this test relies on
    assert mod.loglikelihood_burn == 1
    assert mod.ssm.initialization.initialization_type == "approximate_diffuse"
    assert mod.ssm.initialization.approximate_diffuse_variance == DIFFUSE_VAR
    return mod


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_nile_log_likelihood(parallel):
    x = nile_x()
    res = kalman_filter(x, **local_level(), parallel=parallel)
    loglik = float(res.step_log_likelihoods[..., 1:].sum())  # loglikelihood_burn = 1
    assert abs(loglik - NILE_LOGLIK) < LOGLIK_ATOL, loglik
    mod = statsmodels_local_level()
    sm_loglik = mod.loglike(np.array([SIGMA2_EPS, SIGMA2_ETA]))
    assert abs(loglik - sm_loglik) <= RTOL * abs(sm_loglik), (loglik, sm_loglik)
    # per-step terms, including the dropped first one
    llf_obs = mod.loglikeobs(np.array([SIGMA2_EPS, SIGMA2_ETA]))
    np.testing.assert_allclose(res.step_log_likelihoods[0, 1:].numpy(), llf_obs[1:], rtol=RTOL)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_nile_smoothed_level_matches_statsmodels(parallel):
    x = nile_x()
    res = kalman_smoother(x, **local_level(), parallel=parallel)
    mod = statsmodels_local_level()
    sm_res = mod.smooth(np.array([SIGMA2_EPS, SIGMA2_ETA]))
    np.testing.assert_allclose(res.smoothed_means[0, :, 0].numpy(),
                               sm_res.smoothed_state[0], rtol=RTOL)
    np.testing.assert_allclose(res.smoothed_covs[0, :, 0, 0].numpy(),
                               sm_res.smoothed_state_cov[0, 0], rtol=RTOL)
    np.testing.assert_allclose(res.filtered_means[0, :, 0].numpy(),
                               sm_res.filtered_state[0], rtol=RTOL)


def test_nile_missing_years_match_statsmodels():
    """Durbin & Koopman's missing-data example: years 21-40 and 61-80 unobserved."""
    x = nile_x().clone()
    x[0, 20:40] = float("nan")
    x[0, 60:80] = float("nan")
    res = kalman_smoother(x, **local_level())
    import statsmodels.api as sm

    y = statsmodels_nile().copy()
    y[20:40] = np.nan
    y[60:80] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = sm.tsa.UnobservedComponents(y, "llevel")
        sm_res = mod.smooth(np.array([SIGMA2_EPS, SIGMA2_ETA]))
    assert abs(float(res.step_log_likelihoods[0, 1:].sum()) - sm_res.llf) <= RTOL * abs(sm_res.llf)
    np.testing.assert_allclose(res.smoothed_means[0, :, 0].numpy(), sm_res.smoothed_state[0],
                               rtol=RTOL)


def test_nile_fit_recovers_variances():
    """MLE of the two variances with A = C = 1 and the diffuse initial state held fixed."""
    x = nile_x()
    var = float(x.var())
    ssm = LinearGaussianSSM.from_matrices(
        A=1.0, C=1.0, Q=var / 2, R=var / 2, init_mean=0.0, init_cov=DIFFUSE_VAR,
        learn=("Q", "R"), dtype=torch.float64,
    )
    losses = ssm.fit(x, burn=1)
    assert losses[-1] <= losses[0]
    q, r = float(ssm.Q.detach()), float(ssm.R.detach())
    assert abs(r / SIGMA2_EPS - 1) < FIT_RTOL, f"sigma2_eps {r:.1f} vs {SIGMA2_EPS}"
    assert abs(q / SIGMA2_ETA - 1) < FIT_RTOL, f"sigma2_eta {q:.1f} vs {SIGMA2_ETA}"
    # the fixed parameters stayed fixed
    assert float(ssm.A) == 1.0 and float(ssm.C) == 1.0 and float(ssm.init_cov) == DIFFUSE_VAR
    # The same objective maximised precisely with statsmodels' log-likelihood (its default
    # ``fit`` stops early on this flat likelihood: about (15078, 1478.8)).
    mod = statsmodels_local_level()
    opt = scipy.optimize.minimize(
        lambda log_params: -mod.loglike(np.exp(log_params)), np.log([SIGMA2_EPS, SIGMA2_ETA]),
        method="Nelder-Mead", options=dict(xatol=1e-9, fatol=1e-12, maxiter=2000),
    )
    sm_r, sm_q = np.exp(opt.x)
    assert abs(r / sm_r - 1) < FIT_VS_STATSMODELS_RTOL, (r, sm_r)
    assert abs(q / sm_q - 1) < FIT_VS_STATSMODELS_RTOL, (q, sm_q)
    # and our optimum is as good as the reference optimum (same objective, burn = 1)
    ours = float(ssm.filter(x).step_log_likelihoods[..., 1:].sum().detach())
    assert ours >= -opt.fun - 1e-6, (ours, -opt.fun)


SE_RTOL = 1e-6  # statsmodels' "approx" SEs: a numerical Hessian (measured agreement 2e-10)


def test_nile_structural_fit_and_standard_errors_match_statsmodels():
    """Local level by ``structural([LocalLevel()]).fit``: the MLE (Durbin & Koopman's within
    1%), a log-likelihood at least statsmodels' fitted one, and standard errors (observed
    information: autograd Hessian in the natural parameters, the variances) equal to
    statsmodels' ``cov_type="approx"`` ones at the same parameters (relative 1e-6)."""
    from pyrossm.lgssm import LocalLevel, structural

    x = nile_x()
    res = structural([LocalLevel()]).fit(x)
    assert res.converged and res.names == ["sigma2.irregular", "sigma2.level"]
    r, q = res.estimates.tolist()
    assert abs(r / SIGMA2_EPS - 1) < FIT_RTOL and abs(q / SIGMA2_ETA - 1) < FIT_RTOL
    mod = statsmodels_local_level()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm_fit = mod.fit(disp=False)
        sm_at_ours = mod.smooth(np.array([r, q]), cov_type="approx")
    assert res.log_likelihood >= sm_fit.llf - 1e-9 * abs(sm_fit.llf)
    assert abs(res.log_likelihood - sm_at_ours.llf) <= RTOL * abs(sm_at_ours.llf)
    np.testing.assert_allclose(res.std_errors.numpy(), sm_at_ours.bse, rtol=SE_RTOL)
    # the Ljung-Box statistic of the standardised residuals, as statsmodels computes it
    lb = sm_at_ours.test_serial_correlation("ljungbox", lags=10)
    q_ours, p_ours = res.ljung_box(lags=10)
    assert abs(float(q_ours[0, 0]) - lb[0, 0, -1]) <= 1e-6 * lb[0, 0, -1]
    assert "sigma2.level" in res.summary()
