"""A generic associative (prefix) scan over the time dimension of tuples of tensors.

Tensors in a tuple share their time length; each has its own (negative) time dim, e.g. -2 for
vectors ``(..., T, n)`` and -3 for matrices ``(..., T, n, n)``; batch dims may differ between
elements as long as ``combine`` broadcasts them.
The recursion is the odd/even one (Blelloch 1990; as in ``jax.lax.associative_scan``): depth
O(log T), every level one batched call of ``combine``.

Below it, the covariance part of the Kalman filter's elements: their combination, and the
prefixes by doubling when every element after the first is the same (time-invariant
parameters).
"""

from __future__ import annotations

import torch

from pyrossm._gaussian import congruence, sym, times_shared


def _slice(elems, dims, start, stop=None, step=None):
    out = []
    for e, d in zip(elems, dims):
        idx = [slice(None)] * e.dim()
        idx[d] = slice(start, stop, step)
        out.append(e[tuple(idx)])
    return tuple(out)


def _interleave(even, odd, dims):
    """Merge results at even (0, 2, ...) and odd (1, 3, ...) positions along time."""
    out = []
    for e, o, d in zip(even, odd, dims):
        d = d + e.dim()
        ne, no = e.shape[d], o.shape[d]
        pair = torch.stack([e.narrow(d, 0, no), o], d + 1)
        merged = pair.flatten(d, d + 1)
        if ne > no:
            merged = torch.cat([merged, e.narrow(d, no, 1)], d)
        out.append(merged)
    return tuple(out)


def associative_scan(combine, elems, time_dims):
    """Inclusive prefix scan: ``out[t] = e[0] • e[1] • ... • e[t]`` with ``• = combine``.

    ``combine(earlier, later)`` takes and returns tuples of tensors of the same structure, with
    any common time length; it must be associative.
    """
    elems = tuple(elems)
    T = elems[0].shape[time_dims[0]]
    if T < 2:
        return elems
    # Combine neighbouring pairs (0,1), (2,3), ...: their prefixes are the odd positions.
    pairs = combine(
        _slice(elems, time_dims, 0, -1 if T % 2 else None, 2), _slice(elems, time_dims, 1, None, 2)
    )
    odd = associative_scan(combine, pairs, time_dims)
    # Even positions t >= 2: prefix(t - 1) • e[t].
    rest = _slice(elems, time_dims, 2, None, 2)
    if T % 2 == 0:
        prev = _slice(odd, time_dims, 0, -1)
    else:
        prev = odd
    even_rest = combine(prev, rest)
    first = _slice(elems, time_dims, 0, 1)
    even = tuple(torch.cat([f, r], d) for f, r, d in zip(first, even_rest, time_dims))
    return _interleave(even, odd, time_dims)


# ----------------------------------------------------------------------------------------------
# the covariance part of the Kalman filter's elements (Särkkä & García-Fernández 2021)
def _cov_combine(earlier, later, symmetrize=True):
    """The covariance part of the filtering elements' combination (Särkkä & García-Fernández
    2021, eq. (32)): (A, C, J) of two consecutive stretches of time. With M = I + C1 J2 (one
    inverse serves both of its solves). ``symmetrize=False`` leaves C and J as computed
    (symmetric to rounding): for the powers of the doubling, whose few levels feed prefixes
    that are symmetrised themselves (six operations fewer per combination)."""
    A1, C1, J1 = earlier
    A2, C2, J2 = later
    eye = torch.eye(A1.shape[-1], dtype=A1.dtype, device=A1.device)
    Minv = torch.linalg.inv(eye + C1 @ J2)
    MA1 = Minv @ A1
    C = A2 @ (Minv @ C1) @ A2.transpose(-1, -2) + C2
    J = MA1.transpose(-1, -2) @ J2 @ A1 + J1
    return (A2 @ MA1, sym(C), sym(J)) if symmetrize else (A2 @ MA1, C, J)


def _prefix_cov(C1, A2, C2, J2):
    """The covariance part of ``(0, C1, 0) • (A2, C2, J2)`` (:func:`_cov_combine` with an
    earlier element that has no A or J, as every prefix of the filter's elements has):
    A2 (I + C1 J2)⁻¹ C1 A2ᵀ + C2, where (I + C1 J2)⁻¹ C1 is symmetric (one solve, no
    transposed operands)."""
    eye = torch.eye(C1.shape[-1], dtype=C1.dtype, device=C1.device)
    X = torch.linalg.solve(eye + C1 @ J2, C1)
    if A2.dim() == 2 and C2.dim() == 2 and X.shape[-3] >= 64:  # one GEMM for many prefixes
        return congruence(A2, X, C2)
    return sym(A2 @ X @ A2.transpose(-1, -2) + C2)


def _doubling_prefixes(Cov1, generic, L):
    """The covariance parts of the prefixes ``e_1 • g • ... • g`` (0 .. L-1 copies of the
    same element ``g``; ``Cov1``, ``generic``'s three matrices ``(..., 1, n, n)``) by
    doubling: with the first m prefixes and the power g^m known, the next m prefixes are the
    first m ones each combined with g^m (e_1 • g^(j-1) • g^m, powers of one element commute),
    and g^2m = g^m • g^m. One batched combination with a shared later element per doubling,
    and one of single elements. Without autograd the prefixes are written into one array as
    they come (no growing concatenation). Returns ``(..., L, n, n)``."""
    n = Cov1.shape[-1]
    if Cov1.shape[:-3] == ():  # the power without its time dim: single matrices
        generic = tuple(M.reshape(n, n) for M in generic)
    grad = torch.is_grad_enabled() and any(M.requires_grad for M in (Cov1, *generic))
    if grad:
        pre, power = Cov1, generic
        while pre.shape[-3] < L:
            r = min(pre.shape[-3], L - pre.shape[-3])
            pre = torch.cat([pre, _prefix_cov(pre[..., :r, :, :], *power)], -3)
            if pre.shape[-3] < L:
                power = _cov_combine(power, power, symmetrize=False)
        return pre
    if Cov1.shape[:-3] == ():
        return _doubling_single(Cov1, generic, L)
    out = Cov1.new_empty(Cov1.shape[:-3] + (L, n, n))
    out.narrow(-3, 0, 1).copy_(Cov1)
    done, power = 1, generic
    while done < L:
        r = min(done, L - done)
        out.narrow(-3, done, r).copy_(_prefix_cov(out.narrow(-3, 0, r), *power))
        done += r
        if done < L:
            power = _cov_combine(power, power, symmetrize=False)
    return out


def _doubling_single(Cov1, generic, L):
    """:func:`_doubling_prefixes` for one system (``Cov1 (1, n, n)``, ``generic`` (n, n)
    matrices) without autograd, with each level's prefixes and the squaring of the power in
    one batch: both combine an earlier element with the same later one, g^m. The power's
    covariance part and its A wait in the two slots after the known prefixes, where the
    level's results go: the batch is one contiguous slice, one solve gives (I + C_i J)⁻¹ C_i
    for every prefix and the power and (I + C J)⁻¹ A for the power's A and J parts, and the
    new power's covariance part lands where the next level reads it. (The doubling's cost is
    the count of its small operations: a third of the two calls per level before.)"""
    n = Cov1.shape[-1]
    Ap, Cp, Jp = generic
    eye = torch.eye(n, dtype=Cov1.dtype, device=Cov1.device)
    out = Cov1.new_empty(L + 2, n, n)
    out[0] = Cov1[0]
    done = 1
    while done < L:
        r = min(done, L - done)
        more = 2 if done + r < L else 0  # the power g^2m is needed (then r = done)
        if more:
            out[done], out[done + 1] = Cp, Ap
        earlier = out[: r + more]
        M = eye + times_shared(earlier, Jp)  # I + C1 J2
        if more:
            M[-1] = M[-2]  # the power's A is solved with the power's matrix
        X = torch.linalg.solve(M, earlier)
        if more:
            MA, X = X[-1], X[:-1]  # (I + C J)⁻¹ A, and the covariance parts
        if X.shape[0] >= 64:
            new = congruence(Ap, X, Cp)
        else:
            new = sym(Ap @ X @ Ap.mT + Cp)
        out[done : done + X.shape[0]] = new
        if more:
            Ap, Cp, Jp = Ap @ MA, out[done + r], MA.mT @ Jp @ Ap + Jp
        done += r
    return out[:L]
