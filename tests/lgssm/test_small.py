"""Batch-last solves with many small SPD matrices (``pyrossm.lgssm._small``), against LAPACK,
and the smoother that uses them against the same smoother on torch's batched Cholesky."""

import pytest
import torch
from lgssm_oracles import assert_rel_close, random_system

from pyrossm.lgssm import _small, kalman_smoother

ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")


def _spd(batch, n, g):
    F = torch.randn(batch + (n, n), generator=g, dtype=torch.float64)
    return F @ F.mT + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n,k", [(1, 1), (2, 3), (4, 4), (5, 2), (8, 8)])
def test_spd_solve_equals_lapack(n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    P = _spd((3, 7), n, g)
    B = torch.randn(7, n, k, generator=g, dtype=torch.float64)  # broadcasts over the 3
    X, piv = _small.spd_solve(P, B)
    assert X.shape == (3, 7, n, k) and piv.shape == (3, 7, n)
    torch.testing.assert_close(X, torch.linalg.solve(P, B.expand(3, 7, n, k)), rtol=1e-10,
                               atol=1e-12)
    L = torch.linalg.cholesky(P)
    torch.testing.assert_close(piv, torch.diagonal(L, dim1=-2, dim2=-1) ** 2)


def test_spd_solve_reads_the_lower_triangle_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    P = _spd((4,), 3, g)
    B = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    junk = P + torch.triu(torch.randn(4, 3, 3, generator=g, dtype=torch.float64), 1)
    torch.testing.assert_close(_small.spd_solve(junk, B)[0], _small.spd_solve(P, B)[0])
    P.requires_grad_()
    B.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, b: _small.spd_solve(p + p.mT, b)[0], (P, B))


def test_singular_matrix_shows_in_the_pivots():
    P = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)).expand(300, 3, 3)
    X, piv = _small.spd_solve(P, torch.ones(300, 3, 1, dtype=torch.float64))
    assert (piv[:, 1] == 0).all() and not torch.isfinite(X).all()


@pytest.mark.parametrize("missing", ["none", "entries"])
@pytest.mark.parametrize("singular", [False, True])
def test_smoother_with_unrolled_gains_equals_lapack_gains(missing, singular, monkeypatch):
    """B × T = 400 predicted covariances (above MIN_BATCH): the smoother's moments and
    gradients equal those with torch's batched Cholesky (MIN_BATCH raised), with NaN entries
    or without, and with singular predicted covariances (Q, init_cov singular: pseudo-inverse
    gains) or without."""
    s = random_system(3, 2, 100, seed=4, batch=(4,), missing=missing)
    if singular:  # the third state coordinate is deterministic and starts known
        s["Q"] = s["Q"].clone()
        s["Q"][2, :] = 0
        s["Q"][:, 2] = 0
        s["init_cov"] = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
        s["A"] = torch.diag(torch.tensor([0.9, 0.5, 1.0], dtype=torch.float64))

    def run():
        A = s["A"].clone().requires_grad_()
        res = kalman_smoother(s["x"], A, *[s[k] for k in ARGS[2:]])
        (res.smoothed_means.sum() + res.smoothed_covs.sum()).backward()
        return res, A.grad

    assert _small.use_unrolled(torch.zeros(4, 99, 3, 3))
    fast, g_fast = run()
    monkeypatch.setattr(_small, "MIN_BATCH", 10**9)
    ref, g_ref = run()
    for key in ("smoothed_means", "smoothed_covs", "smoothed_cross_covs"):
        assert torch.isfinite(getattr(fast, key)).all(), key
        assert_rel_close(getattr(fast, key), getattr(ref, key), 1e-10, key)
    assert_rel_close(g_fast, g_ref, 1e-9, "gradient w.r.t. A")


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_cholesky_lower_and_lower_inverse_equal_lapack(n):
    """The unrolled factor and triangular inverse equal LAPACK's in float64, with two batch
    dims, and so do their gradients along symmetric directions (the unrolled factor reads
    the lower triangle, LAPACK's gradient is symmetrised: their sums with the transposes
    agree); a matrix that is not positive definite gives non-finite entries (as
    ``cholesky_ex`` does), without raising."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(30, 10, n, n, generator=g, dtype=torch.float64)
    S = (X @ X.mT + 0.1 * torch.eye(n, dtype=torch.float64)).requires_grad_()
    L = _small.cholesky_lower(S)
    Li = _small.lower_inverse(L)
    L_ref = torch.linalg.cholesky(S)
    Li_ref = torch.linalg.solve_triangular(L_ref, torch.eye(n, dtype=torch.float64).expand(
        L_ref.shape), upper=False)
    torch.testing.assert_close(L, L_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Li, Li_ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(30, 10, n, n, generator=g, dtype=torch.float64)
    g1, = torch.autograd.grad(((L + Li) * w).sum(), S)
    g2, = torch.autograd.grad(((L_ref + Li_ref) * w).sum(), S)
    torch.testing.assert_close(g1 + g1.mT, g2 + g2.mT, rtol=1e-8, atol=1e-8)
    bad = torch.eye(n, dtype=torch.float64).expand(3, n, n).clone()
    bad[1, -1, -1] = -1.0
    out = _small.cholesky_lower(bad)
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()
