"""Structural components against statsmodels' ``UnobservedComponents`` (float64).

Each component's model, composed into one LinearGaussianSSM, gives the same log-likelihood as
statsmodels at the same parameters (relative 1e-8), with statsmodels' initialisation
(approximate diffuse 1e6 for non-stationary states with their steps burned, stationary AR
block); the MLE reaches at least statsmodels' maximised log-likelihood on the same structure.
Series are ``(batch=1, time, 1)`` with time at dim -2.
"""

import warnings

import numpy as np
import pytest
import torch

from pyrossm.lgssm import kalman_filter
from pyrossm.lgssm.structural import (
    Autoregressive,
    LocalLevel,
    LocalLinearTrend,
    Regression,
    Seasonal,
    StructuralSpec,
    structural,
)

sm = pytest.importorskip("statsmodels.api")

RTOL = 1e-8  # same parameters, same likelihood
MLE_SLACK = 1e-6  # ours >= statsmodels' maximised log-likelihood minus this (relative)
T = 96


def series(seed=0, missing=(5, 40)):
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    y = 0.05 * t + np.sin(2 * np.pi * t / 12) + rng.standard_normal(T).cumsum() * 0.3
    y = y + 0.5 * rng.standard_normal(T)
    y[list(missing)] = np.nan
    return y


EXOG = np.random.default_rng(1).standard_normal((T, 2))

# (our components, statsmodels UnobservedComponents kwargs, statsmodels params)
CASES = {
    "llevel": (lambda: [LocalLevel()], dict(level="llevel"), [0.3, 0.1]),
    "lltrend": (lambda: [LocalLinearTrend()], dict(level="lltrend"), [0.3, 0.1, 0.01]),
    "seasonal-dummy": (lambda: [LocalLevel(), Seasonal(12)],
                       dict(level="llevel", seasonal=12), [0.3, 0.1, 0.02]),
    "seasonal-trig-full": (lambda: [LocalLevel(), Seasonal(12, "trigonometric")],
                           dict(level="llevel", freq_seasonal=[{"period": 12}]), [0.3, 0.1, 0.02]),
    "seasonal-trig-2": (lambda: [LocalLevel(), Seasonal(12, "trigonometric", harmonics=2)],
                        dict(level="llevel", freq_seasonal=[{"period": 12, "harmonics": 2}]),
                        [0.3, 0.1, 0.02]),
    "ar2": (lambda: [LocalLevel(), Autoregressive(2)], dict(level="llevel", autoregressive=2),
            [0.3, 0.1, 0.2, 0.5, -0.3]),
    "exog": (lambda: [LocalLevel(), Regression(EXOG)], dict(level="llevel", exog=EXOG),
             [0.3, 0.1, 0.7, -0.4]),
}


def statsmodels_model(kwargs, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sm.tsa.UnobservedComponents(y, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_log_likelihood_matches_statsmodels(case):
    comps, kwargs, params = CASES[case]
    y = series()
    mod = statsmodels_model(kwargs, y)
    ssm = structural(comps())
    x = torch.tensor(y).reshape(1, -1, 1)
    spec = StructuralSpec(ssm._structure, x)
    assert [b.name for b in spec.blocks][:2] == mod.param_names[:2]
    values, i = {}, 0
    for b in spec.blocks:
        values[b.name] = torch.tensor(params[i : i + b.size], dtype=torch.float64).reshape(b.shape)
        i += b.size
    m, xx = spec.system(values, x)
    ll = kalman_filter(xx, **m).step_log_likelihoods[..., spec.burn:].sum()
    assert spec.burn == mod.loglikelihood_burn
    expected = mod.loglike(np.array(params))
    assert abs(float(ll) - expected) <= RTOL * abs(expected), (float(ll), expected)


@pytest.mark.parametrize("case", ["llevel", "seasonal-dummy", "ar2", "exog"])
def test_mle_at_least_statsmodels(case):
    comps, kwargs, _ = CASES[case]
    y = series(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm_res = statsmodels_model(kwargs, y).fit(disp=False)
        res = structural(comps()).fit(torch.tensor(y).reshape(1, -1, 1), std_errors=False)
    assert res.converged, res.message
    assert res.log_likelihood >= sm_res.llf - MLE_SLACK * abs(sm_res.llf), (
        res.log_likelihood, sm_res.llf)
    assert res.names == list(sm_res.model.param_names) or case == "ar2" or case == "exog"


def test_fit_writes_the_matrices_back():
    y = series(seed=3)
    ssm = structural([LocalLinearTrend(), Seasonal(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trend variance sits at its floor here
        res = ssm.fit(torch.tensor(y).reshape(1, -1, 1), std_errors=False)
    p = dict(zip(res.names, res.estimates.tolist()))
    assert float(ssm.R) == pytest.approx(p["sigma2.irregular"], rel=1e-12)
    Q = ssm.Q.detach()
    assert float(Q[0, 0]) == pytest.approx(p["sigma2.level"], rel=1e-12)
    assert float(Q[1, 1]) == pytest.approx(p["sigma2.trend"], rel=1e-12)
    assert float(Q[2, 2]) == pytest.approx(p["sigma2.seasonal"], rel=1e-12)
    assert float(Q[3, 3]) == 0.0  # the other seasonal dummies carry no noise
    fc = ssm.forecast(torch.tensor(y).reshape(1, -1, 1), 8, num_samples=10)
    assert torch.isfinite(fc.means).all() and (torch.diagonal(fc.covs, 0, -2, -1) > 0).all()


def test_bad_components_raise():
    with pytest.raises(ValueError, match="period"):
        Seasonal(1)
    with pytest.raises(ValueError, match="order"):
        Autoregressive(0)
    with pytest.raises(TypeError, match="components"):
        structural(["level"])
    with pytest.raises(ValueError, match="harmonics"):
        Seasonal(12, "trigonometric", harmonics=7)


def co2(months=None):
    y = sm.datasets.co2.load_pandas().data["co2"].resample("MS").mean().to_numpy()
    return y[:months]


def check_co2(months):
    """Monthly co2 (statsmodels' weekly series averaged by month; 5 months missing in all):
    local linear trend + 12-month dummy seasonal + irregular, as UnobservedComponents("lltrend",
    seasonal=12)."""
    y = co2(months)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm_res = statsmodels_model(dict(level="lltrend", seasonal=12), y).fit(disp=False)
        ssm = structural([LocalLinearTrend(), Seasonal(12)])
        x = torch.tensor(y).reshape(1, -1, 1)
        res = ssm.fit(x)
    assert res.converged, res.message
    assert res.log_likelihood >= sm_res.llf - MLE_SLACK * abs(sm_res.llf), (
        res.log_likelihood, sm_res.llf)
    params = dict(zip(res.names, res.estimates.tolist()))
    assert params["sigma2.irregular"] > 1e-3 and params["sigma2.level"] > 1e-3
    fc = ssm.forecast(x, 24, num_samples=50)
    assert torch.isfinite(fc.means).all() and torch.isfinite(fc.samples).all()
    # the forecast continues the series: within 3 ppm of the last observed level a year on
    assert abs(float(fc.means[0, 11, 0]) - float(np.nanmean(y[-12:])) - 1.5) < 3.0
    return res


def test_co2_small():
    check_co2(months=120)


@pytest.mark.slow
def test_co2_acceptance():
    res = check_co2(months=None)
    assert res.seconds < 30


def test_state_control_input_equals_an_integrated_observation_regressor():
    """A control input of the level, μ_t = μ_{t-1} + γ u_t + η_t (transition offset), is the
    observation regression on U_t = Σ_{s=1..t} u_s (μ'_t = μ_t − γ U_t is a random walk):
    equal log-likelihoods at γ = β, and equal maximised ones."""
    y = series(seed=4)
    u = np.random.default_rng(5).standard_normal((T, 1))
    U = np.cumsum(np.r_[[[0.0]], u[1:]], axis=0)
    x = torch.tensor(y).reshape(1, -1, 1)
    state = structural([LocalLevel(), Regression(u, equation="state")])
    obs = structural([LocalLevel(), Regression(U)])
    values = {"sigma2.irregular": torch.tensor(0.3, dtype=torch.float64),
              "sigma2.level": torch.tensor(0.1, dtype=torch.float64)}
    lls = []
    for ssm, name in ((state, "gamma"), (obs, "beta")):
        spec = StructuralSpec(ssm._structure, x)
        m, xx = spec.system({**values, name: torch.tensor([0.7], dtype=torch.float64)}, x)
        lls.append(float(kalman_filter(xx, **m).step_log_likelihoods[..., spec.burn:].sum()))
    assert abs(lls[0] - lls[1]) <= RTOL * abs(lls[1]), lls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = [ssm.fit(x, std_errors=False) for ssm in (state, obs)]
    assert fits[0].names[-1] == "gamma[0]" and fits[1].names[-1] == "beta[0]"
    assert abs(fits[0].log_likelihood - fits[1].log_likelihood) < 1e-6 * abs(lls[1])
    assert abs(fits[0].estimates[-1] - fits[1].estimates[-1]) < 1e-3
    with pytest.raises(ValueError, match="equation"):
        Regression(u, equation="both")
