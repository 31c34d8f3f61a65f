"""Exact linear-Gaussian state-space models: Kalman filter, RTS smoother, LinearGaussianSSM.

Model (column vectors; sequences ``(batch, time, dim)`` with time at dim -2)::

    z_1 ~ N(init_mean, init_cov);  z_t = A z_{t-1} + B ε_t;  x_t = C z_t + D ψ_t
"""

from .distributions import LinearGaussianChain, LinearGaussianObservations
from .inference import FilterResult, SmootherResult, kalman_filter, kalman_smoother
from .model import Forecast, LinearGaussianSSM
from .sampling import forecast_moments, sample_lgssm, sample_posterior

__all__ = [
    "FilterResult",
    "Forecast",
    "LinearGaussianChain",
    "LinearGaussianObservations",
    "LinearGaussianSSM",
    "SmootherResult",
    "forecast_moments",
    "kalman_filter",
    "kalman_smoother",
    "sample_lgssm",
    "sample_posterior",
]
