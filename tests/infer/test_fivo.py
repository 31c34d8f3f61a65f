"""FIVO / AESMC objective, ``fit(objective="fivo")`` and the SMC evaluator.

Monte Carlo tolerances are in standard errors (``K_SE``) or stated per step.
"""

import math

import pyro
import pytest
import torch

from pyrossm import DeepMarkovModel, LinearGaussianSSM, StructuredGuide
from pyrossm.filters import particle_filter
from pyrossm.guides import FilteringLSTMGuide
from pyrossm.infer import fit
from pyrossm.infer.evaluate import log_likelihood, smc_log_likelihood
from pyrossm.infer.fivo import fivo_objective

K_SE = 4.0

pytestmark = pytest.mark.usefixtures("one_thread")



def _true_lgssm():
    return LinearGaussianSSM.from_matrices(A=[[0.9, 0.2], [-0.1, 0.8]], C=[[1.0, 0.3]],
                                           Q=[[0.3, 0.0], [0.0, 0.2]], R=[[0.4]])


def _data(num=16, T=30, seed=0):
    pyro.set_rng_seed(seed)
    _, x = _true_lgssm().sample(T, num_samples=num)
    return x


@pytest.mark.parametrize("guide_kind", [None, "structured", "filtering"])
def test_objective_value_is_the_particle_filter_estimate(guide_kind):
    model = DeepMarkovModel(obs_dim=1, z_dim=2, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    guide = {None: None,
             "structured": StructuredGuide(obs_dim=1, state_dim=2, hidden_dim=8),
             "filtering": FilteringLSTMGuide(obs_dim=1, state_dim=2, hidden_dim=8)}[guide_kind]
    x = _data(num=3, T=12)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 9:] = False
    pyro.set_rng_seed(1)
    obj = fivo_objective(model, guide, x, mask, num_particles=6)
    pyro.set_rng_seed(1)
    ref = particle_filter(model, x, mask=mask, num_particles=6, guide=guide)
    torch.testing.assert_close(obj.log_likelihood, ref.log_likelihood)
    torch.testing.assert_close(-obj.surrogate, ref.log_likelihood.sum())
    assert float(obj.neg_elbo) == float(obj.loss) == float(-ref.log_likelihood.sum().detach())
    assert not obj.loss.requires_grad and obj.surrogate.requires_grad


def test_fivo_gradient_steps_improve_the_smc_log_likelihood():
    """Adam on FIVO (K = 8, structured linear guide) for a mis-initialised LGSSM: the SMC
    estimate of the held-out log-likelihood and the exact Kalman value both go up."""
    x, x_test = _data(seed=2), _data(num=8, seed=3)
    model = LinearGaussianSSM(state_dim=2, obs_dim=1)
    guide = StructuredGuide(obs_dim=1, state_dim=2, hidden_dim=8, combiner="linear",
                            cell="linear")
    params = list(model.parameters()) + list(guide.parameters())
    opt = torch.optim.Adam(params, lr=0.03)

    def score():
        pyro.set_rng_seed(4)
        return float(smc_log_likelihood(model, x_test, num_particles=500).mean())

    before, exact_before = score(), float(model.log_prob(x_test).mean().detach())
    for step in range(30):
        opt.zero_grad()
        pyro.set_rng_seed(100 + step)
        fivo_objective(model, guide, x, num_particles=8).surrogate.backward()
        opt.step()
    after, exact_after = score(), float(model.log_prob(x_test).mean().detach())
    assert after > before + 1.0, (before, after)
    assert exact_after > exact_before + 1.0, (exact_before, exact_after)


def test_fit_with_the_fivo_objective():
    x = _data(num=16, T=20, seed=5)
    model = DeepMarkovModel(obs_dim=1, z_dim=2, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    guide = StructuredGuide(obs_dim=1, state_dim=2, hidden_dim=8)
    hist = fit(model, guide, x, epochs=4, batch_size=8, lr=0.02, num_particles=4,
               objective="fivo", progress=False, seed=0)
    values = hist["train_neg_elbo_per_step"]
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0]
    with pytest.raises(ValueError, match="objective"):
        fit(model, guide, x, epochs=1, batch_size=8, lr=0.01, objective="iwae", progress=False)


def test_smc_log_likelihood_is_close_to_kalman_and_batches_consistently():
    ssm = _true_lgssm()
    x = _data(num=6, T=40, seed=6)
    exact = ssm.log_prob(x)
    pyro.set_rng_seed(7)
    est = smc_log_likelihood(ssm, x, num_particles=2000, batch_size=4)
    assert est.shape == (6,)
    assert float(((est - exact).abs() / 40).max()) < 0.01  # nats per step
    pyro.set_rng_seed(7)
    again = smc_log_likelihood(ssm.model, x, num_particles=2000, batch_size=4)  # bound method
    torch.testing.assert_close(est, again)


def test_smc_estimate_beside_elbo_and_iwae():
    """The three estimates on an untrained DMM with its guide: SMC with the guide as proposal
    and IWAE both lie above the ELBO on average (they are tighter bounds)."""
    from pyrossm.infer.evaluate import elbo

    torch.manual_seed(0)
    model = DeepMarkovModel(obs_dim=1, z_dim=2, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    guide = StructuredGuide(obs_dim=1, state_dim=2, hidden_dim=8)
    x = _data(num=8, T=15, seed=8)
    pyro.set_rng_seed(9)
    e = elbo(model, guide, x, num_samples=50)
    iw = log_likelihood(model, guide, x, num_samples=200)
    smc = smc_log_likelihood(model, x, num_particles=200, guide=guide)
    assert float(smc.mean()) > float(e.mean()) and float(iw.mean()) > float(e.mean())


def test_smc_log_likelihood_bad_input():
    with pytest.raises(ValueError, match="num_particles"):
        smc_log_likelihood(_true_lgssm(), _data(num=2, T=5), num_particles=0)


def test_fivo_model_elbo_guide_routes_each_gradient():
    """``guide_objective="elbo"``: the model's parameters get FIVO's gradient and the guide's
    the one-particle ELBO's, the same random numbers drawn in the same order."""
    from pyrossm.infer.handlers import elbo_objective, elbo_traces
    from pyrossm.infer.loop import step_objective

    model = DeepMarkovModel(obs_dim=1, z_dim=2, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    guide = StructuredGuide(obs_dim=1, state_dim=2, hidden_dim=8)
    x = _data(num=4, T=10)
    mp, gp = list(model.parameters()), list(guide.parameters())
    pyro.set_rng_seed(3)
    _, obj = step_objective("fivo", model, guide, x, None, 5, 1.0, None, "sequence", "elbo")
    obj.surrogate.backward()
    got = [p.grad.clone() for p in mp + gp]
    pyro.set_rng_seed(3)
    fivo = fivo_objective(model, guide, x, None, num_particles=5)
    g_model = torch.autograd.grad(fivo.surrogate, mp)
    elbo = elbo_objective(*elbo_traces(model, guide, x, None, 1, 1.0), 1, 1.0, None)
    g_guide = torch.autograd.grad(elbo.surrogate, gp)
    for a, b in zip(got, list(g_model) + list(g_guide), strict=True):
        torch.testing.assert_close(a, b)
    assert float(obj.loss) == float(fivo.loss)  # the reported value is FIVO's
    g_fivo_guide = torch.autograd.grad(
        fivo_objective(model, guide, x, None, num_particles=5).surrogate, gp[0])[0]
    assert not torch.allclose(g_fivo_guide, got[len(mp)])  # the guide's is not FIVO's


def test_fit_fivo_with_elbo_guide_and_bad_guide_objective():
    model = DeepMarkovModel(obs_dim=1, z_dim=2, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    guide = StructuredGuide(obs_dim=1, state_dim=2, hidden_dim=8)
    hist = fit(model, guide, _data(num=8, T=10), epochs=2, batch_size=4, lr=0.01,
               num_particles=4, objective="fivo", guide_objective="elbo", progress=False,
               seed=0, device="cpu")
    assert len(hist.records) == 2 and all(math.isfinite(v) for v in hist["train_neg_elbo"])
    with pytest.raises(ValueError, match="guide_objective"):
        fit(model, guide, _data(num=8, T=10), epochs=1, batch_size=4, lr=0.01,
            objective="fivo", guide_objective="iwae", progress=False)
