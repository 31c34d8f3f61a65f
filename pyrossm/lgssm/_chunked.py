"""The Kalman filter with missing entries, parallel over chunks of time (private).

Sequences are ``(..., T, p)`` with time at dim -2 (NaN or ``mask`` = missing). Used by
:func:`pyrossm.lgssm.kalman_filter` when the parameters are time-invariant and have no batch
dims; the result equals the sequential filter to rounding.

Why it is exact. The filter is two recursions.

* The covariance recursion does not depend on the values of x, only on which entries are
  observed, and the Riccati map forgets its starting point at a geometric rate. The series is cut
  into chunks of ``L`` steps; every chunk (and every sequence) runs as one batch, starting ``W``
  steps early (the warm-up) from the prior covariance. A chunk is accepted when, at the step
  before it starts, its warm-up covariance equals the covariance the previous chunk computed for
  that same step to within a few ulps (relative to ``sqrt(P_ii P_jj)``); the remaining gap can
  only shrink. Otherwise the warm-up is made 4 times longer, and past ``_MAX_WARMUP`` the
  sequential filter is used (e.g. a unit root with Q = 0 never forgets). Long runs of unobserved
  steps (right padding) under a non-contracting transition are detected up front.
* Given the gains, the mean recursion is affine in the mean at the start of the chunk:
  m_t = p_t + Φ_t m_{s-1}. Every chunk carries its particular solution p_t (started from 0) and
  its transfer matrix Φ_t (started from I) through the same steps as its covariance; the chunks
  are then stitched one after the other (``T / L`` small products) and every step's mean and
  innovation follows in one vectorised product.

Each time step processes the entries of x_t one at a time (Durbin & Koopman 2012, §6.4):
x_t is first whitened by the Cholesky factor of R restricted to its observed entries (one
factor per pattern of missing entries, computed once), so each entry is a scalar update: no
matrix factorisation inside the loop, seven elementwise operations per entry.

The state is kept as rows ``X = [P; mᵀ; Φᵀ]`` with an extra constant coordinate (so that the
observation enters the same product as the state), stored column-major with the batch
``M = chunks × sequences`` last: ``(n + 1, 2n + 2, M)``. One product predicts every row and one
rank-one update per entry updates every row; every operation is a single vectorised kernel
(torch's batched products of tiny matrices loop over the batch instead).

Reference for the chunking: the same forgetting argument as the steady-state stop of
:mod:`pyrossm.lgssm._steps`; for the affine stitching, the prefix-sum view of linear
recurrences (Blelloch 1990; Särkkä & García-Fernández 2021 for the Kalman filter).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from pyrossm._gaussian import LOG_2PI as _LOG_2PI
from pyrossm._gaussian import broadcast_shapes, cholesky

from ._recurrence import tracks_grad
from ._workspace import scratch

# Warm-up steps tried first (then 4 times as many), and the most tried before the sequential
# filter takes over.
_FIRST_WARMUP = 32
_MAX_WARMUP = 128
# Accept a chunk when its warm-up covariance is this many ulps from the previous chunk's.
_MATCH_ULPS = 64
# Patterns of missing entries are tabulated (2^p of them) up to this observation dimension.
_MAX_TABLE_DIM = 10


# Opt-in: torch.compile fuses the ~30 small elementwise operations of a time step into a few
# loops, and runs _BLOCK steps per call (the call itself costs ~60 µs), at a one-off compile of
# 20-30 s per process and shape; so it pays for large or repeated problems only.
_BLOCK = 8
_state = {"compile": os.environ.get("PYROSSM_COMPILE", "") == "1", "compiled": None}


def set_compile(enabled: bool = True) -> bool:
    """Run the time steps of the missing-data Kalman filter (:func:`kalman_filter` and
    everything built on it: ``log_prob``, ``fit``, ...) through ``torch.compile``. Returns the
    previous setting. Also switched on by the environment variable ``PYROSSM_COMPILE=1``.

    Like dynamax's ``jit``, the first call of every shape compiles (about 25 s on a CPU, needs a
    C++ compiler; on failure a warning is given and the uncompiled steps are used from then on);
    later calls run blocks of time steps as fused loops: 1.5-2.5x faster than uncompiled on the
    cells of ``benchmarks/kalman.py`` (row "pyrossm sequential, compiled"). Results equal the
    uncompiled kernel's to rounding. Worth it for large batches, long series, or many calls
    with the same shapes; not for one small series.

    >>> import pyrossm
    >>> previous = pyrossm.lgssm.set_compile(False)
    """
    previous = _state["compile"]
    _state["compile"] = bool(enabled)
    return previous


def compile_enabled() -> bool:
    """Whether :func:`set_compile` is on."""
    return _state["compile"]


def _compiled_block():
    """The compiled :func:`_block_rows`, or None when compiling is off."""
    if not _state["compile"]:
        return None
    if _state["compiled"] is None:
        _state["compiled"] = _guarded(torch.compile(_block_rows), _block_rows)
    return _state["compiled"]


def _guarded(compiled, eager):
    """``compiled`` until it fails to compile (no C++ compiler, an unsupported backend):
    then a warning, and ``eager`` from then on."""
    ok = []

    def call(*args):
        if ok:
            return compiled(*args)
        try:
            out = compiled(*args)
        except Exception as err:  # noqa: BLE001 -- any compile failure falls back
            _state["compile"] = False
            warnings.warn(f"pyrossm.lgssm.set_compile: torch.compile failed ({type(err).__name__}:"
                          f" {str(err)[:200]}); using the uncompiled Kalman steps", stacklevel=3)
            return eager(*args)
        ok.append(True)
        return out

    return call


def applicable(prep):
    """Whether the chunked kernel applies and is expected to be faster than the sequential
    one: missing entries, time-invariant parameters without batch dims, ``p <= 10``."""
    if prep.obs is None or prep.raw is None:
        return False
    C, R, tvC, tvR = prep.raw
    if tvC or tvR or prep.tv["A"] or prep.tv["Q"]:
        return False
    if any(M.dim() != 2 for M in (prep.A, prep.Q, C, R)) or R.shape[-1] > _MAX_TABLE_DIM:
        return False
    T, n = prep.x.shape[-2], prep.A.shape[-1]
    N = math.prod(broadcast_shapes(prep.x.shape[:-2], prep.obs.shape[:-2],
                                   prep.init_mean.shape[:-1], prep.init_cov.shape[:-2]))
    if plan(T, N, n) is None:
        return False
    return not _never_forgets(prep.A, prep.obs)


def _never_forgets(A, obs):
    """Whether a warm-up cannot converge: a long run of steps with nothing observed (e.g. right
    padding) under a transition that does not contract (spectral radius ≥ 1), where the
    covariance only grows and keeps its start. Checked up front, so as not to pay for failing
    attempts."""
    with torch.no_grad():
        if float(torch.linalg.eigvals(A.detach()).abs().max()) < 1 - 1e-6:
            return False
        seen = obs.any(-1)  # (..., T)
        t = torch.arange(seen.shape[-1], device=seen.device)
        last = torch.where(seen, t, torch.full_like(t, -1)).cummax(-1).values
        return int((t - last).max()) >= _FIRST_WARMUP


def _whitening_tables(C, R, dt, dev):
    """For every pattern of observed entries (``2^p`` of them, bit i = entry i observed):
    ``W = L_o⁻¹`` with ``L_o`` the Cholesky factor of R restricted to the observed entries
    (identity elsewhere), and the whitened ``W C`` (rows of unobserved entries 0), as one
    table ``(p, n + p, 2^p)``; and ``log|L_o|`` ``(2^p,)``."""
    p = R.shape[-1]
    weights = 2 ** torch.arange(p, device=dev)
    pats = ((torch.arange(2**p, device=dev).unsqueeze(-1) // weights) % 2).to(dt)
    R_tab = R * (pats.unsqueeze(-1) * pats.unsqueeze(-2)) + torch.diag_embed(1 - pats)
    L_tab = cholesky(R_tab)
    eye = torch.eye(p, dtype=dt, device=dev)
    Winv_tab = torch.linalg.solve_triangular(L_tab, eye.expand_as(L_tab), upper=False)
    Cw_tab = Winv_tab @ (C * pats.unsqueeze(-1))
    logdet_tab = torch.log(torch.diagonal(L_tab, dim1=-2, dim2=-1)).sum(-1)
    # (p, n + p, 2^p): [W C | W] by pattern, batch last, for one index_select per step
    G = torch.cat([Cw_tab, Winv_tab], -1).permute(1, 2, 0).contiguous()
    return weights, G, logdet_tab


def _chunk_view(v, L, W, nc):
    """``(T, N, ...)`` -> ``(W + L, nc N, ...)``: local step j of chunk k is global step
    ``k L - W + j``; steps outside ``[0, T)`` are zeros (no observation)."""
    T = v.shape[0]
    if nc == 1 and W == 0 and L == T:
        return v
    pad = lambda k: torch.zeros((k,) + v.shape[1:], dtype=v.dtype, device=v.device)  # noqa: E731
    vp = torch.cat([pad(W), v, pad(nc * L - T)], 0)  # (W + nc L, N, ...)
    idx = torch.arange(W + L, device=v.device).unsqueeze(0) + L * torch.arange(
        nc, device=v.device
    ).unsqueeze(1)  # (nc, W + L)
    out = vp[idx.reshape(-1)].reshape((nc, W + L) + v.shape[1:])
    return out.transpose(0, 1).reshape((W + L, nc * v.shape[1]) + v.shape[2:])


def _batch_last(v):
    """``(S, M, ...)`` -> ``(S, ..., M)`` contiguous: elementwise kernels vectorise over the
    batch, which torch's batched products of tiny matrices do not (they loop over it)."""
    return v.permute((0,) + tuple(range(2, v.dim())) + (1,)).contiguous()


def _run(A, Q, G, code, x, bt, init_mean, init_cov, L, W, nc, N, moments=True):
    """The loop over the ``W + L`` local steps of all chunks at once; the batch ``M = nc N``
    (chunk-major) is the last dim of every tensor.

    The state has an extra constant coordinate (last column, 1 in the mean row), so that
    ``c̃ = [W C, -W x]`` turns ``X c̃`` into ``[P c; c·m - x; Φᵀ c]`` in one product: the
    update is ``X -= K ⊗ (X c̃)`` with ``K = P c / (c P cᵀ + 1)``. ``X`` is stored
    column-major ``(n + 1, 2n + 2, M)``: rows ``[P (n + 1 rows, last 0); mᵀ; Φᵀ]``.

    Returns, for local steps ``W ..`` (leading dim ``L``), the parts of every step that the
    filter uses (:func:`_kept`): filtered covariances ``(L, n, n, M)``, mean and transfer
    columns ``(L, n, R - n - 1, M)``, predicted covariances ``(L, n, n, M)``, innovation columns
    of ``X c̃`` ``(L, p, R - n - 1, M)`` and their variances ``S`` ``(L, p, M)``; and the
    filtered covariance ``(n, n, M)`` at local step ``W - 1`` (for the warm-up check).
    With ``moments=False`` the covariances and means are not kept: the first two entries are
    then only the last step's ``(1, ...)`` and the predicted covariances None.
    The loop body is :func:`_step_rows` (blocks of it compiled with :func:`set_compile`).
    """
    n = A.shape[-1]
    M = nc * N
    dt, dev = x.dtype, x.device
    cc = _chunk_view(code, L, W, nc)  # (W + L, M); outside [0, T): pattern 0, nothing observed
    xc = _batch_last(_chunk_view(x, L, W, nc))  # (W + L, p, M)
    bc = None if bt is None else _batch_last(_chunk_view(bt, L, W, nc))  # (W + L, n, M)
    # Rows of the batch-last arrays a multiple of 2 KB apart alias in the caches: every
    # operation is then up to 30% slower (M = 1024 float32: 491 ms vs 382 ms for M = 1000).
    # Such batches get a few idle columns (nothing observed, zero state), cut off below.
    pad = 64 // x.element_size() if (M * x.element_size()) % 2048 == 0 else 0
    if pad:
        cc = torch.cat([cc, cc.new_zeros(cc.shape[0], pad)], -1)
        xc = torch.cat([xc, xc.new_zeros(xc.shape[:-1] + (pad,))], -1)
        if bc is not None:
            bc = torch.cat([bc, bc.new_zeros(bc.shape[:-1] + (pad,))], -1)
    Mp = M + pad
    n1 = n + 1
    R = 2 * n1 if nc > 1 else n1 + 1  # one chunk: no transfer part
    Aa = torch.zeros(n1, n1, dtype=dt, device=dev)
    Aa[:n, :n] = A
    Aa[n, n] = 1
    Qa = torch.zeros(n1, n1, 1, dtype=dt, device=dev)
    Qa[:n, :n, 0] = Q
    if bc is not None:
        bc = torch.cat([bc, torch.zeros_like(bc[:, :1])], 1).unsqueeze(2)  # (W + L, n1, 1, M)
    X0 = torch.zeros(n1, R, Mp, dtype=dt, device=dev)
    X0[:n, :n, :M] = init_cov.permute(1, 2, 0).repeat(1, 1, nc)
    X0[:n, n1, :M] = init_mean.t().repeat(1, nc)
    X0[n, n1] = 1
    start = torch.zeros(n1, R - n1, Mp, dtype=dt, device=dev)  # rows [mᵀ; Φᵀ] = [0 .. 0 1; I 0]
    start[n, 0] = 1
    if nc > 1:
        start[:n, 1:] = torch.eye(n, dtype=dt, device=dev).unsqueeze(-1)
    # Chunks whose warm-up reaches back to t = 0 restart there from the prior, like the first
    # chunk: local step W - k L of chunk k is t = 0.
    at_origin = {}
    for k in range(nc):
        if 0 < W - k * L < W + L or (k == 0 and W > 0):
            flag = torch.zeros(Mp, dtype=torch.bool, device=dev)
            flag[k * N : (k + 1) * N] = True
            at_origin[W - k * L] = flag
    X = X0
    outs = []  # per run of steps: the outputs of _kept, each with a leading time dim
    # Without autograd the steps run in place in two alternating buffers (_InPlaceSteps) and
    # each step's outputs are copied at once into the results: no new arrays per step, where
    # fresh memory costs page faults (allocating and freeing some 3 MB per step at
    # 256 x 1000, glibc hands memory back and forth to the system).
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (A, Q, G, x, bt, init_mean, init_cov))
    inplace = None if grad else _InPlaceSteps(X0, G.shape[0])
    kept, pos = None, 0
    P_before = None
    block = _compiled_block()
    special = {0, W} | set(at_origin)  # restarts: one eager step each
    j = 0
    while j < W + L:
        k = 1
        if j in special:
            if j > 0:
                if j == W:  # chunks start: particular part from 0, transfer part from I
                    X = torch.cat([X[:, :n1], start], 1)
                X = _predict_rows(X, Aa, Qa, None if bc is None else bc[j])
                if j in at_origin:  # t = 0: the prior, not a predicted step
                    X = torch.where(at_origin[j], X0, X)
            P = X[:n, :n]
            X, r, S = _update_rows(X, G, cc[j], xc[j])
            out = _kept(X, r, S, P)
        elif block is not None and j + _BLOCK <= W + L and not any(
            i in special for i in range(j, j + _BLOCK)
        ):
            k = _BLOCK
            X, *out = block(X, Aa, Qa, None if bc is None else bc[j : j + k], G,
                            cc[j : j + k], xc[j : j + k])
        elif inplace is not None:
            X, r, S, P = inplace.step(X, Aa, Qa, None if bc is None else bc[j], G, cc[j], xc[j])
            out = _kept(X, r, S, P)
        else:
            X, r, S, P = _step_rows(X, Aa, Qa, None if bc is None else bc[j], G, cc[j], xc[j])
            out = _kept(X, r, S, P)
        if k == 1:
            out = tuple(u.unsqueeze(0) for u in out)
        j += k
        if j == W:  # X is the filtered state at local step W - 1 (a copy: X may be a buffer)
            P_before = X[:n, :n, :M].clone()
        if j > W:
            if not moments:  # only the innovations of every step are needed: the covariances
                out = (None, None, None) + tuple(out[3:])  # and means are not kept
            if pad:
                out = tuple(None if u is None else u[..., :M] for u in out)
            if grad:
                outs.append(out)
                continue
            if kept is None:  # reused buffers (_workspace): tens of MB at 256 x 1000
                kept = tuple(None if u is None else scratch(f"chunked.kept{i}", (L,) + u.shape[1:],
                                                            u.dtype, u.device)
                             for i, u in enumerate(out))
            for dest, u in zip(kept, out):
                if u is not None:
                    dest[pos : pos + k].copy_(u)
            pos += k
    if grad:
        kept = tuple(None if u[0] is None else torch.cat(u, 0) for u in zip(*outs))
    if not moments:  # the last filtered covariance (for the warm-up check) and mean columns
        kept = (X[:n, :n, :M].unsqueeze(0), X[:n, n1:, :M].unsqueeze(0)) + kept[2:]
    return kept + (P_before,)


def _kept(X, r, S, P):
    """What the filter keeps of a step (the rest of ``X`` and ``X c̃`` is not needed): filtered
    covariance ``(n, n, M)``, mean and transfer columns ``(n, R - n - 1, M)``, predicted
    covariance, innovation columns of ``X c̃`` ``(p, R - n - 1, M)`` and ``S`` ``(p, M)``."""
    n = X.shape[0] - 1
    return X[:n, :n], X[:n, n + 1 :], P, r[:, n + 1 :], S


def _predict_rows(X, Aa, Qa, b):
    """Every row of ``X`` (column-major ``(n + 1, R, M)``) times Ãᵀ, and ``P⁻ = Ã P Ãᵀ + Q``:
    one product predicts every row; ``P⁻ = Ã (Ã P)ᵀ`` transposes the P block once. ``b``
    ``(n + 1, 1, M)`` or None: the transition offset, added to the mean row."""
    n1, R, M = X.shape
    U = (Aa @ X.reshape(n1, R * M)).reshape(n1, R, M)
    P = (Aa @ U[:, :n1].transpose(0, 1).reshape(n1, n1 * M)).reshape(n1, n1, M) + Qa
    if b is None:
        return torch.cat([P, U[:, n1:]], 1)
    return torch.cat([P, U[:, n1 : n1 + 1] + b, U[:, n1 + 1 :]], 1)


def _update_rows(X, G, code, x):
    """The update by every entry of ``x`` ``(p, M)`` in turn, whitened by its pattern's row of
    ``G`` (``code`` ``(M,)``). With ``c̃ = [W C, -W x]``, ``X c̃ = [P c; c·m - x; Φᵀ c]``
    and ``X -= K ⊗ (X c̃)``, ``K = P c / (c P cᵀ + 1)``. Returns ``X``, the products
    ``X c̃`` ``(p, R, M)`` and their variances ``S`` ``(p, M)``."""
    n1 = X.shape[0]
    n, p = n1 - 1, G.shape[0]
    g = G.index_select(-1, code)  # (p, n + p, M): [W C | W] of each sequence's pattern
    xw = (g[:, n:] * x.unsqueeze(0)).sum(1, keepdim=True)  # (p, 1, M)
    c = torch.cat([g[:, :n], -xw], 1).unsqueeze(2)  # (p, n + 1, 1, M): [c, -x]
    rs, Ss = [], []
    for i in range(p):
        ci = c[i]
        r = (X * ci).sum(0)  # (R, M)
        S = (r[:n] * ci[:n, 0]).sum(0) + 1
        X = torch.addcmul(X, (r[:n1] / S).unsqueeze(1), r.unsqueeze(0), value=-1)
        rs.append(r)
        Ss.append(S)
    return X, torch.stack(rs, 0), torch.stack(Ss, 0)


class _InPlaceSteps:
    """:func:`_step_rows` without autograd, in place: the state alternates between two
    buffers and every intermediate has a buffer of its own, so a step allocates only the small
    per-entry rows. The returned tensors are views of the buffers, valid until the step after
    next (the caller copies what it keeps at once)."""

    def __init__(self, X0, p):
        n1, R, M = X0.shape
        names = iter(range(100))
        new = lambda *shape: scratch(f"chunked.step{next(names)}", shape, X0.dtype, X0.device)  # noqa: E731
        self.X = (new(n1, R, M), new(n1, R, M))
        self.U, self.P, self.T = new(n1, R, M), new(n1, n1, M), new(n1, n1, M)
        self.tmp, self.rs, self.Ss = new(n1, R, M), new(p, R, M), new(p, M)
        self.u, self.t = new(n1, M), new(n1 - 1, M)

    def step(self, X, Aa, Qa, b, G, code, x):
        n1, R, M = X.shape
        n = n1 - 1
        Xn = self.X[1] if X is self.X[0] else self.X[0]
        # predict: every row times Ãᵀ, P⁻ = Ã (Ã P)ᵀ + Q (as _predict_rows)
        torch.mm(Aa, X.view(n1, R * M), out=self.U.view(n1, R * M))
        self.T.copy_(self.U[:, :n1].transpose(0, 1))
        torch.mm(Aa, self.T.view(n1, n1 * M), out=self.P.view(n1, n1 * M))
        self.P.add_(Qa)
        Xn[:, :n1].copy_(self.P)
        Xn[:, n1:].copy_(self.U[:, n1:])
        if b is not None:
            Xn[:, n1 : n1 + 1].add_(b)
        # update by each entry in turn (as _update_rows)
        g = G.index_select(-1, code)
        xw = (g[:, n:] * x.unsqueeze(0)).sum(1, keepdim=True)
        c = torch.cat([g[:, :n], -xw], 1).unsqueeze(2)
        for i in range(G.shape[0]):
            ci, r, S = c[i], self.rs[i], self.Ss[i]
            torch.sum(torch.mul(Xn, ci, out=self.tmp), 0, out=r)
            torch.sum(torch.mul(r[:n], ci[:n, 0], out=self.t), 0, out=S).add_(1)
            Xn.addcmul_(torch.div(r[:n1], S, out=self.u).unsqueeze(1), r.unsqueeze(0), value=-1)
        return Xn, self.rs, self.Ss, self.P[:n, :n]


def _step_rows(X, Aa, Qa, b, G, code, x):
    """One predict and update (the loop body of :func:`_run`); also returns the predicted
    covariance ``(n, n, M)``."""
    X = _predict_rows(X, Aa, Qa, b)
    n = X.shape[0] - 1
    return _update_rows(X, G, code, x) + (X[:n, :n],)


def _block_rows(X, Aa, Qa, bs, G, codes, xs):
    """``codes.shape[0]`` steps of :func:`_step_rows` (the unit compiled by
    :func:`set_compile`). Returns the last ``X`` and every step's :func:`_kept`, stacked."""
    outs = []
    for k in range(codes.shape[0]):
        X, r, S, P = _step_rows(X, Aa, Qa, None if bs is None else bs[k], G, codes[k], xs[k])
        outs.append(_kept(X, r, S, P))
    return (X,) + tuple(torch.stack(u, 0) for u in zip(*outs))


def _warmup_matches(P_before, P_last, nc, N, eps):
    """Whether every chunk's warm-up covariance (step before it starts) matches the previous
    chunk's last filtered covariance ``P_last`` to ``_MATCH_ULPS`` ulps of ``sqrt(P_ii P_jj)``,
    with a floor of the largest variance's ulp (a component decaying to 0 with no noise, e.g. a
    singular Q, keeps its start in relative terms but no longer matters)."""
    if nc == 1:
        return True
    n = P_before.shape[0]
    with torch.no_grad():
        mine = P_before.reshape(n, n, nc, N)[..., 1:, :]
        theirs = P_last.reshape(n, n, nc, N)[..., :-1, :]
        d = torch.diagonal(theirs, dim1=0, dim2=1).abs().clamp_min(torch.finfo(mine.dtype).tiny)
        d = d.movedim(-1, 0)  # (n, nc - 1, N)
        d = torch.maximum(d, eps * d.amax(0, keepdim=True))
        scale = (d.unsqueeze(1) * d.unsqueeze(0)).sqrt()
        gap = float(((mine - theirs).abs() / scale).max())
    return math.isfinite(gap) and gap <= _MATCH_ULPS * eps


# Cost model of one step (µs, one thread, n = p = 4): a fixed part for the ~30 small ops and a
# part per unit of state (batch element × row of X); the sequential kernel of :mod:`._steps`
# (one Cholesky per sequence per step) for comparison. Fitted (session 14, AMD EPYC with
# AVX-512) to the whole filter's time over a grid of B × T = 4 × 4000 … 256 × 1000 and 1 to
# 124 chunks (``benchmarks/kalman.py`` problems, 10% missing); on the earlier CPU the fit was
# 320 + 0.15 per unit and 140 + 1.7 per sequence, which chose fewer chunks (one at B = 256:
# 181 ms there, against 127 ms with 8 chunks). Only the ratios matter. Compiled
# (set_compile): blocks of fused steps, timed at 64 × 202 … 16 × 10,000 on the earlier CPU,
# and compared with that CPU's sequential kernel (the pairs are fitted together).
_STEP_FIXED, _STEP_PER_UNIT = 160.0, 0.022
_SEQ_FIXED, _SEQ_PER_SEQUENCE = 50.0, 0.8
_COMPILED_FIXED, _COMPILED_PER_UNIT = 100.0, 0.06
_COMPILED_SEQ_FIXED, _COMPILED_SEQ_PER_SEQUENCE = 140.0, 1.7


def _cost(T, N, n, nc, W):
    fixed, unit = ((_COMPILED_FIXED, _COMPILED_PER_UNIT) if _state["compile"]
                   else (_STEP_FIXED, _STEP_PER_UNIT))
    if nc == 1:
        return T * (fixed + unit * N * (n + 2))
    # chunks: the transfer rows, the warm-up, and a measured 1.3x for the larger working set
    return 1.3 * (W + math.ceil(T / nc)) * (fixed + unit * N * nc * (2 * n + 2))


def plan(T, N, n, W=_FIRST_WARMUP):
    """The number of chunks that minimises the modelled cost, or None when the sequential
    kernel is expected to be faster."""
    candidates = [1] + [k for k in range(2, T // (3 * W) + 1)]
    best = min(candidates, key=lambda k: _cost(T, N, n, k, W))
    seq_fixed, seq_unit = ((_COMPILED_SEQ_FIXED, _COMPILED_SEQ_PER_SEQUENCE) if _state["compile"]
                           else (_SEQ_FIXED, _SEQ_PER_SEQUENCE))
    if _cost(T, N, n, best, W) >= T * (seq_fixed + seq_unit * N):
        return None
    return best


def chunked_missing_filter(prep, chunk_length=None, warmup=None, moments=True):
    """The filter with missing entries (see the module docstring). Returns
    ``(filt_means, filt_covs, pred_means, pred_covs, step_log_likelihoods)`` (with
    ``moments=False`` the first four None), or None when the warm-up does not converge within
    ``_MAX_WARMUP`` steps."""
    C, R = prep.raw[0], prep.raw[1]
    A, Q = prep.A, prep.Q
    T, p = prep.x.shape[-2:]
    n = A.shape[-1]
    batch = broadcast_shapes(
        prep.x.shape[:-2], prep.obs.shape[:-2], prep.init_mean.shape[:-1],
        prep.init_cov.shape[:-2], () if prep.b is None else prep.b.shape[:-2],
    )
    N = math.prod(batch)
    tm = lambda v: v.expand(batch + v.shape[-2:]).reshape(N, T, v.shape[-1]).transpose(0, 1)  # noqa: E731
    dt, dev = prep.x.dtype, prep.x.device
    weights, G, logdet_tab = _whitening_tables(C, R, dt, dev)
    obs = tm(prep.obs)
    code = (obs.long() * weights).sum(-1)  # (T, N)
    x = tm(prep.x)
    bt = None if prep.b is None else tm(prep.b)
    init_mean = prep.init_mean.expand(batch + (n,)).reshape(N, n)
    init_cov = prep.init_cov.expand(batch + (n, n)).reshape(N, n, n)
    eps = torch.finfo(dt).eps
    W = warmup or _FIRST_WARMUP
    nc_plan = plan(T, N, n, W) or 1
    while True:
        L = chunk_length or math.ceil(T / nc_plan)
        nc = math.ceil(T / L)
        if nc == 1:
            W = 0
        filt_P, mc, pred_P, v, S, P_before = _run(A, Q, G, code, x, bt, init_mean, init_cov,
                                                  L, W, nc, N, moments)
        if _warmup_matches(P_before, filt_P[-1], nc, N, eps):
            break
        if warmup is not None or 4 * W > _MAX_WARMUP:
            return None
        W *= 4
    # Stitch: the filtered mean m_s before each chunk starts, chunk by chunk (batch last).
    # Columns of mc and v: 0 the particular solution p_t, 1.. the transfer matrix Φ_t.
    last = mc[-1].reshape(n, mc.shape[2], nc, N)
    starts = [torch.zeros(n, N, dtype=dt, device=dev)]
    for k in range(1, nc):
        phi_t = last[:, 1:, k - 1]  # [b, k']: Φ[b, k']
        starts.append(last[:, 0, k - 1] + (phi_t * starts[-1].unsqueeze(0)).sum(1))
    ms = torch.stack(starts, 1).reshape(n, nc * N)  # (n, M), chunk-major like the batch
    # m_t = p_t + Φ_t m_s; innovations c·m - x likewise (elementwise, batch last).
    neg_v = _stitch(v, ms)
    ll = -0.5 * (neg_v.pow(2) / S + torch.log(S)).sum(1)  # (L, M)
    num_obs = obs.to(dt).sum(-1)  # (T, N)
    ll = _time_major(ll, nc, N, T) - 0.5 * _LOG_2PI * num_obs - logdet_tab[code]
    out = lambda u: u.movedim(-1, 0).reshape(batch + u.shape[:-1])  # noqa: E731
    if not moments:
        return None, None, None, None, out(ll)
    filt_m = _time_major(_stitch(mc, ms), nc, N, T)  # (T, n, N)
    pred_m = _predict_means(A, bt, filt_m, init_mean)
    return (
        out(filt_m),
        out(_sym_time_major(filt_P, nc, N, T)),
        out(pred_m),
        out(_sym_time_major(pred_P, nc, N, T)),
        out(ll),
    )


def _stitch(u, ms):
    """``u[:, :, 0] + Σ_k u[:, :, 1 + k] ms[k]`` for ``u (L, d, 1 + n, M)`` (particular part
    and transfer columns) and the chunks' start means ``ms (n, M)``: ``(L, d, M)``, one
    column at a time (without autograd in place: no ``(L, d, n, M)`` product array)."""
    if tracks_grad(u, ms):  # (then u is not a reused buffer)
        if u.shape[2] == 1:
            return u[:, :, 0]
        return u[:, :, 0] + (u[:, :, 1:] * ms.unsqueeze(0).unsqueeze(0)).sum(2)
    out = u[:, :, 0].clone()  # (u may be a reused buffer: the result is a new array)
    for k in range(u.shape[2] - 1):
        out.addcmul_(u[:, :, 1 + k], ms[k])
    return out


def _time_major(u, nc, N, T):
    """``(L, ..., nc N)`` (chunk-major batch) -> ``(T, ..., N)``."""
    L = u.shape[0]
    u = u.reshape((L,) + u.shape[1:-1] + (nc, N)).movedim(-2, 0)  # (nc, L, ..., N)
    return u.reshape((nc * L,) + u.shape[2:])[:T]


def _predict_means(A, bt, filt_m, init_mean):
    """Predicted means of every step from the filtered ones of the step before, batch last:
    m⁻_t = A m_{t-1} + b_t (m⁻_0 the prior mean). (The predicted covariances come from the
    loop.)"""
    T, n, N = filt_m.shape
    m = (A @ filt_m[:-1].transpose(0, 1).reshape(n, -1)).reshape(n, T - 1, N).transpose(0, 1)
    if bt is not None:
        m = m + bt[1:].transpose(-1, -2)
    return torch.cat([init_mean.t().unsqueeze(0), m], 0)


def _sym_time_major(P, nc, N, T):
    """The kept covariances ``(L, n, n, nc N)`` (chunk-major batch) symmetrised, ``(T, n, n,
    N)``: without autograd in one pass from the kept layout into the output (these are the
    largest outputs; a time-major copy first would be another array as large)."""
    if tracks_grad(P):
        P = _time_major(P, nc, N, T)
        return torch.add(P, P.transpose(1, 2)).mul_(0.5)
    L, n = P.shape[0], P.shape[1]
    src = P.view(L, n, n, nc, N).permute(3, 0, 1, 2, 4)  # (nc, L, n, n, N), N contiguous
    full = P.new_empty(nc * L, n, n, N)
    torch.add(src, src.transpose(2, 3), out=full.view(nc, L, n, n, N))
    return full[:T].mul_(0.5)
