r"""Gaussian message passing for conjugate (structured) recognition: pure torch functions.

A *Gaussian potential* on a step's state is :math:`\phi_t(z_t) = \exp(-\tfrac12 z_t^\top J_t
z_t + z_t^\top h_t)` (information form: precision ``J``, shift ``h``). Combined with a
linear-Gaussian chain

.. math::
    z_1 \sim N(m_0, P_0), \qquad z_t \mid z_{t-1} \sim N(A z_{t-1}, Q),

the density :math:`q(z_{1:T}) \propto p(z_{1:T}) \prod_t \phi_t(z_t)` is Gaussian and Markov, and
its forward conditionals are linear-Gaussian,

.. math::
    q(z_t \mid z_{t-1}) = N(F_t z_{t-1} + b_t,\ S_t S_t^\top),

obtained by one backward information filter (:func:`backward_information_filter`) and one
all-steps computation (:func:`forward_conditionals`). This is the structured recognition of
Johnson et al. (2016), *Composing graphical models with neural networks for structured
representations and fast inference* (NeurIPS), and of the Kalman VAE (Fraccaro et al. 2017).

Shapes: sequences have time at dim -2 (``h (batch, T, D)``) and precisions time at dim -3
(``J (batch_J, T, D, D)`` with ``batch_J`` 1 or ``batch``: a precision that does not depend on
the data -- no missing entry, linear potentials -- is computed and filtered once for the batch).
Numerics: no inverse of ``Q``, ``P_0`` or ``J`` is formed (``J`` is usually singular: rank at
most ``obs_dim``); every solve is against ``I + L^\top J L`` (eigenvalues >= 1), so the same
code works in float32.

>>> D, T = 2, 5
>>> A, L = 0.9 * torch.eye(D), torch.eye(D)
>>> J, h = torch.eye(D).expand(1, T, D, D), torch.randn(3, T, D)
>>> Jb, hb = backward_information_filter(J, h, A, L)
>>> c = forward_conditionals(Jb, hb, A, L, torch.zeros(D), torch.eye(D))
>>> c.F.shape, c.b.shape, c.S.shape
(torch.Size([1, 5, 2, 2]), torch.Size([3, 5, 2]), torch.Size([1, 5, 2, 2]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyrossm._gaussian import mv as _mv
from pyrossm._gaussian import sym as _sym

__all__ = [
    "Conditionals",
    "backward_information_filter",
    "forward_conditionals",
    "observation_potentials",
]


def _eye_like(M):
    return torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)


def observation_potentials(y, observed, loading, noise_tril=None, precision=None):
    r"""Potentials of pseudo-observations :math:`y_t = C z_t + \text{noise}`, missing entries out.

    For the observed entries :math:`O_t` of step ``t``:
    :math:`J_t = C_O^\top R_{OO}^{-1} C_O`, :math:`h_t = C_O^\top R_{OO}^{-1} y_{O}` -- exactly
    the likelihood :math:`p(y_{O} \mid z_t)` of the observed entries under
    :math:`N(C z_t, R)` (a missing entry has precision exactly zero; with a correlated ``R`` the
    remaining entries' precision is the inverse of the *sub*-matrix :math:`R_{OO}`).

    Args:
        y: ``(batch, T, m)`` pseudo-observations (values at unobserved entries are ignored).
        observed: ``(batch, T, m)`` bool, or None (all observed).
        loading: ``C (m, D)``.
        noise_tril: Cholesky factor of a full noise covariance ``R (m, m)``; or
        precision: per-entry precisions ``(batch, T, m)`` or ``(m,)`` (diagonal noise).

    Returns ``(J, h)``: ``J (batch_J, T, D, D)`` (``batch_J = 1`` when it does not depend on the
    data), ``h (batch, T, D)``.
    """
    C = loading
    if (noise_tril is None) == (precision is None):
        raise ValueError("noise_tril, precision: expected exactly one of them")
    if observed is not None:
        y = torch.where(observed, y, y.new_zeros(()))
    if precision is not None:
        lam = precision if observed is None else precision * observed.to(y.dtype)
        if lam.dim() == 1:
            lam = lam.reshape(1, 1, -1)
        J = torch.einsum("mi,...m,mj->...ij", C, lam, C)
        h = (lam * y) @ C
        if J.dim() == 4 and J.shape[0] == 1 and J.shape[1] == 1:
            J = J.expand(1, y.shape[1], -1, -1)
        return J, h
    if observed is None:  # one precision for every step
        W = torch.linalg.solve_triangular(noise_tril, C, upper=False)  # R^{-1/2} C
        J = (W.T @ W).expand(1, y.shape[1], C.shape[1], C.shape[1])
        u = torch.linalg.solve_triangular(noise_tril, y.unsqueeze(-1), upper=False)
        h = (W.T @ u).squeeze(-1)
        return J, h
    # One precision per missing pattern (at most 2^m of them, usually a handful):
    # R~ = o o^T * R + diag(1 - o) is block diagonal (R_OO, I) after a permutation, so
    # diag(o) R~^{-1} diag(o) embeds R_OO^{-1} with zeros at the missing entries.
    flat = observed.reshape(-1, y.shape[-1])
    if flat.shape[-1] <= 40:  # encode each pattern as an integer: a fast 1-D unique
        bits = 2 ** torch.arange(flat.shape[-1], device=flat.device)
        codes, which = torch.unique((flat.long() * bits).sum(-1), return_inverse=True)
        o = ((codes.unsqueeze(-1) & bits) > 0).to(y.dtype)
    else:
        o, which = flat.to(y.dtype), torch.arange(flat.shape[0], device=flat.device)
    R = noise_tril @ noise_tril.T
    R_t = o.unsqueeze(-1) * R * o.unsqueeze(-2) + torch.diag_embed(1.0 - o)
    P = o.unsqueeze(-1) * torch.linalg.inv_ex(R_t)[0] * o.unsqueeze(-2)  # (patterns, m, m)
    PC = P @ C
    J = (C.T @ PC)[which].reshape(y.shape[:2] + (C.shape[1], C.shape[1]))
    h = (y.unsqueeze(-2) @ PC[which].reshape(y.shape[:2] + PC.shape[-2:])).squeeze(-2)
    return J, h


def backward_information_filter(J, h, A, Q_tril):
    r"""Backward messages :math:`\hat\phi_t(z_t) \propto \phi_t(z_t)\, p(\phi_{t+1:T} \mid z_t)`,
    in the coordinates whitened by the transition noise (``L = Q_tril``, :math:`Q = L L^\top`).

    With :math:`\hat J_t, \hat h_t` the information form of :math:`\hat\phi_t`, the recursion
    runs on :math:`M_t = I + L^\top \hat J_t L` and :math:`k_t = L^\top \hat h_t`:

    .. math::
        M_T = I + L^\top J_T L,\quad k_T = L^\top h_T;\qquad
        M_t = I + L^\top J_t L + \tilde A^\top (I - M_{t+1}^{-1}) \tilde A,\quad
        k_t = L^\top h_t + \tilde A^\top M_{t+1}^{-1} k_{t+1},

    :math:`\tilde A = L^{-1} A L` (integrating a message through the transition is
    :math:`L^\top \tilde J L = I - M^{-1}`, :math:`L^\top \tilde h = M^{-1} k`). Every inverse
    is of a matrix with eigenvalues >= 1; no inverse of ``Q`` or ``J`` is formed. Three small
    batched operations per step.

    ``J (batch_J, T, D, D)``, ``h (batch, T, D)``, ``A (D, D)``, ``Q_tril (D, D)`` →
    ``(M (batch_J, T, D, D), k (batch, T, D))``.
    """
    T = h.shape[-2]
    eye = _eye_like(A)
    L = Q_tril
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    A_w = L_inv @ A @ L
    M_obs = eye + L.T @ J @ L  # (bj, T, D, D)
    k_obs = h @ L  # rows: (L^T h_t)^T
    base = (M_obs + A_w.T @ A_w).unbind(1)  # unbind once: per-step indexing of a stacked
    k_obs = k_obs.unbind(1)  # tensor would cost a full-size gradient buffer per step
    Ms, Ns = [M_obs[:, T - 1]], []
    for t in range(T - 2, -1, -1):
        N = A_w.T @ torch.linalg.inv_ex(Ms[-1])[0]  # A~^T M_{t+1}^{-1}
        Ns.append(N)
        Ms.append(base[t] - N @ A_w)
    ks = [k_obs[T - 1]]
    for i, t in enumerate(range(T - 2, -1, -1)):
        ks.append(k_obs[t] + _mv(Ns[i], ks[-1]))
    return _sym(torch.stack(Ms[::-1], dim=1)), torch.stack(ks[::-1], dim=1)


class Conditionals(NamedTuple):
    r"""Forward conditionals :math:`q(z_t \mid z_{t-1}) = N(F_t z_{t-1} + b_t, S_t S_t^\top)`.

    ``F (batch_J, T, D, D)`` (``F_1 = 0``), ``b (batch, T, D)``, ``S (batch_J, T, D, D)``
    lower triangular, and ``log_det_S`` :math:`= \log\det S_t` ``(batch_J, T)``.
    """

    F: torch.Tensor
    b: torch.Tensor
    S: torch.Tensor
    log_det_S: torch.Tensor


def forward_conditionals(M, k, A, Q_tril, init_mean, init_tril) -> Conditionals:
    r"""The conditionals of :math:`q \propto p \prod_t \phi_t` from the backward messages.

    ``(M, k)`` from :func:`backward_information_filter`. For :math:`t > 1`:

    .. math::
        q(z_t \mid z_{t-1}) = N\big(L M_t^{-1}(L^{-1} A z_{t-1} + k_t),\ L M_t^{-1} L^\top\big),
        \qquad S_t = L V_t,\quad V_t V_t^\top = M_t^{-1};

    the first step uses the prior :math:`N(m_0, P_0)` (``L_0 = init_tril``) with the message
    re-whitened by :math:`G = L^{-1} L_0`: :math:`M_1' = I + G^\top (M_1 - I) G`,
    :math:`k_1' = G^\top k_1`, mean :math:`m_0 + L_0 M_1'^{-1}(k_1' - (M_1' - I) L_0^{-1} m_0)`.
    All steps at once (batched over time); see :class:`Conditionals` for the shapes.
    """
    bj, T, D = M.shape[0], M.shape[1], M.shape[-1]
    eye = _eye_like(A)
    L, L0 = Q_tril, init_tril
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    L0_inv = torch.linalg.solve_triangular(L0, eye, upper=False)
    # step 1: the message re-whitened for the prior N(m0, L0 L0^T)
    G = L_inv @ L0
    K1 = G.T @ (M[:, :1] - eye) @ G  # L0^T J^_1 L0, (bj, 1, D, D)
    M_all = torch.cat([eye + K1, M[:, 1:]], dim=1)
    k_all = torch.cat([_mv(G.T, k[:, :1]) - _mv(K1, _mv(L0_inv, init_mean)), k[:, 1:]], dim=1)
    # Batched over all steps: M^{-1} (an inverse of a matrix with eigenvalues >= 1) and its
    # Cholesky factor V, so that Sigma = L M^{-1} L^T = (L V)(L V)^T: S = L V is triangular.
    M_inv = _sym(torch.linalg.inv_ex(M_all)[0])
    V = torch.linalg.cholesky_ex(M_inv)[0]
    scale = torch.cat([L0.expand(1, D, D), L.expand(T - 1, D, D)], dim=0)  # (T, D, D)
    S = scale @ V
    F = L @ M_inv[:, 1:] @ (L_inv @ A)
    F = torch.cat([F.new_zeros(bj, 1, D, D), F], dim=1)
    b = _mv(S, _mv(V.transpose(-1, -2), k_all))  # L M^{-1} k
    b = torch.cat([b[:, :1] + init_mean, b[:, 1:]], dim=1)
    log_det = (torch.diagonal(scale, dim1=-2, dim2=-1).log().sum(-1)
               + torch.diagonal(V, dim1=-2, dim2=-1).log().sum(-1))
    return Conditionals(F, b, S, log_det)
