"""Exact linear-Gaussian state-space models: Kalman filter, RTS smoother, LinearGaussianSSM,
maximum-likelihood fitting with a results object, and structural components.

Model (column vectors; sequences ``(batch, time, dim)`` with time at dim -2)::

    z_1 ~ N(init_mean, init_cov);  z_t = A z_{t-1} + B ε_t;  x_t = C z_t + D ψ_t
"""

from ._chunked import set_compile
from ._workspace import release_workspace
from .distributions import LinearGaussianChain, LinearGaussianObservations
from .inference import (
    FilterResult,
    SmootherResult,
    kalman_filter,
    kalman_log_likelihood,
    kalman_smoother,
)
from .initial import diffuse_covariance, stationary_covariance
from .model import Forecast, LinearGaussianSSM
from .results import MLEResults, ljung_box
from .sampling import forecast_moments, sample_lgssm, sample_posterior
from .structural import (
    Autoregressive,
    LocalLevel,
    LocalLinearTrend,
    Regression,
    Seasonal,
    structural,
)

__all__ = [
    "Autoregressive",
    "FilterResult",
    "Forecast",
    "LinearGaussianChain",
    "LinearGaussianObservations",
    "LinearGaussianSSM",
    "LocalLevel",
    "LocalLinearTrend",
    "MLEResults",
    "Regression",
    "Seasonal",
    "SmootherResult",
    "diffuse_covariance",
    "forecast_moments",
    "kalman_filter",
    "kalman_log_likelihood",
    "kalman_smoother",
    "ljung_box",
    "release_workspace",
    "sample_lgssm",
    "sample_posterior",
    "set_compile",
    "stationary_covariance",
    "structural",
]
