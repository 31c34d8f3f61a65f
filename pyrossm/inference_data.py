"""Trajectory samples of any pyrossm model as an :class:`arviz.InferenceData`.

Sampled trajectories are tensors (or arrays) with draws first and time at dim -2:

* ``(draws, sequences, time, dim)`` -- the standard layout (e.g. ``z`` drawn from a guide for a
  batch of sequences, ``Forecast.samples``; a whole :class:`~pyrossm.forecast.Forecast` is
  accepted as ``predictions``);
* ``(chains, draws, sequences, time, dim)`` -- with independent chains / runs in front;
* ``(draws, time, dim)`` -- one sequence (e.g. ``model.sample(T, num_samples)``), stored with a
  ``sequence`` dimension of size 1.

:func:`to_inference_data` names the dimensions ``chain``, ``draw``, ``sequence``, ``time`` and a
last dimension ``state`` for latent variables (``z``, anything listed in ``latent``), ``obs`` for
observed ones (``x``), so that ``arviz.summary``, ``arviz.plot_hdi``, ``arviz.hdi`` and
``arviz.ess`` work on them directly. Forecasts go to the ``predictions`` group with time
coordinates continuing after the observed ones (``forecast_start``).

>>> import torch
>>> idata = to_inference_data(posterior={"z": torch.randn(100, 2, 30, 3)},
...                           observed_data={"x": torch.randn(2, 30, 1)})
>>> dict(idata.posterior["z"].sizes)
{'chain': 1, 'draw': 100, 'sequence': 2, 'time': 30, 'state': 3}
"""

from __future__ import annotations

import numpy as np

from .forecast import Forecast

__all__ = ["to_inference_data", "trajectory_dims"]

_OBSERVED_NAMES = frozenset({"x", "obs", "y"})


def _array(name, value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a tensor or array, got {type(value).__name__}") from e
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected numeric values, got dtype {arr.dtype}")
    return arr


def trajectory_dims(name: str, latent=()) -> str:
    """The name of the last dimension of variable ``name``: ``"obs"`` for observed variables
    (``x``, ``obs``, ``y``) unless listed in ``latent``, else ``"state"``."""
    return "obs" if name in _OBSERVED_NAMES and name not in latent else "state"


def _sampled(group, name, value, has_chain, latent):
    """``(chain, draw, sequence, time, dim)`` array from one of the accepted layouts."""
    arr = _array(f"{group}[{name!r}]", value)
    layouts = {
        3: "(draws, time, dim)",
        4: "(draws, sequences, time, dim)",
        5: "(chains, draws, sequences, time, dim)",
    }
    if has_chain is None:
        has_chain = arr.ndim == 5
    if has_chain:
        if arr.ndim != 5:
            raise ValueError(f"{group}[{name!r}]: with chains expected shape {layouts[5]}, got "
                             f"{arr.shape}")
        return arr
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"{group}[{name!r}]: expected shape {layouts[4]} (or {layouts[3]}, or "
                         f"{layouts[5]}), got {arr.shape}")
    return arr[None]


def _as_dict(group, value, default_name):
    if value is None:
        return {}
    if isinstance(value, Forecast):
        if value.samples.shape[0] == 0:
            raise ValueError(f"{group}: expected a Forecast with sample paths, got num_samples=0 "
                             "(forecast with num_samples >= 1)")
        out = {"x": value.samples}
        if value.latent_samples is not None and value.latent_samples.shape[0] > 0:
            out["z"] = value.latent_samples
        return out
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named result, e.g. Trajectory
        return {k: v for k, v in value._asdict().items() if k in ("z", "x")}
    return {default_name: value}


def to_inference_data(posterior=None, *, prior=None, posterior_predictive=None,
                      predictions=None, observed_data=None, latent=(), has_chain=None,
                      time=None, forecast_start=None, sequence_names=None):
    """Build an :class:`arviz.InferenceData` from sampled trajectories.

    Args:
        posterior: draws of latent trajectories given data, ``{name: samples}`` or one tensor
            (named ``"z"``). Samples have shape ``(draws, sequences, time, dim)``, ``(chains,
            draws, sequences, time, dim)`` or ``(draws, time, dim)`` (one sequence).
        prior: draws from the model's prior -- ``{name: samples}``, one tensor (``"z"``) or a
            named result with fields ``z`` and ``x`` (e.g. ``model.sample(...)``); usually
            ``(draws, time, dim)``, its ``sequence`` axis may differ from the data's.
        posterior_predictive: replicated data ``{name: samples}`` (one tensor: ``"x"``).
        predictions: forecast trajectories ``{name: samples}`` (one tensor: ``"x"``), e.g.
            ``Forecast.samples`` of shape ``(num_samples, batch, horizon, obs_dim)``, or a
            :class:`~pyrossm.forecast.Forecast` itself (``"x"``: its samples, ``"z"``: its
            latent samples; ``forecast_start`` defaults to its ``lengths`` when they agree).
        observed_data: the data ``{name: x}`` (one tensor: ``"x"``) of shape ``(sequences, time,
            dim)`` or ``(time, dim)``; NaN (missing) is kept.
        latent: names (besides ``"z"``) whose last dimension is a state, not an observation.
        has_chain: whether rank-5 inputs carry chains (default: rank 5 means chains).
        time: coordinates of the ``time`` dimension for the observed period (default 0..T-1).
        forecast_start: first time coordinate of ``predictions`` (default: the number of
            observed steps if ``observed_data`` is given, else 0).
        sequence_names: coordinates of the ``sequence`` dimension (default 0..N-1).

    Dimensions: ``chain``, ``draw``, ``sequence``, ``time``, and ``state`` (latent) or ``obs``
    (observed; ``obs`` coordinates are the feature indices). Predictions use ``time`` with their
    own coordinates, so they live in their own group.

    >>> import torch, arviz as az
    >>> idata = to_inference_data(predictions={"x": torch.randn(200, 1, 5, 2)}, forecast_start=30)
    >>> idata.predictions["x"].coords["time"].values.tolist()
    [30, 31, 32, 33, 34]
    >>> az.hdi(idata.predictions, hdi_prob=0.9)["x"].shape
    (1, 5, 2, 2)
    """
    import arviz as az

    latent = tuple(latent)
    groups = {
        "posterior": _as_dict("posterior", posterior, "z"),
        "prior": _as_dict("prior", prior, "z"),
        "posterior_predictive": _as_dict("posterior_predictive", posterior_predictive, "x"),
        "predictions": _as_dict("predictions", predictions, "x"),
    }
    observed = _as_dict("observed_data", observed_data, "x")
    if not any(groups.values()) and not observed:
        raise ValueError("posterior, prior, posterior_predictive, predictions, observed_data: "
                         "expected at least one group of samples, got none")

    obs_arrays = {}
    for name, value in observed.items():
        arr = _array(f"observed_data[{name!r}]", value)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"observed_data[{name!r}]: expected shape (sequences, time, dim) or "
                             f"(time, dim), got {arr.shape}")
        obs_arrays[name] = arr
    num_observed_steps = next(iter(obs_arrays.values())).shape[1] if obs_arrays else None

    sampled = {g: {n: _sampled(g, n, v, has_chain, latent) for n, v in d.items()}
               for g, d in groups.items()}
    all_arrays = [a for d in sampled.values() for a in d.values()]
    num_chains = {a.shape[0] for a in all_arrays}
    if len(num_chains) > 1:
        raise ValueError(f"samples: expected the same number of chains in every group, got "
                         f"{sorted(num_chains)}")
    # prior draws are unconditional: their sequence axis need not match the data's
    conditional = [a for g, d in sampled.items() if g != "prior" for a in d.values()]
    num_sequences = {a.shape[2] for a in conditional} | {a.shape[0] for a in obs_arrays.values()}
    if not num_sequences:
        num_sequences = {a.shape[2] for a in all_arrays}
    if len(num_sequences) > 1:
        raise ValueError(f"samples: expected the same number of sequences everywhere, got "
                         f"{sorted(num_sequences)}")
    n_seq = num_sequences.pop()
    seq_coords = list(range(n_seq)) if sequence_names is None else list(sequence_names)
    if len(seq_coords) != n_seq:
        raise ValueError(f"sequence_names: expected {n_seq} names, got {len(seq_coords)}")

    def time_coords(length, start=None):
        if start is not None:
            return list(range(int(start), int(start) + length))
        if time is not None:
            t = list(np.asarray(time).tolist())
            if len(t) != length:
                raise ValueError(f"time: expected {length} coordinates, got {len(t)}")
            return t
        return list(range(length))

    if forecast_start is None and isinstance(predictions, Forecast) and (
        predictions.lengths is not None and predictions.lengths.numel()
        and bool((predictions.lengths == predictions.lengths.reshape(-1)[0]).all())
    ):
        forecast_start = int(predictions.lengths.reshape(-1)[0])
    if forecast_start is None:
        forecast_start = num_observed_steps if num_observed_steps is not None else 0

    datasets = {}
    for group, arrays in sampled.items():
        if not arrays:
            continue
        data_vars = {}
        for name, arr in arrays.items():
            last = trajectory_dims(name, latent)
            steps = arr.shape[3]
            coords = {
                "chain": np.arange(arr.shape[0]),
                "draw": np.arange(arr.shape[1]),
                "sequence": (seq_coords if group != "prior" or arr.shape[2] == n_seq
                             else list(range(arr.shape[2]))),
                "time": time_coords(steps, forecast_start if group == "predictions" else None),
                last: np.arange(arr.shape[4]),
            }
            data_vars[name] = (("chain", "draw", "sequence", "time", last), arr, coords)
        datasets[group] = _dataset(data_vars)
    if obs_arrays:
        data_vars = {}
        for name, arr in obs_arrays.items():
            last = trajectory_dims(name, latent)
            coords = {"sequence": seq_coords, "time": time_coords(arr.shape[1]),
                      last: np.arange(arr.shape[2])}
            data_vars[name] = (("sequence", "time", last), arr, coords)
        datasets["observed_data"] = _dataset(data_vars)
    return az.InferenceData(**datasets)


def _dataset(data_vars):
    """An ``xarray.Dataset``; variables in one group must agree on shared coordinates."""
    import xarray as xr

    arrays = {}
    for name, (dims, values, coords) in data_vars.items():
        arrays[name] = xr.DataArray(values, dims=dims, coords={d: coords[d] for d in dims})
    try:
        return xr.Dataset(arrays)
    except ValueError as e:
        raise ValueError(f"samples: variables of one group disagree on a shared dimension "
                         f"(chain, draw, sequence or time): {e}") from None
