"""The Nile series shipped with the package."""

from __future__ import annotations

import pytest
import torch

from pyrossm.datasets import NileData, load_nile, nile_tensor


def test_nile_values():
    nile = load_nile()
    assert isinstance(nile, NileData)
    assert nile.years.tolist() == list(range(1871, 1971))
    assert nile.flow.shape == (100,) and nile.flow.dtype == torch.float64
    assert nile.flow[:3].tolist() == [1120.0, 1160.0, 963.0]
    assert nile.flow[-1].item() == 740.0
    assert nile.flow.min().item() == 456.0  # 1913
    assert nile.years[nile.flow.argmin()].item() == 1913


def test_nile_matches_statsmodels():
    nile_module = pytest.importorskip("statsmodels.datasets.nile")
    frame = nile_module.load_pandas().data
    assert load_nile().years.tolist() == frame["year"].astype(int).tolist()
    assert load_nile().flow.tolist() == frame["volume"].astype(float).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nile_tensor(dtype):
    x = nile_tensor(dtype=dtype)
    assert x.shape == (1, 100, 1) and x.dtype == dtype
    assert torch.equal(x[0, :, 0], load_nile().flow.to(dtype))
    assert torch.equal(load_nile().to_tensor(dtype), x)
