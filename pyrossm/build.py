"""One builder of model/guide pairs from a plain description, for the CLI, the demo and the
experiments alike.

A :class:`ModelSpec` names a model family and a guide and their sizes; :func:`build` returns
``(model, guide)`` ready for :func:`pyrossm.infer.fit`. Sequences given to the pair are
``(batch, time, obs_dim)`` with time at dim -2 (token ids ``(batch, time)`` for ``seqvae`` /
``lm``).

Families (``model=``):

* ``"lgssm"`` -- :class:`~pyrossm.lgssm.LinearGaussianSSM` (``guide="none"`` for an exact MLE);
* ``"dmm"`` -- :class:`~pyrossm.nonlinear.DeepMarkovModel` (Krishnan et al. 2017);
* ``"lstm-ssm"`` -- :class:`~pyrossm.nonlinear.LSTMStateSpaceModel`;
* ``"seqvae"`` / ``"lm"`` -- :class:`~pyrossm.seqvae.SequenceVAE` (Bowman et al. 2016) and its
  language-model baseline (these need ``vocab=``).

Guides (``guide=``): ``"backward"``, ``"forward"``, ``"bidirectional"`` (a
:class:`~pyrossm.guides.StructuredGuide`), ``"filtering-lstm"``
(:class:`~pyrossm.guides.FilteringLSTMGuide`), ``"conjugate"``
(:class:`~pyrossm.guides.ConjugateGuide`: Gaussian potentials per observed entry, exact for an
LGSSM under any missing pattern; linear potentials for ``lgssm``, MLP ones otherwise),
``"none"``.

>>> from pyrossm.build import ModelSpec, build
>>> model, guide = build(ModelSpec("dmm", obs_dim=3, state_dim=2, hidden=8))
>>> type(model).__name__, type(guide).__name__
('DeepMarkovModel', 'StructuredGuide')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

__all__ = ["FAMILIES", "GUIDES", "ModelNotAvailable", "ModelSpec", "build"]

FAMILIES = ("lgssm", "dmm", "lstm-ssm", "seqvae", "lm")
GUIDES = ("backward", "forward", "bidirectional", "filtering-lstm", "conjugate", "none")
# Older spellings kept by run folders written before the builder was shared.
_GUIDE_ALIASES = {"backward-structured": "backward", "filtering": "filtering-lstm"}


class ModelNotAvailable(RuntimeError):
    """A model family whose module cannot be imported in this installation."""


@dataclass(frozen=True)
class ModelSpec:
    """What to build. Sizes left ``None`` default to ``hidden``.

    model, obs_dim, state_dim: family, observed and latent dimension (latent size of a VAE).
    guide: the variational family (see the module docstring).
    emission: ``"gaussian"``, ``"bernoulli"`` or ``"categorical"`` (nonlinear families).
    transition_dim, emission_dim, rnn_dim: network sizes (DMM transition / emission MLPs, the
    LSTM of the LSTM-driven prior and of the guide's encoder).
    encoder_cell: ``"lstm"``, ``"gru"`` or ``"rnn"`` (structured guides).
    initial: the DMM's first state, ``"transition"`` (Pyro's) or ``"learned"``.
    missing_indicators: whether the guide's encoder sees NaN indicators (False for data that
    are never missing, e.g. piano rolls).
    dtype: ``"float32"`` or ``"float64"``.
    embed_dim, word_dropout, z_to_inputs: sequence VAE / language model only (``z_to_inputs``:
    z is concatenated to every decoder input, not only used for the initial state).
    """

    model: str
    obs_dim: int | None = None
    state_dim: int = 2
    hidden: int = 32
    guide: str = "backward"
    emission: str = "gaussian"
    transition_dim: int | None = None
    emission_dim: int | None = None
    rnn_dim: int | None = None
    encoder_cell: str = "lstm"
    initial: str = "transition"
    missing_indicators: bool = True
    dtype: str = "float32"
    embed_dim: int | None = None
    word_dropout: float = 0.0
    z_to_inputs: bool = False

    def __post_init__(self):
        if self.model not in FAMILIES:
            raise ValueError(f"model: expected one of {FAMILIES}, got {self.model!r}")
        guide = _GUIDE_ALIASES.get(self.guide, self.guide)
        if guide not in GUIDES:
            raise ValueError(f"guide: expected one of {GUIDES}, got {self.guide!r}")
        object.__setattr__(self, "guide", guide)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {self.dtype!r}")
        for name in ("state_dim", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.model not in ("seqvae", "lm") and (
            not isinstance(self.obs_dim, int) or self.obs_dim < 1
        ):
            raise ValueError(f"obs_dim: expected a positive int, got {self.obs_dim!r}")

    def size(self, name: str) -> int:
        """The size ``name`` (``"transition_dim"``, ...), ``hidden`` when not given."""
        value = getattr(self, name)
        return self.hidden if value is None else value

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """From :meth:`to_dict` output; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> ModelSpec:
        return replace(self, **changes)


def _guide(spec: ModelSpec):
    from pyrossm.guides import ConjugateGuide, FilteringLSTMGuide, StructuredGuide

    if spec.guide == "none":
        return None
    if spec.guide == "conjugate":
        potentials = "linear" if spec.model == "lgssm" else "mlp"
        return ConjugateGuide(spec.obs_dim, spec.state_dim, potentials=potentials,
                              hidden_dim=spec.size("rnn_dim"))
    if spec.guide == "filtering-lstm":
        if spec.encoder_cell != "lstm":
            raise ValueError(
                f"encoder_cell: the filtering guide's encoder is an LSTM, got "
                f"{spec.encoder_cell!r} (other cells are for the structured guides)"
            )
        return FilteringLSTMGuide(
            spec.obs_dim, spec.state_dim, hidden_dim=spec.size("rnn_dim"),
            missing_indicators=spec.missing_indicators,
        )
    return StructuredGuide(
        spec.obs_dim, spec.state_dim, hidden_dim=spec.size("rnn_dim"), direction=spec.guide,
        cell=spec.encoder_cell, missing_indicators=spec.missing_indicators,
    )


def _sequence_vae(spec: ModelSpec, vocab):
    if vocab is None:
        raise ValueError(f"vocab: model {spec.model!r} needs a Vocabulary, got None")
    try:
        from pyrossm.seqvae.model import (
            LSTMLanguageModel,
            NoLatentGuide,
            SequenceVAE,
            SequenceVAEGuide,
        )
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ModelNotAvailable(
            f"model {spec.model!r}: pyrossm.seqvae is not available ({e})"
        ) from e
    embed = spec.size("embed_dim")
    common = dict(embed_dim=embed, hidden_dim=spec.hidden, word_dropout=spec.word_dropout)
    if spec.model == "lm":
        return LSTMLanguageModel(vocab, **common), NoLatentGuide()
    model = SequenceVAE(vocab, latent_dim=spec.state_dim, z_to_inputs=spec.z_to_inputs, **common)
    return model, SequenceVAEGuide(vocab, embed, spec.hidden, spec.state_dim)


def build(spec: ModelSpec, vocab=None):
    """``(model, guide)`` described by ``spec`` (guide ``None`` when ``spec.guide == "none"``).

    Models and guides are built in ``spec.dtype`` on the CPU; move them with ``.to(device)``
    (:func:`pyrossm.infer.fit` does it for you).
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    if spec.model in ("seqvae", "lm"):
        return _sequence_vae(spec, vocab)
    dtype = getattr(torch, spec.dtype)
    guide = _guide(spec)
    if spec.model == "lgssm":
        from pyrossm.lgssm import LinearGaussianSSM

        model = LinearGaussianSSM(spec.state_dim, spec.obs_dim, dtype=dtype)
    else:
        try:
            from pyrossm.nonlinear import DeepMarkovModel, LSTMStateSpaceModel
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise ModelNotAvailable(
                f"model {spec.model!r}: pyrossm.nonlinear is not available ({e})"
            ) from e
        if spec.model == "lstm-ssm":
            model = LSTMStateSpaceModel(
                spec.obs_dim, spec.state_dim, rnn_dim=spec.size("rnn_dim"),
                emission=spec.emission, emission_dim=spec.size("emission_dim"),
                hidden_dim=spec.size("transition_dim"),
            )
        else:
            model = DeepMarkovModel(
                spec.obs_dim, spec.state_dim, transition_dim=spec.size("transition_dim"),
                emission_dim=spec.size("emission_dim"), emission=spec.emission,
                initial=spec.initial,
            )
        model = model.to(dtype)
    if guide is not None:
        guide = guide.to(dtype)
    return model, guide
