"""Data-directory resolution, checksums, the download cache and the error messages."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from pyrossm.datasets import (
    KNOWN_FILES,
    RemoteFile,
    _files,
    cache_dir,
    fetch_file,
    load_jsb_chorales,
    load_ptb,
    search_dirs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _register(monkeypatch, name: str, content: bytes, url: str | None = None) -> str:
    """Make ``name`` a known file whose digest is that of ``content``."""
    digest = hashlib.sha256(content).hexdigest()
    monkeypatch.setitem(KNOWN_FILES, name, RemoteFile(digest, url, f"test file {name}"))
    return digest


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- where files are looked for ------------------------------------------------------------


def test_search_order_argument_env_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(_files.DATA_DIR_ENV, str(tmp_path / "env"))
    assert search_dirs(tmp_path / "arg") == [tmp_path / "arg", cache_dir()]
    assert search_dirs() == [tmp_path / "env", cache_dir()]
    monkeypatch.delenv(_files.DATA_DIR_ENV)
    assert search_dirs() == [cache_dir()]


def test_cache_dir_from_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv(_files.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv(_files.CACHE_DIR_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pyrossm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pyrossm"


def test_env_data_dir_is_used(tmp_path, monkeypatch):
    content = b"a b c\n"
    _register(monkeypatch, "ptb.valid.txt", content)
    (tmp_path / "ptb.valid.txt").write_bytes(content)
    monkeypatch.setenv(_files.DATA_DIR_ENV, str(tmp_path))
    assert fetch_file("ptb.valid.txt") == tmp_path / "ptb.valid.txt"
    assert load_ptb("valid") == [["a", "b", "c"]]


def test_import_does_no_work(tmp_path):
    env = dict(
        os.environ,
        HOME=str(tmp_path / "home"),
        PYROSSM_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONPATH=str(REPO_ROOT),
    )
    env.pop("XDG_CACHE_HOME", None)
    code = (
        "import urllib.request\n"
        "def refuse(*a, **k): raise AssertionError('download at import')\n"
        "urllib.request.urlopen = refuse\n"
        "import pyrossm.datasets\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path)
    assert _leftovers(tmp_path) == []


# --- missing files -----------------------------------------------------------------------


def test_missing_file_message_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fetch_file("ptb.valid.txt", tmp_path, download=False)
    message = str(info.value)
    for needle in (
        "ptb.valid.txt",
        str(tmp_path),
        str(cache_dir()),
        _files.DATA_DIR_ENV,
        "data_dir",
        KNOWN_FILES["ptb.valid.txt"].sha256,
        "download=False",
    ):
        assert needle in message


def test_missing_file_unreachable_url(tmp_path, monkeypatch):
    def unreachable(url, out, timeout=None):
        out.write(b"partial")
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(_files, "_fetch", unreachable)
    with pytest.raises(FileNotFoundError, match="no route to host") as info:
        load_jsb_chorales("train", data_dir=tmp_path)
    assert "jsb_chorales.pickle" in str(info.value)
    assert _leftovers(cache_dir()) == []  # no partial file left behind


def test_offline_env_disables_download(tmp_path, monkeypatch):
    monkeypatch.setenv(_files.OFFLINE_ENV, "1")

    def refuse(url, out, timeout=None):
        raise AssertionError("downloaded although offline")

    monkeypatch.setattr(_files, "_fetch", refuse)
    with pytest.raises(FileNotFoundError, match=_files.OFFLINE_ENV):
        load_ptb("test", data_dir=tmp_path)


def test_file_without_url(tmp_path, monkeypatch):
    _register(monkeypatch, "ptb.test.txt", b"x\n", url=None)
    with pytest.raises(FileNotFoundError, match="No download URL"):
        fetch_file("ptb.test.txt", tmp_path)


def test_bad_names_and_splits(tmp_path):
    with pytest.raises(ValueError, match="name: expected one of"):
        fetch_file("nope.txt", tmp_path)
    with pytest.raises(ValueError, match="split: expected one of"):
        load_ptb("validation", tmp_path)
    with pytest.raises(ValueError, match="split: expected one of"):
        load_jsb_chorales("dev", tmp_path)


# --- checksums -----------------------------------------------------------------------------


def test_checksum_mismatch_names_file_and_digests(tmp_path, monkeypatch):
    expected = _register(monkeypatch, "ptb.train.txt", b"the original\n")
    bad = b"the corrupted\n"
    (tmp_path / "ptb.train.txt").write_bytes(bad)
    with pytest.raises(ValueError) as info:
        load_ptb("train", tmp_path)
    message = str(info.value)
    assert "ptb.train.txt" in message
    assert expected in message
    assert hashlib.sha256(bad).hexdigest() in message


def test_corrupted_copy_of_real_file(tmp_path, shared_file):
    data = bytearray(shared_file("ptb.valid.txt").read_bytes())
    data[100] ^= 0x01
    (tmp_path / "ptb.valid.txt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch for 'ptb.valid.txt'"):
        load_ptb("valid", tmp_path)


def test_embedded_sums_match_shared_sha256sums(shared_file):
    lines = shared_file("SHA256SUMS").read_text().split("\n")
    sums = {name: digest for digest, name in (line.split() for line in lines if line.strip())}
    assert sums == {name: spec.sha256 for name, spec in KNOWN_FILES.items()}


def test_sha256_of_real_file(shared_file):
    path = shared_file("ptb.test.txt")
    assert _files.sha256sum(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --- the download cache ------------------------------------------------------------------


def test_download_into_cache_from_file_url(tmp_path, monkeypatch):
    content = b"one two\n\n  three  \n"
    source = tmp_path / "remote" / "ptb.valid.txt"
    source.parent.mkdir()
    source.write_bytes(content)
    _register(monkeypatch, "ptb.valid.txt", content, url=source.as_uri())
    empty = tmp_path / "empty"
    assert not cache_dir().exists()

    path = fetch_file("ptb.valid.txt", empty)
    assert path == cache_dir() / "ptb.valid.txt"
    assert path.read_bytes() == content
    assert _leftovers(cache_dir()) == ["ptb.valid.txt"]  # no temporary file left

    def refuse(url, out, timeout=None):
        raise AssertionError("downloaded again although cached")

    monkeypatch.setattr(_files, "_fetch", refuse)
    assert load_ptb("valid", empty) == [["one", "two"], ["three"]]


def test_download_with_wrong_checksum_is_discarded(tmp_path, monkeypatch):
    source = tmp_path / "ptb.test.txt"
    source.write_bytes(b"tampered\n")
    expected = _register(monkeypatch, "ptb.test.txt", b"genuine\n", url=source.as_uri())
    with pytest.raises(ValueError, match=expected):
        fetch_file("ptb.test.txt", tmp_path / "empty")
    assert _leftovers(cache_dir()) == []


def test_download_via_monkeypatched_fetch(tmp_path, monkeypatch):
    content = pickle.dumps({"train": [[(60,)]], "valid": [], "test": []})
    _register(monkeypatch, "jsb_chorales.pickle", content, url="https://example.invalid/x")
    calls = []

    def fake_fetch(url, out, timeout=None):
        calls.append(url)
        out.write(content)

    monkeypatch.setattr(_files, "_fetch", fake_fetch)
    data = load_jsb_chorales("train", tmp_path / "empty")
    assert calls == ["https://example.invalid/x"]
    assert data.piano_rolls.shape == (1, 1, 88) and data.piano_rolls[0, 0, 60 - 21] == 1


# --- parsing, on small synthetic files -----------------------------------------------------


def test_ptb_parsing(tmp_path, monkeypatch):
    content = b" the cat <unk> \n\n   \nN dogs\t ran\n"
    _register(monkeypatch, "ptb.train.txt", content)
    (tmp_path / "ptb.train.txt").write_bytes(content)
    assert load_ptb("train", tmp_path) == [["the", "cat", "<unk>"], ["N", "dogs", "ran"]]


def test_jsb_piano_roll_layout(tmp_path, monkeypatch):
    import numpy as np

    raw = {
        "train": [[(21, 108), (), (60, 64, 67)], [(np.int64(72),)]],
        "valid": [[(50,)]],
        "test": [[(50,)]],
    }
    content = pickle.dumps(raw)
    _register(monkeypatch, "jsb_chorales.pickle", content)
    (tmp_path / "jsb_chorales.pickle").write_bytes(content)
    data = load_jsb_chorales("train", tmp_path, dtype=torch.float64)
    rolls, lengths, mask = data
    assert rolls.shape == (2, 3, 88) and rolls.dtype == torch.float64
    assert lengths.tolist() == [3, 1] and lengths.dtype == torch.long
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    expected = torch.zeros(2, 3, 88, dtype=torch.float64)
    for n, t, p in [(0, 0, 21), (0, 0, 108), (0, 2, 60), (0, 2, 64), (0, 2, 67), (1, 0, 72)]:
        expected[n, t, p - 21] = 1
    assert torch.equal(rolls, expected)


def test_jsb_rejects_out_of_range_pitch_and_int_dtype(tmp_path, monkeypatch):
    content = pickle.dumps({"train": [[(20,)]], "valid": [], "test": []})
    _register(monkeypatch, "jsb_chorales.pickle", content)
    (tmp_path / "jsb_chorales.pickle").write_bytes(content)
    with pytest.raises(ValueError, match="pitch 20"):
        load_jsb_chorales("train", tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_jsb_chorales("train", tmp_path, dtype=torch.int64)
