"""Benchmark: the particle filter against the Kalman filter, and FIVO against ELBO training.

``speed`` (default problem of issue 16): B = 64 held-out sequences of a random stable LGSSM,
T = 1000 steps, N = 1000 particles per sequence (64,000 particles), float32 on CPU, no
gradients. Times (median of --repeats runs after a warm-up) ``pyrossm.filters.particle_filter``
(bootstrap, systematic resampling at ESS < N/2; also multinomial) and the peer on the same
data, ``pyrossm.kalman_filter`` (exact). Accuracy: ``|log p̂(x) - log p(x)| / T`` in nats per
step against the float64 Kalman value (mean and max over sequences).

``fivo``: a deep Markov model on the simulated pendulum (``simulate_pendulum``) trained twice
from the same initialisation with the same structured guide, epochs and K particles: with the
ELBO (``fit(objective="elbo", num_particles=K)``) and with FIVO (``objective="fivo"``), for
each of --init-seeds. Both are scored on held-out sequences by the particle filter's
log-likelihood (bootstrap with --eval-particles, and with each model's own guide as proposal),
beside the IWAE bound and the ELBO. ``--budget-seconds S`` trains each for S seconds of wall
time instead of --epochs (equal wall time; FIVO's epochs cost more, its sequential particle
loop is not vectorised over time). ``--arms elbo fivo fivo-elbo-guide`` adds a third arm whose
model follows FIVO and whose guide (the proposal) follows the one-particle ELBO
(``fit(objective="fivo", guide_objective="elbo")``, Le et al. 2018). ``--val N`` simulates N
validation sequences; each arm then ends with the parameters of its best validation bound of its
own objective (``fit``'s ``val_objective`` default, checked every ``--val-every`` epochs).
With ``--pretrain-epochs``, ``--score-start`` also scores the pretrained start, and
``--carry-optimizer`` makes both arms resume the paused pretraining run (its ClippedAdam state
and RNG; epochs in ``best_epoch`` and ``curve`` then count from the pretraining's start)
instead of a fresh optimiser at the pretrained parameters.

Run (1 torch thread; about a minute for ``speed`` and a few minutes for ``fivo`` on an idle
core)::

    python benchmarks/particle_filter.py speed --threads 1
    python benchmarks/particle_filter.py fivo --threads 1
    python benchmarks/particle_filter.py speed --batch 8 --steps 200 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import pyro  # noqa: E402

from pyrossm import DeepMarkovModel, LinearGaussianSSM, StructuredGuide  # noqa: E402
from pyrossm.datasets import simulate_pendulum  # noqa: E402
from pyrossm.filters import particle_filter  # noqa: E402
from pyrossm.infer import fit  # noqa: E402
from pyrossm.infer.evaluate import elbo, log_likelihood, smc_log_likelihood  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

from pyrossm.lgssm import kalman_filter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine():
    return dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(),
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                versions=dict(python=platform.python_version(), torch=torch.__version__,
                              pyro=pyro.__version__))


# ---------------------------------------------------------------------------------------------
# speed and accuracy on an LGSSM
def make_system(state_dim, obs_dim, seed):
    """A random stable system (singular values 0.5..0.9), float64."""
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(state_dim, state_dim, generator=g, **d))
    V, _ = torch.linalg.qr(torch.randn(state_dim, state_dim, generator=g, **d))
    A = U @ torch.diag(torch.linspace(0.5, 0.9, state_dim, **d)) @ V.T
    C = torch.randn(obs_dim, state_dim, generator=g, **d) / math.sqrt(state_dim)
    Fq = torch.randn(state_dim, state_dim, generator=g, **d) / math.sqrt(state_dim)
    Q = 0.5 * Fq @ Fq.T + 0.1 * torch.eye(state_dim, **d)
    R = 0.5 * torch.eye(obs_dim, **d)
    return LinearGaussianSSM.from_matrices(A=A, C=C, Q=Q, R=R, dtype=torch.float64)


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_speed(args):
    ssm64 = make_system(args.state_dim, args.obs_dim, args.seed)
    pyro.set_rng_seed(args.seed + 1)  # held-out: not the data anything was fitted to
    _, x64 = ssm64.sample(args.steps, num_samples=args.batch)
    exact = ssm64.log_prob(x64)
    ssm = LinearGaussianSSM.from_matrices(**{k: v.float() for k, v in
                                             ssm64.matrices().items()})
    x = x64.float()
    mats = {k: v for k, v in ssm.matrices().items()}
    print(f"B={args.batch} T={args.steps} N={args.particles} n={args.state_dim} "
          f"p={args.obs_dim} float32, torch threads={torch.get_num_threads()}", flush=True)
    rows = []

    def kalman():
        return kalman_filter(x, mats["A"], mats["C"], mats["Q"], mats["R"], mats["init_mean"],
                             mats["init_cov"], validate=False).log_likelihood

    def record(name, fn, note):
        with torch.no_grad():
            pyro.set_rng_seed(args.seed + 2)
            ll = fn().double()
            seconds, times = timeit(fn, args.repeats)
        err = ((ll - exact).abs() / args.steps)
        rows.append(dict(method=name, seconds=seconds, all_times=times,
                         mean_abs_err_nats_per_step=float(err.mean()),
                         max_abs_err_nats_per_step=float(err.max()),
                         mean_err_nats_per_step=float(((ll - exact) / args.steps).mean()),
                         note=note))
        print(f"  {name:<34s} {seconds:9.3f} s   |err|/step mean {float(err.mean()):.4f} "
              f"max {float(err.max()):.4f}", flush=True)

    record("kalman_filter (exact, peer)", kalman, "one batched call")
    for method in args.resampling:
        record(f"particle_filter {method}",
               lambda m=method: particle_filter(ssm, x, num_particles=args.particles,
                                                resampling=m).log_likelihood,
               f"bootstrap, ESS < N/2, {args.particles} particles per sequence")
    kal = rows[0]["seconds"]
    print(f"\n{'method':<34s} {'seconds':>9s} {'x kalman':>9s} {'|err|/step':>11s}")
    for r in rows:
        r["ratio_vs_kalman"] = r["seconds"] / kal
        print(f"{r['method']:<34s} {r['seconds']:9.3f} {r['ratio_vs_kalman']:9.1f} "
              f"{r['mean_abs_err_nats_per_step']:11.4f}")
    pf = [r for r in rows if r["method"].startswith("particle")]
    target = dict(max_abs_err_nats_per_step=max(r["max_abs_err_nats_per_step"] for r in pf),
                  target_0p01_nats_per_step_met=all(r["max_abs_err_nats_per_step"] < 0.01
                                                     for r in pf))
    print("\n" + ", ".join(f"{k} = {v}" for k, v in target.items()))
    return dict(benchmark="particle filter vs kalman filter",
                command="python benchmarks/particle_filter.py " + " ".join(sys.argv[1:]),
                config=dict(batch=args.batch, steps=args.steps, particles=args.particles,
                            state_dim=args.state_dim, obs_dim=args.obs_dim, dtype="float32",
                            repeats=args.repeats, seed=args.seed),
                machine=machine(), timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()),
                results=rows, targets=target)


# ---------------------------------------------------------------------------------------------
# FIVO vs ELBO on the pendulum
def _fresh(args, init_seed):
    torch.manual_seed(init_seed)  # the same initial weights for both objectives
    model = DeepMarkovModel(obs_dim=2, z_dim=args.z_dim, transition_dim=args.hidden,
                            emission_dim=args.hidden, emission="gaussian")
    guide = StructuredGuide(obs_dim=2, state_dim=args.z_dim, hidden_dim=args.hidden,
                            direction=args.direction)
    return model, guide


_PRETRAINED = {}
_START = {}


def _pretrained(args, init_seed, x_train, x_test):
    """``--pretrain-seconds``: the ELBO-trained start shared by both arms of one seed (trained
    once, then copied), so the arms differ only in the objective of the continuation."""
    if init_seed not in _PRETRAINED:
        model, guide = _fresh(args, init_seed)
        t0 = time.perf_counter()
        annealing = None
        if args.pretrain_annealing is not None:  # linear to 1 over the pretraining's steps
            steps = args.pretrain_epochs * math.ceil(x_train.shape[0] / args.batch_size)
            annealing = {"name": "linear", "start": args.pretrain_annealing, "num_steps": steps}
        carry = {}
        if args.carry_optimizer:  # pause (not finish) the run, so that the arms resume it
            steps_per_epoch = math.ceil(x_train.shape[0] / args.batch_size)
            carry = dict(checkpoint_dir=tempfile.mkdtemp(prefix="pretrain-"),
                         checkpoint_every=10**9, keep_checkpoints=1,
                         max_steps=args.pretrain_epochs * steps_per_epoch
                         if args.pretrain_epochs else None)
        epochs = 10**6 if carry or not args.pretrain_epochs else args.pretrain_epochs
        hist = fit(model, guide, x_train, epochs=epochs,
                   batch_size=args.batch_size, lr=args.lr, num_particles=args.k,
                   objective="elbo", seed=init_seed, progress=False, device="cpu",
                   max_seconds=args.pretrain_seconds, annealing=annealing, **carry)
        _PRETRAINED[init_seed] = (copy.deepcopy(model.state_dict()),
                                  copy.deepcopy(guide.state_dict()),
                                  time.perf_counter() - t0, len(hist.records),
                                  carry.get("checkpoint_dir"))
        print(f"seed {init_seed}: ELBO pretraining {_PRETRAINED[init_seed][2]:.1f} s, "
              f"{len(hist.records)} epochs", flush=True)
        if args.score_start:  # the start both arms continue, scored as they are
            pyro.set_rng_seed(args.seed + 10)
            steps = x_test.shape[0] * x_test.shape[1]
            boot = smc_log_likelihood(model, x_test, num_particles=args.eval_particles)
            e = elbo(model, guide, x_test, num_samples=10)
            _START[init_seed] = dict(start_smc_bootstrap_per_step=float(boot.sum()) / steps,
                                     start_elbo_per_step=float(e.sum()) / steps)
            print(f"seed {init_seed}: pretrained start {_START[init_seed]}", flush=True)
    return _PRETRAINED[init_seed]


def _train_and_score(args, objective, init_seed, x_train, x_test, x_val=None):
    model, guide = _fresh(args, init_seed)
    pre = None
    if args.pretrain_seconds or args.pretrain_epochs:
        pre = _pretrained(args, init_seed, x_train, x_test)
        model.load_state_dict(pre[0])
        guide.load_state_dict(pre[1])
    t0 = time.perf_counter()
    budget = args.budget_seconds  # equal wall time: many epochs, stopped by the clock
    annealing = None  # KL annealing is an ELBO recipe; FIVO has no KL term to anneal
    if objective == "elbo" and args.elbo_annealing is not None:
        annealing = {"name": "linear", "start": args.elbo_annealing, "num_steps": args.epochs}
    lr = args.finetune_lr if pre and args.finetune_lr else args.lr
    # "fivo-elbo-guide": the model by FIVO, the guide (proposal) by the one-particle ELBO
    guide_objective = "elbo" if objective == "fivo-elbo-guide" else None
    k = args.fivo_k if objective.startswith("fivo") and args.fivo_k else args.k
    resume = {}
    if pre and pre[4]:  # --carry-optimizer: resume a copy of the paused pretraining run
        ckdir = tempfile.mkdtemp(prefix=f"{objective}-")
        shutil.copytree(pre[4], ckdir, dirs_exist_ok=True)
        resume = dict(checkpoint_dir=ckdir, checkpoint_every=10**9, keep_checkpoints=1,
                      resume=True)
    epochs = args.epochs + (pre[3] if resume else 0)  # a resumed run counts the pretraining
    hist = fit(model, guide, x_train, epochs=10**7 if budget else epochs,
               batch_size=args.batch_size, lr=lr, num_particles=k,
               objective="fivo" if objective.startswith("fivo") else objective,
               guide_objective=guide_objective, seed=init_seed, progress=False, device="cpu",
               max_seconds=budget, annealing=annealing,
               resample_every=args.resample_every if objective.startswith("fivo") else 1,
               val_data=x_val, val_every=args.val_every, val_num_samples=1,
               early_stopping_patience=10**9 if x_val is not None else None,  # keep the best
               **resume)
    if resume:  # the history holds the pretraining's epochs too
        hist.records = hist.records[pre[3]:]
        shutil.rmtree(resume["checkpoint_dir"], ignore_errors=True)
    seconds = time.perf_counter() - t0
    steps = x_test.shape[0] * x_test.shape[1]
    pyro.set_rng_seed(args.seed + 10)
    boot = smc_log_likelihood(model, x_test, num_particles=args.eval_particles)
    guided = smc_log_likelihood(model, x_test, num_particles=args.eval_particles // 10,
                                guide=guide)
    iwae = log_likelihood(model, guide, x_test, num_samples=args.eval_particles // 10)
    e = elbo(model, guide, x_test, num_samples=10)
    # the same bootstrap SMC on training sequences (as many as held out): a model that fits
    # the training set better but the held-out set worse overfits
    x_fit = x_train[: x_test.shape[0]]
    boot_train = smc_log_likelihood(model, x_fit, num_particles=args.eval_particles)
    r = dict(objective=objective, init_seed=init_seed, particles=k, train_seconds=seconds,
             resample_every=args.resample_every if objective.startswith("fivo") else 1,
             pretrain_seconds=pre[2] if pre else 0.0, pretrain_epochs=pre[3] if pre else 0,
             epochs=len(hist.records), best_epoch=hist.best_epoch, **_START.get(init_seed, {}),
             curve=[dict(epoch=h["epoch"], train_objective_per_step=-h["train_neg_elbo_per_step"],
                         val_objective_per_step=-h["val_neg_elbo_per_step"])
                    for h in hist.records if h["val_neg_elbo_per_step"] is not None],
             final_train_objective_per_step=-hist["train_neg_elbo_per_step"][-1],
             test_smc_bootstrap_per_step=float(boot.sum()) / steps,
             test_smc_guided_per_step=float(guided.sum()) / steps,
             test_iwae_per_step=float(iwae.sum()) / steps,
             test_elbo_per_step=float(e.sum()) / steps,
             train_smc_bootstrap_per_step=float(boot_train.sum()) / x_fit.shape[:2].numel())
    print(f"seed {init_seed} {objective}: {seconds:.1f} s, test log-lik per step: SMC "
          f"bootstrap {r['test_smc_bootstrap_per_step']:.4f}, SMC guided "
          f"{r['test_smc_guided_per_step']:.4f}, IWAE {r['test_iwae_per_step']:.4f}, "
          f"ELBO {r['test_elbo_per_step']:.4f}; training sequences: SMC bootstrap "
          f"{r['train_smc_bootstrap_per_step']:.4f}", flush=True)
    return r


def run_fivo(args):
    _, x = simulate_pendulum(args.train + args.test, args.steps, seed=args.seed)
    x_train, x_test = x[: args.train], x[args.train:]
    x_val = simulate_pendulum(args.val, args.steps, seed=args.seed + 1)[1] if args.val else None
    runs = []
    for init_seed in args.init_seeds:
        for objective in args.arms:
            runs.append(_train_and_score(args, objective, init_seed, x_train, x_test, x_val))
        if init_seed in _PRETRAINED and _PRETRAINED[init_seed][4]:
            # --carry-optimizer: every arm has resumed its own copy; the paused run can go
            shutil.rmtree(_PRETRAINED[init_seed][4], ignore_errors=True)
    key = "test_smc_bootstrap_per_step"
    by = {o: [r[key] for r in runs if r["objective"] == o] for o in args.arms}
    mean = {o: statistics.mean(v) for o, v in by.items()}
    print(f"\nheld-out SMC (bootstrap, N={args.eval_particles}) log-likelihood per step, "
          f"mean over {len(args.init_seeds)} initialisations: "
          + ", ".join(f"{o} {mean[o]:.4f}" for o in args.arms))
    target = {f"mean_{o.replace('-', '_')}_trained": mean[o] for o in args.arms}
    for o in args.arms:
        if o == "elbo" or "elbo" not in by:
            continue
        diffs = [f - e for f, e in zip(by[o], by["elbo"], strict=True)]
        name = o.replace("-", "_")
        print(f"{o} - elbo per seed {[round(d, 4) for d in diffs]}")
        target[f"{name}_minus_elbo_per_seed"] = diffs
        target[f"{name}_minus_elbo_mean"] = statistics.mean(diffs)
        target[f"{name}_no_worse"] = statistics.mean(diffs) >= 0.0
    print(", ".join(f"{k} = {v}" for k, v in target.items()))
    return dict(benchmark="FIVO vs ELBO training of a DMM on the pendulum",
                command="python benchmarks/particle_filter.py " + " ".join(sys.argv[1:]),
                config={k: v for k, v in vars(args).items() if k not in ("out", "what")},
                machine=machine(), timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()),
                results=runs, targets=target)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", choices=["speed", "fivo"], default="speed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path ('' to skip; default "
                    "benchmarks/results/particle_filter.json or fivo_pendulum.json)")
    g = ap.add_argument_group("speed")
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--steps", type=int, default=None, help="T (speed: 1000, fivo: 50)")
    g.add_argument("--particles", type=int, default=1000)
    g.add_argument("--state-dim", type=int, default=2)
    g.add_argument("--obs-dim", type=int, default=2)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--resampling", nargs="+", default=["systematic", "multinomial"])
    f = ap.add_argument_group("fivo")
    f.add_argument("--train", type=int, default=64)
    f.add_argument("--test", type=int, default=32)
    f.add_argument("--z-dim", type=int, default=2)
    f.add_argument("--hidden", type=int, default=32)
    f.add_argument("--direction", default="backward")
    f.add_argument("--epochs", type=int, default=60)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--lr", type=float, default=0.01)
    f.add_argument("--k", type=int, default=4, help="particles of both objectives")
    f.add_argument("--fivo-k", type=int, default=None,
                   help="particles of the FIVO arms (default: --k)")
    f.add_argument("--resample-every", type=int, default=1,
                   help="FIVO arms: consider resampling every k steps only (the model is then "
                        "evaluated once per block of k steps: a cheaper step)")
    f.add_argument("--elbo-annealing", type=float, default=None,
                   help="ELBO run only: KL annealing linear from this beta to 1 over --epochs "
                        "optimisation steps (pyrossm's usual recipe against posterior collapse)")
    f.add_argument("--budget-seconds", type=float, default=None,
                   help="equal wall time: train each model for this many seconds (not --epochs)")
    f.add_argument("--pretrain-seconds", type=float, default=None,
                   help="fine-tuning: both arms continue one ELBO-trained model (trained this "
                        "many seconds per seed) for --budget-seconds / --epochs")
    f.add_argument("--pretrain-epochs", type=int, default=None,
                   help="fine-tuning: ELBO pretraining for this many epochs (instead of seconds)")
    f.add_argument("--pretrain-annealing", type=float, default=None,
                   help="with --pretrain-epochs: KL annealing of the pretraining, linear from "
                        "this beta to 1 over its steps")
    f.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tuning: learning rate of both arms (default --lr)")
    f.add_argument("--init-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="initialisations (each trained with both objectives)")
    f.add_argument("--eval-particles", type=int, default=2000)
    f.add_argument("--val", type=int, default=0,
                   help="validation sequences (simulated with --seed + 1): each arm keeps the "
                        "parameters with the best validation bound of its own objective "
                        "(fit's val_objective default; the ELBO arm by ELBO, FIVO by FIVO)")
    f.add_argument("--val-every", type=int, default=1, help="validate every n epochs")
    f.add_argument("--carry-optimizer", action="store_true",
                   help="the arms resume the paused pretraining run (its ClippedAdam state and "
                        "RNG, and so its learning rate: --finetune-lr does not apply) instead of "
                        "starting a fresh optimiser from its parameters")
    f.add_argument("--score-start", action="store_true",
                   help="also score the pretrained start of each seed (held-out bootstrap SMC "
                        "and ELBO), the model both arms continue")
    f.add_argument("--arms", nargs="+", default=["elbo", "fivo"],
                   choices=["elbo", "fivo", "fivo-elbo-guide"],
                   help="training objectives compared (fivo-elbo-guide: the model by FIVO, "
                        "the guide by the one-particle ELBO)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.what == "speed":
        args.steps = args.steps or 1000
        result, default = run_speed(args), RESULTS / "particle_filter.json"
    else:
        args.steps = args.steps or 50
        result, default = run_fivo(args), RESULTS / "fivo_pendulum.json"
    write_result(result, default if args.out is None else args.out)
    return result


if __name__ == "__main__":
    main()
