"""KL, mutual information, active units and perplexity on constructed cases."""

import math

import pytest
import torch

from pyrossm.seqvae.metrics import active_units, gaussian_kl, mutual_information, perplexity

TOL = 1e-10


def test_gaussian_kl_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(5, 3, generator=g, dtype=torch.float64)
    scale = torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1
    q = torch.distributions.Normal(loc, scale)
    p = torch.distributions.Normal(torch.zeros_like(loc), torch.ones_like(scale))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(gaussian_kl(loc, scale), expected, atol=TOL)
    assert torch.allclose(gaussian_kl(torch.zeros(2, 4), torch.ones(2, 4)), torch.zeros(2))


def test_mi_is_zero_when_all_posteriors_are_equal():
    loc = torch.full((64, 4), 0.3, dtype=torch.float64)
    scale = torch.full((64, 4), 0.7, dtype=torch.float64)
    assert abs(float(mutual_information(loc, scale))) < 1e-9


def test_mi_reaches_log_batch_for_separated_posteriors():
    B = 32
    loc = torch.zeros(B, 2, dtype=torch.float64)
    loc[:, 0] = 100.0 * torch.arange(B)
    scale = torch.ones(B, 2, dtype=torch.float64)
    z = loc + 0.5  # one sample per posterior, well inside its own component
    assert float(mutual_information(loc, scale, z)) == pytest.approx(math.log(B), abs=1e-8)


def test_mi_between_zero_and_log_batch_for_gaussian_mixture():
    # x uniform on {-1, +1} in 1-D, q(z|x) = N(2x, 1): I = E log q(z|x)/q(z) with q(z) the mixture
    g = torch.Generator().manual_seed(0)
    B = 2000
    x = torch.randint(0, 2, (B, 1), generator=g).double() * 2 - 1
    loc, scale = 2 * x, torch.ones_like(x)
    z = loc + torch.randn(B, 1, generator=g, dtype=torch.float64)
    est = float(mutual_information(loc, scale, z))
    # exact value by Monte Carlo with the true mixture
    zz = loc + torch.randn(200000 // B * B, 1, generator=g, dtype=torch.float64)[:B]
    d = torch.distributions.Normal
    log_cond = d(loc, 1.0).log_prob(zz)
    log_mix = torch.logsumexp(torch.stack([d(2.0, 1.0).log_prob(zz), d(-2.0, 1.0).log_prob(zz)]),
                              0) - math.log(2)
    exact = float((log_cond - log_mix).mean())
    se = float((log_cond - log_mix).std()) / math.sqrt(B)
    assert 0 < est < math.log(2)
    assert abs(est - exact) < 5 * se + 0.02


def test_active_units_counts_dims_whose_means_vary():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(500, 6, generator=g, dtype=torch.float64)
    means[:, 3:] *= 0.01  # variance 1e-4 < 0.01
    n, var = active_units(means)
    assert n == 3
    assert torch.all(var[:3] > 0.5) and torch.all(var[3:] < 1e-3)
    with pytest.raises(ValueError, match="means"):
        active_units(torch.zeros(1, 3))


def test_perplexity():
    assert perplexity(10 * math.log(50.0), 10) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
