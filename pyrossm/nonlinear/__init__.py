"""Nonlinear state-space models: the LSTM-driven SSM and the deep Markov model (issue 4).

Models follow :mod:`pyrossm.protocol` (one latent site ``"z"`` for the whole trajectory, one
observed site ``"x"``) and train with :func:`pyrossm.infer.fit` and the guides of
:mod:`pyrossm.guides`. Experiments: ``python -m pyrossm.experiments.nonlinear --help``.
"""

from .diagnostics import LatentKL, kl_per_dimension
from .distributions import TrajectoryPrior
from .models import DeepMarkovModel, Forecast, LSTMStateSpaceModel, Reconstruction, Trajectory
from .networks import (
    BernoulliEmission,
    CategoricalEmission,
    GatedTransition,
    GaussianEmission,
    LSTMPrior,
    MarkovPrior,
)

__all__ = [
    "BernoulliEmission",
    "CategoricalEmission",
    "DeepMarkovModel",
    "Forecast",
    "GatedTransition",
    "GaussianEmission",
    "LSTMPrior",
    "LatentKL",
    "LSTMStateSpaceModel",
    "MarkovPrior",
    "Reconstruction",
    "Trajectory",
    "TrajectoryPrior",
    "kl_per_dimension",
]
