"""The loaders on the real benchmark files (skipped when the files are not available)."""

from __future__ import annotations

import pickle

import pytest
import torch

from pyrossm.datasets import load_jsb_chorales, load_ptb

JSB_COUNTS = {"train": 229, "valid": 76, "test": 77}
PTB_COUNTS = {"train": (42_068, 887_521), "valid": (3_370, 70_390), "test": (3_761, 78_669)}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_jsb_chorales_real(split, shared_file):
    path = shared_file("jsb_chorales.pickle")
    data = load_jsb_chorales(split, data_dir=path.parent)
    rolls, lengths, mask = data
    N = JSB_COUNTS[split]
    T_max = int(lengths.max())
    assert rolls.shape == (N, T_max, 88) and rolls.dtype == torch.float32
    assert lengths.shape == (N,) and lengths.dtype == torch.long
    assert mask.shape == (N, T_max) and mask.dtype == torch.bool
    assert torch.equal(mask.sum(-1), lengths)
    assert set(rolls.unique().tolist()) <= {0.0, 1.0}
    assert rolls[~mask].sum() == 0  # padding is silent
    # independent count of (sequence, step, pitch) events from the raw file
    with open(path, "rb") as f:
        raw = pickle.load(f)[split]
    assert lengths.tolist() == [len(seq) for seq in raw]
    assert rolls.sum().item() == sum(len(set(map(int, chord))) for seq in raw for chord in seq)
    n, t = 0, 0
    active = torch.nonzero(rolls[n, t]).flatten() + 21
    assert active.tolist() == sorted(set(map(int, raw[n][t])))


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_ptb_real(split, shared_file):
    path = shared_file(f"ptb.{split}.txt")
    sentences = load_ptb(split, data_dir=path.parent)
    num_sentences, num_words = PTB_COUNTS[split]
    assert len(sentences) == num_sentences
    assert sum(map(len, sentences)) == num_words
    assert all(
        sentence and all(isinstance(w, str) and w.strip() == w for w in sentence)
        for sentence in sentences
    )
    vocabulary = {w for sentence in sentences for w in sentence}
    assert "<unk>" in vocabulary and "N" in vocabulary and len(vocabulary) <= 10_000
