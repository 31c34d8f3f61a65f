"""The one training loop of pyrossm: stochastic variational inference for any model/guide pair.

For a model ``p(x, z)`` and guide ``q(z | x)`` following :mod:`pyrossm.protocol` (sequences
``x`` of shape ``(batch, time, obs_dim)``, time at dim -2, with a ``(batch, time)`` mask), each
step maximises the (annealed) evidence lower bound of a minibatch::

    ELBO_beta(x) = E_q[ log p(x | z) ] - beta * E_q[ log q(z | x) - log p(z) ]

with the ``Trace_ELBO`` estimator (trace the guide, replay the model; reparameterized and
score-function terms; :func:`~pyrossm.infer.handlers.trace_elbo_particle`), ``K`` particles by
repeating the batch ``K`` times with scale ``1/K`` on the sites of the ``"sequences"`` plate
(the vectorized-particle estimator), and Pyro's ``ClippedAdam`` (per-element gradient
clipping to ``[-clip_norm, clip_norm]``, learning rate multiplied by ``lr_decay`` every step).
Reference: Hoffman et al. (2013), "Stochastic variational inference"; Ranganath et al. (2014).

One ``ClippedAdam`` optimiser holds the explicit parameter list of model and guide (see
:mod:`pyrossm.infer.params`), so every parameter -- PyroModule parameters, constrained
``PyroParam`` s (optimised in the unconstrained space) and plain ``nn.Module`` s nested inside --
is optimised exactly once, and its state is checkpointed with ``state_dict()``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) or with ``distributed=True`` the loop is data-parallel
over a ``torch.distributed`` group (:mod:`pyrossm.infer.distributed`: shared global batches,
per-rank slices, gradients summed by ``all_reduce``, rank 0 writes). ``chunk_length=L`` trains on
chunks of ``L`` steps (truncated backpropagation through time, see :func:`fit`).

On CPUs, long runs should call ``torch.set_flush_denormal(True)`` first (the ``pyrossm train``
and experiment commands do): parameters that never receive a gradient, decayed by
``weight_decay``, end up as subnormal floats, and arithmetic on them made JSB epochs 3x slower.
``fit`` leaves this process-wide switch alone.

Layout: :func:`fit` turns its keyword arguments into a validated :class:`FitConfig` and hands
it to :class:`~pyrossm.infer.loop.Trainer`, whose pieces (step, validate, checkpoint, restore)
are in :mod:`pyrossm.infer.loop`; the objective of a step is computed in one place,
:func:`~pyrossm.infer.loop.step_objective`.

Example
-------
>>> # history = fit(model, guide, (x, mask), epochs=10, batch_size=32, lr=1e-2,
>>> #               val_data=(x_val, mask_val), annealing="linear", checkpoint_dir="ckpt")
>>> # history["val_neg_elbo_per_step"][-1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from pyrossm.infer.distributed import setup as setup_distributed
from pyrossm.infer.distributed import wants_distributed
from pyrossm.infer.handlers import FREE_BITS_PER
from pyrossm.infer.history import History, TrainingDivergedError
from pyrossm.infer.loop import Trainer, step_objective

__all__ = ["FitConfig", "History", "TrainingDivergedError", "fit", "resolve_device",
           "step_objective"]

OBJECTIVES = ("elbo", "fivo")


def resolve_device(device) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or a torch.device, got "
                         f"{device!r}") from e
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was requested but no CUDA device is available "
                         f"(use device='auto' or 'cpu')")
    return out


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class FitConfig:
    """Every option of :func:`fit` but the modules and data (see :func:`fit` for each).

    :meth:`check` validates them (``ValueError`` naming the argument). Build one directly to
    reuse a configuration: ``fit(model, guide, x, **vars(cfg))``.

    >>> FitConfig(epochs=3, batch_size=8, lr=1e-2).num_particles
    1
    """

    epochs: int
    batch_size: int
    lr: float
    num_particles: int = 1
    clip_norm: float = 10.0
    lr_decay: float = 1.0
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    annealing: object = None
    free_bits: object = None
    free_bits_per: str = "sequence"
    device: object = "auto"
    seed: object = None
    shuffle: bool = True
    bucket: bool = False
    checkpoint_dir: object = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    resume: bool = False
    max_steps: object = None
    max_seconds: object = None
    early_stopping_patience: object = None
    val_num_samples: int = 1
    val_batch_size: object = None
    progress: bool = True
    on_nan: str = "raise"
    callbacks: tuple = ()
    distributed: object = None
    chunk_length: object = None
    objective: str = "elbo"
    guide_objective: object = None
    resample_every: int = 1
    val_objective: object = None
    val_every: int = 1

    def check(self, has_val_data: bool) -> "FitConfig":
        """Raise ``ValueError`` naming the first invalid option; returns ``self``."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.guide_objective not in (None, self.objective, "elbo"):
            raise ValueError(f"guide_objective: expected None, {self.objective!r} or 'elbo', "
                             f"got {self.guide_objective!r}")
        if self.val_objective not in (None,) + OBJECTIVES:
            raise ValueError(f"val_objective: expected None or one of {OBJECTIVES}, got "
                             f"{self.val_objective!r}")
        for name in ("epochs", "batch_size", "num_particles", "checkpoint_every",
                     "resample_every", "val_every", "val_num_samples"):
            _positive_int(name, getattr(self, name))
        lr = self.lr
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr: expected a positive finite learning rate, got {lr!r}")
        if self.on_nan not in ("raise", "skip"):
            raise ValueError(f"on_nan: expected 'raise' or 'skip', got {self.on_nan!r}")
        if self.early_stopping_patience is not None:
            _positive_int("early_stopping_patience", self.early_stopping_patience)
            if not has_val_data:
                raise ValueError("early_stopping_patience needs val_data (it monitors "
                                 "the validation bound); got val_data=None")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        steps = self.max_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                                  or steps < 0):
            raise ValueError(f"max_steps: expected a non-negative integer or None, got "
                             f"{steps!r}")
        secs = self.max_seconds
        if secs is not None and not (isinstance(secs, (int, float))
                                     and not isinstance(secs, bool) and secs >= 0):
            raise ValueError(f"max_seconds: expected a non-negative number of seconds or None, "
                             f"got {secs!r}")
        if self.free_bits is not None and not (float(self.free_bits) >= 0):
            raise ValueError(f"free_bits: expected a non-negative number of nats, got "
                             f"{self.free_bits!r}")
        if self.free_bits_per not in FREE_BITS_PER:
            raise ValueError(f"free_bits_per: expected one of {FREE_BITS_PER}, got "
                             f"{self.free_bits_per!r}")
        if self.chunk_length is not None:
            try:
                _positive_int("chunk_length", self.chunk_length)
            except ValueError:
                raise ValueError(f"chunk_length: expected a positive integer or None, got "
                                 f"{self.chunk_length!r}") from None
        return self


def fit(
    model,
    guide,
    train_data,
    *,
    val_data=None,
    epochs: int,
    batch_size: int,
    lr: float,
    num_particles: int = 1,
    clip_norm: float = 10.0,
    lr_decay: float = 1.0,
    betas=(0.9, 0.999),
    weight_decay: float = 0.0,
    annealing=None,
    free_bits=None,
    free_bits_per: str = "sequence",
    device="auto",
    seed=None,
    shuffle: bool = True,
    bucket: bool = False,
    checkpoint_dir=None,
    checkpoint_every: int = 1,
    keep_checkpoints: int = 2,
    resume: bool = False,
    max_steps=None,
    max_seconds=None,
    early_stopping_patience=None,
    val_num_samples: int = 1,
    val_batch_size=None,
    progress: bool = True,
    on_nan: str = "raise",
    callbacks=None,
    distributed=None,
    chunk_length=None,
    objective: str = "elbo",
    guide_objective=None,
    resample_every: int = 1,
    val_objective=None,
    val_every: int = 1,
) -> History:
    """Train ``model`` and ``guide`` by SVI; returns the :class:`History`.

    :param model, guide: ``nn.Module`` s with ``model(x, mask=None)`` / ``guide(x, mask=None)``
        (or bound methods of ``nn.Module`` s, e.g. ``ssm.model``; the module is then trained).
    :param train_data, val_data: ``x`` (N, T, D) float / (N, T) long (time at dim -2 resp. -1),
        ``(x, mask)``, ``(x, lengths)`` or a :class:`~pyrossm.infer.data.SequenceDataset`.
    :param num_particles: ELBO particles (batch repeated; the sites in the ``"sequences"`` plate
        are scaled by ``1/K``, a global latent outside it is drawn once and keeps scale 1).
    :param clip_norm, lr_decay, betas, weight_decay: ``ClippedAdam`` options (``lr_decay`` per
        step).
    :param annealing: KL annealing schedule or spec
        (:func:`~pyrossm.infer.schedules.make_schedule`), evaluated per optimisation step;
        validation always uses beta = 1.
    :param free_bits: free-bits threshold ``lambda`` in nats, or None. Defined per sequence of
        the dataset: the loss is ``-rec + sum_b max(lambda, KL_b)``, each sequence's KL clamped
        on its own, so the objective (and its value per epoch) does not depend on
        ``batch_size``, ``bucket``, ``shuffle`` or the ranks of a distributed run; with
        ``chunk_length`` a chunk counts as a sequence.
    :param free_bits_per: ``"sequence"`` (the threshold bounds each sequence's total KL) or
        ``"dimension"`` (each latent coordinate's KL of each sequence; Kingma et al. 2016 with
        groups of one), see :func:`~pyrossm.infer.handlers.elbo_objective`.
    :param device: ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``; model, guide and data
        are moved there.
    :param seed: seeds torch, numpy and random (ignored when resuming from a checkpoint).
    :param bucket: length-bucketed batches (similar lengths together, less padding).
    :param checkpoint_dir: write a checkpoint every ``checkpoint_every`` epochs (and at the end),
        keeping the last ``keep_checkpoints``; ``resume=True`` continues from the newest valid one.
    :param max_steps, max_seconds: budgets, checked before every optimisation step: stop once
        ``max_steps`` optimisation steps have been taken in total (counting those before a
        resume) or ``max_seconds`` of wall clock have passed in this call. The epoch in progress
        is recorded as it stands (``record["batches"]``), validated and checkpointed as *not*
        finished, so ``resume=True`` with a new budget continues the run (from a fresh epoch).
        A callback's stop and early stopping, in contrast, finish the run.
    :param val_num_samples, val_batch_size: guide draws per sequence and batch size of the
        validation bound (beta = 1).
    :param val_objective: the bound computed on ``val_data``: None (default: the training
        ``objective``), ``"elbo"`` or ``"fivo"`` (the FIVO bound with ``num_particles``
        particles and ``resample_every``, averaged over ``val_num_samples`` filter runs).
        ``val_neg_elbo`` and early stopping then hold and watch that bound, so a FIVO run
        keeps the parameters with the best held-out FIVO bound, not the best ELBO.
    :param val_every: validate after every ``val_every``-th epoch (and after the last); the
        records in between hold None. A FIVO validation costs a particle filter per sequence.
    :param progress: a tqdm bar (-ELBO per step, KL, beta) and one line per epoch on stderr
        (the bounds named by their objectives, e.g. ``-fivo/step``).
    :param early_stopping_patience: stop after this many validations without a better
        validation bound (see ``val_objective``) and restore the best parameters (which are
        also restored at the end of the run, however it ends).
    :param on_nan: ``"raise"`` a :class:`TrainingDivergedError` or ``"skip"`` the batch (no step).
    :param callbacks: callables ``cb(record: dict) -> bool | None`` run after each epoch; a True
        return stops training. Under ``torch.distributed`` they run on rank 0 only.
    :param distributed: data-parallel training over a ``torch.distributed`` process group
        (:mod:`pyrossm.infer.distributed`). None (default): on iff ``WORLD_SIZE`` > 1 (set by
        ``torchrun``) or a group of size > 1 is initialised. The group is created if needed
        (NCCL with CUDA on ``cuda:LOCAL_RANK``, else gloo) and destroyed at the end if ``fit``
        created it. Every rank draws the same global batches of ``batch_size`` sequences
        (private generator seeded with ``seed + epoch``; pass the same ``seed`` on every rank)
        and trains on its contiguous slice; gradients are summed with ``all_reduce`` before the
        step (the loss is a sum over sequences, so this is exactly the single-process gradient
        of the global batch); epoch totals and validation sums are all-reduced; only rank 0
        writes checkpoints, the progress bar and the epoch lines; on ``resume`` rank 0 reads
        the checkpoint and broadcasts it. ``free_bits`` is per sequence, so it is the same
        objective as in one process.
    :param chunk_length: truncated backpropagation through time by chunking: the training
        sequences are cut into chunks of ``chunk_length`` steps
        (:func:`~pyrossm.infer.data.chunk_sequences`; all-padding chunks dropped) that are
        trained on as independent sequences. Gradients then flow through at most
        ``chunk_length`` steps and memory is bounded by the chunk, not by ``T``. The price is an
        approximation: the latent state at each chunk boundary is **not** carried over -- every
        chunk starts again from the model's learned initial state ``p(z_1)`` (and the guide's
        recurrence from its initial hidden state), so dependencies longer than a chunk are not
        learned and the training ELBO is the sum of the chunks' ELBOs, not the ELBO of the whole
        sequence. Validation still uses the whole sequences. None: no chunking.
    :param objective: ``"elbo"`` (default) or ``"fivo"``: the filtering variational objective
        of :mod:`pyrossm.infer.fivo` (a particle filter with ``num_particles`` particles and the
        guide's per-step proposals; annealing and free bits do not apply). Validation and the
        reported ``train_neg_elbo`` then hold the ELBO resp. the negative FIVO bound.
    :param guide_objective: None (the guide follows ``objective``) or ``"elbo"``: with
        ``objective="fivo"``, the model's gradients come from FIVO and the guide's (the
        proposal's) from the one-particle ELBO, as Le et al. (2018) recommend for learning
        proposals (one more forward pass per step).
    :param resample_every: with ``objective="fivo"``: consider resampling every ``k`` steps
        only; the model is then evaluated once per block of ``k`` steps, a cheaper training
        step (see :func:`~pyrossm.filters.particle_filter`).
    """
    args = locals()
    options = {f.name: args[f.name] for f in fields(FitConfig)}
    options["callbacks"] = tuple(callbacks or ())
    cfg = FitConfig(**options).check(val_data is not None)
    ctx = setup_distributed(device) if wants_distributed(distributed) else None
    try:
        device = None if ctx is not None else resolve_device(device)
        return Trainer(ctx, model, guide, train_data, val_data, cfg, device).run()
    finally:
        if ctx is not None:
            ctx.close()


