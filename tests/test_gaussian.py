"""Tests of the small linear-algebra helpers in ``pyrossm._gaussian`` (float64)."""

import pytest
import torch

from pyrossm._gaussian import broadcast_shapes, congruence, shared_times, sym, times_shared


@pytest.mark.parametrize("m,n", [(4, 4), (2, 3), (3, 2), (1, 1), (3, 9)])
@pytest.mark.parametrize("batch", [(5,), (2, 3)])
def test_congruence_equals_the_symmetrised_sandwich(m, n, batch):
    """``congruence(M, P, add)`` = sym(M P Mᵀ + add) for any (not only symmetric) P and add,
    exactly symmetric, with the same gradients (n = 9 takes the plain product path)."""
    g = torch.Generator().manual_seed(m * 10 + n)
    M = torch.randn(m, n, generator=g, dtype=torch.float64, requires_grad=True)
    P = torch.randn(batch + (n, n), generator=g, dtype=torch.float64, requires_grad=True)
    add = torch.randn(m, m, generator=g, dtype=torch.float64, requires_grad=True)
    got = congruence(M, P, add)
    ref = sym(M @ P @ M.mT + add)
    assert got.shape == batch + (m, m)
    assert torch.equal(got, got.mT)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), (M, P, add))
    g_ref = torch.autograd.grad((ref * w).sum(), (M, P, add))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    batched_add = torch.randn(batch + (m, m), generator=g, dtype=torch.float64)
    torch.testing.assert_close(congruence(M, P, batched_add), sym(M @ P @ M.mT + batched_add),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(congruence(M, P), sym(M @ P @ M.mT), rtol=1e-13, atol=1e-13)


def test_congruence_after_a_first_call_under_inference_mode():
    """The cached index tensors are made as normal tensors even when the first call runs under
    ``torch.inference_mode()``: a later call with autograd can save them for backward."""
    from pyrossm import _gaussian

    _gaussian._upper_index.cache_clear()
    g = torch.Generator().manual_seed(3)
    M = torch.randn(3, 3, generator=g, dtype=torch.float64)
    P = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    with torch.inference_mode():
        congruence(M, P, None)
    assert not any(t.is_inference() for t in _gaussian._upper_index(3, M.device))
    Mg = M.clone().requires_grad_()
    (grad,) = torch.autograd.grad(congruence(Mg, P, None).sum(), Mg)
    (ref,) = torch.autograd.grad(sym(Mg @ P @ Mg.mT).sum(), Mg)
    assert torch.allclose(grad, ref)


@pytest.mark.parametrize("shape", [(1000, 4, 4), (171, 3, 3), (300, 3, 4), (2, 130, 4, 2),
                                   (7, 3, 4), (5, 2, 3), (6, 4, 16), (0, 4, 4)])
def test_shared_factor_products_equal_matmul(shape):
    """``times_shared(X, M)`` = X @ M and ``shared_times(M, X)`` = M @ X in values and gradients,
    for contiguous and transposed X, row counts that no block size divides, and batches below
    the one-GEMM threshold (a 0.01% error in the one-GEMM path fails 4 cases)."""
    g = torch.Generator().manual_seed(sum(shape))
    r, c = shape[-2:]
    for X in (torch.randn(shape, generator=g, dtype=torch.float64),
              torch.randn(shape[:-2] + (c, r), generator=g, dtype=torch.float64).mT):
        X.requires_grad_(True)
        Mr = torch.randn(c, 3, generator=g, dtype=torch.float64, requires_grad=True)
        Ml = torch.randn(5, r, generator=g, dtype=torch.float64, requires_grad=True)
        for got, ref, args in ((times_shared(X, Mr), X @ Mr, (X, Mr)),
                               (shared_times(Ml, X), Ml @ X, (Ml, X))):
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
            if ref.numel():
                w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
                for a, b in zip(torch.autograd.grad((got * w).sum(), args),
                                torch.autograd.grad((ref * w).sum(), args)):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_broadcast_shapes_equals_torch():
    """The plain-Python ``broadcast_shapes`` gives torch's result, and torch's error."""
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        k = int(torch.randint(1, 4, (1,), generator=g))
        shapes = [tuple(int(v) for v in torch.randint(0, 3, (int(torch.randint(0, 4, (1,),
                  generator=g)),), generator=g)) for _ in range(k)]
        try:
            ref = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            with pytest.raises(RuntimeError, match="cannot be broadcast"):
                broadcast_shapes(*shapes)
            continue
        assert broadcast_shapes(*shapes) == ref
        assert isinstance(broadcast_shapes(*shapes), torch.Size)
    assert broadcast_shapes(torch.Size([2, 1]), (3,)) == (2, 3)
