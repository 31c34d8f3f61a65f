"""Whole-trajectory distributions of the linear-Gaussian state-space model, for Pyro sites.

One Pyro sample site holds a whole trajectory (``event_shape == (T, dim)``), and its
``log_prob`` is one vectorized computation over time (see :mod:`pyrossm.protocol`).
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints

from pyrossm._checks import check_mask
from pyrossm._gaussian import LOG_2PI as _LOG_2PI
from pyrossm._gaussian import gaussian_log_density as _gaussian_log_density
from pyrossm._gaussian import mv as _mv

__all__ = ["LinearGaussianChain", "LinearGaussianObservations"]



def _check_mask(mask, batch_shape, num_steps):
    return check_mask(mask, tuple(batch_shape) + (num_steps,), broadcast=True)


class LinearGaussianChain(TorchDistribution):
    r"""The latent trajectory of an LGSSM, :math:`z_{1:T}`, as one distribution.

    .. math:: z_1 \sim N(m_0, P_0), \qquad z_t \mid z_{t-1} \sim N(A z_{t-1}, Q).

    Shapes: ``A (..., n, n)``, ``Q_tril`` (Cholesky factor of Q) ``(..., n, n)``,
    ``init_mean (..., n)``, ``init_tril (..., n, n)``; samples ``(..., T, n)`` with time at
    dim -2; ``mask (..., T)`` marks steps that belong to the sequence (padding contributes 0).

    >>> import torch
    >>> I = torch.eye(2)
    >>> d = LinearGaussianChain(0.5 * I, I, torch.zeros(2), I, num_steps=10)
    >>> z = d.rsample((3,)); z.shape, d.log_prob(z).shape
    (torch.Size([3, 10, 2]), torch.Size([3]))
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, A, Q_tril, init_mean, init_tril, num_steps, mask=None, validate_args=None):
        self.A, self.Q_tril, self.init_mean, self.init_tril = A, Q_tril, init_mean, init_tril
        n = init_mean.shape[-1]
        batch_shape = torch.broadcast_shapes(
            A.shape[:-2], Q_tril.shape[:-2], init_mean.shape[:-1], init_tril.shape[:-2]
        )
        self.mask = _check_mask(mask, batch_shape, num_steps)
        if mask is not None:
            batch_shape = torch.broadcast_shapes(batch_shape, mask.shape[:-1])
        self.num_steps = num_steps
        super().__init__(batch_shape, (num_steps, n), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LinearGaussianChain, _instance)
        batch_shape = torch.Size(batch_shape)
        new.A, new.Q_tril = self.A, self.Q_tril
        new.init_mean, new.init_tril = self.init_mean, self.init_tril
        new.mask = None if self.mask is None else self.mask.expand(batch_shape + (self.num_steps,))
        new.num_steps = self.num_steps
        super(LinearGaussianChain, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)  # sample + batch + (T, n)
        eps = torch.randn(shape, dtype=self.init_mean.dtype, device=self.init_mean.device)
        z = self.init_mean + _mv(self.init_tril, eps[..., 0, :])
        out = [z]
        for t in range(1, self.num_steps):
            z = _mv(self.A, z) + _mv(self.Q_tril, eps[..., t, :])
            out.append(z)
        return torch.stack(out, -2)

    def log_prob(self, value):
        first = _gaussian_log_density(value[..., 0, :] - self.init_mean, self.init_tril)
        resid = value[..., 1:, :] - _mv(self.A.unsqueeze(-3), value[..., :-1, :])
        rest = _gaussian_log_density(resid, self.Q_tril.unsqueeze(-3))
        steps = torch.cat([first.unsqueeze(-1), rest], -1)
        if self.mask is not None:
            steps = steps.masked_fill(~self.mask, 0.0)
        return steps.sum(-1)


class LinearGaussianObservations(TorchDistribution):
    r"""Observations of an LGSSM given its latent trajectory: :math:`x_t \sim N(C z_t, R)`.

    ``z (..., T, n)``, ``C (..., p, n)``, ``R_tril`` (Cholesky factor of R) ``(..., p, p)``;
    values ``(..., T, p)``. ``NaN`` entries of a value are unobserved and dropped from its
    density (the marginal of the observed entries); ``mask (..., T)`` False drops a whole step.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, z, C, R_tril, mask=None, validate_args=None):
        self.z, self.C, self.R_tril = z, C, R_tril
        self.loc = _mv(C.unsqueeze(-3), z)
        T, p = self.loc.shape[-2:]
        batch_shape = self.loc.shape[:-2]
        self.mask = _check_mask(mask, batch_shape, T)
        if mask is not None:
            batch_shape = torch.broadcast_shapes(batch_shape, mask.shape[:-1])
        super().__init__(batch_shape, (T, p), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LinearGaussianObservations, _instance)
        batch_shape = torch.Size(batch_shape)
        new.z, new.C, new.R_tril = self.z, self.C, self.R_tril
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        T = self.event_shape[0]
        new.mask = None if self.mask is None else self.mask.expand(batch_shape + (T,))
        super(LinearGaussianObservations, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + _mv(self.R_tril, eps)

    def log_prob(self, value):
        observed = ~torch.isnan(value)
        resid = value - self.loc
        if bool(observed.all()):
            steps = _gaussian_log_density(resid, self.R_tril)
        else:
            # Marginal of the observed entries: unobserved entries become independent N(0, 1)
            # pseudo-residuals equal to 0 (their rows/columns of R replaced by the identity),
            # whose log-density log N(0; 0, 1) is then added back.
            o = observed.to(resid.dtype)
            R = self.R_tril @ self.R_tril.transpose(-1, -2)
            eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
            R_eff = R.unsqueeze(-3) * (o.unsqueeze(-1) * o.unsqueeze(-2)) + eye * (1 - o).unsqueeze(
                -1
            )
            resid = torch.where(observed, resid, torch.zeros_like(resid))
            steps = _gaussian_log_density(resid, torch.linalg.cholesky(R_eff))
            steps = steps + 0.5 * _LOG_2PI * (1 - o).sum(-1)
        if self.mask is not None:
            steps = steps.masked_fill(~self.mask, 0.0)
        return steps.sum(-1)
