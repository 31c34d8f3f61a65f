"""Seconds per SVI epoch: one trajectory site vs one site per time step (``pyro.markov``).

Same LGSSM (``LinearGaussianSSM``, learnable parameters), same structured guide, same data and
the same training loop (:func:`pyrossm.infer.fit`), in the same process; only the Pyro
formulation differs:

* vectorized -- the model's latent trajectory is one site ``"z"`` whose ``log_prob`` is one
  batched computation, the guide one site drawn by
  :class:`~pyrossm.distributions.AutoregressiveGaussianSequence`;
* per step -- sites ``"z_1".."z_T"``, ``"x_1".."x_T"`` in a ``pyro.markov`` loop
  (:class:`~pyrossm.experiments.per_step.MarkovLGSSMModel`,
  :class:`~pyrossm.experiments.per_step.PerStepGuide`), as in Pyro's DMM tutorial.

Prints a table and writes ``benchmarks/results/svi.json``. Run from the repository root::

    python benchmarks/svi.py               # defaults: T=100, 64 sequences, batch 16
    python benchmarks/svi.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys

import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyrossm.experiments.per_step import MarkovLGSSMModel, PerStepGuide  # noqa: E402
from pyrossm.guides import StructuredGuide  # noqa: E402
from pyrossm.infer import fit  # noqa: E402
from pyrossm.lgssm import LinearGaussianSSM  # noqa: E402

GUIDES = {
    # name: StructuredGuide keyword arguments
    "dks-nonlinear-lstm": dict(
        direction="backward", combiner="nonlinear", cell="lstm", hidden_dim=64
    ),
    "dks-linear-tril": dict(direction="backward", combiner="linear", cell="linear", hidden_dim=8),
}


def _simulate(args):
    pyro.set_rng_seed(args.seed)
    truth = LinearGaussianSSM.from_matrices(
        A=[[0.8, 0.2], [-0.2, 0.8]],
        C=[[1.0, 0.5], [0.0, 1.0]],
        Q=[[0.3, 0.1], [0.1, 0.2]],
        R=[[0.5, 0.0], [0.0, 0.5]],
    )
    _, x = truth.sample(args.num_steps, num_samples=args.num_sequences)
    return x


def _time(model, guide, x, args):
    history = fit(
        model,
        guide,
        x,
        epochs=args.warmup + args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        device="cpu",
        seed=args.seed,
        progress=False,
    )
    seconds = history["seconds"][args.warmup :]
    return statistics.median(seconds), seconds


def run(args):
    torch.set_num_threads(args.threads)
    x = _simulate(args)
    rows = []
    for name in args.guides:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        ssm = LinearGaussianSSM(2, 2)
        guide = StructuredGuide(2, 2, **GUIDES[name])
        ssm_ref, guide_ref = copy.deepcopy(ssm), copy.deepcopy(guide)
        vec, vec_all = _time(ssm, guide, x, args)
        pyro.clear_param_store()
        ref, ref_all = _time(MarkovLGSSMModel(ssm_ref), PerStepGuide(guide_ref), x, args)
        rows.append(
            dict(
                guide=name,
                vectorized_s_per_epoch=vec,
                per_step_s_per_epoch=ref,
                speedup=ref / vec,
                vectorized_epochs=vec_all,
                per_step_epochs=ref_all,
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-steps", type=int, default=100, help="T, steps per sequence")
    p.add_argument("--num-sequences", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="T=20, 16 sequences, 1 timed epoch")
    p.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "svi.json"),
    )
    args = p.parse_args(argv)
    if args.quick:
        args.num_steps, args.num_sequences, args.epochs = 20, 16, 1
    rows = run(args)
    print(
        f"SVI seconds per epoch, T={args.num_steps}, {args.num_sequences} sequences, "
        f"batch {args.batch_size}, {args.threads} thread(s)"
    )
    print(f"{'guide':<22}{'vectorized':>12}{'per-step':>12}{'speedup':>10}")
    for r in rows:
        print(
            f"{r['guide']:<22}{r['vectorized_s_per_epoch']:>12.3f}{r['per_step_s_per_epoch']:>12.3f}"
            f"{r['speedup']:>9.1f}x"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            dict(
                settings={k: v for k, v in vars(args).items() if k != "output"},
                torch=torch.__version__,
                pyro=pyro.__version__,
                machine=platform.machine(),
                results=rows,
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()
