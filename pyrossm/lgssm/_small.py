"""Solves with many small symmetric positive definite matrices, batch laid out last.

``torch.linalg.cholesky`` / ``cholesky_solve`` on a batch of ``M`` 4 × 4 matrices call LAPACK
once per matrix (about 2 µs each on a CPU): for the ``B × T`` predicted covariances of a
smoother with missing data (256 × 1000) that is half a second. Here the factorisation and the
two triangular solves are written out entry by entry over the whole batch, each entry one
vectorised operation on a contiguous ``(M,)`` or ``(k, M)`` row: about ``n³/3 + n² k``
operations for the batch, whatever ``M``. Differentiable (plain torch operations).
"""

from __future__ import annotations

import torch

# Up to this size the unrolled factorisation is used (its operation count grows as n³).
MAX_DIM = 8
# Below this many matrices LAPACK's per-matrix loop is cheaper than the unrolled operations.
MIN_BATCH = 256


def use_unrolled(P):
    """Whether :func:`spd_solve` pays for ``P (..., n, n)`` (many small matrices)."""
    n = P.shape[-1]
    return n <= MAX_DIM and P[..., 0, 0].numel() >= MIN_BATCH


def spd_solve(P, B):
    """``X = P⁻¹ B`` for symmetric positive definite ``P (..., n, n)`` and ``B (..., n, k)``
    (batch dims broadcast), by the Cholesky factorisation ``P = L Lᵀ``; also returns the
    squared pivots ``L_jj²`` ``(..., n)`` (a pivot near 0 means ``P`` is near singular; the
    solution is then not finite or not accurate, and the caller decides). Reads only the lower
    triangle of ``P``.
    """
    n, k = P.shape[-1], B.shape[-1]
    batch = torch.broadcast_shapes(P.shape[:-2], B.shape[:-2])
    Pl = P.expand(batch + (n, n)).reshape(-1, n, n).permute(1, 2, 0).contiguous()  # (n, n, M)
    Bl = B.expand(batch + (n, k)).reshape(-1, n, k).permute(1, 2, 0).contiguous()  # (n, k, M)
    L = [[None] * n for _ in range(n)]
    inv = [None] * n  # 1 / L_jj
    pivots = []
    for j in range(n):
        s = Pl[j, j]
        for q in range(j):
            s = torch.addcmul(s, L[j][q], L[j][q], value=-1)
        pivots.append(s)
        inv[j] = torch.rsqrt(s)
        L[j][j] = s * inv[j]
        for i in range(j + 1, n):
            t = Pl[i, j]
            for q in range(j):
                t = torch.addcmul(t, L[i][q], L[j][q], value=-1)
            L[i][j] = t * inv[j]
    # L Y = B, row by row (each row (k, M)), then Lᵀ X = Y from the last row up
    Y = []
    for i in range(n):
        t = Bl[i]
        for q in range(i):
            t = torch.addcmul(t, L[i][q], Y[q], value=-1)
        Y.append(t * inv[i])
    X = [None] * n
    for i in range(n - 1, -1, -1):
        t = Y[i]
        for q in range(i + 1, n):
            t = torch.addcmul(t, L[q][i], X[q], value=-1)
        X[i] = t * inv[i]
    X = torch.stack(X, 0).permute(2, 0, 1).contiguous().reshape(batch + (n, k))  # batch first
    pivots = torch.stack(pivots, -1).reshape(batch + (n,))
    return X, pivots
