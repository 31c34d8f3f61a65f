"""The one training loop of pyrossm: stochastic variational inference for any model/guide pair.

For a model ``p(x, z)`` and guide ``q(z | x)`` following :mod:`pyrossm.protocol` (sequences
``x`` of shape ``(batch, time, obs_dim)``, time at dim -2, with a ``(batch, time)`` mask), each
step maximises the (annealed) evidence lower bound of a minibatch::

    ELBO_beta(x) = E_q[ log p(x | z) ] - beta * E_q[ log q(z | x) - log p(z) ]

with Pyro's ``Trace_ELBO`` estimator (trace the guide, replay the model; reparameterized and
score-function terms), ``K`` particles by repeating the batch ``K`` times with scale ``1/K``
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

Example
-------
>>> # history = fit(model, guide, (x, mask), epochs=10, batch_size=32, lr=1e-2,
>>> #               val_data=(x_val, mask_val), annealing="linear", checkpoint_dir="ckpt")
>>> # history["val_neg_elbo_per_step"][-1]
"""

from __future__ import annotations

import math
import sys
import time
import warnings

import pyro
import torch
from pyro.optim.clipped_adam import ClippedAdam
from tqdm.auto import tqdm

from pyrossm.infer.checkpoint import CheckpointManager, rng_state, set_rng_state
from pyrossm.infer.data import (
    SequenceDataset,
    as_dataset,
    batch_indices,
    check_compatible,
    chunk_sequences,
)
from pyrossm.infer.distributed import (
    all_reduce_gradients,
    all_reduce_min,
    all_reduce_sum,
    broadcast_modules,
    broadcast_object,
    global_batches,
    shard,
    wants_distributed,
)
from pyrossm.infer.distributed import setup as setup_distributed
from pyrossm.infer.evaluate import elbo_terms
from pyrossm.infer.fivo import fivo_objective
from pyrossm.infer.handlers import (
    FREE_BITS_PER,
    elbo_objective,
    elbo_traces,
    foreign_params,
)
from pyrossm.infer.history import History, TrainingDivergedError, diverged_error
from pyrossm.infer.params import claim_param_store, named_parameters, owner_module
from pyrossm.infer.schedules import make_schedule

__all__ = ["History", "TrainingDivergedError", "fit", "resolve_device"]


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


def _clone_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _check_args(epochs, batch_size, lr, num_particles, on_nan, checkpoint_every,
                early_stopping_patience, val_data, resume, checkpoint_dir, free_bits,
                max_steps, max_seconds):
    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("num_particles", num_particles), ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive finite learning rate, got {lr!r}")
    if on_nan not in ("raise", "skip"):
        raise ValueError(f"on_nan: expected 'raise' or 'skip', got {on_nan!r}")
    if early_stopping_patience is not None:
        if not isinstance(early_stopping_patience, int) or early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience: expected a positive integer or None, "
                             f"got {early_stopping_patience!r}")
        if val_data is None:
            raise ValueError("early_stopping_patience needs val_data (it monitors validation "
                             "-ELBO); got val_data=None")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if max_steps is not None and (not isinstance(max_steps, int) or isinstance(max_steps, bool)
                                  or max_steps < 0):
        raise ValueError(f"max_steps: expected a non-negative integer or None, got {max_steps!r}")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float))
                                        and not isinstance(max_seconds, bool)
                                        and max_seconds >= 0):
        raise ValueError(f"max_seconds: expected a non-negative number of seconds or None, got "
                         f"{max_seconds!r}")
    if free_bits is not None and not (float(free_bits) >= 0):
        raise ValueError(f"free_bits: expected a non-negative number of nats, got {free_bits!r}")


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
        validation ELBO (computed after every epoch with beta = 1).
    :param progress: a tqdm bar (-ELBO per step, KL, beta) and one line per epoch on stderr.
    :param early_stopping_patience: stop after this many epochs without a better validation
        -ELBO and restore the best parameters (which are also restored at the end of the run).
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
    """
    if objective not in ("elbo", "fivo"):
        raise ValueError(f"objective: expected 'elbo' or 'fivo', got {objective!r}")
    _check_args(epochs, batch_size, lr, num_particles, on_nan, checkpoint_every,
                early_stopping_patience, val_data, resume, checkpoint_dir, free_bits,
                max_steps, max_seconds)
    if free_bits_per not in FREE_BITS_PER:
        raise ValueError(f"free_bits_per: expected one of {FREE_BITS_PER}, got {free_bits_per!r}")
    if chunk_length is not None and (not isinstance(chunk_length, int)
                                     or isinstance(chunk_length, bool) or chunk_length < 1):
        raise ValueError(f"chunk_length: expected a positive integer or None, got "
                         f"{chunk_length!r}")
    ctx = setup_distributed(device) if wants_distributed(distributed) else None
    try:
        return _fit(ctx, model, guide, train_data, val_data, epochs, batch_size, lr,
                    num_particles, clip_norm, lr_decay, betas, weight_decay, annealing,
                    free_bits, free_bits_per, device, seed, shuffle, bucket, checkpoint_dir,
                    checkpoint_every, keep_checkpoints, resume, early_stopping_patience,
                    val_num_samples, val_batch_size, progress, on_nan, callbacks, chunk_length,
                    max_steps, max_seconds, objective)
    finally:
        if ctx is not None:
            ctx.close()


def _fit(ctx, model, guide, train_data, val_data, epochs, batch_size, lr, num_particles,
         clip_norm, lr_decay, betas, weight_decay, annealing, free_bits, free_bits_per, device,
         seed, shuffle, bucket, checkpoint_dir, checkpoint_every, keep_checkpoints, resume,
         early_stopping_patience, val_num_samples, val_batch_size, progress, on_nan, callbacks,
         chunk_length, max_steps, max_seconds, objective="elbo"):
    device = ctx.device if ctx is not None else resolve_device(device)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    main = rank == 0
    model_module, guide_module = owner_module(model, "model"), owner_module(guide, "guide")
    train = as_dataset(train_data, "train_data")
    if chunk_length is not None:
        train = SequenceDataset(*chunk_sequences(train.x, train.mask, chunk_length,
                                                 drop_empty=True)[:2])
    train = check_compatible(train, model_module, guide_module, "train_data").to(device)
    val = None
    if val_data is not None:
        val = check_compatible(as_dataset(val_data, "val_data"), model_module, guide_module,
                               "val_data").to(device)
    model_module.to(device)
    guide_module.to(device)
    params = named_parameters(model_module, guide_module)
    if not params:
        raise ValueError("model and guide have no trainable parameters")
    claim_param_store(model_module, guide_module)
    if ctx is not None:
        broadcast_modules(model_module, guide_module)
    optimizer = ClippedAdam(list(params.values()), lr=lr, betas=tuple(betas),
                            clip_norm=clip_norm, lrd=lr_decay, weight_decay=weight_decay)
    batches_per_epoch = math.ceil(len(train) / batch_size)
    schedule = make_schedule(annealing, total_steps=epochs * batches_per_epoch)
    callbacks = list(callbacks or [])
    manager = CheckpointManager(checkpoint_dir, keep_checkpoints) if checkpoint_dir else None

    history = History()
    start_epoch, global_step = 0, 0
    best, bad_epochs, best_state = math.inf, 0, None
    last_ckpt, finished, checked_params = None, False, False
    shuffle_seed = None
    if resume and manager:
        if ctx is None:
            found = manager.latest(map_location=device)
        else:  # rank 0 reads and verifies; every rank gets the same checkpoint
            found = broadcast_object(manager.latest(map_location="cpu") if main else None)
    else:
        found = None
    if found is not None:
        last_ckpt, state = found
        if state["param_names"] != list(params):
            raise ValueError(f"checkpoint {last_ckpt!r} holds parameters {state['param_names']}, "
                             f"but model and guide have {list(params)}")
        model_module.load_state_dict(state["model"])
        guide_module.load_state_dict(state["guide"])
        optimizer.load_state_dict(state["optimizer"])
        if state["schedule"] != schedule.to_dict():
            if state["schedule"].get("name") != "callable":
                warnings.warn(f"resuming: the checkpoint's annealing schedule {state['schedule']}"
                              f" is used instead of {schedule.to_dict()}")
                schedule = make_schedule(state["schedule"])
            else:
                warnings.warn(f"resuming with annealing {schedule.to_dict()} but the checkpoint "
                              f"was made with {state['schedule']}")
        history = History.from_dict(state["history"])
        if not state["finished"]:  # paused by a budget: this call decides anew
            history.stop_reason = None
        start_epoch, global_step = state["epoch"], state["global_step"]
        es = state["early_stopping"]
        best = es["best"] if es["best"] is not None else math.inf
        bad_epochs, best_state, finished = es["bad_epochs"], es["best_state"], state["finished"]
        rng_ranks = state.get("rng_ranks")
        if ctx is not None and rng_ranks is not None and len(rng_ranks) == world:
            set_rng_state(rng_ranks[rank])
        else:
            set_rng_state(state["rng"])
            if ctx is not None and rank > 0:  # a different world size: fresh per-rank streams
                pyro.set_rng_seed(int(torch.randint(2**31, ())) + rank)
        shuffle_seed = state.get("shuffle_seed")
        claim_param_store(model_module, guide_module)
    elif seed is not None:
        pyro.set_rng_seed(seed + rank)
    if ctx is not None and shuffle_seed is None:
        shuffle_seed = broadcast_object(
            (seed if seed is not None else int(torch.randint(2**31, ()))) if main else None)

    bar = tqdm(total=epochs * batches_per_epoch, initial=start_epoch * batches_per_epoch,
               disable=not (progress and main), desc="fit", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()

    def budget_spent():
        if max_steps is not None and global_step >= max_steps:
            return "max_steps"
        if max_seconds is None:
            return None
        over = time.perf_counter() - t_start >= max_seconds
        if ctx is not None:  # rank 0's clock decides for every rank
            over = broadcast_object(over)
        return "max_seconds" if over else None

    try:
        for epoch in range(start_epoch, epochs):
            if finished:
                break
            paused = budget_spent()
            if paused:  # e.g. resumed with a budget that is already spent
                history.stop_reason = paused
                break
            model_module.train()
            guide_module.train()
            t0 = time.perf_counter()
            total_loss = total_neg_elbo = total_kl = 0.0
            num_seqs = num_steps = skipped = done = 0
            if ctx is None:
                cpu_batches = list(batch_indices(train, batch_size, shuffle=shuffle,
                                                 bucket=bucket))
            else:
                cpu_batches = [shard(b, rank, world) for b in global_batches(
                    train, batch_size, epoch, shuffle_seed, shuffle=shuffle, bucket=bucket)]
            dev_batches = torch.cat(cpu_batches).to(device).split([len(b) for b in cpu_batches])
            beta = schedule(global_step)
            for b, (index, dev_index) in enumerate(zip(cpu_batches, dev_batches, strict=True)):
                if b > 0:
                    paused = budget_spent()
                    if paused:
                        break
                beta = schedule(global_step)
                done += 1
                traces, value, grads_bad, failure = None, math.nan, [], None
                neg_elbo = kl = 0.0
                if len(index) == 0:  # a rank with nothing in a short last batch
                    value, obj = 0.0, None
                else:
                    x, mask = train.batch(index, device_index=dev_index)
                    try:
                        traces, obj = step_objective(objective, model, guide, x, mask,
                                                     num_particles, beta, free_bits,
                                                     free_bits_per)
                        value, neg_elbo, kl = torch.stack(
                            [torch.as_tensor(obj.loss), obj.neg_elbo, obj.kl]).tolist()
                    except ValueError as e:
                        # A distribution's argument validation failing on a NaN/Inf *parameter*
                        # is a divergence; anything else (e.g. data outside the support) is a
                        # real error.
                        if not (str(e).startswith("Expected parameter") or not all(
                                bool(torch.isfinite(p).all()) for p in params.values())):
                            raise
                        value, neg_elbo, kl = math.nan, math.nan, math.nan
                        failure = e
                if traces is not None and not checked_params:
                    checked_params = True
                    stray = foreign_params(traces, params.values())
                    if stray:
                        warnings.warn(f"pyro.param site(s) {stray} do not belong to the model or "
                                      f"guide modules and are NOT optimised by fit (register "
                                      f"parameters on the modules, see pyrossm.protocol)")
                ok = math.isfinite(value) and math.isfinite(neg_elbo)
                if ok and obj is not None:
                    obj.surrogate.backward()
                    grads = [(n, p.grad) for n, p in params.items() if p.grad is not None]
                    if grads and not bool(torch.stack(
                            [torch.isfinite(g).all() for _, g in grads]).all()):
                        grads_bad = [n for n, g in grads if not bool(torch.isfinite(g).all())]
                        ok = False
                if ctx is not None:  # every rank skips (or raises) together
                    ok = all_reduce_min(ok, device)
                    if ok:
                        all_reduce_gradients(params.values())
                if ok:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                bar.update(1)
                if not ok:
                    if on_nan == "raise":
                        err = diverged_error(epoch + 1, b, value, traces, params, grads_bad,
                                        manager, last_ckpt, failure)
                        raise err from failure
                    skipped += 1
                    continue
                total_loss += value
                total_neg_elbo += neg_elbo
                total_kl += kl
                num_seqs += len(index)
                num_steps += int(train.num_steps[index].sum())
                if progress and main:
                    bar.set_postfix(elbo_step=f"{-total_neg_elbo / max(num_steps, 1):.4g}",
                                    kl=f"{total_kl / max(num_seqs, 1):.3g}",
                                    beta=f"{beta:.3g}", refresh=False)
            if ctx is not None:  # global epoch totals
                total_loss, total_neg_elbo, total_kl, num_seqs, num_steps = all_reduce_sum(
                    [total_loss, total_neg_elbo, total_kl, num_seqs, num_steps], device)
                num_seqs, num_steps = int(num_seqs), int(num_steps)
            seconds = time.perf_counter() - t0
            record = {
                "epoch": epoch + 1,
                "global_step": global_step,
                "beta": beta,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": total_loss / num_seqs if num_seqs else math.nan,
                "train_neg_elbo": total_neg_elbo / num_seqs if num_seqs else math.nan,
                "train_neg_elbo_per_step": total_neg_elbo / num_steps if num_steps else math.nan,
                "train_kl": total_kl / num_seqs if num_seqs else math.nan,
                "val_neg_elbo": None,
                "val_neg_elbo_per_step": None,
                "val_kl": None,
                "seconds": seconds,
                "batches": done,
                "steps_per_second": done / seconds if seconds > 0 else math.inf,
                "skipped_batches": skipped,
            }
            if val is not None:
                e_sum, kl_sum, n_steps = _validation_sums(
                    ctx, model, guide, val, val_num_samples, val_batch_size or batch_size,
                    device)
                record.update(val_neg_elbo=-e_sum / len(val),
                              val_neg_elbo_per_step=-e_sum / max(n_steps, 1),
                              val_kl=kl_sum / len(val))
                if early_stopping_patience is not None:
                    if record["val_neg_elbo"] < best:
                        best, bad_epochs = record["val_neg_elbo"], 0
                        best_state = {"model": _clone_state(model_module),
                                      "guide": _clone_state(guide_module)}
                        history.best_epoch = epoch + 1
                    else:
                        bad_epochs += 1
                        if bad_epochs >= early_stopping_patience:
                            finished = history.stopped_early = True
                            history.stop_reason = "early_stopping"
            history.records.append(record)
            if progress and main:
                bar.write(_format_record(record), file=sys.stderr)
            stop = False
            if main:
                for cb in callbacks:
                    if cb(dict(record)):
                        stop = True
            if ctx is not None:  # callbacks run on rank 0 only; all ranks follow its decision
                stop = broadcast_object(stop)
            if stop and not finished:
                finished, history.stop_reason = True, "callback"
            paused = None if finished else budget_spent()
            if paused:
                history.stop_reason = paused
            last_epoch = epoch + 1 == epochs or finished or paused
            if manager is not None and ((epoch + 1) % checkpoint_every == 0 or last_epoch):
                rng_ranks = None
                if ctx is not None:
                    rng_ranks = [None] * world
                    torch.distributed.all_gather_object(rng_ranks, rng_state())
                if main:
                    payload = {
                        "format": 1,
                        "epoch": epoch + 1,
                        "global_step": global_step,
                        "finished": finished,
                        "param_names": list(params),
                        "model": model_module.state_dict(),
                        "guide": guide_module.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "param_store": {k: v.detach() for k, v in
                                        pyro.get_param_store().named_parameters()},
                        "schedule": schedule.to_dict(),
                        "rng": rng_state(),
                        "history": history.to_dict(),
                        "early_stopping": {"best": None if best == math.inf else best,
                                           "bad_epochs": bad_epochs, "best_state": best_state},
                    }
                    if ctx is not None:
                        payload.update(rng_ranks=rng_ranks, shuffle_seed=shuffle_seed,
                                       world_size=world)
                    last_ckpt = manager.save(payload, epoch + 1)
                else:
                    last_ckpt = manager.path(epoch + 1)
                if ctx is not None:
                    torch.distributed.barrier()  # the checkpoint exists before anyone goes on
            if paused:
                break
    finally:
        bar.close()
    if best_state is not None:
        model_module.load_state_dict(best_state["model"])
        guide_module.load_state_dict(best_state["guide"])
    return history


def step_objective(objective, model, guide, x, mask, num_particles, beta, free_bits,
                   free_bits_per):
    """The objective of one optimisation step -- the one place ``fit`` computes it.

    Returns ``(traces, objective)``: the ``(model_trace, guide_trace)`` (used for diagnostics;
    None for ``"fivo"``) and a :class:`~pyrossm.infer.handlers.StepObjective` (``surrogate`` to
    differentiate; ``loss``, ``neg_elbo``, ``kl`` as sums over the batch's sequences). Another
    objective plugs in here by returning the same two things.
    """
    if objective == "fivo":  # pyrossm.infer.fivo: the SMC bound
        return None, fivo_objective(model, guide, x, mask, num_particles)
    traces = elbo_traces(model, guide, x, mask, num_particles, beta)
    return traces, elbo_objective(*traces, num_particles, beta, free_bits, free_bits_per)


def _validation_sums(ctx, model, guide, val, num_samples, batch_size, device):
    """(sum of ELBOs, sum of KLs, observed steps) over the validation set (all ranks)."""
    if ctx is None:
        res = elbo_terms(model, guide, val, num_samples=num_samples, batch_size=batch_size,
                         device=device)
        e_sum, kl_sum = torch.stack([res.elbo.sum(), res.kl.sum()]).tolist()
        return e_sum, kl_sum, int(res.num_steps.sum())
    index = shard(torch.arange(len(val)), ctx.rank, ctx.world_size)
    sums = [0.0, 0.0, 0.0]
    if len(index):
        part = SequenceDataset(*val.batch(index, trim=False))
        res = elbo_terms(model, guide, part, num_samples=num_samples, batch_size=batch_size,
                         device=device)
        sums = [float(res.elbo.sum()), float(res.kl.sum()), float(res.num_steps.sum())]
    e_sum, kl_sum, n_steps = all_reduce_sum(sums, device)
    return e_sum, kl_sum, int(n_steps)


def _format_record(r: dict) -> str:
    text = (f"epoch {r['epoch']}: -elbo/step {r['train_neg_elbo_per_step']:.4f} "
            f"kl/seq {r['train_kl']:.3f} beta {r['beta']:.3g}")
    if r["val_neg_elbo_per_step"] is not None:
        text += f" | val -elbo/step {r['val_neg_elbo_per_step']:.4f}"
    return text + f" ({r['seconds']:.2f}s)"
