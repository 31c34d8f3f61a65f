"""Per-step Gaussian densities for sequential Monte Carlo: the model's side and the proposal's.

A particle filter needs, at every step ``t`` and for every particle, the model's transition
``p(z_t | z_{<t})`` and emission ``p(x_t | z_t)``, and a proposal ``q(z_t | z_{t-1}, x)`` it can
sample and evaluate. This module adapts pyrossm's models and guides to that per-step view:

* :func:`as_state_space` — ``LinearGaussianSSM`` and every :class:`pyrossm.protocol.
  StateSpaceModel` (``DeepMarkovModel``, ``LSTMStateSpaceModel``, a user's subclass: its
  ``initial_state / transition / update / emission``) → :class:`StateSpace`;
* :func:`as_proposal` — :class:`~pyrossm.guides.StructuredGuide` (``q(z_t | z_{t-1}, h_t)``
  from its combiner's ``prepare``/``step``, the same conditionals its trajectory distribution
  samples) and :class:`~pyrossm.guides.FilteringLSTMGuide` (``q(z_t | x_{≤t})``) →
  :class:`Proposal`; a user's own proposal subclasses :class:`Proposal`.

Particles are laid out ``(batch, num_particles, dim)``; networks see them flattened to
``(batch * num_particles, dim)`` rows (batch-major). Sequences are ``(batch, time, obs_dim)``
with time at dim -2.
"""

from __future__ import annotations

import torch

from pyrossm._gaussian import LOG_2PI as _LOG_2PI

__all__ = ["Gaussian", "Proposal", "StateSpace", "as_proposal", "as_state_space"]



class Gaussian:
    """``N(loc, diag scale²)`` (``tril=False``) or ``N(loc, scale scaleᵀ)`` (``tril=True``) over the
    last dim; ``loc (..., D)``, ``scale (..., D)`` or ``(..., D, D)``; :meth:`rsample` and
    :meth:`log_prob` (summed over ``D``)."""

    def __init__(self, loc, scale, tril=False):
        self.loc, self.scale, self.tril = loc, scale, tril

    def rsample(self):
        eps = torch.randn_like(self.loc)
        if self.tril and self.scale.dim() == 2:  # one factor for every row: one GEMM
            return self.loc + eps @ self.scale.T
        if self.tril:
            return self.loc + (self.scale @ eps.unsqueeze(-1)).squeeze(-1)
        return self.loc + self.scale * eps

    def log_prob(self, z):
        d = z - self.loc
        D = z.shape[-1]
        if self.tril:
            # Invert the (often shared) factor once and multiply: much faster than a batched
            # triangular solve over every particle.
            eye = torch.eye(D, dtype=self.scale.dtype, device=self.scale.device)
            L_inv = torch.linalg.solve_triangular(self.scale, eye, upper=False)
            if L_inv.dim() == 2:
                w = d @ L_inv.T
            else:
                w = (L_inv @ d.unsqueeze(-1)).squeeze(-1)
            logdet = torch.log(torch.diagonal(self.scale, dim1=-2, dim2=-1)).sum(-1)
        else:
            w = d / self.scale
            logdet = torch.log(self.scale).expand_as(d).sum(-1)
        return -0.5 * (w.pow(2).sum(-1) + D * _LOG_2PI) - logdet


def _rows(t, B, N):
    """``(B, ...)`` → ``(B * N, ...)``: one copy per particle (batch-major)."""
    return t.unsqueeze(1).expand((B, N) + t.shape[1:]).reshape((B * N,) + t.shape[1:])


class StateSpace:
    """The model's side of a particle filter (subclass for a new model).

    ``start(x, mask, num_particles)`` prepares a batch; ``initial_state()``;
    ``transition(state)``: the distribution of ``z_t`` given the particles' past (rows
    ``(B * N, D)``; anything with ``rsample()`` and ``log_prob(z)``, e.g. a
    :class:`Gaussian`); ``advance(state, z_t) -> state``; ``emission_log_prob(t, z_t)`` →
    ``(B, N)``, 0 for unobserved entries; ``gather(state, index)`` reorders particles (rows).
    For ``particle_filter(..., resample_every=k)`` also ``emission_log_prob_block(t0, z_block)``
    (a default loops over ``emission_log_prob``) and a ``transition`` that accepts the states of
    several steps concatenated along the particle rows.
    """

    z_dim: int

    def start(self, x, mask, num_particles):
        raise NotImplementedError

    def initial_state(self):
        raise NotImplementedError

    def transition(self, state) -> Gaussian:
        raise NotImplementedError

    def advance(self, state, z_t):
        raise NotImplementedError

    def emission_log_prob(self, t, z_t):
        raise NotImplementedError

    def gather(self, state, index):
        return _gather_tree(state, index)

    def emission_log_prob_block(self, t0, z_block):
        """``emission_log_prob`` of steps ``t0 .. t0 + k - 1`` at once: ``z_block (k, B * N,
        D)`` → ``(k, B, N)``. Override with one batched call where the emission allows."""
        return torch.stack([self.emission_log_prob(t0 + j, z) for j, z in enumerate(z_block)])


def cat_states(states, rows):
    """The states of several steps (each with ``rows`` particle rows) as one state with their
    rows one after the other, for one batched :meth:`StateSpace.transition` call (rows at
    dim 0, or dim 1 for an RNN's ``(layers, rows, hidden)`` state, as :func:`_gather_tree`)."""
    first = states[0]
    if isinstance(first, (tuple, list)):
        return type(first)(cat_states(list(parts), rows) for parts in zip(*states))
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"state: cannot batch a state of type {type(first).__name__}")
    dim = 1 if first.dim() == 3 and first.shape[1] == rows and first.shape[0] != rows else 0
    return torch.cat(states, dim)


def _gather_tree(state, index):
    """Reorder the rows of every tensor in ``state`` (rows at dim 0, or dim 1 for an RNN's
    ``(layers, rows, hidden)`` state)."""
    if isinstance(state, (tuple, list)):
        return type(state)(_gather_tree(s, index) for s in state)
    if not isinstance(state, torch.Tensor):  # None, sizes, ...: nothing to reorder
        return state
    rows = index.shape[0]
    if state.dim() == 3 and state.shape[1] == rows and state.shape[0] != rows:
        return state.index_select(1, index)
    return state.index_select(0, index)


class _LinearGaussian(StateSpace):
    """``LinearGaussianSSM``: ``z_1 ~ N(m0, P0)``, ``z_t ~ N(A z_{t-1}, Q)``, ``x_t ~ N(C z_t, R)``
    with full covariances; partially observed ``x_t`` use the marginal of the observed entries."""

    def __init__(self, ssm):
        self.ssm = ssm
        self.z_dim = ssm.state_dim

    def start(self, x, mask, num_particles):
        if x.dim() != 3 or x.shape[-1] != self.ssm.obs_dim:
            raise ValueError(f"x: expected shape (batch, time, obs_dim={self.ssm.obs_dim}), "
                             f"got {tuple(x.shape)}")
        mats = {k: v.to(x) for k, v in self.ssm.matrices().items()}
        self.A, self.C = mats["A"], mats["C"]
        self.LQ = torch.linalg.cholesky(mats["Q"])
        self.L0 = torch.linalg.cholesky(mats["init_cov"])
        self.m0, self.R = mats["init_mean"], mats["R"]
        self.LR = torch.linalg.cholesky(self.R)
        obs = ~torch.isnan(x)
        if mask is not None:
            obs = obs & mask.unsqueeze(-1)
        self.obs = obs
        self.x = torch.where(obs, x, torch.zeros((), dtype=x.dtype, device=x.device))
        self.B, self.N = x.shape[0], num_particles

    def initial_state(self):
        return None

    def transition(self, state):
        if state is None:
            loc = self.m0.expand(self.B * self.N, self.z_dim)
            return Gaussian(loc, self.L0, tril=True)
        return Gaussian(state @ self.A.T, self.LQ, tril=True)

    def advance(self, state, z_t):
        return z_t

    def emission_log_prob(self, t, z_t):
        B, N = self.B, self.N
        v = self.x[:, t].unsqueeze(1) - (z_t @ self.C.T).reshape(B, N, -1)  # (B, N, p)
        o = self.obs[:, t]
        if bool(o.all()):
            return Gaussian(torch.zeros_like(v), self.LR, tril=True).log_prob(v)
        of = o.to(v.dtype)
        eye = torch.eye(o.shape[-1], dtype=v.dtype, device=v.device)
        R_o = self.R * (of.unsqueeze(-1) * of.unsqueeze(-2)) + eye * (1 - of).unsqueeze(-1)
        L = torch.linalg.cholesky(R_o)  # (B, p, p), one per sequence
        L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
        w = (v * of.unsqueeze(1)) @ L_inv.transpose(-1, -2)  # (B, N, p)
        logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1, keepdim=True)
        lp = -0.5 * (w.pow(2).sum(-1) + v.shape[-1] * _LOG_2PI) - logdet
        return lp + 0.5 * _LOG_2PI * (1 - of).sum(-1, keepdim=True)


class _ProtocolStateSpace(StateSpace):
    """Any :class:`pyrossm.protocol.StateSpaceModel` (``DeepMarkovModel``,
    ``LSTMStateSpaceModel``, a user's subclass): ``initial_state``, ``transition`` (a
    distribution with ``rsample``/``log_prob``), ``update`` and the pointwise ``emission`` with
    its ``observed`` (NaN entries / negative class ids missing)."""

    def __init__(self, model):
        self.model = model
        self.z_dim = model.z_dim

    def start(self, x, mask, num_particles):
        steps_mask = mask if mask is not None else torch.ones(
            x.shape[:2], dtype=torch.bool, device=x.device)
        self.value, self.observed = self.model.observed(x, steps_mask)
        self.B, self.N = x.shape[0], num_particles
        self.like = x if x.is_floating_point() else self.model._param_like()

    def initial_state(self):
        return self.model.initial_state(self.B * self.N, self.like)

    def transition(self, state):
        return self.model.transition(state)

    def advance(self, state, z_t):
        return self.model.update(state, z_t)

    def emission_log_prob(self, t, z_t):
        B, N = self.B, self.N
        dist = self.model.emission(z_t.reshape(B, N, -1))
        value, obs = self.value[:, t].unsqueeze(1), self.observed[:, t].unsqueeze(1)
        lp = dist.log_prob(value.expand(dist.batch_shape))
        lp = torch.where(obs, lp, lp.new_zeros(()))
        return lp.sum(-1) if lp.dim() == 3 else lp

    def emission_log_prob_block(self, t0, z_block):
        k, B, N = z_block.shape[0], self.B, self.N
        z = z_block.reshape(k, B, N, -1).transpose(0, 1)  # (B, k, N, D)
        dist = self.model.emission(z)
        value = self.value[:, t0 : t0 + k].unsqueeze(2)  # (B, k, 1, ...)
        obs = self.observed[:, t0 : t0 + k].unsqueeze(2)
        lp = dist.log_prob(value.expand(dist.batch_shape))
        lp = torch.where(obs, lp, lp.new_zeros(()))
        lp = lp.sum(-1) if lp.dim() == 4 else lp  # (B, k, N)
        return lp.transpose(0, 1)


def as_state_space(model) -> StateSpace:
    """Adapt a pyrossm model (``LinearGaussianSSM``, or any
    :class:`pyrossm.protocol.StateSpaceModel`: ``DeepMarkovModel``, ``LSTMStateSpaceModel``, a
    user's subclass) or pass a :class:`StateSpace` through."""
    if isinstance(model, StateSpace):
        return model
    from pyrossm.lgssm import LinearGaussianSSM
    from pyrossm.protocol import StateSpaceModel

    if isinstance(model, LinearGaussianSSM):
        return _LinearGaussian(model)
    if isinstance(model, StateSpaceModel):
        return _ProtocolStateSpace(model)
    raise TypeError(
        "model: expected a LinearGaussianSSM, a pyrossm.protocol.StateSpaceModel (e.g. "
        "DeepMarkovModel, LSTMStateSpaceModel) or a pyrossm.filters.StateSpace, got "
        f"{type(model).__name__}")


class Proposal:
    """The proposal's side of a particle filter (subclass for a new proposal).

    ``start(x, mask, num_particles)`` runs whatever looks at the whole batch once (e.g. an
    RNN over ``x``); ``initial()`` → the ``z_0`` rows the first step conditions on (or None);
    ``step(t, z_prev) -> Gaussian`` over ``z_t`` for every particle row ``(B * N, D)``.
    """

    def start(self, x, mask, num_particles):
        raise NotImplementedError

    def initial(self):
        return None

    def step(self, t, z_prev) -> Gaussian:
        raise NotImplementedError


class _StructuredProposal(Proposal):
    """``q(z_t | z_{t-1}, h_t)`` of a :class:`~pyrossm.guides.StructuredGuide`."""

    def __init__(self, guide):
        self.guide = guide

    def start(self, x, mask, num_particles):
        comb = self.guide.combiner
        self.ctx = comb.prepare(self.guide.features(x, mask))  # each (B, T, ...)
        self.B, self.N = x.shape[0], num_particles

    def initial(self):
        z0 = self.guide.combiner.z0
        return z0.expand(self.B * self.N, z0.shape[-1])

    def step(self, t, z_prev):
        ctx_t = tuple(_rows(c[:, t], self.B, self.N) for c in self.ctx)
        loc, scale = self.guide.combiner.step(z_prev, ctx_t)
        return Gaussian(loc, scale, tril=self.guide.scale_tril)


class _FilteringProposal(Proposal):
    """``q(z_t | x_{≤t})`` of a :class:`~pyrossm.guides.FilteringLSTMGuide` (no ``z_{t-1}``)."""

    def __init__(self, guide):
        self.guide = guide

    def start(self, x, mask, num_particles):
        q = self.guide.distribution(x, mask)
        self.loc, self.scale = q.loc, q.scale  # (B, T, D)
        self.B, self.N = x.shape[0], num_particles

    def step(self, t, z_prev):
        return Gaussian(_rows(self.loc[:, t], self.B, self.N),
                        _rows(self.scale[:, t], self.B, self.N))


def as_proposal(guide) -> Proposal | None:
    """``None`` (bootstrap: the model's transition), a ``StructuredGuide``, a
    ``FilteringLSTMGuide`` or a :class:`Proposal`."""
    if guide is None or isinstance(guide, Proposal):
        return guide
    from pyrossm.guides import FilteringLSTMGuide, StructuredGuide

    if isinstance(guide, StructuredGuide):
        return _StructuredProposal(guide)
    if isinstance(guide, FilteringLSTMGuide):
        return _FilteringProposal(guide)
    raise TypeError("guide: expected None (bootstrap), a StructuredGuide, a FilteringLSTMGuide or "
                    f"a pyrossm.filters.Proposal, got {type(guide).__name__}")
