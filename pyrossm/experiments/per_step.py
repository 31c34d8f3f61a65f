"""Per-time-step reference formulation of the LGSSM model (one site per step, ``pyro.markov``).

pyrossm registers a trajectory as one site ``"z"``; this module keeps the textbook
formulation of Pyro's DMM tutorial -- sites ``"z_1" ... "z_T"`` and ``"x_1" ... "x_T"`` in a
``pyro.markov`` loop -- for the LGSSM, to check that both give the same ELBO and to time them
(``benchmarks/svi.py``). Pair it with ``StructuredGuide(..., per_step=True)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn.module import pyro_method
from torch import nn

__all__ = ["MarkovLGSSMModel", "PerStepGuide"]


@pyro_method
def _markov_lgssm(ssm, x, mask=None):
    A, C, Q, R = ssm.A, ssm.C, ssm.Q, ssm.R
    init_mean, init_cov = ssm.init_mean, ssm.init_cov
    batch, T, _ = x.shape
    missing = torch.isnan(x)
    partial = missing.any(-1) & ~missing.all(-1)
    if partial.any():
        raise ValueError(
            "x: the per-step reference supports only whole-step missing values (all-NaN steps)"
        )
    observed = ~missing.all(-1)
    if mask is not None:
        observed = observed & mask
    x = torch.where(missing, x.new_zeros(()), x)
    L_Q, L_R, L_P0 = (torch.linalg.cholesky(M) for M in (Q, R, init_cov))
    zs, z = [], None
    with pyro.plate("sequences", batch, dim=-1):
        for t in pyro.markov(range(T)):
            if t == 0:
                p_z = dist.MultivariateNormal(init_mean.expand(batch, -1), scale_tril=L_P0)
            else:
                p_z = dist.MultivariateNormal(z @ A.transpose(-1, -2), scale_tril=L_Q)
            if mask is not None:
                p_z = p_z.mask(mask[:, t])
            z = pyro.sample(f"z_{t + 1}", p_z)
            p_x = dist.MultivariateNormal(z @ C.transpose(-1, -2), scale_tril=L_R)
            pyro.sample(f"x_{t + 1}", p_x.mask(observed[:, t]), obs=x[:, t])
            zs.append(z)
    return torch.stack(zs, dim=-2)


class MarkovLGSSMModel(nn.Module):
    r"""The LGSSM with one sample site per step, reading the parameters of ``ssm``:
    :math:`z_1 \sim N(m_0, P_0)`, :math:`z_t \sim N(A z_{t-1}, Q)`, :math:`x_t \sim N(C z_t, R)`.

    ``ssm`` is a :class:`~pyrossm.lgssm.LinearGaussianSSM` (a ``PyroModule``; its parameters are
    registered with Pyro exactly as by ``ssm.model``); this wrapper is a plain ``nn.Module``, so
    ``fit`` can train it. ``model(x, mask=None)``:
    ``x (batch, T, obs_dim)`` (time at dim -2; all-NaN steps = unobserved), ``mask (batch, T)``
    right padding. Sites: ``"z_t"`` and ``"x_t"``, ``t = 1..T``.
    """

    def __init__(self, ssm):
        super().__init__()
        self.ssm = ssm  # a plain nn.Module attribute: ssm keeps its own Pyro parameter names

    def forward(self, x, mask=None):
        return _markov_lgssm(self.ssm, x, mask)


class PerStepGuide(nn.Module):
    """``guide(x, mask, per_step=True)`` as a module: the per-step twin of a structured guide.

    Same parameters (it holds the guide), sites ``"z_1" ... "z_T"`` instead of ``"z"``.
    """

    def __init__(self, guide):
        super().__init__()
        self.guide = guide

    def forward(self, x, mask=None):
        return self.guide(x, mask, per_step=True)
