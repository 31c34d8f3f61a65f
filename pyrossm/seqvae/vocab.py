"""Vocabulary and length-bucketed, padded sentence batches.

A sentence ``w_1 … w_n`` is encoded as the targets ``x = (w_1, …, w_n, <eos>)`` of length
``T = n + 1``; the decoder reads ``(<sos>, w_1, …, w_n)``. Batches are right-padded with
``<pad>`` to shape ``(batch, T_max)`` together with a boolean ``mask`` ``(batch, T_max)`` that is
True at the real tokens (``<eos>`` included) — the padding never enters a log-density
(see :mod:`pyrossm.protocol`). Sorting sentences by length before batching (bucketing) keeps the
padding small, which matters on a CPU: Penn Treebank sentences range from 1 to 83 tokens.

Example
-------
>>> vocab = Vocabulary.from_corpus([["the", "cat"], ["the", "dog", "sat"]])
>>> vocab.decode(vocab.encode(["the", "dog", "sat"]))
['the', 'dog', 'sat']
>>> batch = pad_batch(vocab, [["the", "cat"], ["a", "dog", "sat"]])
>>> batch.x.shape, batch.mask.sum(-1).tolist()
(torch.Size([2, 4]), [3, 4])
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = [
    "EOS",
    "PAD",
    "SOS",
    "SPECIAL_TOKENS",
    "UNK",
    "SentenceBatch",
    "Vocabulary",
    "bucket_batches",
    "pad_batch",
]

PAD, UNK, SOS, EOS = "<pad>", "<unk>", "<sos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, SOS, EOS)


class Vocabulary:
    """A bijection between tokens and ids ``0 … len-1`` that contains ``<pad> <unk> <sos> <eos>``.

    Parameters
    ----------
    tokens:
        The tokens in id order, without duplicates. All of :data:`SPECIAL_TOKENS` must be present
        (``ValueError`` otherwise); :meth:`from_corpus` puts them first.

    Unknown words encode to ``<unk>``. ``decode`` stops at the first ``<eos>`` and drops
    ``<pad>``/``<sos>``.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str):
                raise TypeError(f"tokens: expected strings, got {type(tok).__name__} at index {i}")
        missing = [tok for tok in SPECIAL_TOKENS if tok not in tokens]
        if missing:
            raise ValueError(
                f"tokens: a vocabulary needs the special tokens {list(SPECIAL_TOKENS)}; "
                f"missing {missing}"
            )
        if len(set(tokens)) != len(tokens):
            dup = [tok for tok, n in Counter(tokens).items() if n > 1]
            raise ValueError(f"tokens: expected unique tokens, got duplicates {dup[:5]}")
        self._itos = tokens
        self._stoi = {tok: i for i, tok in enumerate(tokens)}
        self.pad_id = self._stoi[PAD]
        self.unk_id = self._stoi[UNK]
        self.sos_id = self._stoi[SOS]
        self.eos_id = self._stoi[EOS]

    @classmethod
    def from_corpus(
        cls, sentences: Iterable[Sequence[str]], min_count: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """Build from tokenized sentences: special tokens first, then words by decreasing count
        (ties alphabetical), keeping words seen at least ``min_count`` times, at most ``max_size``
        tokens in all."""
        if min_count < 1:
            raise ValueError(f"min_count: expected >= 1, got {min_count}")
        counts = Counter(tok for sent in sentences for tok in sent)
        words = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        tokens = list(SPECIAL_TOKENS) + words
        if max_size is not None:
            if max_size < len(SPECIAL_TOKENS):
                raise ValueError(f"max_size: expected >= {len(SPECIAL_TOKENS)}, got {max_size}")
            tokens = tokens[:max_size]
        return cls(tokens)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: str) -> bool:
        return token in self._stoi

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    @property
    def tokens(self) -> list[str]:
        return list(self._itos)

    def token_to_id(self, token: str) -> int:
        return self._stoi.get(token, self.unk_id)

    def id_to_token(self, index: int) -> str:
        return self._itos[int(index)]

    def encode(self, sentence: Sequence[str], add_eos: bool = True) -> list[int]:
        """Token ids of ``sentence`` (unknown words → ``<unk>``), followed by ``<eos>``."""
        if isinstance(sentence, str):
            raise TypeError("sentence: expected a sequence of tokens, got a str (split it first)")
        ids = [self._stoi.get(tok, self.unk_id) for tok in sentence]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Tokens of ``ids`` up to (excluding) the first ``<eos>``; ``<pad>``/``<sos>`` dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.sos_id):
                continue
            out.append(self._itos[i])
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self._itos))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            tokens = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"path: {path} is not a vocabulary file (UTF-8 JSON): {error}"
            ) from None
        return cls(tokens)


class SentenceBatch(NamedTuple):
    """A padded batch: ``x`` ``(batch, T)`` long targets (words then ``<eos>``, then ``<pad>``),
    ``mask`` ``(batch, T)`` bool, ``lengths`` ``(batch,)`` long (tokens incl. ``<eos>``),
    ``index`` ``(batch,)`` long positions of the sentences in the corpus."""

    x: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    index: torch.Tensor


def pad_batch(
    vocab: Vocabulary,
    sentences: Sequence[Sequence[str]],
    index: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> SentenceBatch:
    """Encode and right-pad ``sentences`` into a :class:`SentenceBatch` (time at dim -1 of x)."""
    if len(sentences) == 0:
        raise ValueError("sentences: expected at least one sentence, got none")
    encoded = [vocab.encode(s) for s in sentences]
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    T = int(lengths.max())
    x = torch.full((len(encoded), T), vocab.pad_id, dtype=torch.long)
    for b, e in enumerate(encoded):
        x[b, : len(e)] = torch.tensor(e, dtype=torch.long)
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    idx = torch.arange(len(encoded)) if index is None else torch.as_tensor(list(index))
    return SentenceBatch(x.to(device), mask.to(device), lengths.to(device), idx.to(device))


def bucket_batches(
    vocab: Vocabulary,
    sentences: Sequence[Sequence[str]],
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    max_len: int | None = None,
) -> list[SentenceBatch]:
    """Length-bucketed padded batches covering every sentence exactly once.

    Sentences are sorted by length (ties broken randomly when ``shuffle``) and cut into
    consecutive batches of ``batch_size``; the batch order is then shuffled. Sentences longer than
    ``max_len`` words are dropped when ``max_len`` is given.

    >>> vocab = Vocabulary.from_corpus([["a"], ["a", "b"], ["b", "b", "a"]])
    >>> [b.x.shape[1] for b in bucket_batches(vocab, [["a"], ["a", "b"], ["b", "b", "a"]], 2,
    ...                                        shuffle=False)]
    [3, 4]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    order = list(range(len(sentences)))
    if max_len is not None:
        order = [i for i in order if len(sentences[i]) <= max_len]
    if shuffle:
        perm = torch.randperm(len(order), generator=generator).tolist()
        order = [order[p] for p in perm]
    order.sort(key=lambda i: len(sentences[i]))  # stable: random order within a length
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        perm = torch.randperm(len(chunks), generator=generator).tolist()
        chunks = [chunks[p] for p in perm]
    return [pad_batch(vocab, [sentences[i] for i in c], index=c, device=device) for c in chunks]
