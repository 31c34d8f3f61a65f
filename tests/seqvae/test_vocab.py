"""Vocabulary: required tokens, round trip, padded and bucketed batches."""

import pytest
import torch

from pyrossm.seqvae.vocab import SPECIAL_TOKENS, Vocabulary, bucket_batches, pad_batch

CORPUS = [["the", "cat", "sat"], ["the", "dog"], ["a", "cat", "saw", "the", "dog"], ["hi"]]


def test_round_trip_and_special_ids():
    vocab = Vocabulary.from_corpus(CORPUS)
    assert vocab.tokens[:4] == list(SPECIAL_TOKENS)
    assert len({vocab.pad_id, vocab.unk_id, vocab.sos_id, vocab.eos_id}) == 4
    for sent in CORPUS:
        ids = vocab.encode(sent)
        assert ids[-1] == vocab.eos_id and len(ids) == len(sent) + 1
        assert vocab.decode(ids) == sent
    assert vocab.decode(vocab.encode(["the", "zebra"])) == ["the", "<unk>"]
    assert vocab.tokens[4] == "the"  # most frequent word first


@pytest.mark.parametrize("missing", SPECIAL_TOKENS)
def test_missing_special_token_raises(missing):
    tokens = [t for t in SPECIAL_TOKENS if t != missing] + ["word"]
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(tokens)


def test_duplicates_and_bad_input_raise():
    with pytest.raises(ValueError, match="unique"):
        Vocabulary(list(SPECIAL_TOKENS) + ["a", "a"])
    with pytest.raises(TypeError, match="sentence"):
        Vocabulary.from_corpus(CORPUS).encode("the cat")


def test_save_load(tmp_path):
    vocab = Vocabulary.from_corpus(CORPUS)
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").tokens == vocab.tokens


def test_pad_batch_mask_and_padding():
    vocab = Vocabulary.from_corpus(CORPUS)
    b = pad_batch(vocab, CORPUS)
    lengths = torch.tensor([len(s) + 1 for s in CORPUS])
    assert torch.equal(b.lengths, lengths)
    assert torch.equal(b.mask.sum(-1), lengths)
    assert torch.all(b.x[~b.mask] == vocab.pad_id)
    assert torch.all(b.x[torch.arange(4), lengths - 1] == vocab.eos_id)


def test_bucket_batches_cover_each_sentence_once_with_small_padding():
    vocab = Vocabulary.from_corpus(CORPUS)
    corpus = [CORPUS[i % 4] for i in range(40)]
    batches = bucket_batches(vocab, corpus, 4, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([b.index for b in batches]).sort().values
    assert torch.equal(seen, torch.arange(40))
    for b in batches:  # sorted by length: 10 copies of each length, batches of 4
        assert int(b.lengths.max() - b.lengths.min()) <= 3
        for row, i in zip(b.x, b.index.tolist()):
            assert vocab.decode(row) == corpus[i]
