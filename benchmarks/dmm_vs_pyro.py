"""Pyro's DMM example vs pyrossm on JSB chorales, side by side: test -ELBO per epoch and epoch time.

The peer is a per-step Pyro program written here after Pyro's ``examples/dmm.py`` (Krishnan et
al. 2017, the DKS variant): the same networks (Emitter: two ReLU layers then *probabilities*
``sigmoid(.)``; GatedTransition with an identity-initialised linear path and a softplus scale
with no floor; Combiner ``(tanh(W z_{t-1}) + h_t) / 2`` with a softplus scale with no floor; a
one-layer ReLU ``nn.RNN`` of 600 units over the time-reversed sequence, learned ``h_0``,
learned ``z_0`` and ``z_q_0``), PyTorch's default initialisation, sites ``z_t`` / ``obs_x_t``
per step under ``pyro.markov`` in a plate, KL annealing by ``poutine.scale`` on the ``z_t``
sites of model and guide (``min + (1 - min) * (step + 1) / (annealing_epochs * batches)``),
Pyro's ``Trace_ELBO`` and ``ClippedAdam`` (per-element clipping, ``lrd`` per step, weight decay
added to the gradient), the loss summed over the mini-batch (no per-frame normalisation), a
fresh ``randperm`` of the 229 training chorales per epoch cut into batches of 20. The example's
``--rnn-dropout-rate 0.1`` does nothing (it sets the rate to 0 for a one-layer RNN, and PyTorch
applies RNN dropout only between layers), so neither does the program here. Nothing of Pyro's
file is copied; ``--pyro-example PATH`` runs that file itself as well, when it is given (it
needs its own data loader: ``torchvision`` installed and the pickle in Pyro's data folder).

pyrossm trains :func:`pyrossm.experiments.nonlinear.build_jsb` ("dmm_backward") with
:func:`pyrossm.infer.fit` and the same optimiser settings; ``--pyrossm-options pyro`` (default)
uses :data:`~pyrossm.experiments.nonlinear.PYRO_EXAMPLE_OPTIONS` (ReLU RNN encoder, no scale
floors, Bernoulli by probabilities) and ``default`` pyrossm's own defaults with ``--encoder-cell``.
The two alternate epoch by epoch in one process (each with its own random stream), so both see
the same machine load; after every ``--eval-every`` epochs both are scored on the test split
(-ELBO per frame, the mean of ``--eval-draws`` guide draws, annealing 1). Epoch times are
process CPU seconds (and wall seconds). Writes ``benchmarks/results/dmm_vs_pyro.json``:

    nice -n 10 python benchmarks/dmm_vs_pyro.py --epochs 60 --eval-every 5 --seed 0
    python benchmarks/dmm_vs_pyro.py --summarize benchmarks/results/dmm_vs_pyro*.json \
        --output benchmarks/results/dmm_vs_pyro_summary.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------
# The peer: a per-step Pyro DMM following examples/dmm.py
# ------------------------------------------------------------------------------------------
class Emitter(nn.Module):
    """``p(x_t | z_t)``: Bernoulli probabilities ``sigmoid(W_3 relu(W_2 relu(W_1 z)))``."""

    def __init__(self, obs_dim, z_dim, emission_dim):
        super().__init__()
        self.hidden1 = nn.Linear(z_dim, emission_dim)
        self.hidden2 = nn.Linear(emission_dim, emission_dim)
        self.out = nn.Linear(emission_dim, obs_dim)

    def forward(self, z):
        return torch.sigmoid(self.out(F.relu(self.hidden2(F.relu(self.hidden1(z))))))


class Transition(nn.Module):
    """``p(z_t | z_{t-1})``: the gated transition, softplus scale without a floor."""

    def __init__(self, z_dim, transition_dim):
        super().__init__()
        self.gate_hidden = nn.Linear(z_dim, transition_dim)
        self.gate_out = nn.Linear(transition_dim, z_dim)
        self.proposal_hidden = nn.Linear(z_dim, transition_dim)
        self.proposal_out = nn.Linear(transition_dim, z_dim)
        self.scale = nn.Linear(z_dim, z_dim)
        self.linear = nn.Linear(z_dim, z_dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(z_dim))
            self.linear.bias.zero_()

    def forward(self, z_prev):
        gate = torch.sigmoid(self.gate_out(F.relu(self.gate_hidden(z_prev))))
        proposal = self.proposal_out(F.relu(self.proposal_hidden(z_prev)))
        loc = (1 - gate) * self.linear(z_prev) + gate * proposal
        return loc, F.softplus(self.scale(F.relu(proposal)))


class Combiner(nn.Module):
    """``q(z_t | z_{t-1}, h_t)``: ``c = (tanh(W z_{t-1}) + h_t) / 2``, loc and softplus scale."""

    def __init__(self, z_dim, rnn_dim):
        super().__init__()
        self.z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.to_loc = nn.Linear(rnn_dim, z_dim)
        self.to_scale = nn.Linear(rnn_dim, z_dim)

    def forward(self, z_prev, h):
        c = 0.5 * (torch.tanh(self.z_to_hidden(z_prev)) + h)
        return self.to_loc(c), F.softplus(self.to_scale(c))


def reverse_within_lengths(x, lengths):
    """Each sequence of ``x (batch, T, ...)`` reversed within its own length (padding stays)."""
    steps = torch.arange(x.shape[1])
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index.view(index.shape + (1,) * (x.dim() - 2)).expand_as(x))


class PyroDMM(nn.Module):
    """The DMM of Pyro's example: ``model`` and ``guide`` with one site per time step.

    Arguments of both: ``x (batch, T, 88)`` (time at dim -2), ``mask (batch, T)`` bool,
    ``lengths (batch,)``, ``annealing`` (the scale of the ``z_t`` sites).
    """

    def __init__(self, obs_dim=88, z_dim=100, emission_dim=100, transition_dim=200, rnn_dim=600,
                 num_iafs=0, iaf_dim=100):
        super().__init__()
        self.emitter = Emitter(obs_dim, z_dim, emission_dim)
        self.trans = Transition(z_dim, transition_dim)
        self.combiner = Combiner(z_dim, rnn_dim)
        self.rnn = nn.RNN(obs_dim, rnn_dim, nonlinearity="relu", batch_first=True)
        self.iafs = nn.ModuleList(
            dist.transforms.affine_autoregressive(z_dim, hidden_dims=[iaf_dim])
            for _ in range(num_iafs))
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    def model(self, x, mask, lengths, annealing=1.0):
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(x.shape[0], -1)
        with pyro.plate("z_minibatch", x.shape[0]):
            for t in pyro.markov(range(1, x.shape[1] + 1)):
                loc, scale = self.trans(z_prev)
                with poutine.scale(scale=annealing):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(loc, scale)
                                      .mask(mask[:, t - 1:t]).to_event(1))
                pyro.sample(f"obs_x_{t}", dist.Bernoulli(self.emitter(z_t))
                            .mask(mask[:, t - 1:t]).to_event(1), obs=x[:, t - 1])
                z_prev = z_t

    def encode(self, x, lengths):
        """``h_t`` of the ReLU RNN run from ``t = T_b`` down to 1, ``(batch, T, rnn_dim)``."""
        packed = pack_padded_sequence(reverse_within_lengths(x, lengths), lengths,
                                      batch_first=True, enforce_sorted=False)
        h_0 = self.h_0.expand(1, x.shape[0], self.rnn.hidden_size).contiguous()
        out, _ = self.rnn(packed, h_0)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return reverse_within_lengths(out, lengths)

    def guide(self, x, mask, lengths, annealing=1.0):
        pyro.module("dmm", self)
        h = self.encode(x, lengths)
        z_prev = self.z_q_0.expand(x.shape[0], -1)
        with pyro.plate("z_minibatch", x.shape[0]):
            for t in pyro.markov(range(1, x.shape[1] + 1)):
                loc, scale = self.combiner(z_prev, h[:, t - 1])
                with poutine.scale(scale=annealing):
                    if len(self.iafs):
                        q = dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1),
                                                         list(self.iafs))
                        z_t = pyro.sample(f"z_{t}", q.mask(mask[:, t - 1]))
                    else:
                        z_t = pyro.sample(f"z_{t}", dist.Normal(loc, scale)
                                          .mask(mask[:, t - 1:t]).to_event(1))
                z_prev = z_t

    @torch.no_grad()
    def load_pyrossm(self, model, guide):
        """Copy the parameters of pyrossm's ``build_jsb("dmm_backward")`` pair (ReLU encoder)."""
        tr, em, comb = model.dynamics.transition, model.emitter.logits_net, guide.combiner
        pairs = [(self.emitter.hidden1, em[0]), (self.emitter.hidden2, em[2]),
                 (self.emitter.out, em[4]), (self.trans.gate_hidden, tr.gate_hidden),
                 (self.trans.gate_out, tr.gate_out),
                 (self.trans.proposal_hidden, tr.proposal_hidden),
                 (self.trans.proposal_out, tr.proposal_out), (self.trans.scale, tr.scale),
                 (self.trans.linear, tr.linear), (self.combiner.z_to_hidden, comb.z_to_hidden),
                 (self.combiner.to_loc, comb.hidden_to_loc),
                 (self.combiner.to_scale, comb.hidden_to_scale.diag)]
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        encoder = guide.encoders[0]
        self.rnn.load_state_dict(encoder.rnn.state_dict())
        self.h_0.copy_(encoder.h0.view_as(self.h_0))
        self.z_0.copy_(model.dynamics.z_0)
        self.z_q_0.copy_(comb.z0)
        return self


def annealing_factor(epoch, batch, batches_per_epoch, annealing_epochs, minimum):
    """The example's KL annealing factor of mini-batch ``batch`` of ``epoch`` (0-based)."""
    if annealing_epochs <= 0 or epoch >= annealing_epochs:
        return 1.0
    frac = (batch + epoch * batches_per_epoch + 1) / (annealing_epochs * batches_per_epoch)
    return minimum + (1.0 - minimum) * frac


class PyroRunner:
    """The Pyro program trained epoch by epoch with SVI, Trace_ELBO and ClippedAdam."""

    def __init__(self, s, train, seed, num_iafs=0):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        self.s, self.train = s, train
        self.dmm = PyroDMM(88, s["z_dim"], s["emission_dim"], s["transition_dim"], s["rnn_dim"],
                           num_iafs=num_iafs)
        self.optim = ClippedAdam({"lr": s["lr"], "betas": s["betas"], "clip_norm": s["clip_norm"],
                                  "lrd": s["lr_decay"], "weight_decay": s["weight_decay"]})
        self.svi = SVI(self.dmm.model, self.dmm.guide, self.optim, loss=Trace_ELBO())
        self.epoch = 0
        self.rng = torch.get_rng_state()

    def run_epoch(self):
        x_all, lengths_all = self.train
        n, bs = len(lengths_all), self.s["batch_size"]
        per_epoch = math.ceil(n / bs)
        order = torch.randperm(n)
        total = 0.0
        for b in range(per_epoch):
            index = order[b * bs:(b + 1) * bs]
            lengths = lengths_all[index]
            x = x_all[index, :int(lengths.max())]
            mask = torch.arange(x.shape[1]) < lengths[:, None]
            beta = annealing_factor(self.epoch, b, per_epoch, self.s["annealing_epochs"],
                                    self.s["min_annealing"])
            total += self.svi.step(x, mask, lengths, beta)
        self.epoch += 1
        return total / float(lengths_all.sum())

    @torch.no_grad()
    def test_neg_elbo_per_frame(self, test, draws):
        x, lengths = test
        mask = torch.arange(x.shape[1]) < lengths[:, None]
        self.dmm.eval()
        losses = [self.svi.evaluate_loss(x, mask, lengths) for _ in range(draws)]
        self.dmm.train()
        return sum(losses) / draws / float(lengths.sum())


def _save_pyro_checkpoint(path, peer, curves, epoch):
    """Pyro's run after ``epoch``: the module, ClippedAdam's per-parameter states (with the
    decayed learning rate), the run's RNG state and the curve so far; written atomically."""
    state = {"epoch": epoch, "module": peer.dmm.state_dict(), "optim": peer.optim.get_state(),
             "rng": peer.rng, "curve": curves["pyro"]}
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_pyro_checkpoint(path, peer, curves):
    """Restore :func:`_save_pyro_checkpoint`'s state into ``peer``; returns its epoch."""
    if not path or not Path(path).exists():
        raise SystemExit(f"--resume: no checkpoint at --checkpoint {path!r}")
    state = torch.load(path, weights_only=False)
    peer.dmm.load_state_dict(state["module"])
    peer.optim.set_state(state["optim"])  # applied as each parameter's optimiser is created
    peer.rng, peer.epoch = state["rng"], state["epoch"]
    curves["pyro"].clear()
    curves["pyro"].update(state["curve"])
    return state["epoch"]


def pyrossm_test_neg_elbo(model, guide, test, draws):
    from pyrossm.infer import elbo

    x, lengths = test
    mask = torch.arange(x.shape[1]) < lengths[:, None]
    e = elbo(model, guide, (x, mask), num_samples=draws, batch_size=len(lengths))
    return -float(e.sum()) / float(lengths.sum())


def _fit_pyrossm(fit, model, guide, x, lengths, s, annealing, args, callback):
    mask = torch.arange(x.shape[1]) < lengths[:, None]
    fit(model, guide, (x, mask), epochs=args.epochs, batch_size=s["batch_size"], lr=s["lr"],
        betas=s["betas"], clip_norm=s["clip_norm"], lr_decay=s["lr_decay"],
        weight_decay=s["weight_decay"], annealing=annealing, device="cpu", seed=args.seed,
        progress=False, callbacks=[callback])


def parse_example_log(text):
    """``(seconds per epoch, {epoch: test -ELBO/frame})`` from the log of Pyro's example."""
    seconds = [float(m) for m in re.findall(r"\[training epoch \d+\].*\(dt = ([0-9.]+) sec\)",
                                            text)]
    tests = {int(e): float(t) for e, _, t in
             re.findall(r"\[val/test epoch (\d+)\]\s+([-0-9.eE+]+)\s+([-0-9.eE+]+)", text)}
    return seconds, tests


def run_pyro_example(path, epochs, threads):
    """Run Pyro's own ``examples/dmm.py`` at ``path`` for ``epochs`` epochs (its defaults)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, str(path), "-n", str(epochs), "-l", os.devnull],
                         capture_output=True, text=True, env=env, check=False)
    seconds, tests = parse_example_log(out.stdout + out.stderr)
    return {"path": str(path), "returncode": out.returncode, "seconds_per_epoch": seconds,
            "test_neg_elbo_per_frame": tests,
            "stderr_tail": (out.stderr or "")[-2000:] if out.returncode else None}


def summarize(paths, epochs=(10, 25, 50, 100, 150, 200), output=None):
    """Table of test -ELBO/frame at ``epochs`` from result files of this script, one row per
    (file, runner); written to ``output`` as JSON when given."""
    rows = []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        if "curves" not in payload:  # e.g. an earlier summary
            continue
        opts = payload["settings"].get("pyrossm_options")
        cell = payload["settings"].get("encoder_cell")
        for name, c in payload["curves"].items():
            at = dict(zip(c["epoch"], c["test_neg_elbo_per_frame"]))
            rows.append({"file": str(path), "runner": name,
                         "options": "pyro example" if name == "pyro" else f"{opts} ({cell})",
                         "seed": payload["settings"]["seed"], "epochs_done": len(c["cpu_seconds"]),
                         "diverged_at_epoch": c.get("diverged_at_epoch"),
                         "cpu_seconds_per_epoch": c.get("cpu_seconds_per_epoch_mean"),
                         "test_neg_elbo_per_frame": {e: at.get(e) for e in epochs}})
    print(f"{'runner':<8} {'options':<22} {'seed':>4} " + " ".join(f"{e:>7}" for e in epochs)
          + "  cpu s/epoch")
    for r in rows:
        vals = " ".join(f"{v:>7.3f}" if v is not None else f"{'-':>7}"
                        for v in r["test_neg_elbo_per_frame"].values())
        sec = r["cpu_seconds_per_epoch"]
        print(f"{r['runner']:<8} {r['options']:<22} {r['seed']:>4} {vals}  "
              + (f"{sec:.2f}" if sec else "-"))
    if output:
        Path(output).write_text(json.dumps({"epochs": list(epochs), "rows": rows}, indent=1))
    return rows


def main(argv=None):
    from pyrossm.datasets import load_jsb_chorales
    from pyrossm.experiments.nonlinear import (
        JSB_DEFAULTS,
        PYRO_EXAMPLE_OPTIONS,
        build_jsb,
        default_data_dir,
    )
    from pyrossm.infer import TrainingDivergedError, fit, make_schedule

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget: stop after the pair of epochs that passes it")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-draws", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runners", default="pyro,pyrossm",
                        help="comma-separated subset of pyro,pyrossm")
    parser.add_argument("--pyrossm-options", choices=("pyro", "default"), default="pyro",
                        help="pyro: PYRO_EXAMPLE_OPTIONS; default: pyrossm's defaults")
    parser.add_argument("--encoder-cell", default=None,
                        help="override the pyrossm encoder cell (lstm, gru, rnn, relu)")
    parser.add_argument("--num-iafs", type=int, default=0, help="IAFs in the Pyro guide")
    parser.add_argument("--pyro-example", default=None,
                        help="path of Pyro's examples/dmm.py: also run it for --epochs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--checkpoint", default=None,
                        help="--runners pyro only: save Pyro's run (module, optimiser, RNG, "
                             "curve) to this file every --checkpoint-every epochs")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--resume", action="store_true",
                        help="continue the Pyro run saved in --checkpoint")
    parser.add_argument("--output", default=str(RESULTS / "dmm_vs_pyro.json"))
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="only print (and write to --output) the table of earlier results")
    args = parser.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, output=args.output)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    runners = args.runners.split(",")

    s = dict(JSB_DEFAULTS)
    if args.pyrossm_options == "pyro":
        s.update(PYRO_EXAMPLE_OPTIONS)
    if args.encoder_cell:
        s["encoder_cell"] = args.encoder_cell
    data_dir = args.data_dir or default_data_dir()
    splits = {k: load_jsb_chorales(k, data_dir) for k in ("train", "test")}
    train = (splits["train"].piano_rolls, splits["train"].lengths.long())
    test = (splits["test"].piano_rolls, splits["test"].lengths.long())
    per_epoch = math.ceil(len(train[1]) / s["batch_size"])

    curves = {name: {"epoch": [], "test_neg_elbo_per_frame": [], "train_neg_elbo_per_frame": [],
                     "cpu_seconds": [], "wall_seconds": []} for name in runners}
    payload = {
        "benchmark": "Pyro's DMM example (per-step program written after examples/dmm.py) vs "
                     "pyrossm, JSB chorales, alternating epochs in one process",
        "settings": {**s, "epochs": args.epochs, "seed": args.seed, "threads": args.threads,
                     "eval_draws": args.eval_draws, "eval_every": args.eval_every,
                     "pyrossm_options": args.pyrossm_options, "num_iafs": args.num_iafs,
                     "minutes": args.minutes},
        "torch": torch.__version__, "pyro": pyro.__version__, "machine": platform.machine(),
        "curves": curves,
    }

    def write():
        for c in curves.values():
            if c["cpu_seconds"]:
                c["cpu_seconds_per_epoch_mean"] = sum(c["cpu_seconds"]) / len(c["cpu_seconds"])
                c["wall_seconds_per_epoch_mean"] = sum(c["wall_seconds"]) / len(c["wall_seconds"])
        if all(curves[n]["cpu_seconds"] for n in ("pyro", "pyrossm") if n in curves) \
                and len(curves) == 2:
            payload["epoch_time_ratio_pyro_over_pyrossm_cpu"] = (
                curves["pyro"]["cpu_seconds_per_epoch_mean"]
                / curves["pyrossm"]["cpu_seconds_per_epoch_mean"])
            payload["epoch_time_ratio_pyro_over_pyrossm_wall"] = (
                curves["pyro"]["wall_seconds_per_epoch_mean"]
                / curves["pyrossm"]["wall_seconds_per_epoch_mean"])
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(payload, f, indent=1)

    peer = PyroRunner(s, train, args.seed, args.num_iafs) if "pyro" in runners else None
    t_start = time.perf_counter()

    def pyro_epoch(epoch):
        c = curves["pyro"]
        if "diverged_at_epoch" in c:
            return
        rng = torch.get_rng_state()
        torch.set_rng_state(peer.rng)
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            train_loss = peer.run_epoch()
        except ValueError as e:  # a NaN parameter fails Pyro's distribution validation
            c["diverged_at_epoch"], c["divergence"] = epoch, str(e).split("\n")[0][:300]
            print(f"pyro diverged at epoch {epoch}: {c['divergence']}", flush=True)
            torch.set_rng_state(rng)
            return
        c1, w1 = time.process_time(), time.perf_counter()
        c["cpu_seconds"].append(c1 - c0)
        c["wall_seconds"].append(w1 - w0)
        if epoch % args.eval_every == 0:
            try:
                score = peer.test_neg_elbo_per_frame(test, args.eval_draws)
            except ValueError as e:  # the last step left NaN parameters
                c["diverged_at_epoch"], c["divergence"] = epoch, str(e).split("\n")[0][:300]
                print(f"pyro diverged at epoch {epoch}: {c['divergence']}", flush=True)
                torch.set_rng_state(rng)
                return
            c["epoch"].append(epoch)
            c["test_neg_elbo_per_frame"].append(score)
            c["train_neg_elbo_per_frame"].append(train_loss)
        peer.rng = torch.get_rng_state()
        torch.set_rng_state(rng)

    def report(epoch):
        line = f"epoch {epoch}"
        for name, c in curves.items():
            if c["epoch"] and c["epoch"][-1] == epoch:
                line += (f" | {name} test -ELBO/frame {c['test_neg_elbo_per_frame'][-1]:.4f} "
                         f"cpu {c['cpu_seconds'][-1]:.2f}s")
        print(line, flush=True)

    if "pyrossm" in runners:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        model, guide = build_jsb("dmm_backward", s)
        clock = {"cpu": time.process_time(), "wall": time.perf_counter()}

        def callback(record):
            c = curves["pyrossm"]
            c["cpu_seconds"].append(time.process_time() - clock["cpu"])
            c["wall_seconds"].append(time.perf_counter() - clock["wall"])
            epoch = record["epoch"]
            if epoch % args.eval_every == 0:
                rng = torch.get_rng_state()
                c["epoch"].append(epoch)
                c["test_neg_elbo_per_frame"].append(
                    pyrossm_test_neg_elbo(model, guide, test, args.eval_draws))
                c["train_neg_elbo_per_frame"].append(record["train_neg_elbo_per_step"])
                torch.set_rng_state(rng)
            if peer is not None:
                pyro_epoch(epoch)
            report(epoch)
            write()
            clock.update(cpu=time.process_time(), wall=time.perf_counter())
            return (args.minutes is not None
                    and time.perf_counter() - t_start > 60.0 * args.minutes)

        annealing = make_schedule({"name": "linear", "start": s["min_annealing"],
                                   "num_steps": s["annealing_epochs"] * per_epoch})
        x, lengths = train
        try:
            _fit_pyrossm(fit, model, guide, x, lengths, s, annealing, args, callback)
        except TrainingDivergedError as e:
            curves["pyrossm"]["diverged_at_epoch"] = len(curves["pyrossm"]["cpu_seconds"]) + 1
            curves["pyrossm"]["divergence"] = str(e).split("\n")[0][:300]
            print(f"pyrossm diverged: {curves['pyrossm']['divergence']}", flush=True)
            if peer is not None:  # the peer goes on alone
                for epoch in range(len(curves["pyro"]["cpu_seconds"]) + 1, args.epochs + 1):
                    pyro_epoch(epoch)
                    report(epoch)
                    write()
                    if "diverged_at_epoch" in curves["pyro"]:
                        break
    else:
        first = 1
        if args.resume:
            first = _load_pyro_checkpoint(args.checkpoint, peer, curves) + 1
            print(f"resumed Pyro's run after epoch {first - 1}", flush=True)
        for epoch in range(first, args.epochs + 1):
            pyro_epoch(epoch)
            report(epoch)
            write()
            if args.checkpoint and (epoch % args.checkpoint_every == 0 or epoch == args.epochs):
                _save_pyro_checkpoint(args.checkpoint, peer, curves, epoch)
            spent = time.perf_counter() - t_start > 60.0 * (args.minutes or math.inf)
            if "diverged_at_epoch" in curves["pyro"] or spent:
                if args.checkpoint and "diverged_at_epoch" not in curves["pyro"]:
                    _save_pyro_checkpoint(args.checkpoint, peer, curves, epoch)
                break
    if args.pyro_example:
        payload["pyro_example"] = run_pyro_example(args.pyro_example, args.epochs, args.threads)
    write()
    ratio = payload.get("epoch_time_ratio_pyro_over_pyrossm_cpu")
    for name, c in curves.items():
        print(f"{name:<8} epochs {len(c['cpu_seconds'])} cpu s/epoch "
              f"{c.get('cpu_seconds_per_epoch_mean', float('nan')):.2f}")
    if ratio:
        print(f"epoch time Pyro / pyrossm (CPU seconds): {ratio:.2f}x")
    print(f"wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
