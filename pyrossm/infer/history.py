"""Training records of :func:`~pyrossm.infer.fit.fit` and its divergence error."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from pyrossm.infer.handlers import nonfinite_sites

__all__ = ["History", "TrainingDivergedError", "diverged_error"]


class TrainingDivergedError(RuntimeError):
    """The training loss (or a gradient) became NaN/Inf.

    Attributes: ``epoch`` (1-based), ``batch`` (0-based index within the epoch), ``sites``
    (names like ``"model:x"`` whose log-density was not finite), ``checkpoint`` (path of the last
    good checkpoint, or None).
    """

    def __init__(self, message, epoch=None, batch=None, sites=(), checkpoint=None):
        super().__init__(message)
        self.epoch, self.batch, self.sites, self.checkpoint = epoch, batch, list(sites), checkpoint


@dataclass
class History:
    """Per-epoch training records; ``history[key]`` is the list of a field over epochs.

    Fields of each record: ``epoch`` (1-based), ``global_step``, ``beta`` (annealing factor at the
    epoch's last step), ``lr``, ``train_loss`` (the optimised objective per sequence),
    ``train_neg_elbo`` / ``train_neg_elbo_per_step`` (-ELBO with beta = 1 per sequence / per
    observed step), ``train_kl`` (KL estimate per sequence), ``val_neg_elbo``,
    ``val_neg_elbo_per_step``, ``val_kl`` (None without validation data), ``seconds``,
    ``batches`` (optimisation steps taken in the epoch; fewer than a full epoch's when
    ``max_steps``/``max_seconds`` stopped it midway), ``steps_per_second``, ``skipped_batches``.

    ``stop_reason``: why training ended before ``epochs`` -- ``"early_stopping"``,
    ``"callback"``, ``"max_steps"``, ``"max_seconds"`` -- or None. ``stopped_early`` is True for
    early stopping only.
    """

    records: list = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    stop_reason: str | None = None

    def __getitem__(self, key: str) -> list:
        if self.records and key not in self.records[0]:
            raise KeyError(f"history has no field {key!r}; fields: {sorted(self.records[0])}")
        return [r[key] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def last(self) -> dict | None:
        return self.records[-1] if self.records else None

    def to_dict(self) -> dict:
        return {
            "records": [dict(r) for r in self.records],
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls([dict(r) for r in d["records"]], d.get("best_epoch"),
                   bool(d.get("stopped_early")), d.get("stop_reason"))

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


def diverged_error(epoch, batch, loss_value, traces, params, grads_bad, manager, last_ckpt,
                   failure=None):
    """The :class:`TrainingDivergedError` of a step whose loss or gradients were not finite."""
    sites = nonfinite_sites(*traces) if traces is not None else []
    parts = [f"training diverged at epoch {epoch}, batch {batch}: loss = {loss_value}"]
    if failure is not None:
        parts.append(f"a distribution rejected its arguments: {str(failure).splitlines()[0]}")
    if sites:
        parts.append(f"non-finite log-density at site(s) {', '.join(sites)}")
    if grads_bad:
        parts.append(f"non-finite gradient of {', '.join(grads_bad[:5])}")
    bad_params = [n for n, p in params.items() if not bool(torch.isfinite(p).all())]
    if bad_params:
        parts.append(f"non-finite parameter(s) {', '.join(bad_params[:5])}")
    if manager is not None:
        parts.append(f"last good checkpoint: {last_ckpt}")
    parts.append("lower lr or clip_norm, check the data for NaN/Inf, or pass on_nan='skip'")
    return TrainingDivergedError("; ".join(parts), epoch, batch, sites, last_ckpt)
