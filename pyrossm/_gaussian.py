"""Small Gaussian and linear-algebra helpers shared by the Kalman functions, the guides, the
nonlinear filters and the samplers (column vectors: ``mv(A, z)`` is ``A @ z`` for a batch)."""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "LOG_2PI", "broadcast_shapes", "cholesky", "congruence", "gaussian_log_density", "mv",
    "shared_times", "sym", "times_shared",
]

LOG_2PI = math.log(2 * math.pi)


def sym(P: torch.Tensor) -> torch.Tensor:
    """The symmetric part ``(P + Pᵀ) / 2`` of ``(..., n, n)`` matrices."""
    return 0.5 * (P + P.transpose(-1, -2))


# Up to this inner size congruence() uses the Kronecker form (its operator has m(m+1)/2 x n²
# entries; for n = 4 one (r, 16) @ (16, 10) product instead of two batched 4 x 4 products).
_KRON_MAX_DIM = 8


@functools.lru_cache(maxsize=64)
def _upper_index(m: int, device: torch.device):
    """The flat positions ``i m + j`` of the upper triangle (i <= j) of an m x m matrix, and
    for every entry (i, j) the position of (min(i, j), max(i, j)) among them. (Cached: made as
    normal tensors even under ``torch.inference_mode()``, so that later calls with autograd can
    use them.)"""
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(m, m, device=device)
        pos = torch.empty(m, m, dtype=torch.long, device=device)
        pos[rows, cols] = torch.arange(rows.numel(), device=device)
        pos[cols, rows] = pos[rows, cols]
        return rows * m + cols, pos.flatten()


def congruence(M: torch.Tensor, P: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``sym(M P Mᵀ + add)`` for one matrix ``M (m, n)`` and many ``P (..., n, n)`` (``add``
    ``(m, m)`` or broadcastable to the result, or None), exactly symmetric.

    For small n all of them are one matrix product, ``vec(M P Mᵀ) = (M ⊗ M) vec(P)``, over the
    upper triangle only (then mirrored): a batched ``M @ P`` with a shared left factor runs as
    one small product per matrix (999 of 4 x 4 with the sandwich and ``sym``: about 140 µs),
    this as one GEMM (about 50 µs in all). Differentiable."""
    m, n = M.shape
    if n > _KRON_MAX_DIM or P.dim() < 3:
        out = M @ P @ M.mT
        return sym(out if add is None else out + add)
    upper, pos = _upper_index(m, M.device)
    # K[(i, j), (k, l)] = (M_ik M_jl + M_il M_jk) / 2: M sym(P) Mᵀ, so that the values and
    # the gradients are those of sym(M P Mᵀ + add) for any P and add (the gradients
    # symmetric), not only for symmetric ones
    K = torch.kron(M, M).view(m * m, n, n)
    K = (0.5 * (K + K.mT)).reshape(m * m, n * n).index_select(0, upper)
    y = P.reshape(-1, n * n) @ K.mT  # (r, m(m+1)/2)
    if add is not None:
        if add.dim() == 2:
            y = y + (0.5 * (add + add.mT)).reshape(m * m).index_select(0, upper)
        else:
            add = 0.5 * (add + add.mT)
            y = y + add.expand(P.shape[:-2] + (m, m)).reshape(-1, m * m).index_select(1, upper)
    return y.index_select(1, pos).reshape(P.shape[:-2] + (m, m))


# Below this many rows in all (128 matrices of 4 x 4) a batched product is as fast as building
# the block-diagonal operator and running one GEMM.
_SHARED_MIN_ROWS = 512


def times_shared(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``X @ M`` for many small ``X (..., r, c)`` and one ``M (c, d)``, as one GEMM: ``X``'s
    rows are already the rows of one matrix, but BLAS runs a product with 4 columns at a
    third of the speed of one with 16, so ``g`` rows are taken at a time, times g copies of
    ``M`` on a block diagonal (1000 4 x 4 products: 20 µs as one (4000, 4) product, 7 µs so;
    as a batched product 56 µs). Differentiable."""
    c, d = M.shape
    rows = X.numel() // c
    if X.dim() < 3 or c > 8 or rows < _SHARED_MIN_ROWS or not X.is_contiguous():
        return X @ M
    g = max(1, 16 // c)
    while rows % g:
        g //= 2
    out = X.reshape(rows // g, g * c) @ (torch.block_diag(*[M] * g) if g > 1 else M)
    return out.view(X.shape[:-1] + (d,))


def shared_times(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M @ X`` for one ``M (q, r)`` and many small ``X (..., r, c)``, as one GEMM over the
    flattened matrices: ``vec_rows(M X) = vec_rows(X) (Mᵀ ⊗ I_c)`` (a batched product with a
    shared left factor runs one small product per matrix: 1000 4 x 4 products 56 vs 7 µs).
    Differentiable."""
    q, r = M.shape
    c = X.shape[-1]
    if X.dim() < 3 or r * c > 64 or X.numel() < _SHARED_MIN_ROWS * c or not X.is_contiguous():
        return M @ X
    eye = torch.eye(c, dtype=M.dtype, device=M.device)
    op = (M.mT[:, None, :, None] * eye[None, :, None, :]).reshape(r * c, q * c)  # Mᵀ ⊗ I_c
    return (X.reshape(-1, r * c) @ op).view(X.shape[:-2] + (q, c))


def broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` for shapes given as tuples, in plain Python (torch's runs
    through its reference implementation: 19 µs a call; a Kalman call makes about ten).
    Raises ``RuntimeError`` as torch's does."""
    first = shapes[0] if shapes else ()
    if all(s == first for s in shapes):
        return torch.Size(first)
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for s in shapes:
        offset = ndim - len(s)
        for i, size in enumerate(s):
            have = out[offset + i]
            if size == have or size == 1:
                continue
            if have != 1:
                raise RuntimeError(
                    f"Shape mismatch: objects cannot be broadcast to a single shape: {shapes}")
            out[offset + i] = size
    return torch.Size(out)


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
