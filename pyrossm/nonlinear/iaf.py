r"""Structured guide with inverse autoregressive flows on every step (Pyro's DMM ``--num-iafs``).

Each step of a structured guide (:class:`~pyrossm.guides.StructuredGuide`, diagonal scale) draws
a Gaussian ``u_t`` and pushes it through ``K`` affine autoregressive transforms
(Kingma et al. 2016, "Improved variational inference with inverse autoregressive flow"; Pyro's
:func:`~pyro.distributions.transforms.affine_autoregressive`):

.. math::
    u_t \sim N(\mu(z_{t-1}, h_t), \mathrm{diag}\,\sigma^2(z_{t-1}, h_t)), \qquad
    z_t = f_K \circ \dots \circ f_1(u_t), \\
    \log q(z_t \mid z_{t-1}, h_t) = \log N(u_t; \mu, \sigma^2)
        - \sum_k \log\left|\det \partial f_k / \partial u\right|

(change of variables), and the next step conditions on the transformed ``z_t``, as in Pyro's
example. Shapes: ``x (batch, T, obs_dim)`` (time at dim -2); the site ``"z"`` has batch shape
``(batch,)`` and event shape ``(T, z_dim)``.

>>> from pyrossm.guides import StructuredGuide
>>> guide = IAFGuide(StructuredGuide(3, 2, hidden_dim=8), num_iafs=1, iaf_dim=4)
>>> q = guide.distribution(torch.randn(5, 6, 3))
>>> z = q.rsample()
>>> z.shape, q.log_prob(z).shape
(torch.Size([5, 6, 2]), torch.Size([5]))
"""

from __future__ import annotations

import pyro
import torch
from pyro.distributions.transforms import affine_autoregressive
from pyro.nn import PyroModule
from torch import nn

from ..distributions import SequentialSequenceDistribution

__all__ = ["IAFGuide", "IAFSequence"]

_LOG_2PI = 1.8378770664093453


def _normal_log_prob(u, loc, scale):
    return (-0.5 * ((u - loc) / scale) ** 2 - scale.log() - 0.5 * _LOG_2PI).sum(-1)


class IAFSequence(SequentialSequenceDistribution):
    """``q(z_{1:T} | x)`` of :class:`IAFGuide`: Gaussian steps from ``combiner`` (its
    ``prepare(features)`` / ``step(z_prev, ctx_t)``) pushed through ``flows``.

    The log-density of the distribution's own sample (what an ELBO needs) is kept from the
    sampling pass; for any other value the flows are inverted, which is sequential over the
    ``z_dim`` coordinates (slow, exact).
    """

    def __init__(self, combiner, features, init, flows, mask=None, validate_args=None):
        self.combiner, self.features, self.init = combiner, features, init
        self.flows = list(flows)
        super().__init__(None, None, None, batch_shape=features.shape[:-2],
                         event_shape=(features.shape[-2], init.shape[-1]), mask=mask,
                         validate_args=validate_args)

    def _contexts(self):
        time_dim = self.features.dim() - 2
        return list(zip(*[c.unbind(time_dim) for c in self.combiner.prepare(self.features)]))

    def _forward_flows(self, u):
        z, log_det = u, 0.0
        for f in self.flows:
            y = f(z)
            log_det = log_det + f.log_abs_det_jacobian(z, y)
            z = y
        return z, log_det

    def _sample(self, sample_shape, reparameterized):
        shape = torch.Size(sample_shape) + self.batch_shape
        T, D = self.event_shape
        z = self.init.expand(shape + (D,))
        steps, lps = [], []
        for ctx in self._contexts():
            loc, scale = self.combiner.step(z, ctx)
            loc, scale = loc.expand(shape + (D,)), scale.expand(shape + (D,))
            u = loc + scale * torch.randn_like(loc)
            z, log_det = self._forward_flows(u)
            steps.append(z)
            lps.append(_normal_log_prob(u, loc, scale) - log_det)
        if not steps:
            return z.new_zeros(shape + self.event_shape)
        out = torch.stack(steps, dim=-2)
        if not reparameterized:
            return out.detach()
        self._sampled = (out, torch.stack(lps, dim=-1))
        return out

    def step_log_prob(self, value):
        cached = getattr(self, "_sampled", None)
        if cached is not None and value is cached[0]:
            lp = cached[1]
        else:
            z_prev = torch.cat([self.init.expand(value.shape[:-2] + (1, value.shape[-1])),
                                value[..., :-1, :]], dim=-2)
            lps = []
            for t, ctx in enumerate(self._contexts()):
                loc, scale = self.combiner.step(z_prev[..., t, :], ctx)
                u = value[..., t, :]
                log_det = 0.0
                for f in reversed(self.flows):
                    x = f.inv(u)
                    log_det = log_det + f.log_abs_det_jacobian(x, u)
                    u = x
                lps.append(_normal_log_prob(u, loc, scale) - log_det)
            lp = torch.stack(lps, dim=-1)
        if self.mask is not None:
            lp = torch.where(self.mask, lp, lp.new_zeros(()))
        return lp


class IAFGuide(PyroModule):
    """A structured guide whose steps are pushed through ``num_iafs`` affine autoregressive flows.

    Args:
        base: a :class:`~pyrossm.guides.StructuredGuide` with a diagonal scale (its encoder and
            combiner give ``u_t``'s Gaussian).
        num_iafs: number of flows ``K``; ``iaf_dim``: hidden size of each flow's autoregressive
            network (Pyro's example: 100).

    ``guide(x, mask=None)`` samples the one site ``"z"`` inside ``pyro.plate("sequences")``.
    """

    def __init__(self, base, num_iafs: int = 1, iaf_dim: int = 100, name: str = "iaf_guide"):
        super().__init__(name)
        tril = getattr(base, "scale_tril", None)
        if tril is not False:
            raise ValueError(f"base: expected a StructuredGuide with a diagonal scale, got "
                             f"{type(base).__name__} (scale_tril={tril})")
        if not isinstance(num_iafs, int) or num_iafs < 1:
            raise ValueError(f"num_iafs: expected a positive int, got {num_iafs!r}")
        self.base = base
        self.state_dim = base.state_dim
        self.flows = nn.ModuleList(
            affine_autoregressive(base.state_dim, hidden_dims=[iaf_dim]) for _ in range(num_iafs)
        )

    def distribution(self, x, mask=None) -> IAFSequence:
        combiner = self.base.combiner
        return IAFSequence(combiner, self.base.features(x, mask), combiner.z0, self.flows, mask)

    def forward(self, x, mask=None):
        q = self.distribution(x, mask)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            return pyro.sample("z", q)
