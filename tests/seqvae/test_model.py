"""SequenceVAE / LSTMLanguageModel: protocol shapes, masks, word dropout, scheduled sampling."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import site_is_subsample

from pyrossm.seqvae.model import (
    LSTMLanguageModel,
    NoLatentGuide,
    SequenceVAE,
    SequenceVAEGuide,
    teacher_forcing_probability,
)
from pyrossm.seqvae.vocab import pad_batch

TOL = 1e-10


def make_pair(vocab, latent=3, **kw):
    cell = kw.pop("cell", "lstm")
    model = SequenceVAE(vocab, embed_dim=6, hidden_dim=7, latent_dim=latent, cell=cell, **kw)
    guide = SequenceVAEGuide(vocab, embed_dim=6, hidden_dim=7, latent_dim=latent, cell=cell)
    return model, guide


def traces(model, guide, x, mask):
    gt = poutine.trace(guide).get_trace(x, mask)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x, mask)
    return mt, gt


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("z_to_inputs", [False, True])
def test_site_shapes_follow_protocol(vocab, batch, cell, z_to_inputs):
    model, guide = make_pair(vocab, cell=cell, z_to_inputs=z_to_inputs)
    mt, gt = traces(model, guide, batch.x, batch.mask)
    z = gt.nodes["z"]["fn"]
    assert z.batch_shape == (4,) and z.event_shape == (3,)
    assert mt.nodes["z"]["fn"].batch_shape == (4,)
    assert mt.nodes["x"]["fn"].log_prob(batch.x).shape == (4,)
    assert mt.nodes["x"]["is_observed"]
    assert [f.name for f in mt.nodes["x"]["cond_indep_stack"]] == ["sequences"]


def test_padding_never_enters_the_loss(vocab, corpus, double):
    """Each sentence alone (no padding) and inside a padded batch: same log p(x|z), same q."""
    model, guide = make_pair(vocab, z_to_inputs=True)
    model.eval()
    b = pad_batch(vocab, corpus)
    x_garbage = b.x.masked_fill(~b.mask, 5)  # padded positions hold another word
    z = torch.randn(4, 3)
    ll_batch = model.log_likelihood_given_z(x_garbage, b.mask, z)
    loc_b, scale_b = guide.posterior(x_garbage, b.mask)
    for i, sent in enumerate(corpus):
        one = pad_batch(vocab, [sent])
        ll_one = model.log_likelihood_given_z(one.x, one.mask, z[i : i + 1])
        loc, scale = guide.posterior(one.x, one.mask)
        assert torch.allclose(ll_batch[i], ll_one[0], atol=TOL)
        assert torch.allclose(loc_b[i], loc[0], atol=TOL)
        assert torch.allclose(scale_b[i], scale[0], atol=TOL)
    # and the ELBO computed by Pyro on the padded batch is the sum of the single ones
    pyro.set_rng_seed(3)
    mt, gt = traces(model, guide, x_garbage, b.mask)
    total = mt.log_prob_sum() - gt.log_prob_sum()
    parts = 0.0
    for i, sent in enumerate(corpus):
        one = pad_batch(vocab, [sent])
        fake = poutine.trace(guide).get_trace(one.x, one.mask)
        fake.nodes["z"]["value"] = gt.nodes["z"]["value"][i : i + 1]
        g1 = poutine.trace(poutine.replay(guide, trace=fake)).get_trace(one.x, one.mask)
        m1 = poutine.trace(poutine.replay(model, trace=g1)).get_trace(one.x, one.mask)
        parts = parts + m1.log_prob_sum() - g1.log_prob_sum()
    assert torch.allclose(total, parts, atol=1e-8)


def test_bad_inputs_raise(vocab, batch):
    model, guide = make_pair(vocab)
    holes = batch.mask.clone()
    holes[0, 0] = False
    with pytest.raises(ValueError, match="mask"):
        model(batch.x, holes)
    with pytest.raises(ValueError, match="x"):
        guide(batch.x.float(), batch.mask)
    with pytest.raises(ValueError, match="token ids"):
        model(batch.x + len(vocab), batch.mask)
    with pytest.raises(ValueError, match="cell"):
        SequenceVAE(vocab, cell="transformer")
    with pytest.raises(ValueError, match="word_dropout"):
        SequenceVAE(vocab, word_dropout=1.5)


def test_word_dropout_only_in_training(vocab, batch):
    model, _ = make_pair(vocab, word_dropout=1.0)
    inputs = model.decoder.decoder_inputs(batch.x, word_dropout=1.0)
    assert torch.all(inputs[:, 0] == vocab.sos_id)
    assert torch.all(inputs[:, 1:] == vocab.unk_id)  # rate 1: an inputless decoder
    z = torch.randn(4, 3)
    model.eval()
    ll_eval = model.log_likelihood_given_z(batch.x, batch.mask, z)
    ref = model.decoder.teacher_forcing_logits(batch.x, z)
    assert torch.allclose(model.logits(batch.x, z), ref)
    model.train()
    ll_train = model.log_likelihood_given_z(batch.x, batch.mask, z)
    assert not torch.allclose(ll_eval, ll_train)
    inputs = model.decoder.decoder_inputs(batch.x, word_dropout=0.5)
    frac = float((inputs[:, 1:] == vocab.unk_id).float().mean())
    assert 0.05 < frac < 0.95


def test_teacher_forcing_probability_schedules():
    assert teacher_forcing_probability(0, "linear", k=1.0, c=0.01) == 1.0
    assert teacher_forcing_probability(30, "linear", k=1.0, c=0.01) == pytest.approx(0.7)
    assert teacher_forcing_probability(500, "linear", k=1.0, c=0.01, minimum=0.1) == 0.1
    assert teacher_forcing_probability(2, "exponential", k=0.9) == pytest.approx(0.81)
    k = 10.0
    assert teacher_forcing_probability(0, "inverse_sigmoid", k=k) == pytest.approx(k / (k + 1))
    assert teacher_forcing_probability(20, "inverse_sigmoid", k=k) == pytest.approx(
        k / (k + torch.e**2))
    with pytest.raises(ValueError, match="schedule"):
        teacher_forcing_probability(0, "cosine")
    with pytest.raises(ValueError, match="k"):
        teacher_forcing_probability(0, "exponential", k=1.5)


def test_scheduled_sampling_with_prob_one_is_teacher_forcing(vocab, batch, double):
    model, _ = make_pair(vocab, z_to_inputs=True)
    z = torch.randn(4, 3)
    tf = model.decoder.teacher_forcing_logits(batch.x, z)
    ss = model.decoder.scheduled_sampling_logits(batch.x, z, teacher_prob=1.0)
    assert torch.allclose(tf, ss, atol=TOL)
    own = model.decoder.scheduled_sampling_logits(batch.x, z, teacher_prob=0.0)
    assert torch.allclose(tf[:, 0], own[:, 0], atol=TOL) and not torch.allclose(tf, own)


def test_scheduled_sampling_mode_counts_steps(vocab, batch):
    model, guide = make_pair(vocab, decoder_mode="scheduled_sampling", ss_schedule="linear",
                             ss_k=1.0, ss_c=0.5)
    model.train()
    for _ in range(3):
        traces(model, guide, batch.x, batch.mask)
    assert int(model.train_steps) == 3
    model.eval()
    traces(model, guide, batch.x, batch.mask)
    assert int(model.train_steps) == 3


def test_language_model_has_no_latent_and_empty_guide(vocab, batch):
    lm = LSTMLanguageModel(vocab, embed_dim=6, hidden_dim=7)
    mt, gt = traces(lm, NoLatentGuide(), batch.x, batch.mask)
    latent = [n for n in mt.stochastic_nodes if not site_is_subsample(mt.nodes[n])]
    assert latent == [] and mt.observation_nodes == ["x"]
    assert not any(s["type"] == "sample" for s in gt.nodes.values())
    lp = lm.log_likelihood_given_z(batch.x, batch.mask, None)
    assert torch.allclose(mt.nodes["x"]["fn"].log_prob(batch.x), lp)
