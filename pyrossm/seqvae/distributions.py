"""Sequence observation distributions whose ``log_prob`` honours a padding mask.

Both have ``batch_shape == (batch,)`` and one ``log_prob`` per sequence: the sum over its real
steps (``mask`` True); padded steps contribute exactly zero (see :mod:`pyrossm.protocol`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

__all__ = ["MaskedSequenceCategorical", "MaskedSequenceNormal"]


class MaskedSequenceCategorical(TorchDistribution):
    """``log p(x) = Σ_t mask_t · log softmax(logits_t)[x_t]`` for token ids ``x`` ``(batch, T)``.

    ``logits`` ``(batch, T, vocab)`` are the autoregressive decoder's outputs given the observed
    prefix (teacher forcing), so ``log_prob`` is only meaningful for the ``x`` the logits were
    computed from; ``sample()`` draws each step independently from its logits.
    """

    arg_constraints = {"logits": constraints.real}

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor, validate_args=None):
        if logits.dim() < 2 or mask.shape != logits.shape[:-1]:
            raise ValueError(
                f"mask: expected shape {tuple(logits.shape[:-1])} (logits without the vocab dim), "
                f"got {tuple(mask.shape)}"
            )
        self.logits, self.mask = logits, mask
        super().__init__(logits.shape[:-2], logits.shape[-2:-1], validate_args=False)

    @constraints.dependent_property
    def support(self):
        ids = constraints.integer_interval(0, self.logits.shape[-1] - 1)
        return constraints.independent(ids, 1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        V = self.logits.shape[-1]
        logits = self.logits.expand(value.shape + (V,))
        nll = F.cross_entropy(logits.reshape(-1, V), value.reshape(-1), reduction="none")
        lp = -nll.view(value.shape)
        return lp.masked_fill(~self.mask, 0.0).sum(-1)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            cat = torch.distributions.Categorical(logits=self.logits)
            return cat.sample(sample_shape)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        logits = self.logits.expand(batch_shape + self.logits.shape[-2:])
        mask = self.mask.expand(batch_shape + self.mask.shape[-1:])
        return MaskedSequenceCategorical(logits, mask)


class MaskedSequenceNormal(TorchDistribution):
    """``log p(x) = Σ_{t,d} [mask_t ∧ x_td finite] · log N(x_td; loc_td, scale_td²)``.

    ``loc``, ``scale`` ``(batch, T, D)``; ``mask`` ``(batch, T)``; NaN entries of ``x`` are missing
    observations and contribute nothing (nor NaN gradients).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.independent(constraints.real, 2)

    def __init__(self, loc, scale, mask, validate_args=None):
        loc, scale = torch.broadcast_tensors(loc, scale)
        if mask.shape != loc.shape[:-1]:
            raise ValueError(
                f"mask: expected shape {tuple(loc.shape[:-1])}, got {tuple(mask.shape)}"
            )
        self.loc, self.scale, self.mask = loc, scale, mask
        super().__init__(loc.shape[:-2], loc.shape[-2:], validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        observed = self.mask.unsqueeze(-1) & torch.isfinite(value)
        value = torch.where(observed, value, torch.zeros_like(value))
        lp = torch.distributions.Normal(self.loc, self.scale).log_prob(value)
        return torch.where(observed, lp, torch.zeros_like(lp)).sum((-1, -2))

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return torch.distributions.Normal(self.loc, self.scale).sample(sample_shape)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.loc.shape[-2:]
        return MaskedSequenceNormal(
            self.loc.expand(shape),
            self.scale.expand(shape),
            self.mask.expand(batch_shape + self.mask.shape[-1:]),
        )
