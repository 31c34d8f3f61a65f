"""Evaluators: per-sequence ELBO, importance-weighted log-likelihood (IWAE), KL per step.

For a sequence ``x`` (shape ``(T, obs_dim)``, time at dim -2 of a batch) and ``K`` draws
``z_k ~ q(z | x)`` the log importance weights are
``log w_k = log p(x, z_k) - log q(z_k | x)`` and

* ``elbo = mean_k log w_k``                          (a lower bound on ``log p(x)``)
* ``log_likelihood = logsumexp_k log w_k - log K``   (IWAE bound, Burda et al. 2016; increases
  with K and tends to ``log p(x)``)
* ``kl_per_step = mean_k (log q(z_k | x) - log p(z_k)) / steps``  (the single-sample KL
  estimate over the latent sites divided by the number of observed steps,
  :func:`observed_steps`)
* ``smc_log_likelihood``: a third estimate of ``log p(x)``, the log of the particle filter's
  unbiased estimate ``p̂(x)`` (:func:`pyrossm.filters.particle_filter`, bootstrap or with the
  guide's per-step conditionals as proposals). It resamples, so with a poor guide (or none) it
  stays useful on long sequences where the IWAE weights degenerate.

Weights are computed from ``poutine.trace(guide)`` and ``poutine.replay(model)`` traces, with
every site's log-density summed per sequence (batch dim -1). The ``K`` draws are made by
repeating the batch (``repeat_interleave``) in chunks of at most ``chunk_size`` draws, so memory
is bounded by ``batch_size * chunk_size`` sequences per forward pass; chunks are combined with
``logsumexp``. Everything runs with annealing factor 1, under ``torch.no_grad()``, with model
and guide in eval mode (their previous mode is restored).

Example
-------
>>> # ll = log_likelihood(model, guide, (x, mask), num_samples=1000)    # (N,)
>>> # per_step = ll.sum() / observed_steps((x, mask)).sum()
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyrossm.infer.data import as_dataset, repeat_particles
from pyrossm.infer.handlers import latent_sites, site_log_probs_per_row
from pyrossm.infer.params import claim_param_store, owner_module

__all__ = [
    "ELBOResult",
    "Evaluation",
    "elbo",
    "elbo_terms",
    "evaluate",
    "importance_log_weights",
    "kl_per_step",
    "log_likelihood",
    "observed_steps",
    "smc_log_likelihood",
]


class ELBOResult(NamedTuple):
    """Per-sequence results, each of shape ``(N,)``.

    ``elbo``: mean over draws of ``log p(x, z) - log q(z|x)``; ``kl``: mean over draws of
    ``log q(z|x) - log p(z)`` (latent sites); ``reconstruction``: ``elbo + kl`` (the expected
    log-likelihood of the observations); ``num_steps``: observed steps (:func:`observed_steps`).
    """

    elbo: torch.Tensor
    kl: torch.Tensor
    reconstruction: torch.Tensor
    num_steps: torch.Tensor


@contextlib.contextmanager
def _eval_mode(*modules):
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def _device_of(model, guide, device):
    if device is not None:
        return torch.device(device)
    for module in (guide, model):
        for p in module.parameters():
            return p.device
        for b in module.buffers():
            return b.device
    return None


def _check_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _log_weight_terms(model, guide, x, mask, num_samples):
    """``(log_w, kl)`` each of shape ``(B, num_samples)`` for one batch and one chunk."""
    rows = x.shape[0] * num_samples
    xr, mr = repeat_particles(x, mask, num_samples)
    guide_trace = poutine.trace(guide).get_trace(xr, mask=mr)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(xr, mask=mr)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    latent_names = {name for name, _ in latent_sites(guide_trace)}
    log_p, log_q, kl = [], [], []
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and "log_prob" in site and not site_is_subsample(site):
            lp = site_log_probs_per_row(site, rows)
            log_p.append(lp)
            if not site["is_observed"]:
                kl.append(-lp)
    for name, site in guide_trace.nodes.items():
        if name in latent_names and "log_prob" in site:
            lp = site_log_probs_per_row(site, rows)
            log_q.append(lp)
            kl.append(lp)
    if not log_p:
        raise ValueError("model: no sample site was found in the model trace")
    zero = torch.zeros_like(log_p[0])
    log_p, log_q, kl = sum(log_p, zero), sum(log_q, zero), sum(kl, zero)
    shape = (x.shape[0], num_samples)
    return (log_p - log_q).reshape(shape), kl.reshape(shape)


def _batches(data, batch_size, device):
    dataset = as_dataset(data)
    if device is not None:
        dataset = dataset.to(device)
    n = len(dataset)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n))
        x, mask = dataset.batch(index, trim=True)
        yield x, mask, dataset.num_steps[index]


def _chunks(num_samples, chunk_size, batch_rows):
    if chunk_size is None:
        chunk_size = max(1, 8192 // max(batch_rows, 1))
    _check_positive("chunk_size", chunk_size)
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        yield k
        done += k


def importance_log_weights(
    model, guide, data, num_samples: int = 1, batch_size: int = 64,
    chunk_size: int | None = None, device=None,
) -> torch.Tensor:
    """Log importance weights ``log p(x, z_k) - log q(z_k | x)``, shape ``(N, num_samples)``."""
    return _weights_and_kl(model, guide, data, num_samples, batch_size, chunk_size, device)[0]


def _weights_and_kl(model, guide, data, num_samples, batch_size, chunk_size, device):
    _check_positive("num_samples", num_samples)
    _check_positive("batch_size", batch_size)
    modules = owner_module(model, "model"), owner_module(guide, "guide")
    claim_param_store(*modules)
    device = _device_of(*modules, device)
    log_ws, kls, steps = [], [], []
    with _eval_mode(*modules):
        for x, mask, num_steps in _batches(data, batch_size, device):
            chunks_w, chunks_kl = [], []
            for k in _chunks(num_samples, chunk_size, x.shape[0]):
                lw, kl = _log_weight_terms(model, guide, x, mask, k)
                chunks_w.append(lw)
                chunks_kl.append(kl)
            log_ws.append(torch.cat(chunks_w, dim=1))
            kls.append(torch.cat(chunks_kl, dim=1))
            steps.append(num_steps)
    return torch.cat(log_ws), torch.cat(kls), torch.cat(steps)


def elbo_terms(
    model, guide, data, num_samples: int = 1, batch_size: int = 64,
    chunk_size: int | None = None, device=None,
) -> ELBOResult:
    """Per-sequence ELBO, KL and reconstruction term (see :class:`ELBOResult`).

    :param data: a tensor ``(N, T, D)`` / ``(N, T)`` long, ``(x, mask)``, ``(x, lengths)`` or a
        :class:`~pyrossm.infer.data.SequenceDataset`.
    :param num_samples: draws from the guide averaged per sequence.
    """
    log_w, kl, steps = _weights_and_kl(
        model, guide, data, num_samples, batch_size, chunk_size, device
    )
    e, k = log_w.mean(1), kl.mean(1)
    return ELBOResult(e, k, e + k, steps.to(e.device))


def elbo(model, guide, data, num_samples: int = 1, batch_size: int = 64,
         chunk_size: int | None = None, device=None) -> torch.Tensor:
    """Per-sequence ELBO, shape ``(N,)``, averaged over ``num_samples`` guide draws."""
    return elbo_terms(model, guide, data, num_samples, batch_size, chunk_size, device).elbo


def log_likelihood(model, guide, data, num_samples: int = 100, batch_size: int = 64,
                   chunk_size: int | None = None, device=None) -> torch.Tensor:
    """Importance-weighted estimate of ``log p(x)`` per sequence, shape ``(N,)``.

    ``logsumexp_k log w_k - log K`` with ``K = num_samples`` draws from the guide (the IWAE bound
    of Burda et al. 2016); at most ``chunk_size`` draws per forward pass (default: about 8192
    sequences per pass).
    """
    log_w = importance_log_weights(
        model, guide, data, num_samples, batch_size, chunk_size, device
    )
    return torch.logsumexp(log_w, dim=1) - math.log(num_samples)


def kl_per_step(model, guide, data, num_samples: int = 1, batch_size: int = 64,
                chunk_size: int | None = None, device=None) -> torch.Tensor:
    """Per-sequence ``(log q(z|x) - log p(z)) / steps``, shape ``(N,)`` (mean over draws)."""
    res = elbo_terms(model, guide, data, num_samples, batch_size, chunk_size, device)
    return res.kl / res.num_steps.clamp(min=1).to(res.kl.dtype)


def smc_log_likelihood(model, data, num_particles: int = 1000, guide=None, batch_size: int = 64,
                       resampling: str = "systematic", ess_threshold: float = 0.5,
                       device=None) -> torch.Tensor:
    """Sequential Monte Carlo estimate of ``log p(x)`` per sequence, shape ``(N,)``.

    ``log p̂(x)`` of :func:`pyrossm.filters.particle_filter` with ``num_particles`` particles per
    sequence: the model's transition as proposal (``guide=None``, bootstrap) or the guide's
    per-step conditionals (``StructuredGuide``: ``q(z_t | z_{t-1}, h_t)``;
    ``FilteringLSTMGuide``: ``q(z_t | x_{≤t})``); resampling when the effective sample size
    drops below ``ess_threshold * num_particles``. ``p̂`` is unbiased, so ``E[log p̂] ≤ log p``
    like the ELBO and IWAE bounds, and it tends to ``log p(x)`` as ``num_particles`` grows.

    :param model: ``LinearGaussianSSM``, ``DeepMarkovModel``, ``LSTMStateSpaceModel`` (or a
        bound method of one, e.g. ``ssm.model``).
    :param data: ``x`` (N, T, D) (time at dim -2), ``(x, mask)``, ``(x, lengths)`` or a
        :class:`~pyrossm.infer.data.SequenceDataset`.

    >>> import pyrossm
    >>> ssm = pyrossm.LinearGaussianSSM.from_matrices(A=[[0.9]], C=[[1.0]], Q=[[0.5]], R=[[1.0]])
    >>> _, x = ssm.sample(30, num_samples=5)
    >>> smc_log_likelihood(ssm, x, num_particles=100).shape
    torch.Size([5])
    """
    from pyrossm.filters import particle_filter  # the filters import the models; keep it lazy

    _check_positive("num_particles", num_particles)
    _check_positive("batch_size", batch_size)
    module = owner_module(model, "model")
    modules = (module,) if guide is None else (module, owner_module(guide, "guide"))
    if device is None:
        device = _device_of(module, modules[-1], None)
    out = []
    with _eval_mode(*modules):
        for x, mask, _ in _batches(data, batch_size, device):
            res = particle_filter(module, x, mask=mask, num_particles=num_particles,
                                  guide=modules[1] if guide is not None else None,
                                  resampling=resampling, ess_threshold=ess_threshold)
            out.append(res.log_likelihood)
    return torch.cat(out)


class Evaluation(NamedTuple):
    """Held-out figures of a model/guide pair (:func:`evaluate`).

    Per-sequence tensors ``(N,)``: ``elbo``, ``log_likelihood`` (IWAE), ``kl``, ``smc``
    (particle-filter estimate, None unless asked for), ``num_steps`` (observed steps). Per-step
    floats, summed over sequences and divided by the total number of observed steps (the one
    "per step" of pyrossm: steps inside the mask with at least one observed entry):
    ``elbo_per_step``, ``log_likelihood_per_step``, ``kl_per_step``, ``smc_per_step``.
    """

    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    kl: torch.Tensor
    smc: torch.Tensor | None
    num_steps: torch.Tensor
    elbo_per_step: float
    log_likelihood_per_step: float
    kl_per_step: float
    smc_per_step: float | None
    num_samples: int
    elbo_samples: int


def evaluate(model, guide, data, *, num_samples: int = 100, elbo_samples: int = 1,
             smc_particles: int = 0, batch_size: int = 64, chunk_size: int | None = None,
             device=None) -> Evaluation:
    """ELBO, IWAE and (optionally) particle-filter estimates of ``log p(x)`` on ``data``.

    The one evaluation path of pyrossm: the CLI, the demo and the experiments report these
    figures. ``data``: ``x (N, T, D)`` (time at dim -2; NaN = missing), ``(N, T)`` token ids,
    ``(x, mask)``, ``(x, lengths)`` or a :class:`~pyrossm.infer.data.SequenceDataset`.
    ``num_samples``: guide draws of the IWAE bound (Burda et al. 2016); ``elbo_samples``: draws
    averaged in the ELBO; ``smc_particles > 0`` adds :func:`smc_log_likelihood` with the guide
    as proposal when it can give per-step proposals (``StructuredGuide``,
    ``FilteringLSTMGuide``), else with the model's transition (bootstrap); state-space models
    only. Per-step figures divide by the number of observed
    steps (:func:`observed_steps`).

    >>> import pyrossm
    >>> from pyrossm.guides import StructuredGuide
    >>> ssm = pyrossm.LinearGaussianSSM.from_matrices(A=[[0.9]], C=[[1.0]], Q=[[0.5]], R=[[1.0]])
    >>> _, x = ssm.sample(20, num_samples=3)
    >>> ev = evaluate(ssm.model, StructuredGuide(1, 1), x, num_samples=10)
    >>> ev.log_likelihood.shape, ev.elbo_per_step <= ev.log_likelihood_per_step + 1.0
    (torch.Size([3]), True)
    """
    _check_positive("elbo_samples", elbo_samples)
    terms = elbo_terms(model, guide, data, elbo_samples, batch_size, chunk_size, device)
    iwae = log_likelihood(model, guide, data, num_samples, batch_size, chunk_size, device)
    smc = None
    if smc_particles:
        smc = smc_log_likelihood(model, data, smc_particles, guide=_proposal_or_none(guide),
                                 batch_size=batch_size, device=device)
    steps = observed_steps(data)
    total = max(int(steps.sum()), 1)

    def per_step(values):
        return None if values is None else float(values.sum()) / total

    return Evaluation(
        terms.elbo, iwae, terms.kl, smc, steps, per_step(terms.elbo), per_step(iwae),
        per_step(terms.kl), per_step(smc), num_samples, elbo_samples,
    )


def _proposal_or_none(guide):
    """The guide when the particle filter can use it as a per-step proposal, else None."""
    from pyrossm.filters.proposals import as_proposal  # the filters import the models

    module = owner_module(guide, "guide")
    try:
        as_proposal(module)
    except TypeError:
        return None
    return guide


def observed_steps(data) -> torch.Tensor:
    """Observed steps per sequence, ``(N,)``: steps inside the mask (right padding excluded)
    with at least one observed (non-NaN) entry; every real step for token ids.

    >>> observed_steps(torch.tensor([[[1.0], [float("nan")], [2.0]]])).tolist()
    [2]
    """
    return as_dataset(data).num_steps
