"""Forecast scores against closed forms and hand-computed (properscoring-style) values, Monte
Carlo convergence in standard errors, and the rolling-origin backtest against a manual loop."""

import math

import pytest
import torch

from pyrossm.forecast import Forecast
from pyrossm.lgssm import LinearGaussianSSM
from pyrossm.protocol import lengths_to_mask
from pyrossm.scoring import (
    absolute_error,
    backtest,
    coverage,
    crps,
    crps_gaussian,
    crps_samples,
    score,
)

F64 = torch.float64
K_SE = 5.0
TOL = 1e-12


def _crps_gaussian_erf(y, mu, sigma):
    """Independent closed form with math.erf (Gneiting & Raftery 2007, eq. 21)."""
    z = (y - mu) / sigma
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def test_crps_gaussian_closed_form_values():
    # N(0, 1) at 0: (√2 − 1)/√π; properscoring.crps_gaussian(0, 0, 1) = 0.23369497725510913
    assert abs(float(crps_gaussian(torch.tensor(0.0, dtype=F64), 0.0, 1.0))
               - (math.sqrt(2) - 1) / math.sqrt(math.pi)) < TOL
    assert abs((math.sqrt(2) - 1) / math.sqrt(math.pi) - 0.23369497725510913) < TOL
    for y, mu, sigma in [(1.0, 0.0, 1.0), (-2.5, 0.3, 0.7), (10.0, 1.0, 3.0)]:
        got = float(crps_gaussian(torch.tensor(y, dtype=F64), mu, sigma))
        assert abs(got - _crps_gaussian_erf(y, mu, sigma)) < TOL
    # scale equivariance and the point-mass limit |y − μ|
    assert abs(float(crps_gaussian(torch.tensor(6.0, dtype=F64), 0.0, 2.0))
               - 2 * float(crps_gaussian(torch.tensor(3.0, dtype=F64), 0.0, 1.0))) < TOL
    assert float(crps_gaussian(torch.tensor(2.0, dtype=F64), 0.5, 0.0)) == 1.5
    with pytest.raises(ValueError, match="std"):
        crps_gaussian(torch.tensor(0.0), 0.0, -1.0)


def test_crps_samples_hand_computed_values():
    """Ensemble CRPS E|X − y| − ½E|X − X'| (properscoring.crps_ensemble): [0, 1, 2] at 1 is
    2/3 − ½·8/9 = 2/9; at 5: 4 − 4/9; fair version at 1: 2/3 − ½·8/6 = 0; a single draw:
    |x − y|."""
    s = torch.tensor([2.0, 0.0, 1.0], dtype=F64)  # unsorted on purpose
    assert abs(float(crps_samples(torch.tensor(1.0, dtype=F64), s)) - 2 / 9) < TOL
    assert abs(float(crps_samples(torch.tensor(5.0, dtype=F64), s)) - (4 - 4 / 9)) < TOL
    assert abs(float(crps_samples(torch.tensor(1.0, dtype=F64), s, fair=True))) < TOL
    assert float(crps_samples(torch.tensor(3.0, dtype=F64), torch.tensor([1.0], dtype=F64))) == 2
    # brute force over pairs, batched, draws along dim 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=F64)
    y = torch.randn(4, generator=g, dtype=F64)
    pairs = (x[:, :, None] - x[:, None, :]).abs().mean((1, 2))
    brute = (x - y[:, None]).abs().mean(1) - 0.5 * pairs
    torch.testing.assert_close(crps_samples(y, x, dim=1), brute, rtol=TOL, atol=TOL)


def test_sample_crps_converges_to_gaussian_crps():
    """Sample CRPS of m draws of N(μ, σ²) within K_SE standard errors of the closed form; the
    SE from the first-order (Hoeffding) term h_i = |x_i − y| − mean_j |x_i − x_j|."""
    g = torch.Generator().manual_seed(1)
    m = 4000
    for y, mu, sigma in [(0.0, 0.0, 1.0), (1.3, -0.2, 0.5), (-4.0, 1.0, 2.0)]:
        x = mu + sigma * torch.randn(m, generator=g, dtype=F64)
        est = float(crps_samples(torch.tensor(y, dtype=F64), x, fair=True))
        h = (x - y).abs() - (x[:, None] - x[None, :]).abs().mean(1)
        se = float(h.std()) / math.sqrt(m)
        exact = _crps_gaussian_erf(y, mu, sigma)
        assert abs(est - exact) < K_SE * se, (y, mu, sigma, est, exact, se)


def test_coverage_mae_rmse_and_forecast_crps():
    """Calibrated Gaussian forecast: coverage of the 90% band within K_SE binomial SEs; MAE and
    RMSE of the mean, exact-moment and sample-based CRPS agree in SEs."""
    g = torch.Generator().manual_seed(2)
    N, H = 3000, 2
    mean = torch.randn(N, H, 1, generator=g, dtype=F64)
    sd = 0.5 + torch.rand(N, H, 1, generator=g, dtype=F64)
    y = mean + sd * torch.randn(N, H, 1, generator=g, dtype=F64)
    fc = Forecast.from_gaussian(mean, torch.diag_embed(sd**2))
    cov = coverage(fc, y, 0.9)
    assert abs(float(cov.mean()) - 0.9) < K_SE * math.sqrt(0.9 * 0.1 / cov.numel())
    err = absolute_error(fc, y)
    torch.testing.assert_close(err, (y - mean).abs(), rtol=0, atol=0)
    s = score(fc, y, level=0.9)
    torch.testing.assert_close(s.mae, err.mean((0, 2)), rtol=TOL, atol=TOL)
    torch.testing.assert_close(s.rmse, (err**2).mean((0, 2)).sqrt(), rtol=TOL, atol=TOL)
    assert s.count.tolist() == [N, N]
    samples = mean + sd * torch.randn(400, N, H, 1, generator=g, dtype=F64)
    sampled = Forecast(samples, None, mean)
    # per-entry Monte Carlo error of the unbiased (fair) estimator, averaged over N·H entries
    diff = crps(sampled, y, fair=True) - crps(fc, y)
    assert abs(float(diff.mean())) < K_SE * float(diff.std()) / math.sqrt(diff.numel())
    # NaN targets are not scored
    y2 = y.clone()
    y2[0, 0, 0] = math.nan
    assert score(fc, y2).count.tolist() == [N - 1, N]
    assert math.isnan(float(crps(fc, y2)[0, 0, 0]))
    with pytest.raises(ValueError, match="y"):
        crps(fc, y[:, :1])
    with pytest.raises(TypeError, match="forecast"):
        crps(mean, y)


def _ssm():
    return LinearGaussianSSM.from_matrices(A=[[0.95]], C=[[1.0], [0.5]], Q=[[0.3]],
                                           R=0.5 * torch.eye(2), dtype=F64)


def test_backtest_equals_a_manual_rolling_loop():
    ssm = _ssm()
    _, x = ssm.sample(30, 3, generator=torch.Generator().manual_seed(3))
    x[1, 21, 0] = math.nan  # a missing target entry is skipped
    res = backtest(ssm, x, horizon=4, origins=[12, 20, 28], num_samples=0)
    assert res.crps.shape == (3, 4) and res.origins.tolist() == [12, 20, 28]
    for k, t0 in enumerate([12, 20, 28]):
        fc = ssm.forecast(x[:, :t0], 4, num_samples=0)
        for h in range(4):
            if t0 + h >= 30:
                assert math.isnan(float(res.crps[k, h])) and int(res.count[k, h]) == 0
                continue
            y = x[:, t0 + h]
            ok = ~torch.isnan(y)
            c = crps_gaussian(y, fc.mean[:, h], fc.std[:, h])[ok].mean()
            torch.testing.assert_close(res.crps[k, h], c, rtol=TOL, atol=TOL)
            mae = (y - fc.mean[:, h]).abs()[ok].mean()
            torch.testing.assert_close(res.mae[k, h], mae, rtol=TOL, atol=TOL)
            assert int(res.count[k, h]) == int(ok.sum())
    pooled = res.by_horizon()
    w = res.count[:, 0].to(F64)
    torch.testing.assert_close(pooled.crps[0], (res.crps[:, 0] * w).sum() / w.sum(), rtol=TOL,
                               atol=TOL)
    # default origins: every `horizon` steps from T // 2
    assert backtest(ssm, x, horizon=5, num_samples=0).origins.tolist() == [15, 20, 25]


def test_backtest_refit_callable_and_padding():
    ssm = _ssm()
    _, x = ssm.sample(20, 2, generator=torch.Generator().manual_seed(4))
    mask = lengths_to_mask(torch.tensor([20, 12]), 20)
    seen = []

    def refit(model, prefix, prefix_mask):
        seen.append((prefix.shape[1], None if prefix_mask is None else prefix_mask.sum(-1)))
        return None

    res = backtest(ssm, x, 3, origins=[10, 15], mask=mask, refit=refit, num_samples=0)
    assert [s[0] for s in seen] == [10, 15] and seen[1][1].tolist() == [15, 12]
    # origin 15: the second sequence ended at 12, only the first is scored
    assert res.count[1].tolist() == [2, 2, 2] and res.count[0].tolist() == [4, 4, 2]
    with pytest.raises(ValueError, match="origins"):
        backtest(ssm, x, 3, origins=[0])
    with pytest.raises(TypeError, match="refit"):
        backtest(ssm, x, 3, refit="yes")
    with pytest.raises(ValueError, match="horizon"):
        backtest(ssm, x, 0)
