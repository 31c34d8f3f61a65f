r"""Unscented Kalman filter and smoother for nonlinear models with additive Gaussian noise.

Model as in :mod:`pyrossm.filters.extended`::

    z_1 ~ N(init_mean, init_cov);  z_t = f(z_{t-1}) + ε_t, ε_t ~ N(0, Q);
    x_t = h(z_t) + ψ_t, ψ_t ~ N(0, R)

The unscented transform pushes ``2n + 1`` sigma points ``χ_0 = m``,
``χ_{±i} = m ± \sqrt{n + λ}\,L_{:,i}`` (``P = L Lᵀ``, ``λ = α²(n + κ) - n``) through the
nonlinearity and matches moments with the weights ``w^m_0 = λ/(n+λ)``,
``w^c_0 = λ/(n+λ) + 1 - α² + β``, ``w_i = 1/(2(n+λ))``. Prediction uses the sigma points of
the filtered ``N(m_{t-1}, P_{t-1})``, the update those of the predicted ``N(m⁻_t, P⁻_t)``; the
smoother is the unscented Rauch–Tung–Striebel smoother (its gain uses the prediction's
cross-covariance). For linear ``f``, ``h`` every transform is exact and this is the Kalman
filter / RTS smoother.

Shapes: ``x (batch, time, obs_dim)`` (time at dim -2); ``Q (n, n)``, ``R (p, p)``,
``init_mean (n,)``, ``init_cov (n, n)`` (or with a leading batch dim); ``mask (batch, time)``
bool, True = observed; NaN entries of ``x`` are missing. Results are
:class:`~pyrossm.lgssm.FilterResult` / :class:`~pyrossm.lgssm.SmootherResult`. ``f`` and ``h``
map one state ``(n,)``; they are batched over sequences and sigma points with
``torch.func.vmap``.

References: Julier & Uhlmann (1997); Wan & van der Merwe (2000); Särkkä (2008), "Unscented
Rauch–Tung–Striebel smoother", IEEE TAC 53(3); Särkkä (2013), algorithms 5.14 and 9.3.

Example::

    >>> import torch
    >>> f = lambda z: torch.stack([z[0] + 0.1 * z[1], z[1] - 0.1 * torch.sin(z[0])])
    >>> h = lambda z: torch.sin(z[:1])
    >>> res = unscented_kalman_filter(torch.randn(3, 20, 1), f, h, 0.01 * torch.eye(2),
    ...                               0.1 * torch.eye(1), torch.zeros(2), torch.eye(2))
    >>> res.log_likelihood.shape
    torch.Size([3])
"""

from __future__ import annotations

import torch
from torch.func import vmap

from pyrossm.lgssm.inference import FilterResult, SmootherResult

from ._gaussian import check_output, masked_update, prepare, rts_smoother, stack_filter, sym

__all__ = ["unscented_kalman_filter", "unscented_kalman_smoother"]


def _weights(n, alpha, beta, kappa, like):
    if not alpha > 0:
        raise ValueError(f"alpha: expected a positive spread parameter, got {alpha!r}")
    lam = alpha**2 * (n + kappa) - n
    if not n + lam > 0:
        raise ValueError(f"kappa: expected n + kappa > 0 (n = {n}), got kappa = {kappa!r}")
    w = torch.full((2 * n + 1,), 0.5 / (n + lam), dtype=like.dtype, device=like.device)
    w_m, w_c = w.clone(), w.clone()
    w_m[0] = lam / (n + lam)
    w_c[0] = lam / (n + lam) + 1 - alpha**2 + beta
    return w_m, w_c, (n + lam) ** 0.5


def _sigma_points(m, P, spread):
    """``(B, 2n+1, n)``: ``m``, ``m + spread L_{:,i}``, ``m - spread L_{:,i}``."""
    L = torch.linalg.cholesky(P) * spread
    cols = L.transpose(-1, -2)  # rows are the columns of L
    return torch.cat([m.unsqueeze(-2), m.unsqueeze(-2) + cols, m.unsqueeze(-2) - cols], -2)


def _transform(fn, points, w_m, w_c, name, out_dim):
    """Mean, deviations and weighted second moments of ``fn`` at the sigma points."""
    Y = vmap(vmap(fn))(points)
    check_output(name, Y[:, 0], (Y.shape[0], out_dim))
    mean = torch.einsum("k,bkd->bd", w_m, Y)
    return mean, Y - mean.unsqueeze(-2)


def _ukf(x, f, h, Q, R, init_mean, init_cov, mask, alpha, beta, kappa):
    x, o, Q, R, m, P = prepare(x, Q, R, init_mean, init_cov, mask, f, h)
    B, T, p = x.shape
    n = m.shape[-1]
    w_m, w_c, spread = _weights(n, alpha, beta, kappa, x)
    lls, fm, fc, pm, pc, cross = [], [], [], [], [], []
    for t in range(T):
        if t > 0:
            chi = _sigma_points(m, P, spread)
            m_pred, dZ = _transform(f, chi, w_m, w_c, "f", n)
            dX = chi - m.unsqueeze(-2)
            cross.append(torch.einsum("k,bki,bkj->bij", w_c, dX, dZ))
            m, P = m_pred, sym(torch.einsum("k,bki,bkj->bij", w_c, dZ, dZ) + Q)
        pm.append(m)
        pc.append(P)
        chi = _sigma_points(m, P, spread)
        y_hat, dY = _transform(h, chi, w_m, w_c, "h", p)
        S_core = torch.einsum("k,bki,bkj->bij", w_c, dY, dY)
        Cxy = torch.einsum("k,bki,bkj->bij", w_c, chi - m.unsqueeze(-2), dY)
        m, P, ll = masked_update(m, P, y_hat, S_core, Cxy, x[:, t], o[:, t], R)
        lls.append(ll)
        fm.append(m)
        fc.append(P)
    filt = stack_filter(lls, fm, fc, pm, pc)
    cross = torch.stack(cross, -3) if cross else fc[0].new_zeros(B, 0, n, n)
    return filt, cross


def unscented_kalman_filter(x, f, h, Q, R, init_mean, init_cov, mask=None, alpha=1.0,
                            beta=0.0, kappa=0.0) -> FilterResult:
    """Unscented Kalman filter (model, shapes and weights in the module docstring).

    Args:
        x: observations ``(batch, time, obs_dim)``, time at dim -2, NaN = missing.
        f, h: callables mapping one state ``(n,)`` to ``(n,)`` and ``(p,)``.
        Q, R, init_mean, init_cov: noise covariances and the moments of ``z_1``.
        mask: ``(batch, time)`` bool, True = observed.
        alpha, beta, kappa: sigma-point spread and weights (defaults: ``α = 1, β = 0, κ = 0``,
            the cubature rule's points ``m ± √n L_{:,i}`` with centre weight 0).

    Returns a :class:`~pyrossm.lgssm.FilterResult`.
    """
    return _ukf(x, f, h, Q, R, init_mean, init_cov, mask, alpha, beta, kappa)[0]


def unscented_kalman_smoother(x, f, h, Q, R, init_mean, init_cov, mask=None, alpha=1.0,
                              beta=0.0, kappa=0.0) -> SmootherResult:
    """Unscented Rauch–Tung–Striebel smoother (Särkkä 2008): moments of ``z_t | x_{1:T}``.

    Same arguments as :func:`unscented_kalman_filter`; ``x (batch, time, obs_dim)``, time at
    dim -2. Returns a :class:`~pyrossm.lgssm.SmootherResult`.

    >>> import torch
    >>> I = torch.eye(2)
    >>> res = unscented_kalman_smoother(torch.randn(1, 9, 2), torch.sin, lambda z: z, I, I,
    ...                                 torch.zeros(2), I)
    >>> res.smoothed_covs.shape
    torch.Size([1, 9, 2, 2])
    """
    return rts_smoother(*_ukf(x, f, h, Q, R, init_mean, init_cov, mask, alpha, beta, kappa))
