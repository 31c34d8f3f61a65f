"""IAF-augmented structured guide: its log-density is the change of variables of its steps."""

import pyro
import pytest
import torch

from pyrossm.guides import StructuredGuide
from pyrossm.infer import fit
from pyrossm.nonlinear import DeepMarkovModel
from pyrossm.nonlinear.iaf import IAFGuide

ATOL = 1e-9  # float64


@pytest.fixture(autouse=True)
def _fresh():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # Pyro's IAF inverse allocates in the default dtype
    yield
    torch.set_default_dtype(dtype)


def _guide(num_iafs=2):
    guide = IAFGuide(StructuredGuide(3, 2, hidden_dim=6), num_iafs=num_iafs, iaf_dim=5).double()
    with torch.no_grad():  # flows away from the identity
        for p in guide.flows.parameters():
            p.normal_(0, 0.5)
    return guide


def test_log_prob_is_the_change_of_variables():
    guide = _guide()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    q = guide.distribution(x)
    z = q.rsample()
    flows = list(guide.flows)

    def push(u):  # f_K o ... o f_1 of one point u (2,)
        for f in flows:
            u = f(u)
        return u

    def pull(z_t):
        for f in reversed(flows):
            z_t = f.inv(z_t)
        return z_t

    comb = guide.base.combiner
    h = guide.base.features(x)
    direct = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        z_prev = comb.z0
        for t in range(4):
            loc, scale = comb(z_prev, h[b, t])
            u = pull(z[b, t])
            torch.testing.assert_close(push(u), z[b, t], atol=ATOL, rtol=0)
            jac = torch.autograd.functional.jacobian(push, u)
            normal = torch.distributions.Normal(loc, scale).log_prob(u).sum()
            direct[b] += normal - torch.linalg.slogdet(jac).logabsdet
            z_prev = z[b, t]
    torch.testing.assert_close(q.log_prob(z), direct, atol=1e-7, rtol=0)  # the sampling pass
    torch.testing.assert_close(q.log_prob(z.clone()), direct, atol=1e-7, rtol=0)  # inverted


def test_masked_steps_and_errors():
    guide = _guide(1)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    q = guide.distribution(x, mask)
    z = q.rsample()
    assert q.step_log_prob(z)[1, 2:].abs().max() == 0
    with pytest.raises(ValueError, match="num_iafs"):
        IAFGuide(StructuredGuide(3, 2, hidden_dim=6), num_iafs=0)
    with pytest.raises(ValueError, match="diagonal"):
        IAFGuide(StructuredGuide(3, 2, hidden_dim=6, combiner="linear"))


def test_trains_with_fit():
    torch.set_default_dtype(torch.float32)
    model = DeepMarkovModel(3, 2, transition_dim=4, emission_dim=4, emission="gaussian")
    guide = IAFGuide(StructuredGuide(3, 2, hidden_dim=6), num_iafs=1, iaf_dim=4)
    x = torch.randn(8, 5, 3)
    history = fit(model, guide, x, epochs=3, batch_size=4, lr=1e-2, progress=False, seed=0)
    assert all(torch.isfinite(torch.tensor(history["train_neg_elbo"])))
