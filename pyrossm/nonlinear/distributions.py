"""The prior over a latent trajectory ``z_{1:T}`` as one distribution (one Pyro sample site).

:class:`TrajectoryPrior` specialises :class:`pyrossm.distributions.SequentialSequenceDistribution`
to the dynamics modules of :mod:`pyrossm.nonlinear.networks`
(:class:`~pyrossm.nonlinear.networks.MarkovPrior`, :class:`~pyrossm.nonlinear.networks.LSTMPrior`):
``log_prob`` evaluates every factor ``p(z_t | z_{<t})`` of a given trajectory in one vectorized
call (a batched MLP for the deep Markov model, one fused LSTM call for the LSTM-driven model);
``rsample`` is sequential and reparameterised (``z_t = μ_t + σ_t ε_t``).
"""

from __future__ import annotations

import math

import torch
from pyro import distributions as dist

from ..distributions import SequentialSequenceDistribution

__all__ = ["TrajectoryPrior"]


class TrajectoryPrior(SequentialSequenceDistribution):
    r"""``p(z_{1:T}) = ∏_t N(z_t; μ_t(z_{<t}), diag σ_t²(z_{<t}))`` as one distribution.

    Shapes: ``batch_shape == (batch,)``, ``event_shape == (num_steps, z_dim)`` (time at dim -2).
    ``mask`` ``(batch, num_steps)`` bool: steps where it is False (right padding) contribute
    nothing to ``log_prob``. Because the dynamics are causal, the values of padded steps never
    influence the factors of the real steps before them.

    Args:
        dynamics: a module with ``z_dim``, ``trajectory_params``, ``initial_state``, ``predict``
            and ``update`` (see :mod:`pyrossm.nonlinear.networks`).
        batch_size, num_steps: the shape of the trajectories.
        mask: optional ``(batch, num_steps)`` bool.
        like: a tensor giving the device and dtype of samples (default: the dynamics' params).

    Example:
        >>> from pyrossm.nonlinear.networks import MarkovPrior
        >>> p = TrajectoryPrior(MarkovPrior(z_dim=2, transition_dim=8), batch_size=3, num_steps=5)
        >>> z = p.rsample()
        >>> z.shape, p.log_prob(z).shape
        (torch.Size([3, 5, 2]), torch.Size([3]))
    """

    def __init__(self, dynamics, batch_size: int, num_steps: int, mask=None, like=None):
        if mask is not None and tuple(mask.shape) != (batch_size, num_steps):
            raise ValueError(
                f"mask: expected shape (batch, time) = {(batch_size, num_steps)}, "
                f"got {tuple(mask.shape)}"
            )
        self.dynamics = dynamics
        self._like = like if like is not None else next(dynamics.parameters())
        super().__init__(
            log_prob_fn=self._step_log_probs,
            init_fn=self._init,
            step_fn=self._step,
            batch_shape=torch.Size([batch_size]),
            event_shape=torch.Size([num_steps, dynamics.z_dim]),
            mask=mask,
            validate_args=False,
        )

    def _coordinate_step_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(z_td | z_<t)`` of every step and coordinate, shape ``z.shape``, unmasked."""
        shape = z.shape
        if len(shape) < 3 or shape[-2:] != self.event_shape:
            raise ValueError(
                f"z: expected shape (batch, time, z_dim) with (time, z_dim) = "
                f"{tuple(self.event_shape)}, got {tuple(shape)}"
            )
        flat = z.reshape(-1, *shape[-2:])  # any leading dims -> one batch dim
        loc, scale = self.dynamics.trajectory_params(flat)
        return dist.Normal(loc, scale, validate_args=False).log_prob(flat).reshape(shape)

    def _step_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        return self._coordinate_step_log_probs(z).sum(-1)

    def coordinate_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density summed over the unmasked steps, one entry per coordinate: ``(..., D)``."""
        lp = self._coordinate_step_log_probs(z)
        if self.mask is not None:
            lp = torch.where(self.mask.unsqueeze(-1), lp, lp.new_zeros(()))
        return lp.sum(-2)

    def _init(self, shape: torch.Size):
        n = math.prod(shape)
        z_0 = self.dynamics.z_0.to(self._like).expand(shape + (self.dynamics.z_dim,))
        return z_0, (shape, self.dynamics.initial_state(n, self._like))

    def _step(self, t: int, z_prev: torch.Tensor, carried):
        shape, state = carried
        if t > 0:
            state = self.dynamics.update(state, z_prev.reshape(-1, z_prev.size(-1)))
        loc, scale = self.dynamics.predict(state)
        loc, scale = loc.reshape(shape + loc.shape[-1:]), scale.reshape(shape + scale.shape[-1:])
        return dist.Normal(loc, scale, validate_args=False).to_event(1), (shape, state)
