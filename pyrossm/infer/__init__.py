"""Training and evaluation for every pyrossm model/guide pair (see :mod:`pyrossm.protocol`).

Public API (stable; other modules and tests rely on it)
-------------------------------------------------------
Training
    ``fit(model, guide, train_data, *, val_data=None, epochs, batch_size, lr, num_particles=1,
    clip_norm=10.0, lr_decay=1.0, betas=(0.9, 0.999), weight_decay=0.0, annealing=None,
    free_bits=None, free_bits_per="sequence", device="auto", seed=None, shuffle=True,
    bucket=False, checkpoint_dir=None, checkpoint_every=1, keep_checkpoints=2, resume=False,
    max_steps=None, max_seconds=None, early_stopping_patience=None, val_num_samples=1,
    val_batch_size=None, progress=True, on_nan="raise", callbacks=None, distributed=None,
    chunk_length=None, objective="elbo", guide_objective=None, resample_every=1,
    val_objective=None, val_every=1)
    -> History``. SVI with Pyro's Trace_ELBO estimator and ClippedAdam; ``History[key]`` gives a
    per-epoch list (``train_neg_elbo_per_step``, ``val_neg_elbo_per_step``, ``train_kl``,
    ``beta``, ``seconds``, ``batches``, ...), ``History.stop_reason`` (``"max_seconds"``, ...);
    ``History.to_dict()`` / ``to_json()``. A ``max_steps``/``max_seconds`` budget pauses the run
    (resumable from its checkpoint); a callback or early stopping finishes it.
    ``TrainingDivergedError(RuntimeError)``: NaN/Inf loss (names epoch, batch and sites).
Evaluation (annealing factor 1, no grad, eval mode; per-sequence tensors of shape ``(N,)``)
    ``elbo(model, guide, data, num_samples=1, batch_size=64)``,
    ``log_likelihood(model, guide, data, num_samples=100, batch_size=64, chunk_size=None)`` (IWAE),
    ``kl_per_step(...)``, ``elbo_terms(...) -> ELBOResult(elbo, kl, reconstruction, num_steps)``,
    ``importance_log_weights(...) -> (N, num_samples)``.
Annealing schedules (``beta = schedule(step)``, per optimisation step)
    ``Constant``, ``Linear``, ``Sigmoid``, ``Cyclical``, ``make_schedule(spec, total_steps=None)``
    and the lowercase constructors ``constant``, ``linear``, ``sigmoid``, ``cyclical``.
Checkpoints
    ``save_checkpoint(path, payload)``, ``load_checkpoint(path)``, ``CheckpointManager``,
    ``CheckpointError``.
Data
    ``SequenceDataset(x, mask=None, lengths=None)``, ``as_dataset``, ``pad_sequences``,
    ``batch_indices`` (shuffling, length bucketing), ``repeat_particles``.
Handlers
    ``LatentScaleMessenger(beta)`` (scales unobserved sites), ``FreeBitsELBO(free_bits,
    num_particles=1, free_bits_per="sequence")`` (an SVI loss callable; ``"dimension"``: the
    threshold applies to each latent coordinate).

Notes
-----
* Parameters: one ``ClippedAdam`` over ``model.parameters() + guide.parameters()`` (each tensor
  once; PyroParams in their unconstrained space; plain ``nn.Module`` s inside PyroModules
  included). Stale or colliding entries in Pyro's global param store are handled by
  :func:`pyrossm.infer.params.claim_param_store`; a ``pyro.param`` outside the modules is
  warned about (it would not be trained).
* Checkpoints (``checkpoint_dir``): model/guide ``state_dict``, optimiser ``state_dict``, a copy
  of the param store, epoch, global step, schedule, RNG states (torch, numpy, python, cuda),
  history and early-stopping state; atomic + sha256; the last ``keep_checkpoints`` are kept; on
  ``resume=True`` the checkpoint's optimiser state (learning rate included) and schedule win.
* NaN/Inf: ``TrainingDivergedError`` names epoch, batch and the sites (``"model:x"``) whose
  log-density was not finite; the failing step is never applied, so the last checkpoint and the
  parameters stay good. ``on_nan="skip"`` skips such batches (``History["skipped_batches"]``).

``data`` everywhere is ``x`` of shape ``(N, T, obs_dim)`` (time at dim -2) or ``(N, T)`` token
ids, ``(x, mask)`` with a ``(N, T)`` bool mask, ``(x, lengths)``, or a ``SequenceDataset``.

Example
-------
>>> # from pyrossm.infer import fit, log_likelihood
>>> # history = fit(model, guide, (x, mask), epochs=20, batch_size=16, lr=1e-2, progress=False)
>>> # ll = log_likelihood(model, guide, (x, mask), num_samples=500)      # (N,)
"""

from pyrossm.infer import distributed, schedules
from pyrossm.infer.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    save_checkpoint,
)
from pyrossm.infer.data import (
    Chunks,
    SequenceDataset,
    as_dataset,
    batch_indices,
    chunk_sequences,
    pad_sequences,
    repeat_particles,
)
from pyrossm.infer.evaluate import (
    ELBOResult,
    Evaluation,
    elbo,
    elbo_terms,
    evaluate,
    importance_log_weights,
    kl_per_step,
    log_likelihood,
    observed_steps,
    smc_log_likelihood,
)
from pyrossm.infer.fit import FitConfig, History, TrainingDivergedError, fit, resolve_device
from pyrossm.infer.handlers import FreeBitsELBO, LatentScaleMessenger
from pyrossm.infer.schedules import Constant, Cyclical, Linear, Sigmoid, make_schedule

constant, linear, sigmoid, cyclical = Constant, Linear, Sigmoid, Cyclical

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Chunks",
    "Constant",
    "Cyclical",
    "ELBOResult",
    "Evaluation",
    "FitConfig",
    "FreeBitsELBO",
    "History",
    "LatentScaleMessenger",
    "Linear",
    "SequenceDataset",
    "Sigmoid",
    "TrainingDivergedError",
    "as_dataset",
    "batch_indices",
    "chunk_sequences",
    "constant",
    "cyclical",
    "distributed",
    "elbo",
    "elbo_terms",
    "evaluate",
    "fit",
    "importance_log_weights",
    "kl_per_step",
    "linear",
    "load_checkpoint",
    "log_likelihood",
    "make_schedule",
    "observed_steps",
    "pad_sequences",
    "repeat_particles",
    "resolve_device",
    "save_checkpoint",
    "schedules",
    "sigmoid",
    "smc_log_likelihood",
]
