"""Conditional Gaussian heads: ``(z_{t-1}, h_t) -> (loc, scale)`` for the structured guides.

Every module here works on any leading shape (``z_prev (..., D)``, ``h (..., H)``), so the same
call serves sequential sampling (one step, ``(batch, D)``) and the vectorized ``log_prob``
(all steps at once, ``(batch, T, D)``). Scales are ``softplus(.) + floor``; a ``"tril"``
scale is a lower-triangular Cholesky factor (positive diagonal) for full covariances.
``prepare(h)`` computes the ``z``-independent part for all steps at once and
``step(z_prev, ctx_t)`` finishes one step, so that sequential sampling is cheap (see
:class:`~pyrossm.distributions.AutoregressiveGaussianSequence`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LinearCombiner", "NonlinearCombiner", "ScaleHead", "SCALES"]

SCALES = ("diag", "tril")


class ScaleHead(nn.Module):
    """``features (..., H)`` → diagonal scale ``(..., D)`` or Cholesky factor ``(..., D, D)``.

    >>> ScaleHead(4, 3, "tril")(torch.randn(5, 4)).shape
    torch.Size([5, 3, 3])
    """

    def __init__(self, in_dim: int, state_dim: int, scale: str = "diag", floor: float = 1e-4):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
        if not floor >= 0:
            raise ValueError(f"scale_floor: expected a non-negative float, got {floor!r}")
        self.state_dim, self.kind, self.floor = state_dim, scale, float(floor)
        self.diag = nn.Linear(in_dim, state_dim)
        if scale == "tril":
            self.offdiag = nn.Linear(in_dim, state_dim * (state_dim - 1) // 2)
            nn.init.zeros_(self.offdiag.weight)
            nn.init.zeros_(self.offdiag.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        diag = F.softplus(self.diag(features)) + self.floor
        if self.kind == "diag":
            return diag
        D = self.state_dim
        rows, cols = torch.tril_indices(D, D, offset=-1, device=features.device)
        flat = diag.new_zeros(diag.shape[:-1] + (D * D,))
        flat[..., rows * D + cols] = self.offdiag(features)
        return flat.reshape(diag.shape[:-1] + (D, D)) + torch.diag_embed(diag)


class NonlinearCombiner(nn.Module):
    r"""The combiner of Krishnan et al. (2017) / Pyro's DMM, for one or more feature streams.

    .. math::
        \tilde h_t = \frac{1}{K+1}\Big(\tanh(W z_{t-1} + b) + \sum_{k=1}^K h^{(k)}_t\Big),\quad
        \mu_t = W_\mu \tilde h_t + b_\mu,\quad
        \sigma_t = \mathrm{softplus}(W_\sigma \tilde h_t + b_\sigma) + \text{floor}

    ``h`` is the concatenation of ``K = num_streams`` feature streams of size ``hidden_dim``
    (forward and/or backward RNN). ``z0`` is the learned initial state ``z_0``.
    """

    def __init__(self, state_dim, hidden_dim, num_streams=1, scale="diag", scale_floor=1e-4):
        super().__init__()
        self.hidden_dim, self.num_streams = hidden_dim, num_streams
        self.z_to_hidden = nn.Linear(state_dim, hidden_dim)
        self.hidden_to_loc = nn.Linear(hidden_dim, state_dim)
        self.hidden_to_scale = ScaleHead(hidden_dim, state_dim, scale, scale_floor)
        self.z0 = nn.Parameter(torch.zeros(state_dim))

    def prepare(self, h):
        """The ``z_{t-1}``-independent part, for all steps at once: ``(sum_k h^(k),)``."""
        return (h.unflatten(-1, (self.num_streams, self.hidden_dim)).sum(-2),)

    def step(self, z_prev, ctx):
        (h_sum,) = ctx
        combined = (torch.tanh(self.z_to_hidden(z_prev)) + h_sum) / (self.num_streams + 1)
        return self.hidden_to_loc(combined), self.hidden_to_scale(combined)

    def forward(self, z_prev, h):
        return self.step(z_prev, self.prepare(h))


class LinearCombiner(nn.Module):
    r"""Linear-Gaussian conditional: :math:`\mu_t = F z_{t-1} + G h_t + b`, scale from :math:`h_t`.

    With ``scale="tril"`` the scale is a full Cholesky factor :math:`L(h_t)`, so
    :math:`q(z_t \mid z_{t-1}, h_t) = \mathcal N(F z_{t-1} + G h_t + b,\ L(h_t) L(h_t)^\top)`
    can equal the exact LGSSM smoothing conditional (see :class:`~pyrossm.guides.StructuredGuide`).
    With ``first_step=True`` (default) the first step has its own heads,
    :math:`q(z_1 \mid h_1) = \mathcal N(G_1 h_1 + b_1, L_1(h_1) L_1(h_1)^\top)`, because the exact
    :math:`p(z_1 \mid x)` combines the initial prior :math:`N(m_0, P_0)`, not the transition. ``z0``
    is the learned :math:`z_0` (with ``first_step=True`` it only shifts :math:`b_1`).

    ``forward(z_prev, h)`` takes whole sequences, ``(..., T, D)`` and ``(..., T, H)`` (time at
    dim -2), since step 1 is special; ``step(z_prev, ctx_t)`` takes one step.
    """

    def __init__(self, state_dim, feature_dim, scale="tril", scale_floor=1e-4, first_step=True):
        super().__init__()
        self.transition = nn.Linear(state_dim, state_dim, bias=False)
        self.features_to_loc = nn.Linear(feature_dim, state_dim)
        self.features_to_scale = ScaleHead(feature_dim, state_dim, scale, scale_floor)
        self.first_step = first_step
        if first_step:
            self.first_to_loc = nn.Linear(feature_dim, state_dim)
            self.first_to_scale = ScaleHead(feature_dim, state_dim, scale, scale_floor)
        self.z0 = nn.Parameter(torch.zeros(state_dim))

    def prepare(self, h):
        """The part that does not depend on ``z_{t-1}``, all steps: ``(G h_t + b, L(h_t))``.

        ``h (..., T, H)`` → offsets ``(..., T, D)``, scales ``(..., T, D)`` or ``(..., T, D, D)``.
        """
        offset, scale = self.features_to_loc(h), self.features_to_scale(h)
        if self.first_step and h.shape[-2] > 0:
            h1 = h[..., :1, :]
            offset = torch.cat([self.first_to_loc(h1), offset[..., 1:, :]], dim=-2)
            time_dim = offset.dim() - 2
            scale = torch.cat(
                [self.first_to_scale(h1), scale.narrow(time_dim, 1, h.shape[-2] - 1)], dim=time_dim
            )
        return offset, scale

    def step(self, z_prev, ctx):
        offset, scale = ctx
        return self.transition(z_prev) + offset, scale

    def forward(self, z_prev, h):
        return self.step(z_prev, self.prepare(h))
