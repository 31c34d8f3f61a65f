"""Kernels of the sequential Kalman filter (private; see :mod:`pyrossm.lgssm.inference`).

Sequences are ``(..., T, dim)`` with time at dim -2; inside the kernels the data are laid out
time-major, ``(T, N, dim)`` with the batch flattened to ``N``, so that one step is a slice.

Two paths:

* **shared covariances** (no missing data): the covariance recursion does not depend on the
  data, so it runs over the parameters' batch only. The first ``_SEQ_STEPS`` steps are run one by
  one and stop early at the Riccati fixed point (exactly, see :func:`riccati_sequential`); the
  remaining steps, if any, come from the associative scan of Särkkä & García-Fernández (2021)
  over the covariance part only (O(log T) depth, no data); with time-invariant parameters,
  whose elements after the first are all the same, by doubling (:mod:`._scan`). Without the
  fixed-point test a single shared system starts the doubling at step 0.
  The means are then a linear recurrence with known gains, solved in blocks of about 8 steps
  (:mod:`pyrossm.lgssm._recurrence`); before the fixed point (all steps without it) and for
  batches of more than a few sequences, with one operator per block shared by all sequences
  (:mod:`pyrossm.lgssm._blocks`).
  After the fixed point the blocks are aligned with t = 0, so that the filtered means, the
  predicted means and the whitened innovations of every block of every sequence are each
  one product of the blocks' inputs plus one of the means before the blocks (those solve the
  same recurrence, recursively); without moments
  (:func:`pyrossm.lgssm.kalman_log_likelihood`) the means are never written.
* **per-sequence covariances** (missing entries): one lean step per time point over the whole
  batch; an unobserved entry has its row of C zeroed, its row/column of R replaced by the
  identity and its innovation set to 0 (its N(0; 0, 1) factor is removed afterwards).
"""

from __future__ import annotations

import math

import torch

from pyrossm._gaussian import LOG_2PI as _LOG_2PI
from pyrossm._gaussian import broadcast_shapes, cholesky, congruence, sym

from . import _small
from ._blocks import (
    add_product,
    as_blocks,
    narrow_product,
    predicted_means,
    product_into,
    sums_of_squares,
    varying_block_steps,
)
from ._recurrence import (
    affine_recurrence,
    block_length,
    filter_block_operators,
    parameter_work,
    tracks_grad,
    varying_affine_recurrence,
)
from ._scan import _cov_combine, _doubling_prefixes, associative_scan

# The steady-state stop allows this many ulps of distance to the Riccati fixed point.
_STEADY_ULPS = 32
# Steps of the covariance recursion run one at a time before the rest is scanned in parallel.
_SEQ_STEPS = 64
# The means before the fixed point are solved with per-block operators (._blocks) from this
# many sequences x steps and 8 sequences on. The operators cost as much as the step path for
# 1-2 sequences (5-18% more at 1 x 100,000 and 2 x 20,000 steps), the same at 8 x 4096 and
# 33 x 1000, and save 35-50% at 16 x 10,000 and 256 x 1000 (session 12, one thread); with
# fewer than 64 sequences the blocks are 4 steps long (half the operators' size).
_BLOCK_STEPS_MIN_WORK = 1 << 15
_BLOCK_STEPS_MIN_BATCH = 8
# From this many steps the innovation covariances of all steps are factorised entry by entry
# over the steps (._small) instead of by LAPACK's per-matrix loop (measured crossover ~1,000).
_UNROLLED_MIN_STEPS = 2048
# Stop the covariance recursion at the Riccati fixed point (set False to measure without it).
STEADY_STATE = True


# ----------------------------------------------------------------------------------------------
# small linear-algebra helpers
def at(param, t, time_varying):
    return param[..., t, :, :] if time_varying else param


def with_time(param, time_varying):
    """The parameter with a time dim at -3 (size 1 when time-invariant)."""
    return param if time_varying else param.unsqueeze(-3)


def innovation_terms(P_pred, C, R):
    """The Cholesky factor of S = C P Cᵀ + R and the gain K = P Cᵀ S⁻¹."""
    CP = C @ P_pred
    S = sym(CP @ C.transpose(-1, -2) + R)
    L = cholesky(S)
    K = torch.cholesky_solve(CP, L).transpose(-1, -2)
    return L, K


def _many_innovation_terms(P_pred, C, R):
    """:func:`innovation_terms` for many steps at once (``P_pred (..., T, n, n)``): with many
    small matrices the factorisation and the solve are written out entry by entry over the
    batch (:mod:`._small`), instead of LAPACK's per-matrix loop. A shared ``C`` (no time or
    batch dims) is applied by single GEMMs (:func:`~pyrossm._gaussian.congruence`; P Cᵀ
    instead of C P, which would be one small product per step)."""
    if C.dim() == 2 and R.dim() == 2:
        PCt = P_pred @ C.mT  # (C P)ᵀ: P is symmetric
        S = congruence(C, P_pred, R)
    else:
        PCt = (C @ P_pred).transpose(-1, -2)
        S = sym(PCt.transpose(-1, -2) @ C.transpose(-1, -2) + R)
    if not _small.use_unrolled(S, _UNROLLED_MIN_STEPS):
        L = cholesky(S)
        # K = P Cᵀ S⁻¹: LAPACK's LU solve over many 4 x 4 matrices takes about half the time
        # of its Cholesky solve
        return L, torch.linalg.solve(S, PCt, left=False)
    X, _, L = _small.spd_solve(S, PCt.transpose(-1, -2), return_factor=True)  # one factorisation
    return L, X.transpose(-1, -2)


def update_cov(P_pred, K, C, R):
    # Joseph form keeps the covariance symmetric positive semi-definite in float32.
    n = P_pred.shape[-1]
    I_KC = torch.eye(n, dtype=P_pred.dtype, device=P_pred.device) - K @ C
    return sym(I_KC @ P_pred @ I_KC.transpose(-1, -2) + K @ R @ K.transpose(-1, -2))


# ----------------------------------------------------------------------------------------------
# covariance recursion (data-independent)
def contraction_rate(K, C, A):
    """An upper estimate of the per-step contraction of the Riccati map near its fixed point.

    Near the fixed point an error X in the predicted covariance maps to F X Fᵀ with the
    closed-loop matrix F = (I - K C) A, so errors shrink by about ρ(F)² per step. Estimated as
    ``‖F^16‖_F^(2/16)`` (an upper bound of ρ(F)², up to a factor n^(1/16)); the largest over
    the parameters' batch.
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=torch.float64, device=A.device)
    F = (eye - K.double() @ C.double()) @ A.double()
    for _ in range(4):
        F = torch.nan_to_num(F @ F, nan=math.inf)
    return float(torch.linalg.matrix_norm(F).max()) ** (2.0 / 16)


def riccati_sequential(prep, T, batch_shape, check, steps):
    """The covariance recursion for the first ``min(T, steps)`` steps, one step at a time.

    Returns lists (one entry per step) of predicted covariances, filtered covariances, gains
    and Cholesky factors of the innovation covariances, and ``t_steady``.

    ``check`` (time-invariant parameters, no missing data): the recursion
    P⁻ ↦ A (P⁻ - K S Kᵀ) Aᵀ + Q may reach a fixed point, and the loop stops only when it is
    reached to rounding: the residual ``‖Φ(P⁻) - P⁻‖`` (the change of the predicted covariance
    in one step, relative to each entry's scale ``sqrt(P_ii P_jj)``) is 0, or it is a few ulps
    *and* the distance to the fixed point it implies for a map contracting by ``q`` per step,
    ``residual / (1 - q)``, is below ``_STEADY_ULPS`` ulps. Every later step then equals the
    last one (``t_steady``, else None). Slow convergence, e.g. a unit eigenvalue of A with
    Q = 0 (a constant regression coefficient), has ``q ≈ 1`` and never stops early.
    """
    P = prep.init_cov.expand(batch_shape + prep.init_cov.shape[-2:])
    pred, filt, gains, chols = [], [], [], []
    eps = torch.finfo(P.dtype).eps
    for t in range(min(T, steps)):
        if t > 0:
            At = at(prep.A, t, prep.tv["A"])
            P = sym(At @ P @ At.transpose(-1, -2) + at(prep.Q, t, prep.tv["Q"]))
        if check and t >= 2 and t % 4 == 0 and _at_fixed_point(P, pred[-1], gains[-1], prep, eps):
            return pred, filt, gains, chols, t
        Ct, Rt = at(prep.C, t, prep.tv["C"]), at(prep.R, t, prep.tv["R"])
        L, K = innovation_terms(P, Ct, Rt)
        pred.append(P)
        gains.append(K)
        chols.append(L)
        P = update_cov(P, K, Ct, Rt)
        filt.append(P)
    return pred, filt, gains, chols, None


def _at_fixed_point(P, P_prev, K, prep, eps):
    with torch.no_grad():
        d = torch.diagonal(P, dim1=-2, dim2=-1).clamp_min(torch.finfo(P.dtype).tiny).sqrt()
        change = float(((P - P_prev).abs() / (d.unsqueeze(-1) * d.unsqueeze(-2))).max())
        if change == 0.0:  # a bitwise fixed point: every later step is the same
            return True
        if change > 8 * eps:
            return False
        q = contraction_rate(K, prep.C, prep.A)
        return q < 1 and change / (1 - q) <= _STEADY_ULPS * eps


def riccati_scan(prep, t0, P_filt0, T):
    """Filtered covariances of steps ``t0 + 1 .. T - 1`` given the filtered covariance at
    ``t0``, by an associative scan (O(log T) depth) over the covariance parts of the filtering
    elements; the parameters' batch only."""
    sl = (
        lambda name: (  # noqa: E731
            getattr(prep, name)[..., t0 + 1 : T, :, :] if prep.tv[name] else getattr(prep, name)
        )
    )
    plain = [getattr(prep, k) for k in "ACQR"]
    if not any(prep.tv.values()) and P_filt0.dim() == 2 and all(M.dim() == 2 for M in plain):
        # one shared system (the common case): the same algebra on (n, n) matrices, without
        # the time dims of the general case (a third of the small operations); the prefixes
        # start at the filtered covariance of step t0 itself (dropped), which then needs no
        # element of its own
        return _doubling_prefixes(P_filt0.unsqueeze(0), _generic_element(*plain), T - t0)[1:]
    A, C, Q, R = (with_time(sl(k), prep.tv[k]) for k in "ACQR")
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    # Generic element: the prior z_t | z_{t-1} conditioned on x_t (covariance part).
    Lq, Kq = innovation_terms(Q, C, R)
    Fm = (eye - Kq @ C) @ A
    Cov = update_cov(Q, Kq, C, R)
    CA = C @ A
    J = sym(CA.transpose(-1, -2) @ torch.cholesky_solve(CA, Lq))
    # First element: z_{t0+1} predicted from the filtered z_{t0}, conditioned on x_{t0+1}.
    A1, Q1 = A[..., :1, :, :], Q[..., :1, :, :]
    P1 = sym(A1 @ P_filt0.unsqueeze(-3) @ A1.transpose(-1, -2) + Q1)
    _, K1 = innovation_terms(P1, C[..., :1, :, :], R[..., :1, :, :])
    Cov1 = update_cov(P1, K1, C[..., :1, :, :], R[..., :1, :, :])
    L = T - t0 - 1
    batch = broadcast_shapes(Fm.shape[:-3], Cov.shape[:-3], Cov1.shape[:-3], J.shape[:-3])
    if not any(prep.tv[k] for k in "ACQR"):  # every element after the first is the same
        full = lambda M: M.expand(batch + M.shape[-3:])  # noqa: E731
        return _doubling_prefixes(full(Cov1), (full(Fm), full(Cov), full(J)), L)
    full = lambda M: M.expand(batch + (L, n, n))  # noqa: E731
    Fm, Cov, J = full(Fm), full(Cov), full(J)
    Fm = torch.cat([torch.zeros_like(Fm[..., :1, :, :]), Fm[..., 1:, :, :]], -3)
    Cov = torch.cat([Cov1.expand(batch + (1, n, n)), Cov[..., 1:, :, :]], -3)
    J = torch.cat([torch.zeros_like(J[..., :1, :, :]), J[..., 1:, :, :]], -3)
    _, filt, _ = associative_scan(_cov_combine, (Fm, Cov, J), (-3, -3, -3))
    return filt


def _generic_element(A, C, Q, R):
    """The covariance part ``(F, Cov, J)`` (three ``(n, n)`` matrices) of the filtering element
    of one step of a shared system (``A (n, n)``, ``C (p, n)``, ``Q``, ``R``): the prior
    z_t | z_{t-1} conditioned on x_t (:func:`riccati_scan`)."""
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    Lq, Kq = innovation_terms(Q, C, R)
    CA = C @ A
    J = sym(CA.mT @ torch.cholesky_solve(CA, Lq))
    return (eye - Kq @ C) @ A, update_cov(Q, Kq, C, R), J


def _one_system_covariances(prep, T, moments):
    """:func:`shared_covariances` without the fixed-point test for one shared system (``A``,
    ``C``, ``Q``, ``R``, ``init_cov`` without time or batch dims): the filtered covariances of
    all steps by doubling from that of step 0, then the predicted ones and the innovation
    terms of all steps in one batch each."""
    A, C, Q, R, P0 = prep.A, prep.C, prep.Q, prep.R, prep.init_cov
    _, K0 = innovation_terms(P0, C, R)
    filt0 = update_cov(P0, K0, C, R).unsqueeze(0)
    filt = _doubling_prefixes(filt0, _generic_element(A, C, Q, R), T)
    pred = torch.cat([P0.unsqueeze(0), congruence(A, filt[:-1], Q)], 0)
    L, K = _many_innovation_terms(pred, C, R)
    return (pred, filt, K, L, T) if moments else (None, None, K, L, T)


def shared_covariances(prep, T, batch_shape, allow_steady=True, moments=True):
    """Predicted/filtered covariances, gains and innovation Cholesky factors of all steps.

    Returns ``(pred, filt, gains, chols, T_distinct)``: tensors with a time dim at -3 of length
    ``T_distinct`` (``T``, or the step of the fixed point: later steps equal the last one).
    ``moments=False``: ``pred`` and ``filt`` are None (the gains and factors are what the
    log-likelihood needs).
    """
    check = allow_steady and not any(prep.tv.values())
    # Without the fixed-point test the sequential steps only pay for short series: one step,
    # then the scan (whose elements start at a filtered covariance); for one shared system
    # the doubling starts at step 0 itself (_one_system_covariances).
    steps = _SEQ_STEPS if check or T <= _SEQ_STEPS else 1
    if steps == 1 and all(M.dim() == 2 for M in (prep.A, prep.C, prep.Q, prep.R, prep.init_cov)):
        return _one_system_covariances(prep, T, moments)
    pred, filt, gains, chols, t_steady = riccati_sequential(prep, T, batch_shape, check, steps)
    stack = lambda seq: torch.stack(seq, -3)  # noqa: E731
    pred, filt, gains, chols = stack(pred), stack(filt), stack(gains), stack(chols)
    t0 = pred.shape[-3]
    if t_steady is not None or t0 == T:
        return (pred, filt, gains, chols, t0) if moments else (None, None, gains, chols, t0)
    rest_filt = riccati_scan(prep, t0 - 1, filt[..., -1, :, :], T)
    A = with_time(prep.A[..., t0:, :, :] if prep.tv["A"] else prep.A, prep.tv["A"])
    Q = with_time(prep.Q[..., t0:, :, :] if prep.tv["Q"] else prep.Q, prep.tv["Q"])
    prev = torch.cat([filt[..., -1:, :, :], rest_filt[..., :-1, :, :]], -3)
    if A.dim() == 3 and A.shape[0] == 1 and Q.dim() == 3 and Q.shape[0] == 1:  # shared A, Q
        rest_pred = congruence(A[0], prev, Q[0])
    else:
        rest_pred = sym(A @ prev @ A.transpose(-1, -2) + Q)
    C = prep.C[..., t0:, :, :] if prep.tv["C"] else prep.C
    R = prep.R[..., t0:, :, :] if prep.tv["R"] else prep.R
    if C.dim() > 2 or R.dim() > 2:  # a time dim at -3 for the broadcast with the steps
        C, R = with_time(C, prep.tv["C"]), with_time(R, prep.tv["R"])
    rest_L, rest_K = _many_innovation_terms(rest_pred, C, R)
    return (
        _cat_time(pred, rest_pred) if moments else None,
        _cat_time(filt, rest_filt) if moments else None,
        _cat_time(gains, rest_K),
        _cat_time(chols, rest_L),
        T,
    )


def _cat_time(a, b):
    batch = broadcast_shapes(a.shape[:-3], b.shape[:-3])
    return torch.cat([a.expand(batch + a.shape[-3:]), b.expand(batch + b.shape[-3:])], -3)


# ----------------------------------------------------------------------------------------------
# means and log-likelihoods
def _time_major(v, batch):
    """``(..., T, d)`` broadcast to ``batch`` -> ``(T, N, d)`` (contiguous)."""
    T, d = v.shape[-2:]
    return v.expand(batch + (T, d)).reshape(-1, T, d).transpose(0, 1).contiguous()


def _batch_major(v, batch):
    """``(T, N, ...)`` -> ``batch + (T, ...)``."""
    return v.transpose(0, 1).reshape(batch + v.shape[:1] + v.shape[2:])


def _apply(M, v, tv):
    """``M_t v_t`` for time-major ``v (T, N, m)``; ``M (n, m)``, or ``(T, n, m)`` if ``tv``."""
    if tv:
        return torch.bmm(v, M.transpose(-1, -2))
    return v @ M.transpose(-1, -2)


def _param_batch(prep):
    shapes = [prep.init_cov.shape[:-2]]
    for k in "ACQR":
        p = getattr(prep, k)
        shapes.append(p.shape[:-3] if prep.tv[k] else p.shape[:-2])
    return broadcast_shapes(*shapes)


def _data_batch(prep):
    shapes = [prep.x.shape[:-2], prep.init_mean.shape[:-1]]
    if prep.b is not None:
        shapes.append(prep.b.shape[:-2])
    return broadcast_shapes(*shapes)


def shared_filter(prep, allow_steady=None, moments=True, per_step=True, predicted=True):
    """The filter when no entry is missing and the parameters have no batch dims.

    Returns ``(filt_means, filt_covs, pred_means, pred_covs, step_log_likelihoods)``; with
    ``moments=False`` the means past the Riccati fixed point are not written (all four
    moments are then None); with ``per_step=False`` the log-likelihoods may come summed over
    the steps (``(..., 1)``); with ``predicted=False`` the predicted moments are None (never
    computed).
    """
    T, p = prep.x.shape[-2:]
    if allow_steady is None:
        allow_steady = STEADY_STATE
    grad = tracks_grad(*(v for v in prep[:8] if isinstance(v, torch.Tensor)),
                       *(() if prep.b is None else (prep.b,)))
    with parameter_work(grad):
        pred_c, filt_c, K, L, Td = shared_covariances(prep, T, (), allow_steady, moments)
        eye_p = torch.eye(p, dtype=L.dtype, device=L.device)
        if _small.lower_inverse_pays(L):
            Linv = _small.lower_inverse(L)  # (Td, p, p)
        else:
            Linv = torch.linalg.solve_triangular(L, eye_p.expand(L.shape), upper=False)
        # (the diagonal copied first: log runs vectorised only on contiguous memory, 11 vs
        # 37 µs for 1,000 factors of 4 x 4)
        half_logdet = torch.diagonal(L, dim1=-2, dim2=-1).contiguous().log().sum(-1)  # (Td,)
    if moments and filt_c.is_inference() and not torch.is_inference_mode_enabled():
        # returned: normal tensors
        pred_c, filt_c = pred_c.clone() if predicted else None, filt_c.clone()
    batch = _data_batch(prep)
    T_var, blk = T, None
    if Td < T:  # past the fixed point the gain is constant: the means are solved in blocks
        blk = block_length(T)
        T_var = -(-Td // blk) * blk  # the steady blocks start at a block boundary
        if T // blk - T_var // blk < 3:
            T_var, blk = T, None  # too few blocks to pay: every step with the varying method
        extend = lambda M: M if T_var <= Td else torch.cat(  # noqa: E731
            [M, M[-1:].expand((T_var - Td,) + M.shape[1:])], 0)
        K, Linv, half_logdet = extend(K), extend(Linv), extend(half_logdet)
    N = math.prod(batch)
    if N >= _BLOCK_STEPS_MIN_BATCH and N * T_var >= _BLOCK_STEPS_MIN_WORK:
        fm, pm, ll, m = varying_block_steps(prep, batch, K, Linv, half_logdet, T_var,
                                            moments or blk is not None,
                                            4 if N < 64 else None, per_step or blk is not None,
                                            predicted)
    else:
        fm, pm, ll, m = _varying_steps(prep, batch, K, Linv, half_logdet, T_var)
    if blk is not None:
        fm, pm, ll = _steady_steps(prep, batch, K[-1], Linv[-1], half_logdet[-1], fm, ll, m,
                                   blk, moments, predicted)
    if not moments:
        return None, None, None, None, ll.reshape(batch + ll.shape[1:])
    full = lambda M: M if Td == T else _cat_time(M, M[-1:].expand((T - Td,) + M.shape[1:]))  # noqa: E731
    shape = lambda v: v.reshape(batch + v.shape[1:])  # noqa: E731
    if not predicted:
        return shape(fm), full(filt_c), None, None, shape(ll)
    return shape(fm), full(filt_c), shape(pm), full(pred_c), shape(ll)


def _varying_steps(prep, batch, K, Linv, half_logdet, Td):
    """Means and log-likelihoods of steps ``0 .. Td-1`` with time-varying gains (the means by
    :func:`~pyrossm.lgssm._recurrence.varying_affine_recurrence`, the rest time-major, one
    batched product over all steps). Returns batch-major ``(N, Td, .)`` tensors and the last
    mean."""
    n, p = prep.init_mean.shape[-1], prep.x.shape[-1]
    tvA, tvC = prep.tv["A"], prep.tv["C"]
    xt = _time_major(prep.x[..., :Td, :], batch)  # (Td, N, p)
    bt = None if prep.b is None else _time_major(prep.b[..., :Td, :], batch)
    A = prep.A[:Td] if tvA else prep.A
    C = prep.C[:Td] if tvC else prep.C
    eye = torch.eye(n, dtype=xt.dtype, device=xt.device)
    # m_t = F_t m_{t-1} + u_t, F_t = (I - K_t C_t) A_t, u_t = K_t (x_t - C_t b_t) + b_t
    xu = xt if bt is None else xt - _apply(C, bt, tvC)
    u = torch.bmm(xu, K.transpose(-1, -2))
    if bt is not None:
        u = u + bt
    C_all, A_all = with_time(C, tvC), with_time(A, tvA)
    Ft = ((eye - K @ C_all) @ A_all).transpose(-1, -2).contiguous()  # (Td, n, n)
    m0 = prep.init_mean.expand(batch + (n,)).reshape(-1, n)
    m = u[0] + m0 @ (eye - K[0] @ C_all[0]).transpose(-1, -2)
    # steps 1 .. Td-1 in blocks (one product per step for short stretches)
    rest = varying_affine_recurrence(u[1:].transpose(0, 1), Ft[1:], m)  # (N, Td - 1, n)
    filt_m = torch.cat([m.unsqueeze(0), rest.transpose(0, 1)], 0)  # (Td, N, n)
    m = filt_m[-1]
    pred_rest = _apply(A[1:] if tvA else A, filt_m[:-1], tvA)
    if bt is not None:
        pred_rest = pred_rest + bt[1:]
    pred_m = torch.cat([m0.unsqueeze(0), pred_rest], 0)
    # log N(x_t; C_t m_t^-, S_t), whitened by the shared L_t^{-1}
    w = torch.bmm(xt - _apply(C, pred_m, tvC), Linv.transpose(-1, -2))
    ll = -0.5 * (w.pow(2).sum(-1) + p * _LOG_2PI) - half_logdet.unsqueeze(-1)  # (Td, N)
    return filt_m.transpose(0, 1), pred_m.transpose(0, 1), ll.transpose(0, 1), m


def _steady_steps(prep, batch, K, Linv, half_logdet, fm, ll, m, blk, moments=True,
                  predicted=True):
    """All means and log-likelihoods, given those of the first ``s`` steps (``fm (N, s, n)``,
    ``ll (N, s)``, the last filtered mean ``m``; ``s`` a multiple of ``blk``) when steps
    ``s .. T-1`` are at the Riccati fixed point (constant gain ``K``, time-invariant
    parameters).

    Then the filtered means obey m_t = F m_{t-1} + u_t with F = (I - K C) A and u_t =
    K x_t + (I - K C) b_t, and over a block of ``blk`` steps the filtered means and the
    whitened innovations are each one product of the block's inputs plus one of the mean
    before the block (:func:`~pyrossm.lgssm._recurrence.filter_block_operators`); the
    predicted means follow from the filtered ones (:func:`~pyrossm.lgssm._blocks.predicted_means`).
    The blocks are aligned with t = 0, so that when ``blk`` divides T the blocks of all
    sequences are the rows of one matrix (one product for all); the means before the blocks
    solve the same recurrence with F^blk (:func:`~pyrossm.lgssm._recurrence.affine_recurrence`).
    The first ``s`` steps, computed on the blocks too, are overwritten by the given ones.
    Returns batch-major ``(N, T, n)``, ``(N, T, n)``, ``(N, T)``; with ``moments=False`` only
    the log-likelihoods (and None, None): the means are then never written, and only the
    block ends of the particular solutions are computed (a product with n columns);
    ``predicted=False``: the predicted means are None."""
    T, p = prep.x.shape[-2:]
    N, s, n = fm.shape
    nb, r = divmod(T, blk)
    A, C = prep.A, prep.C
    dt, dev = m.dtype, m.device
    eye = torch.eye(n, dtype=dt, device=dev)
    x = prep.x.expand(batch + (T, p)).reshape(N, T, p)
    F = (eye - K @ C) @ A
    if prep.b is None:
        z, map_in, direct_pred, direct_w = x.contiguous(), K.mT, None, Linv.mT
    else:  # inputs z_t = [x_t, b_t]
        b = prep.b.expand(batch + (T, n)).reshape(N, T, n)
        z = torch.cat([x, b], -1)
        map_in = torch.cat([K.mT, (eye - K @ C).mT], 0)
        direct_pred = torch.cat([torch.zeros(p, n, dtype=dt, device=dev), eye], 0)
        direct_w = torch.cat([Linv.mT, torch.zeros(n, p, dtype=dt, device=dev)], 0)
    with parameter_work(tracks_grad(F, Linv, A, C, map_in, z, m, fm, ll)):
        ops = filter_block_operators(F.mT, A.mT, map_in, direct_pred, direct_w, C.mT @ Linv.mT,
                                     blk)
    (W_m, V_m), (W_pred, V_pred), (W_w, V_w) = ops
    k = z.shape[-1]
    grad = tracks_grad(z, m, fm, ll, W_m, W_pred, W_w)  # in-place products only without it
    z_blocks = as_blocks(z, nb, blk)
    j0 = s // blk  # the first block past the given steps
    if moments:  # particular solutions (every block from a zero mean), then the block starts
        fm_all = fm.new_empty(N, T, n)
        fm_blocks = as_blocks(fm_all, nb, blk)
        product_into(fm_blocks, z_blocks, W_m)
        ends = fm_all[:, : nb * blk].view(N, nb, blk * n)[:, :, -n:]
    else:  # only the particular solutions' block ends are needed: a thin product
        ends = narrow_product(z_blocks, W_m[:, -n:]).reshape(N, nb, n)
    starts = ll.new_zeros(N, nb, n)
    starts[:, j0] = m
    starts[:, j0 + 1 :] = affine_recurrence(ends[:, j0:-1], None, V_m[:, -n:], m)
    if r and not moments:  # the mean after the last full block, for the tail
        m_end = torch.addmm(ends[:, -1], starts[:, -1], V_m[:, -n:])
    flat = starts.view(N * nb, n) if z_blocks.dim() == 2 else starts
    if moments:
        add_product(fm_blocks, flat, V_m)
    # Σ_p w² of every step: the whitened innovations are not kept (see _blocks.sums_of_squares)
    sum_p = torch.eye(blk, dtype=dt, device=dev).repeat_interleave(p, 0)  # I_blk ⊗ 1_p
    ll_all = ll.new_empty(N, T)
    if grad:
        w = add_product(product_into(None, z_blocks, W_w), flat, V_w)
        ll_all[:, : nb * blk] = ((w * w) @ sum_p).reshape(N, nb * blk)
    else:
        sums_of_squares(ll_all[:, : nb * blk].view(N, nb, blk), z_blocks, flat, W_w, V_w, sum_p)
    if r:  # the last, shorter block: the leading r blocks of the operators, from the last mean
        z_tail = z[:, nb * blk :].reshape(N, r * k)
        if moments:
            m_end = fm_all[:, nb * blk - 1].clone()  # (a copy: fm_all is written next)
        tail = lambda W, V, w_out: torch.addmm(  # noqa: E731
            z_tail @ W[: r * k, : r * w_out], m_end, V[:, : r * w_out])
        if moments:
            fm_all[:, nb * blk :] = tail(W_m, V_m, n).view(N, r, n)
        ll_all[:, nb * blk :] = tail(W_w, V_w, p).view(N, r, p).pow(2).sum(-1)
    ll_all = ll_all.mul(-0.5) if grad else ll_all.mul_(-0.5)
    ll_all = ll_all.sub_(0.5 * p * _LOG_2PI + half_logdet)
    ll_all[:, :s] = ll
    if not moments:
        return None, None, ll_all
    fm_all[:, :s] = fm
    if not predicted:
        return fm_all, None, ll_all
    m0 = prep.init_mean.expand(batch + (n,)).reshape(N, n)
    return fm_all, predicted_means(fm_all, m0, A.mT, None if prep.b is None else b), ll_all


def missing_filter(prep):
    """The filter with missing entries: per-sequence covariances, one lean step per time
    point over the whole (flattened) batch. Parameters without batch dims.

    Returns ``(filt_means, filt_covs, pred_means, pred_covs, step_log_likelihoods)``.
    """
    C, R, tvC, tvR = prep.raw
    A, Q, tvA, tvQ = prep.A, prep.Q, prep.tv["A"], prep.tv["Q"]
    T, p = prep.x.shape[-2:]
    n = prep.init_mean.shape[-1]
    batch = broadcast_shapes(_data_batch(prep), prep.obs.shape[:-2], prep.init_cov.shape[:-2])
    xt = _time_major(prep.x, batch)
    ot = _time_major(prep.obs.to(xt.dtype), batch)  # (T, N, p) 1 = observed
    bt = None if prep.b is None else _time_major(prep.b, batch)
    N = xt.shape[1]
    dt, dev = xt.dtype, xt.device
    # Masked [C | R] for every pattern of observed entries when C and R are time-invariant.
    CR_tab = code = None
    if not (tvC or tvR) and p <= 10:
        weights = 2 ** torch.arange(p, device=dev)
        code = (ot.long() * weights).sum(-1)  # (T, N)
        pats = ((torch.arange(2**p, device=dev).unsqueeze(-1) // weights) % 2).to(dt)
        C_tab = C * pats.unsqueeze(-1)  # (2^p, p, n)
        R_tab = R * (pats.unsqueeze(-1) * pats.unsqueeze(-2)) + torch.diag_embed(1 - pats)
        CR_tab = torch.cat([C_tab, R_tab], -1)  # (2^p, p, n + p)
    # The state is kept as X = [P; mᵀ] (N, n + 1, n), so that one product predicts P and m and
    # one product updates both.
    m = prep.init_mean.expand(batch + (n,)).reshape(N, n)
    P = prep.init_cov.expand(batch + (n, n)).reshape(N, n, n)
    X = torch.cat([P, m.unsqueeze(-2)], -2)
    preds, filts, ws, logd = [], [], [], []
    for t in range(T):
        if t > 0:
            AtT = (A[t] if tvA else A).transpose(-1, -2)
            # [P Aᵀ; mᵀ Aᵀ], then A P Aᵀ = (P Aᵀ)ᵀ Aᵀ for symmetric P.
            U = (X.reshape(N * (n + 1), n) @ AtT).reshape(N, n + 1, n)
            P = (U[:, :n].transpose(-1, -2).reshape(N * n, n) @ AtT).reshape(N, n, n)
            mT = U[:, n:]
            if bt is not None:
                mT = mT + bt[t].unsqueeze(-2)
            X = torch.cat([P + (Q[t] if tvQ else Q), mT], -2)
        preds.append(X)
        if CR_tab is not None:
            CR = CR_tab[code[t]]
            Cm, Rm = CR[..., :n], CR[..., n:]
        else:
            o = ot[t]
            Cm = (C[t] if tvC else C) * o.unsqueeze(-1)
            Rm = (R[t] if tvR else R) * (o.unsqueeze(-1) * o.unsqueeze(-2))
            Rm = Rm + torch.diag_embed(1 - o)
        # rhs = [C P | C m - x]; S = C P Cᵀ + R = L Lᵀ; [Z | -w] = L⁻¹ rhs. Then
        # P -= Zᵀ Z and m += Zᵀ w: X -= [Z | -w]ᵀ Z (one triangular solve, one product).
        rhs = torch.bmm(Cm, X.transpose(-1, -2))
        rhs[..., n] -= xt[t]
        Lt = cholesky(torch.baddbmm(Rm, rhs[..., :n], Cm.transpose(-1, -2)))
        Y = torch.linalg.solve_triangular(Lt, rhs, upper=False)
        X = torch.baddbmm(X, Y.transpose(-1, -2), Y[..., :n], alpha=-1)
        filts.append(X)
        ws.append(Y[..., n])
        logd.append(torch.diagonal(Lt, dim1=-2, dim2=-1))
    w, logd = torch.stack(ws), torch.stack(logd)
    num_missing = (1 - ot).sum(-1)
    ll = -0.5 * (w.pow(2).sum(-1) + (p - num_missing) * _LOG_2PI) - torch.log(logd).sum(-1)
    preds, filts = torch.stack(preds), torch.stack(filts)  # (T, N, n + 1, n)
    return (
        _batch_major(filts[..., n, :], batch),
        _batch_major(sym(filts[..., :n, :]), batch),
        _batch_major(preds[..., n, :], batch),
        _batch_major(sym(preds[..., :n, :]), batch),
        ll.transpose(0, 1).reshape(batch + (T,)),
    )
