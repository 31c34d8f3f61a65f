"""Nonlinear state-space models: the LSTM-driven SSM and the deep Markov model.

Both are Pyro models following :mod:`pyrossm.protocol`: ``model(x, mask=None)`` with one
latent site ``"z"`` (the whole trajectory, batch_shape ``(batch,)``, event_shape
``(time, z_dim)``, vectorized ``log_prob`` honouring ``mask``) and one observed site ``"x"``
(log_prob ``(batch,)``), inside ``pyro.plate("sequences", batch, dim=-1)``. They train with
:func:`pyrossm.infer.fit` and any trajectory guide of :mod:`pyrossm.guides`.

Sequences ``x`` have shape ``(batch, time, obs_dim)`` (time at dim -2); ``mask`` ``(batch, time)``
bool marks real (not padded) steps; NaN entries of ``x`` are missing observations (the latent
state still evolves there).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ..forecast import Forecast
from ..protocol import Reconstruction, StateSpaceModel, Trajectory
from .distributions import TrajectoryPrior
from .networks import LSTMPrior, MarkovPrior, make_emission

__all__ = [
    "DeepMarkovModel",
    "Forecast",
    "LSTMStateSpaceModel",
    "Reconstruction",
    "Trajectory",
]


class _StateSpaceModel(StateSpaceModel):
    """A :class:`pyrossm.StateSpaceModel` whose dynamics are a module ``self.dynamics``
    (:mod:`pyrossm.nonlinear.networks`) and whose emission is a named network: the
    vectorized ``prior`` (:class:`TrajectoryPrior`) and ``state_after`` come from the dynamics;
    the Pyro model, ``sample``, ``forecast`` and ``reconstruct`` from the base class."""

    dynamics: torch.nn.Module  # set by subclasses

    def __init__(self, obs_dim: int, z_dim: int, emission: str, emission_dim: int):
        super().__init__()
        if obs_dim < 1 or z_dim < 1:
            raise ValueError(f"obs_dim, z_dim: expected positive sizes, got {obs_dim}, {z_dim}")
        self.obs_dim = obs_dim
        self.z_dim = z_dim
        self.emission_kind = emission
        self.emitter = make_emission(emission, z_dim, obs_dim, emission_dim)

    # ----------------------------------------------------------------- StateSpaceModel
    def initial_state(self, batch_size: int, like: torch.Tensor):
        return self.dynamics.initial_state(batch_size, like)

    def transition(self, state):
        loc, scale = self.dynamics.predict(state)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def update(self, state, z_t: torch.Tensor):
        return self.dynamics.update(state, z_t)

    def state_after(self, z: torch.Tensor, lengths: torch.Tensor):
        return self.dynamics.state_after(z, lengths)

    def prior(self, batch_size: int, num_steps: int, mask=None, like=None) -> TrajectoryPrior:
        """The distribution of the latent site ``"z"`` (see :class:`TrajectoryPrior`)."""
        return TrajectoryPrior(self.dynamics, batch_size, num_steps, mask=mask, like=like)

    def emission(self, z: torch.Tensor):
        """Pointwise emission ``p(x | z)``, batch shape ``z.shape[:-1] (+ (obs_dim,))``."""
        return self.emitter(z)

    def emission_mean(self, z: torch.Tensor) -> torch.Tensor:
        return self.emitter.mean(z)

    def observed(self, x: torch.Tensor, mask: torch.Tensor):
        return self.emitter.observed(x, mask)

    def _param_like(self) -> torch.Tensor:
        return next(self.parameters())


class LSTMStateSpaceModel(_StateSpaceModel):
    r"""State-space model with LSTM-driven latent dynamics: ``p(z_t | z_{<t}) ≠ p(z_t | z_{t-1})``.

    .. math::
        [h_t, c_t] &= \mathrm{LSTM}(z_{t-1}, h_{t-1}, c_{t-1})
            \quad (z_0, h_0, c_0 \text{ learned}) \\
        z_t &= μ_θ(h_t) + σ_θ(h_t)\,ε_t, \qquad ε_t \sim N(0, I) \\
        x_t &\sim p_θ(x_t \mid z_t) \quad \text{Gaussian } μ^x(z_t) + σ^x(z_t) ψ_t,
              \text{ Bernoulli or Categorical}

    Shapes: ``x`` (batch, time, obs_dim) (time at dim -2); site ``"z"`` event (time, z_dim).
    The prior's log-density runs the LSTM once over ``(z_0, z_1, ..., z_{T-1})``; sampling is
    sequential. Reference: the seed's "state-space models with nonlinear dynamics"; Krishnan et
    al. (2017) for the structured-inference setting.

    Example:
        >>> m = LSTMStateSpaceModel(obs_dim=3, z_dim=2, rnn_dim=8, emission_dim=8)
        >>> z, x = m.sample(num_steps=5, num_samples=4)
        >>> z.shape, x.shape
        (torch.Size([4, 5, 2]), torch.Size([4, 5, 3]))
    """

    def __init__(
        self,
        obs_dim: int,
        z_dim: int = 100,
        rnn_dim: int = 600,
        emission: str = "gaussian",
        emission_dim: int = 100,
        hidden_dim: int = 200,
    ):
        super().__init__(obs_dim, z_dim, emission, emission_dim)
        self.dynamics = LSTMPrior(z_dim, rnn_dim, hidden_dim)


class DeepMarkovModel(_StateSpaceModel):
    r"""Deep Markov model with the gated transition of Krishnan, Shalit & Sontag (2017).

    .. math::
        z_t &\sim N(μ(z_{t-1}), \mathrm{diag}\,σ^2(z_{t-1})) \quad (z_0 \text{ learned}), \\
        μ(z) &= (1 - g(z)) \odot (W z + b) + g(z) \odot \tilde μ(z), \quad W = I \text{ at init} \\
        x_t &\sim p_θ(x_t \mid z_t) \quad \text{(Gaussian by default; Bernoulli for piano rolls,
            Categorical)}

    ``initial="transition"`` (default, Pyro's DMM): ``z_1 ~ T(z_0)``; ``initial="learned"``:
    ``z_1 ~ N(μ_1, diag σ_1²)`` with its own parameters (:class:`~pyrossm.nonlinear.networks.
    MarkovPrior`). See :class:`~pyrossm.nonlinear.networks.GatedTransition`. The prior's
    log-density of a whole
    trajectory is one batched call of the transition network over ``(z_0, ..., z_{T-1})``.
    Shapes: ``x`` (batch, time, obs_dim) (time at dim -2); site ``"z"`` event (time, z_dim).
    Defaults are the published JSB sizes (z 100, transition 200, emission 100).

    Example:
        >>> m = DeepMarkovModel(obs_dim=88, z_dim=4, transition_dim=8, emission_dim=8,
        ...                     emission="bernoulli")
        >>> z, x = m.sample(num_steps=10, num_samples=2)
        >>> z.shape, x.shape
        (torch.Size([2, 10, 4]), torch.Size([2, 10, 88]))
    """

    def __init__(
        self,
        obs_dim: int,
        z_dim: int = 100,
        transition_dim: int = 200,
        emission_dim: int = 100,
        emission: str = "gaussian",
        initial: str = "transition",
    ):
        super().__init__(obs_dim, z_dim, emission, emission_dim)
        self.dynamics = MarkovPrior(z_dim, transition_dim, initial)
