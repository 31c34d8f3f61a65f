"""JSB Chorales: polyphonic music as 88-key binary piano rolls.

382 four-part chorales by J. S. Bach at quarter-note resolution, split 229 / 76 / 77
(train / valid / test) as in Boulanger-Lewandowski, Bengio & Vincent (ICML 2012), the benchmark
of the deep Markov model (Krishnan, Shalit & Sontag, AAAI 2017). The file ``jsb_chorales.pickle``
(redistributed by the Pyro project) is read from a data directory; see
:func:`pyrossm.datasets.fetch_file` for where it is looked for.
"""

from __future__ import annotations

import os
import pickle
from typing import NamedTuple

import torch

from ._files import fetch_file

__all__ = ["LOWEST_PITCH", "NUM_PIANO_KEYS", "JSBChorales", "load_jsb_chorales"]

NUM_PIANO_KEYS = 88
LOWEST_PITCH = 21  # MIDI pitch of the lowest piano key (A0); column = pitch - LOWEST_PITCH
SPLITS = ("train", "valid", "test")
JSB_FILE = "jsb_chorales.pickle"


class JSBChorales(NamedTuple):
    """Right-padded piano rolls of one split.

    ``piano_rolls`` (N, T_max, 88) float, 1 where a key sounds (0 on padding);
    ``lengths`` (N,) long; ``mask`` (N, T_max) bool, True at steps ``t < lengths[n]``.
    """

    piano_rolls: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return split


def load_jsb_chorales(
    split: str,
    data_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str | None = None,
    download: bool = True,
) -> JSBChorales:
    """Load one split of JSB Chorales as binary piano rolls, shape (batch, time, 88).

    MIDI pitch ``p`` (21..108) maps to column ``p - 21``. Sequences are right-padded to the
    longest one; padding is all zeros and ``mask`` is False there (the convention of
    :mod:`pyrossm.protocol`). The file is verified against its sha256 digest before it is
    unpickled.

    Args:
        split: ``"train"`` (229 sequences), ``"valid"`` (76) or ``"test"`` (77).
        data_dir: directory holding ``jsb_chorales.pickle``; default ``$PYROSSM_DATA_DIR``,
            then the cache (downloaded there when missing and reachable).
        dtype: floating dtype of ``piano_rolls``.

    Reference: Boulanger-Lewandowski, Bengio & Vincent (2012), "Modeling temporal dependencies
    in high-dimensional sequences", ICML.

    >>> data = load_jsb_chorales("valid")  # doctest: +SKIP
    >>> data.piano_rolls.shape, int(data.lengths.max())  # doctest: +SKIP
    (torch.Size([76, 144, 88]), 144)
    """
    check_split(split)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    path = fetch_file(JSB_FILE, data_dir, download=download)
    with open(path, "rb") as f:
        raw = pickle.load(f)  # noqa: S301 -- only after the sha256 check above
    sequences = raw[split]
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    max_len = int(lengths.max()) if len(sequences) else 0
    rows, steps, cols = [], [], []
    for n, seq in enumerate(sequences):
        for t, chord in enumerate(seq):
            for pitch in chord:
                col = int(pitch) - LOWEST_PITCH
                if not 0 <= col < NUM_PIANO_KEYS:
                    raise ValueError(
                        f"{JSB_FILE}: pitch {int(pitch)} in {split}[{n}][{t}] is outside the "
                        f"piano range {LOWEST_PITCH}..{LOWEST_PITCH + NUM_PIANO_KEYS - 1}"
                    )
                rows.append(n)
                steps.append(t)
                cols.append(col)
    rolls = torch.zeros(len(sequences), max_len, NUM_PIANO_KEYS, dtype=dtype)
    rolls[
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(steps, dtype=torch.long),
        torch.tensor(cols, dtype=torch.long),
    ] = 1
    mask = torch.arange(max_len) < lengths.unsqueeze(-1)
    return JSBChorales(rolls.to(device), lengths.to(device), mask.to(device))
