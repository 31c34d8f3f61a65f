"""Sampling linear-Gaussian state-space models: forward (prior and forecasts) and posterior.

Model (column vectors; sequences ``(..., time, dim)`` with time at dim -2)::

    z_1 ~ N(init_mean, init_cov),  z_t = A z_{t-1} + w_t,  x_t = C z_t + v_t,
    w_t ~ N(0, Q),  v_t ~ N(0, R)

* :func:`sample_lgssm` — the one forward sampler of pyrossm (``LinearGaussianSSM.sample``,
  ``LinearGaussianSSM.forecast`` and :func:`pyrossm.datasets.simulate_linear_gaussian` use it).
* :func:`forecast_moments` — exact moments of the next ``H`` states and observations.
* :func:`sample_posterior` — forward filtering, backward sampling (FFBS): exact draws of whole
  trajectories ``z_{1:T} | x_{1:T}`` (missing data allowed).

Covariances may be singular (positive semi-definite): noise factors fall back from Cholesky to
a symmetric square root, and the backward gains to a pseudo-inverse.

References: Carter & Kohn (1994), "On Gibbs sampling for state space models", Biometrika 81;
Frühwirth-Schnatter (1994), J. Time Series Analysis 15; Särkkä (2013), ch. 8.
"""

from __future__ import annotations

import torch

from pyrossm._gaussian import mv as _mv

from ..protocol import Trajectory
from .inference import kalman_filter

__all__ = ["forecast_moments", "psd_factor", "sample_lgssm", "sample_posterior"]


def psd_factor(name: str, M: torch.Tensor, check: bool = True) -> torch.Tensor:
    """A factor ``L`` with ``L Lᵀ = M`` for symmetric positive semi-definite ``M (..., n, n)``.

    Cholesky when every matrix is positive definite, else ``V diag(√λ)`` from the symmetric
    eigendecomposition (negative rounding-level eigenvalues set to 0). ``check``: raise a
    ValueError naming ``name`` when ``M`` is asymmetric, not finite or clearly indefinite.

    >>> L = psd_factor("Q", torch.diag(torch.tensor([4.0, 0.0])))
    >>> (L @ L.T).tolist()
    [[4.0, 0.0], [0.0, 0.0]]
    """
    if check:
        if not bool(torch.isfinite(M).all()):
            raise ValueError(f"{name}: expected finite entries, got NaN or inf")
        scale = M.abs().amax((-1, -2), keepdim=True).clamp_min(1.0)
        tol = 1e3 * torch.finfo(M.dtype).eps * scale
        if bool(((M - M.transpose(-1, -2)).abs() > tol).any()):
            raise ValueError(f"{name}: expected a symmetric matrix, got an asymmetric one")
    L, info = torch.linalg.cholesky_ex(M)
    if not bool((info != 0).any()):
        return L
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.transpose(-1, -2)))
    if check:
        tol = 1e3 * torch.finfo(M.dtype).eps * evals.abs().amax(-1).clamp_min(1.0)
        if bool((evals.amin(-1) < -tol).any()):
            raise ValueError(f"{name}: expected a positive semi-definite matrix, got smallest "
                             f"eigenvalue {evals.min().item():.3g}")
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def _randn(shape, generator, dtype, device):
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=draw_device).to(device)


def sample_lgssm(A, C, Q, R, init_mean, init_cov, num_steps: int, sample_shape=(), *,
                 start: str = "initial", generator: torch.Generator | None = None) -> Trajectory:
    """Draw ``(z, x)`` trajectories of ``num_steps`` steps from an LGSSM.

    ``start="initial"``: ``z_1 ~ N(init_mean, init_cov)`` (the model's prior).
    ``start="transition"``: ``init_mean, init_cov`` describe the state *before* the first
    step, ``z_0``, and ``z_1 = A z_0 + w_1`` (a forecast from a filtered state).

    Shapes: ``A (n, n)``, ``C (p, n)``, ``Q (n, n)``, ``R (p, p)``; ``init_mean (..., n)`` and
    ``init_cov (..., n, n)`` may carry batch dims. Returns :class:`~pyrossm.protocol.Trajectory`
    with ``z (*sample_shape, ..., num_steps, n)`` and ``x (*sample_shape, ..., num_steps, p)``.
    Noise is drawn on ``generator``'s device (else ``A``'s) in the order: start, process,
    observation noise; covariances may be singular.

    >>> I = torch.eye(2)
    >>> z, x = sample_lgssm(0.5 * I, I[:1], I, I[:1, :1], torch.zeros(2), I, 10, (3,))
    >>> z.shape, x.shape
    (torch.Size([3, 10, 2]), torch.Size([3, 10, 1]))
    """
    if start not in ("initial", "transition"):
        raise ValueError(f"start: expected 'initial' or 'transition', got {start!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps: expected a non-negative int, got {num_steps!r}")
    dtype, device = A.dtype, A.device
    n, p = A.shape[-1], C.shape[-2]
    L_Q, L_R, L_0 = psd_factor("Q", Q), psd_factor("R", R), psd_factor("init_cov", init_cov)
    batch = torch.broadcast_shapes(init_mean.shape[:-1], init_cov.shape[:-2])
    shape = torch.Size(sample_shape) + batch
    T = num_steps
    eps0 = _randn(shape + (n,), generator, dtype, device)
    eps = _randn(shape + (T - 1 if start == "initial" else T, n), generator, dtype, device)
    eta = _randn(shape + (T, p), generator, dtype, device)
    z_t = init_mean + _mv(L_0, eps0)
    w = eps @ L_Q.transpose(-1, -2)
    states = [z_t] if start == "initial" else []
    for t in range(w.shape[-2]):
        z_t = z_t @ A.transpose(-1, -2) + w[..., t, :]
        states.append(z_t)
    z = torch.stack(states, -2) if states else z_t.new_zeros(shape + (0, n))
    x = z @ C.transpose(-1, -2) + eta @ L_R.transpose(-1, -2)
    return Trajectory(z, x)


def forecast_moments(A, C, Q, R, mean, cov, horizon: int):
    """Exact moments of ``z_{L+h}`` and ``x_{L+h}``, ``h = 1..horizon``, given
    ``z_L ~ N(mean (..., n), cov (..., n, n))``: ``m_h = A m_{h-1}``, ``P_h = A P_{h-1} Aᵀ + Q``,
    observed ``C m_h`` and ``C P_h Cᵀ + R``.

    Returns ``(latent_means (..., H, n), latent_covs (..., H, n, n), obs_means (..., H, p),
    obs_covs (..., H, p, p))``.

    >>> I = torch.eye(1)
    >>> _, P, _, S = forecast_moments(I, I, I, I, torch.zeros(1), I, 3)
    >>> P.flatten().tolist(), S.flatten().tolist()
    ([2.0, 3.0, 4.0], [3.0, 4.0, 5.0])
    """
    m, P = mean, cov
    ms, Ps = [], []
    for _ in range(horizon):
        m = m @ A.transpose(-1, -2)
        P = A @ P @ A.transpose(-1, -2) + Q
        P = 0.5 * (P + P.transpose(-1, -2))
        ms.append(m)
        Ps.append(P)
    ms, Ps = torch.stack(ms, -2), torch.stack(Ps, -3)
    obs_means = ms @ C.transpose(-1, -2)
    obs_covs = C @ Ps @ C.transpose(-1, -2) + R
    return ms, Ps, obs_means, 0.5 * (obs_covs + obs_covs.transpose(-1, -2))


def _backward_gains(filt_covs, pred_next, A_next):
    """G_t = P^f_t A_{t+1}ᵀ (P^-_{t+1})⁻¹ (Cholesky solve; pseudo-inverse where singular)."""
    APf = A_next @ filt_covs  # (..., T-1, n, n)
    L, info = torch.linalg.cholesky_ex(pred_next)
    if not bool((info != 0).any()):
        return torch.cholesky_solve(APf, L).transpose(-1, -2)
    # A singular predicted covariance (e.g. singular Q and init_cov): z_{t+1} - m^-_{t+1} lies
    # in its range almost surely, where the pseudo-inverse gives the exact conditional.
    return (torch.linalg.pinv(pred_next, hermitian=True) @ APf).transpose(-1, -2)


def sample_posterior(x, A, C, Q, R, init_mean, init_cov, num_samples: int = 1, mask=None, *,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact draws of latent trajectories ``z_{1:T} ~ p(z | x_{1:T})`` by forward filtering,
    backward sampling.

    Forward: the Kalman filter (:func:`~pyrossm.lgssm.kalman_filter`; NaN entries of ``x`` and
    ``mask`` False steps are missing). Backward: ``z_T ~ N(m^f_T, P^f_T)``, then for
    ``t = T-1..1``::

        z_t | z_{t+1}, x_{1:t} ~ N(m^f_t + G_t (z_{t+1} - A m^f_t),  P^f_t - G_t P^-_{t+1} G_tᵀ),
        G_t = P^f_t Aᵀ (P^-_{t+1})⁻¹.

    Shapes: ``x (..., T, p)`` with time at dim -2 (parameters as for ``kalman_filter``,
    time-varying ``A (..., T, n, n)`` allowed). Returns ``z (num_samples, ..., T, n)``.
    Singular predicted covariances (singular Q / init_cov) use the pseudo-inverse.

    >>> I = torch.eye(1)
    >>> sample_posterior(torch.randn(2, 8, 1), 0.9 * I, I, I, I, torch.zeros(1), I, 5).shape
    torch.Size([5, 2, 8, 1])
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    filt = kalman_filter(x, A, C, Q, R, init_mean, init_cov, mask)
    fm, fc, pm, pc = (filt.filtered_means, filt.filtered_covs, filt.predicted_means,
                      filt.predicted_covs)
    T, n = fm.shape[-2], fm.shape[-1]
    dtype, device = fm.dtype, fm.device
    shape = (num_samples,) + tuple(fm.shape[:-2])
    eps = _randn(shape + (T, n), generator, dtype, device)
    # Last step: the filtered distribution.
    z = fm[..., -1, :] + _mv(psd_factor("filtered_covs", fc[..., -1, :, :], check=False),
                             eps[..., -1, :])
    if T == 1:
        return z.unsqueeze(-2)
    A_next = A[..., 1:, :, :] if A.dim() == x.dim() + 1 else A.unsqueeze(-3)
    G = _backward_gains(fc[..., :-1, :, :], pc[..., 1:, :, :], A_next)  # (..., T-1, n, n)
    cond_cov = fc[..., :-1, :, :] - G @ pc[..., 1:, :, :] @ G.transpose(-1, -2)
    L = psd_factor("conditional covariance", 0.5 * (cond_cov + cond_cov.transpose(-1, -2)),
                   check=False)
    offset = fm[..., :-1, :] - _mv(G, pm[..., 1:, :])  # m^f_t - G_t m^-_{t+1}
    noise = _mv(L, eps[..., :-1, :])  # (S, ..., T-1, n): all conditional noise at once
    Gt = G.transpose(-1, -2)
    out = [z]
    for t in range(T - 2, -1, -1):
        z = (z.unsqueeze(-2) @ Gt[..., t, :, :]).squeeze(-2) + offset[..., t, :] + noise[..., t, :]
        out.append(z)
    return torch.stack(out[::-1], -2)
