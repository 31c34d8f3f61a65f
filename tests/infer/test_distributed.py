"""Data-parallel ``fit`` under torch.distributed (gloo, 2 CPU processes on 127.0.0.1).

The guide is a point mass ``q(z | x) = delta(net(x))`` so that the ELBO and its gradient are
deterministic functions of the parameters: 2-process training must then give the parameters of
single-process training on the same global batches up to float64 rounding (the only difference
is the order of the summation over a batch's sequences).
"""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from infer_toy import ToyModel, toy_problem
from pyro.nn import PyroModule

from pyrossm.infer import CheckpointManager, fit
from pyrossm.infer.data import SequenceDataset, as_dataset
from pyrossm.infer.distributed import global_batches, shard, wants_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-9  # float64; parameters after a few Adam steps, summation order differs
N, STEPS, BATCH, EPOCHS = 11, 5, 4, 3  # global batches 4, 4, 3: slices (2, 2), (2, 2), (2, 1)


class DeltaGuide(PyroModule):
    """q(z_t | x_t) = delta(net(x_t)): a deterministic, reparameterized guide."""

    def __init__(self, obs_dim=3, state_dim=2):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Linear(obs_dim, state_dim).double()

    def forward(self, x, mask=None):
        with pyro.plate("sequences", x.shape[0], dim=-1):
            q = dist.Delta(self.net(x), event_dim=1)
            if mask is not None:
                q = q.mask(mask)
            return pyro.sample("z", q.to_event(1))


def make_problem():
    """(model, guide, (x, lengths), val (x, lengths)): variable lengths, float64."""
    truth, x = toy_problem(num=N + 4, steps=STEPS)
    lengths = torch.tensor([5, 3, 4, 5, 2, 5, 1, 4, 5, 3, 5, 5, 2, 4, 3])
    model = ToyModel(truth.W.detach() * 0.5, sigma=1.0)
    return model, DeltaGuide(), (x[:N], lengths[:N]), (x[N:], lengths[N:])


def train(shuffle, epochs=EPOCHS, val=False, **kwargs):
    model, guide, data, val_data = make_problem()
    history = fit(model, guide, data, val_data=val_data if val else None, epochs=epochs,
                  batch_size=BATCH, lr=0.05, seed=3, shuffle=shuffle, device="cpu", **kwargs)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"guide.{k}": v for k, v in guide.state_dict().items()})
    return state, history


RUNNER = textwrap.dedent(
    """
    import datetime, json, os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from test_distributed import train

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    # fit joins the existing group (distributed=None: auto)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    res = {}
    state, h = train(shuffle=False, val=True, progress=True)
    res["noshuffle"] = (state, h.to_dict())
    state, h = train(shuffle=True, checkpoint_dir=os.path.join(out, "full"), progress=False)
    res["shuffle"] = (state, h.to_dict())
    train(shuffle=True, epochs=2, checkpoint_dir=os.path.join(out, "cut"), progress=False)
    state, h = train(shuffle=True, checkpoint_dir=os.path.join(out, "cut"), resume=True,
                     progress=False)
    res["resumed"] = (state, h.to_dict())
    # rank 0's clock decides: rank 1 alone would stop at once (and the ranks would deadlock)
    state, h = train(shuffle=True, max_seconds=1e9 if rank == 0 else 0, progress=False)
    res["budget_rank0_clock"] = (state, h.to_dict())
    state, h = train(shuffle=True, max_steps=5, progress=False)
    res["max_steps"] = (state, h.to_dict())
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # nobody tears down gloo (or rank 0's store) while the other still uses it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called...")
    """
)

# Failures of the launch itself, not of the code under test: a port taken between choosing and
# binding it, or gloo aborting a process at exit on a loaded machine. Retried once.
TRANSIENT = ("Address already in use", "EADDRINUSE",
             "terminate called without an active exception")
TIMEOUT = 600  # seconds for the 2-process run (about 20 s on an idle machine)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _untimed(history: dict) -> list:
    return [{k: v for k, v in r.items() if k not in ("seconds", "steps_per_second")}
            for r in history["records"]]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _launch(script, out):
    """Start RUNNER on 2 gloo processes; returns [(returncode, stderr)] per rank."""
    env_base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                    WORLD_SIZE="2", OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    procs = []
    for rank in range(2):
        env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-process run did not finish in {TIMEOUT} s")
    finally:
        for p in procs:  # never leave a rank behind (e.g. waiting for a peer that died)
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run RUNNER on 2 gloo processes; returns (results of rank 0, of rank 1, stderr, dir)."""
    t0 = time.perf_counter()
    for attempt in range(2):
        out = tmp_path_factory.mktemp("ddp")
        script = out / "runner.py"
        script.write_text(RUNNER)
        results = _launch(script, out)
        failed = [(rc, err) for rc, err in results if rc != 0]
        # one rank's abort makes its peer fail too, with another message: any rank will do
        transient = any(t in err for _, err in failed for t in TRANSIENT)
        if not failed or not transient or attempt == 1:
            break
        print(f"2-process run: transient launch failure, retrying: {failed[0][1][-500:]}")
    for rc, err in results:
        assert rc == 0, err[-3000:]
    print(f"2-process runs: {time.perf_counter() - t0:.1f}s")
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2))
    return r0, r1, [err for _, err in results], out


def test_global_batches_are_shared_and_sharded():
    data = as_dataset(torch.zeros(N, STEPS, 1))
    a = global_batches(data, BATCH, epoch=2, shuffle_seed=7)
    b = global_batches(data, BATCH, epoch=2, shuffle_seed=7)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in
                   zip(a, global_batches(data, BATCH, epoch=3, shuffle_seed=7), strict=True))
    for batch in a:  # the slices of the ranks partition the global batch, in order
        assert torch.equal(torch.cat([shard(batch, r, 3) for r in range(3)]), batch)
    assert [len(shard(torch.arange(1), r, 2)) for r in range(2)] == [1, 0]


def test_wants_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not wants_distributed(None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert wants_distributed(None)
    assert not wants_distributed(False)
    with pytest.raises(TypeError, match="distributed"):
        wants_distributed("yes")


def test_distributed_without_launcher_names_the_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    model, guide, data, _ = make_problem()
    with pytest.raises(ValueError, match="torchrun"):
        fit(model, guide, data, epochs=1, batch_size=4, lr=0.1, device="cpu",
            distributed=True, progress=False)


def test_two_processes_equal_single_process(two_ranks):
    r0, r1, _, _ = two_ranks
    reference, ref_hist = train(shuffle=False, val=True, progress=False)  # plain fit
    for key in r0:  # replicas stay identical
        assert _max_diff(r0[key][0], r1[key][0]) == 0.0, key
        assert _untimed(r0[key][1]) == _untimed(r1[key][1]), key
    diff = _max_diff(r0["noshuffle"][0], reference)
    print(f"max |theta_2proc - theta_1proc| = {diff:.3g}")
    assert diff < TOL
    moved = _max_diff(make_problem_state(), reference)
    assert moved > 100 * TOL  # training did change the parameters
    ddp = r0["noshuffle"][1]["records"]
    for rec, ref in zip(ddp, ref_hist.records, strict=True):
        for k in ("train_neg_elbo", "train_neg_elbo_per_step", "val_neg_elbo",
                  "val_neg_elbo_per_step", "train_kl"):
            assert rec[k] == pytest.approx(ref[k], rel=1e-10, abs=1e-10), k


def make_problem_state():
    model, guide, _, _ = make_problem()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"guide.{k}": v for k, v in guide.state_dict().items()})
    return state


def test_shuffled_two_processes_equal_one_process_group(two_ranks, monkeypatch):
    """Shuffled: the same global batches as a 1-process group with the same seed."""
    r0, _, _, _ = two_ranks
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    reference, _ = train(shuffle=True, distributed=True, progress=False)
    assert not torch.distributed.is_initialized()  # fit destroyed the group it created
    assert _max_diff(r0["shuffle"][0], reference) < TOL


def test_resume_equals_uninterrupted_and_rank0_writes(two_ranks):
    r0, r1, errs, out = two_ranks
    assert _max_diff(r0["resumed"][0], r0["shuffle"][0]) < TOL
    assert _max_diff(r1["resumed"][0], r1["shuffle"][0]) < TOL
    assert [len(r["records"]) for r in (r0["resumed"][1], r0["shuffle"][1])] == [EPOCHS] * 2
    # only rank 0 prints the epoch lines; the checkpoints carry every rank's RNG state
    assert "epoch 1:" in errs[0] and "epoch 1:" not in errs[1]
    path, state = CheckpointManager(out / "full").latest()
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert state["epoch"] == EPOCHS


def test_budgets_are_decided_together(two_ranks):
    r0, r1, _, _ = two_ranks
    for r in (r0, r1):
        assert _max_diff(r["budget_rank0_clock"][0], r["shuffle"][0]) < TOL
        assert r["budget_rank0_clock"][1]["stop_reason"] is None
        h = r["max_steps"][1]
        assert h["stop_reason"] == "max_steps"
        assert [rec["batches"] for rec in h["records"]] == [3, 2]


def test_single_process_unchanged_by_world_size_one_dataset():
    # the distributed helpers do not alter the dataset: slices of a (x, lengths) dataset keep
    # their masks
    _, _, data, _ = make_problem()
    ds = as_dataset(data)
    part = SequenceDataset(*ds.batch(shard(torch.arange(N), 1, 2), trim=False))
    assert part.num_steps.sum() == ds.num_steps[shard(torch.arange(N), 1, 2)].sum()


TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    from test_distributed import train

    state, _ = train(shuffle=False, progress=False)   # fit sees WORLD_SIZE=2 and sets up gloo
    torch.save(state, os.path.join(sys.argv[1], f"torchrun{os.environ['RANK']}.pt"))
    """
)


@pytest.mark.slow
def test_torchrun_launch(tmp_path):
    """The README's launcher: `torchrun --nproc_per_node=2 script.py`, fit creating the group."""
    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"torchrun{r}.pt") for r in range(2)]
    reference, _ = train(shuffle=False, progress=False)
    assert _max_diff(states[0], states[1]) == 0.0
    assert _max_diff(states[0], reference) < TOL
