"""The Rauch–Tung–Striebel smoother's gains and sequential backward pass (private; see
:func:`pyrossm.lgssm.kalman_smoother`).

Shapes: means ``(..., T, n)``, covariances ``(..., T, n, n)``, time at dim -2 resp. -3.
A backward step is the congruence P_t = c_t + G_t P_{t+1} G_tᵀ with
c_t = P_t^f - G_t P_{t+1}^- G_tᵀ, and m_t = o_t + G_t m_{t+1} with o_t = m_t^f - G_t m_{t+1}^-.

* Without missing data the filter's covariances and the gains ``G_t`` are shared by all
  sequences (no data batch): the smoothed covariances come from an associative scan over time
  (O(log T) depth, the parameters' batch only) and the means from the block recurrence of
  :mod:`pyrossm.lgssm._recurrence`.
* With per-sequence covariances (missing data): few long sequences are cut into chunks of time
  solved backwards as one batch and completed exactly (:func:`_chunked_pass`); many sequences
  take one step at a time, the batch laid out last (:func:`_batch_last_loop`).

The gains' many small solves use :mod:`pyrossm.lgssm._small` when there are many of them.
"""

from __future__ import annotations

import torch

from pyrossm._gaussian import broadcast_shapes
from pyrossm._gaussian import cholesky as _cholesky
from pyrossm._gaussian import mv as _mv
from pyrossm._gaussian import sym as _sym

from . import _small
from ._recurrence import tracks_grad, varying_affine_recurrence
from ._scan import associative_scan
from ._workspace import scratch


def gains(filt_covs, pred_covs, A):
    """G_t = P_t^f A_{t+1}ᵀ (P_{t+1}^-)^{-1} for t = 0..T-2 (Cholesky solve, no inverse);
    ``A`` is ``(n, n)`` or ``(..., T, n, n)`` (time-varying or batched).

    A singular predicted covariance (a state without noise, e.g. Q and init_cov singular) has
    no inverse; there the Moore–Penrose pseudo-inverse is used, which gives the exact smoother
    because the columns of A P^f lie in the range of P^- = A P^f Aᵀ + Q. A predicted covariance
    counts as singular when a Cholesky pivot is below ``n·eps`` of its diagonal entry.
    """
    P_next = pred_covs[..., 1:, :, :]
    if A.dim() == 2:  # time-invariant, no batch: A P = (P Aᵀ)ᵀ, one product over every P
        APf = (filt_covs[..., :-1, :, :] @ A.transpose(-1, -2)).transpose(-1, -2)
    else:
        APf = A[..., 1:, :, :] @ filt_covs[..., :-1, :, :]
    batch = broadcast_shapes(P_next.shape[:-2], APf.shape[:-2])
    P_next, APf = P_next.expand(batch + P_next.shape[-2:]), APf.expand(batch + APf.shape[-2:])
    n = P_next.shape[-1]
    tol = n * torch.finfo(P_next.dtype).eps
    diag = torch.diagonal(P_next, dim1=-2, dim2=-1).detach()
    if _small.use_unrolled(P_next):  # many small matrices: the batch-last factorisation
        X, pivots = _small.spd_solve(P_next, APf)
        with torch.no_grad():
            singular = ~(pivots > tol * diag.abs().amax(-1, keepdim=True)).all(-1)
            singular = singular | ~torch.isfinite(X).all(-1).all(-1)
        if not bool(singular.any()):
            return X.transpose(-1, -2).contiguous()  # the layout of the LAPACK path
    L, info = torch.linalg.cholesky_ex(P_next)
    with torch.no_grad():
        pivots = torch.diagonal(L, dim1=-2, dim2=-1).pow(2)
        singular = (info != 0) | (pivots <= tol * diag.abs().amax(-1, keepdim=True)).any(-1)
        singular = singular | ~torch.isfinite(L).all(-1).all(-1)
    if not bool(singular.any()):
        return torch.cholesky_solve(APf, L).transpose(-1, -2)
    # Solve with an identity factor where singular (keeps NaN out of values and gradients),
    # then put the pseudo-inverse solutions in those places.
    eye = torch.eye(n, dtype=L.dtype, device=L.device)
    L = _cholesky(torch.where(singular[..., None, None], eye, P_next))
    G = torch.cholesky_solve(APf, L).transpose(-1, -2)
    idx = singular.nonzero(as_tuple=True)
    pinv = torch.linalg.pinv(P_next[idx], rtol=tol, hermitian=True)
    G = G.index_put(idx, (pinv @ APf[idx]).transpose(-1, -2))
    return G


def backward_pass(G, fm, fc, pm, pc):
    """Smoothed covariances and means ``(sc, sm)`` from the gains ``G (..., T-1, n, n)`` and
    the filtered / predicted moments: P_t = P_t^f + G_t (P_{t+1} - P_{t+1}^-) G_tᵀ and
    m_t = G_t m_{t+1} + (m_t^f - G_t m_{t+1}^-)."""
    T, n = fm.shape[-2:]
    offset = fm[..., :-1, :] - _mv(G, pm[..., 1:, :])
    if G.dim() == 3 and fc.dim() == 3 and pc.dim() == 3:  # shared by every sequence
        return _scanned_covs(G, fc, pc), _blocked_means(G, fm, offset)
    if fc.dim() > 3:  # per-sequence covariances
        N = broadcast_shapes(fm.shape[:-2], fc.shape[:-3]).numel()
        if T >= _CHUNKED_MIN_STEPS and N <= _CHUNKED_MAX_SEQUENCES:
            return _chunked_pass(G, fm, fc, pc, offset)
        if N >= _BATCH_LAST_MIN:
            return _batch_last_loop(G, fm, fc, pc, offset)
    # covariances (parameters' batch only) and means (data batch) in separate loops
    sc_list = [fc[..., -1, :, :]]
    for t in range(T - 2, -1, -1):
        Gt = G[..., t, :, :]
        P = fc[..., t, :, :] + Gt @ (sc_list[-1] - pc[..., t + 1, :, :]) @ Gt.transpose(-1, -2)
        sc_list.append(_sym(P))
    sc = torch.stack(sc_list[::-1], -3)
    Gt_all = G.transpose(-1, -2)
    sm_list = [fm[..., -1, :]]
    for t in range(T - 2, -1, -1):
        m = (sm_list[-1].unsqueeze(-2) @ Gt_all[..., t, :, :]).squeeze(-2) + offset[..., t, :]
        sm_list.append(m)
    return sc, torch.stack(sm_list[::-1], -2)


# Per-sequence covariances (missing data) of at least this many sequences are smoothed in
# batch-last layout: a step is then a dozen elementwise operations over (n, n, n, N) arrays
# instead of batched n × n products, which cost tens of µs each for small n.
_BATCH_LAST_MIN = 16


# Per-sequence covariances of few sequences (at most _CHUNKED_MAX_SEQUENCES) and at least
# _CHUNKED_MIN_STEPS steps are smoothed in chunks of time run as one batch (:func:`_chunked_pass`;
# the chunks and the sequences together make a batch of about _CHUNKED_BATCH). Measured here
# (float32, n = 4, 10% missing): 1 × 5000 steps 41 ms against 198 ms one step at a time,
# 16 × 10,000 475 ms against 625 ms; from 32 sequences on the step-by-step loop is as fast, and at
# 64 faster (its per-step products are already wide, the chunks' completion costs B × T more).
_CHUNKED_MIN_STEPS = 64
_CHUNKED_MAX_SEQUENCES = 32
_CHUNKED_BATCH = 2048


def _chunked_pass(G, fm, fc, pc, offset):
    """:func:`backward_pass` with time cut into ``nc`` chunks that run backwards together.

    A step is the congruence P_t = c_t + G_t P_{t+1} G_tᵀ (c_t = P_t^f - G_t P_{t+1}^- G_tᵀ)
    and m_t = o_t + G_t m_{t+1}; over a stretch of steps these compose to
    P_t = X_t + Φ_t P_end Φ_tᵀ and m_t = y_t + Φ_t m_end, with Φ_t = G_t ⋯ G_{end-1} and (X, y)
    the solution from P_end = 0, m_end = 0. Every chunk computes its (X, y, Φ) from zero in
    the same loop (``L`` steps instead of ``T``), the chunks' end states are then passed back
    one chunk at a time, and every step is completed in one batched product. Exact: no
    truncation, only the order of the arithmetic changes.
    """
    T, n = fm.shape[-2:]
    batch = broadcast_shapes(G.shape[:-3], fm.shape[:-2], fc.shape[:-3], pc.shape[:-3])
    S = T - 1  # steps t = 0 .. T-2
    N = torch.Size(batch).numel()
    fcN = fc.expand(batch + fc.shape[-3:]).reshape(N, T, n, n)
    fmN = fm.expand(batch + fm.shape[-2:]).reshape(N, T, n)
    nc = max(1, min(S // 16, -(-_CHUNKED_BATCH // N)))
    L = -(-S // nc)
    pad = nc * L - S

    def chunks(v, core, eye=False):  # batch + (S, core) -> (L, nc N, core), padded at the end
        v = v.expand(batch + v.shape[-1 - len(core):]).reshape((N, S) + core)
        if pad:  # identity steps after t = S - 1 (G = I, c = 0, o = 0) leave the state as is
            fill = v.new_zeros((N, pad) + core)
            if eye:
                fill = fill + torch.eye(n, dtype=v.dtype, device=v.device)
            v = torch.cat([v, fill], 1)
        v = v.reshape((N, nc, L) + core).permute((2, 1, 0) + tuple(range(3, 3 + len(core))))
        return v.reshape((L, nc * N) + core)

    c = fc[..., :-1, :, :] - G @ pc[..., 1:, :, :] @ G.transpose(-1, -2)
    Gc, cc, oc = chunks(G, (n, n), eye=True), chunks(c, (n, n)), chunks(offset, (n,))
    X = torch.zeros_like(cc[0])
    y = torch.zeros_like(oc[0])
    Phi = torch.eye(n, dtype=X.dtype, device=X.device).expand_as(X)
    Xs, ys, Phis = [None] * L, [None] * L, [None] * L
    for j in range(L - 1, -1, -1):
        Gj = Gc[j]
        X = torch.baddbmm(cc[j], Gj @ X, Gj.transpose(-1, -2))
        y = torch.baddbmm(oc[j].unsqueeze(-1), Gj, y.unsqueeze(-1)).squeeze(-1)
        Phi = Gj @ Phi
        Xs[j], ys[j], Phis[j] = X, y, Phi
    # the chunks' end states, passed back from the last chunk: (nc, N, ...)
    P_end, m_end = [fcN[:, -1]], [fmN[:, -1]]
    X0, y0, Phi0 = (v.reshape(nc, N, *v.shape[1:]) for v in (Xs[0], ys[0], Phis[0]))
    for k in range(nc - 1, 0, -1):
        P_end.append(X0[k] + Phi0[k] @ P_end[-1] @ Phi0[k].transpose(-1, -2))
        m_end.append(y0[k] + (Phi0[k] @ m_end[-1].unsqueeze(-1)).squeeze(-1))
    P_end = torch.stack(P_end[::-1], 0).reshape(nc * N, n, n)
    m_end = torch.stack(m_end[::-1], 0).reshape(nc * N, n)
    Xs, ys, Phis = torch.stack(Xs, 0), torch.stack(ys, 0), torch.stack(Phis, 0)  # (L, nc N, .)
    P = Xs + Phis @ P_end @ Phis.transpose(-1, -2)
    m = ys + (Phis @ m_end.unsqueeze(-1)).squeeze(-1)

    def unchunk(v, core):  # (L, nc N, core...) -> batch + (S, core...)
        v = v.reshape((L, nc, N) + core).permute((2, 1, 0) + tuple(range(3, 3 + len(core))))
        return v.reshape((N, nc * L) + core)[:, :S]

    sc = torch.cat([_sym(unchunk(P, (n, n))), fcN[:, -1:]], 1).reshape(batch + (T, n, n))
    sm = torch.cat([unchunk(m, (n,)), fmN[:, -1:]], 1).reshape(batch + (T, n))
    return sc, sm


def _batch_last_loop(G, fm, fc, pc, offset):
    """:func:`backward_pass` one step at a time with the batch laid out last, ``(T, n, n, N)``.
    Without autograd the batch-last copies and the stacked results live in buffers reused
    between calls (:mod:`._workspace`: at 256 x 1000 they are 80 MB of fresh memory, one page
    fault per 4 KB, on every call otherwise)."""
    T, n = fm.shape[-2:]
    batch = broadcast_shapes(G.shape[:-3], fm.shape[:-2], fc.shape[:-3], pc.shape[:-3])
    grad = tracks_grad(G, fm, fc, pc, offset)

    def last(v, core, name):  # batch + (time, core...) -> (time, core..., N), contiguous
        v = v.expand(batch + v.shape[-1 - len(core):]).reshape((-1,) + v.shape[-1 - len(core):])
        v = v.permute(tuple(range(1, v.dim())) + (0,))
        if grad:
            return v.contiguous()
        return scratch(f"smoother.{name}", v.shape, v.dtype, v.device).copy_(v)

    Gl, fcl, pcl = last(G, (n, n), "G"), last(fc, (n, n), "fc"), last(pc, (n, n), "pc")
    offl, fml = last(offset, (n,), "offset"), last(fm[..., -1:, :], (n,), "fm")
    N = fcl.shape[-1]
    P, m = fcl[-1], fml[0]
    if grad:
        covs, means = [P], [m]
    else:
        covs = scratch("smoother.covs", (T, n, n, N), P.dtype, P.device)
        means = scratch("smoother.means", (T, n, N), P.dtype, P.device)
        covs[T - 1], means[T - 1] = P, m
    for t in range(T - 2, -1, -1):
        Gt = Gl[t]
        D = P - pcl[t + 1]
        GD = (Gt.unsqueeze(2) * D.unsqueeze(0)).sum(1)  # [i, k] = Σ_j G_ij D_jk
        P = fcl[t] + (GD.unsqueeze(1) * Gt.unsqueeze(0)).sum(2)  # + [i, l] Σ_k GD_ik G_lk
        P = 0.5 * (P + P.transpose(0, 1))
        m = (Gt * m.unsqueeze(0)).sum(1) + offl[t]
        if grad:
            covs.append(P)
            means.append(m)
        else:
            covs[t], means[t] = P, m
    if grad:
        covs, means = torch.stack(covs[::-1], 0), torch.stack(means[::-1], 0)
    # (contiguous: new arrays, never views of the reused buffers)
    sc = covs.permute(3, 0, 1, 2).contiguous().reshape(batch + (T, n, n))
    sm = means.permute(2, 0, 1).contiguous().reshape(batch + (T, n))
    return sc, sm


def _scanned_covs(G, fc, pc):
    """P_t = G_t P_{t+1} G_tᵀ + (P_t^f - G_t P_{t+1}^- G_tᵀ), P_{T-1} = P_{T-1}^f, by an
    associative scan backwards in time over the maps X ↦ E X Eᵀ + L (composition:
    (E_1, L_1) ∘ (E_2, L_2) = (E_1 E_2, E_1 L_2 E_1ᵀ + L_1))."""
    zero = torch.zeros_like(fc[-1:])
    E = torch.cat([G, zero], 0)
    pc_next = torch.cat([pc[1:], zero], 0)
    L = _sym(fc - E @ pc_next @ E.transpose(-1, -2))

    def compose(later, earlier):  # "later" in scan order is earlier in time
        E2, L2 = later
        E1, L1 = earlier
        return E2 @ E1, _sym(E2 @ L1 @ E2.transpose(-1, -2) + L2)

    _, sc = associative_scan(lambda a, b: compose(b, a), (E.flip(0), L.flip(0)), (-3, -3))
    return sc.flip(0)


def _blocked_means(G, fm, offset):
    """m_t = G_t m_{t+1} + offset_t backwards from m_{T-1} = m_{T-1}^f, for every sequence:
    in reversed time a row-form recurrence with the shared F_sᵀ = G_{T-2-s}ᵀ."""
    T, n = fm.shape[-2:]
    batch = fm.shape[:-2]
    fmN = fm.reshape(-1, T, n)
    u = offset.expand(batch + (T - 1, n)).reshape(-1, T - 1, n).flip(1)
    rest = varying_affine_recurrence(u, G.transpose(-1, -2).flip(0), fmN[:, -1])
    return torch.cat([rest.flip(1), fmN[:, -1:]], 1).reshape(batch + (T, n))
