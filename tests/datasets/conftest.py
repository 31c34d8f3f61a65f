"""Fixtures for the data-layer tests.

* Every test gets an empty cache directory (``PYROSSM_CACHE_DIR``) and no ``PYROSSM_OFFLINE``,
  and the fetch function refuses anything but ``file://`` URLs: tests never download.
* ``shared_file(name)`` returns the path of a real benchmark file from ``$PYROSSM_DATA_DIR`` or,
  in tests only, ``<repo>/../shared/data``; the test is skipped (with the reason) when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyrossm.datasets import _files

REPO_ROOT = Path(__file__).resolve().parents[2]
FALLBACK_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv(_files.CACHE_DIR_ENV, str(tmp_path / "pyrossm-cache"))
    monkeypatch.delenv(_files.OFFLINE_ENV, raising=False)
    real_fetch = _files._fetch

    def local_only_fetch(url, out, timeout=_files.DOWNLOAD_TIMEOUT_SECONDS):
        if not url.startswith("file://"):
            raise AssertionError(f"a test tried to download {url}")
        return real_fetch(url, out, timeout)

    monkeypatch.setattr(_files, "_fetch", local_only_fetch)


def shared_data_dir() -> Path:
    env = os.environ.get(_files.DATA_DIR_ENV)
    return Path(env) if env else FALLBACK_DATA_DIR


@pytest.fixture
def shared_file():
    def get(name: str) -> Path:
        path = shared_data_dir() / name
        if not path.is_file():
            pytest.skip(
                f"real data file {name} not found in {shared_data_dir()} (set "
                f"{_files.DATA_DIR_ENV} to the folder holding it, e.g. ../shared/data)"
            )
        return path

    return get
