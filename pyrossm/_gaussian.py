"""Small Gaussian and linear-algebra helpers shared by the Kalman functions, the guides, the
nonlinear filters and the samplers (column vectors: ``mv(A, z)`` is ``A @ z`` for a batch)."""

from __future__ import annotations

import math

import torch

__all__ = ["LOG_2PI", "cholesky", "gaussian_log_density", "mv", "sym"]

LOG_2PI = math.log(2 * math.pi)


def sym(P: torch.Tensor) -> torch.Tensor:
    """The symmetric part ``(P + Pᵀ) / 2`` of ``(..., n, n)`` matrices."""
    return 0.5 * (P + P.transpose(-1, -2))


def mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product: ``M (..., m, n)`` times ``v (..., n)`` -> ``(..., m)``."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def cholesky(M: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor without the per-call error check.

    ``cholesky_ex`` skips the synchronising check (milliseconds per small matrix under OpenMP);
    a failure shows up as non-finite results, which callers check once.
    """
    return torch.linalg.cholesky_ex(M)[0]


def gaussian_log_density(v: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``log N(v; 0, L Lᵀ)`` for residuals ``v (..., p)`` and Cholesky factors ``L (..., p, p)``.

    >>> v, L = torch.zeros(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64)
    >>> float(gaussian_log_density(v, L))  # -log(2 pi) / 2
    -0.9189385332046727
    """
    w = torch.linalg.solve_triangular(L, v.unsqueeze(-1), upper=False).squeeze(-1)
    half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (w.pow(2).sum(-1) + v.shape[-1] * LOG_2PI) - half_logdet
