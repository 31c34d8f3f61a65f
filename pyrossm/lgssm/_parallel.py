"""The parallel-in-time Kalman filter (private; Särkkä & García-Fernández 2021, section IV).

Every step is an element (A, b, C, η, J) of the filtering recursion; the filtered moments are
the prefixes of their associative combination, O(log T) deep (:mod:`._scan`). Used by
``kalman_filter(..., parallel=True)``. Sequences are ``(..., T, dim)`` with time at dim -2.
"""

from __future__ import annotations

import torch

from pyrossm._gaussian import broadcast_shapes
from pyrossm._gaussian import mv as _mv
from pyrossm._gaussian import sym as _sym

from ._scan import associative_scan
from ._steps import innovation_terms as _innovation_terms
from ._steps import update_cov as _update_cov


def _filter_elements(prep):
    x = prep.x
    T = x.shape[-2]
    n = prep.init_mean.shape[-1]
    dt, dev = x.dtype, x.device
    eye = torch.eye(n, dtype=dt, device=dev)
    A = prep.A if prep.tv["A"] else prep.A.unsqueeze(-3)
    C = prep.C if prep.tv["C"] else prep.C.unsqueeze(-3)
    Q = prep.Q if prep.tv["Q"] else prep.Q.unsqueeze(-3)
    R = prep.R if prep.tv["R"] else prep.R.unsqueeze(-3)
    # Generic element for t >= 2 (prior of z_t given z_{t-1} combined with x_t).
    L, K = _innovation_terms(Q, C, R)
    I_KC = eye - K @ C
    Fm = I_KC @ A  # "A" of the element
    x1 = x
    if prep.b is not None:
        x = x - _mv(C, prep.b)  # residual of the offset part of the prior mean
    b = _mv(K, x) if prep.b is None else _mv(K, x) + prep.b
    Cov = _update_cov(Q, K, C, R)
    CA = C @ A
    Sinv_CA = torch.cholesky_solve(CA, L)
    Sinv_x = torch.cholesky_solve(x.unsqueeze(-1), L).squeeze(-1)
    eta = _mv(CA.transpose(-1, -2), Sinv_x)
    J = _sym(CA.transpose(-1, -2) @ Sinv_CA)
    # First element: z_1 ~ N(m0, P0) updated with x_1; no dependence on a previous state.
    m0, P0 = prep.init_mean, prep.init_cov
    C1, R1 = C[..., :1, :, :], R[..., :1, :, :]
    P0e = P0.unsqueeze(-3)
    _, K1 = _innovation_terms(P0e, C1, R1)
    b1 = m0.unsqueeze(-2) + _mv(K1, x1[..., :1, :] - _mv(C1, m0.unsqueeze(-2)))
    Cov1 = _update_cov(P0e, K1, C1, R1)
    # Matrices keep the parameters' batch shape (data-independent), vectors the data's: the
    # scan broadcasts them, so no covariance is computed once per sequence without need.
    mbatch = broadcast_shapes(Fm.shape[:-3], Cov.shape[:-3], Cov1.shape[:-3], J.shape[:-3])
    vbatch = broadcast_shapes(b.shape[:-2], b1.shape[:-2], eta.shape[:-2])
    Fm = Fm.expand(mbatch + (T, n, n))
    Fm = torch.cat([torch.zeros_like(Fm[..., :1, :, :]), Fm[..., 1:, :, :]], -3)
    b = torch.cat([b1.expand(vbatch + (1, n)), b.expand(vbatch + (T, n))[..., 1:, :]], -2)
    Cov = torch.cat(
        [Cov1.expand(mbatch + (1, n, n)), Cov.expand(mbatch + (T, n, n))[..., 1:, :, :]], -3
    )
    eta = torch.cat([torch.zeros_like(b[..., :1, :]), eta.expand(vbatch + (T, n))[..., 1:, :]], -2)
    J = J.expand(mbatch + (T, n, n))
    J = torch.cat([torch.zeros_like(J[..., :1, :, :]), J[..., 1:, :, :]], -3)
    return Fm, b, Cov, eta, J


def _filter_combine(earlier, later):
    A1, b1, C1, e1, J1 = earlier
    A2, b2, C2, e2, J2 = later
    n = A1.shape[-1]
    eye = torch.eye(n, dtype=A1.dtype, device=A1.device)
    # M = (I + C1 J2)^{-1};  (I + J2 C1)^{-1} = Mᵀ because C1 and J2 are symmetric.
    IpCJ = eye + C1 @ J2
    A2M = torch.linalg.solve(IpCJ.transpose(-1, -2), A2.transpose(-1, -2)).transpose(-1, -2)
    A = A2M @ A1
    b = _mv(A2M, b1 + _mv(C1, e2)) + b2
    C = _sym(A2M @ C1 @ A2.transpose(-1, -2) + C2)
    A1T_Minv = torch.linalg.solve(IpCJ, A1).transpose(-1, -2)  # A1ᵀ (I + J2 C1)^{-1}
    e = _mv(A1T_Minv, e2 - _mv(J2, b1)) + e1
    J = _sym(A1T_Minv @ J2 @ A1 + J1)
    return A, b, C, e, J


def parallel_filter(prep):
    """Filtered and predicted moments ``(filt_means, filt_covs, pred_means, pred_covs)`` of a
    prepared problem (missing entries masked into C and R), by the associative scan."""
    Fm, b, Cov, eta, J = _filter_elements(prep)
    _, filt_means, filt_covs, _, _ = associative_scan(
        _filter_combine, (Fm, b, Cov, eta, J), (-3, -2, -3, -2, -3)
    )
    # Predicted moments from the filtered ones, vectorized over time.
    A_next = prep.A[..., 1:, :, :] if prep.tv["A"] else prep.A.unsqueeze(-3)
    Q_next = prep.Q[..., 1:, :, :] if prep.tv["Q"] else prep.Q.unsqueeze(-3)
    pm = _mv(A_next, filt_means[..., :-1, :])
    if prep.b is not None:
        pm = pm + prep.b[..., 1:, :]
    pc = _sym(A_next @ filt_covs[..., :-1, :, :] @ A_next.transpose(-1, -2) + Q_next)
    m0 = prep.init_mean.expand(filt_means.shape[:-2] + prep.init_mean.shape[-1:])
    P0 = prep.init_cov.expand(filt_covs.shape[:-3] + prep.init_cov.shape[-2:])
    pred_means = torch.cat([m0.unsqueeze(-2), pm], -2)
    pred_covs = torch.cat([P0.unsqueeze(-3), pc], -3)
    return filt_means, filt_covs, pred_means, pred_covs
