"""Shared pieces of the Gaussian-approximation filters (EKF, UKF): checks, missing data, RTS.

Both filters carry a Gaussian ``N(m_t, P_t)`` for ``z_t | x_{1:t}``. Each step has a
prediction (moments of ``z_t | x_{<t}`` and the cross-covariance ``Cov(z_{t-1}, z_t | x_{<t})``)
and an update with a Gaussian approximation of ``(z_t, x_t) | x_{<t}``. The Rauch–Tung–Striebel
backward pass is the same for both once the prediction's cross-covariances are stored
(Särkkä, *Bayesian Filtering and Smoothing*, 2013, ch. 9).

Missing data: an unobserved entry (NaN in ``x``, or a step where ``mask`` is False) becomes a
harmless pseudo-observation with a zero row in the measurement deviations, an identity row and
column in ``R`` and a zero innovation, so the update ignores it; its ``N(0; 0, 1)`` factor is
removed from the log-likelihood afterwards (as in :mod:`pyrossm.lgssm.inference`).
"""

from __future__ import annotations

import torch

from pyrossm._gaussian import LOG_2PI as _LOG_2PI
from pyrossm._gaussian import mv, sym
from pyrossm.lgssm.inference import FilterResult, SmootherResult


def _fail(name, expected, got):
    raise ValueError(f"{name}: expected {expected}, got {got}")


def prepare(x, Q, R, init_mean, init_cov, mask, f, h):
    """Check the inputs; return ``x`` with NaNs zeroed, the ``(B, T, p)`` observed indicator
    (float) and the parameters broadcast to the batch: ``Q (B, n, n)``, ``R (B, p, p)``,
    ``init_mean (B, n)``, ``init_cov (B, n, n)``."""
    named = dict(x=x, Q=Q, R=R, init_mean=init_mean, init_cov=init_cov)
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    for name, fn in (("f", f), ("h", h)):
        if not callable(fn):
            raise TypeError(f"{name}: expected a callable mapping one state (n,) to a vector, "
                            f"got {type(fn).__name__}")
    if x.dim() != 3 or x.shape[1] == 0:
        _fail("x", "shape (batch, time, obs_dim) with time at dim -2 and T >= 1",
              f"shape {tuple(x.shape)}")
    B, T, p = x.shape
    if init_mean.dim() not in (1, 2) or init_mean.dim() == 2 and init_mean.shape[0] not in (1, B):
        _fail("init_mean", f"shape (n,) or ({B}, n)", f"shape {tuple(init_mean.shape)}")
    n = init_mean.shape[-1]
    for name, value, size in (("Q", Q, n), ("R", R, p), ("init_cov", init_cov, n)):
        if value.dim() not in (2, 3) or value.shape[-2:] != (size, size) or (
            value.dim() == 3 and value.shape[0] not in (1, B)
        ):
            _fail(name, f"shape ({size}, {size}) or ({B}, {size}, {size})",
                  f"shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            _fail(name, "finite values", "NaN or Inf entries")
    obs = ~torch.isnan(x)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(
            mask.shape
        ) != (B, T):
            _fail("mask", f"a bool tensor of shape (batch, time) = {(B, T)}",
                  f"{getattr(mask, 'dtype', type(mask).__name__)} "
                  f"{tuple(getattr(mask, 'shape', ()))}")
        obs = obs & mask.unsqueeze(-1)
    x = torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def batch(v, core):
        return v.expand((B,) + v.shape[v.dim() - core:])

    return (x, obs.to(x.dtype), batch(Q, 2), batch(R, 2), batch(init_mean, 1),
            batch(init_cov, 2))


def masked_update(m_pred, P_pred, y_hat, S_core, Cxy, x_t, o_t, R):
    """Gaussian update of ``N(m_pred, P_pred)`` with the (approximate) joint of ``(z_t, x_t)``.

    ``y_hat (B, p)`` predicted observation, ``S_core (B, p, p)`` its covariance without ``R``
    (``H P Hᵀ`` for the EKF), ``Cxy (B, n, p)`` = Cov(z_t, x_t), ``o_t (B, p)`` 1 = observed.
    Returns ``(m, P, step log-likelihood (B,))``; ``S = S_core + R`` on the observed entries.
    """
    o_row = o_t.unsqueeze(-1)
    oo = o_row * o_t.unsqueeze(-2)
    Cxy = Cxy * o_t.unsqueeze(-2)
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    S = sym((S_core + R) * oo + eye * (1 - o_row))
    L = torch.linalg.cholesky(S)
    v = (x_t - y_hat) * o_t
    K = torch.cholesky_solve(Cxy.transpose(-1, -2), L).transpose(-1, -2)  # Cxy S^-1
    m = m_pred + mv(K, v)
    P = sym(P_pred - K @ S @ K.transpose(-1, -2))
    w = torch.linalg.solve_triangular(L, v.unsqueeze(-1), upper=False).squeeze(-1)
    half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    ll = -0.5 * (w.pow(2).sum(-1) + v.shape[-1] * _LOG_2PI) - half_logdet
    return m, P, ll + 0.5 * _LOG_2PI * (1 - o_t).sum(-1)


def stack_filter(lls, fm, fc, pm, pc):
    step_ll = torch.stack(lls, -1)
    return FilterResult(step_ll.sum(-1), step_ll, torch.stack(fm, -2), torch.stack(fc, -3),
                        torch.stack(pm, -2), torch.stack(pc, -3))


def rts_smoother(filt: FilterResult, cross) -> SmootherResult:
    """Rauch–Tung–Striebel pass from filtered/predicted moments and the prediction's
    cross-covariances ``cross (B, T-1, n, n)``, ``[t] = Cov(z_t, z_{t+1} | x_{1:t})``.

    ``G_t = cross_t (P^-_{t+1})^{-1}``, ``m^s_t = m_t + G_t (m^s_{t+1} - m^-_{t+1})``,
    ``P^s_t = P_t + G_t (P^s_{t+1} - P^-_{t+1}) G_tᵀ``; ``Cov(z_{t+1}, z_t | x) = P^s_{t+1} G_tᵀ``.
    """
    fm, fc = filt.filtered_means, filt.filtered_covs
    pm, pc = filt.predicted_means, filt.predicted_covs
    T = fm.shape[-2]
    if T == 1:
        return SmootherResult(filt.log_likelihood, fm, fc, fc[..., :0, :, :], fm, fc,
                              filt.step_log_likelihoods)
    L = torch.linalg.cholesky(pc[..., 1:, :, :])
    G = torch.cholesky_solve(cross.transpose(-1, -2), L).transpose(-1, -2)
    sm, sc = [fm[..., -1, :]], [fc[..., -1, :, :]]
    for t in range(T - 2, -1, -1):
        Gt = G[..., t, :, :]
        sm.append(fm[..., t, :] + mv(Gt, sm[-1] - pm[..., t + 1, :]))
        sc.append(sym(fc[..., t, :, :] + Gt @ (sc[-1] - pc[..., t + 1, :, :])
                      @ Gt.transpose(-1, -2)))
    sm = torch.stack(sm[::-1], -2)
    sc = torch.stack(sc[::-1], -3)
    cross_s = sc[..., 1:, :, :] @ G.transpose(-1, -2)
    return SmootherResult(filt.log_likelihood, sm, sc, cross_s, fm, fc,
                          filt.step_log_likelihoods)


def check_output(name, value, shape):
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected the function to map a state to shape "
                         f"{tuple(shape[1:])}, got {tuple(value.shape[1:])}")
