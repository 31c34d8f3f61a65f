"""The public base class pyrossm.StateSpaceModel: a custom model gets the Pyro model, sampling,
forecasting (from each sequence's own length) and reconstruction from four methods."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrossm import StateSpaceModel
from pyrossm.protocol import check_sequences, lengths_to_mask

F64 = torch.float64
ATOL = 1e-10


class AR1(StateSpaceModel):
    """z_t ~ N(a z_{t-1} + b s_{t-1}, 0.5²) with a second state s = running sum of z (a
    two-tensor state, batch first); x_t ~ N(W z_t, 0.3²) per entry."""

    def __init__(self):
        super().__init__()
        self.obs_dim, self.z_dim = 2, 1
        self.a = torch.nn.Parameter(torch.tensor(0.8, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor(-0.1, dtype=F64))
        self.W = torch.nn.Parameter(torch.tensor([[1.0], [-0.5]], dtype=F64))

    def initial_state(self, batch_size, like):
        zeros = like.new_zeros(batch_size, 1)
        return zeros, zeros

    def transition(self, state):
        z, s = state
        return dist.Normal(self.a * z + self.b * s, 0.5).to_event(1)

    def update(self, state, z_t):
        return z_t, state[1] + z_t

    def emission(self, z):
        return dist.Normal(z @ self.W.T, 0.3)


def manual_log_joint(m, x, mask, z):
    """log p(z, x) summed over real steps, by an explicit loop."""
    total = torch.zeros(x.shape[0], dtype=F64)
    zp, s = torch.zeros(x.shape[0], 1, dtype=F64), torch.zeros(x.shape[0], 1, dtype=F64)
    for t in range(x.shape[1]):
        lp = dist.Normal(m.a * zp + m.b * s, 0.5).log_prob(z[:, t]).sum(-1)
        obs = ~torch.isnan(x[:, t])
        lx = dist.Normal(z[:, t] @ m.W.T, 0.3).log_prob(torch.nan_to_num(x[:, t]))
        lp = lp + torch.where(obs, lx, torch.zeros_like(lx)).sum(-1)
        total = total + torch.where(mask[:, t], lp, torch.zeros_like(lp))
        zp, s = z[:, t], s + z[:, t]
    return total


def test_generic_model_log_joint_equals_a_manual_loop():
    m = AR1()
    x = torch.randn(3, 6, 2, dtype=F64)
    x[0, 2, 1] = float("nan")
    mask = lengths_to_mask(torch.tensor([6, 4, 1]), 6)
    z = torch.randn(3, 6, 1, dtype=F64)
    tr = poutine.trace(poutine.condition(m.model, data={"z": z})).get_trace(x, mask)
    tr.compute_log_prob()
    ours = tr.nodes["z"]["log_prob"] + tr.nodes["x"]["log_prob"]
    torch.testing.assert_close(ours, manual_log_joint(m, x, mask, z), rtol=ATOL, atol=ATOL)


def test_generic_state_after_equals_stepping_and_forecast_from_own_length():
    m = AR1()
    z = torch.randn(3, 7, 1, dtype=F64)
    lengths = torch.tensor([7, 3, 0])
    z_state, s_state = m.state_after(z, lengths)
    for b, L in enumerate(lengths.tolist()):
        torch.testing.assert_close(z_state[b], z[b, L - 1] if L else torch.zeros(1, dtype=F64))
        torch.testing.assert_close(s_state[b], z[b, :L].sum(0))

    def guide(x, mask=None):  # deterministic: z = first coordinate of x (NaN -> 0)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            return pyro.sample("z", dist.Delta(torch.nan_to_num(x[..., :1]), event_dim=2))

    x = torch.randn(3, 9, 2, dtype=F64)
    lengths = torch.tensor([9, 5, 2])
    x_pad = torch.where(lengths_to_mask(lengths, 9).unsqueeze(-1), x, torch.tensor(50.0, dtype=F64))
    pyro.set_rng_seed(0)
    fc = m.forecast(x_pad, 3, num_samples=2000, guide=guide, mask=lengths_to_mask(lengths, 9))
    assert fc.samples.shape == (2000, 3, 3, 2) and fc.lengths.tolist() == [9, 5, 2]
    # first step: z ~ N(a z_L + b s_L, 0.5²) from each sequence's own prefix (within 5 SE)
    zL = torch.stack([x[b, L - 1, :1] for b, L in enumerate(lengths.tolist())])
    sL = torch.stack([x[b, :L, :1].sum(0) for b, L in enumerate(lengths.tolist())])
    with torch.no_grad():
        expected = m.a * zL + m.b * sL
    err = (fc.latent_samples[:, :, 0].mean(0) - expected) / (0.5 / 2000**0.5)
    assert float(err.abs().max()) < 5
    assert fc.interval(0.8).lower.shape == (3, 3, 2)


def test_sample_and_reconstruct():
    m = AR1()
    pyro.set_rng_seed(1)
    z, x = m.sample(5, num_samples=4)
    assert z.shape == (4, 5, 1) and x.shape == (4, 5, 2)
    rec = m.reconstruct(x, lambda x, mask=None: pyro.sample(
        "z", dist.Delta(x[..., :1], event_dim=2)), num_samples=2)
    assert rec.z.shape == (2, 4, 5, 1)
    torch.testing.assert_close(rec.means, rec.z @ m.W.detach().T)


def test_missing_methods_and_bad_input():
    class Incomplete(StateSpaceModel):
        def initial_state(self, batch_size, like):
            return like.new_zeros(batch_size, 1)

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    with pytest.raises(ValueError, match="guide"):
        AR1().forecast(torch.randn(2, 3, 2, dtype=F64), 2)
    with pytest.raises(ValueError, match="mask"):
        check_sequences(torch.randn(2, 3, 2), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="x"):
        check_sequences(torch.zeros(2, 3, 2, dtype=torch.long), None)


def test_iwae_of_a_custom_linear_model_with_its_exact_posterior_is_exact():
    """With b = 0 the custom model is an LGSSM (A = 0.8, Q = 0.25, C = W, R = 0.09 I, z_1 ~
    N(0, 0.25)). With the exact posterior (dense Gaussian) as guide every importance weight is
    p(x): pyrossm.infer.log_likelihood must equal the Kalman log-likelihood (float64)."""
    from torch.distributions.transforms import ReshapeTransform

    from pyrossm.infer import log_likelihood
    from pyrossm.lgssm import kalman_filter

    m = AR1()
    with torch.no_grad():
        m.b.zero_()
    T = 4
    W = m.W.detach()
    steps = torch.arange(T)
    lag = (steps[:, None] - steps[None, :]).to(F64)
    L = torch.where(lag >= 0, 0.5 * 0.8**lag, torch.zeros((), dtype=F64))
    prior_cov = L @ L.T  # Cov(z_1..z_T)
    H = torch.kron(torch.eye(T, dtype=F64), W)  # x = H z + v
    post_prec = torch.linalg.inv(prior_cov) + H.T @ H / 0.09
    post_cov = torch.linalg.inv(post_prec)
    post_cov = 0.5 * (post_cov + post_cov.T)

    class ExactPosterior(torch.nn.Module):
        def forward(self, x, mask=None):
            loc = (x.reshape(x.shape[0], -1) @ H / 0.09) @ post_cov
            q = dist.TransformedDistribution(dist.MultivariateNormal(loc, post_cov),
                                             [ReshapeTransform((T,), (T, 1))])
            with pyro.plate("sequences", x.shape[0], dim=-1):
                return pyro.sample("z", q)

    guide = ExactPosterior()

    x = torch.randn(3, T, 2, dtype=F64)
    iwae = log_likelihood(m, guide, x, num_samples=4)
    one = torch.ones(1, 1, dtype=F64)
    exact = kalman_filter(x, 0.8 * one, W, 0.25 * one, 0.09 * torch.eye(2, dtype=F64),
                          torch.zeros(1, dtype=F64), 0.25 * one).log_likelihood
    torch.testing.assert_close(iwae, exact, rtol=1e-8, atol=1e-8)


def test_forecast_names_a_2d_prefix():
    from pyrossm.guides import StructuredGuide
    from pyrossm.nonlinear import DeepMarkovModel

    model, guide = DeepMarkovModel(2, 1), StructuredGuide(2, 1)
    with pytest.raises(ValueError, match=r"^x: .*unsqueeze\(0\)"):
        model.forecast(torch.randn(10, 2), 3, guide=guide)
