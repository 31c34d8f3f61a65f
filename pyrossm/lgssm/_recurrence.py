"""Affine recurrences m_t = m_{t-1} Fᵀ + u_t over many sequences, in blocks of steps (private).

The filtered means of the Kalman filter without missing data obey such a recurrence once the
gains are known (``F = (I - K C) A``, ``u_t = K x_t``): constant at the Riccati fixed point,
time-varying before it. A step by step loop costs one small product (about 10 µs) per step; here
``blk`` steps are one block operator, the particular solutions of all blocks one batched
product, and the block starts the same kind of recurrence with ``nb = S / blk`` steps, solved
recursively. Row-vector form (the batch in the rows), sequences ``(N, S, n)``, time at dim -2.
"""

from __future__ import annotations

import contextlib

import torch

BLOCK = 8  # steps per block


def affine_recurrence(inputs, map_in, FT, m, level=0):
    """The means m_1 .. m_S (``(N, S, n)``) of the row-form recurrence
    m_t = m_{t-1} Fᵀ + u_t, u_t = inputs_t @ map_in (``map_in`` None: u_t = inputs_t), from
    m_0 = ``m`` (``(N, n)``).

    Steps are taken in blocks of ``blk``: [m_1 .. m_k] = [u_1 .. u_k] W + m_0 V
    (:func:`_block_operators`). The inputs are copied into a contiguous array padded with zero
    inputs to whole blocks (which changes no earlier step), so that the particular solutions
    (from a zero start) of all blocks of all sequences are one product, with ``map_in`` folded
    into W. The block starts obey the same recurrence with (Fᵀ)^blk and the block ends as
    inputs: solved by this function again (a few levels, then one small product per step);
    then ``m_0 V`` is added to every block in place. Meant for the block starts of the
    steady-state filter, where the inputs are small (the copy is cheap).
    """
    N, S, k = inputs.shape
    n = FT.shape[-1]
    blk = BLOCK
    nb = -(-S // blk)
    if nb < 3 or level >= 4:
        u = inputs if map_in is None else inputs @ map_in
        steps = []
        for t in range(S):
            m = torch.addmm(u[:, t], m, FT)
            steps.append(m)
        return torch.stack(steps, 1) if steps else u.new_empty(N, 0, n)
    W, V = _block_operators(FT.transpose(-1, -2), blk)
    # (I_blk ⊗ map_in) W: the input map folded into the block operator
    W_in = W if map_in is None else (map_in @ W.reshape(blk, n, blk * n)).reshape(blk * k, blk * n)
    padded = inputs.new_zeros(N, nb * blk, k)
    padded[:, :S] = inputs
    body = padded.view(N * nb, blk * k) @ W_in  # (N nb, blk n)
    ends = body.view(N, nb, blk * n)[:, :-1, -n:]  # particular block ends: the starts' inputs
    starts = torch.cat([m.unsqueeze(1), affine_recurrence(ends, None, V[:, -n:], m, level + 1)], 1)
    body.addmm_(starts.view(N * nb, n), V)  # (mm's backward does not need its output)
    return body.view(N, nb * blk, n)[:, :S]


def tracks_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def parameter_work(grad):
    """A context for the work that depends on the parameters only (covariances, gains, block
    operators: hundreds of small operations): ``torch.inference_mode()`` when nothing is
    differentiated (``grad`` False), which skips autograd's bookkeeping on each of them; else
    nothing. What it makes are inference tensors: read them, but copy any that are returned."""
    if grad or torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    return torch.inference_mode()


def write_into(out, op, *args):
    """``out[...] = op(*args)``, written straight into ``out`` (a view) with ``op``'s ``out=``
    when autograd is not recording (``out=`` is not differentiable), else through a copy."""
    if tracks_grad(out, *args):
        return out.copy_(op(*args))
    return op(*args, out=out)


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


def block_length(T):
    """Steps per block for a series of ``T`` steps: one dividing ``T`` where one is near 8 (then
    the blocks of all sequences are the rows of one matrix: one product instead of a batched
    one over strided views), else 8 and a shorter last block."""
    for blk in (8, 10, 6, 12, 9, 7, 5):
        if T % blk == 0:
            return blk
    return BLOCK


def filter_block_operators(FT, AT, map_in, direct_pred, direct_w, CWT, blk):
    """Block operators of the steady-state Kalman filter, in row form over a block of ``blk``
    steps with inputs ``z_t`` (``k`` wide) and the filtered mean ``m_0`` before the block:

        filtered means   m_t  = m_{t-1} Fᵀ + z_t map_in
        predicted means  m⁻_t = m_{t-1} Aᵀ + z_t direct_pred      (``direct_pred`` may be None)
        whitened innovations w_t = z_t direct_w - m⁻_t CWᵀ

    so that ``[y_1 .. y_blk] = [z_1 .. z_blk] W_y + m_0 V_y`` for y = m, m⁻, w. Returns
    ``((W_m, V_m), (W_pred, V_pred), (W_w, V_w))``. The operators are causal (block
    lower-triangular), so their leading ``r`` blocks are the operators of ``r`` steps."""
    n = FT.shape[-1]
    W, V = _block_operators(FT.transpose(-1, -2), blk)
    # I_blk ⊗ M (torch.kron fails on some views, e.g. a transposed (1, k) matrix)
    kron = lambda M: torch.block_diag(*[M] * blk)  # noqa: E731
    W_m = kron(map_in) @ W
    # m_{t-1} over the block: the filtered means shifted one step, m_0 first
    W_prev = torch.cat([torch.zeros_like(W_m[:, :n]), W_m[:, :-n]], 1)
    V_prev = torch.cat([torch.eye(n, dtype=FT.dtype, device=FT.device), V[:, :-n]], 1)
    W_pred, V_pred = W_prev @ kron(AT), V_prev @ kron(AT)
    if direct_pred is not None:
        W_pred = W_pred + kron(direct_pred)
    W_w = kron(direct_w) - W_pred @ kron(CWT)
    V_w = -(V_pred @ kron(CWT))
    return (W_m, V), (W_pred, V_pred), (W_w, V_w)


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


def column_recurrence(U, F, m, level=0):
    """The states m_1 .. m_S (``(S, n, N)``, a fresh tensor) of m_t = F_t m_{t-1} + u_t in
    column form (the sequences in the columns), time at dim 0: inputs ``U (S, n, N)``,
    ``F (S, n, n)`` shared by the sequences, from ``m (n, N)``.

    As :func:`varying_affine_recurrence` (blocks of ``BLOCK`` steps, each one product; the
    block starts the same recurrence, solved recursively), for inputs that come in this
    layout, the block starts of :mod:`._blocks`: every product then reads contiguous ``(n,
    N)`` slabs and the inputs are not copied, and the block operators are built by
    full-width products (:func:`_column_block_operators`)."""
    S, n, N = U.shape
    blk = BLOCK
    nb = S // blk
    if nb < 3 or level >= 4:
        steps = []
        for t in range(S):
            m = torch.addmm(U[t], F[t], m)
            steps.append(m)
        return torch.stack(steps) if steps else U.new_empty(0, n, N)
    W, V = _column_block_operators(F[: nb * blk].reshape(nb, blk, n, n))
    part = torch.bmm(W, U[: nb * blk].reshape(nb, blk * n, N))  # from a zero start
    starts = column_recurrence(part[:-1, -n:], V[:-1, -n:], m, level + 1)
    starts = torch.cat([m.unsqueeze(0), starts], 0)  # (nb, n, N)
    body = torch.baddbmm(part, V, starts).reshape(nb * blk, n, N)
    if S == nb * blk:
        return body
    tail, m = [], body[-1]
    for t in range(nb * blk, S):
        m = torch.addmm(U[t], F[t], m)
        tail.append(m)
    return torch.cat([body, torch.stack(tail)], 0)


def _column_block_operators(Fb):
    """W ``(nb, blk n, blk n)`` and V ``(nb, blk n, n)`` (views of one array) of m_t = F_t
    m_{t-1} + u_t over each block in column form, ``[m_1; ..; m_blk] = W [u_1; ..; u_blk] +
    V m_0``, ``Fb (nb, blk, n, n)``: row block i of ``[W | V]`` is F_i times row block i - 1,
    plus the identity at column block i. Full-width products: BLAS runs them, where products
    of fewer than ~25 columns go through torch's naive loop."""
    nb, blk, n, _ = Fb.shape
    bn = blk * n
    eye = torch.eye(n, dtype=Fb.dtype, device=Fb.device)
    first = Fb.new_zeros(nb, n, bn + n)
    first[..., :n] = eye
    first[..., bn:] = Fb[:, 0]
    rows = [first]
    for i in range(1, blk):
        y = torch.bmm(Fb[:, i], rows[-1])
        y[..., i * n : (i + 1) * n] = eye  # (bmm's backward does not need y)
        rows.append(y)
    WV = torch.cat(rows, 1)  # (nb, blk n, blk n + n)
    return WV[..., :bn], WV[..., bn:]


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
