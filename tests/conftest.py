"""Test fixtures shared by the whole suite.

Like Pyro's own ``tests/conftest.py``: before every test the global RNGs are seeded and
Pyro's parameter store is cleared, so tests are independent of their order.
"""

import os

import numpy as np
import pyro
import pytest
import torch

# No test downloads anything or writes to the user's cache: the loaders run offline and a
# test that needs a real data file finds it through PYROSSM_DATA_DIR or skips.
os.environ.setdefault("PYROSSM_OFFLINE", "1")

# Keep the suite predictable on the 2-core CI machine: one torch thread by default. With two,
# OpenMP threads spin against each other on a loaded machine (a 300-epoch DMM slow test took
# over 20 minutes with 2 threads at load 3-5, against 60 s with 1). PYROSSM_TEST_THREADS=2 to
# compare.
torch.set_num_threads(int(os.environ.get("PYROSSM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PYROSSM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def one_thread():
    """One torch thread for the test: batched small-matrix work is fastest single-threaded
    (OpenMP threads spin on a loaded machine, and the CI machine's 2 cores are shared). Use it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_clear_param_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # seeds torch, numpy and random
    np.random.seed(0)
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
