"""Issue 4 models: shapes, masks, missing data, vectorized = step-by-step, sampling, forecasts."""

import pyro
import pytest
import torch
from pyro import poutine

from pyrossm.nonlinear import DeepMarkovModel, LSTMStateSpaceModel, TrajectoryPrior
from pyrossm.protocol import lengths_to_mask

from .helpers import MeanFieldGuide, stepwise_model

ATOL = 1e-9  # float64 exactness
OBS_DIM, Z_DIM, T = 5, 3, 7
LENGTHS = torch.tensor([7, 5, 3, 1])


def make_model(kind, emission):
    if kind in ("dmm", "dmm_learned_init"):
        initial = "learned" if kind == "dmm_learned_init" else "transition"
        m = DeepMarkovModel(OBS_DIM, Z_DIM, transition_dim=8, emission_dim=8, emission=emission,
                            initial=initial)
        if initial == "learned":  # away from N(0, I), so that mixing it up would show
            with torch.no_grad():
                m.dynamics.z_1_loc.normal_()
                m.dynamics.z_1_scale_raw.normal_()
    else:
        m = LSTMStateSpaceModel(OBS_DIM, Z_DIM, rnn_dim=8, emission=emission, emission_dim=8,
                                hidden_dim=8)
    return m.double()


def make_data(emission, batch=4, steps=T):
    if emission == "categorical":
        return torch.randint(0, OBS_DIM, (batch, steps))
    x = torch.randn(batch, steps, OBS_DIM, dtype=torch.float64)
    return (x > 0).double() if emission == "bernoulli" else x


MODELS = [(k, e) for k in ("dmm", "lstm") for e in ("gaussian", "bernoulli", "categorical")]
MODELS.append(("dmm_learned_init", "gaussian"))


def joint_log_prob(model, x, mask, z):
    """log p(x, z) per sequence, (batch,), with the latent site conditioned on ``z``."""
    tr = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x, mask)
    tr.compute_log_prob()
    return tr.nodes["z"]["log_prob"] + tr.nodes["x"]["log_prob"]


@pytest.mark.parametrize("kind,emission", MODELS)
def test_site_shapes_follow_protocol(kind, emission):
    model = make_model(kind, emission)
    x, mask = make_data(emission), lengths_to_mask(LENGTHS)
    tr = poutine.trace(model).get_trace(x, mask)
    tr.compute_log_prob()
    z_site, x_site = tr.nodes["z"], tr.nodes["x"]
    assert z_site["fn"].batch_shape == (4,) and z_site["fn"].event_shape == (T, Z_DIM)
    assert z_site["log_prob"].shape == (4,) and x_site["log_prob"].shape == (4,)
    assert x_site["is_observed"] and not z_site["is_observed"]
    assert [f.name for f in z_site["cond_indep_stack"]] == ["sequences"]


@pytest.mark.parametrize("kind,emission", MODELS)
def test_padding_contributes_nothing(kind, emission):
    """log p(x, z) of a padded batch = that of each sequence alone; padding values don't matter."""
    model = make_model(kind, emission)
    x, mask = make_data(emission), lengths_to_mask(LENGTHS)
    z = torch.randn(4, T, Z_DIM, dtype=torch.float64)
    padded = joint_log_prob(model, x, mask, z)
    # scramble the padding of both x and z
    x2, z2 = x.clone(), z.clone()
    pad = ~mask
    x2[pad] = make_data(emission)[pad]
    z2[pad] = 100 * torch.randn_like(z)[pad]
    assert torch.allclose(joint_log_prob(model, x2, mask, z2), padded, atol=ATOL)
    for b, length in enumerate(LENGTHS.tolist()):
        alone = joint_log_prob(model, x[b : b + 1, :length], None, z[b : b + 1, :length])
        assert torch.allclose(alone, padded[b : b + 1], atol=ATOL)


@pytest.mark.parametrize("kind", ["dmm", "lstm"])
def test_nan_is_missing_entry(kind):
    """A NaN entry removes exactly its emission factor; gradients stay finite."""
    model = make_model(kind, "gaussian")
    x = make_data("gaussian")
    z = torch.randn(4, T, Z_DIM, dtype=torch.float64)
    full = joint_log_prob(model, x, None, z)
    x_nan = x.clone()
    x_nan[1, 2, 3] = float("nan")
    x_nan[2, 4] = float("nan")  # a whole step missing
    with_nan = joint_log_prob(model, x_nan, None, z)
    point = model.emitter(z).log_prob(x)
    expected = full.clone()
    expected[1] -= point[1, 2, 3]
    expected[2] -= point[2, 4].sum()
    assert torch.allclose(with_nan, expected, atol=ATOL)
    with_nan.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["dmm", "dmm_learned_init", "lstm"])
def test_vectorized_log_prob_equals_step_by_step(kind):
    """TrajectoryPrior.log_prob (one batched call) = the sum of the sequential conditionals."""
    model = make_model(kind, "gaussian")
    z = torch.randn(4, T, Z_DIM, dtype=torch.float64)
    mask = lengths_to_mask(LENGTHS)
    prior = model.prior(4, T, mask)
    state = model.dynamics.initial_state(4, z)
    expected = torch.zeros(4, dtype=torch.float64)
    for t in range(T):
        loc, scale = model.dynamics.predict(state)
        lp = torch.distributions.Normal(loc, scale).log_prob(z[:, t]).sum(-1)
        expected += torch.where(mask[:, t], lp, torch.zeros_like(lp))
        state = model.dynamics.update(state, z[:, t])
    assert torch.allclose(prior.log_prob(z), expected, atol=ATOL)


@pytest.mark.parametrize("kind,emission", [("dmm", "bernoulli"), ("lstm", "gaussian")])
def test_one_site_model_equals_per_step_pyro_markov_model(kind, emission):
    """The one-site model and the classic one-site-per-step model give the same log joint."""
    model = make_model(kind, emission)
    x, mask = make_data(emission), lengths_to_mask(LENGTHS)
    z = torch.randn(4, T, Z_DIM, dtype=torch.float64)
    ours = joint_log_prob(model, x, mask, z).sum()
    data = {f"z_{t + 1}": z[:, t] for t in range(T)}
    tr = poutine.trace(poutine.condition(stepwise_model, data=data)).get_trace(model, x, mask)
    assert torch.allclose(ours, tr.log_prob_sum(), atol=ATOL)


@pytest.mark.parametrize("kind,emission", MODELS)
def test_sample_shapes_and_seed_determinism(kind, emission):
    model = make_model(kind, emission)
    pyro.set_rng_seed(3)
    z, x = model.sample(num_steps=6, num_samples=2)
    assert z.shape == (2, 6, Z_DIM)
    assert x.shape == ((2, 6) if emission == "categorical" else (2, 6, OBS_DIM))
    pyro.set_rng_seed(3)
    z2, x2 = model.sample(num_steps=6, num_samples=2)
    assert torch.equal(z, z2) and torch.equal(x, x2)
    pyro.set_rng_seed(4)
    assert not torch.equal(model.sample(num_steps=6, num_samples=2).z, z)


@pytest.mark.parametrize("kind,emission", MODELS)
def test_forecast_and_reconstruct_shapes(kind, emission):
    model = make_model(kind, emission)
    guide = MeanFieldGuide(OBS_DIM, Z_DIM).double()
    x, mask = make_data(emission), lengths_to_mask(LENGTHS)
    pyro.set_rng_seed(1)
    fc = model.forecast(x, horizon=3, num_samples=5, guide=guide, mask=mask)
    assert fc.z.shape == (5, 4, 3, Z_DIM)
    assert fc.emission_means.shape == (5, 4, 3, OBS_DIM) and fc.mean.shape == (4, 3, OBS_DIM)
    assert torch.allclose(fc.mean, fc.emission_means.mean(0)) and fc.covariance is None
    assert fc.samples.shape == ((5, 4, 3) if emission == "categorical" else (5, 4, 3, OBS_DIM))
    pyro.set_rng_seed(1)
    assert torch.equal(model.forecast(x, 3, 5, guide, mask=mask).samples, fc.samples)
    rec = model.reconstruct(x, guide, mask=mask, num_samples=2)
    assert rec.z.shape == (2, 4, T, Z_DIM) and rec.means.shape == (2, 4, T, OBS_DIM)


@pytest.mark.parametrize("kind", ["dmm", "dmm_learned_init", "lstm"])
def test_state_after_prefix_equals_stepping(kind):
    """Forecasts continue from each sequence's own last real step (right padding ignored)."""
    model = make_model(kind, "gaussian")
    z = torch.randn(5, T, Z_DIM, dtype=torch.float64)
    lengths = torch.cat([LENGTHS, torch.tensor([0])])  # 0: nothing seen, the first step next
    state = model.dynamics.state_after(z, lengths)
    loc, scale = model.dynamics.predict(state)
    for b, length in enumerate(lengths.tolist()):
        s = model.dynamics.initial_state(1, z)
        for t in range(length):
            s = model.dynamics.update(s, z[b : b + 1, t])
        loc_b, scale_b = model.dynamics.predict(s)
        assert torch.allclose(loc[b], loc_b[0], atol=ATOL)
        assert torch.allclose(scale[b], scale_b[0], atol=ATOL)


def test_learned_initial_state_is_its_own_distribution():
    model = make_model("dmm_learned_init", "gaussian")
    z = torch.randn(4, T, Z_DIM, dtype=torch.float64)
    loc, scale = model.dynamics.trajectory_params(z)
    loc1 = model.dynamics.z_1_loc
    scale1 = torch.nn.functional.softplus(model.dynamics.z_1_scale_raw) + 1e-3
    assert torch.allclose(loc[:, 0], loc1.expand(4, -1)) and torch.allclose(scale[:, 0],
                                                                            scale1.expand(4, -1))
    later = model.dynamics.transition(z[:, :-1])
    assert torch.allclose(loc[:, 1:], later[0]) and torch.allclose(scale[:, 1:], later[1])
    with pytest.raises(ValueError, match="initial"):
        DeepMarkovModel(OBS_DIM, Z_DIM, initial="zero")


def test_gated_transition_starts_near_identity():
    """The linear path is the identity at initialisation (Krishnan et al. 2017)."""
    model = DeepMarkovModel(4, 3, transition_dim=5, emission_dim=5)
    assert torch.equal(model.dynamics.transition.linear.weight, torch.eye(3))
    assert torch.equal(model.dynamics.transition.linear.bias, torch.zeros(3))


def test_prior_sample_moments_match_conditionals():
    """Monte Carlo: the first step of a prior sample has the predicted mean (within 5 s.e.)."""
    model = make_model("lstm", "gaussian")
    n = 4000
    z = model.prior(n, 2).rsample().detach()
    loc, scale = model.dynamics.predict(model.dynamics.initial_state(1, z))
    se = scale[0] / n**0.5
    assert ((z[:, 0].mean(0) - loc[0]).abs() < 5 * se).all()


def test_bad_input_names_the_argument():
    model = make_model("dmm", "gaussian")
    with pytest.raises(ValueError, match="mask"):
        model.model(make_data("gaussian"), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="x"):
        model.model(torch.randn(4, T, OBS_DIM + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="emission"):
        DeepMarkovModel(3, 2, emission="poisson")
    with pytest.raises(ValueError, match="guide"):
        model.forecast(make_data("gaussian"), horizon=2)
    with pytest.raises(ValueError, match="mask"):
        TrajectoryPrior(model.dynamics, 2, 3, mask=torch.ones(3, 3, dtype=torch.bool))
