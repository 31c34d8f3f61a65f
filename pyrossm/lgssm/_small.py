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

from pyrossm._gaussian import broadcast_shapes

from ._workspace import scratch

# Up to this size the unrolled factorisation is used (its operation count grows as n³).
MAX_DIM = 8
# Below this many matrices LAPACK's per-matrix loop is cheaper than the unrolled operations.
MIN_BATCH = 256


def use_unrolled(P, min_batch=MIN_BATCH):
    """Whether :func:`spd_solve` pays for ``P (..., n, n)`` (many small matrices). The
    filter's factorisation, solve and triangular inverse of the innovation covariances
    together pay from about 2,000 matrices (4 x 4: equal at 1,000, 3x faster at 10,000)."""
    n = P.shape[-1]
    return n <= MAX_DIM and P[..., 0, 0].numel() >= min_batch


def lower_inverse_pays(L):
    """Whether :func:`lower_inverse` is cheaper than LAPACK's triangular solve for ``L (...,
    n, n)``: its cost barely grows with the batch, LAPACK's does (one thread; 1,000 matrices
    of 4 x 4: 71 vs 106 µs, 256: 67 vs 31 µs; 1 x 1 and 2 x 2 pay from 256 matrices, 8 x 8
    from about 2,000)."""
    n = L.shape[-1]
    need = 256 if n <= 2 else 600 if n <= 4 else 2048
    return n <= MAX_DIM and L[..., 0, 0].numel() >= need


def _factor(Pl, n):
    """Cholesky of ``Pl (n, n, M)`` (batch last): rows of ``L`` (``[i][j]``, (M,) each; None
    above the diagonal), ``1 / L_jj`` and the squared pivots ``L_jj²``."""
    L = [[None] * n for _ in range(n)]
    inv, pivots = [None] * n, []
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
    return L, inv, pivots


def spd_solve(P, B, return_factor=False):
    """``X = P⁻¹ B`` for symmetric positive definite ``P (..., n, n)`` and ``B (..., n, k)``
    (batch dims broadcast), by the Cholesky factorisation ``P = L Lᵀ``; also returns the
    squared pivots ``L_jj²`` ``(..., n)`` (a pivot near 0 means ``P`` is near singular; the
    solution is then not finite or not accurate, and the caller decides), and with
    ``return_factor`` the lower factor ``L (..., n, n)`` too. Reads only the lower triangle
    of ``P``.
    """
    n, k = P.shape[-1], B.shape[-1]
    batch = broadcast_shapes(P.shape[:-2], B.shape[:-2])
    Pl = _batch_last_copy(P.expand(batch + (n, n)).reshape(-1, n, n), "small.P")  # (n, n, M)
    Bl = _batch_last_copy(B.expand(batch + (n, k)).reshape(-1, n, k), "small.B")  # (n, k, M)
    L, inv, pivots = _factor(Pl, n)
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
    if not return_factor:
        return X, pivots
    return X, pivots, _batch_first(_fill_upper(L, Pl[0, 0]), batch)


def _batch_last_copy(M, name):
    """``(M, r, c)`` -> contiguous ``(r, c, M)``; without autograd in a buffer reused between
    calls (:mod:`._workspace`: the copies are as large as the inputs, fresh memory otherwise).
    Only the factorisation reads it: nothing returned is a view of it."""
    src = M.permute(1, 2, 0)
    if torch.is_grad_enabled() and M.requires_grad:
        return src.contiguous()
    return scratch(name, src.shape, src.dtype, src.device).copy_(src)


def _fill_upper(L, like):
    zero = torch.zeros_like(like)
    return [[L[i][j] if j <= i else zero for j in range(len(L))] for i in range(len(L))]


def _batch_last(M):
    """``(..., r, c)`` -> rows ``[[M_ij (M,)]]`` over the flattened batch, and the batch."""
    batch, (r, c) = M.shape[:-2], M.shape[-2:]
    Ml = M.reshape(-1, r, c).permute(1, 2, 0).contiguous()
    return [[Ml[i, j] for j in range(c)] for i in range(r)], batch


def _batch_first(rows, batch):
    return torch.stack([torch.stack(r, 0) for r in rows], 0).permute(2, 0, 1).reshape(
        batch + (len(rows), len(rows[0])))


def cholesky_lower(S):
    """The lower Cholesky factor of symmetric positive definite ``S (..., n, n)``, written out
    entry by entry over the batch (as :func:`spd_solve`; reads the lower triangle). A matrix
    that is not positive definite gives non-finite entries, as ``torch.linalg.cholesky_ex``
    does (callers check once)."""
    n = S.shape[-1]
    Sl = S.reshape(-1, n, n).permute(1, 2, 0).contiguous()  # (n, n, M)
    L, _, _ = _factor(Sl, n)
    return _batch_first(_fill_upper(L, Sl[0, 0]), S.shape[:-2])


def lower_inverse(L):
    """``L⁻¹`` of lower triangular ``L (..., n, n)`` (nonzero diagonal), column by column,
    entry by entry over the batch."""
    n = L.shape[-1]
    Ll, batch = _batch_last(L)
    zero = torch.zeros_like(Ll[0][0])
    inv = [1 / Ll[j][j] for j in range(n)]
    Li = [[zero] * n for _ in range(n)]
    for j in range(n):
        Li[j][j] = inv[j]
        for i in range(j + 1, n):
            t = Ll[i][j] * inv[j]
            for q in range(j + 1, i):
                t = torch.addcmul(t, Ll[i][q], Li[q][j])
            Li[i][j] = -t * inv[i]
    return _batch_first(Li, batch)
