"""A generic associative (prefix) scan over the time dimension of tuples of tensors.

Tensors in a tuple share their time length; each has its own (negative) time dim, e.g. -2 for
vectors ``(..., T, n)`` and -3 for matrices ``(..., T, n, n)``; batch dims may differ between
elements as long as ``combine`` broadcasts them.
The recursion is the odd/even one (Blelloch 1990; as in ``jax.lax.associative_scan``): depth
O(log T), every level one batched call of ``combine``.
"""

from __future__ import annotations

import torch


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
