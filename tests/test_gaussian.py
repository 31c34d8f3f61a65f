"""Tests of the small linear-algebra helpers in ``pyrossm._gaussian`` (float64)."""

import pytest
import torch

from pyrossm._gaussian import congruence, sym


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
