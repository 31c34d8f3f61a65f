"""The contract between pyrossm's models, guides, the training loop and the evaluators.

Every sequential model in pyrossm (``LinearGaussianSSM``, ``LSTMStateSpaceModel``,
``DeepMarkovModel``, ``SequenceVAE``, ``LSTMLanguageModel``) and every guide follows it, so
that the one training loop :func:`pyrossm.infer.fit` and the evaluators
(:func:`pyrossm.infer.log_likelihood`, :func:`pyrossm.infer.elbo`) work with all of them.

Data
----
* Sequences are batched with time at dim -2: ``x`` has shape ``(batch, time, obs_dim)``
  (float), or ``(batch, time)`` of token ids (long) for language models.
* ``mask`` has shape ``(batch, time)``, dtype bool; ``True`` marks steps that belong to the
  sequence. Variable-length sequences are right-padded and their padding is ``False``; a padded
  step contributes **nothing** to any log-density (neither latent nor observed terms), so the
  ELBO of a padded batch equals the ELBO of the unpadded sequences. ``mask=None`` means all True.
* Missing observations *inside* a sequence are ``NaN`` entries of ``x`` (float data only): the
  latent state still evolves there, only the observation term is dropped. (The exact Kalman
  functions in :mod:`pyrossm.lgssm` also accept a mask meaning "not observed"; for trailing
  padding the two meanings give the same log-likelihood.)
* Helpers: :func:`lengths_to_mask`.

Models and guides
-----------------
* Both are ``torch.nn.Module`` s (usually ``pyro.nn.PyroModule``) and own **all** of their
  parameters (never ``pyro.param`` on the global store outside a module), so ``.to(device)``,
  ``state_dict()`` and checkpoints work. Tensors made inside ``model``/``guide`` are created on
  the device of the inputs (``x.device``), never on the CPU by default.
* Call signature ``model(x, mask=None)`` and ``guide(x, mask=None)``; both return ``None`` or
  the sampled latent. Extra keyword arguments are allowed but must have defaults.
* One ``pyro.plate("sequences", batch, dim=-1)`` over the batch; ``max_plate_nesting = 1``.
* The whole latent trajectory is **one** sample site named ``"z"`` whose distribution has
  ``batch_shape == (batch,)`` and ``event_shape == (time, state_dim)`` (for a sequence VAE:
  event_shape ``(latent_dim,)``), with ``log_prob`` vectorized over time and honouring ``mask``.
  Observations are one site named ``"x"`` with ``obs=`` set, its ``log_prob`` of shape
  ``(batch,)`` (the sum over the sequence's observed steps).
* Models and guides only need to handle a single leading batch dimension: the training loop
  implements several ELBO particles and the importance-weighted estimator by repeating the batch
  (``x.repeat_interleave``), not by adding plates.
* Annealing: the training loop scales every *unobserved* site (in model and guide) by the KL
  factor with a messenger; models do not need to know about annealing.
* Per-step figures divide by the number of observed steps (steps inside the mask with at
  least one observed entry; every real token for language models):
  :func:`pyrossm.infer.observed_steps`.

State-space models: :class:`StateSpaceModel`
--------------------------------------------
The contract above as code, for models ``p(z_{1:T}) ∏_t p(x_t | z_t)`` with a recurrent prior.
Subclass :class:`StateSpaceModel` (exported as ``pyrossm.StateSpaceModel``) and implement four
methods — ``initial_state``, ``transition``, ``update`` and ``emission`` — to get the Pyro
``model`` (train it with :func:`pyrossm.infer.fit` and any trajectory guide), ``sample``,
``forecast`` (a :class:`pyrossm.forecast.Forecast`), ``reconstruct`` and IWAE evaluation
(:func:`pyrossm.infer.log_likelihood`). ``LSTMStateSpaceModel`` and ``DeepMarkovModel`` are
subclasses that also override ``prior`` (a vectorized log-density) and ``state_after``.
"""

from __future__ import annotations

import abc
import math
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ._checks import check_mask
from .distributions import SequentialSequenceDistribution
from .forecast import Forecast, sequence_lengths

__all__ = [
    "Reconstruction",
    "StateSpaceModel",
    "Trajectory",
    "check_sequences",
    "lengths_to_mask",
]


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Boolean mask ``(batch, max_len)`` that is True at steps ``t < lengths[b]``.

    >>> lengths_to_mask(torch.tensor([1, 3]))
    tensor([[ True, False, False],
            [ True,  True,  True]])
    """
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError(
            f"lengths: expected a 1-D tensor of sequence lengths, got "
            f"{type(lengths).__name__} with shape {getattr(lengths, 'shape', None)}"
        )
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths: expected non-negative lengths, got min {int(lengths.min())}")
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    steps = torch.arange(max_len, device=lengths.device)
    return steps < lengths.unsqueeze(-1)


class Trajectory(NamedTuple):
    """Sampled trajectories: latents ``z (num_samples, time, z_dim)`` and observations
    ``x (num_samples, time, obs_dim)`` (``(num_samples, time)`` class ids for a categorical
    emission); time at dim -2."""

    z: torch.Tensor
    x: torch.Tensor


class Reconstruction(NamedTuple):
    """``z (num_samples, batch, time, z_dim)`` drawn from a guide and ``means (num_samples,
    batch, time, obs_dim)`` the emission means E[x_t | z_t]."""

    z: torch.Tensor
    means: torch.Tensor


def check_sequences(x, mask, name="x") -> torch.Tensor:
    """Check ``x (batch, time, obs_dim)`` (float) or ``(batch, time)`` (class ids) and ``mask
    (batch, time)`` bool; returns the mask (all True when None)."""
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
    return check_mask(mask, (batch, steps))


def _where(keep: torch.Tensor, new: Any, old: Any) -> Any:
    """Select ``new`` where ``keep (batch,)`` else ``old``, leaf by leaf (batch first)."""
    if isinstance(new, torch.Tensor):
        return torch.where(keep.view((-1,) + (1,) * (new.dim() - 1)), new, old)
    return type(new)(_where(keep, a, b) for a, b in zip(new, old))


class _ABCPyroModuleMeta(type(PyroModule), abc.ABCMeta):
    pass


class StateSpaceModel(PyroModule, metaclass=_ABCPyroModuleMeta):
    r"""Public base class of pyrossm's state-space models: implement the dynamics and the
    emission, get the Pyro model, sampling, forecasting and reconstruction.

    .. math::
        s_0 = \text{initial\_state}, \quad z_t \sim \text{transition}(s_{t-1}), \quad
        s_t = \text{update}(s_{t-1}, z_t), \quad x_t \sim \text{emission}(z_t)

    Subclasses set ``obs_dim`` and ``z_dim`` and implement:

    * ``initial_state(batch_size, like)`` — the recurrent state before ``z_1`` (a tensor or a
      tuple of tensors with the batch first; ``like`` gives device and dtype);
    * ``transition(state)`` — ``p(z_t | state)``: a distribution with batch shape ``(batch,)``
      and event shape ``(z_dim,)``;
    * ``update(state, z_t)`` — the state after ``z_t (batch, z_dim)``;
    * ``emission(z)`` — ``p(x_t | z_t)`` for ``z (..., z_dim)``: one factor per observed entry,
      batch shape ``z.shape[:-1] + (obs_dim,)`` (or ``z.shape[:-1]`` for class ids).

    Sequences are ``(batch, time, obs_dim)`` with time at dim -2; ``mask (batch, time)`` marks
    real steps (right padding), NaN entries of ``x`` are missing. The generic ``prior`` runs
    the recursion step by step; override ``prior`` and ``state_after`` for speed (as
    ``DeepMarkovModel`` and ``LSTMStateSpaceModel`` do). Reference: Pyro's forecasting
    ``ForecastingModel`` (one extension point, the rest given); Krishnan et al. (2017).

    Example — a custom model with a tanh transition and a linear-Gaussian emission:

    >>> import pyro.distributions as dist
    >>> class TanhSSM(StateSpaceModel):
    ...     def __init__(self, obs_dim=2, z_dim=3):
    ...         super().__init__()
    ...         self.obs_dim, self.z_dim = obs_dim, z_dim
    ...         self.W = torch.nn.Linear(z_dim, z_dim)
    ...         self.C = torch.nn.Linear(z_dim, obs_dim)
    ...     def initial_state(self, batch_size, like):
    ...         return like.new_zeros(batch_size, self.z_dim)
    ...     def transition(self, state):
    ...         return dist.Normal(torch.tanh(self.W(state)), 0.5).to_event(1)
    ...     def update(self, state, z_t):
    ...         return z_t
    ...     def emission(self, z):
    ...         return dist.Normal(self.C(z), 0.1)
    >>> m = TanhSSM()
    >>> z, x = m.sample(num_steps=6, num_samples=4)
    >>> z.shape, x.shape
    (torch.Size([4, 6, 3]), torch.Size([4, 6, 2]))
    >>> guide = lambda x, mask=None: pyro.sample("z", m.prior(x.shape[0], x.shape[1], mask))
    >>> fc = m.forecast(x, horizon=3, num_samples=10, guide=guide)
    >>> fc.samples.shape, fc.mean.shape, fc.interval(0.9).lower.shape
    (torch.Size([10, 4, 3, 2]), torch.Size([4, 3, 2]), torch.Size([4, 3, 2]))
    """

    obs_dim: int
    z_dim: int
    max_plate_nesting = 1

    # ----------------------------------------------------------------- to implement
    @abc.abstractmethod
    def initial_state(self, batch_size: int, like: torch.Tensor):
        """The recurrent state before the first step, for ``batch_size`` sequences."""

    @abc.abstractmethod
    def transition(self, state):
        """``p(z_t | state)``: batch shape ``(batch,)``, event shape ``(z_dim,)``."""

    @abc.abstractmethod
    def update(self, state, z_t: torch.Tensor):
        """The state after ``z_t (batch, z_dim)``."""

    @abc.abstractmethod
    def emission(self, z: torch.Tensor):
        """``p(x_t | z_t)``, pointwise: batch shape ``z.shape[:-1] (+ (obs_dim,))``."""

    # ----------------------------------------------------------------- overridable defaults
    def emission_mean(self, z: torch.Tensor) -> torch.Tensor:
        """``E[x_t | z_t]`` (class probabilities for a categorical emission)."""
        d = self.emission(z)
        return d.probs if isinstance(d, torch.distributions.Categorical) else d.mean

    def observed(self, x: torch.Tensor, mask: torch.Tensor):
        """``(value, observed)`` for site ``"x"``: NaN entries of ``x`` are not observed (and
        replaced by 0); padded steps (``mask`` False) neither."""
        observed = mask.unsqueeze(-1) & ~torch.isnan(x)
        return torch.where(observed, x, torch.zeros_like(x)), observed

    def _param_like(self) -> torch.Tensor:
        for p in self.parameters():
            return p
        return torch.zeros(())

    def prior(self, batch_size: int, num_steps: int, mask=None, like=None):
        """The distribution of the latent site ``"z"``: batch ``(batch_size,)``, event
        ``(num_steps, z_dim)``; the generic version runs the recursion step by step."""
        like = self._param_like() if like is None else like

        def log_prob_fn(z):
            flat = z.reshape((-1,) + z.shape[-2:])
            state, lps = self.initial_state(flat.shape[0], like), []
            for t in range(flat.shape[-2]):
                lps.append(self.transition(state).log_prob(flat[:, t]))
                state = self.update(state, flat[:, t])
            return torch.stack(lps, -1).reshape(z.shape[:-1])

        def init_fn(shape):
            state = self.initial_state(math.prod(shape), like)
            return like.new_zeros(shape + (self.z_dim,)), (shape, state)

        def step_fn(t, z_prev, carried):
            shape, state = carried
            if t > 0:
                state = self.update(state, z_prev.reshape(-1, self.z_dim))
            d = self.transition(state)
            if len(shape) != 1:  # (sample_shape + batch) folded into one batch dim
                raise ValueError(f"sample_shape: the generic prior samples one batch dim, got "
                                 f"shape {tuple(shape)}")
            return d, (shape, state)

        return SequentialSequenceDistribution(log_prob_fn, init_fn, step_fn, (batch_size,),
                                              (num_steps, self.z_dim), mask=mask)

    def state_after(self, z: torch.Tensor, lengths: torch.Tensor):
        """The state after the first ``lengths[b]`` steps of ``z (batch, time, z_dim)``
        (generic: steps through ``update``, keeping each sequence's state at its length)."""
        state = self.initial_state(z.shape[0], z)
        for t in range(int(lengths.max()) if lengths.numel() else 0):
            state = _where(t < lengths, self.update(state, z[:, t]), state)
        return state

    # ----------------------------------------------------------------- the Pyro model
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Pyro model ``p(z_{1:T}) ∏_t p(x_t | z_t)`` (sites ``"z"`` and ``"x"``); returns z."""
        mask = check_sequences(x, mask)
        value, observed = self.observed(x, mask)
        batch, steps = x.shape[:2]
        like = x if x.is_floating_point() else self._param_like()
        with pyro.plate("sequences", batch, dim=-1):
            z = pyro.sample("z", self.prior(batch, steps, mask, like=like))
            likelihood = self.emission(z)
            event_dims = len(likelihood.batch_shape) - 1  # time (and obs_dim)
            pyro.sample("x", likelihood.mask(observed).to_event(event_dims), obs=value)
        return z

    def model(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """The protocol name of :meth:`forward`."""
        return self.forward(x, mask)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, num_steps: int, num_samples: int = 1) -> Trajectory:
        """Draw ``(z, x)`` from the prior: ``z (num_samples, num_steps, z_dim)``, ``x
        (num_samples, num_steps, obs_dim)``. Uses torch's global RNG (``pyro.set_rng_seed``)."""
        if num_steps < 0 or num_samples < 1:
            raise ValueError(
                f"num_steps, num_samples: expected >= 0 and >= 1, got {num_steps}, {num_samples}"
            )
        prior = self.prior(num_samples, num_steps)
        try:
            z = prior.rsample()
        except NotImplementedError:
            z = prior.sample()
        return Trajectory(z, self.emission(z).sample())

    def _guide_latent(self, guide, x, mask):
        trace = poutine.trace(guide).get_trace(x, mask)
        if "z" not in trace.nodes:
            raise ValueError("guide: expected a guide with a latent sample site named 'z'")
        return trace.nodes["z"]["value"]

    @torch.no_grad()
    def reconstruct(self, x, guide, mask=None, num_samples: int = 1):
        """Draw ``z ~ q(z | x)`` with ``guide``: ``(z, means)``, each ``(num_samples, batch,
        time, ·)`` (``means`` = E[x_t | z_t])."""
        mask = check_sequences(x, mask)
        batch = x.size(0)
        xs = x.repeat_interleave(num_samples, dim=0)
        ms = mask.repeat_interleave(num_samples, dim=0)
        z = self._guide_latent(guide, xs, ms)
        means = self.emission_mean(z)
        z = z.reshape(batch, num_samples, *z.shape[1:]).transpose(0, 1)
        means = means.reshape(batch, num_samples, *means.shape[1:]).transpose(0, 1)
        return Reconstruction(z, means)

    @torch.no_grad()
    def forecast(self, x, horizon: int, num_samples: int = 100, guide=None, mask=None) -> Forecast:
        """Forecast ``horizon`` steps past each sequence's own last real step.

        The latent trajectory of ``x (batch, time, obs_dim)`` — real steps given by ``mask``,
        right padding allowed — is drawn from ``guide`` (``num_samples`` draws per sequence);
        the prior then rolls forward from each sequence's length. Returns a
        :class:`~pyrossm.forecast.Forecast` (``samples (num_samples, batch, horizon, ·)``,
        Monte Carlo ``mean``, ``covariance=None``, per-path ``emission_means``).
        """
        if guide is None:
            raise ValueError("guide: forecast needs a guide to infer the latent state of x")
        if horizon < 1 or num_samples < 1:
            raise ValueError(f"horizon, num_samples: expected >= 1, got {horizon}, {num_samples}")
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point():
            raise ValueError(
                f"x: expected a batch of sequences (batch, time, {self.obs_dim}) with time at "
                f"dim -2, got a 2-D tensor of shape {tuple(x.shape)}; for one sequence pass "
                f"x.unsqueeze(0)"
            )
        mask = check_sequences(x, mask)
        batch = x.size(0)
        lengths = sequence_lengths(mask, mask.shape[-1])
        xs = x.repeat_interleave(num_samples, dim=0)
        ms = mask.repeat_interleave(num_samples, dim=0)
        z_prefix = self._guide_latent(guide, xs, ms)
        state = self.state_after(z_prefix, lengths.repeat_interleave(num_samples))
        steps = []
        for _ in range(horizon):
            z_t = self.transition(state).sample()
            steps.append(z_t)
            state = self.update(state, z_t)
        z = torch.stack(steps, dim=1)  # (batch * num_samples, horizon, z_dim)
        samples = self.emission(z).sample()
        means = self.emission_mean(z)

        def samples_first(t):
            return t.reshape(batch, num_samples, *t.shape[1:]).transpose(0, 1)

        z, samples, means = samples_first(z), samples_first(samples), samples_first(means)
        return Forecast(samples, z, means.mean(0), emission_means=means, lengths=lengths)
