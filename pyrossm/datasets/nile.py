"""The Nile series: annual flow of the Nile at Aswan, 1871–1970 (100 values, 10^8 m^3).

Public domain; the values are those of ``statsmodels.datasets.nile`` (Cobb 1978; Durbin &
Koopman 2012, *Time Series Analysis by State Space Methods*, ch. 2), shipped with pyrossm as
``pyrossm/datasets/nile.csv`` so no download is needed.
"""

from __future__ import annotations

import csv
import io
from importlib import resources
from typing import NamedTuple

import torch

__all__ = ["NileData", "load_nile", "nile_tensor"]


class NileData(NamedTuple):
    """The Nile series: ``years`` (100,) long, 1871..1970, and ``flow`` (100,) float64."""

    years: torch.Tensor
    flow: torch.Tensor

    def to_tensor(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The flow as one sequence of shape ``(batch=1, time=100, obs_dim=1)`` (time at dim -2)."""
        return self.flow.to(device=device, dtype=dtype).reshape(1, -1, 1)


def load_nile() -> NileData:
    """Load the Nile series (annual flow at Aswan, 1871–1970) from the package data.

    Used with the local-level model x_t = μ_t + ε_t, μ_{t+1} = μ_t + η_t
    (Durbin & Koopman 2012, ch. 2; MLE σ²_ε ≈ 15099, σ²_η ≈ 1469.1).

    >>> nile = load_nile()
    >>> nile.years[0].item(), nile.years[-1].item(), nile.flow[0].item()
    (1871, 1970, 1120.0)
    >>> nile.to_tensor(torch.float32).shape
    torch.Size([1, 100, 1])
    """
    text = resources.files(__package__).joinpath("nile.csv").read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], [r for r in rows[1:] if r]
    if header != ["year", "flow"]:
        raise RuntimeError(f"nile.csv: unexpected header {header}; the package data is damaged")
    years = torch.tensor([int(r[0]) for r in body], dtype=torch.long)
    flow = torch.tensor([float(r[1]) for r in body], dtype=torch.float64)
    return NileData(years=years, flow=flow)


def nile_tensor(
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """The Nile flow as a tensor of shape ``(batch=1, time=100, obs_dim=1)`` (time at dim -2).

    >>> nile_tensor().shape, nile_tensor().dtype
    (torch.Size([1, 100, 1]), torch.float64)
    """
    return load_nile().to_tensor(dtype=dtype, device=device)
