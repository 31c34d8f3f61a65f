"""Variational families for trajectory latents ``z_{1:T}`` (one Pyro site ``"z"`` per sequence).

* :class:`FilteringLSTMGuide` -- ``q(z_t | x_{<=t})``, independent steps (the seed's encoder).
* :class:`StructuredGuide` -- ``q(z_t | z_{t-1}, h_t)``, ``h`` from a forward, backward (DKS) or
  bidirectional RNN, with a nonlinear (DMM) or linear-Gaussian combiner.
* :class:`ConjugateGuide` -- ``q(z) ∝ chain(z) * prod_t prod_{observed i} phi_ti(z_t)``: Gaussian
  potentials per observed entry combined with a linear-Gaussian chain by message passing
  (exact for an LGSSM under any missing pattern).

All follow :mod:`pyrossm.protocol`: ``guide(x, mask=None)``, ``x (batch, T, obs_dim)`` with time
at dim -2, NaN = missing, ``mask (batch, T)`` right padding.
"""

from pyrossm.guides.combiners import LinearCombiner, NonlinearCombiner, ScaleHead
from pyrossm.guides.conjugate import ConjugateGuide
from pyrossm.guides.encoders import RecurrentEncoder
from pyrossm.guides.filtering import FilteringLSTMGuide, PosteriorStats
from pyrossm.guides.structured import StructuredGuide

__all__ = [
    "ConjugateGuide",
    "FilteringLSTMGuide",
    "LinearCombiner",
    "NonlinearCombiner",
    "PosteriorStats",
    "RecurrentEncoder",
    "ScaleHead",
    "StructuredGuide",
]
