"""The one forecast type of pyrossm: :class:`Forecast`, with quantile bands.

Every model's ``forecast(x, horizon, ...)`` (``LinearGaussianSSM``, ``LSTMStateSpaceModel``,
``DeepMarkovModel`` and any :class:`pyrossm.StateSpaceModel` subclass) returns a
:class:`Forecast` of the ``horizon`` steps that follow **each sequence's own last real step**
(right padding, given by ``mask``, is skipped). Shapes, for ``B`` sequences, ``S`` sample paths,
``H`` steps ahead, ``p`` observed and ``n`` latent dimensions::

    samples          (S, B, H, p)   sampled future observations ((S, B, H) class ids for a
                                    categorical emission)
    latent_samples   (S, B, H, n)   the latent paths that produced them
    mean             (B, H, p)      predictive mean E[x_{L+h} | x_{1:L}]: exact for the LGSSM,
                                    the Monte Carlo average of ``emission_means`` otherwise
    covariance       (B, H, p, p)   exact predictive covariance (LGSSM), else None
    latent_mean, latent_covariance  (B, H, n), (B, H, n, n): exact latent moments, else None
    emission_means   (S, B, H, p)   E[x_t | z_t] along each sampled path (nonlinear models)
    lengths          (B,)           L, each sequence's length: step h is time index L + h - 1

:meth:`Forecast.quantiles` and :meth:`Forecast.interval` give bands: exact Gaussian quantiles
``mean + sd Φ⁻¹(q)`` when the moments are exact, empirical quantiles of ``samples`` otherwise.

>>> import torch
>>> fc = Forecast.from_gaussian(torch.zeros(1, 3, 1), torch.ones(1, 3, 1, 1))
>>> lower, upper = fc.interval(0.95)
>>> round(float(upper[0, 0, 0]), 4)
1.96
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyrossm._checks import check_mask

__all__ = ["Forecast", "Interval", "sequence_lengths"]


class Interval(NamedTuple):
    """A central predictive interval: ``lower`` and ``upper`` bounds, each ``(B, H, p)``."""

    lower: torch.Tensor
    upper: torch.Tensor


def _check_levels(levels, dtype, device):
    q = torch.as_tensor(levels, dtype=dtype, device=device)
    if q.dim() > 1 or not bool(((q > 0) & (q < 1)).all()):
        raise ValueError(f"levels: expected probabilities in (0, 1) (a number or a 1-D list), "
                         f"got {levels!r}")
    return q


def sequence_lengths(mask, num_steps: int, batch_shape=(), device=None) -> torch.Tensor:
    """Length of each right-padded sequence: index of its last True step in ``mask`` plus one.

    ``mask (..., T)`` bool (None: every sequence has ``num_steps`` steps). Trailing False steps
    are padding; False steps before the last True one (missing steps) do not shorten it.

    >>> sequence_lengths(torch.tensor([[True, False, True, False], [True, True, False, False]]), 4)
    tensor([3, 2])
    """
    if mask is None:
        return torch.full(tuple(batch_shape), num_steps, dtype=torch.long, device=device)
    check_mask(mask, tuple(getattr(mask, "shape", (1,)))[:-1] + (num_steps,))
    steps = torch.arange(1, num_steps + 1, device=mask.device)
    return (mask.long() * steps).amax(-1) if num_steps else mask.new_zeros(mask.shape[:-1]).long()


class Forecast(NamedTuple):
    """Forecast of the ``H`` steps after each sequence's own length (see the module docstring
    for the fields and shapes). ``means``, ``covs`` and ``z`` are aliases of ``mean``,
    ``covariance`` and ``latent_samples`` kept for older code."""

    samples: torch.Tensor
    latent_samples: torch.Tensor | None
    mean: torch.Tensor
    covariance: torch.Tensor | None = None
    latent_mean: torch.Tensor | None = None
    latent_covariance: torch.Tensor | None = None
    emission_means: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    # ------------------------------------------------------------------ aliases
    @property
    def means(self) -> torch.Tensor:
        """Alias of :attr:`mean` ``(B, H, p)``."""
        return self.mean

    @property
    def covs(self) -> torch.Tensor | None:
        """Alias of :attr:`covariance` ``(B, H, p, p)``."""
        return self.covariance

    @property
    def z(self) -> torch.Tensor | None:
        """Alias of :attr:`latent_samples` ``(S, B, H, n)``."""
        return self.latent_samples

    @property
    def exact(self) -> bool:
        """True when the predictive moments are exact (Gaussian bands)."""
        return self.covariance is not None

    @property
    def horizon(self) -> int:
        return self.mean.shape[-2]

    @property
    def num_samples(self) -> int:
        return self.samples.shape[0]

    # ------------------------------------------------------------------ bands
    @property
    def std(self) -> torch.Tensor:
        """Predictive standard deviation of each entry ``(B, H, p)``: exact, or from samples."""
        if self.covariance is not None:
            return torch.diagonal(self.covariance, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        return self._float_samples().std(0)

    def _float_samples(self) -> torch.Tensor:
        if not self.samples.is_floating_point() or self.samples.dim() != self.mean.dim() + 1:
            raise TypeError(
                f"samples: expected floating sample paths (S, B, H, p) for quantiles, got "
                f"{self.samples.dtype} {tuple(self.samples.shape)} (class ids have no quantiles;"
                f" use emission_means)")
        if self.samples.shape[0] < 2:
            raise ValueError(f"samples: expected at least 2 sample paths for empirical "
                             f"quantiles, got {self.samples.shape[0]}")
        return self.samples

    def quantiles(self, levels) -> torch.Tensor:
        """Predictive quantiles at ``levels`` (numbers in (0, 1)): ``(len(levels), B, H, p)``
        (``(B, H, p)`` for a single number).

        Exact Gaussian quantiles ``mean + sd Φ⁻¹(q)`` when :attr:`exact`, else empirical
        quantiles of ``samples`` (linear interpolation, ``torch.quantile``).
        """
        q = _check_levels(levels, self.mean.dtype, self.mean.device)
        if self.exact:
            z = torch.special.ndtri(q)
            return self.mean + self.std * z.reshape(z.shape + (1,) * self.mean.dim())
        return torch.quantile(self._float_samples(), q.to(self.samples.dtype), dim=0)

    def interval(self, level: float = 0.9) -> Interval:
        """Central ``level`` interval: the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles."""
        if not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"level: expected a probability in (0, 1), got {level!r}")
        lower, upper = self.quantiles([0.5 - level / 2, 0.5 + level / 2])
        return Interval(lower, upper)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gaussian(cls, mean, covariance, samples=None, lengths=None) -> Forecast:
        """An exact Gaussian forecast from ``mean (B, H, p)`` and ``covariance (B, H, p, p)``
        (``samples`` default: none, shape ``(0, B, H, p)``)."""
        if samples is None:
            samples = mean.new_zeros((0,) + tuple(mean.shape))
        return cls(samples, None, mean, covariance, lengths=lengths)
