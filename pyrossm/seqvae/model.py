"""Sequence VAE (Bowman et al. 2016) and its LSTM language-model baseline as Pyro model/guide pairs.

Generative model (:class:`SequenceVAE`), for a sentence ``x = (x_1, …, x_T)`` ending in ``<eos>``::

    z ~ N(0, I_latent_dim)
    (h_0, c_0) = (tanh(W_h z + b_h), W_c z + b_c)
    h_t = LSTM([emb(x_{t-1}); z], h_{t-1}),  x_0 = <sos>      (z in the inputs: optional)
    x_t ~ Categorical(softmax(W_o h_t + b_o)),                t = 1 … T

Guide (:class:`SequenceVAEGuide`): ``q(z | x) = N(μ(h^e_T), diag σ²(h^e_T))`` with
``h^e_t = LSTM(emb(x_t), h^e_{t-1})``. :class:`LSTMLanguageModel` is the same decoder without
``z`` (learned initial state); its guide :class:`NoLatentGuide` samples nothing, so its ELBO is
its exact log-likelihood.

Shapes (:mod:`pyrossm.protocol`): ``x`` ``(batch, T)`` long token ids, ``mask`` ``(batch, T)``
bool (right padding False); site ``"z"`` batch_shape ``(batch,)``, event_shape ``(latent_dim,)``;
site ``"x"`` ``log_prob`` ``(batch,)`` = sum over the real tokens, ``<eos>`` included.

Training-only features of the decoder: word dropout (inputs replaced by ``<unk>`` w.p.
``word_dropout``; 1 gives an inputless decoder) and scheduled sampling
(``decoder_mode="scheduled_sampling"``: step t reads the true previous token w.p. ``ε_i``,
else its own sample; ``ε_i`` follows :func:`teacher_forcing_probability` of the number ``i`` of
training forward passes). In ``eval()`` mode the decoder always uses teacher forcing without
dropout, which is what every evaluation does.

Reference: S. Bowman, L. Vilnis, O. Vinyals, A. Dai, R. Jozefowicz, S. Bengio, "Generating
sentences from a continuous space", CoNLL 2016.

Example
-------
>>> import pyro
>>> from pyrossm.seqvae.vocab import Vocabulary, pad_batch
>>> vocab = Vocabulary.from_corpus([["a", "b"], ["b", "c", "a"]])
>>> model = SequenceVAE(vocab, embed_dim=8, hidden_dim=8, latent_dim=2)
>>> guide = SequenceVAEGuide(vocab, embed_dim=8, hidden_dim=8, latent_dim=2)
>>> batch = pad_batch(vocab, [["a", "b"], ["b", "c", "a"]])
>>> tr = pyro.poutine.trace(pyro.poutine.replay(model, pyro.poutine.trace(guide).get_trace(
...     batch.x, batch.mask))).get_trace(batch.x, batch.mask)
>>> tr.nodes["x"]["fn"].log_prob(batch.x).shape
torch.Size([2])
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .distributions import MaskedSequenceCategorical
from .networks import SequenceEncoder, TokenDecoder
from .vocab import Vocabulary

__all__ = [
    "DECODER_MODES",
    "SS_SCHEDULES",
    "LSTMLanguageModel",
    "NoLatentGuide",
    "SequenceVAE",
    "SequenceVAEGuide",
    "check_tokens",
    "teacher_forcing_probability",
]

DECODER_MODES = ("teacher_forcing", "scheduled_sampling")
SS_SCHEDULES = ("linear", "exponential", "inverse_sigmoid")
_names = itertools.count()


def _unique_name(prefix: str) -> str:
    # pyro.module registers parameters by name in the global param store; a fresh name per
    # instance keeps two models built in one process from silently sharing store entries.
    return f"{prefix}_{next(_names)}"


def teacher_forcing_probability(
    step: int, schedule: str = "inverse_sigmoid", k: float = 1000.0, c: float = 1e-4,
    minimum: float = 0.0,
) -> float:
    """Probability ``ε_i`` of feeding the true previous token at training step ``i``
    (Bengio et al. 2015, §2.4):

    * ``"linear"``: ``ε_i = max(minimum, k − c·i)`` (``k ≤ 1``);
    * ``"exponential"``: ``ε_i = max(minimum, k^i)`` (``k < 1``);
    * ``"inverse_sigmoid"``: ``ε_i = max(minimum, k / (k + exp(i / k)))`` (``k ≥ 1``).

    >>> teacher_forcing_probability(0, "linear", k=1.0, c=0.01), teacher_forcing_probability(
    ...     50, "linear", k=1.0, c=0.01)
    (1.0, 0.5)
    """
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    if schedule == "linear":
        eps = k - c * step
    elif schedule == "exponential":
        if not 0 < k < 1:
            raise ValueError(f"k: the exponential schedule needs 0 < k < 1, got {k}")
        eps = k**step
    elif schedule == "inverse_sigmoid":
        if k < 1:
            raise ValueError(f"k: the inverse sigmoid schedule needs k >= 1, got {k}")
        eps = k / (k + math.exp(min(step / k, 700.0)))
    else:
        raise ValueError(f"schedule: expected one of {SS_SCHEDULES}, got {schedule!r}")
    return float(min(1.0, max(minimum, eps)))


def check_tokens(x: torch.Tensor, mask: torch.Tensor | None, vocab_size: int, pad_id: int):
    """Validate ``x`` ``(batch, T)`` long and a right-padded ``mask``; return ``(x, mask, lengths)``
    with padded positions of ``x`` set to ``pad_id``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.long:
        raise ValueError(
            f"x: expected a (batch, T) long tensor of token ids, got "
            f"{getattr(x, 'dtype', type(x).__name__)} with shape {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"x: expected at least one time step, shape (batch, T >= 1), got "
                         f"{tuple(x.shape)}")
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask: expected shape {tuple(x.shape)} (as x), got {tuple(mask.shape)}")
    mask = mask.bool()
    lengths = mask.sum(-1)
    prefix = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(-1)
    if not torch.equal(prefix, mask):
        raise ValueError("mask: expected right padding (True steps first, then False)")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise ValueError(f"x: token ids must lie in [0, {vocab_size}), got "
                         f"[{int(x.min())}, {int(x.max())}]")
    return x.masked_fill(~mask, pad_id), mask, lengths


class _TokenModelBase(nn.Module):
    def __init__(self, vocab, embed_dim, hidden_dim, latent_dim, cell, num_layers, word_dropout,
                 z_to_inputs, decoder_mode, ss_schedule, ss_k, ss_c, ss_min, name):
        super().__init__()
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"vocab: expected a Vocabulary, got {type(vocab).__name__}")
        if not 0.0 <= word_dropout <= 1.0:
            raise ValueError(f"word_dropout: expected a rate in [0, 1], got {word_dropout}")
        if decoder_mode not in DECODER_MODES:
            raise ValueError(f"decoder_mode: expected one of {DECODER_MODES}, got {decoder_mode!r}")
        teacher_forcing_probability(0, ss_schedule, ss_k, ss_c, ss_min)  # validates the schedule
        self.vocab = vocab
        self.latent_dim = latent_dim
        self.word_dropout = float(word_dropout)
        self.decoder_mode = decoder_mode
        self.ss = dict(schedule=ss_schedule, k=ss_k, c=ss_c, minimum=ss_min)
        self.decoder = TokenDecoder(
            len(vocab), embed_dim, hidden_dim, latent_dim, vocab.sos_id, vocab.unk_id,
            vocab.pad_id, cell, num_layers, z_to_inputs,
        )
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        self.pyro_name = name or _unique_name(type(self).__name__)

    @property
    def dtype(self):
        return self.decoder.output.weight.dtype

    def logits(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Decoder logits ``(batch, T, vocab)``; training features only in ``train()`` mode."""
        if not self.training:
            return self.decoder.teacher_forcing_logits(x, z)
        if self.decoder_mode == "scheduled_sampling":
            eps = teacher_forcing_probability(int(self.train_steps), **self.ss)
            self.train_steps += 1
            return self.decoder.scheduled_sampling_logits(x, z, eps, self.word_dropout)
        self.train_steps += 1
        return self.decoder.teacher_forcing_logits(x, z, self.word_dropout)

    def log_likelihood_given_z(self, x, mask, z) -> torch.Tensor:
        """``log p(x | z)`` ``(batch,)`` (teacher forcing; no site is recorded)."""
        x, mask, _ = check_tokens(x, mask, len(self.vocab), self.vocab.pad_id)
        return MaskedSequenceCategorical(self.logits(x, z), mask).log_prob(x)


class SequenceVAE(_TokenModelBase):
    """The generative model ``p(z) p(x | z)`` (see the module docstring); ``forward(x, mask=None)``.

    Parameters: ``vocab`` (:class:`~pyrossm.seqvae.vocab.Vocabulary`), ``embed_dim``,
    ``hidden_dim``, ``latent_dim``, ``cell`` (``"lstm" | "gru" | "rnn"``), ``num_layers``,
    ``word_dropout`` (rate in [0, 1]), ``z_to_inputs`` (concatenate z to every decoder input),
    ``decoder_mode`` (``"teacher_forcing" | "scheduled_sampling"``), ``ss_schedule``, ``ss_k``,
    ``ss_c``, ``ss_min`` (see :func:`teacher_forcing_probability`), ``name`` (param-store prefix).
    """

    def __init__(self, vocab, embed_dim=256, hidden_dim=256, latent_dim=32, cell="lstm",
                 num_layers=1, word_dropout=0.0, z_to_inputs=False,
                 decoder_mode="teacher_forcing", ss_schedule="inverse_sigmoid", ss_k=1000.0,
                 ss_c=1e-4, ss_min=0.0, name=None):
        if latent_dim < 1:
            raise ValueError(f"latent_dim: expected >= 1, got {latent_dim}")
        super().__init__(vocab, embed_dim, hidden_dim, latent_dim, cell, num_layers, word_dropout,
                         z_to_inputs, decoder_mode, ss_schedule, ss_k, ss_c, ss_min, name)

    def prior(self, batch: int, device=None) -> dist.Distribution:
        """``p(z) = N(0, I)`` with batch_shape ``(batch,)``, event_shape ``(latent_dim,)``."""
        loc = torch.zeros(batch, self.latent_dim, dtype=self.dtype, device=device)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask, _ = check_tokens(x, mask, len(self.vocab), self.vocab.pad_id)
        pyro.module(self.pyro_name, self)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            z = pyro.sample("z", self.prior(x.shape[0], x.device))
            pyro.sample("x", MaskedSequenceCategorical(self.logits(x, z), mask), obs=x)
        return z


class SequenceVAEGuide(nn.Module):
    """``q(z | x) = N(μ(h^e_T), diag σ²(h^e_T))``, an RNN encoder over the embedded sentence
    (``<eos>`` included); ``forward(x, mask=None)`` samples site ``"z"``."""

    def __init__(self, vocab, embed_dim=256, hidden_dim=256, latent_dim=32, cell="lstm",
                 num_layers=1, name=None):
        super().__init__()
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"vocab: expected a Vocabulary, got {type(vocab).__name__}")
        self.vocab, self.latent_dim = vocab, latent_dim
        self.embedding = nn.Embedding(len(vocab), embed_dim)
        self.encoder = SequenceEncoder(embed_dim, hidden_dim, latent_dim, cell, num_layers)
        self.pyro_name = name or _unique_name(type(self).__name__)

    def posterior(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """``(loc, scale)`` of ``q(z | x)``, each ``(batch, latent_dim)``."""
        x, mask, lengths = check_tokens(x, mask, len(self.vocab), self.vocab.pad_id)
        return self.encoder(self.embedding(x), lengths)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        pyro.module(self.pyro_name, self)
        loc, scale = self.posterior(x, mask)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class LSTMLanguageModel(_TokenModelBase):
    """``p(x) = ∏_t p(x_t | x_<t)``: the :class:`SequenceVAE` decoder without ``z`` (learned
    initial state). Pair it with :class:`NoLatentGuide`; same parameters as SequenceVAE minus
    the latent ones. ``forward(x, mask=None)`` observes site ``"x"``."""

    def __init__(self, vocab, embed_dim=256, hidden_dim=256, cell="lstm", num_layers=1,
                 word_dropout=0.0, decoder_mode="teacher_forcing", ss_schedule="inverse_sigmoid",
                 ss_k=1000.0, ss_c=1e-4, ss_min=0.0, name=None):
        super().__init__(vocab, embed_dim, hidden_dim, 0, cell, num_layers, word_dropout, False,
                         decoder_mode, ss_schedule, ss_k, ss_c, ss_min, name)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask, _ = check_tokens(x, mask, len(self.vocab), self.vocab.pad_id)
        pyro.module(self.pyro_name, self)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            pyro.sample("x", MaskedSequenceCategorical(self.logits(x, None), mask), obs=x)
        return None


class NoLatentGuide(nn.Module):
    """The guide of a model without latent sites: samples nothing, so ELBO = log-likelihood."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        return None
