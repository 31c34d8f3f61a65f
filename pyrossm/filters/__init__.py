"""Nonlinear filtering baselines: extended and unscented Kalman filters/smoothers, particle filters.

* :func:`extended_kalman_filter`, :func:`extended_kalman_smoother` — linearisation by autograd
  Jacobians (:mod:`pyrossm.filters.extended`);
* :func:`unscented_kalman_filter`, :func:`unscented_kalman_smoother` — sigma points
  (:mod:`pyrossm.filters.unscented`);

for ``z_t = f(z_{t-1}) + ε_t``, ``x_t = h(z_t) + ψ_t`` with Gaussian ``ε ~ N(0, Q)``,
``ψ ~ N(0, R)``. Sequences are ``(batch, time, obs_dim)`` with time at dim -2, NaN = missing,
``mask (batch, time)`` True = observed. Results are :class:`pyrossm.lgssm.FilterResult` and
:class:`pyrossm.lgssm.SmootherResult`, as for the exact Kalman filter.
"""

from .extended import extended_kalman_filter, extended_kalman_smoother
from .unscented import unscented_kalman_filter, unscented_kalman_smoother

__all__ = [
    "extended_kalman_filter",
    "extended_kalman_smoother",
    "unscented_kalman_filter",
    "unscented_kalman_smoother",
]
