r"""Conjugate (structured) recognition: Gaussian potentials per observed entry + message passing.

:class:`ConjugateGuide` is the variational family

.. math::
    q(z_{1:T} \mid x) \propto \underbrace{N(z_1; m_0, P_0) \prod_{t>1} N(z_t; A z_{t-1}, Q)}
    _{\text{linear-Gaussian chain}}\ \prod_t \prod_{i \in O_t} \phi_{ti}(z_t),

where :math:`O_t` are the *observed* entries of :math:`x_t` and each potential comes from a
recognition network. A missing entry contributes no factor -- precision exactly zero -- so the
family handles any missing pattern by construction, instead of asking a recurrent encoder to
learn what a zero-filled entry means. The chain is the model's own (pass ``transition=`` a
:class:`~pyrossm.lgssm.LinearGaussianSSM`) or learned by the guide (any model, e.g.
:class:`~pyrossm.nonlinear.DeepMarkovModel`). Sampling and the exact log-density use a backward
information filter and forward conditionals (:mod:`pyrossm.guides.messages`).

Reference: Johnson, Duvenaud, Wiltschko, Datta & Adams (2016), *Composing graphical models with
neural networks for structured representations and fast inference*; Fraccaro, Kamronn,
Paquet & Winther (2017), *A disentangled recognition and nonlinear dynamics model for
unsupervised learning* (KVAE).
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

from pyrossm._gaussian import LOG_2PI as _LOG_2PI
from pyrossm._gaussian import mv as _mv
from pyrossm.distributions import SequentialSequenceDistribution
from pyrossm.guides.encoders import _check_right_padded
from pyrossm.guides.filtering import PosteriorStats
from pyrossm.guides.messages import (
    Conditionals,
    backward_information_filter,
    forward_conditionals,
    observation_potentials,
)

__all__ = ["ConjugateGaussianSequence", "ConjugateGuide", "POTENTIALS"]

POTENTIALS = ("linear", "mlp")


class ConjugateGaussianSequence(SequentialSequenceDistribution):
    r"""Gauss-Markov trajectory :math:`\prod_t N(z_t; F_t z_{t-1} + b_t, S_t S_t^\top)`.

    Built from :class:`~pyrossm.guides.messages.Conditionals` (``F, S (batch_J, T, D, D)``,
    ``b (batch, T, D)``; ``batch_J`` is 1 or ``batch``); ``batch_shape == (batch,)``,
    ``event_shape == (T, D)`` (time at dim -2); ``mask (batch, T)`` bool: ``False`` steps
    (right padding) contribute 0 to :meth:`log_prob`. ``rsample`` is reparameterized
    (:math:`z_t = F_t z_{t-1} + b_t + S_t \varepsilon_t`); the log-density of the sample just
    drawn reuses its :math:`\varepsilon` (:math:`-\tfrac12\|\varepsilon_t\|^2 - \log|S_t|`).

    >>> from pyrossm.guides.messages import forward_conditionals, backward_information_filter
    >>> I = torch.eye(2)
    >>> Jb, hb = backward_information_filter(I.expand(1, 4, 2, 2), torch.randn(3, 4, 2), I, I)
    >>> q = ConjugateGaussianSequence(forward_conditionals(Jb, hb, I, I, torch.zeros(2), I))
    >>> z = q.rsample(); z.shape, q.log_prob(z).shape
    (torch.Size([3, 4, 2]), torch.Size([3]))
    """

    def __init__(self, conditionals: Conditionals, mask=None, validate_args=None):
        self.cond = conditionals
        batch, T, D = conditionals.b.shape
        super().__init__(None, None, None, (batch,), (T, D), mask=mask,
                         validate_args=validate_args)

    def _sample(self, sample_shape, reparameterized):
        c = self.cond
        shape = torch.Size(sample_shape) + self.batch_shape
        T, D = self.event_shape
        eps = torch.empty(shape + (T, D), dtype=c.b.dtype, device=c.b.device).normal_()
        drive = (c.b + _mv(c.S, eps)).unbind(-2)  # b_t + S_t eps_t, all steps at once
        F_t = c.F.unbind(1)
        z = drive[0]  # F_1 = 0
        steps = [z]
        for t in range(1, T):
            z = _mv(F_t[t], z) + drive[t]
            steps.append(z)
        out = torch.stack(steps, dim=-2)
        if not reparameterized:
            return out.detach()
        self._sampled = (out, eps)
        return out

    def whitened(self, value):
        r""":math:`\varepsilon_t = S_t^{-1}(z_t - F_t z_{t-1} - b_t)` of ``value (..., T, D)``."""
        cached = getattr(self, "_sampled", None)
        if cached is not None and value is cached[0]:
            return cached[1]
        c = self.cond
        prev = torch.cat([torch.zeros_like(value[..., :1, :]), value[..., :-1, :]], dim=-2)
        r = (value - _mv(c.F, prev) - c.b).unsqueeze(-1)
        S = c.S.expand(r.shape[:-2] + c.S.shape[-2:])
        return torch.linalg.solve_triangular(S, r, upper=False).squeeze(-1)

    def step_log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        e = self.whitened(value)
        D = self.event_shape[-1]
        lp = -0.5 * (e.pow(2).sum(-1) + D * _LOG_2PI) - self.cond.log_det_S
        if self.mask is not None:
            lp = torch.where(self.mask, lp, lp.new_zeros(()))
        return lp

    def entropy(self):
        D = self.event_shape[-1]
        ent = (0.5 * D * (1.0 + _LOG_2PI) + self.cond.log_det_S).expand(
            self.batch_shape + self.event_shape[:1])
        if self.mask is not None:
            ent = torch.where(self.mask, ent, ent.new_zeros(()))
        return ent.sum(-1)

    def marginals(self):
        """Exact marginal means ``(batch, T, D)`` and covariances ``(batch, T, D, D)``."""
        c = self.cond
        m = c.b.new_zeros(c.b.shape[0], c.b.shape[-1])
        P = c.S.new_zeros(c.b.shape[0], c.b.shape[-1], c.b.shape[-1])
        means, covs = [], []
        for t in range(c.b.shape[1]):
            F_t, S_t = c.F[:, t], c.S[:, t]
            m = _mv(F_t, m) + c.b[:, t]
            P = F_t @ P @ F_t.transpose(-1, -2) + S_t @ S_t.transpose(-1, -2)
            means.append(m)
            covs.append(P)
        return torch.stack(means, 1), torch.stack(covs, 1)


def _lower_cholesky(raw: torch.Tensor, floor: float) -> torch.Tensor:
    """Strict lower triangle of ``raw`` plus ``softplus(diag raw) + floor`` on the diagonal."""
    return torch.tril(raw, -1) + torch.diag_embed(F.softplus(torch.diagonal(raw)) + floor)


def _raw_for(scale: float, size: int) -> torch.Tensor:
    """A raw matrix whose :func:`_lower_cholesky` is ``scale * I`` (ignoring the floor)."""
    return torch.eye(size) * math.log(math.expm1(scale))


class ConjugateGuide(PyroModule):
    r"""Conjugate recognition guide :math:`q(z \mid x) \propto p_\text{chain}(z) \prod_{t,i\in O_t}
    \phi_{ti}(z_t)`.

    Potentials (``potentials=``):

    * ``"linear"``: pseudo-observations :math:`y_t = x_t - d` with a learned loading ``C`` and
      noise ``R`` (``noise="full"``: a Cholesky factor; ``"diag"``): the potential of step ``t``
      is the likelihood of its observed entries under :math:`N(C z_t, R)`,
      :math:`J_t = C_O^\top R_{OO}^{-1} C_O`, :math:`h_t = C_O^\top R_{OO}^{-1} y_O`.
    * ``"mlp"``: each observed entry :math:`x_{ti}` goes through its own small network
      (``hidden_dim`` tanh units) to ``rank`` pseudo-observations with their own precisions
      (heteroscedastic, diagonal): for nonlinear emissions (DMM, LSTM-SSM).

    **Exactness (LGSSM).** With ``transition=ssm`` (the model's :math:`A, Q, m_0, P_0`),
    ``potentials="linear", noise="full"``, :math:`C_q = C`, :math:`R_q = R`, :math:`d = 0`, the
    product is :math:`p(z) \prod_t p(x_{t,O_t} \mid z_t) \propto p(z \mid x)`: the exact
    posterior under *any* missing pattern (tested against the Kalman filter). Trained by
    :func:`~pyrossm.infer.fit` the guide only has to learn ``C, R, d``. With ``transition=None``
    the guide learns its own chain (and can still be exact for an LGSSM).

    Args:
        obs_dim, state_dim: sizes of ``x_t`` and ``z_t``.
        potentials, noise: see above (``noise`` defaults to ``"full"`` for linear potentials;
            ``"mlp"`` is always diagonal).
        hidden_dim, rank: the per-entry network of ``"mlp"`` potentials.
        transition: None (learned chain) or an object with tensors ``A``, ``Q``, ``init_mean``,
            ``init_cov`` (e.g. a :class:`~pyrossm.lgssm.LinearGaussianSSM`; it is referenced,
            not registered as a submodule, so its parameters stay the model's).
        scale_floor: lower bound on the noise scales and the learned chain's Cholesky diagonals.
        name: the Pyro name prefix of the parameters.

    ``guide(x, mask=None)``: ``x (batch, T, obs_dim)`` (time at dim -2, NaN = missing), ``mask
    (batch, T)`` bool right padding. Samples the one site ``"z"`` (batch_shape ``(batch,)``,
    event_shape ``(T, state_dim)``) in ``pyro.plate("sequences", batch, dim=-1)``. Cost: one
    backward recursion of ``T`` small Cholesky factorisations (batched; computed once for the
    whole batch when no entry is missing) and one sampling loop.

    >>> guide = ConjugateGuide(obs_dim=2, state_dim=3)
    >>> x = torch.randn(4, 10, 2); x[0, 3, 1] = float("nan")
    >>> guide(x).shape
    torch.Size([4, 10, 3])
    """

    def __init__(self, obs_dim, state_dim, potentials="linear", noise=None, hidden_dim=16,
                 rank=1, transition=None, scale_floor=1e-3, name="conjugate_guide"):
        super().__init__(name)
        for arg, value in (("obs_dim", obs_dim), ("state_dim", state_dim),
                           ("hidden_dim", hidden_dim), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg}: expected a positive int, got {value!r}")
        if potentials not in POTENTIALS:
            raise ValueError(f"potentials: expected one of {POTENTIALS}, got {potentials!r}")
        noise = noise or ("full" if potentials == "linear" else "diag")
        if noise not in ("full", "diag") or (potentials == "mlp" and noise != "diag"):
            raise ValueError(f"noise: expected 'full' or 'diag' ('diag' for mlp potentials), "
                             f"got {noise!r}")
        if transition is not None:
            missing = [a for a in ("A", "Q", "init_mean", "init_cov")
                       if not hasattr(transition, a)]
            if missing:
                raise TypeError(f"transition: expected None or an object with tensors A, Q, "
                                f"init_mean, init_cov (e.g. a LinearGaussianSSM), got "
                                f"{type(transition).__name__} without {missing}")
            A = transition.A
            if tuple(A.shape) != (state_dim, state_dim):
                raise ValueError(f"transition: expected A of shape {(state_dim, state_dim)} "
                                 f"(state_dim={state_dim}), got {tuple(A.shape)}")
        self.obs_dim, self.state_dim, self.rank = obs_dim, state_dim, rank
        self.potentials, self.noise, self.floor = potentials, noise, float(scale_floor)
        # a plain attribute, not a submodule: the model keeps its own parameters and Pyro names
        self.__dict__["_transition"] = transition
        m = obs_dim * (rank if potentials == "mlp" else 1)
        # near zero: q starts as the chain itself and learns the potentials (a random loading of
        # unit scale can start training in a region it leaves only slowly)
        self.loading = nn.Parameter(0.01 * torch.randn(m, state_dim))
        self.offset = nn.Parameter(torch.zeros(m))
        if potentials == "linear":
            self.noise_raw = nn.Parameter(_raw_for(1.0, m) if noise == "full"
                                          else torch.full((m,), math.log(math.expm1(1.0))))
        else:
            H = hidden_dim
            self.in_weight = nn.Parameter(torch.randn(obs_dim, H))
            self.in_bias = nn.Parameter(torch.randn(obs_dim, H) * 0.1)
            self.out_weight = nn.Parameter(torch.randn(obs_dim, H, 2 * rank) / math.sqrt(H))
            self.out_bias = nn.Parameter(torch.zeros(obs_dim, 2 * rank))
        if transition is None:
            D = state_dim
            self.A = nn.Parameter(0.9 * torch.eye(D))
            self.Q_raw = nn.Parameter(_raw_for(0.5, D))
            self.init_mean = nn.Parameter(torch.zeros(D))
            self.init_raw = nn.Parameter(_raw_for(1.0, D))

    # ------------------------------------------------------------------ pieces
    def chain(self):
        """``(A, Q_tril, init_mean, init_tril)`` of the linear-Gaussian chain."""
        tr = self._transition
        if tr is None:
            return (self.A, _lower_cholesky(self.Q_raw, self.floor), self.init_mean,
                    _lower_cholesky(self.init_raw, self.floor))
        return (tr.A, torch.linalg.cholesky(tr.Q), tr.init_mean,
                torch.linalg.cholesky(tr.init_cov))

    def observation_potentials(self, x, mask=None):
        """``(J (batch_J, T, D, D), h (batch, T, D))`` of ``x (batch, T, obs_dim)``."""
        observed = ~torch.isnan(x)
        if mask is not None:
            observed = observed & mask.unsqueeze(-1)
        all_observed = bool(observed.all())
        x0 = torch.where(observed, x, x.new_zeros(()))
        if self.potentials == "linear":
            y = x0 - self.offset
            obs = None if all_observed else observed
            if self.noise == "full":
                return observation_potentials(
                    y, obs, self.loading, noise_tril=_lower_cholesky(self.noise_raw, self.floor))
            scale = F.softplus(self.noise_raw) + self.floor
            return observation_potentials(y, obs, self.loading, precision=scale.pow(-2))
        hidden = torch.tanh(x0.unsqueeze(-1) * self.in_weight + self.in_bias)  # (B, T, p, H)
        out = torch.einsum("btph,phk->btpk", hidden, self.out_weight) + self.out_bias
        y, scale_raw = out.split(self.rank, dim=-1)  # (B, T, p, r) each
        precision = (F.softplus(scale_raw) + self.floor).pow(-2)
        shape = x.shape[:2] + (-1,)
        obs = observed.unsqueeze(-1).expand_as(y).reshape(shape)
        return observation_potentials(y.reshape(shape) - self.offset, obs, self.loading,
                                      precision=precision.reshape(shape))

    def _check(self, x, mask):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor of shape (batch, T, "
                            f"{self.obs_dim}), got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 3 or x.shape[-1] != self.obs_dim or x.shape[1] == 0:
            raise ValueError(f"x: expected shape (batch, T >= 1, obs_dim={self.obs_dim}), got "
                             f"{tuple(x.shape)}")
        dtype = self.loading.dtype
        if x.dtype != dtype:
            raise TypeError(f"x: expected dtype {dtype} (the guide's parameters), got {x.dtype}; "
                            f"convert the data (x.to({dtype})) or the guide (.to({x.dtype}))")
        if mask is not None:
            _check_right_padded(mask, x)

    def distribution(self, x, mask=None) -> ConjugateGaussianSequence:
        """``q(z_{1:T} | x)`` as a :class:`ConjugateGaussianSequence`."""
        self._check(x, mask)
        A, Q_tril, m0, P0_tril = self.chain()
        J, h = self.observation_potentials(x, mask)
        J_hat, h_hat = backward_information_filter(J, h, A, Q_tril)
        return ConjugateGaussianSequence(
            forward_conditionals(J_hat, h_hat, A, Q_tril, m0, P0_tril), mask)

    def forward(self, x, mask=None):
        q = self.distribution(x, mask)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            return pyro.sample("z", q)

    @torch.no_grad()
    def posterior_stats(self, x, mask=None) -> PosteriorStats:
        """Exact marginal means and scales of ``q(z_t | x)``, each ``(batch, T, state_dim)``."""
        means, covs = self.distribution(x, mask).marginals()
        return PosteriorStats(means, torch.diagonal(covs, dim1=-2, dim2=-1).sqrt())
