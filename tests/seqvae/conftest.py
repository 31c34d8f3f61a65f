import pytest
import torch

from pyrossm.seqvae.vocab import Vocabulary, pad_batch

CORPUS = [
    ["the", "cat", "sat", "on", "the", "mat"],
    ["a", "dog", "ran"],
    ["the", "dog", "sat"],
    ["a", "cat", "ran", "on", "a", "mat"],
]


@pytest.fixture
def corpus():
    return [list(s) for s in CORPUS]


@pytest.fixture
def vocab():
    return Vocabulary.from_corpus(CORPUS)


@pytest.fixture
def batch(vocab):
    return pad_batch(vocab, CORPUS)


@pytest.fixture
def double():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
