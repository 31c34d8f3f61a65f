"""Plots for sequential latent-variable models (matplotlib; safe under the ``Agg`` backend).

Every function draws on an ``ax`` you pass (or on a new figure) and returns the
:class:`matplotlib.axes.Axes` it drew on -- or, for multi-panel plots, the
:class:`matplotlib.figure.Figure` -- so plots compose and tests can inspect the artists.
Sequences follow the package convention: ``(..., time, dim)`` with time at dim -2; sampled
trajectories are ``(draws, time, dim)`` (one sequence) with draws first.

* :func:`plot_bands` -- a mean line and a shaded band (given ``std`` or explicit bounds).
* :func:`plot_trajectories` -- sampled trajectories: median, credible band, a few paths, data.
* :func:`plot_forecast` -- the observed past, then a forecast band (from a
  :class:`~pyrossm.forecast.Forecast`, samples, or Gaussian predictive means/covariances), and
  optionally the held-out truth.
* :func:`plot_posterior_comparison` -- exact (Kalman smoothed) vs approximate (guide) bands.
* :func:`plot_piano_roll` -- a binary piano roll ``(time, 88)`` as an image.
* :func:`plot_training_curves` -- -ELBO per step, KL and the annealing factor from one or
  several :class:`pyrossm.infer.History` objects.

>>> import matplotlib; matplotlib.use("Agg")
>>> import torch
>>> ax = plot_trajectories(torch.randn(50, 20, 2).cumsum(1), dim=0)
>>> len(ax.collections) >= 1
True
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = [
    "plot_bands",
    "plot_forecast",
    "plot_piano_roll",
    "plot_posterior_comparison",
    "plot_trajectories",
    "plot_training_curves",
]


def _plt():
    import matplotlib.pyplot as plt  # imported lazily: no backend work at import time

    return plt


def _ax(ax, figsize=(7, 3)):
    if ax is not None:
        return ax
    _, ax = _plt().subplots(figsize=figsize)
    return ax


def _np(name, value, ndim=None):
    """A float NumPy array from a tensor / array / list; checks the number of dims."""
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected numbers (tensor or array), got "
                        f"{type(value).__name__}") from e
    if ndim is not None and arr.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected {ndim} dims, got shape {arr.shape}")
    return arr


def _z(level):
    if not 0 < level < 1:
        raise ValueError(f"level: expected a probability in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _select(name, arr, dim, keep_draws):
    """``(time, dim)`` or ``(draws, time, dim)`` -> the 1-D (or 2-D with draws) slice at ``dim``."""
    expected = 3 if keep_draws else 2
    if arr.ndim == expected - 1:  # no feature axis: a scalar series
        return arr
    if arr.ndim != expected:
        what = "(draws, time, dim)" if keep_draws else "(time, dim)"
        raise ValueError(f"{name}: expected shape {what}, got {arr.shape}")
    if not -arr.shape[-1] <= dim < arr.shape[-1]:
        raise ValueError(f"dim: expected an index below {arr.shape[-1]}, got {dim}")
    return arr[..., dim]


def plot_bands(mean, std=None, *, lower=None, upper=None, time=None, level=0.9, ax=None,
               label=None, color=None, alpha=0.25, linestyle="-"):
    """A line at ``mean (time,)`` and a band: ``mean ± z·std`` (Gaussian ``level`` interval) or
    the explicit ``lower``/``upper`` bounds. Returns the Axes (one Line2D, one PolyCollection).

    >>> import matplotlib; matplotlib.use("Agg")
    >>> ax = plot_bands([0., 1., 2.], [1., 1., 1.], label="exact")
    >>> len(ax.lines), len(ax.collections)
    (1, 1)
    """
    ax = _ax(ax)
    mean = _np("mean", mean, 1)
    t = np.arange(len(mean)) if time is None else _np("time", time, 1)
    if len(t) != len(mean):
        raise ValueError(f"time: expected {len(mean)} values (like mean), got {len(t)}")
    if std is not None:
        if lower is not None or upper is not None:
            raise ValueError("std, lower/upper: expected either std or explicit bounds, got both")
        std = _np("std", std, 1)
        lower, upper = mean - _z(level) * std, mean + _z(level) * std
    (line,) = ax.plot(t, mean, color=color, label=label, linestyle=linestyle)
    if lower is not None and upper is not None:
        ax.fill_between(t, _np("lower", lower, 1), _np("upper", upper, 1),
                        color=line.get_color(), alpha=alpha, linewidth=0)
    return ax


def plot_trajectories(samples, *, observed=None, time=None, dim=0, level=0.9, num_paths=3,
                      ax=None, label="samples", color=None):
    """Sampled trajectories of one sequence: median, central ``level`` band, a few paths.

    Args:
        samples: ``(draws, time, dim)`` (or ``(draws, time)``), e.g. ``LinearGaussianSSM.sample``
            output or one sequence of a forecast.
        observed: optional data ``(time, dim)`` plotted as points (NaN = missing, not drawn).
        dim: which coordinate to plot. ``num_paths``: sample paths drawn thinly.

    Returns the Axes (lines: median + paths; collections: the band and the data points).
    """
    ax = _ax(ax)
    s = _select("samples", _np("samples", samples, (2, 3)), dim, keep_draws=True)
    t = np.arange(s.shape[1]) if time is None else _np("time", time, 1)
    lo, med, hi = np.quantile(s, [0.5 - level / 2, 0.5, 0.5 + level / 2], axis=0)
    plot_bands(med, lower=lo, upper=hi, time=t, ax=ax, color=color,
               label=f"{label} (median, {int(round(100 * level))}% band)")
    color = ax.lines[-1].get_color()
    for path in s[:num_paths]:
        ax.plot(t, path, color=color, alpha=0.35, linewidth=0.7)
    if observed is not None:
        obs = _select("observed", _np("observed", observed), dim, keep_draws=False)
        ax.scatter(np.arange(len(obs)) if time is None else t[: len(obs)], obs, s=8,
                   color="k", label="data", zorder=3)
    ax.set_xlabel("time")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_forecast(past, *, forecast=None, sequence=0, samples=None, means=None, covs=None,
                  future=None, dim=0, level=0.9, num_paths=0, ax=None, label="forecast"):
    """The observed ``past (time, dim)`` and a forecast of the next ``horizon`` steps.

    Give a :class:`~pyrossm.forecast.Forecast` (``forecast=``, one ``sequence`` of its batch:
    exact Gaussian band when its moments are exact, else the empirical band of its samples;
    ``past`` is cut at that sequence's length, so a padded row may be passed), or
    ``samples (draws, horizon, dim)`` (empirical quantile band), or Gaussian ``means (horizon,
    dim)`` with ``covs (horizon, dim, dim)`` (exact band ``mean ± z sd``). ``future (horizon,
    dim)``: held-out truth, drawn as crosses. Returns the Axes.
    """
    ax = _ax(ax)
    if forecast is not None:
        if samples is not None or means is not None or covs is not None:
            raise ValueError("forecast, samples, means/covs: expected a Forecast or arrays, "
                             "got both")
        if not -forecast.mean.shape[0] <= sequence < forecast.mean.shape[0]:
            raise ValueError(f"sequence: expected an index below {forecast.mean.shape[0]}, got "
                             f"{sequence}")
        if forecast.exact:
            means, covs = forecast.mean[sequence], forecast.covariance[sequence]
        else:
            samples = forecast.samples[:, sequence]
        if forecast.lengths is not None:
            past = _np("past", past)[: int(forecast.lengths[sequence])]
    past_1d = _select("past", _np("past", past), dim, keep_draws=False)
    T = len(past_1d)
    ax.plot(np.arange(T), past_1d, color="k", linewidth=1, label="observed")
    if samples is not None:
        s = _select("samples", _np("samples", samples, (2, 3)), dim, keep_draws=True)
        t = T + np.arange(s.shape[1])
        lo, med, hi = np.quantile(s, [0.5 - level / 2, 0.5, 0.5 + level / 2], axis=0)
        plot_bands(med, lower=lo, upper=hi, time=t, ax=ax, color="C1",
                   label=f"{label} (median, {int(round(100 * level))}% band)")
        for path in s[:num_paths]:
            ax.plot(t, path, color="C1", alpha=0.35, linewidth=0.7)
    elif means is not None and covs is not None:
        m = _select("means", _np("means", means), dim, keep_draws=False)
        c = _np("covs", covs)
        var = c[..., dim, dim] if c.ndim == 3 else c
        plot_bands(m, np.sqrt(var), time=T + np.arange(len(m)), level=level, ax=ax,
                   color="C1", label=f"{label} (mean, {int(round(100 * level))}% interval)")
    else:
        raise ValueError("samples, means/covs: expected forecast samples or means and covs, "
                         "got neither")
    if future is not None:
        f = _select("future", _np("future", future), dim, keep_draws=False)
        ax.scatter(T + np.arange(len(f)), f, marker="x", color="C3", s=14, label="held out",
                   zorder=3)
    ax.axvline(T - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("time")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_posterior_comparison(exact_means, exact_stds, approx=None, *, observations=None,
                              time=None, dim=0, level=0.9, ax=None,
                              exact_label="exact (Kalman smoother)"):
    """Exact posterior bands against approximate ones for one sequence and one state coordinate.

    Args:
        exact_means, exact_stds: ``(time, state_dim)`` -- e.g. ``smoothed_means[b]`` and the
            square root of the diagonal of ``smoothed_covs[b]``.
        approx: ``{name: (means, stds)}`` with the same shapes, e.g. a guide's
            ``posterior_stats(x)`` for the same sequence.
        observations: optional ``(time,)`` or ``(time, obs_dim)`` data drawn as points (its
            ``dim`` coordinate) -- meaningful when C maps the state coordinate to the data.

    Returns the Axes: one line + band for the exact posterior, one dashed line + band per guide.
    """
    ax = _ax(ax)
    em = _select("exact_means", _np("exact_means", exact_means), dim, keep_draws=False)
    es = _select("exact_stds", _np("exact_stds", exact_stds), dim, keep_draws=False)
    plot_bands(em, es, time=time, level=level, ax=ax, color="k", alpha=0.2, label=exact_label)
    for i, (name, (m, s)) in enumerate((approx or {}).items()):
        m = _select(f"approx[{name!r}] means", _np("means", m), dim, keep_draws=False)
        s = _select(f"approx[{name!r}] stds", _np("stds", s), dim, keep_draws=False)
        plot_bands(m, s, time=time, level=level, ax=ax, color=f"C{i}", alpha=0.15,
                   linestyle="--", label=name)
    if observations is not None:
        obs = _np("observations", observations)
        obs = obs[:, dim] if obs.ndim == 2 else obs
        t = np.arange(len(obs)) if time is None else _np("time", time, 1)
        ax.scatter(t, obs, s=6, color="grey", label="data", zorder=3)
    ax.set_xlabel("time")
    ax.set_title(f"posterior of z[{dim}]: {int(round(100 * level))}% bands")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_piano_roll(roll, *, mask=None, ax=None, title=None, lowest_pitch=21, cmap="Greys"):
    """A piano roll ``(time, keys)`` (binary or probabilities in [0, 1]) as an image: time on the
    x axis, MIDI pitch on the y axis (key ``k`` is pitch ``lowest_pitch + k``). ``mask (time,)``
    trims right padding. Returns the Axes (one AxesImage).

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import torch
    >>> len(plot_piano_roll(torch.rand(16, 88) > 0.9).images)
    1
    """
    ax = _ax(ax, figsize=(7, 3))
    r = _np("roll", roll, 2)
    if mask is not None:
        r = r[_np("mask", mask, 1).astype(bool)]
    ax.imshow(r.T, origin="lower", aspect="auto", cmap=cmap, vmin=0, vmax=1,
              interpolation="nearest",
              extent=(-0.5, r.shape[0] - 0.5, lowest_pitch - 0.5, lowest_pitch + r.shape[1] - 0.5))
    ax.set_xlabel("time step")
    ax.set_ylabel("MIDI pitch")
    if title:
        ax.set_title(title)
    return ax


def _records(history):
    if hasattr(history, "records"):
        return list(history.records)
    if isinstance(history, dict) and "records" in history:
        return list(history["records"])
    if isinstance(history, (list, tuple)) and all(isinstance(r, dict) for r in history):
        return list(history)
    raise TypeError(f"history: expected a pyrossm.infer.History, its to_dict() or a list of "
                    f"records, got {type(history).__name__}")


def _column(records, key):
    return np.array([math.nan if r.get(key) is None else float(r[key]) for r in records])


def plot_training_curves(histories, *, reference=None, fig=None):
    """Training curves of one or several SVI runs: -ELBO per step, KL per sequence, beta.

    Args:
        histories: a :class:`pyrossm.infer.History` (or ``History.to_dict()``, or its list of
            records), or ``{name: history}`` for several runs.
        reference: ``{label: value}`` horizontal lines on the -ELBO panel (e.g. the exact
            negative log-likelihood per step from the Kalman filter).

    Returns the Figure with three Axes: (-ELBO per step: train solid, validation dashed),
    (KL per sequence), (annealing factor beta).
    """
    if not isinstance(histories, dict) or "records" in histories:
        histories = {"": histories}
    plt = _plt()
    if fig is None:
        fig = plt.figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3)
    for i, (name, h) in enumerate(histories.items()):
        recs = _records(h)
        epoch = _column(recs, "epoch")
        color = f"C{i}"
        prefix = f"{name} " if name else ""
        axes[0].plot(epoch, _column(recs, "train_neg_elbo_per_step"), color=color,
                     label=f"{prefix}train")
        val = _column(recs, "val_neg_elbo_per_step")
        if np.isfinite(val).any():
            axes[0].plot(epoch, val, color=color, linestyle="--", label=f"{prefix}validation")
        axes[1].plot(epoch, _column(recs, "train_kl"), color=color, label=name or None)
        axes[2].plot(epoch, _column(recs, "beta"), color=color, label=name or None)
    for label, value in (reference or {}).items():
        axes[0].axhline(float(value), color="k", linestyle=":", linewidth=1, label=label)
    axes[0].set_title("-ELBO per step (lower is better)")
    axes[1].set_title("KL per sequence")
    axes[2].set_title("annealing factor beta")
    axes[2].set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize="x-small")
    if len(histories) > 1:
        axes[1].legend(fontsize="x-small")
    fig.tight_layout()
    return fig
