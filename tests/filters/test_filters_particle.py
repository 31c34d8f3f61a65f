"""Particle filters: unbiased p̂(x) and convergence to the Kalman log-likelihood; guided filters.

Monte Carlo checks state their tolerance in standard errors of the mean over independent runs
(``K_SE``): ``E[p̂(x) / p(x)] = 1`` for the unbiased estimate, checked with the ratio's sample
mean over ``S`` independent filters (the batch holds ``S`` copies of one sequence).
"""

import math

import pyro
import pytest
import torch

from pyrossm import DeepMarkovModel, LinearGaussianSSM, LSTMStateSpaceModel
from pyrossm.filters import Gaussian, Proposal, particle_filter, resample
from pyrossm.guides import FilteringLSTMGuide, StructuredGuide

K_SE = 4.0  # Monte Carlo tolerance in standard errors
DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")



def _lgssm():
    return LinearGaussianSSM.from_matrices(
        A=[[0.9, 0.1], [0.0, 0.8]], C=[[1.0, 0.0], [0.5, 1.0]], Q=[[0.5, 0.1], [0.1, 0.3]],
        R=[[1.0, 0.2], [0.2, 0.5]], dtype=DT)


def _data(ssm, T, seed, missing=True):
    pyro.set_rng_seed(seed)
    _, x = ssm.sample(T, num_samples=1)
    mask = torch.ones(1, T, dtype=torch.bool)
    if missing:
        x[0, 3, 0] = math.nan  # one entry
        x[0, 5] = math.nan  # a whole step
        mask[0, T - 3:] = False  # right padding
    return x, mask


def _ratio_mean_and_se(log_z, exact):
    ratio = (log_z - exact).exp()
    return float(ratio.mean()), float(ratio.std() / math.sqrt(len(ratio)))


@pytest.mark.parametrize("resampling", ["systematic", "stratified", "multinomial"])
@pytest.mark.parametrize("ess_threshold", [0.5, 1.0])
def test_estimate_of_p_x_is_unbiased_on_an_lgssm(resampling, ess_threshold):
    ssm = _lgssm()
    x, mask = _data(ssm, 10, seed=1)
    exact = ssm.filter(x, mask=mask).log_likelihood
    S = 1500
    pyro.set_rng_seed(2)
    res = particle_filter(ssm, x.expand(S, -1, -1), mask=mask.expand(S, -1), num_particles=30,
                          resampling=resampling, ess_threshold=ess_threshold)
    mean, se = _ratio_mean_and_se(res.log_likelihood, exact)
    assert abs(mean - 1.0) < K_SE * se, (mean, se)
    assert bool(res.resampled.any()) and not bool(res.resampled[:, -1].any())


def test_log_likelihood_converges_to_kalman_with_n():
    """Mean |log p̂ - log p| per step over 4 sequences shrinks with N; at N = 1000 (T = 100,
    held-out sequences) it is within 0.01 nats per step of the Kalman value."""
    ssm = _lgssm()
    pyro.set_rng_seed(3)
    _, x = ssm.sample(100, num_samples=4)
    exact = ssm.filter(x).log_likelihood
    errors = {}
    for N in (30, 1000):
        pyro.set_rng_seed(4)
        ll = particle_filter(ssm, x, num_particles=N).log_likelihood
        errors[N] = float(((ll - exact).abs() / 100).mean())
    assert errors[1000] < 0.5 * errors[30], errors
    assert errors[1000] < 0.01, errors


def test_masked_step_equals_nan_step():
    ssm = _lgssm()
    x, _ = _data(ssm, 10, seed=5, missing=False)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 4] = False
    x_nan = x.clone()
    x_nan[0, 4] = math.nan
    pyro.set_rng_seed(6)
    a = particle_filter(ssm, x, mask=mask, num_particles=64)
    pyro.set_rng_seed(6)
    b = particle_filter(ssm, x_nan, num_particles=64)
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood)
    assert float(a.step_log_likelihoods[0, 4]) == 0.0


class _PriorProposal(Proposal):
    """The model's own transition, as a user-written proposal (for the guided code path)."""

    def __init__(self, ssm, scale=1.0, shift=0.0):
        self.ssm, self.scale, self.shift = ssm, scale, shift

    def start(self, x, mask, num_particles):  # the adapter was started by particle_filter
        pass

    def step(self, t, z_prev):
        p = self.ssm.transition(z_prev if t > 0 else None)
        return Gaussian(p.loc + self.shift, p.scale * self.scale, tril=True)


def test_guided_filter_with_the_prior_as_proposal_is_the_bootstrap_filter():
    from pyrossm.filters import as_state_space

    ssm = _lgssm()
    x, mask = _data(ssm, 15, seed=7)
    adapter = as_state_space(ssm)
    pyro.set_rng_seed(8)
    boot = particle_filter(ssm, x.expand(3, -1, -1), mask=mask.expand(3, -1), num_particles=40)
    pyro.set_rng_seed(8)
    guided = particle_filter(adapter, x.expand(3, -1, -1), mask=mask.expand(3, -1),
                             num_particles=40, guide=_PriorProposal(adapter))
    # same random draws up to the masked steps (where the guided path draws extra noise)
    torch.testing.assert_close(guided.step_log_likelihoods[:, :12],
                               boot.step_log_likelihoods[:, :12], rtol=1e-12, atol=1e-12)
    assert float(guided.kl.abs().max()) < 1e-12


def test_guided_filter_is_unbiased_with_a_mismatched_proposal():
    from pyrossm.filters import as_state_space

    ssm = _lgssm()
    x, mask = _data(ssm, 8, seed=9)
    exact = ssm.filter(x, mask=mask).log_likelihood
    S = 2000
    adapter = as_state_space(ssm)
    pyro.set_rng_seed(10)
    res = particle_filter(adapter, x.expand(S, -1, -1), mask=mask.expand(S, -1),
                          num_particles=50, guide=_PriorProposal(adapter, scale=1.3, shift=0.2))
    mean, se = _ratio_mean_and_se(res.log_likelihood, exact)
    assert abs(mean - 1.0) < K_SE * se, (mean, se)


@pytest.mark.parametrize("kind", ["dmm", "dmm_learned", "lstm"])
def test_resampling_keeps_recurrent_states_with_their_particles(kind):
    """On a small DMM / LSTM-SSM, resampling at every step (states gathered) and plain
    importance sampling with many particles (no resampling) estimate the same p(x)."""
    torch.manual_seed(0)
    if kind == "lstm":
        model = LSTMStateSpaceModel(obs_dim=2, z_dim=2, rnn_dim=8, emission_dim=8, hidden_dim=8)
    else:
        model = DeepMarkovModel(obs_dim=2, z_dim=2, transition_dim=8, emission_dim=8,
                                emission="gaussian",
                                initial="learned" if kind == "dmm_learned" else "transition")
    model = model.double()
    with torch.no_grad():
        _, x = model.sample(4, num_samples=1)
        reference = particle_filter(model, x.expand(2, -1, -1), num_particles=20_000,
                                    ess_threshold=0.0).log_likelihood.logsumexp(0) - math.log(2)
        S = 500
        res = particle_filter(model, x.expand(S, -1, -1), num_particles=10, ess_threshold=1.0)
    assert bool(res.resampled[:, :-1].all())
    mean, se = _ratio_mean_and_se(res.log_likelihood, reference)
    assert abs(mean - 1.0) < K_SE * se + 0.01, (mean, se)


@pytest.mark.parametrize("guide_kind", ["structured", "structured_linear", "filtering"])
def test_guides_as_proposals_give_gradients(guide_kind):
    model = DeepMarkovModel(obs_dim=2, z_dim=3, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    if guide_kind == "filtering":
        guide = FilteringLSTMGuide(obs_dim=2, state_dim=3, hidden_dim=8)
    else:
        guide = StructuredGuide(obs_dim=2, state_dim=3, hidden_dim=8,
                                combiner="linear" if guide_kind.endswith("linear") else "nonlinear")
    x = torch.randn(4, 7, 2)
    x[0, 2, 1] = math.nan
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 5:] = False
    res = particle_filter(model, x, mask=mask, num_particles=8, guide=guide)
    assert res.log_likelihood.shape == (4,) and res.filtered_means.shape == (4, 7, 3)
    res.log_likelihood.sum().backward()
    for module in (model, guide):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((res.step_log_likelihoods[1, 5:] == 0).all())


def test_categorical_emission_with_missing_ids():
    model = DeepMarkovModel(obs_dim=5, z_dim=2, transition_dim=8, emission_dim=8,
                            emission="categorical")
    ids = torch.randint(0, 5, (3, 6))
    ids[0, 2] = -1
    res = particle_filter(model, ids, num_particles=16)
    assert res.log_likelihood.shape == (3,)
    assert float(res.step_log_likelihoods[0, 2].detach()) == 0.0


def test_resample_schemes():
    lw = torch.log(torch.tensor([[0.1, 0.6, 0.3]] * 20000))
    for method in ("systematic", "stratified", "multinomial"):
        idx = resample(lw, method)
        counts = torch.stack([(idx == i).float().mean() for i in range(3)])
        torch.testing.assert_close(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.01, rtol=0)
    # systematic: each particle is copied floor(N w) or ceil(N w) times
    idx = resample(torch.log(torch.tensor([[0.25, 0.5, 0.25, 0.0]])), "systematic")
    assert sorted(idx[0].tolist()) == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_particles=0), "num_particles"),
        (dict(ess_threshold=1.5), "ess_threshold"),
        (dict(resampling="residual"), "resampling"),
        (dict(mask=torch.ones(2, 3)), "mask"),
        (dict(x=torch.zeros(5)), "x: expected"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(model=_lgssm(), x=torch.zeros(2, 4, 2, dtype=DT))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        particle_filter(**args)


def test_bad_model_and_guide():
    with pytest.raises(TypeError, match="model: expected"):
        particle_filter(torch.nn.Linear(2, 2), torch.zeros(1, 3, 2))
    with pytest.raises(TypeError, match="guide: expected"):
        particle_filter(_lgssm(), torch.zeros(1, 3, 2, dtype=DT), guide=object())


def test_a_users_state_space_model_subclass():
    """Any pyrossm.protocol.StateSpaceModel works; here an LGSSM written as one, checked
    against the Kalman filter (mean |error| per step over 4 sequences at N = 2000)."""
    import pyro.distributions as dist

    from pyrossm.protocol import StateSpaceModel

    ssm = _lgssm()
    A, C, Q, R, m0, P0 = (ssm.matrices()[k] for k in ("A", "C", "Q", "R", "init_mean",
                                                        "init_cov"))

    class LinearAsProtocol(StateSpaceModel):
        obs_dim, z_dim = 2, 2

        def initial_state(self, batch_size, like):
            return None, batch_size

        def transition(self, state):
            z_prev, rows = state
            if z_prev is None:
                return dist.MultivariateNormal(m0.expand(rows, 2), P0)
            return dist.MultivariateNormal(z_prev @ A.T, Q)

        def update(self, state, z_t):
            return z_t, z_t.shape[0]

        def emission(self, z):
            return dist.Normal(z @ C.T, R.diagonal().sqrt())

    # the emission above is diagonal: compare with the Kalman filter of the diagonal-R model
    diag = LinearGaussianSSM.from_matrices(A=A, C=C, Q=Q, R=torch.diag(R.diagonal()),
                                           dtype=DT)
    pyro.set_rng_seed(11)
    _, x = diag.sample(30, num_samples=4)
    exact = diag.filter(x).log_likelihood
    pyro.set_rng_seed(12)
    ll = particle_filter(LinearAsProtocol(), x, num_particles=2000).log_likelihood
    assert float(((ll - exact).abs() / 30).mean()) < 0.01
