"""KL annealing schedules: ``beta = schedule(step)`` per optimisation step (step 0 = first step).

The training loop multiplies the log-density of every *unobserved* sample site, in the model and
in the guide, by ``beta`` (see :class:`pyrossm.infer.handlers.LatentScaleMessenger`), so the
objective is ``E_q[log p(x|z)] - beta * KL(q(z|x) || p(z))``. Evaluation always uses beta = 1.

* :class:`Constant` -- ``beta = value``.
* :class:`Linear` -- from ``start`` (the floor) to ``end`` linearly over ``num_steps`` steps, then
  ``end`` (the deep Markov model example of Pyro anneals this way, Krishnan et al. 2017).
* :class:`Sigmoid` -- ``1 / (1 + exp(-k (step - x0)))`` (Bowman et al. 2016, "Generating sentences
  from a continuous space").
* :class:`Cyclical` -- ``num_cycles`` cycles over ``total_steps``; inside each cycle beta rises
  linearly from ``start`` to ``end`` over the first ``ratio`` of the cycle, then stays at ``end``
  (Fu et al. 2019, "Cyclical annealing schedule"). After ``total_steps`` beta stays at ``end``.
* :func:`make_schedule` builds one from a spec: ``None``, a number, a name,
  ``"name:key=value,..."``, a dict ``{"name": ..., **kwargs}``, a schedule or any callable
  ``step -> float``.

>>> Linear(num_steps=10, start=0.5)(5)
0.75
>>> make_schedule({"name": "cyclical", "total_steps": 100, "num_cycles": 2, "ratio": 0.5})(60)
0.4
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["Constant", "Cyclical", "Linear", "Schedule", "Sigmoid", "make_schedule"]


class Schedule:
    """Base class: a callable ``step -> beta`` that can be described by a dict."""

    name = "schedule"

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name, **self._kwargs()}

    def _kwargs(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_dict().items())))


def _check_step(step) -> int:
    step = int(step)
    if step < 0:
        raise ValueError(f"step: expected a non-negative step, got {step}")
    return step


def _check_unit(name: str, value) -> float:
    value = float(value)
    if not (0.0 <= value and math.isfinite(value)):
        raise ValueError(f"{name}: expected a finite non-negative factor, got {value}")
    return value


class Constant(Schedule):
    """``beta = value`` at every step."""

    name = "constant"

    def __init__(self, value: float = 1.0):
        self.value = _check_unit("value", value)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.value

    def _kwargs(self) -> dict:
        return {"value": self.value}


class Linear(Schedule):
    """``beta = start + (end - start) * min(step / num_steps, 1)``."""

    name = "linear"

    def __init__(self, num_steps: int, start: float = 0.0, end: float = 1.0):
        if int(num_steps) < 1:
            raise ValueError(f"num_steps: expected a positive integer, got {num_steps}")
        self.num_steps = int(num_steps)
        self.start = _check_unit("start", start)
        self.end = _check_unit("end", end)

    def __call__(self, step: int) -> float:
        frac = min(_check_step(step) / self.num_steps, 1.0)
        return self.start + (self.end - self.start) * frac

    def _kwargs(self) -> dict:
        return {"num_steps": self.num_steps, "start": self.start, "end": self.end}


class Sigmoid(Schedule):
    """``beta = 1 / (1 + exp(-k (step - x0)))`` (Bowman et al. 2016)."""

    name = "sigmoid"

    def __init__(self, x0: float, k: float):
        if not float(k) > 0:
            raise ValueError(f"k: expected a positive steepness, got {k}")
        self.x0, self.k = float(x0), float(k)

    def __call__(self, step: int) -> float:
        u = -self.k * (_check_step(step) - self.x0)
        if u > 0:  # stable for large |u|
            e = math.exp(-u)
            return e / (1.0 + e)
        return 1.0 / (1.0 + math.exp(u))

    def _kwargs(self) -> dict:
        return {"x0": self.x0, "k": self.k}


class Cyclical(Schedule):
    """Fu et al. (2019): ``num_cycles`` cycles over ``total_steps``; rise over ``ratio`` of each."""

    name = "cyclical"

    def __init__(
        self,
        total_steps: int,
        num_cycles: int = 4,
        ratio: float = 0.5,
        start: float = 0.0,
        end: float = 1.0,
    ):
        if int(total_steps) < 1:
            raise ValueError(f"total_steps: expected a positive integer, got {total_steps}")
        if int(num_cycles) < 1:
            raise ValueError(f"num_cycles: expected a positive integer, got {num_cycles}")
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio: expected 0 < ratio <= 1, got {ratio}")
        self.total_steps, self.num_cycles = int(total_steps), int(num_cycles)
        self.ratio = float(ratio)
        self.start, self.end = _check_unit("start", start), _check_unit("end", end)

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step >= self.total_steps:
            return self.end
        period = self.total_steps / self.num_cycles
        tau = (step % period) / period
        return self.start + (self.end - self.start) * min(tau / self.ratio, 1.0)

    def _kwargs(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "num_cycles": self.num_cycles,
            "ratio": self.ratio,
            "start": self.start,
            "end": self.end,
        }


class _Callable(Schedule):
    name = "callable"

    def __init__(self, fn: Callable[[int], float]):
        self.fn = fn

    def __call__(self, step: int) -> float:
        return float(self.fn(step))

    def to_dict(self) -> dict:
        return {"name": self.name, "repr": repr(self.fn)}


_REGISTRY = {"constant": Constant, "linear": Linear, "sigmoid": Sigmoid, "cyclical": Cyclical}


def _defaults(name: str, total_steps: int | None) -> dict:
    """Defaults that depend on the length of the run (``total_steps`` optimisation steps)."""
    if name == "constant" or total_steps is None:
        return {}
    total_steps = max(int(total_steps), 1)
    if name == "linear":
        return {"num_steps": max(total_steps // 2, 1)}
    if name == "sigmoid":
        return {"x0": total_steps / 4.0, "k": 20.0 / total_steps}
    if name == "cyclical":
        return {"total_steps": total_steps}
    return {}


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def make_schedule(spec=None, total_steps: int | None = None) -> Schedule:
    """Build a schedule from ``spec``.

    :param spec: ``None`` (beta = 1), a number (constant), a :class:`Schedule`, a callable
        ``step -> float``, a name (``"constant" | "linear" | "sigmoid" | "cyclical"``), a string
        ``"linear:num_steps=1000,start=0.1"`` or a dict ``{"name": "linear", "num_steps": 1000}``.
    :param total_steps: the number of optimisation steps of the run; fills in defaults that a
        spec leaves out (linear: over the first half; sigmoid: ``x0 = total/4, k = 20/total``;
        cyclical: ``total_steps``).
    """
    if spec is None:
        return Constant(1.0)
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(float(spec))
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        kwargs = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"annealing: cannot parse {item!r} in {spec!r} (use key=value)")
            kwargs[key.strip()] = _parse_value(value.strip())
        spec = {"name": name.strip(), **kwargs}
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        if name == "callable":
            raise ValueError("annealing: a callable schedule cannot be rebuilt from its dict")
        if name not in _REGISTRY:
            raise ValueError(
                f"annealing: expected a schedule name in {sorted(_REGISTRY)}, got {name!r}"
            )
        kwargs = {**_defaults(name, total_steps), **spec}
        try:
            return _REGISTRY[name](**kwargs)
        except TypeError as e:
            raise ValueError(f"annealing: bad arguments for schedule {name!r}: {e}") from None
    if callable(spec):
        return _Callable(spec)
    raise TypeError(
        f"annealing: expected None, a number, a string, a dict or a callable, got "
        f"{type(spec).__name__}"
    )
