"""Generation with a trained :class:`~pyrossm.seqvae.model.SequenceVAE` (or language model).

All functions decode a whole batch of codes ``z`` ``(n, latent_dim)`` at once (beam search: all
``n × beam_width`` hypotheses in one recurrent step); only time is a Python loop.

* :func:`sample_decode` — ``x_t ~ softmax(logits_t / temperature)``;
* :func:`greedy_decode` — ``x_t = argmax logits_t``;
* :func:`beam_search` — the most probable continuation among ``beam_width`` hypotheses
  (width 1 is greedy decoding);
* :func:`sample_prior` — ``z ~ N(0, I)`` then one of the above;
* :func:`reconstruct`, :func:`homotopy` — decode the posterior mean of a sentence, or the points
  ``z(α) = (1 − α) μ(x_a) + α μ(x_b)`` between two sentences (Bowman et al. 2016, §5.3);
* :func:`impute` — fill in missing words of a sentence: ``z = μ(x)`` of the current completion,
  then left-to-right greedy filling of the missing positions given ``z`` and the words before
  them, repeated ``iterations`` times (a greedy variant of Bowman et al.'s §4.2 imputation).

Example
-------
>>> from pyrossm.seqvae.vocab import Vocabulary
>>> from pyrossm.seqvae.model import SequenceVAE
>>> vocab = Vocabulary.from_corpus([["a", "b"]])
>>> model = SequenceVAE(vocab, embed_dim=4, hidden_dim=4, latent_dim=2)
>>> out = sample_prior(model, 3, max_len=5)
>>> out.tokens.shape[0], len(to_text(vocab, out))
(3, 3)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Decoded",
    "beam_search",
    "greedy_decode",
    "homotopy",
    "impute",
    "reconstruct",
    "sample_decode",
    "sample_prior",
    "to_text",
]


class Decoded(NamedTuple):
    """``tokens`` ``(n, L)`` long (``<pad>`` after ``<eos>``), ``lengths`` ``(n,)`` tokens up to and
    including ``<eos>`` (``L`` when none was produced), ``log_prob`` ``(n,)`` of those tokens."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_prob: torch.Tensor


def to_text(vocab, decoded) -> list[list[str]]:
    """Token lists of a :class:`Decoded` (or an id tensor ``(n, L)``), cut at ``<eos>``."""
    tokens = decoded.tokens if isinstance(decoded, Decoded) else decoded
    return [vocab.decode(row) for row in tokens]


def _check_z(model, z, n):
    if getattr(model, "latent_dim", 0) == 0:
        if n is None:
            raise ValueError("n: a model without latent needs the number of sequences n")
        return None, n
    if z is None or z.dim() != 2 or z.shape[-1] != model.latent_dim:
        raise ValueError(
            f"z: expected shape (n, {model.latent_dim}), got "
            f"{None if z is None else tuple(z.shape)}"
        )
    return z, z.shape[0]


def _ban_specials(model, logits):
    # <pad> and <sos> are never targets: the decoder may not produce them.
    banned = [model.vocab.pad_id, model.vocab.sos_id]
    return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))


@torch.no_grad()
def _autoregressive(model, z, n, max_len, choose):
    dec = model.decoder
    z, n = _check_z(model, z, n)
    device = dec.output.weight.device
    state = dec.rnn.init_state(z, n)
    prev = torch.full((n,), dec.sos_id, dtype=torch.long, device=device)
    eos, pad = model.vocab.eos_id, model.vocab.pad_id
    done = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.full((n,), max_len, dtype=torch.long, device=device)
    total = torch.zeros(n, dtype=dec.output.weight.dtype, device=device)
    out = []
    for t in range(max_len):
        logits, state = dec.step(prev, z, state)
        logits = _ban_specials(model, logits)
        logp = logits.log_softmax(-1)
        tok = choose(logits)
        total += torch.where(done, torch.zeros_like(total), logp.gather(1, tok[:, None]).squeeze(1))
        tok = tok.masked_fill(done, pad)
        out.append(tok)
        newly = (~done) & (tok == eos)
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        done = done | newly
        prev = tok
        if bool(done.all()):
            break
    return Decoded(torch.stack(out, 1), lengths, total)


def greedy_decode(model, z=None, n=None, max_len=50) -> Decoded:
    """``x_t = argmax p(x_t | x_<t, z)`` for each row of ``z`` (``n`` sequences for a model
    without latent) until ``<eos>`` or ``max_len`` tokens."""
    return _autoregressive(model, z, n, max_len, lambda logits: logits.argmax(-1))


def sample_decode(model, z=None, n=None, max_len=50, temperature=1.0) -> Decoded:
    """``x_t ~ softmax(logits_t / temperature)`` (``log_prob`` is under temperature 1)."""
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")

    def choose(logits):
        return torch.distributions.Categorical(logits=logits / temperature).sample()

    return _autoregressive(model, z, n, max_len, choose)


@torch.no_grad()
def beam_search(model, z=None, n=None, beam_width=5, max_len=50) -> Decoded:
    """The highest-probability sequence found by a beam of ``beam_width`` hypotheses per code.

    Finished hypotheses (``<eos>`` produced) keep their score and are extended by ``<pad>`` at no
    cost. All ``n × beam_width`` hypotheses advance in one batched step.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width: expected >= 1, got {beam_width}")
    dec = model.decoder
    z, n = _check_z(model, z, n)
    W, V = beam_width, dec.vocab_size
    device = dec.output.weight.device
    dtype = dec.output.weight.dtype
    eos, pad = model.vocab.eos_id, model.vocab.pad_id
    zz = None if z is None else z.repeat_interleave(W, 0)
    state = dec.rnn.init_state(zz, n * W)
    prev = torch.full((n * W,), dec.sos_id, dtype=torch.long, device=device)
    scores = torch.full((n, W), float("-inf"), dtype=dtype, device=device)
    scores[:, 0] = 0.0
    done = torch.zeros(n, W, dtype=torch.bool, device=device)
    lengths = torch.full((n, W), max_len, dtype=torch.long, device=device)
    history = torch.zeros(n, W, 0, dtype=torch.long, device=device)
    finished_row = torch.full((V,), float("-inf"), dtype=dtype, device=device)
    finished_row[pad] = 0.0
    base = (torch.arange(n, device=device) * W).unsqueeze(1)
    for t in range(max_len):
        logits, state = dec.step(prev, zz, state)
        logp = _ban_specials(model, logits).log_softmax(-1).view(n, W, V)
        logp = torch.where(done.unsqueeze(-1), finished_row.expand(n, W, V), logp)
        cand = (scores.unsqueeze(-1) + logp).view(n, W * V)
        scores, idx = cand.topk(W, dim=-1)
        beam, tok = idx // V, idx % V
        flat = (base + beam).view(-1)
        state = tuple(s[:, flat] for s in state) if isinstance(state, tuple) else state[:, flat]
        history = torch.cat([history.gather(1, beam.unsqueeze(-1).expand(-1, -1, t)),
                             tok.unsqueeze(-1)], dim=-1)
        was_done = done.gather(1, beam)
        lengths = lengths.gather(1, beam)
        newly = (~was_done) & (tok == eos)
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        done = was_done | newly
        prev = tok.view(-1)
        if bool(done.all()):
            break
    return Decoded(history[:, 0], lengths[:, 0], scores[:, 0])


def _decode(model, z, n, method, max_len, temperature, beam_width):
    if method == "greedy":
        return greedy_decode(model, z, n, max_len)
    if method == "sample":
        return sample_decode(model, z, n, max_len, temperature)
    if method == "beam":
        return beam_search(model, z, n, beam_width, max_len)
    raise ValueError(f"method: expected 'greedy', 'sample' or 'beam', got {method!r}")


@torch.no_grad()
def sample_prior(model, num_samples, temperature=1.0, max_len=50, method="sample",
                 beam_width=5) -> Decoded:
    """Sentences from ``z ~ N(0, I)`` decoded by ``method`` (``"sample"`` with ``temperature``,
    ``"greedy"`` or ``"beam"``); for a language model, ``num_samples`` unconditional samples."""
    if getattr(model, "latent_dim", 0) == 0:
        return _decode(model, None, num_samples, method, max_len, temperature, beam_width)
    w = model.decoder.output.weight
    z = torch.randn(num_samples, model.latent_dim, dtype=w.dtype, device=w.device)
    return _decode(model, z, None, method, max_len, temperature, beam_width)


@torch.no_grad()
def reconstruct(model, guide, x, mask=None, use_mean=True, method="greedy", max_len=50,
                beam_width=5) -> Decoded:
    """Decode ``z = μ(x)`` (or ``z ~ q(z | x)`` when ``use_mean=False``) for ``x``
    ``(batch, T)``."""
    loc, scale = guide.posterior(x, mask)
    z = loc if use_mean else loc + scale * torch.randn_like(loc)
    return _decode(model, z, None, method, max_len, 1.0, beam_width)


@torch.no_grad()
def homotopy(model, guide, x_a, x_b, steps=5, method="greedy", max_len=50, beam_width=5,
             mask_a=None, mask_b=None) -> Decoded:
    """Decode ``z(α) = (1 − α) μ(x_a) + α μ(x_b)`` for ``α = 0, 1/(steps−1), …, 1``; ``x_a``,
    ``x_b`` are single sentences ``(1, T)``. Returns ``steps`` decoded sentences."""
    if steps < 2:
        raise ValueError(f"steps: expected >= 2, got {steps}")
    za, _ = guide.posterior(x_a, mask_a)
    zb, _ = guide.posterior(x_b, mask_b)
    alpha = torch.linspace(0, 1, steps, dtype=za.dtype, device=za.device).unsqueeze(-1)
    z = (1 - alpha) * za[:1] + alpha * zb[:1]
    return _decode(model, z, None, method, max_len, 1.0, beam_width)


@torch.no_grad()
def impute(model, guide, x, missing, mask=None, iterations=3) -> torch.Tensor:
    """Fill the positions ``missing`` ``(batch, T)`` of ``x`` ``(batch, T)`` (real tokens only):
    returns ``x`` with those positions replaced by words (never ``<pad> <sos> <eos> <unk>``)."""
    if missing.shape != x.shape:
        raise ValueError(f"missing: expected shape {tuple(x.shape)}, got {tuple(missing.shape)}")
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    missing = missing & mask
    vocab, dec = model.vocab, model.decoder
    banned = torch.zeros(dec.vocab_size, dtype=torch.bool, device=x.device)
    banned[[vocab.pad_id, vocab.sos_id, vocab.eos_id, vocab.unk_id]] = True
    current = x.masked_fill(missing, vocab.unk_id)
    for _ in range(iterations):
        z = guide.posterior(current, mask)[0] if getattr(model, "latent_dim", 0) else None
        state = dec.rnn.init_state(z, x.shape[0])
        prev = torch.full_like(x[:, 0], dec.sos_id)
        filled = []
        for t in range(x.shape[1]):
            logits, state = dec.step(prev, z, state)
            guess = logits.masked_fill(banned, float("-inf")).argmax(-1)
            tok = torch.where(missing[:, t], guess, current[:, t])
            filled.append(tok)
            prev = tok
        current = torch.stack(filled, 1)
    return current
