"""pyrossm.nonlinear.diagnostics: the per-coordinate KL against the ELBO's Monte Carlo KL."""

import math

import pyro
import pytest
import torch

from pyrossm.guides import FilteringLSTMGuide, StructuredGuide
from pyrossm.infer import elbo_terms
from pyrossm.nonlinear import DeepMarkovModel, LSTMStateSpaceModel
from pyrossm.nonlinear.diagnostics import kl_per_dimension


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 7, 3, generator=g)
    lengths = torch.tensor([7, 5, 7, 3, 6, 7])
    return x, lengths


@pytest.mark.parametrize("model_cls, guide_cls", [
    (DeepMarkovModel, StructuredGuide),
    (LSTMStateSpaceModel, StructuredGuide),
    (DeepMarkovModel, FilteringLSTMGuide),
])
def test_sum_over_dimensions_is_the_elbo_kl(model_cls, guide_cls):
    pyro.set_rng_seed(0)
    x, lengths = _data()
    model = model_cls(obs_dim=3, z_dim=2, emission="gaussian")
    guide = guide_cls(3, 2, hidden_dim=8)
    frames = int(lengths.sum())
    res = kl_per_dimension(model, guide, (x, lengths), num_samples=3)
    assert res.kl_per_dimension.shape == (2,) and res.frames == frames
    assert res.kl_per_frame == pytest.approx(float(res.kl_per_dimension.sum()))
    # many draws at once: the data repeated R times (one guide draw per copy)
    R = 200
    res = kl_per_dimension(model, guide, (x.repeat(R, 1, 1), lengths.repeat(R)),
                           batch_size=R * len(x))
    # the ELBO's estimate E_q[log q(z) - log p(z)] per draw, with its standard error
    kl = elbo_terms(model, guide, (x.repeat(R, 1, 1), lengths.repeat(R)), num_samples=1,
                    batch_size=R * len(x)).kl
    draws = kl.reshape(R, len(x)).sum(1) / frames
    se = float(draws.std()) / math.sqrt(R)
    assert abs(float(draws.mean()) - res.kl_per_frame) < 4 * se + 1e-3


def test_a_coordinate_whose_guide_is_its_prior_is_inactive():
    """A filtering guide that returns the prior's N(0, 1) marginal in coordinate 1 and a
    confident posterior in coordinate 0, against a prior with z_t ~ N(0, 1) i.i.d."""
    pyro.set_rng_seed(0)

    class IIDPrior(torch.nn.Module):
        def trajectory_params(self, z):
            return torch.zeros_like(z), torch.ones_like(z)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dynamics = IIDPrior()

    x, lengths = _data(1)

    def fixed_guide(x, mask=None):
        from pyrossm.distributions import DiagonalGaussianSequence

        loc = torch.stack([x[..., 0], torch.zeros_like(x[..., 0])], -1)
        scale = torch.stack([0.1 * torch.ones_like(loc[..., 0]), torch.ones_like(loc[..., 0])], -1)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            return pyro.sample("z", DiagonalGaussianSequence(loc, scale, mask))

    res = kl_per_dimension(Model(), fixed_guide, (x, lengths), num_samples=2)
    assert res.kl_per_dimension[1] == pytest.approx(0.0, abs=1e-6)
    # KL(N(m, 0.1^2) || N(0, 1)) = (0.01 + m^2 - 1)/2 - log 0.1, averaged over observed frames
    mask = torch.arange(7) < lengths[:, None]
    m = x[..., 0][mask]
    expected = float(((0.01 + m**2 - 1) / 2 - math.log(0.1)).mean())
    assert float(res.kl_per_dimension[0]) == pytest.approx(expected, rel=1e-5)
    assert res.active_dims == 1


def test_bad_input():
    model = DeepMarkovModel(obs_dim=3, z_dim=2)
    x, _ = _data()
    with pytest.raises(ValueError, match="tril"):
        kl_per_dimension(model, StructuredGuide(3, 2, hidden_dim=4, combiner="linear"), x)
    with pytest.raises(TypeError, match="dynamics.trajectory_params"):
        kl_per_dimension(torch.nn.Linear(2, 2), StructuredGuide(3, 2, hidden_dim=4), x)
    with pytest.raises(ValueError, match="num_samples"):
        kl_per_dimension(model, StructuredGuide(3, 2, hidden_dim=4), x, num_samples=0)
