"""Maximum-likelihood fitting (pyrossm.lgssm.mle) and its results object (float64).

Oracles: the exact Kalman filter (the fast univariate likelihood must equal it), scipy /
statsmodels (Ljung–Box, standardised residuals, DynamicFactor's maximised log-likelihood on
macrodata growth rates). Sequences are ``(batch, time, obs_dim)``, time at dim -2.
"""

import warnings

import numpy as np
import pytest
import torch

from pyrossm.lgssm import LinearGaussianSSM, kalman_filter, ljung_box, structural
from pyrossm.lgssm._univariate import univariate_log_likelihood, whitened_log_likelihood
from pyrossm.lgssm.mle import Block
from pyrossm.lgssm.structural import LocalLevel

sm = pytest.importorskip("statsmodels.api")
F64 = torch.float64
RTOL = 1e-10
MLE_SLACK = 1e-6  # relative: our maximised log-likelihood >= statsmodels' minus this


def simulate(seed=0, T=120, batch=1, missing=0.1):
    truth = LinearGaussianSSM.from_matrices(
        A=torch.tensor([[0.8, 0.2], [-0.1, 0.5]], dtype=F64),
        C=torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.3, -0.4]], dtype=F64),
        Q=torch.eye(2, dtype=F64), R=0.3 * torch.eye(3, dtype=F64), init="stationary")
    torch.manual_seed(seed)
    _, x = truth.sample(T, num_samples=batch)
    x[torch.rand(x.shape) < missing] = float("nan")
    return truth, x


# ------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("kind,shape", [("free", (2, 3)), ("variance", (3,)), ("variance", ()),
                                        ("cov", (3, 3)), ("contraction", (3, 3)), ("ar", (3,))])
def test_transforms_round_trip_and_constrain(kind, shape):
    b = Block("p", kind, shape, scale=2.0, floor=1e-6)
    theta = torch.randn(b.size, dtype=F64, generator=torch.Generator().manual_seed(1))
    value = b.constrain(theta)
    assert value.shape == shape
    torch.testing.assert_close(b.constrain(b.unconstrain(value)), value, rtol=1e-9, atol=1e-12)
    vec = b.natural_vector(value)
    assert vec.shape == (b.size,) and len(b.labels()) == b.size
    torch.testing.assert_close(b.from_natural_vector(vec), value)
    if kind == "variance":
        assert bool((value >= 1e-6).all())
    if kind == "cov":
        assert float(torch.linalg.eigvalsh(value).min()) >= 1e-6 * (1 - 1e-9)
    if kind == "contraction":
        assert float(torch.linalg.matrix_norm(value, 2)) < 1
    if kind == "ar":  # roots of 1 - φ1 z - ... outside the unit circle
        roots = np.roots(np.r_[-value.numpy()[::-1], 1.0])
        assert (np.abs(roots) > 1).all()


def test_univariate_likelihood_equals_the_kalman_filter():
    truth, x = simulate(batch=3, T=40)
    m = truth.matrices()
    ref = kalman_filter(x, **m).step_log_likelihoods[..., 2:].sum()
    r = torch.diagonal(m["R"])
    ll = univariate_log_likelihood(x.numpy(), *(m[k][None].detach().numpy() for k in "ACQ"),
                                   r[None].numpy(), m["init_mean"][None].numpy(),
                                   m["init_cov"][None].detach().numpy(), burn=2)
    assert abs(ll[0] - float(ref)) <= RTOL * abs(float(ref))


def test_whitened_likelihood_equals_the_kalman_filter_with_full_R():
    truth, x = simulate(batch=2, T=40, missing=0.25)
    m = {k: v.detach() for k, v in truth.matrices().items()}
    G = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]], dtype=F64)
    m["R"] = G @ G.T
    ref = kalman_filter(x, **m).step_log_likelihoods[..., 1:].sum()
    ll = whitened_log_likelihood(x.numpy(), *(m[k][None].numpy() for k in "ACQR"),
                                 m["init_mean"][None].numpy(), m["init_cov"][None].numpy(),
                                 burn=1)
    assert abs(ll[0] - float(ref)) <= RTOL * abs(float(ref))


def test_full_R_fit_matches_its_kalman_log_likelihood():
    _, x = simulate(T=80)
    ssm = LinearGaussianSSM(1, 3, init="diffuse", dtype=F64)
    res = ssm.fit(x)
    assert res.converged, res.message
    with torch.no_grad():
        ll = float(ssm.filter(x).step_log_likelihoods[..., 1:].sum())
    assert abs(ll - res.log_likelihood) <= 1e-9 * abs(ll)
    assert not torch.allclose(ssm.R, torch.diag(torch.diagonal(ssm.R)))  # a full R was fitted


# ------------------------------------------------------------------------------ fitting
def test_fit_reaches_the_truth_and_reports():
    truth, x = simulate(T=150)
    with torch.no_grad():
        true_ll = float(truth.log_prob(x).sum())
    ssm = LinearGaussianSSM(2, 3, init="stationary", diagonal=("R",), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rotation of the state: singular information
        res = ssm.fit(x)
    assert res.converged and res.grad_norm < 1e-4
    assert res.log_likelihood >= true_ll, (res.log_likelihood, true_ll)
    with torch.no_grad():  # the written-back model has the fitted likelihood
        assert abs(float(ssm.log_prob(x).sum()) - res.log_likelihood) < 1e-8 * abs(true_ll)
    assert float(torch.linalg.eigvals(ssm.A.detach()).abs().max()) < 1
    assert torch.allclose(ssm.R, torch.diag(torch.diagonal(ssm.R)))  # diagonal kept
    k = res.num_params
    assert k == 4 + 6 + 3 + 3 and len(res.names) == k and res.std_errors.shape == (k,)
    assert res.aic == pytest.approx(-2 * res.log_likelihood + 2 * k)
    assert res.bic == pytest.approx(-2 * res.log_likelihood + k * np.log(res.nobs))
    assert res[-1] <= res[0] and res.history == list(res)  # still the loss history
    text = res.summary()
    for word in ("log-likelihood", "AIC", "R[0]", "Ljung-Box", "converged True"):
        assert word in text
    assert res.residuals.shape == x.shape
    fc = ssm.forecast(x, 6, num_samples=20)
    assert torch.isfinite(fc.means).all() and torch.isfinite(fc.covs).all()


def test_boundary_warning_when_a_variance_sits_at_its_floor():
    # alternating signs: negatively autocorrelated, so no random-walk level at all
    noise = torch.randn(1, 80, 1, dtype=F64, generator=torch.Generator().manual_seed(3))
    x = (-1.0) ** torch.arange(80, dtype=F64).reshape(1, 80, 1) + 0.1 * noise
    with pytest.warns(UserWarning, match="boundary.*sigma2.level"):
        res = structural([LocalLevel()]).fit(x)
    assert "sigma2.level" in res.at_boundary
    assert res.estimates[1] < 1e-6 * float(x.var())


def test_fit_bad_optimizer_raises():
    with pytest.raises(ValueError, match="optimizer"):
        LinearGaussianSSM(1, 1, dtype=F64).fit(torch.zeros(1, 5, 1, dtype=F64), optimizer="adam")
    ssm = LinearGaussianSSM.from_matrices(A=0.5, C=1.0, Q=1.0, R=1.0, dtype=F64)
    with pytest.raises(ValueError, match="learn"):
        ssm.fit(torch.zeros(1, 5, 1, dtype=F64))


def test_mask_equals_nan():
    _, x = simulate(T=50, missing=0.0)
    mask = torch.ones(x.shape[:-1], dtype=torch.bool)
    mask[0, 10:15] = False
    x_nan = x.clone()
    x_nan[0, 10:15] = float("nan")
    a = LinearGaussianSSM(1, 3, init="diffuse", diagonal=("R",), dtype=F64).fit(
        x, mask, std_errors=False)
    b = LinearGaussianSSM(1, 3, init="diffuse", diagonal=("R",), dtype=F64).fit(
        x_nan, std_errors=False)
    assert a.log_likelihood == pytest.approx(b.log_likelihood, rel=1e-12)


# ------------------------------------------------------------------------------ diagnostics
def test_ljung_box_matches_statsmodels():
    from statsmodels.stats.diagnostic import acorr_ljungbox

    e = np.random.default_rng(0).standard_normal(150).cumsum() * 0.1
    e += np.random.default_rng(1).standard_normal(150)
    q, p = ljung_box(e, 10)
    ref = acorr_ljungbox(e, lags=[10])
    assert q == pytest.approx(float(ref["lb_stat"].iloc[0]), rel=1e-10)
    assert p == pytest.approx(float(ref["lb_pvalue"].iloc[0]), rel=1e-8)


def test_standardized_residuals_match_statsmodels():
    from pyrossm.datasets import load_nile
    from pyrossm.lgssm.results import standardized_residuals

    y = load_nile().flow.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm_res = sm.tsa.UnobservedComponents(y, "llevel").smooth([15099.0, 1469.1])
    one = torch.ones(1, 1, dtype=F64)
    m = dict(A=one, C=one, Q=1469.1 * one, R=15099.0 * one, init_mean=torch.zeros(1, dtype=F64),
             init_cov=1e6 * one)
    x = torch.tensor(y).reshape(1, -1, 1)
    r = standardized_residuals(x, kalman_filter(x, **m), m["C"], m["R"])
    np.testing.assert_allclose(r[0, 1:, 0].numpy(), sm_res.standardized_forecasts_error[0, 1:],
                               rtol=1e-8)


# ------------------------------------------------------------------------------ macrodata
def macrodata(rows=None, seed=0):
    d = sm.datasets.macrodata.load_pandas().data
    y = np.diff(np.log(d[["realgdp", "realcons", "realinv"]].to_numpy()), axis=0)[:rows]
    y = (y - y.mean(0)) / y.std(0)
    y[np.random.default_rng(seed).random(y.shape) < 0.1] = np.nan
    return y


def check_macrodata(rows):
    """State 2 (a VAR(1) factor), R diagonal, stationary initial state: the structure of
    statsmodels' DynamicFactor(k_factors=2, factor_order=1) (factor noise Q = I there; here Q
    and C are both free, the same family of likelihoods)."""
    y = macrodata(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm_res = sm.tsa.DynamicFactor(y, k_factors=2, factor_order=1).fit(disp=False, maxiter=1000)
        ssm = LinearGaussianSSM(2, 3, init="stationary", diagonal=("R",), dtype=F64)
        x = torch.tensor(y).unsqueeze(0)
        res = ssm.fit(x)
    assert res.converged, res.message
    assert res.log_likelihood >= sm_res.llf - MLE_SLACK * abs(sm_res.llf), (
        res.log_likelihood, sm_res.llf)
    Q, P0 = ssm.Q.detach(), ssm.init_cov.detach()
    assert float(torch.linalg.eigvalsh(Q).min()) > 1e-3 and float(Q.max()) < 1e3
    assert float(torch.linalg.eigvalsh(P0).min()) > 1e-3
    fc = ssm.forecast(x, 8, num_samples=50)
    assert torch.isfinite(fc.means).all() and torch.isfinite(fc.samples).all()
    return res


def test_macrodata_small():
    check_macrodata(rows=90)


@pytest.mark.slow
def test_macrodata_acceptance():
    res = check_macrodata(rows=None)
    assert res.seconds < 30
