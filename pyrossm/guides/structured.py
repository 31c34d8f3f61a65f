"""Structured guides q(z_t | z_{t-1}, h_t) (Krishnan et al. 2017: DKS, ST-L, ST-LR)."""

from __future__ import annotations

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn

from pyrossm.distributions import AutoregressiveGaussianSequence
from pyrossm.guides.combiners import LinearCombiner, NonlinearCombiner
from pyrossm.guides.encoders import RecurrentEncoder
from pyrossm.guides.filtering import PosteriorStats

__all__ = ["StructuredGuide", "DIRECTIONS", "COMBINERS"]

DIRECTIONS = ("forward", "backward", "bidirectional")
COMBINERS = ("nonlinear", "linear")


class StructuredGuide(PyroModule):
    r"""Structured guide :math:`q(z_{1:T} \mid x) = \prod_t q(z_t \mid z_{t-1}, h_t)`.

    .. math::
        q(z_t \mid z_{t-1}, h_t) = \mathcal N\big(\mu(z_{t-1}, h_t),\ \Sigma(z_{t-1}, h_t)\big),
        \qquad z_0 \text{ learned},

    where :math:`h_t` comes from RNNs over the observations (Krishnan, Shalit & Sontag 2017,
    *Structured Inference Networks for Nonlinear State Space Models*):

    * ``direction="backward"`` (DKS): :math:`h_t` summarises :math:`x_{t:T}`, the conditioning
      set of the exact posterior of a Markov model,
      :math:`p(z_t \mid z_{t-1}, x_{1:T}) = p(z_t \mid z_{t-1}, x_{t:T})`;
    * ``"forward"`` (ST-L): :math:`h_t` summarises :math:`x_{1:t}`;
    * ``"bidirectional"`` (ST-LR): both streams.

    Combiners (:mod:`pyrossm.guides.combiners`):

    * ``"nonlinear"``: :math:`\tilde h_t = (\tanh(W z_{t-1}+b) + \sum_k h^{(k)}_t)/(K+1)`, then
      linear heads for loc and (softplus) scale, as in Pyro's DMM;
    * ``"linear"``: :math:`\mu_t = F z_{t-1} + G h_t + b` and a scale :math:`L(h_t)`, diagonal or a
      full Cholesky factor (``scale="tril"``).

    **What is exactly representable (LGSSM).** For :math:`z_t = A z_{t-1} + B\varepsilon_t`,
    :math:`x_t = C z_t + D\psi_t`, the backward information filter gives
    :math:`p(x_{t:T} \mid z_t) \propto \exp(-\tfrac12 z^\top J_t z + z^\top \eta_t)` with
    :math:`J_t` independent of the data and :math:`\eta_t = C^\top R^{-1} x_t + M_t \eta_{t+1}`
    linear in :math:`x_{t:T}`; hence :math:`p(z_t \mid z_{t-1}, x_{t:T}) =
    \mathcal N(\Lambda_t^{-1}(Q^{-1}A z_{t-1} + \eta_t), \Lambda_t^{-1})`,
    :math:`\Lambda_t = Q^{-1} + J_t`: a mean linear in :math:`z_{t-1}` and in a backward
    summary of the data, and a full (generally non-diagonal) covariance. Away from the end of
    the sequence :math:`J_t, M_t` are at their steady state (the Riccati recursion converges
    geometrically), and there ``direction="backward", combiner="linear", scale="tril"`` with
    ``cell="linear"`` (:math:`h_t` a linear backward recursion of size :math:`\ge`
    ``state_dim``) contains the exact conditional. The first step, whose prior is
    :math:`N(m_0, P_0)` rather than :math:`N(A z_0, Q)`, has its own heads
    (``first_step=True``) and is exact too. Over the last few steps :math:`\Lambda_t` varies:
    the scale can follow (the learned initial state of the backward RNN marks the end of the
    sequence) but the constant :math:`F` cannot, which costs a small ``T``-independent KL,
    :math:`O(1/T)` nats per step (about 0.12 nats per sequence for the system of
    ``tests/infer/test_lgssm_svi.py``, found by minimising the exact KL). A diagonal scale
    cannot represent correlated posterior components; a nonlinear cell (LSTM) approximates
    :math:`\eta_t`.

    Args:
        obs_dim, state_dim: sizes of ``x_t`` and ``z_t``.
        hidden_dim: size of each RNN's ``h_t`` (and of the nonlinear combiner's hidden layer).
        direction, combiner: see above.
        cell: ``"lstm"``, ``"gru"``, ``"rnn"`` or ``"linear"``; ``num_layers``: stacked layers.
        scale: ``"diag"`` or ``"tril"``; default ``"tril"`` for the linear combiner, ``"diag"``
            for the nonlinear one.
        scale_floor: lower bound added to the (diagonal of the) scale.
        first_step: linear combiner only: separate heads for ``q(z_1 | h_1)`` (see
            :class:`~pyrossm.guides.combiners.LinearCombiner`).
        name: the Pyro name prefix of the parameters.

    ``guide(x, mask=None)``: ``x (batch, T, obs_dim)`` (time at dim -2, NaN = missing), ``mask
    (batch, T)`` bool right padding. Samples the one site ``"z"`` (batch_shape ``(batch,)``,
    event_shape ``(T, state_dim)``) in ``pyro.plate("sequences", batch, dim=-1)``; with
    ``per_step=True`` it samples the same ``q`` as sites ``"z_1" ... "z_T"`` under
    ``pyro.markov`` instead (the reference formulation of Pyro's DMM tutorial).

    >>> guide = StructuredGuide(obs_dim=2, state_dim=3, hidden_dim=8, direction="backward")
    >>> guide(torch.randn(4, 10, 2)).shape
    torch.Size([4, 10, 3])
    """

    def __init__(
        self,
        obs_dim,
        state_dim,
        hidden_dim=64,
        direction="backward",
        combiner="nonlinear",
        cell="lstm",
        num_layers=1,
        scale=None,
        scale_floor=1e-4,
        first_step=True,
        missing_indicators=True,
        name="structured_guide",
    ):
        super().__init__(name)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
        if combiner not in COMBINERS:
            raise ValueError(f"combiner: expected one of {COMBINERS}, got {combiner!r}")
        if not isinstance(state_dim, int) or state_dim < 1:
            raise ValueError(f"state_dim: expected a positive int, got {state_dim!r}")
        self.obs_dim, self.state_dim, self.direction = obs_dim, state_dim, direction
        reverses = {"forward": [False], "backward": [True], "bidirectional": [False, True]}[
            direction
        ]
        self.encoders = nn.ModuleList(
            RecurrentEncoder(
                obs_dim,
                hidden_dim,
                num_layers,
                cell,
                reverse=r,
                missing_indicators=missing_indicators,
            )
            for r in reverses
        )
        if combiner == "linear":
            self.combiner = LinearCombiner(
                state_dim, hidden_dim * len(reverses), scale or "tril", scale_floor, first_step
            )
        else:
            self.combiner = NonlinearCombiner(
                state_dim, hidden_dim, len(reverses), scale or "diag", scale_floor
            )
        self.combiner_kind = combiner
        self.scale_tril = (scale or ("tril" if combiner == "linear" else "diag")) == "tril"

    def features(self, x, mask=None) -> torch.Tensor:
        """``h (batch, T, K * hidden_dim)``: the encoder streams concatenated (forward first)."""
        return torch.cat([enc(x, mask) for enc in self.encoders], dim=-1)

    def distribution(self, x, mask=None) -> AutoregressiveGaussianSequence:
        """``q(z_{1:T} | x)``, an :class:`~pyrossm.distributions.AutoregressiveGaussianSequence`."""
        combiner = self.combiner
        return AutoregressiveGaussianSequence(
            combiner, self.features(x, mask), combiner.z0, mask, scale_tril=self.scale_tril
        )

    def forward(self, x, mask=None, per_step=False):
        if not per_step:
            q = self.distribution(x, mask)
            with pyro.plate("sequences", x.shape[0], dim=-1):
                return pyro.sample("z", q)
        return self._per_step(x, mask)

    def _per_step(self, x, mask):
        combiner, h = self.combiner, self.features(x, mask)
        batch, T = x.shape[:2]
        ctx = combiner.prepare(h)  # every tensor (batch, T, ...)
        z = combiner.z0.expand(batch, self.state_dim)
        zs = []
        with pyro.plate("sequences", batch, dim=-1):
            for t in pyro.markov(range(T)):
                loc, scale = combiner.step(z, tuple(c[:, t] for c in ctx))
                q_t = AutoregressiveGaussianSequence.conditional(loc, scale, self.scale_tril)
                if mask is not None:
                    q_t = q_t.mask(mask[:, t])
                z = pyro.sample(f"z_{t + 1}", q_t)
                zs.append(z)
        return torch.stack(zs, dim=-2)

    @torch.no_grad()
    def posterior_stats(self, x, mask=None, num_samples=256) -> PosteriorStats:
        """Marginal means and scales of ``q(z_t | x)``, each ``(batch, T, state_dim)``.

        Exact for the linear combiner (:math:`m_t = F m_{t-1} + G h_t + b`,
        :math:`P_t = F P_{t-1} F^\\top + L_t L_t^\\top`); a Monte Carlo estimate from
        ``num_samples`` trajectories for the nonlinear one.
        """
        q = self.distribution(x, mask)
        if self.combiner_kind != "linear":
            z = q.sample((num_samples,))
            return PosteriorStats(z.mean(0), z.std(0))
        h = q.features
        loc_h, scale_h = self.combiner.prepare(h)
        Fm = self.combiner.transition.weight
        if not self.scale_tril:
            scale_h = torch.diag_embed(scale_h)
        m = self.combiner.z0.expand(h.shape[0], self.state_dim)
        P = m.new_zeros(h.shape[0], self.state_dim, self.state_dim)
        means, scales = [], []
        for t in range(h.shape[1]):
            m = m @ Fm.T + loc_h[:, t]
            P = Fm @ P @ Fm.T + scale_h[:, t] @ scale_h[:, t].transpose(-1, -2)
            means.append(m)
            scales.append(torch.diagonal(P, dim1=-2, dim2=-1).sqrt())
        return PosteriorStats(torch.stack(means, -2), torch.stack(scales, -2))
