"""Seconds per training epoch of the deep Markov model on JSB chorales: one site vs per step vs
Pyro's example.

The pyrossm formulations train the *same* model and guide (:func:`pyrossm.experiments.nonlinear.
build_jsb` ``"dmm_backward"``: published sizes z 100, transition 200, emission 100, backward
(DKS) encoder of 600 units, ``--encoder-cell``; ``--match-pyro`` for Pyro's example's options:
ReLU RNN, no scale floors, Bernoulli by probabilities) on the same mini-batches (batch 20,
trimmed to the batch's longest sequence), with the same optimiser (Adam lr 3e-4, betas
(0.96, 0.999), gradient-norm clipping 10) and Pyro's ``Trace_ELBO``:

* ``vectorized``: pyrossm's formulation, one latent site ``"z"`` per trajectory whose
  ``log_prob`` is one batched call of the transition network (and of the guide's combiner);
* ``per_step``: the classic formulation of Pyro's DMM tutorial, one site ``z_t`` and one site
  ``x_t`` per time step under ``pyro.markov`` (model written below; the guide's
  ``per_step=True`` mode samples the same ``q`` as sites ``z_1 .. z_T``);
* ``pyro_example``: the per-step program of Pyro's ``examples/dmm.py`` (written in
  ``benchmarks/dmm_vs_pyro.py``; its ReLU RNN runs on packed sequences), stepped by ``SVI`` with
  ``ClippedAdam`` at the published settings: the peer of the issue's speed target.

An epoch is the 229 training chorales (12 batches). Each formulation is timed over
``--batches`` batches after ``--warmup`` untimed ones, and seconds per epoch are *extrapolated*
as ``time per batch * batches per epoch`` (reported as such). Times are the process's CPU
seconds by default (``--clock cpu``; with one thread this equals wall time on an idle machine,
and unlike wall time it does not count other processes on a shared one); ``--clock wall`` for
wall time; both are stored. Also timed alone: the guide's RNN encoder (on the padded batch and
on packed sequences), the matrix products any implementation of that RNN must do (its floor on
this CPU), and the whole guide (encoder, sequential sampling, log q, backward) -- the part
shared by every pyrossm model, which bounds how much faster than Pyro's example an epoch can
be (``ratios.pyro_example_over_guide_alone``). Prints a table and writes
``benchmarks/results/dmm.json``.

    python benchmarks/dmm.py --batches 4 --threads 1
    python benchmarks/dmm.py --batches 6 --match-pyro --output benchmarks/results/dmm_relu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from pyrossm.datasets import load_jsb_chorales
from pyrossm.experiments.nonlinear import JSB_DEFAULTS, PYRO_EXAMPLE_OPTIONS, build_jsb

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def per_step_model(dmm, x: torch.Tensor, mask: torch.Tensor):
    """The DMM as in Pyro's tutorial: sites ``z_1..z_T`` and ``x_1..x_T`` under ``pyro.markov``."""
    batch, steps = x.shape[:2]
    value, observed = dmm.emitter.observed(x, mask)
    z_prev = dmm.dynamics.z_0.expand(batch, -1)
    with pyro.plate("sequences", batch, dim=-1):
        for t in pyro.markov(range(steps)):
            loc, scale = dmm.dynamics.transition(z_prev)
            z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1).mask(mask[:, t]))
            pyro.sample(f"x_{t + 1}", dmm.emitter(z_t).mask(observed[:, t]).to_event(1),
                        obs=value[:, t])
            z_prev = z_t


def mean(values):
    return sum(values) / len(values)


def time_key(clock):
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock: expected 'cpu' or 'wall', got {clock!r}")
    return clock


def make_batches(num_sequences: int, batch_size: int, seed: int):
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed))
    return [order[i:i + batch_size] for i in range(0, num_sequences, batch_size)]


class Runner:
    """One formulation: its own copy of model, guide and optimiser, stepping batch by batch."""

    def __init__(self, name, dmm, guide, elbo):
        self.name, self.dmm, self.guide, self.elbo = name, dmm, guide, elbo
        self.params = list(dmm.parameters()) + list(guide.parameters())
        self.optim = torch.optim.Adam(self.params, lr=3e-4, betas=(0.96, 0.999))
        if name == "vectorized":
            self.model_fn, self.guide_fn = dmm.model, guide
        else:
            self.model_fn = lambda x, mask: per_step_model(dmm, x, mask)  # noqa: E731
            self.guide_fn = lambda x, mask: guide(x, mask, per_step=True)  # noqa: E731

    def step(self, x, mask):
        start, cpu = time.perf_counter(), time.process_time()
        loss = self.elbo.differentiable_loss(self.model_fn, self.guide_fn, x, mask)
        self.optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        self.optim.step()
        return time.perf_counter() - start, time.process_time() - cpu, loss.item()


class PyroExampleRunner:
    """The per-step program of Pyro's ``examples/dmm.py`` (``benchmarks/dmm_vs_pyro.py``):
    SVI with ``Trace_ELBO`` and ``ClippedAdam`` at the published settings, ReLU RNN encoder on
    packed sequences."""

    name = "pyro_example"

    def __init__(self, rnn_dim):
        from dmm_vs_pyro import PyroDMM
        from pyro.infer import SVI
        from pyro.optim import ClippedAdam

        self.dmm = PyroDMM(88, 100, 100, 200, rnn_dim)
        optim = ClippedAdam({"lr": 3e-4, "betas": (0.96, 0.999), "clip_norm": 10.0,
                             "lrd": 0.99996, "weight_decay": 2.0})
        self.svi = SVI(self.dmm.model, self.dmm.guide, optim, loss=Trace_ELBO())

    def step(self, x, mask):
        start, cpu = time.perf_counter(), time.process_time()
        loss = self.svi.step(x, mask, mask.sum(-1), 1.0)
        return time.perf_counter() - start, time.process_time() - cpu, loss


def time_guide(guide, x, mask):
    """Seconds of the guide alone: encoder, sequential sampling, log q, and their backward."""
    start, cpu = time.perf_counter(), time.process_time()
    q = guide.distribution(x, mask)
    z = q.rsample()
    (q.log_prob(z).sum() + z.square().sum()).backward()
    guide.zero_grad()
    return time.perf_counter() - start, time.process_time() - cpu


def time_packed_encoder(guide, x, mask):
    """Seconds of the guide's RNN run on packed sequences (real steps only, as Pyro's example
    does), forward + backward: what the shared encoder would cost without padded steps."""
    from dmm_vs_pyro import reverse_within_lengths
    from torch.nn.utils.rnn import pack_padded_sequence

    enc = guide.encoders[0]
    lengths = mask.sum(-1)
    start, cpu = time.perf_counter(), time.process_time()
    packed = pack_padded_sequence(reverse_within_lengths(x, lengths), lengths, batch_first=True,
                                  enforce_sorted=False)
    out, _ = enc.rnn(packed, enc.initial_state(x.shape[0]))
    out.data.sum().backward()
    guide.zero_grad()
    return time.perf_counter() - start, time.process_time() - cpu


def time_encoder(guide, x, mask):
    """Seconds of the guide's RNN encoder alone (forward + backward), shared by both."""
    start, cpu = time.perf_counter(), time.process_time()
    guide.features(x, mask).sum().backward()
    guide.zero_grad()
    return time.perf_counter() - start, time.process_time() - cpu


GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def time_encoder_gemm_floor(hidden: int, batch: int, steps: int, cell: str = "lstm",
                            obs_dim: int = 88):
    """Seconds of the matrix products a recurrent encoder cannot avoid, run back to back.

    Per step the recurrence needs ``h W_hh^T`` (forward), ``dgates W_hh`` and ``dgates^T h``
    (backward), each ``batch x hidden x gates*hidden`` multiply-adds (4 gates for an LSTM, 3 for
    a GRU, 1 for a plain RNN), plus the input projection
    of all steps at once and its weight gradient. An encoder whose time is close to this floor
    cannot be made faster by reorganising the loop, only by doing less arithmetic.
    """
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, hidden, generator=g)
    w = torch.randn(GATES[cell] * hidden, hidden, generator=g)
    dgates = torch.randn(batch, GATES[cell] * hidden, generator=g)
    x = torch.randn(batch * steps, obs_dim, generator=g)
    w_ih = torch.randn(GATES[cell] * hidden, obs_dim, generator=g)
    start, cpu = time.perf_counter(), time.process_time()
    xw = x @ w_ih.t()
    for _ in range(steps):
        h @ w.t()
        dgates @ w
        dgates.t() @ h
    xw.t() @ x
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="timed batches per formulation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--data-dir", default=None, help="holds jsb_chorales.pickle "
                        "(default $PYROSSM_DATA_DIR, then <repo>/../shared/data)")
    parser.add_argument("--output", default=str(RESULTS / "dmm.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                        help="report process CPU seconds (robust on a shared machine; equal to "
                             "wall time on an idle one with 1 thread) or wall seconds")
    parser.add_argument("--rnn-dim", type=int, default=600, help="guide RNN size (published: 600)")
    parser.add_argument("--encoder-cell", default="lstm", choices=("lstm", "gru", "rnn", "relu"),
                        help="the guide's encoder cell (pyrossm's default lstm; Pyro's example "
                             "uses a ReLU RNN)")
    parser.add_argument("--match-pyro", action="store_true",
                        help="pyrossm with Pyro's example's options (PYRO_EXAMPLE_OPTIONS: ReLU "
                             "RNN encoder, no scale floors, Bernoulli by probabilities)")
    parser.add_argument("--formulations", default="vectorized,per_step,pyro_example",
                        help="comma-separated subset of vectorized,per_step,pyro_example")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    data_dir = args.data_dir or os.environ.get("PYROSSM_DATA_DIR") or str(SHARED_DATA)
    data = load_jsb_chorales("train", data_dir)
    batch_size = 20
    all_batches = make_batches(len(data.lengths), batch_size, args.seed)
    batches = all_batches[: args.warmup + args.batches]
    sizes = {**JSB_DEFAULTS, "rnn_dim": args.rnn_dim, "encoder_cell": args.encoder_cell}
    if args.match_pyro:
        sizes.update(PYRO_EXAMPLE_OPTIONS)
    elbo = Trace_ELBO(max_plate_nesting=1)
    runners = {}
    for name in args.formulations.split(","):  # identical initial parameters (pyrossm)
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        if name == "pyro_example":
            runners[name] = PyroExampleRunner(args.rnn_dim)
            continue
        dmm, guide = build_jsb("dmm_backward", sizes)
        runners[name] = Runner(name, dmm, guide, elbo)
    some_guide = next(r.guide for r in runners.values() if hasattr(r, "guide"))
    times = {name: [] for name in runners}
    cpu_times = {name: [] for name in runners}
    losses = {name: [] for name in runners}
    extra = {k: ([], []) for k in ("encoder", "gemm_floor", "guide", "packed_encoder")}
    frames = 0
    # interleaved: the formulations see the same batches under the same machine load
    for i, index in enumerate(batches):
        length = int(data.lengths[index].max())
        x, mask = data.piano_rolls[index, :length], data.mask[index, :length]
        for name, runner in runners.items():
            seconds, cpu, loss = runner.step(x, mask)
            if i >= args.warmup:
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                losses[name].append(loss / int(data.lengths[index].sum()))
        if i >= args.warmup:
            for key, (wall, cpu) in (
                ("encoder", time_encoder(some_guide, x, mask)),
                ("gemm_floor", time_encoder_gemm_floor(
                    args.rnn_dim, len(index), length,
                    "rnn" if sizes["encoder_cell"] == "relu" else sizes["encoder_cell"])),
                ("guide", time_guide(some_guide, x, mask)),
                ("packed_encoder", time_packed_encoder(some_guide, x, mask)),
            ):
                extra[key][0].append(wall)
                extra[key][1].append(cpu)
            frames += int(data.lengths[index].sum())
    clock = time_key(args.clock)
    pick = {k: mean(v[1] if clock == "cpu" else v[0]) for k, v in extra.items()}
    encoder = pick["encoder"]
    rows = {}
    for name in runners:
        per_batch = mean(cpu_times[name] if clock == "cpu" else times[name])
        rows[name] = {
            "seconds_per_batch": per_batch,
            "seconds_per_epoch_extrapolated": per_batch * len(all_batches),
            "frames_per_second": frames / (per_batch * len(times[name])),
            "seconds_per_batch_excluding_encoder_rnn": per_batch - encoder,
            "wall_seconds_per_batch": mean(times[name]),
            "cpu_seconds_per_batch": mean(cpu_times[name]),
            "timed_batches": len(times[name]),
            "loss_per_frame": losses[name],
        }
    ratios = {}
    if "vectorized" in rows:
        vec = rows["vectorized"]["seconds_per_batch"]
        for name in rows:
            if name != "vectorized":
                ratios[f"{name}_over_vectorized"] = rows[name]["seconds_per_batch"] / vec
        if "per_step" in rows:
            ratios["per_step_over_vectorized_excluding_shared_encoder_rnn"] = (
                rows["per_step"]["seconds_per_batch_excluding_encoder_rnn"]
                / rows["vectorized"]["seconds_per_batch_excluding_encoder_rnn"])
        if "pyro_example" in rows:
            # what the vectorized model could reach at best if its model part cost nothing:
            # bounded by the shared guide (encoder + sequential sampling + backward)
            ratios["pyro_example_over_guide_alone"] = (
                rows["pyro_example"]["seconds_per_batch"] / pick["guide"])
    result = {
        "benchmark": "DMM on JSB chorales, seconds per epoch (extrapolated from timed batches)",
        "sizes": {"z_dim": 100, "transition_dim": 200, "emission_dim": 100, "rnn_dim": args.rnn_dim,
                  "encoder_cell": sizes["encoder_cell"], "batch_size": batch_size,
                  "batches_per_epoch": len(all_batches), "match_pyro": args.match_pyro,
                  "options": {k: sizes[k] for k in PYRO_EXAMPLE_OPTIONS}},
        "threads": args.threads,
        "clock": args.clock,
        "torch": torch.__version__, "pyro": pyro.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "results": rows,
        "encoder_rnn_seconds_per_batch": encoder,
        "encoder_rnn_gemm_floor_seconds_per_batch": pick["gemm_floor"],
        "encoder_rnn_over_gemm_floor": encoder / pick["gemm_floor"],
        "encoder_rnn_packed_seconds_per_batch": pick["packed_encoder"],
        "guide_alone_seconds_per_batch": pick["guide"],
        "ratios": ratios,
        "note": "seconds (process CPU time with --clock cpu) extrapolated from timed batches; "
                "the formulations are interleaved batch by batch; the guide's RNN encoder "
                "(identical in the pyrossm formulations) is timed alone, on the padded batch and "
                "on packed sequences (real steps only), and so is the whole guide (encoder, "
                "sequential sampling, log q, backward)",
    }
    print(f"clock: {args.clock} seconds, encoder {sizes['encoder_cell']}, "
          f"match_pyro {args.match_pyro}")
    print(f"{'formulation':<13} {'s/batch':>9} {'s/epoch (extrap.)':>18} {'frames/s':>9}")
    for name, row in rows.items():
        print(f"{name:<13} {row['seconds_per_batch']:>9.3f} "
              f"{row['seconds_per_epoch_extrapolated']:>18.2f} {row['frames_per_second']:>9.0f}")
    print(f"guide alone {pick['guide']:.3f} s/batch; its RNN encoder {encoder:.3f} (packed: "
          f"{pick['packed_encoder']:.3f}); the encoder's unavoidable matrix products "
          f"{pick['gemm_floor']:.3f} ({encoder / pick['gemm_floor']:.2f}x)")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    if not all(math.isfinite(v) for v in ratios.values()):
        raise SystemExit("non-finite timing")
    return result


if __name__ == "__main__":
    main()
