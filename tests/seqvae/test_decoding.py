"""Decoding: beam width 1 = greedy, homotopy endpoints, imputation, prior samples."""

import pytest
import torch

from pyrossm.seqvae.decoding import (
    beam_search,
    greedy_decode,
    homotopy,
    impute,
    reconstruct,
    sample_decode,
    sample_prior,
    to_text,
)
from pyrossm.seqvae.model import LSTMLanguageModel, SequenceVAE, SequenceVAEGuide


def make_pair(vocab):
    model = SequenceVAE(vocab, embed_dim=6, hidden_dim=7, latent_dim=3, z_to_inputs=True)
    guide = SequenceVAEGuide(vocab, embed_dim=6, hidden_dim=7, latent_dim=3)
    for p in model.parameters():  # sharper distributions: decodes differ between codes
        p.data.mul_(3.0)
    return model.eval(), guide.eval()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_beam_width_one_is_greedy(vocab, cell):
    model = SequenceVAE(vocab, embed_dim=6, hidden_dim=7, latent_dim=3, cell=cell).eval()
    z = torch.randn(6, 3)
    g = greedy_decode(model, z, max_len=9)
    b = beam_search(model, z, beam_width=1, max_len=9)
    assert torch.equal(g.tokens, b.tokens[:, : g.tokens.shape[1]])
    assert torch.equal(g.lengths, b.lengths)
    assert torch.allclose(g.log_prob, b.log_prob, atol=1e-5)


def test_wider_beam_finds_at_least_as_probable_complete_sentences(vocab):
    model, _ = make_pair(vocab)
    z = torch.randn(8, 3)
    g = greedy_decode(model, z, max_len=12)
    b = beam_search(model, z, beam_width=4, max_len=12)
    ended = (g.lengths < 12) & (b.lengths < 12)
    assert bool(ended.any())
    assert torch.all(b.log_prob[ended] >= g.log_prob[ended] - 1e-5)


def test_decoded_sequences_are_well_formed(vocab):
    model, guide = make_pair(vocab)
    out = sample_decode(model, torch.randn(5, 3), max_len=8, temperature=0.7)
    for row, n in zip(out.tokens, out.lengths):
        assert not torch.any(row[:n] == vocab.pad_id) and not torch.any(row == vocab.sos_id)
        if n < 8:
            assert row[n - 1] == vocab.eos_id and torch.all(row[n:] == vocab.pad_id)
    assert len(to_text(vocab, sample_prior(model, 4, max_len=6, method="greedy"))) == 4
    lm = LSTMLanguageModel(vocab, embed_dim=6, hidden_dim=7).eval()
    assert sample_prior(lm, 3, max_len=5).tokens.shape[0] == 3
    with pytest.raises(ValueError, match="temperature"):
        sample_decode(model, torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="z"):
        greedy_decode(model, torch.randn(2, 4))


def test_homotopy_endpoints_are_the_reconstructions(vocab, batch):
    model, guide = make_pair(vocab)
    xa, ma, xb, mb = batch.x[:1], batch.mask[:1], batch.x[1:2], batch.mask[1:2]
    path = homotopy(model, guide, xa, xb, steps=5, mask_a=ma, mask_b=mb, max_len=10)
    ra = reconstruct(model, guide, xa, ma, max_len=10)
    rb = reconstruct(model, guide, xb, mb, max_len=10)
    assert path.tokens.shape[0] == 5
    assert to_text(vocab, path.tokens[:1]) == to_text(vocab, ra)
    assert to_text(vocab, path.tokens[-1:]) == to_text(vocab, rb)


def test_impute_keeps_observed_words_and_fills_with_words(vocab, batch):
    model, guide = make_pair(vocab)
    missing = torch.zeros_like(batch.mask)
    missing[:, 1] = True
    out = impute(model, guide, batch.x, missing, batch.mask, iterations=2)
    assert torch.equal(out[~missing], batch.x[~missing])
    special = torch.tensor([vocab.pad_id, vocab.sos_id, vocab.eos_id, vocab.unk_id])
    assert not torch.isin(out[:, 1], special).any()
