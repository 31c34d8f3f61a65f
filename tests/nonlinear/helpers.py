"""Small helpers for the nonlinear-model tests: a reference per-step Pyro model and a toy guide."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro.nn import PyroModule

from pyrossm.distributions import DiagonalGaussianSequence


def stepwise_model(ssm, x, mask):
    """The same generative model as ``ssm.model`` written the classic way: one site per step
    (``z_0, z_1, ...`` and ``x_0, x_1, ...``) under ``pyro.markov``, as in Pyro's DMM tutorial."""
    batch, steps = x.shape[:2]
    value, observed = ssm.emitter.observed(x, mask)
    with pyro.plate("sequences", batch, dim=-1):
        state = ssm.dynamics.initial_state(batch, x)
        for t in pyro.markov(range(steps)):
            loc, scale = ssm.dynamics.predict(state)
            z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1).mask(mask[:, t]))
            emission = ssm.emitter(z_t)
            event_dims = len(emission.batch_shape) - 1
            pyro.sample(
                f"x_{t + 1}", emission.mask(observed[:, t]).to_event(event_dims), obs=value[:, t]
            )
            state = ssm.dynamics.update(state, z_t)


class MeanFieldGuide(PyroModule):
    """q(z_t | x_t) = N(W x_t + b, diag softplus(V x_t + c)²): a tiny guide for shape tests."""

    def __init__(self, obs_dim, z_dim):
        super().__init__()
        self.loc = nn.Linear(obs_dim, z_dim)
        self.scale = nn.Linear(obs_dim, z_dim)

    def forward(self, x, mask=None):
        if not x.is_floating_point():
            x = nn.functional.one_hot(x.clamp(min=0), self.loc.in_features).to(self.loc.weight)
        x = torch.nan_to_num(x)
        loc = self.loc(x)
        scale = nn.functional.softplus(self.scale(x)) + 1e-3
        with pyro.plate("sequences", x.size(0), dim=-1):
            return pyro.sample("z", DiagonalGaussianSequence(loc, scale, mask=mask))
