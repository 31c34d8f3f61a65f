"""Exact inference for linear-Gaussian state-space models: pure torch functions.

Generative model (column vectors, the seed's notation)::

    z_1 ~ N(init_mean, init_cov)
    z_t = A_t z_{t-1} + b_t + B ε_t,   ε_t ~ N(0, I),   Q = B Bᵀ
    x_t = C_t z_t   + d_t + D ψ_t,     ψ_t ~ N(0, I),   R = D Dᵀ

The offsets ``b_t`` (``transition_offset``, ``(..., T, n)``; ``b_0`` is unused) and ``d_t``
(``observation_offset``, ``(..., T, p)``) are optional (zero by default); exogenous regressors
or control inputs ``u_t`` enter as ``b_t = G u_t`` and ``d_t = H u_t``.

Shapes: ``x`` is ``(..., T, obs_dim)`` — time at dim -2, any leading batch dims. Parameters
``A (..., n, n)``, ``C (..., p, n)``, ``Q (..., n, n)``, ``R (..., p, p)``,
``init_mean (..., n)``, ``init_cov (..., n, n)`` broadcast against the batch dims of ``x``.
A parameter is *time-varying* when it carries a time dim at -3 after all of x's batch dims
written out (size 1 to broadcast): ``param.dim() == x.dim() + 1``; ``A_t`` (index ``t``) is the
transition into step ``t`` (``A_0`` is unused).

Missing data: ``NaN`` entries of ``x`` are not observed (partially observed vectors are
supported), and so are the steps where ``mask`` (``(..., T)`` bool, True = observed) is False.
A missing step gets no update and contributes nothing to the log-likelihood.

Two algorithms give the same numbers: the sequential Kalman filter / Rauch–Tung–Striebel
smoother, and the parallel-in-time associative scans of Särkkä & García-Fernández (2021),
with O(log T) depth (``parallel=True``). Without missing data the sequential filter runs the
(data-independent) covariance recursion once for the whole batch; with time-invariant
parameters it stops at the Riccati fixed point only when that is reached to rounding (a
contraction test, not a tolerance on consecutive steps), and covariances of long series that do
not converge quickly come from the associative scan (see :mod:`pyrossm.lgssm._steps`).
When only log p(x) is wanted (a likelihood for MLE, a Pyro factor), :func:`kalman_log_likelihood`
returns the same numbers without the moments: past the fixed point it never writes the means.
When nothing is differentiated, the work that depends on the parameters only (covariances,
gains, block operators: hundreds of small operations) runs under ``torch.inference_mode()``
(all of :func:`kalman_log_likelihood`'s work); every returned tensor is a normal one.
With missing entries and time-invariant parameters, long series are cut into chunks filtered
as one batch, each started early from the prior and accepted only when its covariance has
met the previous chunk's to a few ulps (the Riccati map forgets its start); the means are
stitched exactly (they are affine in the mean at the chunk's start). Entries are processed one
at a time after whitening by R (Durbin & Koopman 2012, §6.4); see :mod:`pyrossm.lgssm._chunked`.
For large or repeated problems, :func:`pyrossm.lgssm.set_compile` runs those time steps through
``torch.compile`` (a one-off compile of about 25 s per shape; then 1.5-2.5x faster).
Singular predicted covariances (e.g. Q and init_cov singular) are handled by the smoother with
a pseudo-inverse gain. The smoother's backward pass is an associative scan plus block
recurrences when the covariances are shared by the sequences (no missing data) and chunks of
time run as one batch for few long sequences with gaps (see :mod:`pyrossm.lgssm._smoother`).

References: Särkkä, *Bayesian Filtering and Smoothing* (2013), ch. 4 and 8; Särkkä &
García-Fernández, "Temporal parallelization of Bayesian smoothers", IEEE TAC 66(1), 2021.

Example::

    >>> import torch
    >>> A = torch.tensor([[0.9]]); C = torch.tensor([[1.0]])
    >>> Q = R = P0 = torch.eye(1); m0 = torch.zeros(1)
    >>> x = torch.randn(3, 50, 1)                      # (batch, time, obs_dim)
    >>> res = kalman_filter(x, A, C, Q, R, m0, P0)
    >>> res.log_likelihood.shape, res.filtered_means.shape
    (torch.Size([3]), torch.Size([3, 50, 1]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyrossm._gaussian import LOG_2PI as _LOG_2PI
from pyrossm._gaussian import broadcast_shapes, cholesky, gaussian_log_density, mv, sym

from . import _chunked, _smoother, _steps
from ._parallel import parallel_filter as _parallel_filter
from ._scan import associative_scan
from ._steps import (
    _param_batch,
    at,
    innovation_terms,
    missing_filter,
    shared_covariances,
    shared_filter,
    update_cov,
)
from ._validate import all_finite, validate_inputs, validate_offsets

__all__ = ["FilterResult", "SmootherResult", "kalman_filter", "kalman_log_likelihood",
           "kalman_smoother"]


class FilterResult(NamedTuple):
    """Output of :func:`kalman_filter` (shapes for ``x`` of shape ``(..., T, p)``, state dim ``n``).

    log_likelihood: ``(...)`` — log p(x_{1:T}) of each sequence.
    step_log_likelihoods: ``(..., T)`` — log p(x_t | x_{<t}); 0 where unobserved (None with
    ``kalman_filter(..., per_step=False)``).
    filtered_means, filtered_covs: ``(..., T, n)``, ``(..., T, n, n)`` — moments of z_t | x_{1:t}.
    predicted_means, predicted_covs: moments of z_t | x_{1:t-1} (``init_mean``/``init_cov`` at t=0;
    None with ``kalman_filter(..., predicted=False)``).
    """

    log_likelihood: torch.Tensor
    step_log_likelihoods: torch.Tensor
    filtered_means: torch.Tensor
    filtered_covs: torch.Tensor
    predicted_means: torch.Tensor
    predicted_covs: torch.Tensor


class SmootherResult(NamedTuple):
    """Output of :func:`kalman_smoother`.

    smoothed_means ``(..., T, n)``, smoothed_covs ``(..., T, n, n)``: moments of z_t | x_{1:T};
    smoothed_cross_covs ``(..., T-1, n, n)``: ``[t] = Cov(z_{t+1}, z_t | x_{1:T})`` (for EM).
    """

    log_likelihood: torch.Tensor
    smoothed_means: torch.Tensor
    smoothed_covs: torch.Tensor
    smoothed_cross_covs: torch.Tensor
    filtered_means: torch.Tensor
    filtered_covs: torch.Tensor
    step_log_likelihoods: torch.Tensor


_sym, _mv, _cholesky, _at = sym, mv, cholesky, at
_innovation_terms, _update_cov, _gaussian_log_density = (
    innovation_terms,
    update_cov,
    gaussian_log_density,
)


class _Prepared(NamedTuple):
    x: torch.Tensor  # NaNs replaced by 0
    obs: torch.Tensor | None  # (..., T, p) bool, None when everything is observed
    A: torch.Tensor
    C: torch.Tensor  # (..., [T,] p, n), rows of unobserved entries zeroed when obs is given
    Q: torch.Tensor
    R: torch.Tensor
    init_mean: torch.Tensor
    init_cov: torch.Tensor
    tv: dict
    num_missing: torch.Tensor | None  # (..., T) number of unobserved entries
    b: torch.Tensor | None = None  # transition offsets (..., T, n) with b_0 = 0, or None
    raw: tuple | None = None  # (C, R, tv_C, tv_R) before masking, when obs is given
    masked: bool = True  # C, R masked per step (see _mask_params); False: still raw


def _full_time(param, T):
    """A time-varying parameter given with a time dim of length 1, broadcast to length T."""
    return param.expand(param.shape[:-3] + (T,) + param.shape[-2:])


def _prepare(x, A, C, Q, R, init_mean, init_cov, mask, validate, b=None, d=None, masked=True):
    finite = None
    if validate:
        finite = validate_inputs(x, A, C, Q, R, init_mean, init_cov, mask)
        validate_offsets(x, init_mean, b, d)
    if d is not None:
        x = x - d  # NaN entries stay NaN
        finite = None
    if b is not None:
        # b_0 is never used (z_1 ~ N(init_mean, init_cov)); zero it so that sums over t can
        # include it.
        b = b.expand(b.shape[:-2] + (x.shape[-2], b.shape[-1]))
        b = torch.cat([torch.zeros_like(b[..., :1, :]), b[..., 1:, :]], -2)
    tv = {name: p.dim() == x.dim() + 1 for name, p in zip("ACQR", (A, C, Q, R))}
    A, C, Q, R = (_full_time(p, x.shape[-2]) if tv[k] else p for k, p in zip("ACQR", (A, C, Q, R)))
    if (mask is None or bool(mask.all())) and (all_finite(x) if finite is None else finite):
        return _Prepared(x, None, A, C, Q, R, init_mean, init_cov, tv, None, b)
    obs = ~torch.isnan(x)
    if mask is not None:
        obs = obs & mask.unsqueeze(-1)
    if bool(obs.all()):
        return _Prepared(x, None, A, C, Q, R, init_mean, init_cov, tv, None, b)
    x = torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device))
    num_missing = (~obs).sum(-1).to(x.dtype)
    raw = (C, R, tv["C"], tv["R"])
    prep = _Prepared(x, obs, A, C, Q, R, init_mean, init_cov, tv, num_missing, b, raw, False)
    return _mask_params(prep) if masked else prep


def _mask_params(prep):
    """The prepared problem with C and R masked per step (for the kernels that need them; the
    fast missing-data kernels read ``prep.raw`` instead and skip this (T, p, n) expansion)."""
    if prep.obs is None or prep.masked:
        return prep
    x, obs = prep.x, prep.obs
    C, R, tvC, tvR = prep.raw
    # An unobserved entry is turned into a harmless pseudo-observation: its row of C is zeroed,
    # its row/column of R replaced by the identity and its innovation is 0, so the update
    # ignores it; its N(0; 0, 1) factor is removed from the log-likelihood afterwards.
    o = obs.to(x.dtype)
    C_tv = C if tvC else C.unsqueeze(-3)
    R_tv = R if tvR else R.unsqueeze(-3)
    C = C_tv * o.unsqueeze(-1)
    eye = torch.eye(R.shape[-1], dtype=x.dtype, device=x.device)
    R = R_tv * (o.unsqueeze(-1) * o.unsqueeze(-2)) + eye * (1 - o).unsqueeze(-1)
    return prep._replace(C=C, R=R, tv=dict(prep.tv, C=True, R=True), masked=True)


def _step_log_likelihoods(prep, pred_means, pred_covs):
    """log p(x_t | x_<t) for all t in one vectorized call, from the predicted moments."""
    C = prep.C if prep.tv["C"] else prep.C.unsqueeze(-3)
    R = prep.R if prep.tv["R"] else prep.R.unsqueeze(-3)
    S = _sym(C @ pred_covs @ C.transpose(-1, -2) + R)
    L = _cholesky(S)
    v = prep.x - _mv(C, pred_means)
    ll = _gaussian_log_density(v, L)
    if prep.num_missing is not None:
        ll = ll + 0.5 * _LOG_2PI * prep.num_missing
    return ll


# ----------------------------------------------------------------------------------------------
# sequential filter


def _no_batch(param, tv):
    return param.dim() == (3 if tv else 2)


def _sequential_filter(prep, allow_steady=None, moments=True, per_step=True, predicted=True):
    """Dispatch to the fast kernels of :mod:`._steps`; the general case (parameters with batch
    dims) is handled here. Returns the moments and the step log-likelihoods (or None).
    ``moments=False``: the moments may be None (where a kernel can skip them); with
    ``per_step=False`` the log-likelihoods may be their sums over the steps, ``(..., 1)``;
    with ``predicted=False`` the predicted moments may be None."""
    if prep.obs is None and _param_batch(prep) == ():
        return shared_filter(prep, allow_steady, moments, per_step, predicted)
    if prep.obs is not None:
        C, R, tvC, tvR = prep.raw
        if all(
            _no_batch(M, tv)
            for M, tv in ((prep.A, prep.tv["A"]), (prep.Q, prep.tv["Q"]), (C, tvC), (R, tvR))
        ):
            if _chunked.applicable(prep):
                out = _chunked.chunked_missing_filter(prep, moments=moments)
                if out is not None:  # None: the warm-up did not converge
                    return out
            return missing_filter(prep)
    prep = _mask_params(prep)
    if allow_steady is None:
        allow_steady = _steps.STEADY_STATE
    x = prep.x
    T = x.shape[-2]
    n = prep.init_mean.shape[-1]
    # The covariance recursion does not depend on the data: it runs over the parameters' batch
    # shape only (once for the whole batch when the parameters are shared and nothing is missing).
    pred_covs, filt_covs, gains, _, Td = shared_covariances(
        prep, T, _param_batch(prep), allow_steady
    )
    t_steady = Td if Td < T else None
    if t_steady is not None:
        ext = (
            lambda M: torch.cat(  # noqa: E731
                [M, M[..., -1:, :, :].expand(M.shape[:-3] + (T - Td,) + M.shape[-2:])], -3
            )
        )
        pred_covs, filt_covs, gains = ext(pred_covs), ext(filt_covs), ext(gains)
    # Mean recursion m_t = F_t m_{t-1} + K_t x_t with F_t = (I - K_t C_t) A_t: the gains are
    # known, so each step is one batched matrix product; K_t x_t is computed for all t at once.
    C_all = prep.C if prep.tv["C"] else prep.C.unsqueeze(-3)
    A_all = prep.A if prep.tv["A"] else prep.A.unsqueeze(-3)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    F = (eye - gains @ C_all) @ A_all  # (..., T or 1, n, n)
    if prep.b is None:
        u = _mv(gains, x)  # (..., T, n)
    else:
        # m_t = F_t m_{t-1} + K_t x_t + (I - K_t C_t) b_t
        u = _mv(gains, x - _mv(C_all, prep.b)) + prep.b
    m0 = prep.init_mean
    first = m0 + _mv(gains[..., 0, :, :], x[..., 0, :] - _mv(C_all[..., 0, :, :], m0))
    filt_means = [first]
    m = first
    Ft = F.transpose(-1, -2)
    for t in range(1, T):
        Ft_t = Ft[..., t if Ft.shape[-3] > 1 else 0, :, :]
        m = (m.unsqueeze(-2) @ Ft_t).squeeze(-2) + u[..., t, :]
        filt_means.append(m)
    filt_means = torch.stack(filt_means, -2)
    pred_rest = _mv(A_all[..., 1:, :, :] if prep.tv["A"] else A_all, filt_means[..., :-1, :])
    if prep.b is not None:
        pred_rest = pred_rest + prep.b[..., 1:, :]
    m0 = m0.expand(pred_rest.shape[:-2] + m0.shape[-1:])
    pred_means = torch.cat([m0.unsqueeze(-2), pred_rest], -2)
    return filt_means, filt_covs, pred_means, pred_covs, _step_log_likelihoods(
        prep, pred_means, pred_covs
    )


# ----------------------------------------------------------------------------------------------
# public API


def kalman_filter(
    x,
    A,
    C,
    Q,
    R,
    init_mean,
    init_cov,
    mask=None,
    parallel=False,
    validate=True,
    *,
    transition_offset=None,
    observation_offset=None,
    predicted=True,
    per_step=True,
):
    """Kalman filter: log-likelihood, filtered and one-step predicted moments.

    Model and shapes as in the module docstring: ``x (..., T, p)`` with time at dim -2;
    ``mask (..., T)`` True = observed; NaN entries of ``x`` are unobserved. ``parallel=True``
    uses the O(log T)-depth associative scan (same numbers). ``validate=False`` skips the input
    checks (shapes, finiteness, positive semi-definite covariances) on hot paths.
    ``transition_offset`` ``b (..., T, n)`` and ``observation_offset`` ``d (..., T, p)``
    (keyword-only, time at dim -2, a time dim of 1 broadcasts) add ``b_t`` to the transition
    mean and ``d_t`` to the observation mean; ``b_0`` is unused.

    ``predicted=False`` and ``per_step=False`` (keyword-only) leave ``predicted_means`` /
    ``predicted_covs`` and ``step_log_likelihoods`` None, like statsmodels'
    ``conserve_memory`` flags ``MEMORY_NO_PREDICTED`` / ``MEMORY_NO_LIKELIHOOD``: without
    missing data and without parameter batch dims they are then never computed (256 x 1000
    steps, float32: 5 MB less output, 10-20% less time); elsewhere they are computed and
    dropped.
    Both False return what dynamax's ``lgssm_filter`` returns: the log-likelihood and the
    filtered moments.

    Returns a :class:`FilterResult`.

    >>> import torch
    >>> x = torch.randn(2, 20, 1)
    >>> I = torch.eye(1)
    >>> kalman_filter(x, I, I, I, I, torch.zeros(1), I).step_log_likelihoods.shape
    torch.Size([2, 20])
    >>> kalman_filter(x, I, I, I, I, torch.zeros(1), I, predicted=False).predicted_means is None
    True
    """
    for name, flag in (("predicted", predicted), ("per_step", per_step)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    return _expand(
        _filter(
            x,
            A,
            C,
            Q,
            R,
            init_mean,
            init_cov,
            mask,
            parallel,
            validate,
            transition_offset,
            observation_offset,
            per_step=per_step,
            predicted=predicted,
        )
    )


def kalman_log_likelihood(
    x,
    A,
    C,
    Q,
    R,
    init_mean,
    init_cov,
    mask=None,
    validate=True,
    *,
    transition_offset=None,
    observation_offset=None,
    per_step=False,
):
    """The exact log-likelihood log p(x_{1:T}) of each sequence, ``(...)`` (``per_step=True``:
    log p(x_t | x_{<t}), ``(..., T)``, 0 where unobserved), without the filtered moments.

    Arguments as :func:`kalman_filter` (``x (..., T, p)``, time at dim -2; NaN or ``mask`` =
    unobserved), and the same numbers as its ``log_likelihood``; differentiable. What it saves:
    without missing data, past the Riccati fixed point the means are never written, only the
    innovations (about half the memory traffic; the analogue of dynamax's ``lgssm_filter``
    when only ``marginal_loglik`` is used under ``jit``). With missing entries it costs the
    same as :func:`kalman_filter`.

    >>> import torch
    >>> x = torch.randn(2, 50, 1)
    >>> I = torch.eye(1)
    >>> ll = kalman_log_likelihood(x, I, I, I, I, torch.zeros(1), I)
    >>> torch.allclose(ll, kalman_filter(x, I, I, I, I, torch.zeros(1), I).log_likelihood)
    True
    """
    if not isinstance(per_step, bool):
        raise TypeError(f"per_step: expected a bool, got {type(per_step).__name__}")
    args = (x, A, C, Q, R, init_mean, init_cov, mask, False, validate, transition_offset,
            observation_offset)
    if not _inference_pays(args):
        return _filter(*args, moments=False, per_step=per_step)
    # Nothing to differentiate: the kernels run under inference mode (no autograd
    # bookkeeping on their ~1,000 small operations: 9-10% of the call at 256 x 1000), and the
    # small result is cloned outside it into a normal tensor.
    with torch.inference_mode():
        out = _filter(*args, moments=False, per_step=per_step)
    return out.clone()


def _inference_pays(args):
    """Whether a call can run under ``torch.inference_mode()``: no tensor argument needs a
    gradient, inference mode is not already on, and the compiled kernel is off (its graphs
    would be compiled again for the other mode)."""
    if torch.is_inference_mode_enabled() or _chunked.compile_enabled():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _filter(x, A, C, Q, R, init_mean, init_cov, mask, parallel, validate, b=None, d=None,
            moments=True, per_step=True, predicted=True):
    """The filter without broadcasting its outputs: covariances keep the parameters' batch.
    ``moments=False``: the step log-likelihoods only (a tensor, not a FilterResult), or with
    ``per_step=False`` their sums over the steps (``(...)``). With moments, ``per_step=False``
    and ``predicted=False`` leave those fields of the FilterResult None (not computed where
    the kernel can skip them)."""
    prep = _prepare(x, A, C, Q, R, init_mean, init_cov, mask, validate, b, d, masked=False)
    if prep.x.shape[-2] == 0:
        raise ValueError("x: expected at least one time step (shape (..., T, obs_dim), T >= 1)")
    if parallel:
        prep = _mask_params(prep)
        filt_means, filt_covs, pred_means, pred_covs = _parallel_filter(prep)
        step_ll = None
    else:
        filt_means, filt_covs, pred_means, pred_covs, step_ll = _sequential_filter(
            prep, moments=moments, per_step=per_step, predicted=predicted)
    if step_ll is None:
        step_ll = _step_log_likelihoods(prep, pred_means, pred_covs)
    total = step_ll.sum(-1)
    # any non-finite step makes its sum non-finite (a tenth of the check over every step)
    if not all_finite(total.detach()):
        raise ValueError(
            "R: the innovation covariance C P Cᵀ + R is not positive definite at some step "
            "(is R singular, or are the parameters extreme?); the log-likelihood is not finite"
        )
    if not moments:
        return step_ll if per_step else total
    if not predicted:
        pred_means = pred_covs = None
    return FilterResult(total, step_ll if per_step else None, filt_means, filt_covs, pred_means,
                        pred_covs)


def _expand(res):
    """Broadcast every field of a filter/smoother result to the full batch shape."""
    batch = broadcast_shapes(
        res.log_likelihood.shape,
        res.filtered_means.shape[:-2],
        res.filtered_covs.shape[:-3],
    )
    out = {}
    for name, value in res._asdict().items():
        core = {"log_likelihood": 0, "step_log_likelihoods": 1}.get(
            name, 2 if name.endswith("means") else 3
        )
        out[name] = None if value is None else value.expand(
            batch + value.shape[value.dim() - core :])
    return type(res)(**out)


def kalman_smoother(
    x,
    A,
    C,
    Q,
    R,
    init_mean,
    init_cov,
    mask=None,
    parallel=False,
    validate=True,
    *,
    transition_offset=None,
    observation_offset=None,
):
    """Rauch–Tung–Striebel smoother: moments of z_t | x_{1:T} and lag-one cross-covariances.

    Same arguments and shapes as :func:`kalman_filter` (``x (..., T, p)``, time at dim -2,
    optional ``transition_offset (..., T, n)`` and ``observation_offset (..., T, p)``).
    Returns a :class:`SmootherResult`; ``smoothed_cross_covs[..., t, :, :]`` is
    ``Cov(z_{t+1}, z_t | x_{1:T})``.

    >>> import torch
    >>> I = torch.eye(2)
    >>> res = kalman_smoother(torch.randn(30, 2), 0.5 * I, I, I, I, torch.zeros(2), I)
    >>> torch.allclose(res.smoothed_means[-1], res.filtered_means[-1])
    True
    """
    filt = _filter(
        x,
        A,
        C,
        Q,
        R,
        init_mean,
        init_cov,
        mask,
        parallel,
        validate,
        transition_offset,
        observation_offset,
    )
    fm, fc, pm, pc = (
        filt.filtered_means,
        filt.filtered_covs,
        filt.predicted_means,
        filt.predicted_covs,
    )
    T = fm.shape[-2]
    tv_A = A.dim() == x.dim() + 1
    A_all = _full_time(A if tv_A else A.unsqueeze(-3), T)
    if T == 1:
        empty = fc[..., :0, :, :]
        return _expand(
            SmootherResult(filt.log_likelihood, fm, fc, empty, fm, fc, filt.step_log_likelihoods)
        )
    G = _smoother.gains(fc, pc, A if A.dim() == 2 else A_all)  # (..., T-1, n, n)
    if parallel:
        # Elements (E, g, L) of Särkkä & García-Fernández (2021), eq. (45)–(47), scanned
        # backwards in time: (E_t, g_t, L_t) ∘ (E_{t+1}, ...) ∘ ... ∘ (0, m_T, P_T).
        E = torch.cat([G, torch.zeros_like(fc[..., -1:, :, :])], -3)
        A_next = torch.cat([A_all[..., 1:, :, :], torch.zeros_like(A_all[..., :1, :, :])], -3)
        EA = E @ A_next
        # g_t = m_t^f - E_t m_{t+1}^- (the predicted mean includes any transition offset)
        pm_next = torch.cat([pm[..., 1:, :], torch.zeros_like(pm[..., :1, :])], -2)
        g = fm - _mv(E, pm_next)
        Lc = _sym(fc - EA @ fc)

        def combine(later, earlier):
            E2, g2, L2 = later  # "later" in scan order = earlier in time
            E1, g1, L1 = earlier
            return E2 @ E1, _mv(E2, g1) + g2, _sym(E2 @ L1 @ E2.transpose(-1, -2) + L2)

        elems = (E.flip(-3), g.flip(-2), Lc.flip(-3))
        _, sm, sc = associative_scan(lambda a, b: combine(b, a), elems, (-3, -2, -3))
        sm, sc = sm.flip(-2), sc.flip(-3)
    else:
        sc, sm = _smoother.backward_pass(G, fm, fc, pm, pc)
    cross = sc[..., 1:, :, :] @ G.transpose(-1, -2)
    return _expand(
        SmootherResult(filt.log_likelihood, sm, sc, cross, fm, fc, filt.step_log_likelihoods)
    )
