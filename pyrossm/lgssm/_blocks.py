"""The Kalman filter's means and log-likelihoods with time-varying gains, in blocks (private).

Without missing data the covariances, gains ``K_t`` and innovation Cholesky factors ``L_t``
do not depend on the data (:func:`pyrossm.lgssm._steps.shared_covariances`); what is left is
linear in the data. In row form (the sequences in the rows), with m_t the filtered mean:

    predicted mean        m⁻_t = m_{t-1} A_tᵀ + b_t
    filtered mean         m_t  = m_{t-1} F_tᵀ + x_t K_tᵀ + b_t (I - K_t C_t)ᵀ,
                          F_t  = (I - K_t C_t) A_t
    whitened innovation   w_t  = (x_t - m⁻_t C_tᵀ) L_t⁻ᵀ

Over a block of ``blk`` steps each of the three is one product of the block's inputs
``[z_1 .. z_blk]`` (z_t = x_t, or [x_t, b_t]) plus one product of the mean before the block;
the operators differ from block to block but are shared by all sequences, so they are built
once (a few dozen small batched products) and every sequence's block is then one row of a
batched matrix product (:func:`varying_block_steps`). The means before the blocks obey the same
recurrence from block to block (:func:`~pyrossm.lgssm._recurrence.column_recurrence`).
Step 0 is the first step of the first block with ``A_0 = I`` and ``m_{-1}`` the initial mean
(its prediction is the initial mean itself). With a shared A the predicted means need no
operator: they are the filtered means one step back times Aᵀ, one product over all steps
(:func:`predicted_means`).

This replaces a step-by-step (or step-blocked) recursion over ``(T, N, n)`` arrays, which moved
every array through memory several times; here the data are read by three or four products.
Products with only a few output columns (the block ends, the sums over entries) are computed
the other way round, ``(Wᵀ zᵀ)ᵀ``: BLAS runs them several times faster so.
"""

from __future__ import annotations

import math

import torch

from pyrossm._gaussian import LOG_2PI as _LOG_2PI
from pyrossm._gaussian import times_shared

from ._recurrence import (
    block_length,
    column_recurrence,
    parameter_work,
    tracks_grad,
    write_into,
)


def varying_block_operators(K, Linv, A, C, tvA, tvC, with_b, blk, moments=True, pred=True):
    """Block operators of the filter with per-step ``K (S, n, p)`` and ``Linv (S, p, p)``,
    ``A`` and ``C`` shared (``(n, n)``, ``(p, n)``) or per step (``tvA``/``tvC``: ``(S, ...)``);
    step 0 predicts with ``A_0 = I``; ``S`` a multiple of ``blk``.

    Returns a dict of row-form operators, each W ``(nb, blk k, blk d)`` and V ``(nb, n,
    blk d)`` (k the input width, d = n or p) such that over block j the outputs are
    ``[z_1 .. z_blk] W[j] + m_0 V[j]`` (:mod:`pyrossm.lgssm._blocks`): ``"w"`` (the whitened
    innovations), ``"last"`` (the filtered mean at each step ``i`` of the block alone: ``Wl
    (nb, blk, blk k, n)`` and ``Vl (nb, blk, n, n)``; ``i = blk - 1`` gives the block ends)
    and with ``moments`` ``"m"`` (the filtered means), ``"wm"`` (``"w"`` and ``"m"`` side by
    side, d = p + n: one product for both) and, if also ``pred``, ``"pred"`` (the predicted
    means).

    Built in column form, one step of the block at a time for all blocks at once: the map
    of step ``i`` is ``(nb, d, blk k)`` (outputs in the rows), so that the row-form operators
    are transposed views of one contiguous array (batched products take them as they are).
    The filtered mean's map of step i and its map of the block start are one ``(nb, n, blk k
    + n)`` array, F_i times that of step i - 1 with K_i written into its own (zero) columns;
    the innovations' maps are -L_i⁻¹ C_i A_i times that of step i - 1 (both maps in one
    product). Products with a shared A or C are single GEMMs (:func:`times_shared`)."""
    S, n, p = K.shape
    nb = S // blk
    dt, dev = K.dtype, K.device
    eye = torch.eye(n, dtype=dt, device=dev)
    IKC = eye - (K @ C if tvC else times_shared(K, C))  # (S, n, n)
    # F_i = (I - K_i C_i) A_i, with A_0 = I
    F = torch.cat([IKC[:1], IKC[1:] @ A[1:] if tvA else times_shared(IKC[1:], A)], 0)
    F = F.reshape(nb, blk, n, n)
    map_in = K if not with_b else torch.cat([K, IKC], -1)  # (S, n, k)
    k = map_in.shape[-1]
    bk, bp = blk * k, blk * p
    map_in = map_in.reshape(nb, blk, n, k)
    # [filtered mean's map | block start's map] of step i. Full width: BLAS takes a batch of
    # 4 x 4 times 4 x 36 products (11 µs), where narrower ones (< ~25 columns) run through a
    # naive loop (4 x 16: 29 µs); the columns past step i are zero and stay so
    first = K.new_zeros(nb, n, bk + n)
    first[..., :k] = map_in[:, 0]
    first[..., bk:] = F[:, 0]
    maps = [first]
    for i in range(1, blk):
        y = torch.bmm(F[:, i], maps[-1])
        y[..., i * k : (i + 1) * k] = map_in[:, i]  # (bmm's backward does not need y)
        maps.append(y)
    aug = torch.stack(maps, 1)  # (nb, blk, n, bk + n)
    Linv = Linv.contiguous()
    LC = (Linv @ C if tvC else times_shared(Linv, C)).reshape(nb, blk, p, n)  # L_i⁻¹ C_i
    Ab = A.reshape(nb, blk, n, n) if tvA else A
    # whitened innovations w_i = L_i⁻¹ (x_i - C_i A_i m_{i-1}): both maps of step i are
    # G_i = -L_i⁻¹ C_i A_i times those of the filtered mean a step back (one product); step 0
    # has only the block start's, G_0 (block 0: -L_0⁻¹ C_0, the initial mean predicts itself)
    G = -(LC @ Ab) if tvA else times_shared(LC, -A)  # (nb, blk, p, n)
    parts = [torch.cat([K.new_zeros(nb, p, bk), G[:, 0]], -1),
             (G[:, 1:] @ aug[:, :-1]).reshape(nb, bp - p, bk + n)]
    if moments:  # the filtered means' maps in the same array: "wm" is one operator
        parts.append(aug.reshape(nb, blk * n, bk + n))
    ops_cols = torch.cat(parts, 1)  # (nb, rows, bk + n): the operators in column form
    ops_cols[0, :p, bk:] = -LC[0, 0]
    # the diagonal blocks (i, i) of the innovations' W, as a strided view (nb, p, k, blk):
    # added to in place, where advanced indexing cost a quarter of the whole build
    diag = ops_cols[:, :bp, :bk].view(nb, blk, p, blk, k).diagonal(dim1=1, dim2=3)
    diag[:, :, :p].add_(Linv.view(nb, blk, p, p).permute(0, 2, 3, 1))
    if with_b:  # b_i enters m⁻_i directly
        diag[:, :, p:].sub_(LC.permute(0, 2, 3, 1))
    W, V = ops_cols[..., :bk].mT, ops_cols[..., bk:].mT  # (nb, bk, rows), (nb, n, rows)
    ops = {"w": (W[..., :bp], V[..., :bp]), "last": (aug[..., :bk].mT, aug[..., bk:].mT)}
    if moments:
        ops["m"] = (W[..., bp:], V[..., bp:])
        ops["wm"] = (W, V)
    if moments and pred:  # per-step A: the predicted means' maps, A_i times the filtered ones
        rows = lambda M: M.reshape(nb, blk * M.shape[-2], M.shape[-1]).mT  # noqa: E731
        Nt = aug[..., bk:]
        Npred = Ab @ torch.cat([eye.expand(nb, 1, n, n), Nt[:, :-1]], 1)
        Npred = torch.cat([torch.cat([eye.expand(1, 1, n, n), Npred[:1, 1:]], 1), Npred[1:]], 0)
        Lpred = torch.cat([K.new_zeros(nb, 1, n, bk), Ab[:, 1:] @ aug[:, :-1, :, :bk]], 1)
        if with_b:
            Lpred.view(nb, blk, n, blk, k).diagonal(dim1=1, dim2=3)[:, :, p:].add_(
                eye.unsqueeze(-1))
        ops["pred"] = (rows(Lpred), rows(Npred))
    return ops


def varying_block_steps(prep, batch, K, Linv, half_logdet, Td, moments=True, blk=None,
                        per_step=True, predicted=True):
    """Means and log-likelihoods of steps ``0 .. Td-1`` given the per-step gains ``K (>= Td,
    n, p)``, inverse innovation Cholesky factors ``Linv (>= Td, p, p)`` and their
    ``half_logdet (>= Td,)`` (shared by the sequences; the parameters without batch dims).

    Returns batch-major ``filt_means (N, Td, n)``, ``pred_means (N, Td, n)`` (both None
    without ``moments``), ``step_log_likelihoods (N, Td)`` and the last filtered mean
    ``(N, n)``; ``N`` the flattened ``batch``. ``per_step=False``: the log-likelihoods may
    come summed over the steps, ``(N, 1)`` (without autograd, when the blocks tile the steps:
    each block's squares are then summed where they are made, and no per-step array is
    written). ``predicted=False``: the predicted means are None."""
    p = prep.x.shape[-1]
    n = prep.init_mean.shape[-1]
    N = math.prod(batch)
    blk = blk or block_length(Td)
    nb = -(-Td // blk)
    S, pad = nb * blk, nb * blk - Td
    dt, dev = K.dtype, K.device
    eye_n, eye_p = torch.eye(n, dtype=dt, device=dev), torch.eye(p, dtype=dt, device=dev)
    x = prep.x[..., :Td, :].expand(batch + (Td, p)).reshape(N, Td, p)
    with_b = prep.b is not None
    z = x if not with_b else torch.cat(
        [x, prep.b[..., :Td, :].expand(batch + (Td, n)).reshape(N, Td, n)], -1)
    k = z.shape[-1]
    tvA, tvC = prep.tv["A"], prep.tv["C"]
    A = prep.A[:Td] if tvA else prep.A
    C = prep.C[:Td] if tvC else prep.C
    K, Linv = K[:Td], Linv[:Td]
    if pad:  # zero inputs and neutral parameters past the end change no earlier step
        z = torch.cat([z, z.new_zeros(N, pad, k)], 1)
        K = torch.cat([K, K.new_zeros(pad, n, p)], 0)
        Linv = torch.cat([Linv, eye_p.expand(pad, p, p)], 0)
        if tvA:
            A = torch.cat([A, eye_n.expand(pad, n, n)], 0)
        if tvC:
            C = torch.cat([C, C.new_zeros(pad, p, n)], 0)
    # a shared A: the predicted means from the filtered ones (predicted_means), no operator
    # (the data too: operators made under inference mode cannot be saved for x's backward)
    with parameter_work(tracks_grad(K, Linv, A, C, z, prep.init_mean)):
        ops = varying_block_operators(K, Linv, A, C, tvA, tvC, with_b, blk, moments, tvA)
    Wl, Vl = ops["last"]
    zr = z.reshape(N, nb, blk * k)
    zb = zr.transpose(0, 1)  # (nb, N, blk k): block j of every sequence (a strided view)
    m0 = prep.init_mean.expand(batch + (n,)).reshape(N, n)
    # the means before the blocks: from the particular solutions' block ends (zero start),
    # as (nb, n, N) = Wlᵀ zᵀ: with only n output columns zb @ Wl runs at a quarter of the
    # speed (256 x 1000: 0.7 vs 0.2 ms; the data read through the same strided view)
    endsT = torch.bmm(Wl[:, -1].mT.contiguous(), zr.permute(1, 2, 0))
    # ... in that column form: each block's transfer (the product of its F_i) is Vl[:, -1]ᵀ
    rest = column_recurrence(endsT[:-1], Vl[:-1, -1].mT, m0.mT)  # (nb - 1, n, N)
    starts = torch.cat([m0.mT.unsqueeze(0), rest], 0).mT  # (nb, N, n), a transposed view
    W_w, V_w = ops["w"]
    # ll_t = -Σ w_t² / 2 - c_t, c_t = p log(2π) / 2 + log|L_t| (0 on the padding); the sum
    # over entries, the scaling and c_t in one product per block
    c = torch.cat([half_logdet[:Td], half_logdet.new_zeros(pad)]) + 0.5 * p * _LOG_2PI
    # as (nb, blk, N) = sum_pᵀ (w²)ᵀ: with only blk output columns the product the other way
    # round runs at less than half the speed (as for the block ends)
    neg_c = -c.view(nb, blk, 1)
    sum_p = torch.eye(blk, dtype=dt, device=dev).repeat_interleave(p, 1).expand(nb, -1, -1)
    fm, summed = None, False
    if tracks_grad(zb, W_w, starts, neg_c, *(M for op in ops.values() for M in op)):
        w = torch.baddbmm(zb @ W_w, starts, V_w)  # (nb, N, blk p)
        ll = torch.baddbmm(neg_c, sum_p, (w * w).mT, alpha=-0.5).permute(2, 0, 1).reshape(N, S)
        batch_major = lambda W, V: torch.baddbmm(zb @ W, starts, V).transpose(0, 1)  # noqa: E731
    elif not (per_step or pad):  # Σ_t ll_t = -Σ w² / 2 - Σ_t c_t
        batch_major = lambda W, V: _block_rows(zb, starts, W, V)  # noqa: E731
        if moments:  # the filtered means in the same pass
            total, fm = _block_rows(zb, starts, *ops["wm"], _sum_of_squares, split=blk * p)
        else:
            total = _block_rows(zb, starts, W_w, V_w, _sum_of_squares)
        ll, summed = total.view(N, 1).mul_(-0.5).sub_(c.sum()), True
    else:
        step_ll = lambda w: torch.baddbmm(neg_c, sum_p, w.mul_(w).mT, alpha=-0.5).mT  # noqa: E731
        batch_major = lambda W, V: _block_rows(zb, starts, W, V)  # noqa: E731
        if moments:  # the filtered means in the same pass (the data read once, wider products)
            ll, fm = _block_rows(zb, starts, *ops["wm"], step_ll, split=blk * p)
        else:
            ll = _block_rows(zb, starts, W_w, V_w, step_ll)
    if not summed:
        ll = ll.reshape(N, S)[:, :Td]
    if moments:
        if fm is None:
            fm = batch_major(*ops["m"])
        fm = fm.reshape(N, S, n)
        if not predicted:
            pm = None
        elif tvA:
            pm = batch_major(*ops["pred"]).reshape(N, S, n)[:, :Td]
        else:
            pm = predicted_means(fm, m0, A.mT, None if not with_b else z[..., p:])[:, :Td]
        fm = fm[:, :Td]
        return fm, pm, ll, fm[:, -1]
    j, i = divmod(Td - 1, blk)
    m = torch.addmm(zb[j] @ Wl[j, i], starts[j], Vl[j, i])
    return None, None, ll, m


def _sum_of_squares(w):
    """``(1, rows, 1)``: the sum of ``w (nb, rows, d)²`` over the blocks and the entries (in
    place; the sum over the blocks first, a contiguous reduction)."""
    return w.mul_(w).sum(0, keepdim=True).sum(-1, keepdim=True)


def _block_rows(zb, starts, W, V, finish=None, chunk_bytes=1 << 19, split=None):
    """Batch-major ``(N, nb, d)``: ``finish(zb W + starts V)`` per block (``finish`` None: the
    identity), without autograd, in chunks of sequences (at least 32) through one reused
    buffer of about ``chunk_bytes``. The products are as large as the data, and a fresh array
    that size costs about as much in first-touch page faults as the products, and leaves the
    cache (256 x 1000 steps: 19 -> 14 ms for the whole log-likelihood); only the result is
    fresh, written where the caller's batch-major view of it wants it. With ``split``: two
    results, ``finish`` of the first ``split`` columns and the other columns as they are."""
    nb, N, width = zb.shape[0], zb.shape[1], W.shape[-1]
    rows = max(32, chunk_bytes // (nb * width * zb.element_size()))  # not too thin
    buf = zb.new_empty(nb, min(rows, N), width)
    out = rest = None
    for i in range(0, N, rows):
        j = min(i + rows, N)
        y = torch.bmm(zb[:, i:j], W, out=buf[:, : j - i])
        y = y.baddbmm_(starts[:, i:j], V)
        if split is not None:
            if rest is None:
                rest = zb.new_empty(N, nb, width - split)
            rest[i:j].transpose(0, 1).copy_(y[..., split:])
            y = y[..., :split]
        if finish is not None:
            y = finish(y)
        if out is None:
            out = zb.new_empty(N, y.shape[0], y.shape[-1])
        out[i:j].transpose(0, 1).copy_(y)
    return out if split is None else (out, rest)


def predicted_means(fm, m0, AT, b=None):
    """The predicted means ``(N, T, n)`` from the filtered means ``fm (N, T, n)``, the initial
    mean ``m0 (N, n)``, a shared ``AT`` (Aᵀ, ``(n, n)``) and the offsets ``b (N, T, n)`` or
    None (``b_0`` unused): m⁻_0 = m_0, m⁻_t = m_{t-1} Aᵀ + b_t.

    One product for all steps: an n-wide map of each step, where a block operator reads a
    whole block per output (256 x 1000 steps: 0.4 vs 2 ms)."""
    N, T, n = fm.shape
    if tracks_grad(fm, m0, AT, *(() if b is None else (b,))):
        pm = torch.cat([m0.unsqueeze(1), fm[:, :-1] @ AT], 1)
        return pm if b is None else pm + torch.cat([b.new_zeros(N, 1, n), b[:, 1:]], 1)
    # in the flat (N T, n) layout the product of row r, written at row r + 1, is the prediction
    # of the next step of the same sequence; each sequence's first row is then overwritten.
    # g steps per row, so that rows are a cache line wide, times g copies of Aᵀ on a block
    # diagonal: BLAS runs (N T, 4) @ (4, 4) at a third of the speed of (N T / 4, 16) @ (16, 16)
    flat = fm.new_empty(N * T + 1, n)
    g = max(1, 64 // (n * fm.element_size()))
    if (N * T) % g:
        g = 1
    op = AT if g == 1 else torch.block_diag(*[AT] * g)
    torch.mm(fm.reshape(N * T // g, g * n), op, out=flat[1:].view(N * T // g, g * n))
    pm = flat[:-1].view(N, T, n)
    pm[:, 0] = m0
    if b is not None:
        pm[:, 1:] += b[:, 1:]
    return pm


# ---------------------------------------------------------------------------------------------
# products over the blocks of a series (the steady-state path of ._steps)
def sums_of_squares(out, z_blocks, starts, W_w, V_w, sum_p, chunk_bytes=1 << 19):
    """``out (N, nb, blk)`` = the sums over entries of ``w²``, ``w = z W_w + starts V_w`` per
    block (no autograd), in chunks of rows of about ``chunk_bytes`` through one reused buffer:
    the whitened innovations are as large as x, and a fresh array of that size costs about as
    much in page faults (first touches) as the arithmetic, and leaves the cache."""
    N, nb, blk = out.shape
    width = W_w.shape[1]
    rows = max(1, chunk_bytes // (width * z_blocks.element_size()))
    if z_blocks.dim() == 2:  # (N nb, blk k): chunks of block rows
        flat_out = out.view(N * nb, blk)
        buf = z_blocks.new_empty(min(rows, N * nb), width)
        sq = z_blocks.new_empty(blk, min(rows, N * nb))
        for i in range(0, N * nb, rows):
            j = min(i + rows, N * nb)
            w = torch.mm(z_blocks[i:j], W_w, out=buf[: j - i])
            w.addmm_(starts[i:j], V_w)
            # (w²)ᵀ-side product: with only blk output columns the other way runs ~2x slower
            flat_out[i:j] = torch.mm(sum_p.mT, w.mul_(w).mT, out=sq[:, : j - i]).mT
        return out
    per = max(1, rows // nb)  # (N, nb, blk k) strided: chunks of sequences
    for i in range(0, N, per):
        j = min(i + per, N)
        w = torch.bmm(z_blocks[i:j], W_w.expand(j - i, *W_w.shape))
        w.baddbmm_(starts[i:j], V_w.expand(j - i, *V_w.shape))
        out[i:j] = w.mul_(w) @ sum_p
    return out


def as_blocks(v, nb, blk):
    """The full blocks of ``v (N, T, d)`` (contiguous): a ``(N nb, blk d)`` view when they
    tile it (``T = nb blk``), else a strided ``(N, nb, blk d)`` view."""
    N, T, d = v.shape
    if T == nb * blk:
        return v.view(N * nb, blk * d)
    return v[:, : nb * blk].view(N, nb, blk * d)


def product_into(out, a, W):
    """``a @ W`` for a 2-D or 3-D (batched) ``a``, written into ``out`` (None: a new
    tensor), straight into it when autograd is not recording."""
    if a.dim() == 2:
        op, args = torch.mm, (a, W)
    else:
        op, args = torch.bmm, (a, W.expand(a.shape[0], *W.shape))
    return op(*args) if out is None else write_into(out, op, *args)


def narrow_product(a, W):
    """``a @ W`` (2-D or batched ``a``) for a ``W`` with few columns, computed as ``(Wᵀ aᵀ)ᵀ``
    (the result a transposed view): BLAS runs products with a handful of output columns
    several times slower than with a handful of rows (``(32000, 32) @ (32, 4)``: 0.7 vs
    0.2 ms)."""
    if a.dim() == 2:
        return torch.mm(W.mT, a.mT).mT
    return torch.bmm(W.mT.expand(a.shape[0], *W.mT.shape), a.mT).mT


def add_product(out, a, W):
    """``out += a @ W`` in place (2-D or batched)."""
    if out.dim() == 2:
        return out.addmm_(a, W)
    return out.baddbmm_(a, W.expand(a.shape[0], *W.shape))
