"""Evaluation of sequence VAEs and language models: NLL bounds, perplexity, KL, I(x; z), active
units.

For a sentence ``x`` with ``T`` predicted tokens (``<eos>`` included), a guide ``q(z | x)`` and
``K`` samples ``z_k ~ q(z | x)``::

    ELBO(x)  = (1/K) Σ_k log p(x | z_k) − KL[q(z | x) ‖ p(z)]                (closed-form KL)
    IWAE_K(x) = log (1/K) Σ_k p(x | z_k) p(z_k) / q(z_k | x)    (Burda et al. 2016)

``E[IWAE_K] ≥ ELBO``.
    perplexity = exp(Σ_x NLL(x) / Σ_x T_x)

``NLL`` is ``−ELBO`` (an upper bound) or ``−IWAE_K`` (a tighter upper bound, → −log p(x) as
K → ∞); every result says which. For a model without latent (``latent_dim == 0``) both equal the
exact ``−log p(x)``. The decoder is evaluated for all K samples of a batch at once (chunks of
samples bound the memory), never in a Python loop over samples or sentences.

Mutual information (minibatch-aggregate estimator, Hoffman & Johnson 2016; He et al. 2019)::

    I(x; z) ≈ E_x E_{q(z|x)} [log q(z | x) − log q(z)],   q(z) ≈ (1/B) Σ_{j in batch} q(z | x_j)

(at most ``log B``). Active units (Burda et al. 2016): dimensions ``d`` with
``Var_x(E_q[z_d | x]) > 0.01``.

Duck typing: ``guide.posterior(x, mask) -> (loc, scale)`` and
``model.log_likelihood_given_z(x, mask, z) -> (batch,)``; batches are tuples ``(x, mask, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from pyrossm._gaussian import LOG_2PI as _LOG_2PI

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "SequenceEvaluation",
    "active_units",
    "evaluate",
    "gaussian_kl",
    "importance_weighted_bounds",
    "mutual_information",
    "perplexity",
]

ACTIVE_UNIT_THRESHOLD = 0.01


class SequenceEvaluation(NamedTuple):
    """Per-sentence averages in nats (``nll_elbo = −ELBO``, ``nll_iwae = −IWAE_K``), perplexities
    from the summed NLLs over all predicted tokens, KL, mutual information (nats) and active
    units."""

    num_sentences: int
    num_tokens: int
    nll_elbo: float
    nll_iwae: float
    kl: float
    perplexity_elbo: float
    perplexity_iwae: float
    mutual_info: float
    active_units: int
    iwae_samples: int


def perplexity(total_nll: float, total_tokens: int) -> float:
    """``exp(total NLL / total predicted tokens)``.

    >>> round(perplexity(2 * math.log(10.0), 2), 6)
    10.0
    """
    if total_tokens <= 0:
        raise ValueError(f"total_tokens: expected > 0, got {total_tokens}")
    return math.exp(total_nll / total_tokens)


def gaussian_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``KL[N(loc, diag scale²) ‖ N(0, I)] = ½ Σ_d (loc² + scale² − 1 − 2 log scale)``, shape
    ``loc.shape[:-1]``."""
    return 0.5 * (loc.pow(2) + scale.pow(2) - 1.0 - 2.0 * scale.log()).sum(-1)


def _diag_normal_log_prob(z, loc, scale):
    return (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - 0.5 * _LOG_2PI).sum(-1)


def mutual_information(loc: torch.Tensor, scale: torch.Tensor, z: torch.Tensor | None = None):
    """Minibatch-aggregate estimate of ``I(x; z)`` from posteriors ``N(loc_b, diag scale_b²)``
    ``(batch, dim)`` of one minibatch (``z`` ``(batch, dim)``: one sample per posterior; drawn when
    ``None``). Returns a 0-dim tensor, at most ``log batch``."""
    if loc.shape != scale.shape or loc.dim() != 2:
        raise ValueError(f"loc, scale: expected equal (batch, dim) shapes, got "
                         f"{tuple(loc.shape)}, {tuple(scale.shape)}")
    B = loc.shape[0]
    if z is None:
        z = loc + scale * torch.randn_like(loc)
    # log q(z_i | x_j) for every pair (i, j): (B, B). The diagonal (the sample's own posterior)
    # is used for E log q(z|x) too, so equal posteriors give exactly 0 and perfectly separated
    # ones exactly log B.
    log_q = _diag_normal_log_prob(z.unsqueeze(1), loc.unsqueeze(0), scale.unsqueeze(0))
    log_qz = torch.logsumexp(log_q, dim=1) - math.log(B)
    return (log_q.diagonal() - log_qz).mean()


def active_units(means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD):
    """``(number of active dims, per-dim variance)`` of posterior means ``(num_data, dim)``."""
    if means.dim() != 2 or means.shape[0] < 2:
        raise ValueError(f"means: expected shape (num_data >= 2, dim), got {tuple(means.shape)}")
    var = means.var(dim=0)
    return int((var > threshold).sum()), var


@torch.no_grad()
def importance_weighted_bounds(model, guide, x, mask=None, num_samples=500, chunk_size=None,
                               max_elements=2**25):
    """``(iwae, elbo, kl, loc, scale)`` per sentence (each ``(batch,)`` except ``loc, scale``
    ``(batch, latent_dim)``) from ``num_samples`` samples of ``q(z | x)``.

    The decoder runs on the batch repeated ``chunk_size`` times (samples × sentences in one call);
    ``chunk_size`` defaults to the largest that keeps ``chunk·batch·T·vocab ≤ max_elements``.
    """
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    loc, scale = guide.posterior(x, mask)
    B = x.shape[0]
    per_sample = x.shape[0] * x.shape[1] * getattr(model.decoder, "vocab_size", 1)
    if chunk_size is None:
        chunk_size = max(1, min(num_samples, max_elements // max(per_sample, 1)))
    kl = gaussian_kl(loc, scale)
    log_w, log_lik = [], []
    reps = [1] * (x.dim() - 1)
    for start in range(0, num_samples, chunk_size):
        c = min(chunk_size, num_samples - start)
        eps = torch.randn((c,) + loc.shape, dtype=loc.dtype, device=loc.device)
        z = loc + scale * eps  # (c, B, d)
        ll = model.log_likelihood_given_z(
            x.repeat(c, *reps), mask.repeat(c, 1), z.reshape(c * B, -1)
        ).view(c, B)
        log_pz = _diag_normal_log_prob(z, torch.zeros_like(loc), torch.ones_like(scale))
        log_qz = _diag_normal_log_prob(z, loc, scale)
        log_w.append(ll + log_pz - log_qz)
        log_lik.append(ll)
    log_w = torch.cat(log_w)
    iwae = torch.logsumexp(log_w, 0) - math.log(num_samples)
    elbo = torch.cat(log_lik).mean(0) - kl
    return iwae, elbo, kl, loc, scale


@torch.no_grad()
def evaluate(model, guide, batches: Iterable, num_samples: int = 500, chunk_size=None,
             mi_batch_size: int = 256, generator: torch.Generator | None = None
             ) -> SequenceEvaluation:
    """Test-set figures of a sequence VAE (or, when ``model.latent_dim == 0``, of a language model:
    exact NLL, KL = MI = 0) over ``batches`` of ``(x, mask, ...)``; models are put in ``eval()``
    mode for the duration.

    The MI estimate uses random minibatches of ``mi_batch_size`` posteriors drawn from the whole
    data (not the evaluation batches, which may be sorted by length), averaged over minibatches.
    """
    modes = (model.training, getattr(guide, "training", False))
    model.eval()
    if isinstance(guide, torch.nn.Module):
        guide.eval()
    try:
        n_sent = n_tok = 0
        s_elbo = s_iwae = s_kl = 0.0
        means, scales = [], []
        latent = getattr(model, "latent_dim", 0) > 0
        for batch in batches:
            x, mask = batch[0], batch[1]
            if latent:
                iwae, elbo, kl, loc, scale = importance_weighted_bounds(
                    model, guide, x, mask, num_samples, chunk_size
                )
                means.append(loc)
                scales.append(scale)
            else:
                iwae = elbo = model.log_likelihood_given_z(x, mask, None)
                kl = torch.zeros_like(iwae)
            n_sent += x.shape[0]
            n_tok += int(mask.sum())
            s_elbo -= float(elbo.sum())
            s_iwae -= float(iwae.sum())
            s_kl += float(kl.sum())
        if n_sent == 0:
            raise ValueError("batches: expected at least one batch, got none")
        au = active_units(torch.cat(means))[0] if latent and n_sent > 1 else 0
        mi = 0.0
        if latent and n_sent > 1:
            loc, scale = torch.cat(means), torch.cat(scales)
            perm = torch.randperm(n_sent, generator=generator).to(loc.device)
            chunks = [c for c in perm.split(mi_batch_size) if len(c) > 1]
            mi = sum(float(mutual_information(loc[c], scale[c])) * len(c) for c in chunks)
            mi /= sum(len(c) for c in chunks)
        return SequenceEvaluation(
            num_sentences=n_sent, num_tokens=n_tok, nll_elbo=s_elbo / n_sent,
            nll_iwae=s_iwae / n_sent, kl=s_kl / n_sent,
            perplexity_elbo=perplexity(s_elbo, n_tok), perplexity_iwae=perplexity(s_iwae, n_tok),
            mutual_info=mi, active_units=au,
            iwae_samples=num_samples if latent else 0,
        )
    finally:
        model.train(modes[0])
        if isinstance(guide, torch.nn.Module):
            guide.train(modes[1])
