"""Benchmark: FIVO vs ELBO fine-tuning of the JSB chorales DMM at equal wall time (issue 16).

From one common mid-training state -- the newest ``checkpoint-*.pt`` of the DMM being trained
in ``--checkpoint-dir`` (``build_jsb("dmm_backward", PYRO_EXAMPLE_OPTIONS)``, i.e. ``python -m
pyrossm.experiments.nonlinear jsb --configs dmm_backward --match-pyro --seed 5``) -- two copies
are trained on the JSB training split for the same wall-clock budget (``--minutes`` each,
``fit``'s ``max_seconds``), one after the other:

* ``elbo``: ``fit(..., objective="elbo")``, one guide draw per sequence, as the run trains;
* ``fivo``: ``fit(..., objective="fivo", num_particles=K)`` (Maddison et al. 2017; Le et al.
  2018; Naesseth et al. 2018): the particle filter's ``log p̂_K(x)`` with the structured
  guide's per-step ``q(z_t | z_{t-1}, h_t)`` as proposal, ``K = --fivo-particles`` (4).

Both continue the run exactly as its ``--resume`` would (``fit(..., checkpoint_dir=copy,
resume=True)`` on a private copy of the checkpoint, never in ``runs/``): the same ClippedAdam
state and settings (the decayed learning rate, betas (0.96, 0.999), clipping 10, weight decay
2.0, lr decay 0.99996 per step), the same batch order (the checkpoint's RNG state), and the run's
annealing schedule, which is past its end (beta = 1; FIVO ignores it anyway).

The starting model and both fine-tuned models are then scored on the JSB test split with
:func:`pyrossm.infer.evaluate` (``num_samples`` IWAE draws, one ELBO draw, ``smc_particles``
guided SMC particles), in nats per observed frame (sum over chorales / observed frames, as in
``benchmarks/smc_vs_iwae.py``), ``--repeats`` times with different seeds: the Monte Carlo
standard errors are over those repeats (the data and parameters held fixed). Differences
between the fine-tuned models' estimates are given with ``sqrt(se_a² + se_b²)``. Larger is
better (all three are lower bounds of ``log p(x)`` in expectation).

Caveat: this is fine-tuning for a few minutes from a model trained by the ELBO for ~1500
epochs, not FIVO training from scratch; the two arms run one after the other on a shared
machine, so the CPU seconds of each are recorded beside the wall-clock budget.

Run from the repository root (``2 * --minutes`` + 10 minutes: 26 minutes at the defaults on the
shared 2-core machine at load 3, 17.5 of them CPU; ``--quick``: under a minute)::

    PYROSSM_DATA_DIR=/work/shared/data nice -n 5 python benchmarks/fivo_jsb.py
    PYROSSM_DATA_DIR=/work/shared/data python benchmarks/fivo_jsb.py --quick --out ''
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark

import pyro  # noqa: E402
from smc_vs_iwae import machine, mean_se, newest_checkpoint  # noqa: E402

from pyrossm.datasets import load_jsb_chorales  # noqa: E402
from pyrossm.experiments.nonlinear import (  # noqa: E402
    JSB_DEFAULTS,
    PYRO_EXAMPLE_OPTIONS,
    build_jsb,
    default_data_dir,
)
from pyrossm.infer import evaluate, fit  # noqa: E402
from pyrossm.infer.checkpoint import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {**JSB_DEFAULTS, **PYRO_EXAMPLE_OPTIONS}  # the run's --match-pyro settings
ESTIMATES = ("elbo", "iwae", "smc")


def fresh_modules():
    """The run's model and guide, untrained (``build_jsb`` as ``--match-pyro`` builds them)."""
    pyro.clear_param_store()
    return build_jsb("dmm_backward", dict(SETTINGS))


def fine_tune(source, objective, train, args, tmp):
    """Continue the run from the checkpoint file ``source`` for ``args.minutes`` with
    ``objective``; returns ``(model, guide, info)``. Works on a copy in ``tmp``."""
    directory = Path(tmp) / objective
    directory.mkdir()
    shutil.copy(source, directory)
    model, guide = fresh_modules()
    state = load_checkpoint(source)  # only for the starting epoch and schedule
    start_epoch, start_step = int(state["epoch"]), int(state["global_step"])
    s = SETTINGS
    wall0, cpu0 = time.perf_counter(), time.process_time()
    hist = fit(model, guide, train, epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
               betas=s["betas"], clip_norm=s["clip_norm"], lr_decay=s["lr_decay"],
               weight_decay=s["weight_decay"], annealing=state["schedule"], device="cpu",
               seed=args.seed, checkpoint_dir=str(directory), resume=True,
               checkpoint_every=10**6, keep_checkpoints=1, progress=False,
               max_seconds=60.0 * args.minutes, objective=objective,
               num_particles=args.fivo_particles if objective == "fivo" else 1)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    new = hist.records[start_epoch:]
    if not new:
        raise RuntimeError(f"{objective}: no optimisation step was taken in {args.minutes} min")
    steps = sum(r["batches"] for r in new)
    info = dict(objective=objective,
                num_particles=args.fivo_particles if objective == "fivo" else 1,
                start_epoch=start_epoch, start_global_step=start_step,
                epochs_started=len(new), optimisation_steps=steps,
                epochs_done=steps / math.ceil(len(train[0]) / s["batch_size"]),
                last_epoch_batches=new[-1]["batches"], stop_reason=hist.stop_reason,
                train_seconds=sum(r["seconds"] for r in new), fit_wall_seconds=wall,
                fit_cpu_seconds=cpu, final_lr=new[-1]["lr"], final_beta=new[-1]["beta"],
                train_objective_per_step_first_epoch=-new[0]["train_neg_elbo_per_step"],
                train_objective_per_step_last_epoch=-new[-1]["train_neg_elbo_per_step"],
                train_objective=("ELBO" if objective == "elbo"
                                 else f"FIVO bound (K={args.fivo_particles})"))
    first, last = (info[f"train_objective_per_step_{e}_epoch"] for e in ("first", "last"))
    print(f"  [{objective}] {steps} steps ({info['epochs_done']:.2f} epochs) in {wall:.0f} s "
          f"wall, {cpu:.0f} s CPU; train objective/frame {first:.4f} -> {last:.4f}", flush=True)
    return model, guide, info


def score(name, model, guide, test, args):
    """ELBO, IWAE and guided-SMC figures per frame, ``args.repeats`` times."""
    rows = {k: [] for k in ESTIMATES}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for r in range(args.repeats):
        pyro.set_rng_seed(args.seed + 1000 * (r + 1))
        ev = evaluate(model, guide, test, num_samples=args.iwae_samples,
                      smc_particles=args.smc_particles, batch_size=args.batch_size)
        rows["elbo"].append(ev.elbo_per_step)
        rows["iwae"].append(ev.log_likelihood_per_step)
        rows["smc"].append(ev.smc_per_step)
    out = {}
    for k, v in rows.items():
        m, se = mean_se(v)
        out[k] = dict(mean=m, se=se, repeats=v)
    print(f"  [{name}] " + ", ".join(f"{k} {out[k]['mean']:.4f} ± {out[k]['se']:.4f}"
                                     for k in ESTIMATES), flush=True)
    return dict(estimates=out, eval_wall_seconds=time.perf_counter() - wall0,
                eval_cpu_seconds=time.process_time() - cpu0)


def table(payload):
    args = payload["config"]
    head = (f"{'model':<10} {'epochs':>7} {'CPU s':>7} "
            + " ".join(f"{h:>18}" for h in ("ELBO/frame", f"IWAE-{args['iwae_samples']}/frame",
                                              f"SMC-{args['smc_particles']}/frame")))
    lines = [head]
    for name, r in payload["models"].items():
        t = r.get("training", {})
        ep = f"{t['epochs_done']:7.2f}" if t else f"{'start':>7}"
        cpu = f"{t['fit_cpu_seconds']:7.0f}" if t else f"{'':>7}"
        cells = " ".join(f"{r['estimates'][k]['mean']:10.4f} ± {r['estimates'][k]['se']:.4f}"
                         for k in ESTIMATES)
        lines.append(f"{name:<10} {ep} {cpu} {cells}")
    d = payload["fivo_minus_elbo"]
    lines.append(f"{'fivo-elbo':<10} {'':>7} {'':>7} "
                 + " ".join(f"{d[k]['mean']:+10.4f} ± {d[k]['se']:.4f}" for k in ESTIMATES))
    lines.append(f"(nats per observed frame on {payload['test_subset']}; ± = Monte Carlo se over "
                 f"{args['repeats']} repeats; epochs = optimisation steps / steps per epoch in "
                 f"{args['minutes']} min each; start = checkpoint epoch "
                 f"{payload['checkpoint_epoch']})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock training budget of each arm (default 8; quick 0.2)")
    ap.add_argument("--fivo-particles", type=int, default=4)
    ap.add_argument("--smc-particles", type=int, default=None, help="(default 100; quick 10)")
    ap.add_argument("--iwae-samples", type=int, default=None, help="(default 100; quick 10)")
    ap.add_argument("--repeats", type=int, default=None, help="(default 3; quick 2)")
    ap.add_argument("--test-sequences", type=int, default=None,
                    help="first n test chorales (default all 77; quick 8)")
    ap.add_argument("--batch-size", type=int, default=20, help="sequences per evaluate pass")
    ap.add_argument("--checkpoint-dir", default=str(ROOT / "runs" / "jsb_published"
                                                   / "dmm_backward"))
    ap.add_argument("--checkpoint", default=None,
                    help="a checkpoint file (default: newest in --checkpoint-dir)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None,
                    help="JSON path ('' to skip; default benchmarks/results/fivo_jsb.json)")
    args = ap.parse_args(argv)
    q = args.quick
    args.minutes = args.minutes if args.minutes is not None else (0.2 if q else 8.0)
    args.smc_particles = args.smc_particles or (10 if q else 100)
    args.iwae_samples = args.iwae_samples or (10 if q else 100)
    args.repeats = args.repeats or (2 if q else 3)
    if args.test_sequences is None and q:
        args.test_sequences = 8
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # JSB's weight-decayed input weights are subnormal
    t_start = time.perf_counter()
    data_dir = default_data_dir()
    train_split = load_jsb_chorales("train", data_dir)
    test_split = load_jsb_chorales("test", data_dir)
    n = args.test_sequences or len(test_split.lengths)
    train = (train_split.piano_rolls, train_split.mask)
    test = (test_split.piano_rolls[:n], test_split.mask[:n])
    tmp = tempfile.mkdtemp(prefix="fivo_jsb-")
    try:  # one private copy: the training run may replace its files at any moment
        source = shutil.copy(args.checkpoint or newest_checkpoint(args.checkpoint_dir), tmp)
        state = load_checkpoint(source)
        epoch = int(state["epoch"])
        print(f"checkpoint {os.path.basename(source)} (epoch {epoch}); scoring the start ...",
              flush=True)
        models = {}
        model, guide = fresh_modules()
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        models["start"] = score("start", model, guide, test, args)
        for objective in ("elbo", "fivo"):
            print(f"fine-tuning with {objective} for {args.minutes} min ...", flush=True)
            model, guide, info = fine_tune(source, objective, train, args, tmp)
            models[objective] = dict(training=info, **score(objective, model, guide, test, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    diff = {}
    for k in ESTIMATES:
        a, b = models["fivo"]["estimates"][k], models["elbo"]["estimates"][k]
        se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
        diff[k] = dict(mean=a["mean"] - b["mean"], se=se,
                       z=(a["mean"] - b["mean"]) / se if se > 0 else None)
    payload = dict(
        benchmark="FIVO vs ELBO fine-tuning of the JSB DMM at equal wall time (issue 16)",
        command="python benchmarks/fivo_jsb.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
        config={k: v for k, v in vars(args).items() if k != "out"},
        settings=dict(build="build_jsb('dmm_backward', {**JSB_DEFAULTS, **PYRO_EXAMPLE_OPTIONS})"
                      " (--match-pyro)", **{k: SETTINGS[k] for k in
                                           ("lr", "betas", "clip_norm", "lr_decay",
                                            "weight_decay", "batch_size")},
                      schedule=state["schedule"], lr_at_checkpoint=
                      state["optimizer"]["param_groups"][0]["lr"]),
        checkpoint=os.path.basename(source), checkpoint_epoch=epoch,
        test_subset=f"first {n} of {len(test_split.lengths)} test chorales",
        observed_frames=int(test_split.mask[:n].sum()),
        models=models, fivo_minus_elbo=diff, machine=machine(),
        timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        total_seconds=time.perf_counter() - t_start, cpu_seconds=time.process_time())
    print("\n" + table(payload))
    out = RESULTS / "fivo_jsb.json" if args.out is None else args.out
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
