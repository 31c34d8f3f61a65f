"""The training loop behind :func:`pyrossm.infer.fit`, in pieces: step, validate, checkpoint.

:class:`Trainer` holds what a run needs (modules, datasets, optimiser, schedule, checkpoint
manager, the ``torch.distributed`` context) and its state (history, step counter, early
stopping, the newest checkpoint), set up once from a :class:`~pyrossm.infer.fit.FitConfig`:

* :meth:`Trainer.step` -- one optimisation step on one batch: the objective
  (:func:`step_objective`, the one place it is computed), ``backward``, the finite-gradient
  check, the gradient ``all_reduce`` under ``torch.distributed``, the optimiser step;
* :meth:`Trainer.train_epoch` -- the steps of one epoch and the epoch's record;
* :meth:`Trainer.validate` -- the validation bound (the ELBO with beta = 1, or FIVO's) and
  early stopping;
* :meth:`Trainer.checkpoint` / :meth:`Trainer.restore` -- the resumable state;
* :meth:`Trainer.run` -- epochs, callbacks, budgets.

The surrogate loss is pyrossm's own (:func:`~pyrossm.infer.handlers.trace_elbo_particle`),
and checkpoints read Pyro's parameter store through its public ``named_parameters``.
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
)
from pyrossm.infer.evaluate import elbo_terms
from pyrossm.infer.fivo import fivo_objective
from pyrossm.infer.handlers import elbo_objective, elbo_traces, foreign_params
from pyrossm.infer.history import History, diverged_error
from pyrossm.infer.params import claim_param_store, named_parameters, owner_module
from pyrossm.infer.schedules import make_schedule

__all__ = ["StepResult", "Trainer", "step_objective"]


def step_objective(objective, model, guide, x, mask, num_particles, beta, free_bits,
                   free_bits_per, guide_objective=None, resample_every=1):
    """The objective of one optimisation step -- the one place ``fit`` computes it.

    Returns ``(traces, objective)``: the ``(model_trace, guide_trace)`` (used for diagnostics;
    None for ``"fivo"``) and a :class:`~pyrossm.infer.handlers.StepObjective` (``surrogate`` to
    differentiate; ``loss``, ``neg_elbo``, ``kl`` as sums over the batch's sequences). Another
    objective plugs in here by returning the same two things.
    """
    if objective == "fivo":  # pyrossm.infer.fivo: the SMC bound
        fivo = fivo_objective(model, guide, x, mask, num_particles,
                              resample_every=resample_every)
        if guide_objective != "elbo":
            return None, fivo
        return _fivo_model_elbo_guide(fivo, model, guide, x, mask)
    traces = elbo_traces(model, guide, x, mask, num_particles, beta)
    return traces, elbo_objective(*traces, num_particles, beta, free_bits, free_bits_per)


def _fivo_model_elbo_guide(fivo, model, guide, x, mask):
    """The model's gradient from FIVO, the guide's (the proposal's) from the one-particle ELBO
    (Le et al. 2018, ICLR, section 5: a proposal learnt through a bound with many particles
    gets a weaker, noisier signal; cf. Rainforth et al. 2018, ICML). Parameters shared by both
    modules are the model's. Returns ``(traces, objective)`` with a surrogate whose gradient is
    exactly that pair of gradients; its values are FIVO's."""
    traces = elbo_traces(model, guide, x, mask, 1, 1.0)
    elbo = elbo_objective(*traces, 1, 1.0, None)
    model_params = [p for p in owner_module(model, "model").parameters() if p.requires_grad]
    seen = {id(p) for p in model_params}
    guide_params = [p for p in owner_module(guide, "guide").parameters()
                    if p.requires_grad and id(p) not in seen]
    grads = []
    for surrogate, params in ((fivo.surrogate, model_params), (elbo.surrogate, guide_params)):
        if params and surrogate.requires_grad:
            grads += zip(params, torch.autograd.grad(surrogate, params, allow_unused=True))
    terms = [(p * g).sum() for p, g in grads if g is not None]
    surrogate = torch.stack(terms).sum() if terms else fivo.surrogate
    return traces, fivo._replace(surrogate=surrogate)


class StepResult:
    """One step's outcome: ``ok`` (a step was taken), ``loss``, ``neg_elbo``, ``kl`` (sums)."""

    __slots__ = ("ok", "loss", "neg_elbo", "kl")

    def __init__(self, ok, loss, neg_elbo, kl):
        self.ok, self.loss, self.neg_elbo, self.kl = ok, loss, neg_elbo, kl


def _clone_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Trainer:
    """One run of :func:`~pyrossm.infer.fit` (see the module docstring).

    ``ctx``: a :class:`~pyrossm.infer.distributed.DistributedContext` or None; ``device``:
    the resolved device; ``cfg``: the validated :class:`~pyrossm.infer.fit.FitConfig`.
    """

    def __init__(self, ctx, model, guide, train_data, val_data, cfg, device):
        self.ctx, self.cfg, self.model, self.guide = ctx, cfg, model, guide
        self.device = ctx.device if ctx is not None else device
        self.rank, self.world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        self.main = self.rank == 0
        self.model_module = owner_module(model, "model")
        self.guide_module = owner_module(guide, "guide")
        self.train, self.val = self._datasets(train_data, val_data)
        self.model_module.to(self.device)
        self.guide_module.to(self.device)
        self.params = named_parameters(self.model_module, self.guide_module)
        if not self.params:
            raise ValueError("model and guide have no trainable parameters")
        claim_param_store(self.model_module, self.guide_module)
        if ctx is not None:
            broadcast_modules(self.model_module, self.guide_module)
        self.optimizer = ClippedAdam(list(self.params.values()), lr=cfg.lr, betas=tuple(cfg.betas),
                                     clip_norm=cfg.clip_norm, lrd=cfg.lr_decay,
                                     weight_decay=cfg.weight_decay)
        self.batches_per_epoch = math.ceil(len(self.train) / cfg.batch_size)
        self.schedule = make_schedule(cfg.annealing,
                                      total_steps=cfg.epochs * self.batches_per_epoch)
        self.manager = (CheckpointManager(cfg.checkpoint_dir, cfg.keep_checkpoints)
                        if cfg.checkpoint_dir else None)
        self.history = History()
        self.start_epoch = self.global_step = 0
        self.best, self.bad_epochs, self.best_state = math.inf, 0, None
        self.last_ckpt, self.finished, self.checked_params = None, False, False
        self.shuffle_seed = None
        self.t_start = time.perf_counter()
        self.restore()

    # ------------------------------------------------------------------ setup
    def _datasets(self, train_data, val_data):
        cfg = self.cfg
        train = as_dataset(train_data, "train_data")
        if cfg.chunk_length is not None:
            train = SequenceDataset(*chunk_sequences(train.x, train.mask, cfg.chunk_length,
                                                     drop_empty=True)[:2])
        train = check_compatible(train, self.model_module, self.guide_module, "train_data")
        val = None
        if val_data is not None:
            val = check_compatible(as_dataset(val_data, "val_data"), self.model_module,
                                   self.guide_module, "val_data").to(self.device)
        return train.to(self.device), val

    def restore(self) -> None:
        """Continue from the newest valid checkpoint (``resume=True``), or seed a fresh run."""
        cfg, ctx = self.cfg, self.ctx
        found = None
        if cfg.resume and self.manager:
            if ctx is None:
                found = self.manager.latest(map_location=self.device)
            else:  # rank 0 reads and verifies; every rank gets the same checkpoint
                found = broadcast_object(
                    self.manager.latest(map_location="cpu") if self.main else None)
        if found is not None:
            self._load(*found)
        elif cfg.seed is not None:
            pyro.set_rng_seed(cfg.seed + self.rank)
        if ctx is not None and self.shuffle_seed is None:
            self.shuffle_seed = broadcast_object(
                (cfg.seed if cfg.seed is not None else int(torch.randint(2**31, ())))
                if self.main else None)

    def _load(self, path, state) -> None:
        self.last_ckpt = path
        if state["param_names"] != list(self.params):
            raise ValueError(f"checkpoint {path!r} holds parameters {state['param_names']}, "
                             f"but model and guide have {list(self.params)}")
        self.model_module.load_state_dict(state["model"])
        self.guide_module.load_state_dict(state["guide"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["schedule"] != self.schedule.to_dict():
            if state["schedule"].get("name") != "callable":
                warnings.warn(f"resuming: the checkpoint's annealing schedule "
                              f"{state['schedule']} is used instead of "
                              f"{self.schedule.to_dict()}")
                self.schedule = make_schedule(state["schedule"])
            else:
                warnings.warn(f"resuming with annealing {self.schedule.to_dict()} but the "
                              f"checkpoint was made with {state['schedule']}")
        self.history = History.from_dict(state["history"])
        if not state["finished"]:  # paused by a budget: this call decides anew
            self.history.stop_reason = None
        self.start_epoch, self.global_step = state["epoch"], state["global_step"]
        es = state["early_stopping"]
        self.best = es["best"] if es["best"] is not None else math.inf
        self.bad_epochs, self.best_state = es["bad_epochs"], es["best_state"]
        self.finished = state["finished"]
        rng_ranks = state.get("rng_ranks")
        if self.ctx is not None and rng_ranks is not None and len(rng_ranks) == self.world:
            set_rng_state(rng_ranks[self.rank])
        else:
            set_rng_state(state["rng"])
            if self.ctx is not None and self.rank > 0:  # another world size: fresh streams
                pyro.set_rng_seed(int(torch.randint(2**31, ())) + self.rank)
        self.shuffle_seed = state.get("shuffle_seed")
        claim_param_store(self.model_module, self.guide_module)

    # ------------------------------------------------------------------ pieces of an epoch
    def budget_spent(self):
        """``"max_steps"`` / ``"max_seconds"`` once that budget is spent, else None."""
        cfg = self.cfg
        if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_seconds is None:
            return None
        over = time.perf_counter() - self.t_start >= cfg.max_seconds
        if self.ctx is not None:  # rank 0's clock decides for every rank
            over = broadcast_object(over)
        return "max_seconds" if over else None

    def epoch_batches(self, epoch):
        """This rank's index batches of ``epoch`` (CPU) and the same indices on the device."""
        cfg = self.cfg
        if self.ctx is None:
            cpu = list(batch_indices(self.train, cfg.batch_size, shuffle=cfg.shuffle,
                                     bucket=cfg.bucket))
        else:
            cpu = [shard(b, self.rank, self.world) for b in global_batches(
                self.train, cfg.batch_size, epoch, self.shuffle_seed, shuffle=cfg.shuffle,
                bucket=cfg.bucket)]
        dev = torch.cat(cpu).to(self.device).split([len(b) for b in cpu])
        return cpu, dev

    def step(self, epoch, b, index, dev_index, beta) -> StepResult:
        """One optimisation step on the batch ``index`` (see the module docstring)."""
        cfg = self.cfg
        traces, value, grads_bad, failure, obj = None, math.nan, [], None, None
        neg_elbo = kl = 0.0
        if len(index) == 0:  # a rank with nothing in a short last batch
            value = 0.0
        else:
            x, mask = self.train.batch(index, device_index=dev_index)
            try:
                traces, obj = step_objective(cfg.objective, self.model, self.guide, x, mask,
                                             cfg.num_particles, beta, cfg.free_bits,
                                             cfg.free_bits_per, cfg.guide_objective,
                                             cfg.resample_every)
                value, neg_elbo, kl = torch.stack(
                    [torch.as_tensor(obj.loss), obj.neg_elbo, obj.kl]).tolist()
            except ValueError as e:
                # A distribution's argument validation failing on a NaN/Inf *parameter* is a
                # divergence; anything else (e.g. data outside the support) is a real error.
                if not (str(e).startswith("Expected parameter") or not all(
                        bool(torch.isfinite(p).all()) for p in self.params.values())):
                    raise
                value, neg_elbo, kl, obj, failure = math.nan, math.nan, math.nan, None, e
        if traces is not None and not self.checked_params:
            self.checked_params = True
            stray = foreign_params(traces, self.params.values())
            if stray:
                warnings.warn(f"pyro.param site(s) {stray} do not belong to the model or guide "
                              f"modules and are NOT optimised by fit (register parameters on "
                              f"the modules, see pyrossm.protocol)")
        ok = math.isfinite(value) and math.isfinite(neg_elbo)
        if ok and obj is not None:
            obj.surrogate.backward()
            grads = [(n, p.grad) for n, p in self.params.items() if p.grad is not None]
            if grads and not bool(torch.stack(
                    [torch.isfinite(g).all() for _, g in grads]).all()):
                grads_bad = [n for n, g in grads if not bool(torch.isfinite(g).all())]
                ok = False
        if self.ctx is not None:  # every rank skips (or raises) together
            ok = all_reduce_min(ok, self.device)
            if ok:
                all_reduce_gradients(self.params.values())
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if not ok and cfg.on_nan == "raise":
            err = diverged_error(epoch + 1, b, value, traces, self.params, grads_bad,
                                 self.manager, self.last_ckpt, failure)
            raise err from failure
        return StepResult(ok, value, neg_elbo, kl)

    def train_epoch(self, epoch, bar) -> dict:
        """The optimisation steps of ``epoch`` (until a budget is spent); its record."""
        cfg = self.cfg
        self.model_module.train()
        self.guide_module.train()
        t0 = time.perf_counter()
        total_loss = total_neg_elbo = total_kl = 0.0
        num_seqs = num_steps = skipped = done = 0
        cpu_batches, dev_batches = self.epoch_batches(epoch)
        beta = self.schedule(self.global_step)
        for b, (index, dev_index) in enumerate(zip(cpu_batches, dev_batches, strict=True)):
            if b > 0 and self.budget_spent():
                break
            beta = self.schedule(self.global_step)
            done += 1
            res = self.step(epoch, b, index, dev_index, beta)
            bar.update(1)
            if not res.ok:
                skipped += 1
                continue
            total_loss += res.loss
            total_neg_elbo += res.neg_elbo
            total_kl += res.kl
            num_seqs += len(index)
            num_steps += int(self.train.num_steps[index].sum())
            if cfg.progress and self.main:
                bar.set_postfix(elbo_step=f"{-total_neg_elbo / max(num_steps, 1):.4g}",
                                kl=f"{total_kl / max(num_seqs, 1):.3g}", beta=f"{beta:.3g}",
                                refresh=False)
        if self.ctx is not None:  # global epoch totals
            total_loss, total_neg_elbo, total_kl, num_seqs, num_steps = all_reduce_sum(
                [total_loss, total_neg_elbo, total_kl, num_seqs, num_steps], self.device)
            num_seqs, num_steps = int(num_seqs), int(num_steps)
        seconds = time.perf_counter() - t0
        return {
            "epoch": epoch + 1,
            "global_step": self.global_step,
            "beta": beta,
            "lr": self.optimizer.param_groups[0]["lr"],
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

    def validate(self, record, epoch) -> None:
        """The validation bound into ``record`` (``val_neg_elbo``: minus the ELBO with
        beta = 1, or minus the FIVO bound, per ``cfg.val_objective``); early stopping
        bookkeeping."""
        cfg = self.cfg
        if self.val is None:
            return
        e_sum, kl_sum, n_steps = _validation_sums(
            self.ctx, self.model, self.guide, self.val, cfg, self.device)
        record.update(val_neg_elbo=-e_sum / len(self.val),
                      val_neg_elbo_per_step=-e_sum / max(n_steps, 1),
                      val_kl=kl_sum / len(self.val))
        if cfg.early_stopping_patience is None:
            return
        if record["val_neg_elbo"] < self.best:
            self.best, self.bad_epochs = record["val_neg_elbo"], 0
            self.best_state = {"model": _clone_state(self.model_module),
                               "guide": _clone_state(self.guide_module)}
            self.history.best_epoch = epoch + 1
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= cfg.early_stopping_patience:
                self.finished = self.history.stopped_early = True
                self.history.stop_reason = "early_stopping"

    def checkpoint(self, epoch) -> None:
        """Write the resumable state after ``epoch`` (rank 0; every rank's RNG state)."""
        ctx = self.ctx
        rng_ranks = None
        if ctx is not None:
            rng_ranks = [None] * self.world
            torch.distributed.all_gather_object(rng_ranks, rng_state())
        if self.main:
            payload = {
                "format": 1,
                "epoch": epoch + 1,
                "global_step": self.global_step,
                "finished": self.finished,
                "param_names": list(self.params),
                "model": self.model_module.state_dict(),
                "guide": self.guide_module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "param_store": {k: v.detach() for k, v in
                                pyro.get_param_store().named_parameters()},
                "schedule": self.schedule.to_dict(),
                "rng": rng_state(),
                "history": self.history.to_dict(),
                "early_stopping": {"best": None if self.best == math.inf else self.best,
                                   "bad_epochs": self.bad_epochs,
                                   "best_state": self.best_state},
            }
            if ctx is not None:
                payload.update(rng_ranks=rng_ranks, shuffle_seed=self.shuffle_seed,
                               world_size=self.world)
            self.last_ckpt = self.manager.save(payload, epoch + 1)
        else:
            self.last_ckpt = self.manager.path(epoch + 1)
        if ctx is not None:
            torch.distributed.barrier()  # the checkpoint exists before anyone goes on

    def _callbacks_stop(self, record) -> bool:
        stop = False
        if self.main:
            for cb in self.cfg.callbacks:
                if cb(dict(record)):
                    stop = True
        if self.ctx is not None:  # callbacks run on rank 0 only; all ranks follow its decision
            stop = broadcast_object(stop)
        return stop

    # ------------------------------------------------------------------ the run
    def run(self) -> History:
        cfg = self.cfg
        bar = tqdm(total=cfg.epochs * self.batches_per_epoch,
                   initial=self.start_epoch * self.batches_per_epoch,
                   disable=not (cfg.progress and self.main), desc="fit", unit="step",
                   dynamic_ncols=True)
        self.t_start = time.perf_counter()
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                if self.finished:
                    break
                paused = self.budget_spent()
                if paused:  # e.g. resumed with a budget that is already spent
                    self.history.stop_reason = paused
                    break
                record = self.train_epoch(epoch, bar)
                if ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
                        or self.budget_spent()):  # every val_every-th epoch and the last
                    self.validate(record, epoch)
                self.history.records.append(record)
                if cfg.progress and self.main:
                    bar.write(_format_record(record, cfg), file=sys.stderr)
                if self._callbacks_stop(record) and not self.finished:
                    self.finished, self.history.stop_reason = True, "callback"
                paused = None if self.finished else self.budget_spent()
                if paused:
                    self.history.stop_reason = paused
                last_epoch = epoch + 1 == cfg.epochs or self.finished or paused
                if self.manager is not None and ((epoch + 1) % cfg.checkpoint_every == 0
                                                 or last_epoch):
                    self.checkpoint(epoch)
                if paused:
                    break
        finally:
            bar.close()
        if self.best_state is not None:
            self.model_module.load_state_dict(self.best_state["model"])
            self.guide_module.load_state_dict(self.best_state["guide"])
        return self.history


def _validation_terms(model, guide, data, cfg, device):
    """``(bound, kl, num_steps)`` per sequence of ``data`` under ``cfg.val_objective``."""
    if (cfg.val_objective or cfg.objective) == "elbo":
        res = elbo_terms(model, guide, data, num_samples=cfg.val_num_samples,
                         batch_size=cfg.val_batch_size or cfg.batch_size, device=device)
        return res.elbo, res.kl, res.num_steps
    modules = (owner_module(model, "model"), owner_module(guide, "guide"))
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    bounds, kls = [], []
    try:
        with torch.no_grad():
            for index in torch.arange(len(data)).split(cfg.val_batch_size or cfg.batch_size):
                x, mask = data.batch(index)
                runs = [fivo_objective(model, guide, x, mask, cfg.num_particles,
                                       resample_every=cfg.resample_every)
                        for _ in range(cfg.val_num_samples)]
                bounds.append(torch.stack([r.log_likelihood for r in runs]).mean(0))
                # FIVO gives the batch's KL as a sum: each sequence gets an equal share (only
                # the total over the validation set is reported)
                kls.append(torch.stack([r.kl for r in runs]).mean(0).expand(len(index))
                           / len(index))
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return torch.cat(bounds), torch.cat(kls), data.num_steps


def _validation_sums(ctx, model, guide, val, cfg, device):
    """(sum of bounds, sum of KLs, observed steps) over the validation set (all ranks)."""
    if ctx is None:
        bound, kl, steps = _validation_terms(model, guide, val, cfg, device)
        e_sum, kl_sum = torch.stack([bound.sum(), kl.sum()]).tolist()
        return e_sum, kl_sum, int(steps.sum())
    index = shard(torch.arange(len(val)), ctx.rank, ctx.world_size)
    sums = [0.0, 0.0, 0.0]
    if len(index):
        part = SequenceDataset(*val.batch(index, trim=False))
        bound, kl, steps = _validation_terms(model, guide, part, cfg, device)
        sums = [float(bound.sum()), float(kl.sum()), float(steps.sum())]
    e_sum, kl_sum, n_steps = all_reduce_sum(sums, device)
    return e_sum, kl_sum, int(n_steps)


def _format_record(r: dict, cfg) -> str:
    """The epoch's line; the bounds are named by the objectives that computed them."""
    train, val = cfg.objective, cfg.val_objective or cfg.objective
    text = (f"epoch {r['epoch']}: -{train}/step {r['train_neg_elbo_per_step']:.4f} "
            f"kl/seq {r['train_kl']:.3f} beta {r['beta']:.3g}")
    if r["val_neg_elbo_per_step"] is not None:
        text += f" | val -{val}/step {r['val_neg_elbo_per_step']:.4f}"
    return text + f" ({r['seconds']:.2f}s)"
