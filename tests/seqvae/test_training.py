"""Training with pyrossm.infer.fit on a tiny corpus; IWAE vs ELBO; the Gaussian variant."""

import math

import pytest
import torch

from pyrossm.infer import fit, log_likelihood
from pyrossm.seqvae.gaussian import GaussianSequenceVAE, GaussianSequenceVAEGuide
from pyrossm.seqvae.metrics import evaluate, importance_weighted_bounds
from pyrossm.seqvae.model import LSTMLanguageModel, NoLatentGuide, SequenceVAE, SequenceVAEGuide
from pyrossm.seqvae.vocab import Vocabulary, pad_batch

Z_SE = 5.0  # Monte Carlo tolerance in standard errors


def tiny_pair(vocab, **kw):
    model = SequenceVAE(vocab, embed_dim=8, hidden_dim=16, latent_dim=2, **kw)
    guide = SequenceVAEGuide(vocab, embed_dim=8, hidden_dim=16, latent_dim=2)
    return model, guide


@pytest.mark.parametrize("annealing,free_bits,word_dropout", [
    ("cyclical", 0.5, 0.2),
    pytest.param(None, None, 0.0, marks=pytest.mark.slow),
    pytest.param("sigmoid", None, 0.3, marks=pytest.mark.slow)])
def test_tiny_corpus_vae_loss_falls(corpus, annealing, free_bits, word_dropout):
    data = [corpus[i % 4] for i in range(16)]
    vocab = Vocabulary.from_corpus(data)
    b = pad_batch(vocab, data)
    model, guide = tiny_pair(vocab, word_dropout=word_dropout, z_to_inputs=True)
    hist = fit(model, guide, (b.x, b.mask), epochs=30, batch_size=16, lr=2e-2, device="cpu",
               annealing=annealing, free_bits=free_bits, seed=0, progress=False, bucket=True)
    first, last = hist["train_neg_elbo"][0], hist["train_neg_elbo"][-1]
    assert last < 0.6 * first
    ev = evaluate(model, guide, [(b.x, b.mask)], num_samples=20)
    assert ev.nll_elbo < 0.6 * first and math.isfinite(ev.perplexity_iwae)


def test_language_model_trains_with_empty_guide(corpus):
    vocab = Vocabulary.from_corpus(corpus)
    b = pad_batch(vocab, corpus)
    lm = LSTMLanguageModel(vocab, embed_dim=8, hidden_dim=16)
    hist = fit(lm, NoLatentGuide(), (b.x, b.mask), epochs=30, batch_size=4, lr=2e-2,
               device="cpu", seed=0, progress=False)
    assert hist["train_neg_elbo"][-1] < 0.5 * hist["train_neg_elbo"][0]
    assert hist["train_kl"][-1] == 0.0
    ev = evaluate(lm, NoLatentGuide(), [(b.x, b.mask)])
    with torch.no_grad():
        exact = -float(lm.eval().log_likelihood_given_z(b.x, b.mask, None).mean())
    assert ev.nll_elbo == pytest.approx(exact) and ev.nll_iwae == pytest.approx(exact)
    assert ev.perplexity_iwae == pytest.approx(math.exp(exact * 4 / int(b.mask.sum())))


def test_iwae_bounds(vocab, batch, double):
    model, guide = tiny_pair(vocab, z_to_inputs=True)
    model.eval(), guide.eval()
    K = 200
    iwae, elbo, kl, loc, scale = importance_weighted_bounds(model, guide, batch.x, batch.mask,
                                                            num_samples=K, chunk_size=64)
    # per-sample log-likelihood spread gives the standard error of the ELBO estimate
    z = loc + scale * torch.randn(K, *loc.shape)
    ll = model.log_likelihood_given_z(batch.x.repeat(K, 1), batch.mask.repeat(K, 1),
                                      z.reshape(-1, 2)).view(K, -1)
    se = ll.std(0) / math.sqrt(K)
    assert torch.all(iwae >= elbo - Z_SE * se)
    # IWAE with K = 1, averaged over repetitions, is the ELBO (unbiased)
    reps = torch.stack([importance_weighted_bounds(model, guide, batch.x, batch.mask,
                                                   num_samples=1)[0] for _ in range(100)])
    assert torch.all((reps.mean(0) - elbo).abs() < Z_SE * reps.std(0) / math.sqrt(100) + 3 * se)
    # agrees with the generic trace-based estimator of pyrossm.infer
    generic = log_likelihood(model, guide, (batch.x, batch.mask), num_samples=K)
    spread = torch.stack([importance_weighted_bounds(model, guide, batch.x, batch.mask,
                                                     num_samples=K)[0] for _ in range(5)])
    tol = Z_SE * spread.std(0).clamp(min=1e-3)
    assert torch.all((generic - iwae).abs() < tol)


def test_gaussian_variant_masks_nans_and_trains(double):
    g = torch.Generator().manual_seed(0)
    N, T = 32, 12
    amp = torch.rand(N, 1, generator=g) * 2 + 0.5
    t = torch.arange(T, dtype=torch.float64)
    x = (amp * torch.sin(0.6 * t)).unsqueeze(-1) + 0.05 * torch.randn(N, T, 1, generator=g)
    lengths = torch.randint(6, T + 1, (N,), generator=g)
    mask = t.unsqueeze(0) < lengths.unsqueeze(-1)
    model = GaussianSequenceVAE(1, hidden_dim=16, latent_dim=2, z_to_inputs=True)
    guide = GaussianSequenceVAEGuide(1, hidden_dim=16, latent_dim=2)
    # padding invariance: garbage after the end changes nothing
    z = torch.randn(N, 2, generator=g)
    garbage = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 7.0))
    assert torch.allclose(model.log_likelihood_given_z(x, mask, z),
                          model.log_likelihood_given_z(garbage, mask, z))
    assert torch.allclose(guide.posterior(x, mask)[0], guide.posterior(garbage, mask)[0])
    # a missing entry (NaN) contributes nothing and gives finite gradients
    xm = x.clone()
    xm[0, 2, 0] = float("nan")
    ll = model.log_likelihood_given_z(xm, mask, guide.posterior(xm, mask)[0])
    ll.sum().backward()
    assert torch.isfinite(ll).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    hist = fit(model, guide, (xm, mask), epochs=40, batch_size=32, lr=2e-2, device="cpu",
               seed=0, progress=False)
    assert hist["train_neg_elbo"][-1] < hist["train_neg_elbo"][0] - 5.0
    assert model.generate(torch.zeros(3, 2), 7).shape == (3, 7, 1)
