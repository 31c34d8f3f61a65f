"""Evaluators against the closed-form marginal likelihood of the toy Gaussian model."""

import math

import pytest
import torch
from infer_toy import ExactGuide, ToyGuide, toy_problem

from pyrossm.infer import (
    elbo,
    elbo_terms,
    importance_log_weights,
    kl_per_step,
    log_likelihood,
)
from pyrossm.infer.evaluate import _weights_and_kl

EXACT_TOL = 1e-9
K_SE = 5.0  # Monte Carlo tolerance in standard errors


def _proposal(model, widen=1.2, noise=0.05, seed=0):
    """A reasonable but inexact guide: posterior mean perturbed (relative noise), widened scale."""
    G, S = model.posterior()
    g = torch.Generator().manual_seed(seed)
    guide = ToyGuide(G.shape[1], G.shape[0])
    with torch.no_grad():
        eps = torch.randn(G.shape, generator=g, dtype=G.dtype)
        guide.net.weight.copy_(G + noise * G.abs().mean() * eps)
        guide.net.bias.zero_()
        guide.scale = S.diagonal().sqrt() * widen
    return guide


def test_exact_posterior_guide_gives_log_p_for_every_sample():
    model, x = toy_problem(num=6, steps=5)
    lw = importance_log_weights(model, ExactGuide(model), x, num_samples=7, chunk_size=3)
    exact = model.exact_log_prob(x)
    assert lw.shape == (6, 7)
    assert (lw - exact[:, None]).abs().max() < EXACT_TOL
    assert (elbo(model, ExactGuide(model), x) - exact).abs().max() < EXACT_TOL
    ll = log_likelihood(model, ExactGuide(model), x, num_samples=10, chunk_size=4)
    assert (ll - exact).abs().max() < EXACT_TOL


def test_iwae_approaches_exact_log_likelihood():
    model, x = toy_problem(num=8, steps=4)
    guide = _proposal(model)
    K = 4000
    lw = importance_log_weights(model, guide, x, num_samples=K, batch_size=4, chunk_size=500)
    ll = torch.logsumexp(lw, 1) - math.log(K)
    w = torch.exp(lw - lw.max(1, keepdim=True).values)
    se = w.std(1) / (w.mean(1) * math.sqrt(K))  # delta-method s.e. of the log of the mean
    exact = model.exact_log_prob(x)
    assert ((ll - exact).abs() < K_SE * se + 1e-3).all(), (ll - exact, se)
    # and the bound is not trivially tight: the guide is inexact
    assert (elbo(model, guide, x, num_samples=200) < exact - 0.05).all()


def test_iwae_is_above_elbo_on_average():
    model, x = toy_problem(num=64, steps=4)
    guide = _proposal(model, widen=1.0, noise=0.1)
    iw = log_likelihood(model, guide, x, num_samples=64)
    el = elbo(model, guide, x, num_samples=64)
    exact = model.exact_log_prob(x)
    diff = iw - el
    assert diff.mean() > K_SE * diff.std() / math.sqrt(len(diff))
    assert (iw.mean() <= exact.mean() + 0.05)


def test_iwae_increases_with_k():
    model, x = toy_problem(num=16, steps=4)
    guide = _proposal(model, widen=1.0, noise=0.1)
    means = [log_likelihood(model, guide, x, num_samples=k).mean().item() for k in (1, 10, 300)]
    assert means[0] < means[1] < means[2] < model.exact_log_prob(x).mean().item() + 0.05


def test_padding_invariance_of_the_elbo():
    model, x = toy_problem(num=5, steps=6)
    lengths = torch.tensor([6, 2, 4, 1, 3])
    mask = torch.arange(6) < lengths[:, None]
    garbage = torch.where(mask[..., None], x, torch.full_like(x, 1e3))
    ex = ExactGuide(model)
    padded = elbo(model, ex, (garbage, lengths))
    alone = torch.stack([elbo(model, ex, x[i:i + 1, :n]).squeeze(0)
                         for i, n in enumerate(lengths.tolist())])
    assert (padded - alone).abs().max() < EXACT_TOL
    # an inexact guide: padding content does not matter (same seed)
    guide = _proposal(model)
    torch.manual_seed(1)
    a = elbo(model, guide, (torch.where(mask[..., None], x, torch.zeros_like(x)), mask))
    torch.manual_seed(1)
    b = elbo(model, guide, (garbage, mask))
    assert torch.equal(a, b)


def test_kl_per_step_matches_analytic_kl():
    model, x = toy_problem(num=4, steps=3)
    G, S = model.posterior()
    n = S.shape[0]
    m = x @ G.T  # (N, T, n)
    kl_t = 0.5 * (S.trace() + (m ** 2).sum(-1) - n - torch.logdet(S))
    analytic = kl_t.mean(-1)
    K = 3000
    _, kl, _ = _weights_and_kl(model, ExactGuide(model), x, K, 64, None, None)
    se = kl.std(1) / math.sqrt(K) / x.shape[1]
    est = kl_per_step(model, ExactGuide(model), x, num_samples=K)
    assert ((est - analytic).abs() < K_SE * se).all()
    res = elbo_terms(model, ExactGuide(model), x, num_samples=5)
    assert torch.allclose(res.reconstruction, res.elbo + res.kl)
    assert res.num_steps.tolist() == [3, 3, 3, 3]


def test_eval_mode_no_grad_and_mode_restored():
    model, x = toy_problem(num=3, steps=3)
    guide = _proposal(model)
    seen = []
    guide.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    model.train()
    guide.train()
    out = log_likelihood(model, guide, x, num_samples=3)
    assert not out.requires_grad and seen and not any(seen)
    assert model.training and guide.training


def test_bad_arguments():
    model, x = toy_problem(num=3, steps=3)
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(model, ExactGuide(model), x, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        log_likelihood(model, ExactGuide(model), x, num_samples=2, chunk_size=0)
    with pytest.raises(TypeError, match="data"):
        elbo(model, ExactGuide(model), [1, 2, 3])
