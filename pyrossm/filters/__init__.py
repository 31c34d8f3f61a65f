"""Nonlinear filtering baselines: extended and unscented Kalman filters/smoothers, particle filters.

* :func:`extended_kalman_filter`, :func:`extended_kalman_smoother` — linearisation by autograd
  Jacobians (:mod:`pyrossm.filters.extended`);
* :func:`unscented_kalman_filter`, :func:`unscented_kalman_smoother` — sigma points
  (:mod:`pyrossm.filters.unscented`);
* :func:`particle_filter` — bootstrap or guided sequential Monte Carlo for any pyrossm model
  with a per-step transition and emission (:mod:`pyrossm.filters.particle`); the per-step
  model and proposal adapters are :class:`StateSpace` and :class:`Proposal`
  (:mod:`pyrossm.filters.proposals`);

The Gaussian filters are for ``z_t = f(z_{t-1}) + ε_t``, ``x_t = h(z_t) + ψ_t`` with Gaussian
``ε ~ N(0, Q)``, ``ψ ~ N(0, R)``; their results are :class:`pyrossm.lgssm.FilterResult` and
:class:`pyrossm.lgssm.SmootherResult`, as for the exact Kalman filter. Sequences are
``(batch, time, obs_dim)`` with time at dim -2, NaN = missing, ``mask (batch, time)`` True =
observed.
"""

from .extended import extended_kalman_filter, extended_kalman_smoother
from .particle import RESAMPLING, ParticleFilterResult, particle_filter, resample
from .proposals import Gaussian, Proposal, StateSpace, as_proposal, as_state_space
from .unscented import unscented_kalman_filter, unscented_kalman_smoother

__all__ = [
    "RESAMPLING",
    "Gaussian",
    "ParticleFilterResult",
    "Proposal",
    "StateSpace",
    "as_proposal",
    "as_state_space",
    "extended_kalman_filter",
    "extended_kalman_smoother",
    "particle_filter",
    "resample",
    "unscented_kalman_filter",
    "unscented_kalman_smoother",
]
