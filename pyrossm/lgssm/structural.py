"""Structural time-series components composed into one :class:`LinearGaussianSSM`.

Each component contributes a block of the state: its transition block (A block-diagonal), its
noise block (Q block-diagonal) and its row of C (stacked: the observation is the sum of the
components plus an irregular term with variance R)::

    x_t = Σ_j c_j z^{(j)}_t + ε_t,   ε_t ~ N(0, σ²_irregular)
    z^{(j)}_t = A_j z^{(j)}_{t-1} + η^{(j)}_t,   η^{(j)}_t ~ N(0, Q_j)

Components (as statsmodels' ``UnobservedComponents``, with its parameter names):

* :class:`LocalLevel` — μ_t = μ_{t-1} + η_t (``sigma2.level``).
* :class:`LocalLinearTrend` — μ_t = μ_{t-1} + β_{t-1} + η_t, β_t = β_{t-1} + ζ_t
  (``sigma2.level``, ``sigma2.trend``).
* :class:`Seasonal` — dummy form (s−1 states, γ_t = −Σ_{i=1}^{s−1} γ_{t−i} + ω_t,
  ``sigma2.seasonal``) or trigonometric form (h harmonics, 2 states each rotating by 2πj/s,
  one shared variance ``sigma2.freq_seasonal_{s}({h})``).
* :class:`Autoregressive` — AR(p) in companion form (``sigma2.ar``, ``ar.L1`` …), kept
  stationary by the partial-autocorrelation transform, with its stationary initial covariance.
* :class:`Regression` — exogenous regressors u_t (shape ``(batch, T, k)`` or ``(T, k)``, time
  at dim -2) entering the observation equation, x_t = … + βᵀ u_t (``beta``), β estimated
  by maximum likelihood (statsmodels' ``mle_regression=True``); or, with
  ``equation="state"``, control inputs of the level, μ_t = μ_{t-1} + … + γᵀ u_t (``gamma``).

The non-stationary states get the approximate diffuse initialisation (variance 1e6, the first
``number of diffuse states`` log-likelihood terms burned), the AR block its stationary
covariance — statsmodels' defaults, so log-likelihoods agree with ``UnobservedComponents``.
Reference: Harvey, *Forecasting, Structural Time Series Models and the Kalman Filter* (1989);
Durbin & Koopman (2012), §3.2.

>>> import torch
>>> ssm = structural([LocalLinearTrend(), Seasonal(4)])
>>> ssm.state_dim, ssm.obs_dim
(5, 1)
>>> x = torch.randn(1, 40, 1, dtype=torch.float64).cumsum(-2)
>>> res = ssm.fit(x)
>>> res.names
['sigma2.irregular', 'sigma2.level', 'sigma2.trend', 'sigma2.seasonal']
"""

from __future__ import annotations

import math

import torch

from .initial import DIFFUSE_VARIANCE, stationary_covariance
from .mle import FLOOR_REL, Block
from .model import LinearGaussianSSM

__all__ = [
    "Autoregressive",
    "LocalLevel",
    "LocalLinearTrend",
    "Regression",
    "Seasonal",
    "structural",
]

_F64 = torch.float64


class _Component:
    """A block of states: ``A`` (k, k), ``c`` (k,), its parameters and its noise block."""

    diffuse = True
    params: tuple = ()  # (name, kind, shape)

    def transition(self, values):
        return self.A

    def noise(self, values):
        raise NotImplementedError

    def start(self, v):
        """Start values given the variance ``v`` of the differenced data."""
        return {name: torch.tensor(v, dtype=_F64) for name, kind, _ in self.params
                if kind == "variance"}


class LocalLevel(_Component):
    """Random-walk level μ_t = μ_{t-1} + η_t, η_t ~ N(0, sigma2.level)."""

    def __init__(self):
        self.k = 1
        self.A = torch.ones(1, 1, dtype=_F64)
        self.c = torch.ones(1, dtype=_F64)
        self.params = (("sigma2.level", "variance", ()),)

    def noise(self, values):
        return values["sigma2.level"].reshape(1, 1)


class LocalLinearTrend(_Component):
    """Level and slope: μ_t = μ_{t-1} + β_{t-1} + η_t, β_t = β_{t-1} + ζ_t."""

    def __init__(self):
        self.k = 2
        self.A = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=_F64)
        self.c = torch.tensor([1.0, 0.0], dtype=_F64)
        self.params = (("sigma2.level", "variance", ()), ("sigma2.trend", "variance", ()))

    def noise(self, values):
        return torch.diag(torch.stack([values["sigma2.level"], values["sigma2.trend"]]))


class Seasonal(_Component):
    """Seasonal of period ``period``: ``kind="dummy"`` (period − 1 states) or
    ``"trigonometric"`` (``harmonics`` pairs of states, default ⌊period/2⌋)."""

    def __init__(self, period, kind="dummy", harmonics=None):
        if not isinstance(period, int) or period < 2:
            raise ValueError(f"period: expected an int >= 2, got {period!r}")
        if kind not in ("dummy", "trigonometric"):
            raise ValueError(f"kind: expected 'dummy' or 'trigonometric', got {kind!r}")
        self.period, self.kind = period, kind
        if kind == "dummy":
            self.k = period - 1
            A = torch.zeros(self.k, self.k, dtype=_F64)
            A[0] = -1.0
            A[1:, :-1] += torch.eye(self.k - 1, dtype=_F64)
            self.A = A
            self.c = torch.zeros(self.k, dtype=_F64)
            self.c[0] = 1.0
            self.name = "sigma2.seasonal"
        else:
            h = period // 2 if harmonics is None else int(harmonics)
            if not 1 <= h <= period // 2:
                raise ValueError(f"harmonics: expected 1..{period // 2}, got {harmonics!r}")
            self.k = 2 * h
            blocks = []
            for j in range(1, h + 1):
                lam = 2 * math.pi * j / period
                cs, sn = math.cos(lam), math.sin(lam)
                blocks.append(torch.tensor([[cs, sn], [-sn, cs]], dtype=_F64))
            self.A = torch.block_diag(*blocks)
            self.c = torch.tensor([1.0, 0.0] * h, dtype=_F64)
            self.name = f"sigma2.freq_seasonal_{period}({h})"
        self.params = ((self.name, "variance", ()),)

    def noise(self, values):
        v = values[self.name]
        if self.kind == "dummy":
            Q = torch.zeros(self.k, self.k, dtype=v.dtype)
            return Q.index_put((torch.tensor([0]), torch.tensor([0])), v.reshape(1))
        return v * torch.eye(self.k, dtype=v.dtype)


class Autoregressive(_Component):
    """Stationary AR(``order``) block in companion form, stationary initial covariance."""

    diffuse = False

    def __init__(self, order):
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order: expected a positive int, got {order!r}")
        self.k = order
        self.c = torch.zeros(order, dtype=_F64)
        self.c[0] = 1.0
        self.params = (("sigma2.ar", "variance", ()), ("ar", "ar", (order,)))

    def transition(self, values):
        phi = values["ar"]
        rows = [phi.unsqueeze(0)]
        if self.k > 1:
            rows.append(torch.eye(self.k - 1, self.k, dtype=phi.dtype))
        return torch.cat(rows, 0)

    def noise(self, values):
        Q = torch.zeros(self.k, self.k, dtype=_F64)
        return Q.index_put((torch.tensor([0]), torch.tensor([0])), values["sigma2.ar"].reshape(1))

    def start(self, v):
        return {"sigma2.ar": torch.tensor(v, dtype=_F64), "ar": torch.zeros(self.k, dtype=_F64)}


class Regression(_Component):
    """Exogenous regressors / control inputs ``exog`` u_t ((batch, T, k) or (T, k), time at
    dim -2), coefficients by maximum likelihood: ``equation="observation"`` (default):
    x_t = … + βᵀ u_t (``beta``, statsmodels' ``exog``); ``equation="state"``: a control input
    of the first state (the level), μ_t = μ_{t−1} + … + γᵀ u_t (``gamma``; u_0 is unused),
    through the filter's ``transition_offset``."""

    def __init__(self, exog, equation="observation"):
        if equation not in ("observation", "state"):
            raise ValueError(f"equation: expected 'observation' or 'state', got {equation!r}")
        self.equation = equation
        exog = torch.as_tensor(exog, dtype=_F64)
        if exog.dim() == 1:
            exog = exog.unsqueeze(-1)
        if exog.dim() == 2:
            exog = exog.unsqueeze(0)
        if exog.dim() != 3 or not bool(torch.isfinite(exog).all()):
            raise ValueError(
                f"exog: expected finite values of shape (T, k) or (batch, T, k), got shape "
                f"{tuple(exog.shape)}"
            )
        self.exog, self.k = exog, 0
        self.name = "beta" if equation == "observation" else "gamma"
        self.params = ((self.name, "free", (exog.shape[-1],)),)

    def offset(self, values):
        """βᵀ u_t (or γᵀ u_t): ``(batch, T)``."""
        return self.exog @ values[self.name]


class StructuralSpec:
    """The natural parameters of a structural model (see :mod:`pyrossm.lgssm.mle`)."""

    def __init__(self, structure, x, floor_rel=FLOOR_REL):
        self.structure = structure
        comps = structure.components
        d = torch.diff(x, dim=-2)
        v = float(torch.nanmean((d - torch.nanmean(d)) ** 2)) if x.shape[-2] > 1 else 1.0
        v = v if v > 0 else 1.0
        s = math.sqrt(v)
        self.scale, self.v = s, v
        self.blocks = []
        if structure.irregular:
            self.blocks.append(Block("sigma2.irregular", "variance", (), s, floor_rel * v))
        seen = set()
        for comp in comps:
            for name, kind, shape in comp.params:
                if name in seen:
                    raise ValueError(f"components: parameter {name!r} appears twice")
                seen.add(name)
                scale = s if kind in ("variance", "free") else 1.0
                if kind == "free":  # regression: scale by data / regressor spread
                    spread = max(float(comp.exog.abs().mean()), 1e-12)
                    scale = float(torch.nanmean(x.abs())) / spread
                self.blocks.append(Block(name, kind, shape, scale, floor_rel * v))
        self.burn = sum(c.k for c in comps if c.diffuse)
        self.kappa = structure.diffuse_variance

    def system(self, values, x):
        comps = [c for c in self.structure.components if c.k > 0]
        A = torch.block_diag(*[c.transition(values) for c in comps])
        Q = torch.block_diag(*[c.noise(values) for c in comps])
        C = torch.cat([c.c for c in comps]).unsqueeze(0)
        init = []
        for c in comps:
            if c.diffuse:
                init.append(self.kappa * torch.eye(c.k, dtype=_F64))
            else:
                init.append(stationary_covariance(c.transition(values), c.noise(values),
                                                  check=False))
        if self.structure.irregular:
            R = values["sigma2.irregular"].reshape(1, 1)
        else:
            R = torch.zeros(1, 1, dtype=_F64)
        m = dict(A=A, C=C, Q=Q, R=R, init_mean=torch.zeros(A.shape[-1], dtype=_F64),
                 init_cov=torch.block_diag(*init))
        for c in self.structure.components:
            if not isinstance(c, Regression) or x.shape[-2] != c.exog.shape[-2]:
                continue
            if c.equation == "observation":
                x = x - c.offset(values).unsqueeze(-1)
            else:
                rest = torch.zeros(c.exog.shape[:-1] + (A.shape[-1] - 1,), dtype=_F64)
                b = torch.cat([c.offset(values).unsqueeze(-1), rest], -1)  # into state 0
                m["transition_offset"] = m.get("transition_offset", 0) + b
        return m, x

    def start(self, x, how="auto"):
        values = {}
        nvar = sum(kind == "variance" for b in self.blocks for kind in [b.kind])
        v = self.v / max(nvar, 1)
        if self.structure.irregular:
            values["sigma2.irregular"] = torch.tensor(v, dtype=_F64)
        for c in self.structure.components:
            if isinstance(c, Regression) and c.equation == "observation":
                values.update(_ols_start(c, x))
            elif isinstance(c, Regression):
                values[c.name] = torch.zeros(c.exog.shape[-1], dtype=_F64)
            else:
                values.update(c.start(v))
        return values


def _ols_start(comp, x):
    u = comp.exog.expand(x.shape[:-1] + comp.exog.shape[-1:]).reshape(-1, comp.exog.shape[-1])
    y = x.reshape(-1)
    ok = ~torch.isnan(y)
    beta = torch.linalg.lstsq(u[ok], y[ok].unsqueeze(-1)).solution.squeeze(-1)
    return {comp.name: beta}


class _Structure:
    def __init__(self, components, irregular, diffuse_variance):
        self.components, self.irregular = list(components), bool(irregular)
        self.diffuse_variance = float(diffuse_variance)

    def spec(self, x):
        return StructuralSpec(self, x)


def structural(components, irregular=True, dtype=torch.float64, device=None,
               diffuse_variance=DIFFUSE_VARIANCE):
    """One univariate :class:`LinearGaussianSSM` from structural ``components``.

    A is block-diagonal, Q block-diagonal, C the stacked rows of the components, R the
    irregular variance (0 with ``irregular=False``). The returned model has fixed matrices
    (unit variances until fitted); its :meth:`~LinearGaussianSSM.fit` estimates the
    components' variances and coefficients (names as statsmodels' ``UnobservedComponents``)
    and writes the matrices back. With a :class:`Regression` component, ``fit`` uses its
    ``exog``; the model's other methods (filter, smooth, log_prob, forecast) take the
    regression effect as an offset: ``observation_offset = exog @ beta`` (for ``forecast``
    over T + horizon steps, the future regressors included), or ``transition_offset`` with
    γᵀ u_t in the level's entry for ``equation="state"``.
    """
    comps = list(components)
    if not comps:
        raise ValueError("components: expected at least one component, got none")
    for c in comps:
        if not isinstance(c, _Component):
            raise TypeError(f"components: expected structural components, got {type(c).__name__}")
    structure = _Structure(comps, irregular, diffuse_variance)
    dummy = torch.zeros(1, 2, 1, dtype=_F64)
    spec = StructuralSpec(structure, torch.ones(1, 3, 1, dtype=_F64).cumsum(-2))
    # unit variances, zero coefficients until fitted
    values = {b.name: (torch.ones if b.kind == "variance" else torch.zeros)(b.shape, dtype=_F64)
              for b in spec.blocks}
    m, _ = spec.system(values, dummy)
    if m["A"].shape[-1] == 0:
        raise ValueError("components: expected at least one component with states")
    model = LinearGaussianSSM.from_matrices(
        A=m["A"], C=m["C"], Q=m["Q"], R=m["R"], init_mean=m["init_mean"], init_cov=m["init_cov"],
        dtype=dtype, device=device,
    )
    model._structure = structure
    model.init = "fixed"
    return model
