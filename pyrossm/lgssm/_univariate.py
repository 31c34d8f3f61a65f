"""A fast Kalman log-likelihood for fitting: univariate treatment, many parameter sets at once.

With a diagonal R the entries of x_t can be processed one at a time (Durbin & Koopman 2012,
§6.4): no matrix factorisation, only rank-one updates. This NumPy version evaluates the
log-likelihood of ``K`` parameter sets in one pass over time (leading dim ``K``), which is how
:mod:`pyrossm.lgssm.mle` gets central-difference gradients (2k + 1 parameter sets) at the cost
of about one filter pass, instead of a taped autograd pass through T small matrix steps.
It agrees with :func:`~pyrossm.lgssm.kalman_filter` to rounding (tested).

Shapes: ``x (B, T, p)`` or ``(K, B, T, p)`` (time at dim -2, NaN = missing, the same
entries missing for every parameter set), ``A (K, n, n)``, ``C (K, p, n)`` (or
``(K, B, T, p, n)``),
``Q (K, n, n)``, ``r (K, p)`` (the diagonal of R), ``init_mean (K, n)``, ``init_cov (K, n, n)``.
"""

from __future__ import annotations

import numpy as np

from pyrossm._gaussian import LOG_2PI as _LOG_2PI

__all__ = ["univariate_log_likelihood", "whitened_log_likelihood"]



def univariate_log_likelihood(x, A, C, Q, r, init_mean, init_cov, burn=0,
                              transition_offset=None):
    """Σ over sequences and steps t ≥ ``burn`` of log p(x_t | x_{<t}) for each of K parameter
    sets: an array ``(K,)``. ``transition_offset (K, B, T, n)``: b_t added to A m_{t-1}.

    >>> import numpy as np
    >>> x = np.zeros((1, 3, 1)); one = np.ones((1, 1, 1))
    >>> ll = univariate_log_likelihood(x, one, one, one, np.ones((1, 1)), np.zeros((1, 1)), one)
    >>> ll.shape
    (1,)
    """
    x = np.asarray(x, dtype=np.float64)
    K, n = A.shape[0], A.shape[-1]
    if x.ndim == 3:  # the same data for every parameter set
        x = x[None]
    B, T, p = x.shape[1:]
    obs = ~np.isnan(x[0])
    w_all = obs.astype(np.float64)
    xf = np.where(obs, x, 0.0)
    any_obs = obs.any(0)
    m = np.broadcast_to(init_mean[:, None, :], (K, B, n)).copy()
    P = np.broadcast_to(init_cov[:, None, :, :], (K, B, n, n)).copy()
    A4, At4, Q4 = A[:, None], np.swapaxes(A, -1, -2)[:, None], Q[:, None]
    At3 = np.swapaxes(A, -1, -2)
    ll = np.zeros(K)
    for t in range(T):
        if t:
            m = m @ At3
            if transition_offset is not None:
                m = m + transition_offset[:, :, t]
            P = A4 @ P @ At4 + Q4
            P = 0.5 * (P + np.swapaxes(P, -1, -2))
        for i in range(p):
            if not any_obs[t, i]:
                continue
            c = C[:, :, t, i, :] if C.ndim == 5 else C[:, None, i, :]  # (K, B or 1, n)
            Pc = (P @ c[..., None])[..., 0]  # (K, B, n)
            f = (Pc * c).sum(-1) + r[:, i, None]  # (K, B)
            v = xf[:, :, t, i] - (m * c).sum(-1)  # (K, B)
            w = w_all[:, t, i]  # (B,)
            gain = Pc * (w / f)[..., None]
            m = m + gain * v[..., None]
            P = P - gain[..., :, None] * Pc[..., None, :]
            if t >= burn:
                ll -= 0.5 * (w * (_LOG_2PI + np.log(f) + v * v / f)).sum(-1)
    return ll


def whitened_log_likelihood(x, A, C, Q, R, init_mean, init_cov, burn=0,
                            transition_offset=None):
    """The same for a full ``R (K, p, p)``: at each step the observed entries o are whitened,
    x̃_o = L_o⁻¹ x_o and C̃_o = L_o⁻¹ C_o with R_oo = L_o L_oᵀ, so that their noise is
    N(0, I); then the univariate filter, and log|L_o| subtracted. One Cholesky per missing
    pattern (and parameter set)."""
    x = np.asarray(x, dtype=np.float64)
    K, p = C.shape[0], C.shape[1]
    if x.ndim == 3:
        x = np.broadcast_to(x[None], (K,) + x.shape)
    B, T = x.shape[1:3]
    obs = ~np.isnan(x[0])
    xf = np.where(obs, x, 0.0)
    patterns, which = np.unique(obs.reshape(-1, p), axis=0, return_inverse=True)
    W = np.zeros((len(patterns), K, p, p))
    logdet = np.zeros((len(patterns), K))
    for j, pattern in enumerate(patterns):
        idx = np.flatnonzero(pattern)
        if len(idx) == 0:
            continue
        L = np.linalg.cholesky(R[:, idx[:, None], idx[None, :]])
        W[j][:, idx[:, None], idx[None, :]] = np.linalg.inv(L)
        logdet[j] = np.log(np.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
    Wbt = np.moveaxis(W[which.reshape(-1)].reshape(B, T, K, p, p), 2, 0)  # (K, B, T, p, p)
    xw = (Wbt @ xf[..., None])[..., 0]
    Cw = Wbt @ C[:, None, None]
    xw = np.where(obs, xw, np.nan)
    ones = np.ones((K, p))
    ll = univariate_log_likelihood(xw, A, Cw, Q, ones, init_mean, init_cov, burn,
                                   transition_offset)
    return ll - logdet[which.reshape(-1)].reshape(B, T, K)[:, burn:].sum((0, 1))
