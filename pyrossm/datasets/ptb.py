"""Penn Treebank, Mikolov's language-modelling version (one sentence per line).

Lower case, 10k-word vocabulary, numbers as ``N``, rare words as ``<unk>``; 42,068 / 3,370 /
3,761 sentences (887,521 / 70,390 / 78,669 words) in train / valid / test. The split used by
Bowman et al. (2016) and most sentence-VAE work. The files ``ptb.{split}.txt`` are read from a
data directory; see :func:`pyrossm.datasets.fetch_file`.
"""

from __future__ import annotations

import os

from ._files import fetch_file
from .jsb import check_split

__all__ = ["load_ptb"]


def load_ptb(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
) -> list[list[str]]:
    """Load one split of the Penn Treebank as a list of sentences, each a list of tokens.

    Each line is stripped and split on whitespace; empty lines are skipped. No end-of-sentence
    token is added (vocabularies add their own).

    Args:
        split: ``"train"``, ``"valid"`` or ``"test"``.
        data_dir: directory holding ``ptb.{split}.txt``; default ``$PYROSSM_DATA_DIR``, then the
            cache (downloaded there when missing and reachable).

    Reference: Mikolov et al. (2010), "Recurrent neural network based language model".

    >>> sentences = load_ptb("valid")  # doctest: +SKIP
    >>> len(sentences), sum(map(len, sentences))  # doctest: +SKIP
    (3370, 70390)
    """
    check_split(split)
    path = fetch_file(f"ptb.{split}.txt", data_dir, download=download)
    with open(path, encoding="utf-8") as f:
        return [tokens for tokens in (line.split() for line in f) if tokens]
