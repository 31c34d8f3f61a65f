"""Atomic, checksummed checkpoints.

File format (one file, so a checkpoint is either wholly there or not at all)::

    b"PYROSSM-CHECKPOINT 1\\n"
    b"sha256 <64 hex digits> <payload size in bytes>\\n"
    <payload: torch.save of a dict of tensors / numbers / strings / lists / dicts>

:func:`save_checkpoint` writes to a temporary file in the same directory, ``fsync`` s it, then
``os.replace`` s it over the target (atomic on POSIX) and ``fsync`` s the directory; a crash
leaves the previous file intact. :func:`load_checkpoint` checks header, size and checksum and
raises :class:`CheckpointError` naming the file and what is wrong; the payload is read with
``torch.load(weights_only=True)`` (no arbitrary pickles).

:class:`CheckpointManager` keeps the last ``keep`` checkpoints of a run in a directory
(``checkpoint-000003.pt`` = state after epoch 3) and :meth:`CheckpointManager.latest` returns the
newest one that verifies, warning about (and skipping) a corrupt newer one.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> path = save_checkpoint(os.path.join(d, "c.pt"), {"epoch": 3, "w": torch.ones(2)})
>>> load_checkpoint(path)["epoch"]
3
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import tempfile
import warnings

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

_MAGIC = b"PYROSSM-CHECKPOINT 1\n"
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a pyrossm checkpoint."""


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, payload: dict) -> str:
    """Write ``payload`` to ``path`` atomically with a sha256 checksum; returns the path."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload: expected a dict, got {type(payload).__name__}")
    path = os.fspath(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    header = _MAGIC + f"sha256 {digest} {len(data)}\n".encode()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return path


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    :raises CheckpointError: missing file, wrong header, truncated payload or checksum mismatch.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_MAGIC):
        raise CheckpointError(f"checkpoint {path!r}: not a pyrossm checkpoint (bad header)")
    end = raw.find(b"\n", len(_MAGIC))
    fields = raw[len(_MAGIC):end].decode("ascii", "replace").split() if end > 0 else []
    if len(fields) != 3 or fields[0] != "sha256" or not fields[2].isdigit():
        raise CheckpointError(f"checkpoint {path!r}: truncated or corrupt header")
    data = raw[end + 1:]
    size = int(fields[2])
    if len(data) != size:
        raise CheckpointError(
            f"checkpoint {path!r}: truncated or padded payload: expected {size} bytes, "
            f"found {len(data)}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != fields[1]:
        raise CheckpointError(
            f"checkpoint {path!r}: checksum mismatch (sha256 {digest} != stored {fields[1]}); "
            f"the file is corrupt"
        )
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # pragma: no cover - checksum passed, so this is a format problem
        raise CheckpointError(f"checkpoint {path!r}: cannot be read: {e}") from e


class CheckpointManager:
    """The checkpoints of one run in ``directory``; keeps the newest ``keep`` files.

    :param directory: created on the first :meth:`save`.
    :param keep: number of checkpoints kept (at least 2, so a corrupt newest one has a
        predecessor).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if int(keep) < 1:
            raise ValueError(f"keep: expected a positive integer, got {keep}")
        self.directory = os.fspath(directory)
        self.keep = int(keep)

    def path(self, epoch: int) -> str:
        return os.path.join(self.directory, f"checkpoint-{int(epoch):06d}.pt")

    def paths(self) -> list[str]:
        """Existing checkpoint files, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.directory, name)))
        return [p for _, p in sorted(found)]

    def save(self, payload: dict, epoch: int) -> str:
        """Write the checkpoint of ``epoch`` atomically, then delete all but the newest ``keep``."""
        path = save_checkpoint(self.path(epoch), payload)
        for old in self.paths()[: -self.keep]:
            try:
                os.unlink(old)
            except OSError:  # pragma: no cover
                pass
        return path

    def latest(self, map_location=None) -> tuple[str, dict] | None:
        """``(path, payload)`` of the newest checkpoint that verifies, or None if there is none.

        A newer file that fails verification is reported with a warning and skipped (it is kept
        on disk for inspection).
        """
        for path in reversed(self.paths()):
            try:
                return path, load_checkpoint(path, map_location=map_location)
            except CheckpointError as e:
                warnings.warn(f"skipping a corrupt checkpoint: {e}", RuntimeWarning)
        return None


def rng_state() -> dict:
    """The torch, numpy, python (and CUDA) random states, as checkpoint-friendly values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the random states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
