"""The filtering encoder: q(z_{1:T} | x) = prod_t q(z_t | x_{<=t})."""

from __future__ import annotations

from typing import NamedTuple

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn

from pyrossm.distributions import DiagonalGaussianSequence
from pyrossm.guides.combiners import ScaleHead
from pyrossm.guides.encoders import RecurrentEncoder

__all__ = ["FilteringLSTMGuide", "PosteriorStats"]


class PosteriorStats(NamedTuple):
    """Per-step marginal moments of ``q``: ``means``, ``scales`` (std devs), ``(batch, T, D)``."""

    means: torch.Tensor
    scales: torch.Tensor


class FilteringLSTMGuide(PyroModule):
    r"""Filtering guide (the seed's LSTM encoder; Krishnan et al.'s ST-L without the z-link).

    .. math::
        q(z_{1:T} \mid x) = \prod_t \mathcal N\big(z_t;\ \mu(h_t),\ \sigma^2(h_t)\big),
        \qquad h_t = \mathrm{RNN}(x_t, h_{t-1}),

    a diagonal covariance, linear heads :math:`\mu` and
    :math:`\sigma = \mathrm{softplus}(\cdot) + \text{floor}`, a learned initial state, and
    missing entries (``NaN``) zero-filled plus a missing-indicator input. Since each
    :math:`q(z_t \mid x_{\le t})` sees only the past, it cannot represent a smoothing posterior;
    for an LGSSM its means approach the Kalman *filtered* means.

    Args:
        obs_dim, state_dim: sizes of ``x_t`` and ``z_t``.
        hidden_dim, num_layers, cell: the recurrent encoder (``"lstm"``, ``"gru"``, ``"rnn"``,
            ``"linear"``), see :class:`~pyrossm.guides.encoders.RecurrentEncoder`.
        scale_floor: lower bound added to every scale.
        name: the Pyro name prefix of the parameters.

    ``guide(x, mask=None)``: ``x (batch, T, obs_dim)`` (time at dim -2, NaN = missing),
    ``mask (batch, T)`` bool right padding. Samples the site ``"z"`` (batch_shape ``(batch,)``,
    event_shape ``(T, state_dim)``) inside ``pyro.plate("sequences", batch, dim=-1)``.

    >>> guide = FilteringLSTMGuide(obs_dim=2, state_dim=3, hidden_dim=8)
    >>> guide(torch.randn(4, 10, 2)).shape
    torch.Size([4, 10, 3])
    >>> guide.posterior_stats(torch.randn(4, 10, 2)).means.shape
    torch.Size([4, 10, 3])
    """

    def __init__(
        self,
        obs_dim,
        state_dim,
        hidden_dim=64,
        num_layers=1,
        cell="lstm",
        scale_floor=1e-4,
        missing_indicators=True,
        name="filtering_guide",
    ):
        super().__init__(name)
        if not isinstance(state_dim, int) or state_dim < 1:
            raise ValueError(f"state_dim: expected a positive int, got {state_dim!r}")
        self.obs_dim, self.state_dim = obs_dim, state_dim
        self.encoder = RecurrentEncoder(
            obs_dim,
            hidden_dim,
            num_layers,
            cell,
            reverse=False,
            missing_indicators=missing_indicators,
        )
        self.hidden_to_loc = nn.Linear(hidden_dim, state_dim)
        self.hidden_to_scale = ScaleHead(hidden_dim, state_dim, "diag", scale_floor)

    def distribution(self, x, mask=None) -> DiagonalGaussianSequence:
        """``q(z_{1:T} | x)`` as a :class:`~pyrossm.distributions.DiagonalGaussianSequence`."""
        h = self.encoder(x, mask)
        return DiagonalGaussianSequence(self.hidden_to_loc(h), self.hidden_to_scale(h), mask)

    def forward(self, x, mask=None):
        q = self.distribution(x, mask)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            return pyro.sample("z", q)

    @torch.no_grad()
    def posterior_stats(self, x, mask=None) -> PosteriorStats:
        """Means and scales of ``q(z_t | x_{<=t})``, each ``(batch, T, state_dim)`` (exact)."""
        q = self.distribution(x, mask)
        return PosteriorStats(q.loc, q.scale)
