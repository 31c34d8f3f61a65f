"""Forecast scores and a rolling-origin backtest for any pyrossm model.

* :func:`crps_gaussian` — closed-form continuous ranked probability score of ``N(μ, σ²)``:
  ``CRPS = σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]``, ``z = (y − μ)/σ`` (Gneiting & Raftery 2007).
* :func:`crps_samples` — the energy form from samples, ``E|X − y| − ½ E|X − X'|`` (the CRPS
  of the empirical distribution, as ``properscoring.crps_ensemble``; ``fair=True``: the unbiased
  estimator with ``1/(m(m−1))`` for the second term).
* :func:`crps` — of a :class:`~pyrossm.forecast.Forecast`: closed form when its moments are exact,
  else from its samples. :func:`coverage`, :func:`absolute_error`, :func:`score` (per horizon).
* :func:`backtest` — forecast from several origins of the same series (optionally refitting),
  score each origin and horizon.

Observations ``y`` are ``(B, H, p)`` (time at dim -2); NaN = not observed, never scored.
Reference: Gneiting & Raftery (2007), "Strictly proper scoring rules, prediction, and
estimation", JASA 102; Hyndman & Athanasopoulos, *Forecasting: Principles and Practice*, 5.10
(time-series cross-validation).

>>> import torch
>>> round(float(crps_gaussian(torch.tensor(0.0), 0.0, 1.0)), 6)   # (√2 − 1)/√π
0.233695
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .forecast import Forecast
from .protocol import lengths_to_mask

__all__ = [
    "BacktestResult",
    "ForecastScores",
    "absolute_error",
    "backtest",
    "coverage",
    "crps",
    "crps_gaussian",
    "crps_samples",
    "score",
]

_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def crps_gaussian(y, mean, std):
    """CRPS of ``N(mean, std²)`` at ``y`` (elementwise, broadcasting); ``std = 0`` gives
    ``|y − mean|``.

    >>> round(float(crps_gaussian(torch.tensor(1.0), 0.0, 1.0)), 6)
    0.602441
    """
    y = torch.as_tensor(y)
    mean = torch.as_tensor(mean, dtype=y.dtype, device=y.device)
    std = torch.as_tensor(std, dtype=y.dtype, device=y.device)
    if bool((std < 0).any()):
        raise ValueError(f"std: expected non-negative values, got min {float(std.min())}")
    safe = torch.where(std > 0, std, torch.ones_like(std))
    z = (y - mean) / safe
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf = torch.special.ndtr(z)
    value = safe * (z * (2 * cdf - 1) + 2 * pdf - _INV_SQRT_PI)
    return torch.where(std > 0, value, (y - mean).abs())


def crps_samples(y, samples, dim: int = 0, fair: bool = False):
    """CRPS of the empirical distribution of ``samples`` at ``y``: ``mean_i |x_i − y| −
    ½ mean_{i,j} |x_i − x_j|`` (``fair=True``: the second mean over ``i ≠ j``). ``samples``
    has the draws along ``dim``, the rest broadcasts against ``y``. O(m log m) by sorting.

    >>> round(float(crps_samples(torch.tensor(1.0), torch.tensor([0.0, 1.0, 2.0]))), 6)
    0.222222
    """
    samples = torch.movedim(torch.as_tensor(samples), dim, 0)
    m = samples.shape[0]
    if m < (2 if fair else 1):
        raise ValueError(f"samples: expected at least {2 if fair else 1} draws along dim {dim}, "
                         f"got {m}")
    y = torch.as_tensor(y, dtype=samples.dtype, device=samples.device)
    first = (samples - y).abs().mean(0)
    s, _ = samples.sort(0)
    i = torch.arange(1, m + 1, dtype=samples.dtype, device=samples.device)
    weights = (2 * i - m - 1).reshape((m,) + (1,) * (s.dim() - 1))
    pair_sum = 2 * (weights * s).sum(0)  # Σ_{i,j} |x_i − x_j|
    return first - 0.5 * pair_sum / (m * (m - 1) if fair else m * m)


def _check_y(forecast, y):
    if not isinstance(forecast, Forecast):
        raise TypeError(f"forecast: expected a pyrossm.forecast.Forecast, got "
                        f"{type(forecast).__name__}")
    y = torch.as_tensor(y, dtype=forecast.mean.dtype, device=forecast.mean.device)
    if y.shape != forecast.mean.shape:
        raise ValueError(f"y: expected shape {tuple(forecast.mean.shape)} (batch, horizon, "
                         f"obs_dim) like forecast.mean, got {tuple(y.shape)}")
    return y


def crps(forecast: Forecast, y, fair: bool = False) -> torch.Tensor:
    """CRPS of each forecast entry ``(B, H, p)`` (NaN where ``y`` is NaN): Gaussian closed form
    of each marginal when ``forecast.exact``, else :func:`crps_samples` of ``forecast.samples``."""
    y = _check_y(forecast, y)
    if forecast.exact:
        out = crps_gaussian(y, forecast.mean, forecast.std)
    else:
        out = crps_samples(y, forecast._float_samples(), 0, fair)
    return torch.where(torch.isnan(y), torch.full_like(out, math.nan), out)


def coverage(forecast: Forecast, y, level: float = 0.9) -> torch.Tensor:
    """1.0 where ``y`` lies in the central ``level`` interval, else 0.0 (NaN where ``y`` is
    NaN), ``(B, H, p)``; its mean is the empirical coverage, ``level`` if calibrated."""
    y = _check_y(forecast, y)
    lower, upper = forecast.interval(level)
    inside = ((y >= lower) & (y <= upper)).to(y.dtype)
    return torch.where(torch.isnan(y), torch.full_like(inside, math.nan), inside)


def absolute_error(forecast: Forecast, y) -> torch.Tensor:
    """``|y − forecast.mean|`` ``(B, H, p)`` (NaN where ``y`` is NaN); its mean is the MAE,
    the root of the mean of its square the RMSE."""
    return (_check_y(forecast, y) - forecast.mean).abs()


class ForecastScores(NamedTuple):
    """Scores per horizon step, each ``(H,)``, averaged over sequences and observed entries:
    ``crps``, ``mae``, ``rmse``, ``coverage`` (of the central ``level`` interval) and
    ``count`` (number of scored entries)."""

    crps: torch.Tensor
    mae: torch.Tensor
    rmse: torch.Tensor
    coverage: torch.Tensor
    count: torch.Tensor


def _per_horizon(values):
    """Mean over all dims but the horizon (dim -2 of (B, H, p)), ignoring NaN."""
    v = values.transpose(-2, 0).reshape(values.shape[-2], -1)
    ok = ~torch.isnan(v)
    n = ok.sum(-1)
    total = torch.where(ok, v, torch.zeros_like(v)).sum(-1)
    return total / n.clamp_min(1).to(v.dtype) + torch.where(n > 0, 0.0, math.nan), n


def score(forecast: Forecast, y, level: float = 0.9, fair: bool = False) -> ForecastScores:
    """CRPS, MAE, RMSE and coverage of ``forecast`` against ``y (B, H, p)``, per horizon.

    >>> fc = Forecast.from_gaussian(torch.zeros(1, 2, 1), torch.ones(1, 2, 1, 1))
    >>> s = score(fc, torch.zeros(1, 2, 1))
    >>> [round(v, 4) for v in s.crps.tolist()], s.coverage.tolist()
    ([0.2337, 0.2337], [1.0, 1.0])
    """
    c, n = _per_horizon(crps(forecast, y, fair))
    err = absolute_error(forecast, y)
    mae, _ = _per_horizon(err)
    mse, _ = _per_horizon(err**2)
    cov, _ = _per_horizon(coverage(forecast, y, level))
    return ForecastScores(c, mae, mse.sqrt(), cov, n)


class BacktestResult(NamedTuple):
    """Rolling-origin scores: ``origins (K,)`` (forecasts start after step ``origin``);
    ``crps``, ``mae``, ``rmse``, ``coverage``, ``count``: ``(K, H)``, one per origin and
    horizon step (averaged over sequences and entries, NaN where nothing was scored);
    ``level`` of the coverage interval."""

    origins: torch.Tensor
    crps: torch.Tensor
    mae: torch.Tensor
    rmse: torch.Tensor
    coverage: torch.Tensor
    count: torch.Tensor
    level: float

    def by_horizon(self) -> ForecastScores:
        """Scores per horizon step ``(H,)`` pooled over origins (weighted by ``count``)."""
        w = self.count.to(self.crps.dtype)
        n = w.sum(0)

        def pool(v):
            return torch.where(w > 0, v * w, torch.zeros_like(v)).sum(0) / n.clamp_min(1)

        rmse = pool(self.rmse**2).sqrt()
        return ForecastScores(pool(self.crps), pool(self.mae), rmse, pool(self.coverage),
                              self.count.sum(0))


def backtest(model, x, horizon: int, origins=None, step: int | None = None, *, mask=None,
             refit=False, level: float = 0.9, num_samples: int = 200, fair: bool = False,
             **forecast_kwargs) -> BacktestResult:
    """Rolling-origin evaluation: for each origin ``t0`` forecast ``x[:, t0:t0+horizon]`` from
    ``x[:, :t0]`` and score it (time-series cross-validation).

    Args:
        model: anything with ``forecast(x, horizon, num_samples=..., mask=..., **kw)`` returning
            a :class:`~pyrossm.forecast.Forecast` (every pyrossm model).
        x: ``(batch, time, obs_dim)`` with time at dim -2; NaN = missing (not scored).
        origins: prefix lengths to forecast from (default: every ``step`` steps from
            ``time // 2`` to ``time - 1``); ``step`` default ``horizon``.
        mask: ``(batch, time)`` bool, right padding (padded steps are not scored; sequences
            with no real step before an origin are skipped there).
        refit: ``False`` (use ``model`` as is), ``True`` (call ``model.fit(prefix, mask=...)``)
            or a callable ``refit(model, prefix, mask) -> model`` (None: the same model).
        level: of the interval whose coverage is reported; ``num_samples``: paths per forecast.
        forecast_kwargs: passed on (e.g. ``guide=`` for the nonlinear models).

    Returns a :class:`BacktestResult` (scores per origin and horizon step).

    >>> import torch
    >>> from pyrossm.lgssm import LinearGaussianSSM
    >>> ssm = LinearGaussianSSM.from_matrices(A=1.0, C=1.0, Q=0.5, R=1.0)
    >>> _, x = ssm.sample(30, 2)
    >>> res = backtest(ssm, x, horizon=3, origins=[10, 20], num_samples=0)
    >>> res.crps.shape, res.by_horizon().crps.shape
    (torch.Size([2, 3]), torch.Size([3]))
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected a tensor (batch, time, obs_dim), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon: expected a positive int, got {horizon!r}")
    B, T, _ = x.shape
    if origins is None:
        step = horizon if step is None else step
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step: expected a positive int, got {step!r}")
        origins = list(range(max(1, T // 2), T, step))
    origins = [int(o) for o in origins]
    if not origins or min(origins) < 1 or max(origins) >= T:
        raise ValueError(f"origins: expected prefix lengths in [1, {T - 1}], got {origins}")
    if not (refit is False or refit is True or callable(refit)):
        raise TypeError(f"refit: expected False, True or a callable, got {refit!r}")
    real = torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask
    if tuple(real.shape) != (B, T) or real.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor (batch, time) = {(B, T)}, got "
                         f"{getattr(real, 'dtype', None)} {tuple(getattr(real, 'shape', ()))}")
    rows = []
    for t0 in origins:
        prefix, prefix_mask = x[:, :t0], real[:, :t0]
        keep = prefix_mask.any(-1)
        prefix, prefix_mask = prefix[keep], prefix_mask[keep]
        pm = None if mask is None else prefix_mask
        if refit is True:
            model.fit(prefix, mask=pm)
        elif callable(refit):
            model = refit(model, prefix, pm) or model
        fc = model.forecast(prefix, horizon, num_samples=num_samples, mask=pm, **forecast_kwargs)
        target = torch.full((int(keep.sum()), horizon, x.shape[-1]), math.nan, dtype=x.dtype,
                            device=x.device)
        stop = min(T, t0 + horizon)
        seen = real[keep, t0:stop].unsqueeze(-1)
        target[:, : stop - t0] = torch.where(seen, x[keep, t0:stop], math.nan)
        # a sequence that ends before t0 was forecast from its own end: nothing to score
        ended = lengths_to_mask(fc.lengths.reshape(-1).cpu(), t0)[:, -1].logical_not()
        target[ended.to(x.device)] = math.nan
        rows.append(score(fc, target.to(fc.mean.dtype), level, fair))
    fields = [torch.stack([getattr(r, f) for r in rows]) for f in ForecastScores._fields]
    return BacktestResult(torch.tensor(origins), *fields, level=level)
