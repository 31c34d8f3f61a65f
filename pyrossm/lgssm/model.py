"""``LinearGaussianSSM``: the exact linear-Gaussian state-space model as a Pyro module.

Generative model (column vectors)::

    z_1 ~ N(init_mean, init_cov)
    z_t = A z_{t-1} + B ε_t,   Q = B Bᵀ
    x_t = C z_t   + D ψ_t,   R = D Dᵀ

Sequences are ``(batch, time, obs_dim)`` with time at dim -2. Methods delegate to the pure
functions of :mod:`pyrossm.lgssm.inference`; ``model`` is the same LGSSM as a Pyro model (one
site ``"z"`` for the latent trajectory, one observed site ``"x"``) for SVI with any guide.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from ..forecast import Forecast, sequence_lengths
from .distributions import LinearGaussianChain, LinearGaussianObservations
from .inference import kalman_filter, kalman_log_likelihood, kalman_smoother
from .initial import DIFFUSE_VARIANCE, INIT_OPTIONS, diffuse_covariance, stationary_covariance
from .sampling import forecast_moments, sample_lgssm, sample_posterior

__all__ = ["Forecast", "LinearGaussianSSM"]

_NAMES = ("A", "C", "Q", "R", "init_mean", "init_cov")
# Covariances are learned through Cholesky factors, stored under these names.
_FACTORS = {"Q": "Q_tril", "R": "R_tril", "init_cov": "init_tril"}


def _as_tensor(name, value, shape, dtype, device):
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0 and len(shape) > 0:
        t = t.expand(shape) if len(shape) == 1 else t * torch.eye(shape[0], dtype=dtype)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    return t.clone()


def _psd_factor(cov):
    """A lower-triangular L with L Lᵀ = cov for a positive semi-definite cov (None if not)."""
    evals, evecs = torch.linalg.eigh(cov)
    if float(evals.min()) < -1e-10 * float(evals.abs().max().clamp_min(1e-300)):
        return None
    B = evecs * evals.clamp_min(0).sqrt()  # cov = B Bᵀ; QR of Bᵀ gives a triangular factor
    return torch.linalg.qr(B.T, mode="r")[1].T


def _cholesky_of(name, cov, allow_singular=False):
    L, info = torch.linalg.cholesky_ex(cov)
    symmetric = torch.allclose(cov, cov.transpose(-1, -2), atol=1e-8 * float(cov.abs().max()))
    if int(info) != 0 and symmetric and allow_singular:
        L = _psd_factor(cov)
        if L is not None:
            return L
    if int(info) != 0 or not symmetric:
        raise ValueError(
            f"{name}: expected a symmetric positive-definite matrix, got {cov.tolist()}"
        )
    return L


def _future_steps(offset, lengths, horizon):
    """``offset (..., T + H, d)`` -> the ``horizon`` steps after each sequence's length:
    ``(..., H, d)``."""
    batch = torch.broadcast_shapes(offset.shape[:-2], lengths.shape)
    idx = lengths.reshape(lengths.shape + (1,)) + torch.arange(horizon, device=lengths.device)
    idx = idx.expand(batch + (horizon,)).unsqueeze(-1).expand(batch + (horizon, offset.shape[-1]))
    return offset.expand(batch + offset.shape[-2:]).gather(-2, idx)


class LinearGaussianSSM(PyroModule):
    """Linear-Gaussian state-space model with learnable (or fixed) parameters.

    Args:
        state_dim: n, the dimension of z_t.
        obs_dim: p, the dimension of x_t.
        learn: names of the learnable parameters among ``A, C, Q, R, init_mean, init_cov``
            (default all); the others are fixed buffers.
        dtype, device: of the parameters.
        init: the initial state (see :mod:`pyrossm.lgssm.initial`): ``"stationary"`` (mean 0,
            covariance from the Lyapunov equation P = A P Aᵀ + Q), ``"diffuse"`` (approximate
            diffuse: mean 0, covariance ``diffuse_variance · I``, the first ``state_dim``
            log-likelihood terms dropped by :meth:`fit`), ``"fixed"`` or ``"learned"``
            (default: ``"learned"`` when ``learn`` names init_mean/init_cov, else ``"fixed"``;
            a default ``"learned"`` becomes ``"diffuse"`` when :meth:`fit` is given a single
            sequence, from which an initial state cannot be estimated: one draw of z_1).
        stationary: keep a learned A stable in :meth:`fit` (all singular values < 1); implied
            by ``init="stationary"``.
        diagonal: names among ``Q, R, init_cov`` that :meth:`fit` keeps diagonal.

    Covariances are learned through lower-Cholesky factors (``constraints.lower_cholesky``),
    so they stay positive definite. Reference: Durbin & Koopman, *Time Series Analysis by State
    Space Methods* (2012); Särkkä (2013).

    >>> import torch
    >>> ssm = LinearGaussianSSM.from_matrices(A=[[0.9]], C=[[1.0]], Q=[[0.5]], R=[[1.0]])
    >>> z, x = ssm.sample(50, num_samples=4)            # (4, 50, 1) each
    >>> ssm.log_prob(x).shape
    torch.Size([4])
    """

    def __init__(
        self,
        state_dim,
        obs_dim,
        learn=_NAMES,
        dtype=torch.float32,
        device=None,
        *,
        init=None,
        stationary=False,
        diagonal=(),
        diffuse_variance=DIFFUSE_VARIANCE,
    ):
        super().__init__()
        for name, value in (("state_dim", state_dim), ("obs_dim", obs_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        unknown = set(learn) - set(_NAMES)
        if unknown:
            raise ValueError(f"learn: expected names among {_NAMES}, got {sorted(unknown)}")
        self._init_by_default = init is None
        if init is None:
            init = "learned" if {"init_mean", "init_cov"} & set(learn) else "fixed"
        if init not in INIT_OPTIONS:
            raise ValueError(f"init: expected one of {INIT_OPTIONS}, got {init!r}")
        if set(diagonal) - {"Q", "R", "init_cov"}:
            raise ValueError(
                f"diagonal: expected names among ('Q', 'R', 'init_cov'), got {diagonal}"
            )
        init_names = ("init_mean", "init_cov")
        learn = tuple(k for k in learn if k not in init_names)
        if init == "learned":
            learn = learn + init_names
        self.init, self.diagonal = init, tuple(diagonal)
        # init='stationary' needs a stable A: a learned A is then kept stable by fit().
        self.stationary = bool(stationary) or (init == "stationary" and "A" in learn)
        self.diffuse_variance = float(diffuse_variance)
        self.state_dim, self.obs_dim = state_dim, obs_dim
        n, p = state_dim, obs_dim
        kw = dict(dtype=dtype, device=device)
        init = {
            "A": 0.9 * torch.eye(n, **kw),
            "C": torch.eye(p, n, **kw) + 0.1 * torch.ones(p, n, **kw),
            "Q": torch.eye(n, **kw),
            "R": torch.eye(p, **kw),
            "init_mean": torch.zeros(n, **kw),
            "init_cov": torch.eye(n, **kw),
        }
        self._learn = tuple(learn)
        for name, value in init.items():
            self._set(name, value)

    def _set(self, name, value):
        """(Re)define parameter ``name`` with ``value``, learnable or as a buffer."""
        store = _FACTORS.get(name, name)
        if name in _FACTORS:
            value = _cholesky_of(name, value, allow_singular=name not in self._learn)
        for attr in (store, store + "_unconstrained"):
            if attr in self._buffers:
                del self._buffers[attr]
        if store in getattr(self, "_pyro_params", {}):
            delattr(self, store)
        if name in self._learn:
            constraint = constraints.lower_cholesky if name in _FACTORS else constraints.real
            setattr(self, store, PyroParam(value, constraint))
        else:
            self.register_buffer(store, value)

    def _switch_init(self, init):
        """Change the initial-state option after construction (mean 0, covariance I or
        derived; init_mean/init_cov learnable only for ``"learned"``)."""
        names = ("init_mean", "init_cov")
        self.init = init
        self._learn = tuple(k for k in self._learn if k not in names) + (
            names if init == "learned" else ()
        )
        self.stationary = self.stationary or (init == "stationary" and "A" in self._learn)
        kw = dict(dtype=self.A.dtype, device=self.A.device)
        self._set("init_mean", torch.zeros(self.state_dim, **kw))
        self._set("init_cov", torch.eye(self.state_dim, **kw))

    @classmethod
    def from_matrices(
        cls,
        *,
        A,
        C,
        Q=None,
        R=None,
        B=None,
        D=None,
        init_mean=None,
        init_cov=None,
        learn=(),
        dtype=None,
        device=None,
        **options,
    ):
        """Build from given values; ``B=``/``D=`` (noise factors) may replace ``Q=``/``R=``.

        Learnable Q, R and init_cov must be positive definite (they are learned as Cholesky
        factors); fixed ones may be singular positive semi-definite (then the Pyro ``model``
        has no density, but filtering, smoothing, ``log_prob`` and forecasts work).

        Scalars are accepted for 1-D models. ``learn`` names the parameters that stay
        learnable (default none: a fixed model). ``init_mean`` defaults to 0, ``init_cov`` to I.
        ``dtype``/``device`` default to those of the first tensor among the inputs (else
        float32). ``options``: ``init``, ``stationary``, ``diagonal``, ``diffuse_variance`` of
        the constructor.
        """
        given = (A, C, Q, R, B, D, init_mean, init_cov)
        first = next((t for t in given if isinstance(t, torch.Tensor) and t.is_floating_point()),
                     None)
        if dtype is None:
            dtype = first.dtype if first is not None else torch.float32
        if device is None and first is not None:
            device = first.device
        if options.get("init") in ("stationary", "diffuse") and (
            init_mean is not None or init_cov is not None
        ):
            raise ValueError(
                f"init_mean, init_cov: expected none with init={options['init']!r} (they are "
                "derived from A and Q), got values"
            )
        A = torch.as_tensor(A, dtype=dtype, device=device)
        if A.dim() == 0:
            A = A.reshape(1, 1)
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(
                f"A: expected a square matrix (state_dim, state_dim), got shape {tuple(A.shape)}"
            )
        n = A.shape[-1]
        C = torch.as_tensor(C, dtype=dtype, device=device)
        if C.dim() == 0:
            C = C.reshape(1, 1)
        if C.dim() != 2 or C.shape[-1] != n:
            raise ValueError(f"C: expected shape (obs_dim, {n}), got {tuple(C.shape)}")
        p = C.shape[0]
        if (Q is None) == (B is None):
            raise ValueError("Q, B: expected exactly one of Q= (covariance) or B= (its factor)")
        if (R is None) == (D is None):
            raise ValueError("R, D: expected exactly one of R= (covariance) or D= (its factor)")
        if Q is None:
            B = torch.as_tensor(B, dtype=dtype, device=device).reshape(n, -1)
            Q = B @ B.T
        if R is None:
            D = torch.as_tensor(D, dtype=dtype, device=device).reshape(p, -1)
            R = D @ D.T
        model = cls(n, p, learn=learn, dtype=dtype, device=device, **options)
        values = dict(
            A=A,
            C=C,
            Q=Q,
            R=R,
            init_mean=torch.zeros(n, dtype=dtype) if init_mean is None else init_mean,
            init_cov=torch.eye(n, dtype=dtype) if init_cov is None else init_cov,
        )
        shapes = dict(A=(n, n), C=(p, n), Q=(n, n), R=(p, p), init_mean=(n,), init_cov=(n, n))
        for name in _NAMES:
            model._set(name, _as_tensor(name, values[name], shapes[name], dtype, device))
        return model

    # ------------------------------------------------------------------ parameter values
    def _factor(self, name):
        if name == "init_cov" and self.init in ("stationary", "diffuse"):
            return torch.linalg.cholesky(self.init_cov)
        return getattr(self, _FACTORS[name])

    @property
    def Q(self):
        L = self._factor("Q")
        return L @ L.transpose(-1, -2)

    @property
    def R(self):
        L = self._factor("R")
        return L @ L.transpose(-1, -2)

    @property
    def init_cov(self):
        """The initial covariance; derived from A and Q for ``init='stationary'`` (discrete
        Lyapunov equation) and ``diffuse_variance · I`` for ``init='diffuse'``."""
        if self.init == "stationary":
            return stationary_covariance(self.A, self.Q)
        if self.init == "diffuse":
            return diffuse_covariance(self.state_dim, self.diffuse_variance,
                                      dtype=self.A.dtype, device=self.A.device)
        L = self._factor("init_cov")
        return L @ L.transpose(-1, -2)

    @property
    def loglikelihood_burn(self):
        """Number of first steps whose log-likelihood terms ``fit`` drops: ``state_dim`` with
        the approximate diffuse initial state (as statsmodels), else 0."""
        return self.state_dim if self.init == "diffuse" else 0

    def matrices(self):
        """Current values as a dict ``A, C, Q, R, init_mean, init_cov`` (tensors)."""
        return {name: getattr(self, name) for name in _NAMES}

    def _param_device_dtype(self):
        return self.init_mean.device, self.init_mean.dtype

    def _check_x(self, x, name="x"):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor of shape (batch, time, "
                f"{self.obs_dim}), got {type(x).__name__}"
            )
        if x.dim() < 2 or x.shape[-1] != self.obs_dim:
            raise ValueError(
                f"{name}: expected shape (..., time, {self.obs_dim}) with time at "
                f"dim -2, got {tuple(x.shape)}"
            )
        device, dtype = self._param_device_dtype()
        if x.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the model's), got {x.dtype}")
        return x

    # ------------------------------------------------------------------ exact inference
    def filter(self, x, mask=None, parallel=False, *, transition_offset=None,
               observation_offset=None, predicted=True, per_step=True):
        """Kalman filter of ``x (..., T, obs_dim)``: a :class:`~pyrossm.lgssm.FilterResult`.

        ``transition_offset (..., T, state_dim)`` b_t and ``observation_offset (..., T,
        obs_dim)`` d_t (control inputs, regression effects: z_t = A z_{t-1} + b_t + …,
        x_t = C z_t + d_t + …), ``predicted=False`` / ``per_step=False`` (no predicted
        moments / step log-likelihoods), as in :func:`~pyrossm.lgssm.kalman_filter`."""
        return kalman_filter(self._check_x(x), *self.matrices().values(), mask, parallel,
                             transition_offset=transition_offset,
                             observation_offset=observation_offset, predicted=predicted,
                             per_step=per_step)

    def smooth(self, x, mask=None, parallel=False, *, transition_offset=None,
               observation_offset=None):
        """RTS smoother of ``x (..., T, obs_dim)``: a :class:`~pyrossm.lgssm.SmootherResult`
        (offsets as in :meth:`filter`)."""
        return kalman_smoother(self._check_x(x), *self.matrices().values(), mask, parallel,
                               transition_offset=transition_offset,
                               observation_offset=observation_offset)

    def log_prob(self, x, mask=None, *, transition_offset=None, observation_offset=None):
        """Exact log p(x) of each sequence, shape ``x.shape[:-2]`` (offsets as in
        :meth:`filter`)."""
        return kalman_log_likelihood(self._check_x(x), *self.matrices().values(), mask,
                                     transition_offset=transition_offset,
                                     observation_offset=observation_offset)

    # ------------------------------------------------------------------ generation
    def sample(self, num_steps, num_samples=1, generator=None):
        """Sample from the model: ``Trajectory(z (num_samples, T, state_dim), x (num_samples, T,
        obs_dim))`` (:func:`~pyrossm.lgssm.sampling.sample_lgssm`; ``generator`` optional)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        with torch.no_grad():
            return sample_lgssm(*self.matrices().values(), num_steps, (num_samples,),
                                generator=generator)

    def sample_posterior(self, x, num_samples=1, mask=None, generator=None):
        """Exact draws of the latent trajectories given ``x (..., T, obs_dim)`` (time at dim
        -2; NaN / ``mask`` False = missing) by forward filtering, backward sampling:
        ``z (num_samples, ..., T, state_dim)``. See :func:`~pyrossm.lgssm.sample_posterior`."""
        with torch.no_grad():
            return sample_posterior(self._check_x(x), *self.matrices().values(), num_samples,
                                    mask, generator=generator)

    def forecast(self, x, horizon, num_samples=100, mask=None, generator=None, *,
                 transition_offset=None, observation_offset=None):
        """Forecast ``horizon`` steps after each sequence of ``x (..., T, obs_dim)``.

        Each sequence is forecast from its own length: the last True step of ``mask (..., T)``
        (trailing False steps are right padding; to forecast past trailing missing steps mark
        them NaN in ``x`` instead). Its filtered state is propagated through the model: exact
        predictive means and covariances, and ``num_samples`` sampled paths (``0``: moments
        only). Returns a :class:`~pyrossm.forecast.Forecast` (``samples (S, ..., H, p)``,
        ``mean (..., H, p)``, ``covariance (..., H, p, p)``, latent moments, ``lengths``).

        Offsets (exogenous inputs, see :meth:`filter`) are given on the time axis of ``x``
        extended by the horizon: ``transition_offset (..., T + horizon, state_dim)``,
        ``observation_offset (..., T + horizon, obs_dim)``; a sequence of length ℓ is filtered
        with steps ``< ℓ`` and forecast with steps ``ℓ .. ℓ + horizon - 1``. For a structural
        model with a :class:`~pyrossm.lgssm.Regression` in the observation equation, pass
        ``observation_offset = exog @ beta`` (past and future regressors).

        >>> import torch
        >>> ssm = LinearGaussianSSM.from_matrices(A=1.0, C=1.0, Q=0.1, R=1.0)
        >>> x, u = torch.randn(1, 20, 1), torch.ones(1, 23, 1)   # 3 future inputs
        >>> ssm.forecast(x, 3, observation_offset=2.0 * u).mean.shape
        torch.Size([1, 3, 1])
        """
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon: expected a positive int, got {horizon!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples: expected a non-negative int, got {num_samples!r}")
        x = self._check_x(x)
        lengths = sequence_lengths(mask, x.shape[-2], x.shape[:-2], x.device)
        if bool((lengths < 1).any()):
            raise ValueError("mask: expected at least one True step in every sequence, got a "
                             "sequence with none")
        T = x.shape[-2]
        offsets = {}
        for name, value, size in (("transition_offset", transition_offset, self.state_dim),
                                  ("observation_offset", observation_offset, self.obs_dim)):
            if value is None:
                continue
            if (not isinstance(value, torch.Tensor) or value.dim() < 2
                    or value.shape[-2:] != (T + horizon, size)):
                raise ValueError(
                    f"{name}: expected shape (..., T + horizon = {T + horizon}, {size}) (past "
                    f"and future steps, time at dim -2), got "
                    f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)}")
            offsets[name] = value
        with torch.no_grad():
            filt = self.filter(x, mask, **{k: v[..., :T, :] for k, v in offsets.items()})
            n = self.state_dim
            idx = (lengths - 1).reshape(lengths.shape + (1, 1))
            m = filt.filtered_means.gather(-2, idx.expand(lengths.shape + (1, n))).squeeze(-2)
            P = filt.filtered_covs.gather(-3, idx.unsqueeze(-1).expand(lengths.shape + (1, n, n)))
            P = P.squeeze(-3)
            A, C, Q, R = self.A, self.C, self.Q, self.R
            zm, zP, xm, xP = forecast_moments(A, C, Q, R, m, P, horizon)
            z, xs = sample_lgssm(A, C, Q, R, m, P, horizon, (num_samples,), start="transition",
                                 generator=generator)
            if offsets:
                # Offsets shift the forecast by a deterministic path: δ_h = A δ_{h-1} + b_{ℓ+h}
                # in the state, C δ_h + d_{ℓ+h} in the observations (covariances unchanged).
                future = lambda v: _future_steps(v, lengths, horizon)  # noqa: E731
                dz = torch.zeros_like(zm)
                if "transition_offset" in offsets:
                    b = future(offsets["transition_offset"])
                    d, steps = torch.zeros_like(m), []
                    for h in range(horizon):
                        d = d @ A.transpose(-1, -2) + b[..., h, :]
                        steps.append(d)
                    dz = torch.stack(steps, -2)
                dx = dz @ C.transpose(-1, -2)
                if "observation_offset" in offsets:
                    dx = dx + future(offsets["observation_offset"])
                zm, xm, z, xs = zm + dz, xm + dx, z + dz, xs + dx
        return Forecast(xs, z, xm, xP, zm, zP, lengths=lengths)

    # ------------------------------------------------------------------ Pyro model
    def model(self, x, mask=None):
        """The LGSSM as a Pyro model (see :mod:`pyrossm.protocol`).

        ``x (batch, T, obs_dim)`` (NaN = missing entry), ``mask (batch, T)`` True for steps in
        the sequence. Site ``"z"``: the latent trajectory, event shape ``(T, state_dim)``;
        site ``"x"``: the observations.
        """
        x = self._check_x(x)
        if x.dim() != 3:
            raise ValueError(
                f"x: expected shape (batch, time, {self.obs_dim}), got {tuple(x.shape)}"
            )
        batch, T, _ = x.shape
        with pyro.plate("sequences", batch, dim=-1):
            chain = LinearGaussianChain(
                self.A, self._factor("Q"), self.init_mean, self._factor("init_cov"), T, mask=mask
            )
            z = pyro.sample("z", chain)
            obs = LinearGaussianObservations(z, self.C, self._factor("R"), mask=mask)
            pyro.sample("x", obs, obs=x)
        return z

    def forward(self, x, mask=None):
        return self.model(x, mask)

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        x,
        mask=None,
        num_steps=10,
        lr=None,
        optimizer="lbfgs",
        burn=None,
        tolerance=1e-12,
        parallel=False,
        *,
        start="auto",
        std_errors=True,
        gtol=1e-6,
    ):
        """Maximum likelihood: L-BFGS on the exact Kalman log-likelihood (missing data allowed).

        ``x (batch, T, obs_dim)`` (time at dim -2; NaN = missing entry), ``mask (batch, T)``.
        Fitted in float64 over an unconstrained parameterisation that keeps Q, R, init_cov
        positive definite (a floor of 1e-8 times the data variance), the ``diagonal`` ones
        diagonal, and A stable when ``stationary`` (see :mod:`pyrossm.lgssm.mle`); starts from
        a principal-component moment estimate (``start="auto"``) or the current values
        (``start="current"``). ``num_steps``: the L-BFGS budget, ``50 · num_steps``
        iterations (as before); ``tolerance``, ``gtol``: relative change of the loss and max
        gradient at which it stops. ``burn``:
        steps whose log-likelihood terms are dropped (default ``loglikelihood_burn``: the state
        dimension with ``init="diffuse"``, else 0). Warns when the optimum is on the boundary
        or the optimiser did not converge. ``lr``/``parallel`` are ignored (kept for old calls).

        Writes the estimates into the model and returns a :class:`~pyrossm.lgssm.MLEResults`
        (estimates, standard errors, log-likelihood, AIC/BIC, residual diagnostics,
        ``summary()``), which is also the list of the loss history per iteration (negative
        log-likelihood per observed step, as before).
        """
        from .mle import fit_model

        self._check_x(x)
        if self._init_by_default and self.init == "learned" and math.prod(x.shape[:-2]) == 1:
            # One sequence is one draw of z_1: a learned initial state degenerates (its
            # covariance collapses); the approximate diffuse prior is statsmodels' choice too.
            self._switch_init("diffuse")
        if optimizer != "lbfgs":
            raise ValueError(f"optimizer: expected 'lbfgs', got {optimizer!r}")
        return fit_model(self, x, mask, burn=burn, start=start, max_iter=50 * num_steps,
                         gtol=gtol, ftol=tolerance, std_errors=std_errors)

    def fit_em(self, x, mask=None, num_iters=100, tolerance=1e-8):
        """Maximum likelihood by expectation-maximisation (Shumway & Stoffer 1982).

        E-step: the RTS smoother's moments (with lag-one cross-covariances); M-step: the
        closed-form updates of the learnable parameters among A, C, Q, R, init_mean, init_cov
        (fixed ones stay). ``x (batch, T, obs_dim)``; whole unobserved steps (``mask`` False or
        an all-NaN vector) are supported, partially observed vectors are not (use :meth:`fit`).
        The log-likelihood never decreases. Returns the history of the log-likelihood per
        observed step; stops when it improves by less than ``tolerance``.
        """
        self._check_x(x)
        if x.dim() == 2:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        nan = torch.isnan(x)
        if bool((nan.any(-1) & ~nan.all(-1)).any()):
            raise ValueError(
                "x: fit_em supports whole missing steps only, got partially "
                "observed vectors (NaN in some entries of a step); use fit()"
            )
        obs = ~nan.all(-1) if mask is None else (mask & ~nan.all(-1))
        w = obs.to(x.dtype)  # (N, T)
        x0 = torch.where(obs.unsqueeze(-1), x, torch.zeros_like(x))
        N, T, _ = x.shape
        n_obs = w.sum().clamp_min(1)
        history = []
        with torch.no_grad():
            for _ in range(num_iters):
                sm = self.smooth(x, obs)
                history.append(float(sm.log_likelihood.sum() / n_obs))
                if len(history) > 1 and history[-1] - history[-2] < tolerance:
                    break
                m, P, cross = sm.smoothed_means, sm.smoothed_covs, sm.smoothed_cross_covs
                Ezz = P + m.unsqueeze(-1) * m.unsqueeze(-2)  # E[z_t z_tᵀ]   (N, T, n, n)
                Ez1z0 = cross + m[:, 1:, :, None] * m[:, :-1, None, :]  # E[z_t z_{t-1}ᵀ]
                new = {}
                if T > 1:
                    S11, S00, S10 = (
                        Ezz[:, 1:].sum((0, 1)),
                        Ezz[:, :-1].sum((0, 1)),
                        Ez1z0.sum((0, 1)),
                    )
                    A = torch.linalg.solve(S00, S10.T).T if "A" in self._learn else self.A
                    new["A"] = A
                    Qn = S11 - A @ S10.T - S10 @ A.T + A @ S00 @ A.T
                    new["Q"] = 0.5 * (Qn + Qn.T) / (N * (T - 1))
                Sxz = (w[..., None, None] * x0.unsqueeze(-1) * m.unsqueeze(-2)).sum((0, 1))
                Szz = (w[..., None, None] * Ezz).sum((0, 1))
                C = torch.linalg.solve(Szz, Sxz.T).T if "C" in self._learn else self.C
                new["C"] = C
                Sxx = (w[..., None, None] * x0.unsqueeze(-1) * x0.unsqueeze(-2)).sum((0, 1))
                Rn = Sxx - C @ Sxz.T - Sxz @ C.T + C @ Szz @ C.T
                new["R"] = 0.5 * (Rn + Rn.T) / n_obs
                m1 = m[:, 0].mean(0)
                new["init_mean"] = m1
                P1 = Ezz[:, 0].mean(0) - m1.unsqueeze(-1) * m1.unsqueeze(-2)
                if "init_mean" not in self._learn:
                    d = m[:, 0] - self.init_mean
                    P1 = (P[:, 0] + d.unsqueeze(-1) * d.unsqueeze(-2)).mean(0)
                new["init_cov"] = 0.5 * (P1 + P1.T)
                for name, value in new.items():
                    if name in self._learn:
                        self._set(name, value.detach().clone())
        return history
