"""Tests of the trajectory distributions in :mod:`pyrossm.distributions`."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrossm.distributions import (
    AutoregressiveGaussianSequence,
    DiagonalGaussianSequence,
    SequentialSequenceDistribution,
    shift_sequence,
)

EXACT = dict(rtol=1e-10, atol=1e-10)
K_SE = 4.0  # Monte Carlo tolerance, in standard errors


def _linear_combiner(F, G, b, scale):
    """loc = F z + G h + b with a fixed scale (diag (D,) or tril (D, D))."""

    def combiner(z_prev, h):
        loc = z_prev @ F.T + h @ G.T + b
        if scale.dim() == 1:
            return loc, scale.expand(loc.shape)
        return loc, scale.expand(loc.shape + scale.shape[-1:])

    return combiner


def _random_linear(D, H, tril, dtype=torch.float64):
    F = 0.5 * torch.randn(D, D, dtype=dtype)
    G = torch.randn(D, H, dtype=dtype)
    b = torch.randn(D, dtype=dtype)
    if tril:
        scale = torch.randn(D, D, dtype=dtype).tril(-1) + torch.diag(
            torch.rand(D, dtype=dtype) + 0.5
        )
    else:
        scale = torch.rand(D, dtype=dtype) + 0.5
    return F, G, b, scale


def _dense_joint(F, G, b, L, h, z0):
    """Mean (T*D,) and covariance of z_{1:T}, z_t = F z_{t-1} + G h_t + b + L e_t (dense)."""
    T, D = h.shape[0], F.shape[0]
    means, m = [], z0
    for t in range(T):
        m = F @ m + G @ h[t] + b
        means.append(m)
    # z = M (noise stacked), M block lower-triangular with blocks F^{t-s} L
    M = torch.zeros(T * D, T * D, dtype=F.dtype)
    for t in range(T):
        for s in range(t + 1):
            M[t * D : (t + 1) * D, s * D : (s + 1) * D] = torch.linalg.matrix_power(F, t - s) @ L
    return torch.cat(means), M @ M.T


# ------------------------------------------------------------------ DiagonalGaussianSequence
def test_diagonal_log_prob_matches_normal_and_shapes():
    loc, scale = (
        torch.randn(3, 5, 2, dtype=torch.float64),
        torch.rand(3, 5, 2, dtype=torch.float64) + 0.1,
    )
    d = DiagonalGaussianSequence(loc, scale)
    assert d.batch_shape == (3,) and d.event_shape == (5, 2) and d.has_rsample
    z = d.rsample((4,))
    assert z.shape == (4, 3, 5, 2)
    expected = dist.Normal(loc, scale).log_prob(z).sum((-1, -2))
    torch.testing.assert_close(d.log_prob(z), expected, **EXACT)
    torch.testing.assert_close(
        d.entropy(), dist.Normal(loc, scale).entropy().sum((-1, -2)), **EXACT
    )


def test_diagonal_masked_step_equals_step_removed():
    loc, scale = (
        torch.randn(2, 6, 3, dtype=torch.float64),
        torch.rand(2, 6, 3, dtype=torch.float64) + 0.1,
    )
    z = torch.randn(2, 6, 3, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    lp = DiagonalGaussianSequence(loc, scale, mask).log_prob(z)
    short = DiagonalGaussianSequence(loc[1:, :4], scale[1:, :4]).log_prob(z[1:, :4])
    torch.testing.assert_close(lp[1:], short, **EXACT)
    torch.testing.assert_close(
        lp[:1], DiagonalGaussianSequence(loc, scale).log_prob(z)[:1], **EXACT
    )


def test_diagonal_expand_and_plate():
    d = DiagonalGaussianSequence(
        torch.zeros(1, 4, 2), torch.ones(1, 4, 2), mask=torch.tensor([[True, True, True, False]])
    )
    e = d.expand((5,))
    assert e.batch_shape == (5,) and e.mask.shape == (5, 4)
    with pyro.plate("sequences", 5, dim=-1):
        z = pyro.sample("z", d)
    assert z.shape == (5, 4, 2)
    # only 3 steps of 2 dims count
    torch.testing.assert_close(
        e.log_prob(torch.zeros(5, 4, 2)), torch.full((5,), -3 * math.log(2 * math.pi))
    )


def test_diagonal_rsample_is_reparameterized():
    loc = torch.zeros(2, 3, 1, requires_grad=True)
    DiagonalGaussianSequence(loc, torch.ones(2, 3, 1)).rsample().sum().backward()
    torch.testing.assert_close(loc.grad, torch.ones(2, 3, 1))


def test_diagonal_validation_errors():
    with pytest.raises(ValueError, match="scale"):
        DiagonalGaussianSequence(torch.zeros(2, 3, 1), torch.ones(4, 3, 1))
    with pytest.raises(ValueError, match="mask"):
        DiagonalGaussianSequence(
            torch.zeros(2, 3, 1), torch.ones(2, 3, 1), mask=torch.ones(2, 4).bool()
        )
    with pytest.raises(TypeError, match="mask"):
        DiagonalGaussianSequence(torch.zeros(2, 3, 1), torch.ones(2, 3, 1), mask=torch.ones(2, 3))
    with pytest.raises(ValueError):
        DiagonalGaussianSequence(torch.zeros(2, 3, 1), -torch.ones(2, 3, 1), validate_args=True)
    d = DiagonalGaussianSequence(torch.zeros(2, 3, 1), torch.ones(2, 3, 1), validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.zeros(2, 4, 1))


# ------------------------------------------------------------------ AutoregressiveGaussianSequence
@pytest.mark.parametrize("tril", [False, True])
def test_autoregressive_log_prob_equals_dense_joint(tril):
    D, H, T = 2, 3, 5
    F, G, b, scale = _random_linear(D, H, tril)
    L = scale if tril else torch.diag(scale)
    h = torch.randn(T, H, dtype=torch.float64)
    z0 = torch.randn(D, dtype=torch.float64)
    d = AutoregressiveGaussianSequence(
        _linear_combiner(F, G, b, scale), h.unsqueeze(0), z0, scale_tril=tril
    )
    z = torch.randn(7, 1, T, D, dtype=torch.float64)
    mean, cov = _dense_joint(F, G, b, L, h, z0)
    expected = dist.MultivariateNormal(mean, cov).log_prob(z.reshape(7, 1, T * D))
    torch.testing.assert_close(d.log_prob(z), expected, rtol=1e-9, atol=1e-9)


def test_autoregressive_rsample_moments_match_dense_joint():
    D, H, T, N = 2, 1, 4, 20000
    F, G, b, scale = _random_linear(D, H, tril=True)
    h = torch.randn(T, H, dtype=torch.float64)
    z0 = torch.zeros(D, dtype=torch.float64)
    d = AutoregressiveGaussianSequence(
        _linear_combiner(F, G, b, scale), h.unsqueeze(0), z0, scale_tril=True
    )
    z = d.rsample((N,)).reshape(N, T * D)
    mean, cov = _dense_joint(F, G, b, scale, h, z0)
    se = (cov.diagonal() / N).sqrt()
    assert ((z.mean(0) - mean).abs() < K_SE * se).all()
    # variance: se of the sample variance ~ var * sqrt(2 / N) for a Gaussian
    assert ((z.var(0) - cov.diagonal()).abs() < K_SE * cov.diagonal() * math.sqrt(2 / N)).all()


def test_autoregressive_mask_equals_truncated_sequence():
    D, H, T = 2, 3, 6
    F, G, b, scale = _random_linear(D, H, tril=False)
    comb = _linear_combiner(F, G, b, scale)
    h = torch.randn(2, T, H, dtype=torch.float64)
    z = torch.randn(2, T, D, dtype=torch.float64)
    z0 = torch.zeros(D, dtype=torch.float64)
    mask = torch.tensor([[True] * T, [True] * 3 + [False] * 3])
    lp = AutoregressiveGaussianSequence(comb, h, z0, mask).log_prob(z)
    short = AutoregressiveGaussianSequence(comb, h[1:, :3], z0).log_prob(z[1:, :3])
    torch.testing.assert_close(lp[1:], short, **EXACT)


def test_autoregressive_rsample_is_the_recursion_on_standard_normal_noise():
    """rsample draws eps (T, batch, D) at once, then z_t = loc(z_{t-1}) + scale * eps_t."""
    D, H, T = 3, 2, 5
    F, G, b, scale = _random_linear(D, H, tril=False)
    comb = _linear_combiner(F, G, b, scale)
    h = torch.randn(4, T, H, dtype=torch.float64)
    z0 = torch.randn(D, dtype=torch.float64)
    torch.manual_seed(1)
    z = AutoregressiveGaussianSequence(comb, h, z0).rsample()
    torch.manual_seed(1)
    eps = torch.empty(T, 4, D, dtype=torch.float64).normal_()
    z_prev, expected = z0.expand(4, D), []
    for t in range(T):
        loc, s = comb(z_prev, h[:, t])
        z_prev = loc + s * eps[t]
        expected.append(z_prev)
    torch.testing.assert_close(z, torch.stack(expected, 1), **EXACT)


class _SplitCombiner:
    """A combiner with the optional prepare/step split; must agree with the plain call."""

    def __init__(self, F, G, b, L):
        self.F, self.G, self.b, self.L = F, G, b, L

    def prepare(self, h):
        return h @ self.G.T + self.b, self.L.expand(h.shape[:-1] + self.L.shape)

    def step(self, z, ctx):
        return z @ self.F.T + ctx[0], ctx[1]

    def __call__(self, z, h):
        return self.step(z, self.prepare(h))


def test_autoregressive_prepare_step_combiner_same_as_plain():
    D, H, T = 2, 3, 6
    F, G, b, L = _random_linear(D, H, tril=True)
    h = torch.randn(5, T, H, dtype=torch.float64)
    z0 = torch.zeros(D, dtype=torch.float64)
    split = AutoregressiveGaussianSequence(_SplitCombiner(F, G, b, L), h, z0, scale_tril=True)
    plain = AutoregressiveGaussianSequence(_linear_combiner(F, G, b, L), h, z0, scale_tril=True)
    torch.manual_seed(2)
    z1 = split.rsample((3,))
    torch.manual_seed(2)
    z2 = plain.rsample((3,))
    torch.testing.assert_close(z1, z2, **EXACT)
    torch.testing.assert_close(split.log_prob(z1), plain.log_prob(z1), **EXACT)


def test_autoregressive_gradients_through_rsample_and_log_prob_match_finite_differences():
    # d/dθ [sum(z) + log q(z)] with z = rsample(θ, fixed noise): autograd against central
    # finite differences (float64), through both the reparameterised sample and the density.
    h = torch.randn(3, 7, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def objective(weight, bias):
        def comb(z, h_t):
            out = torch.nn.functional.linear(
                torch.cat([z, h_t.expand(z.shape[:-1] + h_t.shape[-1:])], -1), weight, bias
            )
            return out[..., :2], torch.nn.functional.softplus(out[..., 2:]) + 1e-3

        d = AutoregressiveGaussianSequence(comb, h, torch.zeros(2, dtype=torch.float64))
        torch.manual_seed(1)  # the same noise on every call
        z = d.rsample()
        return z.sum() + d.log_prob(z).sum()

    g = torch.Generator().manual_seed(2)
    weight = (0.5 * torch.randn(4, 3, generator=g, dtype=torch.float64)).requires_grad_()
    bias = (0.5 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(objective, (weight, bias), eps=1e-6, atol=1e-6, rtol=1e-5)
    grad_w, _ = torch.autograd.grad(objective(weight, bias), (weight, bias))
    assert grad_w.abs().sum() > 0


@pytest.mark.parametrize("tril", [False, True])
def test_autoregressive_log_prob_of_own_sample_reuses_sampling_pass(tril):
    # the conditionals cached while sampling give the same log-density and gradients as a
    # fresh combiner pass over the shifted trajectory (a copy of the sample is not cached)
    D, H, T = 2, 3, 6
    F, G, b, L = _random_linear(D, H, tril=tril)
    G.requires_grad_(True)
    h = torch.randn(4, T, H, dtype=torch.float64)
    d = AutoregressiveGaussianSequence(_SplitCombiner(F, G, b, L), h,
                                       torch.zeros(D, dtype=torch.float64), scale_tril=tril)
    calls = []
    d.combiner = _CountingCombiner(d.combiner, calls)
    z = d.rsample((2,))
    cached = d.log_prob(z)
    assert calls == []  # no combiner pass for the sample itself
    fresh = d.log_prob(z.clone())
    assert calls == ["full"]
    torch.testing.assert_close(cached, fresh, **EXACT)
    g1, = torch.autograd.grad(cached.sum(), [G], retain_graph=True)
    g2, = torch.autograd.grad(fresh.sum(), [G])
    torch.testing.assert_close(g1, g2, **EXACT)


class _CountingCombiner:
    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls
        self.prepare, self.step = inner.prepare, inner.step

    def __call__(self, z, h):
        self.calls.append("full")
        return self.inner(z, h)


def test_autoregressive_expand_in_plate():
    comb = lambda z, h: (0.9 * z + h, torch.full_like(z, 0.5))
    d = AutoregressiveGaussianSequence(comb, torch.randn(1, 8, 2), torch.zeros(2))
    with pyro.plate("sequences", 5, dim=-1):
        z = pyro.sample("z", d)
    assert z.shape == (5, 8, 2)
    e = d.expand((5,))
    assert e.batch_shape == (5,) and e.log_prob(z).shape == (5,)
    torch.testing.assert_close(e.log_prob(z), d.log_prob(z))
    assert e.rsample((2,)).shape == (2, 5, 8, 2) and e.expand((3, 5)).sample().shape == (3, 5, 8, 2)
    assert d.expand((1,)) is d  # what pyro.plate does when the shape already matches
    with pytest.raises(ValueError, match="batch_shape"):
        e.expand((4,))


def test_autoregressive_validation():
    comb = lambda z, h: (z, torch.ones_like(z))
    d = AutoregressiveGaussianSequence(
        comb, torch.randn(2, 4, 1), torch.zeros(3), validate_args=True
    )
    assert d.event_shape == (4, 3)
    with pytest.raises(ValueError):
        d.log_prob(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="features"):
        AutoregressiveGaussianSequence(comb, torch.randn(4), torch.zeros(3))


# ------------------------------------------------------------------ SequentialSequenceDistribution
class _TinyLSTMPrior(torch.nn.Module):
    """p(z_t | z_<t) = N(mu(h_t), sigma(h_t)), h_t = LSTM(z_{t-1}, h_{t-1}): not Markov."""

    def __init__(self, D=2, H=5):
        super().__init__()
        self.lstm = torch.nn.LSTM(D, H, batch_first=True)
        self.head = torch.nn.Linear(H, 2 * D)
        self.D, self.H = D, H

    def _params(self, out):
        loc, raw = out.chunk(2, -1)
        return loc, torch.nn.functional.softplus(raw) + 1e-3

    def distribution(self, batch, T):
        D, H = self.D, self.H

        def log_prob_fn(z):  # one LSTM run over the shifted sequence [z_0, z_1, ..., z_{T-1}]
            flat = z.reshape(-1, T, D)
            h, _ = self.lstm(shift_sequence(flat, flat.new_zeros(D)))
            loc, scale = self._params(self.head(h))
            return dist.Normal(loc, scale).log_prob(flat).sum(-1).reshape(z.shape[:-1])

        def init_fn(shape):
            zeros = torch.zeros(1, shape.numel(), H, dtype=torch.float64)
            return torch.zeros(shape + (D,), dtype=torch.float64), (zeros, zeros)

        def step_fn(t, z_prev, state):  # one LSTM step, carrying (h, c)
            shape = z_prev.shape[:-1]
            h, state = self.lstm(z_prev.reshape(-1, 1, D), state)
            loc, scale = self._params(self.head(h[:, 0]))
            return dist.Normal(loc.reshape(shape + (D,)), scale.reshape(shape + (D,))).to_event(
                1
            ), state

        return SequentialSequenceDistribution(log_prob_fn, init_fn, step_fn, (batch,), (T, D))


def test_sequential_lstm_prior_log_prob_equals_step_loop():
    prior = _TinyLSTMPrior().double()
    d = prior.distribution(batch=3, T=6)
    z = d.rsample((2,))
    assert z.shape == (2, 3, 6, 2) and d.batch_shape == (3,) and d.event_shape == (6, 2)
    # log p(z) by carrying the LSTM state step by step
    z_prev, state = d.init_fn(torch.Size((2, 3)))
    expected = 0.0
    for t in range(6):
        step, state = d.step_fn(t, z_prev, state)
        expected = expected + step.log_prob(z[..., t, :])
        z_prev = z[..., t, :]
    torch.testing.assert_close(d.log_prob(z), expected, **EXACT)


def test_sequential_random_walk_mask_and_sample_shapes():
    D, T = 1, 5
    d = SequentialSequenceDistribution(
        log_prob_fn=lambda z: (
            dist.Normal(shift_sequence(z, z.new_zeros(D)), 1.0).log_prob(z).sum(-1)
        ),
        init_fn=lambda shape: (torch.zeros(shape + (D,)), None),
        step_fn=lambda t, z_prev, state: (dist.Normal(z_prev, 1.0).to_event(1), state),
        batch_shape=(2,),
        event_shape=(T, D),
        mask=torch.tensor([[True] * 5, [True] * 2 + [False] * 3]),
    )
    z = torch.ones(2, T, D)
    lp = d.log_prob(z)
    # steps: z_1 = 1 from 0 (residual 1), then residual 0
    c = -0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(lp, torch.tensor([5 * c - 0.5, 2 * c - 0.5]))
    assert d.sample((3,)).shape == (3, 2, T, D)
    with pytest.raises(ValueError, match="event_shape"):
        SequentialSequenceDistribution(None, None, None, (2,), (3,))


def test_sequential_log_prob_fn_shape_is_checked():
    d = SequentialSequenceDistribution(lambda z: z.sum(-1).sum(-1), None, None, (2,), (3, 1))
    with pytest.raises(ValueError, match="log_prob_fn"):
        d.log_prob(torch.zeros(2, 3, 1))


def test_shift_sequence():
    z = torch.arange(6.0).reshape(1, 3, 2)
    torch.testing.assert_close(
        shift_sequence(z, torch.tensor([-1.0, -2.0])),
        torch.tensor([[[-1.0, -2.0], [0.0, 1.0], [2.0, 3.0]]]),
    )
