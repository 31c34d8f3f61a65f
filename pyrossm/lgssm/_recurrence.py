"""Affine recurrences m_t = m_{t-1} Fᵀ + u_t over many sequences, in blocks of steps (private).

The filtered means of the Kalman filter without missing data obey such a recurrence once the
gains are known (``F = (I - K C) A``, ``u_t = K x_t``): constant at the Riccati fixed point,
time-varying before it. A step by step loop costs one small product (about 10 µs) per step; here
``blk`` steps are one block operator, the particular solutions of all blocks one batched
product, and the block starts the same kind of recurrence with ``nb = S / blk`` steps, solved
recursively. Row-vector form (the batch in the rows), sequences ``(N, S, n)``, time at dim -2.
"""

from __future__ import annotations

import torch

BLOCK = 8  # steps per block


def affine_recurrence(inputs, map_in, FT, m, out=None, level=0):
    """The means m_1 .. m_S (``(N, S, n)``) of the row-form recurrence
    m_t = m_{t-1} Fᵀ + u_t, u_t = inputs_t @ map_in, from m_0 = ``m`` (``(N, n)``).

    Steps are taken in blocks of ``blk``: [m_1 .. m_k] = [u_1 .. u_k] W + m_0 V
    (:func:`_block_operators`), so the particular solutions (from a zero start) of all blocks
    are one batched product, with ``map_in`` folded into W. The block starts obey the same
    recurrence with (Fᵀ)^blk and the block ends as inputs: solved by this function again (a
    few levels, then one small product per step); then ``m_0 V`` is added to every block in
    place. ``inputs`` and ``out`` may be strided views over time (e.g. ``x[:, Td:]``): the
    products read and write them directly, so no array of the size of the input is copied.
    """
    N, S, k = inputs.shape
    n = FT.shape[-1]
    if out is None:
        out = inputs.new_empty(N, S, n)
    blk = BLOCK
    nb = S // blk  # full blocks; the remaining S - nb blk steps are a short tail
    if nb < 3 or level >= 4:
        u = inputs @ map_in
        for t in range(S):
            m = torch.addmm(u[:, t], m, FT)
            out[:, t] = m
        return out
    W, V = _block_operators(FT.transpose(-1, -2), blk)
    # (I_blk ⊗ map_in) W: the input map folded into the block operator
    W_in = (map_in @ W.reshape(blk, n, blk * n)).reshape(blk * k, blk * n)
    body = _as_blocks(out[:, : nb * blk], blk)  # (N, nb, blk n), a view of out
    body_in = inputs[:, : nb * blk].reshape(N, nb, blk * k)  # a view when strides allow
    if body is None:  # out's layout does not allow a view: solve into a fresh array
        return out.copy_(affine_recurrence(inputs, map_in, FT, m, None, level))
    write_into(body, torch.bmm, body_in, W_in.expand(N, blk * k, blk * n))
    G = V[:, -n:]  # (Fᵀ)^blk
    eye = torch.eye(n, dtype=m.dtype, device=m.device)
    ends = body[:, :-1, -n:].contiguous()  # particular block ends: inputs of the starts' recurrence
    starts = torch.cat([m.unsqueeze(1), affine_recurrence(ends, eye, G, m, None, level + 1)], 1)
    body.baddbmm_(starts, V.expand(N, n, blk * n))  # + the terms of each block's start
    r = S - nb * blk
    if r:  # the tail, from the last block's end
        tail = inputs[:, nb * blk :].reshape(N, r * k) @ W_in[: r * k, : r * n]
        # (a copy: out is written next, and autograd keeps what addmm reads)
        tail = torch.addmm(tail, body[:, -1, -n:].clone(), V[:, : r * n])
        out[:, nb * blk :] = tail.view(N, r, n)
    return out


def row_group(rows, width, target=16):
    """The largest g <= target / width dividing ``rows`` (at least 1)."""
    for g in range(max(1, target // width), 1, -1):
        if rows % g == 0:
            return g
    return 1


def tracks_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def write_into(out, op, *args):
    """``out[...] = op(*args)``, written straight into ``out`` (a view) with ``op``'s ``out=``
    when autograd is not recording (``out=`` is not differentiable), else through a copy."""
    if tracks_grad(out, *args):
        return out.copy_(op(*args))
    return op(*args, out=out)


def _as_blocks(v, blk):
    """``(N, nb blk, d)`` -> a ``(N, nb, blk d)`` view, or None when the strides forbid it
    (a last dim of stride 1 and a time stride of d are all that is needed)."""
    N, L, d = v.shape
    try:
        return v.view(N, L // blk, blk * d)
    except RuntimeError:
        return None


def _block_operators(F, blk):
    """W (blk n, blk n) and V (n, blk n) of the block solution of m_t = F m_{t-1} + u_t in
    row-vector form, [m_1 .. m_k] = [u_1 .. u_k] W + m_0 V: W is lower block-Toeplitz in the
    powers of F, so a block of steps is one matrix product instead of one product per step."""
    n = F.shape[-1]
    powers = [torch.eye(n, dtype=F.dtype, device=F.device)]
    for _ in range(blk):
        powers.append(F @ powers[-1])
    P = torch.stack(powers)  # (blk+1, n, n): P[k] = F^k
    idx = torch.arange(blk, device=F.device)
    diff = idx.unsqueeze(0) - idx.unsqueeze(1)  # [j, i] = i - j
    W = P[diff.clamp_min(0)].transpose(-1, -2) * (diff >= 0).to(F.dtype)[..., None, None]
    W = W.permute(0, 2, 1, 3).reshape(blk * n, blk * n)
    V = P[1:].transpose(-1, -2).permute(1, 0, 2).reshape(n, blk * n)  # block i = (F^{i+1})ᵀ
    return W, V


def varying_affine_recurrence(u, FT, m, level=0):
    """The means m_1 .. m_S (``(N, S, n)``, a fresh tensor) of m_t = m_{t-1} F_tᵀ + u_t with
    time-varying ``FT (S, n, n)`` (``F_tᵀ``, shared by the sequences) from ``m (N, n)``;
    ``u (N, S, n)``, any strides. As :func:`affine_recurrence`, with one block operator per
    block (:func:`_varying_block_operators`, computed once for all sequences)."""
    N, S, n = u.shape
    blk = BLOCK
    nb = S // blk
    if nb < 3 or level >= 4:
        steps = []
        for t in range(S):
            m = torch.addmm(u[:, t], m, FT[t])
            steps.append(m)
        return torch.stack(steps, 1) if steps else u.new_empty(N, 0, n)
    W, V = _varying_block_operators(FT[: nb * blk].reshape(nb, blk, n, n))
    part = torch.bmm(u[:, : nb * blk].reshape(N, nb, blk * n).transpose(0, 1), W)  # (nb, N, .)
    G = V[:, :, -n:]  # (nb, n, n): each block's product of the F_tᵀ
    ends = part[:-1, :, -n:].transpose(0, 1)  # (N, nb - 1, n)
    starts = varying_affine_recurrence(ends, G[:-1], m, level + 1)
    starts = torch.cat([m.unsqueeze(1), starts], 1).transpose(0, 1)  # (nb, N, n)
    body = torch.baddbmm(part, starts, V).transpose(0, 1).reshape(N, nb * blk, n)
    r = S - nb * blk
    if not r:
        return body
    tail, m = [], body[:, -1]
    for t in range(nb * blk, S):
        m = torch.addmm(u[:, t], m, FT[t])
        tail.append(m)
    return torch.cat([body, torch.stack(tail, 1)], 1)


def _varying_block_operators(FTb):
    """W ``(nb, blk n, blk n)`` and V ``(nb, n, blk n)`` of each block of m_t = m_{t-1} F_tᵀ +
    u_t, ``FTb (nb, blk, n, n)`` the blocks' ``F_tᵀ``: block (j, i) of W is
    ``F_{j+1}ᵀ ⋯ F_iᵀ`` for j ≤ i (the identity on the diagonal), block i of V
    ``F_0ᵀ ⋯ F_iᵀ``; built one step at a time for all blocks at once."""
    nb, blk, n, _ = FTb.shape
    eye = torch.eye(n, dtype=FTb.dtype, device=FTb.device).expand(nb, 1, n, n)
    W = FTb.new_zeros(nb, blk, n, blk, n)
    V = FTb.new_zeros(nb, n, blk, n)
    prev = eye  # the products ending at the previous step, for starts j = -1 .. i - 1
    for i in range(blk):
        new = prev @ FTb[:, i : i + 1]
        V[:, :, i] = new[:, 0]
        if i:
            W[:, :i, :, i] = new[:, 1:]
        W[:, i, :, i] = eye[:, 0]
        prev = torch.cat([new, eye], 1)
    return W.reshape(nb, blk * n, blk * n), V.reshape(nb, n, blk * n)
