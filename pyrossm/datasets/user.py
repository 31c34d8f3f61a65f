"""User data: CSV and NumPy files (or arrays) as batches of sequences.

Layouts: ``(time,)`` (one univariate series), ``(time, features)`` (one multivariate series) or
``(sequences, time, features)``; the result always has shape ``(batch, time, features)`` (time
at dim -2). ``NaN`` marks a missing observation and is kept as ``NaN`` (see
:mod:`pyrossm.protocol`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_array", "save_array"]

# CSV cells read as missing (NaN), compared in lower case after stripping.
MISSING_TOKENS = frozenset({"", "nan", "na", "n/a", "null", "none", "?"})
_NPZ_DEFAULT_KEYS = ("x", "data", "arr_0")


def _parse_cell(cell: str, line: int, column: int, path: Path) -> float:
    text = cell.strip()
    if text.lower() in MISSING_TOKENS:
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"{path}: expected numbers (or an empty cell / NaN for missing), got {cell!r} at "
            f"line {line}, column {column}; drop non-numeric columns such as dates first"
        ) from None


def _read_csv(path: Path) -> np.ndarray:
    """A (time, features) array from a delimited text file (comma, semicolon, tab or spaces)
    with an optional header row."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        sample = f.read(4096)
        f.seek(0)
        if any(d in sample for d in ",;\t"):
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t").delimiter
            except csv.Error:
                delimiter = ","
            reader = csv.reader(f, delimiter=delimiter)
        else:  # one column, or columns separated by spaces; pandas quotes a missing value
            # of a one-column file as "" (an empty line would be ambiguous)
            reader = (["nan" if cell in ('""', "''") else cell.strip("\"'")
                       for cell in line.split()] for line in f)
        rows = [(i + 1, r) for i, r in enumerate(reader) if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: expected at least one row of numbers, got an empty file")

    def is_header(cells: list[str]) -> bool:
        for cell in cells:
            text = cell.strip()
            if text.lower() in MISSING_TOKENS:
                continue
            try:
                float(text)
            except ValueError:
                return True
        return False

    pandas_index = False
    if is_header(rows[0][1]):
        # pandas' to_csv writes its index as a first column with an empty header cell
        pandas_index = len(rows[0][1]) > 1 and rows[0][1][0].strip() == ""
        rows = rows[1:]
        if not rows:
            raise ValueError(f"{path}: expected rows of numbers after the header, got none")
    width = len(rows[0][1])
    values = []
    for line, cells in rows:
        if len(cells) != width:
            raise ValueError(
                f"{path}: expected {width} columns on every row, got {len(cells)} on line {line}"
            )
        values.append([_parse_cell(c, line, j + 1, path) for j, c in enumerate(cells)])
    array = np.asarray(values, dtype=np.float64)
    if pandas_index and np.array_equal(array[:, 0], np.arange(len(array))):
        array = array[:, 1:]  # the 0, 1, 2, ... index column, not data
    return array


def _read_npz(path: Path, key: str | None) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.files)
        if key is not None:
            if key not in keys:
                raise ValueError(f"key: expected one of {keys} in {path}, got {key!r}")
            return archive[key]
        if len(keys) == 1:
            return archive[keys[0]]
        for candidate in _NPZ_DEFAULT_KEYS:
            if candidate in keys:
                return archive[candidate]
        raise ValueError(
            f"{path}: holds several arrays {keys}; pass key=... to choose one "
            f"(or name it one of {list(_NPZ_DEFAULT_KEYS)})"
        )


def _read_file(path: Path, key: str | None) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"path_or_array: no such file {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt", ".tsv"):
        return _read_csv(path)
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            return _read_npz(path, key)
    except (ValueError, OSError, EOFError) as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"path_or_array: could not read {path} as a NumPy file: {error}") from None
    raise ValueError(
        f"path_or_array: expected a .csv, .tsv, .txt, .npy or .npz file, got {path.name!r}"
    )


def load_array(
    path_or_array,
    *,
    key: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Load user data as a float tensor of shape ``(batch, time, features)`` (time at dim -2).

    Accepts a path to a ``.csv``/``.tsv``/``.txt`` file (rows = time steps, columns = features,
    optional header row; empty cells, ``NaN``, ``NA`` mean missing), a ``.npy`` file, a ``.npz``
    file (its only array, or ``key``, or the array named ``x``/``data``/``arr_0``), or an
    array-like (NumPy array, torch tensor, nested lists). Rank 1 ``(time,)`` → ``(1, time, 1)``;
    rank 2 ``(time, features)`` → ``(1, time, features)``; rank 3 is kept. Missing values stay
    ``NaN``; infinite values, empty arrays, other ranks and non-numeric data raise ``ValueError``.

    >>> load_array([[1.0, 2.0], [float("nan"), 4.0], [5.0, 6.0]]).shape
    torch.Size([1, 3, 2])
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    source = "path_or_array"
    if isinstance(path_or_array, (str, os.PathLike)):
        path = Path(path_or_array).expanduser()
        source = str(path)
        array = _read_file(path, key)
    elif isinstance(path_or_array, torch.Tensor):
        array = path_or_array.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(path_or_array)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"{source}: expected a rectangular array, got {err}") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"{source}: expected numeric data (bool, int or float), got dtype {array.dtype}"
        )
    if array.ndim not in (1, 2, 3):
        raise ValueError(
            f"{source}: expected shape (time,), (time, features) or (sequences, time, features), "
            f"got shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"{source}: expected a non-empty array, got shape {array.shape}")
    array = array.astype(np.float64, copy=False)
    if np.isinf(array).any():
        raise ValueError(f"{source}: expected finite values or NaN (missing), got inf")
    if array.ndim == 1:
        array = array[None, :, None]
    elif array.ndim == 2:
        array = array[None]
    return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


def save_array(path: str | os.PathLike, x: torch.Tensor) -> Path:
    """Write sequences ``x`` of shape ``(batch, time, features)`` so :func:`load_array` reads
    them back: ``.npy`` / ``.npz`` (key ``x``) keep the shape; ``.csv`` holds one sequence
    (batch 1) as rows = time steps with a header ``x0,x1,...``. NaN is written as ``nan``.

    >>> import tempfile, os
    >>> p = save_array(os.path.join(tempfile.mkdtemp(), "x.csv"), torch.ones(1, 3, 2))
    >>> load_array(p).shape
    torch.Size([1, 3, 2])
    """
    path = Path(path).expanduser()
    array = torch.as_tensor(x).detach().cpu().numpy()
    if array.ndim != 3:
        raise ValueError(f"x: expected shape (batch, time, features), got {tuple(array.shape)}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".npz":
        np.savez(path, x=array)
    elif suffix == ".csv":
        if array.shape[0] != 1:
            raise ValueError(
                f"x: a .csv file holds one sequence, expected shape (1, time, features), got "
                f"{tuple(array.shape)}; use .npy or .npz for several sequences"
            )
        header = ",".join(f"x{j}" for j in range(array.shape[2]))
        np.savetxt(path, array[0], delimiter=",", header=header, comments="", fmt="%.17g")
    else:
        raise ValueError(f"path: expected a .csv, .npy or .npz file name, got {path.name!r}")
    return path
