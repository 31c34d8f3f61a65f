"""pyrossm: sequential latent-variable models in Pyro, checked against exact Kalman baselines.

Model families (each a folder; sequences are ``(batch, time, dim)`` with time at dim -2):

* :mod:`pyrossm.lgssm` — exact linear-Gaussian state-space models: batched, differentiable
  Kalman filter and RTS smoother (sequential or parallel-in-time), ``LinearGaussianSSM``.
* :mod:`pyrossm.nonlinear` — LSTM-driven nonlinear state-space model, deep Markov model.
* :mod:`pyrossm.seqvae` — Bowman-style sequence VAE and its LSTM language-model baseline.
* :mod:`pyrossm.guides` — filtering LSTM encoder, structured (ST-L / DKS) and conjugate guides.
* :mod:`pyrossm.infer` — the one SVI training loop (``fit``, ELBO or FIVO), annealing, and the
  one evaluation path (``evaluate``: ELBO, IWAE, particle filter).
* :mod:`pyrossm.filters` — extended / unscented Kalman filters and smoothers, particle filters.
* :mod:`pyrossm.forecast`, :mod:`pyrossm.scoring` — the one ``Forecast`` type; CRPS, coverage,
  backtests.
* :mod:`pyrossm.build` — every model/guide pair from one ``ModelSpec``.
* :mod:`pyrossm.datasets`, :mod:`pyrossm.plotting`, :mod:`pyrossm.inference_data` (arviz).

The contract between models, guides and the trainer is in :mod:`pyrossm.protocol`, with the
public ``StateSpaceModel`` base class for models of your own. The command line and the paper
experiments live apart, in ``pyrossm.app`` and ``pyrossm.experiments``.

Example::

    >>> import torch, pyrossm
    >>> ssm = pyrossm.LinearGaussianSSM.from_matrices(A=[[0.9]], C=[[1.0]], Q=[[0.5]], R=[[1.0]])
    >>> z, x = ssm.sample(100, num_samples=2)            # (2, 100, 1) each
    >>> pyrossm.kalman_filter(x, ssm.A, ssm.C, ssm.Q, ssm.R, ssm.init_mean,
    ...                       ssm.init_cov).log_likelihood.shape
    torch.Size([2])

Names are imported lazily, so ``import pyrossm`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "pyrossm.datasets": [
        "load_array",
        "load_jsb_chorales",
        "load_nile",
        "load_ptb",
        "random_stable_system",
        "simulate_linear_gaussian",
        "simulate_lorenz",
        "simulate_pendulum",
    ],
    "pyrossm.guides": ["ConjugateGuide", "FilteringLSTMGuide", "StructuredGuide"],
    "pyrossm.infer": ["History", "elbo", "fit", "kl_per_step", "log_likelihood", "make_schedule"],
    "pyrossm.inference_data": ["to_inference_data"],
    "pyrossm.lgssm": [
        "FilterResult",
        "LinearGaussianSSM",
        "SmootherResult",
        "kalman_filter",
        "kalman_smoother",
    ],
    "pyrossm.nonlinear": ["DeepMarkovModel", "LSTMStateSpaceModel"],
    "pyrossm.forecast": ["Forecast"],
    "pyrossm.protocol": ["StateSpaceModel", "lengths_to_mask"],
    "pyrossm.scoring": ["backtest", "crps_gaussian", "crps_samples"],
    "pyrossm.filters": [
        "ParticleFilterResult",
        "extended_kalman_filter",
        "extended_kalman_smoother",
        "particle_filter",
        "unscented_kalman_filter",
        "unscented_kalman_smoother",
    ],
    "pyrossm.infer.evaluate": ["smc_log_likelihood"],
    "pyrossm.infer.fivo": ["fivo_objective"],
    "pyrossm.seqvae": ["LSTMLanguageModel", "SequenceVAE", "Vocabulary"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = [
    "datasets",
    "filters",
    "forecast",
    "guides",
    "infer",
    "inference_data",
    "lgssm",
    "nonlinear",
    "plotting",
    "protocol",
    "scoring",
    "seqvae",
]

__all__ = sorted(list(_WHERE) + _SUBMODULES)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"pyrossm.{name}")
    raise AttributeError(f"module 'pyrossm' has no attribute {name!r}")


def __dir__():
    return __all__
