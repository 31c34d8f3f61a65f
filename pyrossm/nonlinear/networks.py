"""Neural building blocks of the nonlinear state-space models.

* Emission networks ``p(x_t | z_t)``: :class:`GaussianEmission`, :class:`BernoulliEmission`,
  :class:`CategoricalEmission`. Each maps ``z`` of shape ``(..., z_dim)`` to a *pointwise*
  distribution (one factor per observed entry), so that the model can mask single entries
  (``NaN`` = missing) as well as whole padded steps.
* Latent dynamics ("priors" over the trajectory ``z_{1:T}``), both exposing the same small
  interface used by :class:`~pyrossm.nonlinear.distributions.TrajectoryPrior`:

  - :class:`GatedTransition` + :class:`MarkovPrior`: the deep Markov model's
    ``p(z_t | z_{t-1})`` (Krishnan, Shalit & Sontag 2017, "Structured Inference Networks for
    Nonlinear State Space Models", AAAI);
  - :class:`LSTMPrior`: ``z_t ~ N(μ(h_t), σ²(h_t))`` with
    ``[h_t, c_t] = LSTM(z_{t-1}, h_{t-1}, c_{t-1})``,
    so ``p(z_t | z_{<t})`` depends on the whole past.

  The interface: ``trajectory_params(z) -> (loc, scale)`` of every ``p(z_t | z_{<t})`` given a
  trajectory ``z`` of shape ``(batch, time, z_dim)`` (time at dim -2) in one vectorized call;
  ``initial_state(batch, like)``, ``predict(state) -> (loc, scale)``, ``update(state, z_t)`` for
  sequential sampling; ``state_after(z, lengths)`` for continuing a trajectory (forecasting).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro import distributions as dist
from torch.nn.utils.rnn import pack_padded_sequence

__all__ = [
    "PARAMETERIZATIONS",
    "BernoulliEmission",
    "CategoricalEmission",
    "GatedTransition",
    "GaussianEmission",
    "LSTMPrior",
    "MarkovPrior",
    "make_emission",
]

MIN_SCALE = 1e-3  # floor added to every softplus scale


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Two hidden ReLU layers, as in the DMM emitter."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, out_dim),
    )


# --------------------------------------------------------------------------------------------
# Emissions p(x_t | z_t)
# --------------------------------------------------------------------------------------------
class _VectorEmission(nn.Module):
    """Emissions with one factor per entry of ``x`` (batch, time, obs_dim); NaN = missing."""

    def observed(self, x: torch.Tensor, mask: torch.Tensor):
        """``(value, observed)``: NaN entries of ``x`` are not observed (and replaced by 0)."""
        if x.dim() != 3 or x.size(-1) != self.obs_dim:
            raise ValueError(
                f"x: expected shape (batch, time, obs_dim={self.obs_dim}), got {tuple(x.shape)}"
            )
        observed = mask.unsqueeze(-1) & ~torch.isnan(x)
        return torch.where(observed, x, torch.zeros_like(x)), observed


class GaussianEmission(_VectorEmission):
    """``x_t = μ^x(z_t) + σ^x(z_t) ψ_t``, ψ_t ~ N(0, I): mean and scale networks.

    ``forward(z)`` with ``z`` of shape ``(..., z_dim)`` returns ``Normal`` with batch shape
    ``(..., obs_dim)``; :meth:`mean` returns ``μ^x(z)``.
    """

    def __init__(self, z_dim: int, obs_dim: int, hidden_dim: int = 100):
        super().__init__()
        self.obs_dim = obs_dim
        self.loc_net = _mlp(z_dim, hidden_dim, obs_dim)
        self.scale_net = _mlp(z_dim, hidden_dim, obs_dim)

    def forward(self, z: torch.Tensor) -> dist.Normal:
        scale = F.softplus(self.scale_net(z)) + MIN_SCALE
        return dist.Normal(self.loc_net(z), scale)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return self.loc_net(z)


PARAMETERIZATIONS = ("logits", "probs")


class BernoulliEmission(_VectorEmission):
    """``x_{t,d} ~ Bernoulli(sigmoid(f(z_t))_d)`` (binary vectors, e.g. 88-key piano rolls).

    ``f`` is the DMM emitter: two hidden ReLU layers of width ``hidden_dim``. ``forward(z)`` returns
    ``Bernoulli`` with batch shape ``(..., obs_dim)``; :meth:`mean` the probabilities.

    ``parameterization="logits"`` (default) scores ``x`` from the logits ``f(z)`` (exact for any
    logit); ``"probs"`` builds ``Bernoulli(probs=sigmoid(f(z)))`` as Pyro's DMM example does,
    where torch clamps the probabilities to ``[eps, 1 - eps]`` (float32: ``eps ≈ 1.2e-7``), so a
    logit beyond about ±16 gets no gradient. The attribute may be changed after construction.

    >>> e = BernoulliEmission(2, 3, 4, parameterization="probs")
    >>> e(torch.zeros(5, 2)).batch_shape
    torch.Size([5, 3])
    """

    def __init__(self, z_dim: int, obs_dim: int, hidden_dim: int = 100,
                 parameterization: str = "logits"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization: expected one of {PARAMETERIZATIONS}, got "
                             f"{parameterization!r}")
        self.obs_dim = obs_dim
        self.parameterization = parameterization
        self.logits_net = _mlp(z_dim, hidden_dim, obs_dim)

    def forward(self, z: torch.Tensor) -> dist.Bernoulli:
        if self.parameterization == "probs":
            return dist.Bernoulli(probs=torch.sigmoid(self.logits_net(z)), validate_args=False)
        return dist.Bernoulli(logits=self.logits_net(z))

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits_net(z))


class CategoricalEmission(nn.Module):
    """``x_t ~ Categorical(softmax(f(z_t)))`` over ``obs_dim`` classes.

    Observations may be class ids ``(batch, time)`` (long; negative = missing) or one-hot vectors
    ``(batch, time, obs_dim)`` (float; a NaN row = missing) — the one-hot form lets the
    guides read them as ordinary vectors. The observed value of site ``"x"`` is the ids.
    ``forward(z)`` returns ``Categorical`` with batch shape ``z.shape[:-1]``; :meth:`mean` the
    class probabilities ``(..., obs_dim)``.
    """

    def __init__(self, z_dim: int, obs_dim: int, hidden_dim: int = 100):
        super().__init__()
        self.obs_dim = obs_dim
        self.logits_net = _mlp(z_dim, hidden_dim, obs_dim)

    def forward(self, z: torch.Tensor) -> dist.Categorical:
        return dist.Categorical(logits=self.logits_net(z))

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits_net(z), dim=-1)

    def observed(self, x: torch.Tensor, mask: torch.Tensor):
        if x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if x.dim() != 2:
                raise ValueError(
                    f"x: class ids must have shape (batch, time), got {tuple(x.shape)}"
                )
            observed = mask & (x >= 0)
            ids = x.long()
        else:
            if x.size(-1) != self.obs_dim:
                raise ValueError(
                    f"x: one-hot observations must have last dim obs_dim={self.obs_dim}, "
                    f"got shape {tuple(x.shape)}"
                )
            observed = mask & ~torch.isnan(x).any(-1)
            ids = torch.nan_to_num(x).argmax(-1)
        return torch.where(observed, ids, torch.zeros_like(ids)), observed


_EMISSIONS = {
    "gaussian": GaussianEmission,
    "bernoulli": BernoulliEmission,
    "categorical": CategoricalEmission,
}


def make_emission(kind: str, z_dim: int, obs_dim: int, hidden_dim: int) -> nn.Module:
    """Build an emission network by name: ``"gaussian"``, ``"bernoulli"`` or ``"categorical"``."""
    if kind not in _EMISSIONS:
        raise ValueError(f"emission: expected one of {sorted(_EMISSIONS)}, got {kind!r}")
    return _EMISSIONS[kind](z_dim, obs_dim, hidden_dim)


# --------------------------------------------------------------------------------------------
# Deep Markov model transition
# --------------------------------------------------------------------------------------------
class GatedTransition(nn.Module):
    r"""Gated transition ``p(z_t | z_{t-1}) = N(μ, diag σ²)`` of Krishnan et al. (2017).

    .. math::
        g &= \mathrm{sigmoid}(W_2\,\mathrm{relu}(W_1 z_{t-1})), \qquad
        \tilde\mu = W_4\,\mathrm{relu}(W_3 z_{t-1}) \\
        μ &= (1 - g) \odot (W_0 z_{t-1} + b_0) + g \odot \tilde\mu, \qquad
        σ = \mathrm{softplus}(W_5\,\mathrm{relu}(\tilde\mu)) + 10^{-3}

    with the linear path ``W_0`` initialised to the identity and ``b_0`` to zero, so that at
    initialisation the latent state tends to persist. Works on any leading shape ``(..., z_dim)``,
    in particular on a whole trajectory ``(batch, time, z_dim)`` at once. ``scale_floor`` (the
    ``10^{-3}`` above; Pyro's DMM example has none, ``0.0``) is an attribute that may be changed
    after construction.
    """

    def __init__(self, z_dim: int, transition_dim: int = 200, scale_floor: float = MIN_SCALE):
        super().__init__()
        if not float(scale_floor) >= 0:
            raise ValueError(f"scale_floor: expected a non-negative float, got {scale_floor!r}")
        self.scale_floor = float(scale_floor)
        self.gate_hidden = nn.Linear(z_dim, transition_dim)
        self.gate_out = nn.Linear(transition_dim, z_dim)
        self.proposal_hidden = nn.Linear(z_dim, transition_dim)
        self.proposal_out = nn.Linear(transition_dim, z_dim)
        self.linear = nn.Linear(z_dim, z_dim)
        self.scale = nn.Linear(z_dim, z_dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(z_dim))
            self.linear.bias.zero_()

    def forward(self, z_prev: torch.Tensor):
        gate = torch.sigmoid(self.gate_out(F.relu(self.gate_hidden(z_prev))))
        proposal = self.proposal_out(F.relu(self.proposal_hidden(z_prev)))
        loc = (1 - gate) * self.linear(z_prev) + gate * proposal
        scale = F.softplus(self.scale(F.relu(proposal))) + self.scale_floor
        return loc, scale


INITIALS = ("transition", "learned")


class MarkovPrior(nn.Module):
    """Markov dynamics ``z_t ~ T(z_{t-1})`` (``T`` a :class:`GatedTransition`), with either

    * ``initial="transition"``: ``z_1 ~ T(z_0)`` with a learned point ``z_0`` (Pyro's DMM), or
    * ``initial="learned"``: ``z_1 ~ N(μ_1, diag σ_1²)`` with its own learned mean and scale.

    The second lets the first state be much more (or less) spread than the transition noise —
    e.g. a stationary linear system started from a wide distribution — which ``T(z_0)`` can only
    mimic by making the transition scale depend on the state. Sequential state: the previous
    latent ``z_{t-1}``; with ``initial="learned"`` the pair ``(z_{t-1}, first)`` where ``first``
    (batch,) marks sequences that have not started yet.
    """

    def __init__(self, z_dim: int, transition_dim: int = 200, initial: str = "transition"):
        super().__init__()
        if initial not in INITIALS:
            raise ValueError(f"initial: expected one of {INITIALS}, got {initial!r}")
        self.z_dim, self.initial = z_dim, initial
        self.transition = GatedTransition(z_dim, transition_dim)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        if initial == "learned":  # starts at N(0, I)
            self.z_1_loc = nn.Parameter(torch.zeros(z_dim))
            self.z_1_scale_raw = nn.Parameter(torch.full((z_dim,), math.log(math.e - 1.0)))

    def _first_step(self):
        return self.z_1_loc, F.softplus(self.z_1_scale_raw) + MIN_SCALE

    def trajectory_params(self, z: torch.Tensor):
        """``(loc, scale)`` of every ``p(z_t | z_{t-1})``, each ``(batch, time, z_dim)``."""
        if self.initial == "transition":
            z_prev = torch.cat([self.z_0.expand(z.size(0), 1, -1), z[:, :-1]], dim=1)
            return self.transition(z_prev)
        loc, scale = self.transition(z[:, :-1])
        loc1, scale1 = (p.expand(z.size(0), 1, -1) for p in self._first_step())
        return torch.cat([loc1, loc], dim=1), torch.cat([scale1, scale], dim=1)

    def initial_state(self, batch_size: int, like: torch.Tensor):
        z_0 = self.z_0.to(like).expand(batch_size, -1)
        if self.initial == "learned":
            return z_0, torch.ones(batch_size, dtype=torch.bool, device=like.device)
        return z_0

    def predict(self, state):
        if self.initial == "transition":
            return self.transition(state)
        z_prev, first = state
        loc, scale = self.transition(z_prev)
        loc1, scale1 = self._first_step()
        first = first.unsqueeze(-1)
        return torch.where(first, loc1, loc), torch.where(first, scale1, scale)

    def update(self, state, z_t: torch.Tensor):
        if self.initial == "transition":
            return z_t
        return z_t, torch.zeros_like(state[1])

    def state_after(self, z: torch.Tensor, lengths: torch.Tensor):
        """State after the first ``lengths[b]`` steps of ``z`` (batch, time, z_dim)."""
        full = torch.cat([self.z_0.expand(z.size(0), 1, -1), z], dim=1)
        lengths = lengths.to(z.device).long()
        index = lengths.view(-1, 1, 1).expand(-1, 1, z.size(-1))
        last = full.gather(1, index).squeeze(1)
        return last if self.initial == "transition" else (last, lengths == 0)


# --------------------------------------------------------------------------------------------
# LSTM-driven dynamics
# --------------------------------------------------------------------------------------------
class LSTMPrior(nn.Module):
    r"""LSTM-driven dynamics: ``p(z_t | z_{<t}) = N(μ(h_t), diag σ²(h_t))``.

    .. math::
        [h_t, c_t] = \mathrm{LSTM}(z_{t-1}, h_{t-1}, c_{t-1}),\qquad
        μ(h) = W_μ\,\mathrm{relu}(W h),\quad
        σ(h) = \mathrm{softplus}(W_σ\,\mathrm{relu}(W h)) + 10^{-3}

    with learned ``z_0``, ``h_0``, ``c_0``. Given a trajectory, the LSTM runs once over the
    shifted sequence ``(z_0, z_1, ..., z_{T-1})`` (one fused call); sampling steps the same LSTM.
    Sequential state = ``(h, c)`` after consuming ``z_{t-1}``, each ``(1, batch, rnn_dim)``.
    """

    def __init__(self, z_dim: int, rnn_dim: int = 600, hidden_dim: int = 200):
        super().__init__()
        self.z_dim = z_dim
        self.rnn = nn.LSTM(z_dim, rnn_dim, batch_first=True)
        self.hidden = nn.Linear(rnn_dim, hidden_dim)
        self.loc = nn.Linear(hidden_dim, z_dim)
        self.scale = nn.Linear(hidden_dim, z_dim)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(rnn_dim))
        self.c_0 = nn.Parameter(torch.zeros(rnn_dim))

    def _head(self, h: torch.Tensor):
        hidden = F.relu(self.hidden(h))
        return self.loc(hidden), F.softplus(self.scale(hidden)) + MIN_SCALE

    def _hc0(self, batch_size: int):
        h0 = self.h_0.expand(1, batch_size, -1).contiguous()
        c0 = self.c_0.expand(1, batch_size, -1).contiguous()
        return h0, c0

    def trajectory_params(self, z: torch.Tensor):
        """``(loc, scale)`` of every ``p(z_t | z_{<t})``, each ``(batch, time, z_dim)``."""
        inputs = torch.cat([self.z_0.expand(z.size(0), 1, -1), z[:, :-1]], dim=1)
        hs, _ = self.rnn(inputs, self._hc0(z.size(0)))
        return self._head(hs)

    def initial_state(self, batch_size: int, like: torch.Tensor):
        h, c = self._hc0(batch_size)
        return self.update((h, c), self.z_0.to(like).expand(batch_size, -1))

    def predict(self, state):
        return self._head(state[0][-1])

    def update(self, state, z_t: torch.Tensor):
        _, state = self.rnn(z_t.unsqueeze(1), state)
        return state

    def state_after(self, z: torch.Tensor, lengths: torch.Tensor):
        """``(h, c)`` after consuming ``z_0`` and the first ``lengths[b]`` steps of ``z``."""
        inputs = torch.cat([self.z_0.expand(z.size(0), 1, -1), z], dim=1)
        packed = pack_padded_sequence(
            inputs, (lengths.long() + 1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, state = self.rnn(packed, self._hc0(z.size(0)))
        return state
