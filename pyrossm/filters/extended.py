r"""Extended Kalman filter and smoother for nonlinear models with additive Gaussian noise.

Model (column vectors; ``f`` and ``h`` map one state vector)::

    z_1 ~ N(init_mean, init_cov)
    z_t = f(z_{t-1}) + ε_t,   ε_t ~ N(0, Q)
    x_t = h(z_t)     + ψ_t,   ψ_t ~ N(0, R)

The EKF linearises ``f`` at the filtered mean and ``h`` at the predicted mean, with Jacobians
``F = ∂f/∂z``, ``H = ∂h/∂z`` from autograd (``torch.func.jacrev`` under ``torch.func.vmap`` over
the batch)::

    predict:  m⁻ = f(m),  P⁻ = F P Fᵀ + Q
    update:   S = H P⁻ Hᵀ + R,  K = P⁻ Hᵀ S⁻¹,  m = m⁻ + K (x - h(m⁻)),  P = P⁻ - K S Kᵀ

and ``log p(x_t | x_{<t}) ≈ log N(x_t; h(m⁻), S)``. For linear ``f``, ``h`` this is the Kalman
filter exactly. The smoother is the extended Rauch–Tung–Striebel smoother.

Shapes: ``x (batch, time, obs_dim)`` (time at dim -2); ``Q (n, n)``, ``R (p, p)``,
``init_mean (n,)``, ``init_cov (n, n)`` (or with a leading batch dim); ``mask (batch, time)``
bool, True = observed; NaN entries of ``x`` are missing. Results are
:class:`~pyrossm.lgssm.FilterResult` / :class:`~pyrossm.lgssm.SmootherResult`. Everything is
differentiable (with respect to ``x``, the covariances and any parameters ``f``/``h`` close over).

Reference: Särkkä, *Bayesian Filtering and Smoothing* (2013), algorithms 5.4 and 9.3.

Example::

    >>> import torch
    >>> f = lambda z: torch.stack([z[0] + 0.1 * z[1], z[1] - 0.1 * torch.sin(z[0])])
    >>> h = lambda z: torch.sin(z[:1])
    >>> x = torch.randn(3, 20, 1)
    >>> res = extended_kalman_filter(x, f, h, 0.01 * torch.eye(2), 0.1 * torch.eye(1),
    ...                              torch.zeros(2), torch.eye(2))
    >>> res.log_likelihood.shape, res.filtered_means.shape
    (torch.Size([3]), torch.Size([3, 20, 2]))
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from pyrossm.lgssm.inference import FilterResult, SmootherResult

from ._gaussian import check_output, masked_update, prepare, rts_smoother, stack_filter, sym

__all__ = ["extended_kalman_filter", "extended_kalman_smoother"]


def _value_and_jacobian(fn):
    """Batched ``(fn(z), ∂fn/∂z)`` for ``z (B, n)``: ``vmap`` of ``jacrev`` with aux output."""

    def single(z):
        out = fn(z)
        return out, out

    return vmap(jacrev(single, has_aux=True))


def _ekf(x, f, h, Q, R, init_mean, init_cov, mask):
    x, o, Q, R, m, P = prepare(x, Q, R, init_mean, init_cov, mask, f, h)
    B, T, p = x.shape
    n = m.shape[-1]
    f_jac, h_jac = _value_and_jacobian(f), _value_and_jacobian(h)
    lls, fm, fc, pm, pc, cross = [], [], [], [], [], []
    for t in range(T):
        if t > 0:
            F, m_pred = f_jac(m)
            check_output("f", m_pred, (B, n))
            cross.append(P @ F.transpose(-1, -2))  # Cov(z_{t-1}, z_t | x_{<t})
            m, P = m_pred, sym(F @ P @ F.transpose(-1, -2) + Q)
        pm.append(m)
        pc.append(P)
        H, y_hat = h_jac(m)
        check_output("h", y_hat, (B, p))
        PHt = P @ H.transpose(-1, -2)
        m, P, ll = masked_update(m, P, y_hat, H @ PHt, PHt, x[:, t], o[:, t], R)
        lls.append(ll)
        fm.append(m)
        fc.append(P)
    filt = stack_filter(lls, fm, fc, pm, pc)
    cross = torch.stack(cross, -3) if cross else fc[0].new_zeros(B, 0, n, n)
    return filt, cross


def extended_kalman_filter(x, f, h, Q, R, init_mean, init_cov, mask=None) -> FilterResult:
    """Extended Kalman filter (see the module docstring for the model and the shapes).

    Args:
        x: observations ``(batch, time, obs_dim)``, time at dim -2, NaN = missing.
        f, h: callables mapping one state ``(n,)`` to ``(n,)`` and ``(p,)`` (torch ops only,
            so that ``torch.func`` can differentiate and batch them).
        Q, R: noise covariances ``(n, n)``, ``(p, p)``.
        init_mean, init_cov: moments of ``z_1``.
        mask: ``(batch, time)`` bool, True = observed.

    Returns a :class:`~pyrossm.lgssm.FilterResult` (log-likelihood ``(batch,)``, filtered and
    predicted moments).
    """
    return _ekf(x, f, h, Q, R, init_mean, init_cov, mask)[0]


def extended_kalman_smoother(x, f, h, Q, R, init_mean, init_cov, mask=None) -> SmootherResult:
    """Extended Rauch–Tung–Striebel smoother: moments of ``z_t | x_{1:T}`` (approximate).

    Same arguments as :func:`extended_kalman_filter`; ``x (batch, time, obs_dim)``, time at
    dim -2. Returns a :class:`~pyrossm.lgssm.SmootherResult`.

    >>> import torch
    >>> I = torch.eye(2)
    >>> res = extended_kalman_smoother(torch.randn(1, 9, 2), torch.sin, lambda z: z, I, I,
    ...                                torch.zeros(2), I)
    >>> torch.allclose(res.smoothed_means[:, -1], res.filtered_means[:, -1])
    True
    """
    return rts_smoother(*_ekf(x, f, h, Q, R, init_mean, init_cov, mask))
