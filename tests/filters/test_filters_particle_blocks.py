"""``particle_filter(..., resample_every=k)``: resampling considered every ``k`` steps, the
model's densities evaluated once per block. Checked against the step-by-step filter (the same
random numbers when nothing is resampled), for unbiasedness on an LGSSM (Monte Carlo, in
standard errors, against the Kalman filter), and through FIVO training."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyrossm import DeepMarkovModel, LinearGaussianSSM, LSTMStateSpaceModel
from pyrossm.filters import Gaussian, Proposal, as_state_space, particle_filter
from pyrossm.guides import StructuredGuide
from pyrossm.infer import fit
from pyrossm.infer.fivo import fivo_objective

K_SE = 4.0  # Monte Carlo tolerance in standard errors
DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _lgssm():
    return LinearGaussianSSM.from_matrices(
        A=[[0.9, 0.1], [0.0, 0.8]], C=[[1.0, 0.0], [0.5, 1.0]], Q=[[0.5, 0.1], [0.1, 0.3]],
        R=[[1.0, 0.2], [0.2, 0.5]], dtype=DT)


class _ShiftedPrior(Proposal):
    """The model's transition, widened and shifted: a valid but mismatched proposal."""

    def __init__(self, ssm, scale=1.3, shift=0.2):
        self.ssm, self.scale, self.shift = ssm, scale, shift

    def start(self, x, mask, num_particles):
        pass

    def step(self, t, z_prev):
        p = self.ssm.transition(z_prev if t > 0 else None)
        return Gaussian(p.loc + self.shift, p.scale * self.scale, tril=True)


def _nonlinear(kind, direction="backward"):
    torch.manual_seed(0)
    if kind == "lstm":
        model = LSTMStateSpaceModel(obs_dim=2, z_dim=2, rnn_dim=8, hidden_dim=8,
                                    emission_dim=8)
    else:
        model = DeepMarkovModel(obs_dim=2, z_dim=2, transition_dim=8, emission_dim=8,
                                emission="gaussian",
                                initial="learned" if kind == "dmm_learned" else "transition")
    guide = StructuredGuide(obs_dim=2, state_dim=2, hidden_dim=8, direction=direction)
    return model, guide


@pytest.mark.parametrize("kind", ["dmm", "dmm_learned", "lstm", "lgssm"])
@pytest.mark.parametrize("k", [2, 4, 11])
def test_blocks_equal_step_by_step_without_resampling(kind, k):
    """With ``ess_threshold=0`` nothing is resampled, the random numbers are drawn in the same
    order, and every output equals the step-by-step filter's (T = 11: a short last block)."""
    x = torch.randn(3, 11, 2, generator=torch.Generator().manual_seed(1))
    x[1, 4, 0] = math.nan  # a missing entry: the block's emission skips it too
    if kind == "lgssm":
        model = as_state_space(_lgssm())
        guide, x = _ShiftedPrior(model), x.to(DT)
    else:
        model, guide = _nonlinear(kind)
    out = []
    for every in (1, k):
        pyro.set_rng_seed(2)
        out.append(particle_filter(model, x, num_particles=5, guide=guide, ess_threshold=0.0,
                                   resample_every=every))
    a, b = out
    for name in a._fields:
        torch.testing.assert_close(getattr(b, name), getattr(a, name), msg=name)
    assert not bool(b.resampled.any())


@pytest.mark.parametrize("ess_threshold", [0.5, 1.0])
def test_blocked_estimate_of_p_x_is_unbiased(ess_threshold):
    """E[p̂(x)] = p(x) with resampling at block ends (k = 3, T = 10: blocks 3, 3, 3, 1) and a
    mismatched proposal; one whole step and one entry missing."""
    ssm = _lgssm()
    pyro.set_rng_seed(9)
    _, x = ssm.sample(10, num_samples=1)
    x[0, 3, 0] = math.nan
    x[0, 5] = math.nan
    exact = ssm.filter(x).log_likelihood
    S = 2000
    adapter = as_state_space(ssm)
    pyro.set_rng_seed(10)
    res = particle_filter(adapter, x.expand(S, -1, -1), num_particles=20,
                          guide=_ShiftedPrior(adapter), ess_threshold=ess_threshold,
                          resample_every=3)
    ratio = (res.log_likelihood - exact).exp()
    mean, se = float(ratio.mean()), float(ratio.std() / math.sqrt(S))
    assert abs(mean - 1.0) < K_SE * se, (mean, se)
    # resampling only after steps 2, 5, 8 (never after the last step)
    steps = res.resampled.any(0).nonzero().flatten().tolist()
    assert set(steps) <= {2, 5, 8} and steps, steps
    if ess_threshold == 1.0:
        assert bool(res.resampled[:, [2, 5, 8]].all())


def test_gaps_fall_back_to_step_by_step():
    ssm = as_state_space(_lgssm())
    x = torch.randn(2, 9, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4] = False  # a gap, not padding
    out = []
    for every in (1, 3):
        pyro.set_rng_seed(4)
        out.append(particle_filter(ssm, x, mask=mask, num_particles=6, guide=_ShiftedPrior(ssm),
                                   resample_every=every))
    torch.testing.assert_close(out[1].step_log_likelihoods, out[0].step_log_likelihoods)


@pytest.mark.parametrize("ess_threshold", [0.0, 0.5])
def test_right_padding_in_blocks_equals_the_truncated_sequence(ess_threshold):
    """A padded row gives the log-likelihood of its truncated sequence (the same random
    numbers up to its end), 0 per padded step, and no resampling past its end."""
    model, guide = _nonlinear("dmm", direction="forward")  # features of x_{<=t} only
    x = torch.randn(2, 10, 2, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    pyro.set_rng_seed(4)
    full = particle_filter(model, x, mask=mask, num_particles=6, guide=guide,
                           ess_threshold=ess_threshold, resample_every=3)
    pyro.set_rng_seed(4)
    cut = particle_filter(model, x[:, :7], num_particles=6, guide=guide,
                          ess_threshold=ess_threshold, resample_every=3)
    torch.testing.assert_close(full.step_log_likelihoods[:, :7], cut.step_log_likelihoods)
    assert float(full.step_log_likelihoods[1, 7:].detach().abs().max()) == 0.0
    torch.testing.assert_close(full.log_likelihood[1], cut.log_likelihood[1])
    torch.testing.assert_close(full.kl[1], cut.kl[1])
    assert not bool(full.resampled[1, 6:].any())


def test_blocked_fivo_gradients_and_fit():
    model, guide = _nonlinear("dmm")
    x = torch.randn(4, 12, 2, generator=torch.Generator().manual_seed(5))
    pyro.set_rng_seed(6)
    obj = fivo_objective(model, guide, x, num_particles=4, resample_every=4)
    obj.surrogate.backward()
    grads = [p.grad for p in list(model.parameters()) + list(guide.parameters())]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) > 0 for g in grads) > len(grads) // 2
    hist = fit(model, guide, x, epochs=3, batch_size=4, lr=0.02, num_particles=4,
               objective="fivo", resample_every=4, progress=False, seed=0)
    assert all(math.isfinite(v) for v in hist["train_neg_elbo_per_step"])


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_resample_every(bad):
    model, guide = _nonlinear("dmm")
    x = torch.randn(2, 5, 2)
    with pytest.raises(ValueError, match="resample_every"):
        particle_filter(model, x, num_particles=3, guide=guide, resample_every=bad)
    with pytest.raises(ValueError, match="resample_every"):
        fit(model, guide, x, epochs=1, batch_size=2, lr=0.01, objective="fivo",
            resample_every=bad, progress=False)


@pytest.mark.parametrize("every", [1, 4])
def test_a_step_with_zero_density_everywhere_gives_minus_inf_not_a_crash(every):
    """An observation no particle can explain (its squared residual overflows float32) makes
    that sequence's estimate -inf; the filter goes on (no NaN weights reach the resampler) and
    the other sequences stay finite."""
    ssm = LinearGaussianSSM.from_matrices(A=[[0.9]], C=[[1.0]], Q=[[0.5]], R=[[1.0]])
    pyro.set_rng_seed(0)
    _, x = ssm.sample(20, num_samples=3)
    x[1, 5, 0] = 1e20
    adapter = as_state_space(ssm)
    pyro.set_rng_seed(1)
    res = particle_filter(adapter, x, num_particles=50, guide=_ShiftedPrior(adapter),
                          ess_threshold=1.0, resample_every=every)
    assert float(res.log_likelihood[1]) == -math.inf
    assert bool(torch.isfinite(res.log_likelihood[[0, 2]]).all())
    assert bool(torch.isfinite(res.step_log_likelihoods[1, 6:]).all())


def test_resample_rejects_weights_without_mass():
    from pyrossm.filters import resample

    with pytest.raises(ValueError, match="log_weights: rows \\[1\\]"):
        resample(torch.tensor([[0.0, -1.0], [-math.inf, -math.inf]]))
