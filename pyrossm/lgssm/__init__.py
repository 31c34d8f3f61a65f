"""Exact linear-Gaussian state-space models: Kalman filter, RTS smoother, LinearGaussianSSM."""

from .inference import FilterResult, SmootherResult, kalman_filter, kalman_smoother

__all__ = ["FilterResult", "SmootherResult", "kalman_filter", "kalman_smoother"]
from .distributions import LinearGaussianChain, LinearGaussianObservations  # noqa: E402
from .model import Forecast, LinearGaussianSSM  # noqa: E402

__all__ = sorted(
    __all__ + ["Forecast", "LinearGaussianChain", "LinearGaussianObservations", "LinearGaussianSSM"]
)
