"""pyrossm.infer.evaluate: the one evaluation path (ELBO, IWAE, SMC) and the one "per step"."""

import pyro
import pytest
import torch

from pyrossm.guides import StructuredGuide
from pyrossm.infer import elbo, evaluate, log_likelihood, observed_steps, smc_log_likelihood
from pyrossm.lgssm import LinearGaussianSSM
from pyrossm.protocol import lengths_to_mask

F64 = torch.float64


def _problem():
    torch.manual_seed(0)
    ssm = LinearGaussianSSM.from_matrices(A=[[0.8]], C=[[1.0], [0.5]], Q=[[0.3]],
                                          R=[[0.5, 0.0], [0.0, 0.4]], dtype=F64)
    _, x = ssm.sample(12, num_samples=5)
    x[0, 3] = float("nan")        # a step with nothing observed
    x[1, 4, 0] = float("nan")     # a partially observed step (still observed)
    mask = lengths_to_mask(torch.tensor([12, 12, 9, 12, 5]), 12)
    guide = StructuredGuide(2, 1, hidden_dim=4, direction="backward").double()
    return ssm, guide, x, mask


def test_observed_steps_excludes_padding_and_empty_steps():
    _, _, x, mask = _problem()
    assert observed_steps((x, mask)).tolist() == [11, 12, 9, 12, 5]
    tokens = torch.tensor([[3, 4, 0], [5, 0, 0]])
    assert observed_steps((tokens, tokens > 0)).tolist() == [2, 1]


def test_evaluate_equals_the_separate_estimators_and_divides_by_observed_steps():
    ssm, guide, x, mask = _problem()
    pyro.set_rng_seed(1)
    ev = evaluate(ssm.model, guide, (x, mask), num_samples=7, elbo_samples=3, smc_particles=50)
    pyro.set_rng_seed(1)
    e = elbo(ssm.model, guide, (x, mask), num_samples=3)
    iwae = log_likelihood(ssm.model, guide, (x, mask), num_samples=7)
    smc = smc_log_likelihood(ssm.model, (x, mask), num_particles=50, guide=guide)
    torch.testing.assert_close(ev.elbo, e, rtol=0, atol=0)
    torch.testing.assert_close(ev.log_likelihood, iwae, rtol=0, atol=0)
    torch.testing.assert_close(ev.smc, smc, rtol=0, atol=0)
    assert ev.log_likelihood_per_step == pytest.approx(float(iwae.sum()) / 49, rel=1e-12)
    assert ev.elbo_per_step == pytest.approx(float(e.sum()) / 49, rel=1e-12)
    assert ev.num_steps.tolist() == [11, 12, 9, 12, 5]


def test_smc_per_step_tends_to_the_exact_value():
    ssm, guide, x, mask = _problem()
    exact = float(ssm.log_prob(x, mask).sum()) / 49
    pyro.set_rng_seed(2)
    ev = evaluate(ssm.model, guide, (x, mask), num_samples=2, smc_particles=4000)
    # bootstrap-quality proposal on 12 steps: a few thousand particles are within 0.02 nats/step
    assert abs(ev.smc_per_step - exact) < 0.02
    assert ev.smc_per_step <= exact + 0.02


def test_smc_with_a_guide_that_cannot_propose_falls_back_to_the_bootstrap():
    from pyrossm.guides import ConjugateGuide

    ssm, _, x, mask = _problem()
    guide = ConjugateGuide(2, 1, transition=ssm).double()
    pyro.set_rng_seed(3)
    ev = evaluate(ssm.model, guide, (x, mask), num_samples=2, smc_particles=50)
    pyro.set_rng_seed(3)
    elbo(ssm.model, guide, (x, mask), num_samples=1)
    log_likelihood(ssm.model, guide, (x, mask), num_samples=2)
    bootstrap = smc_log_likelihood(ssm.model, (x, mask), num_particles=50)
    torch.testing.assert_close(ev.smc, bootstrap, rtol=0, atol=0)


def test_a_list_of_numpy_sequences_is_a_padded_dataset():
    import numpy as np

    from pyrossm.infer import as_dataset

    data = as_dataset([np.ones((4, 2)), np.full((2, 2), np.nan), np.zeros((3, 2))])
    assert data.x.shape == (3, 4, 2) and data.x.dtype == torch.float64
    assert data.lengths.tolist() == [4, 2, 3] and data.num_steps.tolist() == [4, 0, 3]
