"""Distributions over whole latent trajectories ``z_{1:T}`` (one Pyro sample site per sequence).

pyrossm registers a latent trajectory as **one** sample site ``"z"`` (see
:mod:`pyrossm.protocol`) instead of one site per time step under ``pyro.markov``. The
distributions here make that possible: ``batch_shape == (batch,)``,
``event_shape == (T, state_dim)`` (time at dim -2), a ``log_prob`` that is one vectorized
computation over time, reparameterized ``rsample`` and a ``mask`` of shape ``(batch, T)``
whose ``False`` steps (padding) contribute exactly 0 to ``log_prob``.

* :class:`DiagonalGaussianSequence` -- independent steps, ``z_t ~ N(loc_t, diag scale_t^2)``.
* :class:`SequentialSequenceDistribution` -- the generic autoregressive form
  ``p(z_{1:T}) = prod_t p(z_t | z_{<t})`` given by two functions: a vectorized ``log_prob_fn``
  of the whole trajectory and a ``step_fn`` that samples one step while carrying a state
  (e.g. an LSTM prior ``p(z_t | z_{<t})``).
* :class:`AutoregressiveGaussianSequence` -- the Markov special case used by the structured
  guides: ``z_t ~ N(mu(z_{t-1}, h_t), Sigma(z_{t-1}, h_t))`` from a combiner network.

Reference: Krishnan, Shalit & Sontag (2017), *Structured Inference Networks for Nonlinear
State Space Models*, AAAI (the combiner form); Pyro's DMM tutorial (the per-step form these
replace).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

from pyrossm._checks import check_mask

__all__ = [
    "AutoregressiveGaussianSequence",
    "DiagonalGaussianSequence",
    "SequentialSequenceDistribution",
    "shift_sequence",
]


def shift_sequence(z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """The trajectory delayed by one step: ``[z_0, z_1, ..., z_{T-1}]``.

    ``z`` has shape ``(..., T, D)`` (time at dim -2); ``z0`` broadcasts to ``(..., D)``.
    The result has the shape of ``z``; entry ``t`` is the predecessor of ``z[..., t, :]``.

    >>> shift_sequence(torch.arange(3.).reshape(1, 3, 1), torch.zeros(1)).flatten().tolist()
    [0.0, 0.0, 1.0]
    """
    z0 = z0.expand(z.shape[:-2] + z.shape[-1:]).unsqueeze(-2)
    return torch.cat([z0, z[..., :-1, :]], dim=-2)


def _check_mask(mask, batch_shape, num_steps, name="mask"):
    return check_mask(mask, tuple(batch_shape) + (num_steps,), name, broadcast=True)


def _mask_steps(lp: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the masked steps of per-coordinate log-densities ``(..., T, D)``."""
    if mask is None:
        return lp
    return torch.where(mask.unsqueeze(-1), lp, lp.new_zeros(()))


def _masked_sum(step_log_probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum per-step log-densities ``(..., T)`` over time, padded steps (mask False) counting 0."""
    if mask is not None:
        step_log_probs = torch.where(mask, step_log_probs, step_log_probs.new_zeros(()))
    return step_log_probs.sum(-1)


class DiagonalGaussianSequence(TorchDistribution):
    r"""Independent Gaussian steps: :math:`z_t \sim \mathcal N(\mu_t, \mathrm{diag}\,s_t^2)`.

    ``loc`` and ``scale`` have shape ``batch_shape + (T, D)`` (time at dim -2); ``mask``
    (bool, broadcastable to ``batch_shape + (T,)``) marks the steps that count: a ``False``
    step contributes 0 to :meth:`log_prob` and :meth:`entropy`. ``event_shape == (T, D)``.
    This is the variational family of the filtering guide.

    >>> d = DiagonalGaussianSequence(torch.zeros(2, 5, 3), torch.ones(2, 5, 3))
    >>> d.batch_shape, d.event_shape, d.rsample().shape
    (torch.Size([2]), torch.Size([5, 3]), torch.Size([2, 5, 3]))
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, loc, scale, mask=None, validate_args=None):
        if loc.dim() < 2:
            raise ValueError(f"loc: expected shape (..., T, D), got {tuple(loc.shape)}")
        try:
            loc, scale = torch.broadcast_tensors(loc, scale)
        except RuntimeError:
            raise ValueError(
                f"scale: expected a shape broadcastable to loc's {tuple(loc.shape)}, "
                f"got {tuple(scale.shape)}"
            ) from None
        self.loc, self.scale = loc, scale
        batch_shape, event_shape = loc.shape[:-2], loc.shape[-2:]
        self.mask = _check_mask(mask, batch_shape, event_shape[0])
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalGaussianSequence, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.scale = self.scale.expand(batch_shape + self.event_shape)
        new.mask = (
            None if self.mask is None else self.mask.expand(batch_shape + self.event_shape[:1])
        )
        super(DiagonalGaussianSequence, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        return self.scale.pow(2)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale

    def step_log_prob(self, value):
        """Per-step log-densities, shape ``sample_shape + batch_shape + (T,)``, 0 where masked."""
        if self._validate_args:
            self._validate_sample(value)
        lp = dist.Normal(self.loc, self.scale, validate_args=False).log_prob(value).sum(-1)
        if self.mask is not None:
            lp = torch.where(self.mask, lp, lp.new_zeros(()))
        return lp

    def log_prob(self, value):
        return self.step_log_prob(value).sum(-1)

    def coordinate_log_prob(self, value):
        """Log-density summed over the unmasked steps, one entry per coordinate: ``(..., D)``."""
        lp = dist.Normal(self.loc, self.scale, validate_args=False).log_prob(value)
        return _mask_steps(lp, self.mask).sum(-2)

    def entropy(self):
        ent = dist.Normal(self.loc, self.scale, validate_args=False).entropy().sum(-1)
        return _masked_sum(ent, self.mask)


class SequentialSequenceDistribution(TorchDistribution):
    r"""Trajectory distribution :math:`p(z_{1:T}) = \prod_t p(z_t \mid z_{<t})` given by functions.

    The density of a *given* trajectory is one vectorized call; only sampling is sequential.
    Three functions define it (all must broadcast over arbitrary leading dimensions, so that
    ``sample_shape`` and :meth:`expand` work):

    ``log_prob_fn(z) -> step_log_probs``
        ``z``: ``(..., T, D)`` → ``(..., T)``, entry ``t`` = :math:`\log p(z_t \mid z_{<t})`.
        Typically the conditional parameters are computed for all ``t`` at once from the
        shifted sequence ``[z_0, z_1, ..., z_{T-1}]`` (see :func:`shift_sequence`), e.g. an
        LSTM run once over it.
    ``init_fn(shape) -> (z_0, state)``
        ``shape = sample_shape + batch_shape``; returns the initial "previous state"
        ``z_0`` of shape ``shape + (D,)`` and any carried state (e.g. an LSTM ``(h, c)``,
        or ``None``).
    ``step_fn(t, z_prev, state) -> (step_dist, state)``
        ``z_prev``: ``shape + (D,)``. Returns the conditional of ``z_t`` as a distribution with
        ``event_shape == (D,)`` and a batch shape broadcastable to ``shape`` (it must have
        ``rsample`` for :meth:`rsample`), and the new carried state.

    ``mask`` (bool, broadcastable to ``batch_shape + (T,)``): ``False`` steps contribute 0 to
    :meth:`log_prob` (they are still sampled, and must come *after* the valid steps, i.e.
    right padding, so that they do not influence valid steps through the recursion).

    Subclasses may override :meth:`step_log_prob` instead of passing ``log_prob_fn``.
    :meth:`expand` returns a copy with the new batch shape and the same functions (which is why
    they must broadcast); expanding to the current batch shape (what ``pyro.plate`` does)
    returns the distribution itself.

    Example: a Gaussian random walk, ``z_t ~ N(z_{t-1}, 1)``, ``z_0 = 0``.

    >>> D, T = 2, 4
    >>> d = SequentialSequenceDistribution(
    ...     log_prob_fn=lambda z: dist.Normal(shift_sequence(z, z.new_zeros(D)), 1.0)
    ...     .log_prob(z).sum(-1),
    ...     init_fn=lambda shape: (torch.zeros(shape + (D,)), None),
    ...     step_fn=lambda t, z_prev, state: (dist.Normal(z_prev, 1.0).to_event(1), state),
    ...     batch_shape=(3,), event_shape=(T, D))
    >>> z = d.rsample()
    >>> z.shape, d.log_prob(z).shape
    (torch.Size([3, 4, 2]), torch.Size([3]))
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        log_prob_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        init_fn: Callable[[torch.Size], tuple[torch.Tensor, Any]],
        step_fn: Callable[[int, torch.Tensor, Any], tuple[dist.Distribution, Any]],
        batch_shape,
        event_shape,
        mask: torch.Tensor | None = None,
        validate_args=None,
    ):
        batch_shape, event_shape = torch.Size(batch_shape), torch.Size(event_shape)
        if len(event_shape) != 2:
            raise ValueError(f"event_shape: expected (T, D), got {tuple(event_shape)}")
        self.log_prob_fn, self.init_fn, self.step_fn = log_prob_fn, init_fn, step_fn
        self.mask = _check_mask(mask, batch_shape, event_shape[0])
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape and _instance is None:
            return self
        try:
            torch.broadcast_shapes(batch_shape, self.batch_shape)
            assert len(batch_shape) >= len(self.batch_shape)
        except (RuntimeError, AssertionError):
            raise ValueError(
                f"batch_shape: cannot expand {tuple(self.batch_shape)} to {tuple(batch_shape)}"
            ) from None
        new = copy.copy(self) if _instance is None else _instance
        if _instance is not None:
            new.__dict__.update(self.__dict__)
        if self.mask is not None:
            new.mask = self.mask.expand(batch_shape + self.event_shape[:1])
        new._batch_shape = batch_shape
        return new

    @property
    def num_steps(self) -> int:
        return self.event_shape[0]

    def step_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Per-step ``log p(z_t | z_<t)``, shape ``value.shape[:-1]``, 0 where masked."""
        if self._validate_args:
            self._validate_sample(value)
        if self.log_prob_fn is None:
            raise NotImplementedError("log_prob_fn is None and step_log_prob was not overridden")
        lp = self.log_prob_fn(value)
        if lp.shape != value.shape[:-1]:
            raise ValueError(
                f"log_prob_fn: expected per-step log-densities of shape {tuple(value.shape[:-1])}, "
                f"got {tuple(lp.shape)}"
            )
        if self.mask is not None:
            lp = torch.where(self.mask, lp, lp.new_zeros(()))
        return lp

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.step_log_prob(value).sum(-1)

    def _sample(self, sample_shape, reparameterized: bool) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        z_prev, state = self.init_fn(shape)
        steps = []
        for t in range(self.num_steps):
            step_dist, state = self.step_fn(t, z_prev, state)
            if step_dist.batch_shape != shape:
                step_dist = step_dist.expand(shape)
            z_prev = step_dist.rsample() if reparameterized else step_dist.sample()
            steps.append(z_prev)
        if not steps:
            return z_prev.new_zeros(shape + self.event_shape)
        return torch.stack(steps, dim=-2)

    def rsample(self, sample_shape=torch.Size()):
        return self._sample(sample_shape, reparameterized=True)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self._sample(sample_shape, reparameterized=False)


class AutoregressiveGaussianSequence(SequentialSequenceDistribution):
    r"""Markov Gaussian trajectory from features, :math:`\prod_t q(z_t \mid z_{t-1}, h_t)`.

    .. math::
        z_t = \mu(z_{t-1}, h_t) + S(z_{t-1}, h_t)\,\varepsilon_t,\qquad
        \varepsilon_t \sim \mathcal N(0, I),\qquad z_0 = \text{init}

    ``combiner(z_prev, h) -> (loc, scale)`` works on any leading shape (broadcasting):
    ``z_prev (..., D)``, ``h (..., H)`` → ``loc (..., D)`` and either a diagonal
    ``scale (..., D)`` (positive; ``scale_tril=False``) or a lower-triangular Cholesky factor
    ``(..., D, D)`` with positive diagonal (``scale_tril=True``). ``features``:
    ``batch_shape + (T, H)``, time at dim -2; ``init``: the (learned) ``z_0``, broadcastable to
    ``batch_shape + (D,)``.

    :meth:`log_prob` is one combiner call on the shifted trajectory
    ``combiner([z_0, z_1..z_{T-1}], h)``; :meth:`rsample` loops over ``t``. A combiner may split
    its work to make that loop cheap: ``combiner.prepare(h) -> ctx`` (a tuple of tensors of
    shape ``batch_shape + (T, ...)``, computed once for all steps) and
    ``combiner.step(z_prev, ctx_t) -> (loc, scale)`` with ``ctx_t`` the tensors at step ``t``;
    then ``combiner(z, h)`` must equal ``combiner.step(z, combiner.prepare(h))``.

    >>> comb = lambda z, h: (0.5 * z + h, torch.ones_like(z))
    >>> d = AutoregressiveGaussianSequence(comb, torch.randn(4, 10, 2), torch.zeros(2))
    >>> z = d.rsample()
    >>> z.shape, d.log_prob(z).shape
    (torch.Size([4, 10, 2]), torch.Size([4]))
    """

    def __init__(self, combiner, features, init, mask=None, scale_tril=False, validate_args=None):
        if features.dim() < 2:
            raise ValueError(f"features: expected shape (batch, T, H), got {tuple(features.shape)}")
        self.combiner, self.features, self.init = combiner, features, init
        self.scale_tril = bool(scale_tril)
        state_dim = init.shape[-1]
        batch_shape = torch.broadcast_shapes(features.shape[:-2], init.shape[:-1])
        super().__init__(
            log_prob_fn=None,
            init_fn=None,
            step_fn=None,
            batch_shape=batch_shape,
            event_shape=(features.shape[-2], state_dim),
            mask=mask,
            validate_args=validate_args,
        )

    @staticmethod
    def conditional(loc, scale, scale_tril=False):
        """Step distribution ``N(loc, diag scale^2)`` or ``N(loc, scale scale^T)``, event dim 1."""
        if scale_tril:
            return dist.MultivariateNormal(loc, scale_tril=scale, validate_args=False)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def _steps(self):
        """Per-step callables ``z_prev -> (loc, scale)`` (using prepare/step when available)."""
        time_dim = self.features.dim() - 2
        comb = self.combiner
        if hasattr(comb, "prepare") and hasattr(comb, "step"):
            ctx = [c.unbind(time_dim) for c in comb.prepare(self.features)]
            return [lambda z, c=tuple(parts): comb.step(z, c) for parts in zip(*ctx)]
        return [lambda z, h=h_t: comb(z, h) for h_t in self.features.unbind(time_dim)]

    def _sample(self, sample_shape, reparameterized):
        shape = torch.Size(sample_shape) + self.batch_shape
        T, D = self.event_shape
        z = self.init.expand(shape + (D,))
        eps = torch.empty((T,) + shape + (D,), dtype=z.dtype, device=z.device).normal_()
        steps, locs, scales = [], [], []
        for t, step in enumerate(self._steps()):
            loc, scale = step(z)
            if self.scale_tril:
                z = loc + torch.matmul(scale, eps[t].unsqueeze(-1)).squeeze(-1)
            else:
                z = loc + scale * eps[t]
            steps.append(z)
            locs.append(loc)
            scales.append(scale)
        if not steps:
            return z.new_zeros(shape + self.event_shape)
        out = torch.stack(steps, dim=-2)
        if not reparameterized:
            return out.detach()
        # log_prob of this very sample (Trace_ELBO scores the guide's own draw) reuses the
        # conditionals computed while sampling instead of a second pass of the combiner.
        time_dim = -2 if not self.scale_tril else -3
        self._sampled = (out, torch.stack(locs, dim=-2), torch.stack(scales, dim=time_dim))
        return out

    def conditionals(self, value):
        """``(loc, scale)`` of all steps given ``value (..., T, D)``: one combiner call."""
        cached = getattr(self, "_sampled", None)
        if cached is not None and value is cached[0]:
            return cached[1], cached[2]
        return self.combiner(shift_sequence(value, self.init), self.features)

    def step_log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        loc, scale = self.conditionals(value)
        lp = self.conditional(loc, scale, self.scale_tril).log_prob(value)
        if self.mask is not None:
            lp = torch.where(self.mask, lp, lp.new_zeros(()))
        return lp

    def coordinate_log_prob(self, value):
        """Log-density summed over the unmasked steps, one entry per coordinate: ``(..., D)``
        (diagonal steps only: a full covariance does not split over coordinates)."""
        if self.scale_tril:
            raise NotImplementedError("coordinate_log_prob: the steps have a full covariance "
                                      "(scale='tril'), which does not split over coordinates")
        loc, scale = self.conditionals(value)
        lp = dist.Normal(loc, scale, validate_args=False).log_prob(value)
        return _mask_steps(lp, self.mask).sum(-2)
