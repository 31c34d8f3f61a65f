r"""Which latent dimensions a trained model uses: the KL of each coordinate, per frame.

Models: a prior with diagonal Gaussian steps
:math:`p(z_t \mid z_{<t}) = \mathcal N(\mu_t, \mathrm{diag}\,\sigma_t^2)`
(:class:`~pyrossm.nonlinear.DeepMarkovModel`, :class:`~pyrossm.nonlinear.LSTMStateSpaceModel`).
Guides: diagonal Gaussian steps :math:`q(z_t \mid \cdot) = \mathcal N(m_t, \mathrm{diag}\,s_t^2)`
(the structured guides with a diagonal scale, the filtering guide). The ELBO's KL term then
splits over steps and coordinates along a guide sample :math:`z \sim q`:

.. math::
    \mathrm{KL}_d = \frac{1}{F}\, \mathbb E_q \Big[\sum_{n,t}
        \mathrm{KL}\big(\mathcal N(m_{ntd}, s_{ntd}^2) \,\|\,
        \mathcal N(\mu_{ntd}, \sigma_{ntd}^2)\big)\Big]

(:math:`F` the number of observed frames; the conditioning on the sampled past is the same in
``q`` and ``p``), and :math:`\sum_d \mathrm{KL}_d` is the KL per frame that the ELBO pays — a
lower-variance estimate of it than :math:`\log q(z) - \log p(z)`. A coordinate with
:math:`\mathrm{KL}_d \approx 0` is *collapsed*: its posterior is its prior, the data says
nothing through it (the "active units" of Burda et al. 2016, measured by KL).

>>> import torch
>>> from pyrossm.guides import StructuredGuide
>>> from pyrossm.nonlinear import DeepMarkovModel
>>> model = DeepMarkovModel(obs_dim=3, z_dim=2, transition_dim=8, emission_dim=8)
>>> guide = StructuredGuide(obs_dim=3, state_dim=2, hidden_dim=8)
>>> res = kl_per_dimension(model, guide, torch.randn(4, 6, 3), num_samples=2)
>>> res.kl_per_dimension.shape, res.active_dims <= 2
(torch.Size([2]), True)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro import poutine
from torch.distributions import Normal, kl_divergence

from pyrossm.distributions import DiagonalGaussianSequence
from pyrossm.infer.data import as_dataset

__all__ = ["LatentKL", "kl_per_dimension"]


class LatentKL(NamedTuple):
    """Result of :func:`kl_per_dimension` (nats per observed frame)."""

    kl_per_dimension: torch.Tensor  # (z_dim,)
    kl_per_frame: float  # the sum over dimensions
    active_dims: int  # dimensions with KL above the threshold
    threshold: float
    frames: int


def _guide_steps(site_fn, z):
    """``(loc, scale)`` of every guide step, ``(batch, T, D)`` each, along the sample ``z``."""
    q = site_fn
    while not (hasattr(q, "conditionals") or isinstance(q, DiagonalGaussianSequence)):
        if not hasattr(q, "base_dist"):
            raise TypeError(f"guide: site 'z' must be a sequence of diagonal Gaussian steps "
                            f"(a structured or filtering guide), got {type(site_fn).__name__}")
        q = q.base_dist
    if isinstance(q, DiagonalGaussianSequence):
        return q.loc, q.scale
    if getattr(q, "scale_tril", False):
        raise ValueError("guide: a full-covariance (scale='tril') guide does not split its KL "
                         "over coordinates; use a diagonal scale")
    return q.conditionals(z)


@torch.no_grad()
def kl_per_dimension(model, guide, data, *, num_samples: int = 4, batch_size: int = 64,
                     threshold: float = 0.01) -> LatentKL:
    """KL per frame of every latent coordinate, averaged over ``num_samples`` guide draws.

    :param model: a model whose ``dynamics.trajectory_params(z)`` gives the prior's
        ``(loc, scale)`` of every step given ``z (batch, T, z_dim)``.
    :param guide: ``guide(x, mask)`` sampling the one site ``"z"`` with diagonal Gaussian steps.
    :param data: ``x`` (N, T, obs_dim) with time at dim -2, ``(x, mask)`` or ``(x, lengths)``.
    :param threshold: a coordinate is *active* when its KL exceeds this (nats per frame).
    :returns: :class:`LatentKL`.
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
    dynamics = getattr(model, "dynamics", None)
    if not hasattr(dynamics, "trajectory_params"):
        raise TypeError(f"model: expected a model with dynamics.trajectory_params (DeepMarkovModel"
                        f", LSTMStateSpaceModel), got {type(model).__name__}")
    ds = as_dataset(data, "data")
    modules = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
    training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        total, frames = None, 0
        for start in range(0, len(ds), batch_size):
            x, mask = ds.batch(torch.arange(start, min(start + batch_size, len(ds))))
            weight = mask.unsqueeze(-1).to(x.dtype if x.is_floating_point() else torch.float32)
            frames += int(mask.sum())
            for _ in range(num_samples):
                site = poutine.trace(guide).get_trace(x, mask).nodes["z"]
                z = site["value"]
                q_loc, q_scale = _guide_steps(site["fn"], z)
                p_loc, p_scale = dynamics.trajectory_params(z)
                kl = kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale))
                part = (kl * weight.to(kl.dtype)).sum((0, 1))
                total = part if total is None else total + part
    finally:
        for m, was in zip(modules, training, strict=True):
            m.train(was)
    per_dim = (total / (num_samples * max(frames, 1))).cpu()
    return LatentKL(per_dim, float(per_dim.sum()), int((per_dim > threshold).sum()),
                    float(threshold), frames)
