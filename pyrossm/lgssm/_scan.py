"""A generic associative (prefix) scan over the time dimension of tuples of tensors.

Tensors in a tuple share their time dimension: it is dim -2 of vectors ``(..., T, n)`` and
dim -3 of matrices ``(..., T, n, n)`` (the pyrossm convention; "vector" vs "matrix" is told by
the rank relative to the first element of the tuple, which must be a matrix).
The recursion is the odd/even one (Blelloch 1990; as in ``jax.lax.associative_scan``): depth
O(log T), every level one batched call of ``combine``.
"""

from __future__ import annotations

import torch


def _time_dim(t, matrix_rank):
    return -3 if t.dim() == matrix_rank else -2


def _slice(elems, rank, start, stop=None, step=None):
    out = []
    for e in elems:
        d = _time_dim(e, rank)
        idx = [slice(None)] * e.dim()
        idx[d] = slice(start, stop, step)
        out.append(e[tuple(idx)])
    return tuple(out)


def _interleave(even, odd, rank):
    """Merge results at even (0, 2, ...) and odd (1, 3, ...) positions along time."""
    out = []
    for e, o in zip(even, odd):
        d = _time_dim(e, rank) + e.dim()
        ne, no = e.shape[d], o.shape[d]
        pair = torch.stack([e.narrow(d, 0, no), o], d + 1)
        merged = pair.flatten(d, d + 1)
        if ne > no:
            merged = torch.cat([merged, e.narrow(d, no, 1)], d)
        out.append(merged)
    return tuple(out)


def associative_scan(combine, elems):
    """Inclusive prefix scan: ``out[t] = e[0] • e[1] • ... • e[t]`` with ``• = combine``.

    ``combine(earlier, later)`` takes and returns tuples of tensors of the same structure, with
    any common time length; it must be associative.
    """
    elems = tuple(elems)
    rank = elems[0].dim()
    T = elems[0].shape[-3]
    if T < 2:
        return elems
    # Combine neighbouring pairs (0,1), (2,3), ...: their prefixes are the odd positions.
    pairs = combine(_slice(elems, rank, 0, -1 if T % 2 else None, 2), _slice(elems, rank, 1, None, 2))
    odd = associative_scan(combine, pairs)
    # Even positions t >= 2: prefix(t - 1) • e[t].
    rest = _slice(elems, rank, 2, None, 2)
    if T % 2 == 0:
        prev = _slice(odd, rank, 0, -1)
    else:
        prev = odd
    even_rest = combine(prev, rest)
    first = _slice(elems, rank, 0, 1)
    even = tuple(
        torch.cat([f, r], _time_dim(f, rank)) for f, r in zip(first, even_rest)
    )
    return _interleave(even, odd, rank)
