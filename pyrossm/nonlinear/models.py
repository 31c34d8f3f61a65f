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

from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule

from .distributions import TrajectoryPrior
from .networks import LSTMPrior, MarkovPrior, make_emission

__all__ = [
    "DeepMarkovModel",
    "Forecast",
    "LSTMStateSpaceModel",
    "Reconstruction",
    "Trajectory",
]


class Trajectory(NamedTuple):
    """Samples from the prior: ``z`` (num_samples, time, z_dim), ``x`` (num_samples, time, obs_dim)
    (``(num_samples, time)`` class ids for a categorical emission)."""

    z: torch.Tensor
    x: torch.Tensor


class Forecast(NamedTuple):
    """Forecast of ``horizon`` steps after each sequence's last real step.

    ``z``: (num_samples, batch, horizon, z_dim) latent paths; ``samples``: (num_samples, batch,
    horizon, obs_dim) sampled observations (``(num_samples, batch, horizon)`` ids for a categorical
    emission); ``means``: (num_samples, batch, horizon, obs_dim) emission means E[x_t | z_t]
    (Gaussian mean, Bernoulli / class probabilities); ``mean``: (batch, horizon, obs_dim) the
    average of ``means`` over samples (the Monte Carlo predictive mean).
    """

    z: torch.Tensor
    samples: torch.Tensor
    means: torch.Tensor
    mean: torch.Tensor


class Reconstruction(NamedTuple):
    """``z`` (num_samples, batch, time, z_dim) drawn from the guide and ``means`` (num_samples,
    batch, time, obs_dim) the emission means E[x_t | z_t]."""

    z: torch.Tensor
    means: torch.Tensor


def _check_x(x, mask, name="x"):
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(
            f"{name}: expected a tensor of shape (batch, time, obs_dim) "
            f"(or (batch, time) class ids), got {getattr(x, 'shape', type(x).__name__)}"
        )
    if x.dim() == 3 and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (batch, time, obs_dim), got "
                        f"dtype {x.dtype} (class ids go in a (batch, time) long tensor)")
    batch, steps = x.shape[:2]
    if steps == 0:
        raise ValueError(f"{name}: expected at least one time step, shape (batch, T >= 1, ...), "
                         f"got {tuple(x.shape)}")
    if mask is None:
        return torch.ones(batch, steps, dtype=torch.bool, device=x.device)
    if tuple(mask.shape) != (batch, steps) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask: expected a bool tensor of shape (batch, time) = {(batch, steps)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask


class _StateSpaceModel(PyroModule):
    """Shared machinery: emissions, the Pyro model, sampling, forecasting, reconstruction."""

    dynamics: torch.nn.Module  # set by subclasses
    max_plate_nesting = 1

    def __init__(self, obs_dim: int, z_dim: int, emission: str, emission_dim: int):
        super().__init__()
        if obs_dim < 1 or z_dim < 1:
            raise ValueError(f"obs_dim, z_dim: expected positive sizes, got {obs_dim}, {z_dim}")
        self.obs_dim = obs_dim
        self.z_dim = z_dim
        self.emission_kind = emission
        self.emitter = make_emission(emission, z_dim, obs_dim, emission_dim)

    # ----------------------------------------------------------------- the Pyro model
    def prior(self, batch_size: int, num_steps: int, mask=None, like=None) -> TrajectoryPrior:
        """The distribution of the latent site ``"z"`` (see :class:`TrajectoryPrior`)."""
        return TrajectoryPrior(self.dynamics, batch_size, num_steps, mask=mask, like=like)

    def emission(self, z: torch.Tensor):
        """Pointwise emission ``p(x | z)``, batch shape ``z.shape[:-1] (+ (obs_dim,))``."""
        return self.emitter(z)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Pyro model ``p(z_{1:T}) ∏_t p(x_t | z_t)``; returns the latent trajectory."""
        mask = _check_x(x, mask)
        value, observed = self.emitter.observed(x, mask)
        batch, steps = x.shape[:2]
        like = x if x.is_floating_point() else self._param_like()
        with pyro.plate("sequences", batch, dim=-1):
            z = pyro.sample("z", self.prior(batch, steps, mask, like=like))
            likelihood = self.emitter(z)
            event_dims = len(likelihood.batch_shape) - 1  # time (and obs_dim)
            pyro.sample("x", likelihood.mask(observed).to_event(event_dims), obs=value)
        return z

    model = forward  # protocol name

    def _param_like(self) -> torch.Tensor:
        return next(self.parameters())

    # ----------------------------------------------------------------- trajectories
    @torch.no_grad()
    def sample(self, num_steps: int, num_samples: int = 1) -> Trajectory:
        """Draw ``(z, x)`` from the prior: ``z`` (num_samples, num_steps, z_dim), ``x``
        (num_samples, num_steps, obs_dim). Uses torch's global RNG (``pyro.set_rng_seed``)."""
        if num_steps < 0 or num_samples < 1:
            raise ValueError(
                f"num_steps, num_samples: expected >= 0 and >= 1, got {num_steps}, {num_samples}"
            )
        z = self.prior(num_samples, num_steps).rsample()
        return Trajectory(z, self.emitter(z).sample())

    def _guide_latent(self, guide, x, mask):
        trace = poutine.trace(guide).get_trace(x, mask)
        if "z" not in trace.nodes:
            raise ValueError("guide: expected a guide with a latent sample site named 'z'")
        return trace.nodes["z"]["value"]

    @torch.no_grad()
    def reconstruct(self, x, guide, mask=None, num_samples: int = 1) -> Reconstruction:
        """Draw ``z ~ q(z | x)`` with ``guide``; emission means, see :class:`Reconstruction`."""
        mask = _check_x(x, mask)
        batch = x.size(0)
        xs = x.repeat_interleave(num_samples, dim=0)
        ms = mask.repeat_interleave(num_samples, dim=0)
        z = self._guide_latent(guide, xs, ms)
        means = self.emitter.mean(z)
        z = z.reshape(batch, num_samples, *z.shape[1:]).transpose(0, 1)
        means = means.reshape(batch, num_samples, *means.shape[1:]).transpose(0, 1)
        return Reconstruction(z, means)

    @torch.no_grad()
    def forecast(self, x, horizon: int, num_samples: int = 100, guide=None, mask=None) -> Forecast:
        """Forecast ``horizon`` steps past the observed prefix of each sequence.

        The latent trajectory of the prefix ``x`` (batch, time, obs_dim) — its real steps given
        by ``mask`` (right padding allowed) — is drawn from ``guide`` (``num_samples`` draws per
        sequence); the prior is then rolled forward from each sequence's last real step.
        Returns a :class:`Forecast` (samples first: (num_samples, batch, horizon, ...)).
        """
        if guide is None:
            raise ValueError("guide: forecast needs a guide to infer the latent state of x")
        if horizon < 1 or num_samples < 1:
            raise ValueError(f"horizon, num_samples: expected >= 1, got {horizon}, {num_samples}")
        mask = _check_x(x, mask)
        batch = x.size(0)
        xs = x.repeat_interleave(num_samples, dim=0)
        ms = mask.repeat_interleave(num_samples, dim=0)
        z_prefix = self._guide_latent(guide, xs, ms)
        state = self.dynamics.state_after(z_prefix, ms.sum(-1))
        steps = []
        for _ in range(horizon):
            loc, scale = self.dynamics.predict(state)
            z_t = loc + scale * torch.randn_like(loc)
            steps.append(z_t)
            state = self.dynamics.update(state, z_t)
        z = torch.stack(steps, dim=1)  # (batch * num_samples, horizon, z_dim)
        samples = self.emitter(z).sample()
        means = self.emitter.mean(z)

        def samples_first(t):
            return t.reshape(batch, num_samples, *t.shape[1:]).transpose(0, 1)

        z, samples, means = samples_first(z), samples_first(samples), samples_first(means)
        return Forecast(z, samples, means, means.mean(0))


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
        x_t &\sim p_θ(x_t \mid z_t) \quad \text{(Bernoulli for piano rolls, Gaussian, Categorical)}

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
        emission: str = "bernoulli",
        initial: str = "transition",
    ):
        super().__init__(obs_dim, z_dim, emission, emission_dim)
        self.dynamics = MarkovPrior(z_dim, transition_dim, initial)
