r"""Filtering variational objectives (FIVO / AESMC): training through a particle filter.

For a sequence ``x`` (``(T, obs_dim)``, time at dim -2 of a batch) the particle filter of
:func:`pyrossm.filters.particle_filter`, with the guide's per-step conditionals
``q(z_t | z_{t-1}, x)`` as proposals and ``K`` particles, gives an unbiased estimate ``p̂_K(x)``
of ``p(x)``. By Jensen's inequality

.. math::
    \mathcal L^{\mathrm{FIVO}}_K(x) = \mathbb E\big[\log \hat p_K(x)\big] \le \log p(x),

a lower bound that is tighter than the ELBO (``K = 1``, no resampling, is the ELBO) and, unlike
the IWAE bound, stays tight on long sequences because the particles are resampled when their
effective sample size drops. Its gradient is estimated with reparameterised proposals and
*without* the score-function term of the resampling steps (as in the papers; that term has high
variance and is small in practice).

References: Maddison et al. (2017), "Filtering Variational Objectives", NeurIPS; Le et al.
(2018), "Auto-Encoding Sequential Monte Carlo", ICLR; Naesseth et al. (2018), "Variational
Sequential Monte Carlo", AISTATS.

The guides of :mod:`pyrossm.guides` provide per-step proposals directly:
``StructuredGuide`` (its combiner's ``q(z_t | z_{t-1}, h_t)``, the conditionals its trajectory
distribution samples, ``h`` from a forward, backward or bidirectional RNN over ``x``) and
``FilteringLSTMGuide`` (``q(z_t | x_{≤t})``); any :class:`pyrossm.filters.Proposal` works too.

Use it in training with ``pyrossm.infer.fit(..., objective="fivo", num_particles=K)``, or
directly:

>>> import torch
>>> from pyrossm import DeepMarkovModel, StructuredGuide
>>> model = DeepMarkovModel(obs_dim=2, z_dim=2, transition_dim=8, emission_dim=8,
...                         emission="gaussian")
>>> guide = StructuredGuide(obs_dim=2, state_dim=2, hidden_dim=8)
>>> obj = fivo_objective(model, guide, torch.randn(3, 10, 2), num_particles=4)
>>> obj.surrogate.backward()          # gradients for model and guide
>>> obj.log_likelihood.shape
torch.Size([3])
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyrossm.infer.params import owner_module

__all__ = ["FIVOObjective", "fivo_objective"]


class FIVOObjective(NamedTuple):
    """FIVO for one batch (sums over the batch's sequences, like the ELBO step objective).

    ``surrogate``: differentiate this (``-Σ_b log p̂(x_b)``, gradients through the
    reparameterised particles). ``loss``, ``neg_elbo``: its value, detached (``neg_elbo`` is
    the negative FIVO bound, reported where the trainer reports the negative ELBO). ``kl``: the
    particle average of ``Σ_t log q(z_t | ·) - log p(z_t | z_{<t})``, summed over the batch
    (detached). ``log_likelihood``: ``log p̂(x_b)``, shape ``(batch,)`` (with gradient).
    """

    surrogate: torch.Tensor
    loss: torch.Tensor
    neg_elbo: torch.Tensor
    kl: torch.Tensor
    log_likelihood: torch.Tensor


def fivo_objective(model, guide, x, mask=None, num_particles: int = 4,
                   resampling: str = "systematic", ess_threshold: float = 0.5,
                   resample_every: int = 1) -> FIVOObjective:
    """FIVO / AESMC objective of the batch ``x`` (see the module docstring).

    :param model: ``DeepMarkovModel``, ``LSTMStateSpaceModel`` or ``LinearGaussianSSM`` (or a
        bound method of one, e.g. ``ssm.model``).
    :param guide: the proposal: ``StructuredGuide``, ``FilteringLSTMGuide``, a
        :class:`pyrossm.filters.Proposal`, or None (bootstrap: only the model is trained).
    :param x: ``(batch, time, obs_dim)``, time at dim -2, NaN = missing; ``mask`` ``(batch,
        time)`` bool, False = padding.
    :param num_particles: ``K``; ``resampling``, ``ess_threshold``, ``resample_every``: as
        in :func:`~pyrossm.filters.particle_filter` (``resample_every=k`` considers resampling
        every ``k`` steps only, and evaluates the model once per block: a cheaper step).

    The value of ``-surrogate`` equals ``particle_filter(...).log_likelihood.sum()`` for the
    same random numbers.
    """
    from pyrossm.filters import particle_filter  # the filters import the models; keep it lazy

    module = owner_module(model, "model")
    proposal = guide
    if isinstance(getattr(guide, "__self__", None), torch.nn.Module):  # a bound method
        proposal = guide.__self__
    res = particle_filter(module, x, mask=mask, num_particles=num_particles, guide=proposal,
                          resampling=resampling, ess_threshold=ess_threshold, moments=False,
                          resample_every=resample_every)
    surrogate = -res.log_likelihood.sum()
    loss = surrogate.detach()
    return FIVOObjective(surrogate, loss, loss, res.kl.sum(), res.log_likelihood)
