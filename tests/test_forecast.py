"""The one Forecast type: every model forecasts from each sequence's own length; quantile bands.

Exact identities in float64 (RTOL); Monte Carlo checks in standard errors (K_SE).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrossm.forecast import Forecast, sequence_lengths
from pyrossm.lgssm import LinearGaussianSSM
from pyrossm.nonlinear import DeepMarkovModel, LSTMStateSpaceModel
from pyrossm.protocol import lengths_to_mask

F64 = torch.float64
RTOL = 1e-10
K_SE = 5.0
LENGTHS = torch.tensor([10, 7, 4])


def lgssm():
    return LinearGaussianSSM.from_matrices(
        A=[[0.9, 0.2], [-0.1, 0.8]], C=[[1.0, 0.5]], Q=[[0.5, 0.1], [0.1, 0.3]], R=[[0.4]],
        init_mean=[1.0, -1.0], init_cov=[[2.0, 0.0], [0.0, 1.0]], dtype=F64)


def padded(x, lengths, T, fill):
    """Right-pad each sequence ``x[b, :lengths[b]]`` to ``T`` steps with ``fill``; mask."""
    out = torch.full((x.shape[0], T, x.shape[-1]), fill, dtype=x.dtype)
    for b, L in enumerate(lengths.tolist()):
        out[b, :L] = x[b, :L]
    return out, lengths_to_mask(lengths, T)


def test_lgssm_padded_forecast_equals_truncated():
    """Issue 13: forecast(x, mask=...) starts at each sequence's last real step. Exact moments
    equal those of each truncated sequence (float64, RTOL); with a fixed seed the samples do
    not depend on the amount of padding; the old padded-end forecast differs."""
    ssm = lgssm()
    _, x = ssm.sample(12, 3, generator=torch.Generator().manual_seed(0))
    x12, m12 = padded(x, LENGTHS, 12, 99.0)
    fc = ssm.forecast(x12, 5, num_samples=50, mask=m12, generator=torch.Generator().manual_seed(1))
    assert fc.lengths.tolist() == LENGTHS.tolist()
    for b, L in enumerate(LENGTHS.tolist()):
        one = ssm.forecast(x[b : b + 1, :L], 5, num_samples=0)
        for name in ("mean", "covariance", "latent_mean", "latent_covariance"):
            torch.testing.assert_close(getattr(fc, name)[b], getattr(one, name)[0], rtol=RTOL,
                                       atol=RTOL, msg=name)
    x10, m10 = padded(x, LENGTHS, 10, -5.0)
    fc10 = ssm.forecast(x10, 5, num_samples=50, mask=m10,
                        generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fc10.samples, fc.samples, rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(fc10.latent_samples, fc.latent_samples, rtol=RTOL, atol=RTOL)
    old = ssm.forecast(torch.where(m12.unsqueeze(-1), x12, torch.nan), 5, num_samples=0)
    assert not torch.allclose(old.mean[2], fc.mean[2], atol=1e-3)  # from the padded end


def test_lgssm_forecast_samples_match_exact_moments():
    ssm = lgssm()
    _, x = ssm.sample(8, 2, generator=torch.Generator().manual_seed(2))
    x, mask = padded(x, torch.tensor([8, 3]), 8, 0.0)
    S = 4000
    fc = ssm.forecast(x, 3, num_samples=S, mask=mask, generator=torch.Generator().manual_seed(3))
    sd = fc.std
    assert_within = ((fc.samples.mean(0) - fc.mean) / (sd / math.sqrt(S))).abs()
    assert float(assert_within.max()) < K_SE
    var_se = sd**2 * math.sqrt(2 / (S - 1))
    assert float(((fc.samples.var(0) - sd**2) / var_se).abs().max()) < K_SE
    latent_sd = torch.diagonal(fc.latent_covariance, dim1=-2, dim2=-1).sqrt()
    err = (fc.latent_samples.mean(0) - fc.latent_mean) / (latent_sd / math.sqrt(S))
    assert float(err.abs().max()) < K_SE


class DeltaGuide(torch.nn.Module):
    """A deterministic causal guide: z_t = tanh(W · cumsum(x)_t); its draw does not use the RNG,
    so forecasts with a fixed seed depend only on the roll-forward."""

    def __init__(self, obs_dim, z_dim):
        super().__init__()
        self.W = torch.nn.Linear(obs_dim, z_dim).double()

    def forward(self, x, mask=None):
        z = torch.tanh(self.W(torch.nan_to_num(x).cumsum(1)))
        with pyro.plate("sequences", x.shape[0], dim=-1):
            return pyro.sample("z", dist.Delta(z, event_dim=2))


@pytest.mark.parametrize("cls", [DeepMarkovModel, LSTMStateSpaceModel])
def test_nonlinear_padded_forecast_equals_truncated(cls):
    kw = dict(transition_dim=8) if cls is DeepMarkovModel else dict(rnn_dim=8, hidden_dim=8)
    model = cls(2, 3, emission_dim=8, emission="gaussian", **kw).double()
    guide = DeltaGuide(2, 3)
    x = torch.randn(3, 12, 2, dtype=F64)
    x12, m12 = padded(x, LENGTHS, 12, 99.0)
    x10, m10 = padded(x, LENGTHS, 10, -3.0)
    pyro.set_rng_seed(4)
    fc = model.forecast(x12, 4, num_samples=6, guide=guide, mask=m12)
    pyro.set_rng_seed(4)
    fc10 = model.forecast(x10, 4, num_samples=6, guide=guide, mask=m10)
    assert isinstance(fc, Forecast) and fc.covariance is None and not fc.exact
    assert fc.samples.shape == (6, 3, 4, 2) and fc.mean.shape == (3, 4, 2)
    for name in ("samples", "latent_samples", "mean", "emission_means"):
        torch.testing.assert_close(getattr(fc10, name), getattr(fc, name), rtol=RTOL, atol=RTOL)
    # the state the forecast starts from = that of each sequence cut at its length, alone
    loc = model.transition(model.state_after(guide(x12), LENGTHS)).mean
    for b, L in enumerate(LENGTHS.tolist()):
        own = model.transition(model.state_after(guide(x[b : b + 1, :L]), torch.tensor([L])))
        torch.testing.assert_close(loc[b], own.mean[0], rtol=RTOL, atol=RTOL)


def test_exact_quantiles_and_interval():
    mean = torch.tensor([[[1.0], [2.0]]], dtype=F64)
    cov = torch.tensor([[[[4.0]], [[9.0]]]], dtype=F64)
    fc = Forecast.from_gaussian(mean, cov)
    q = fc.quantiles([0.05, 0.5, 0.975])
    z = torch.tensor([-1.6448536269514722, 0.0, 1.959963984540054], dtype=F64)
    expected = mean + torch.tensor([2.0, 3.0], dtype=F64).reshape(1, 2, 1) * z.reshape(3, 1, 1, 1)
    torch.testing.assert_close(q, expected, rtol=1e-12, atol=1e-12)
    lo, hi = fc.interval(0.95)
    torch.testing.assert_close(hi - mean, 1.959963984540054 * fc.std, rtol=1e-12, atol=0)
    torch.testing.assert_close(lo, 2 * mean - hi, rtol=1e-12, atol=1e-12)


def test_empirical_quantiles_converge_to_gaussian():
    """Sample quantiles of N(μ, σ²) draws: within K_SE standard errors of the exact ones,
    SE = σ sqrt(q (1 - q) / S) / φ(Φ⁻¹(q))."""
    S = 20000
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([[[0.5, -1.0]]], dtype=F64)
    sd = torch.tensor([[[2.0, 0.5]]], dtype=F64)
    samples = mean + sd * torch.randn(S, 1, 1, 2, generator=g, dtype=F64)
    fc = Forecast(samples, None, samples.mean(0))
    exact = Forecast.from_gaussian(mean, torch.diag_embed(sd**2))
    for level in (0.05, 0.5, 0.9):
        zq = torch.special.ndtri(torch.tensor(level, dtype=F64))
        density = torch.exp(-(zq**2) / 2) / math.sqrt(2 * math.pi)
        se = sd * math.sqrt(level * (1 - level) / S) / density
        err = (fc.quantiles(level) - exact.quantiles(level)) / se
        assert float(err.abs().max()) < K_SE, level


def test_aliases_lengths_and_bad_input():
    fc = Forecast.from_gaussian(torch.zeros(2, 3, 1), torch.ones(2, 3, 1, 1))
    assert fc.means is fc.mean and fc.covs is fc.covariance and fc.horizon == 3
    ids = Forecast(torch.zeros(5, 2, 3, dtype=torch.long), None, torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="samples"):
        ids.interval(0.9)
    with pytest.raises(ValueError, match="levels"):
        fc.quantiles([0.0, 0.5])
    with pytest.raises(ValueError, match="level"):
        fc.interval(1.5)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    assert sequence_lengths(mask, 4).tolist() == [3, 0]
    with pytest.raises(TypeError, match="mask"):
        sequence_lengths(mask.long(), 4)
    ssm = lgssm()
    x = torch.randn(2, 4, 1, dtype=F64)
    with pytest.raises(ValueError, match="mask"):
        ssm.forecast(x, 2, mask=mask)
    with pytest.raises(ValueError, match="num_samples"):
        ssm.forecast(x, 2, num_samples=-1)
