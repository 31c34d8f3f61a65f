"""Toy models and guides for the pyrossm.infer tests (time at dim -2 everywhere).

Gaussian latent trajectory with a closed-form marginal likelihood::

    z_t ~ N(0, I_n)                 independently for t = 1..T (one site "z", event (T, n))
    x_t | z_t ~ N(W z_t, sigma^2 I_p)

so x_t ~ N(0, W W^T + sigma^2 I) and z_t | x_t ~ N(S W^T x_t / sigma^2, S) with
S = (I + W^T W / sigma^2)^{-1}. Padded steps (mask False) contribute nothing.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn


def _mask(x, mask):
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask


class ToyModel(PyroModule):
    """p(x, z) above; W is an nn.Parameter, sigma a positive PyroParam."""

    def __init__(self, W, sigma=0.5):
        super().__init__()
        self.W = nn.Parameter(torch.as_tensor(W).clone())
        self.sigma = PyroParam(torch.as_tensor(sigma, dtype=self.W.dtype),
                               constraint=constraints.positive)
        self.poison_calls = set()  # forward-call numbers whose likelihood is made -inf
        self.calls = 0

    def forward(self, x, mask=None):
        mask = _mask(x, mask)
        batch, steps, _ = x.shape
        n = self.W.shape[1]
        sigma = self.sigma
        self.calls += 1
        if self.calls in self.poison_calls:
            sigma = sigma * float("inf")
        with pyro.plate("sequences", batch, dim=-1):
            prior = dist.Normal(x.new_zeros(batch, steps, n), 1.0)
            z = pyro.sample("z", prior.mask(mask.unsqueeze(-1)).to_event(2))
            loc = z @ self.W.T
            like = dist.Normal(loc, sigma).mask(mask.unsqueeze(-1)).to_event(2)
            pyro.sample("x", like, obs=x)
        return z

    def exact_log_prob(self, x, mask=None):
        """log p(x) per sequence, (batch,)."""
        mask = _mask(x, mask)
        with torch.no_grad():
            W, s2 = self.W, self.sigma ** 2
            cov = W @ W.T + s2 * torch.eye(W.shape[0], dtype=W.dtype)
            lp = dist.MultivariateNormal(torch.zeros_like(cov[0]), cov).log_prob(x)
            return (lp * mask).sum(-1)

    def posterior(self):
        """(gain G, covariance S): z_t | x_t ~ N(G x_t, S)."""
        with torch.no_grad():
            W, s2 = self.W, self.sigma ** 2
            S = torch.linalg.inv(torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / s2)
            return S @ W.T / s2, S

    def sample_data(self, num, steps):
        with torch.no_grad():
            z = torch.randn(num, steps, self.W.shape[1], dtype=self.W.dtype)
            return z @ self.W.T + self.sigma * torch.randn(num, steps, self.W.shape[0],
                                                            dtype=self.W.dtype)


class ToyGuide(PyroModule):
    """q(z_t | x_t) = N(net(x_t), diag scale^2): a plain nn.Linear and a positive PyroParam."""

    def __init__(self, obs_dim, state_dim, dtype=torch.float64, init_scale=1.0):
        super().__init__()
        self.net = nn.Linear(obs_dim, state_dim).to(dtype)
        self.scale = PyroParam(torch.full((state_dim,), init_scale, dtype=dtype),
                               constraint=constraints.positive)

    def forward(self, x, mask=None):
        mask = _mask(x, mask)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            q = dist.Normal(self.net(x), self.scale).mask(mask.unsqueeze(-1)).to_event(2)
            return pyro.sample("z", q)


class ExactGuide(nn.Module):
    """The exact posterior of a ToyModel (fixed; no parameters)."""

    def __init__(self, model):
        super().__init__()
        G, S = model.posterior()
        self.register_buffer("G", G)
        self.register_buffer("L", torch.linalg.cholesky(S))

    def forward(self, x, mask=None):
        mask = _mask(x, mask)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            q = dist.MultivariateNormal(x @ self.G.T, scale_tril=self.L)
            return pyro.sample("z", q.mask(mask).to_event(1))


def toy_problem(num=24, steps=6, obs_dim=3, state_dim=2, sigma=0.5, seed=0):
    """(model at the truth, data x (num, steps, obs_dim)) in float64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(obs_dim, state_dim, generator=g, dtype=torch.float64)
    model = ToyModel(W, sigma)
    torch.manual_seed(seed)
    return model, model.sample_data(num, steps)
