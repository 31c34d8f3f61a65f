"""Sequence VAEs (Bowman et al. 2016) and the LSTM language-model baseline.

* :mod:`~pyrossm.seqvae.vocab` — :class:`Vocabulary` (``<pad> <unk> <sos> <eos>``), padded and
  length-bucketed batches with masks;
* :mod:`~pyrossm.seqvae.model` — :class:`SequenceVAE` / :class:`SequenceVAEGuide`,
  :class:`LSTMLanguageModel` / :class:`NoLatentGuide` (Pyro model/guide pairs for
  :func:`pyrossm.infer.fit`); :mod:`~pyrossm.seqvae.gaussian` — the Gaussian-emission variant;
* :mod:`~pyrossm.seqvae.decoding` — prior samples, greedy, beam search, reconstruction,
  homotopy, imputation;
* :mod:`~pyrossm.seqvae.metrics` — ELBO / IWAE NLL, perplexity, KL, I(x; z), active units;
* :mod:`~pyrossm.experiments.ptb` — the Penn Treebank experiment
  (``python -m pyrossm.experiments.ptb --help``).

Data: ``x`` ``(batch, T)`` token ids (words then ``<eos>``), ``mask`` ``(batch, T)``; see
:mod:`pyrossm.protocol`.
"""

from .decoding import (
    Decoded,
    beam_search,
    greedy_decode,
    homotopy,
    impute,
    reconstruct,
    sample_decode,
    sample_prior,
    to_text,
)
from .distributions import MaskedSequenceCategorical, MaskedSequenceNormal
from .gaussian import GaussianSequenceVAE, GaussianSequenceVAEGuide
from .metrics import (
    SequenceEvaluation,
    active_units,
    evaluate,
    gaussian_kl,
    importance_weighted_bounds,
    mutual_information,
    perplexity,
)
from .model import (
    LSTMLanguageModel,
    NoLatentGuide,
    SequenceVAE,
    SequenceVAEGuide,
    teacher_forcing_probability,
)
from .vocab import SentenceBatch, Vocabulary, bucket_batches, pad_batch

__all__ = [
    "Decoded",
    "GaussianSequenceVAE",
    "GaussianSequenceVAEGuide",
    "LSTMLanguageModel",
    "MaskedSequenceCategorical",
    "MaskedSequenceNormal",
    "NoLatentGuide",
    "SentenceBatch",
    "SequenceEvaluation",
    "SequenceVAE",
    "SequenceVAEGuide",
    "Vocabulary",
    "active_units",
    "beam_search",
    "bucket_batches",
    "evaluate",
    "gaussian_kl",
    "greedy_decode",
    "homotopy",
    "importance_weighted_bounds",
    "impute",
    "mutual_information",
    "pad_batch",
    "perplexity",
    "reconstruct",
    "sample_decode",
    "sample_prior",
    "teacher_forcing_probability",
    "to_text",
]
