"""Kill a training process mid-epoch (SIGKILL / SIGTERM), resume, compare with an uninterrupted run.

The killed run loses at most the epoch in progress: resuming from the last checkpoint gives the
same losses and parameters as a run that was never interrupted (CPU, same seed).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from infer_toy import ToyGuide, ToyModel, toy_problem

from pyrossm.infer import CheckpointManager, fit, load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-6
EPOCHS, BATCHES_PER_EPOCH = 4, 3

RUNNER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from infer_toy import ToyGuide, ToyModel, toy_problem
    from pyrossm.infer import fit

    ckpt, kill_call, signame, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    model, x = toy_problem(num=12, steps=5)
    model = ToyModel(model.W.detach() * 0.3, sigma=1.0)
    guide = ToyGuide(3, 2)
    calls = [0]

    def maybe_die(module, args):
        calls[0] += 1
        if calls[0] == kill_call:
            os.kill(os.getpid(), getattr(signal, signame))

    model.register_forward_pre_hook(maybe_die)
    hist = fit(model, guide, x, epochs=%d, batch_size=4, lr=0.05, num_particles=2,
               annealing="linear", progress=False, device="cpu", seed=11,
               checkpoint_dir=ckpt, resume=resume == "resume")
    print(json.dumps({"loss": hist["train_loss"], "W": model.W.tolist()}))
    """
    % EPOCHS
)


def _run(tmp_path, kill_call, signame, resume):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt"), str(kill_call), signame, resume],
        capture_output=True, text=True, env=env, timeout=300,
    )


def _straight():
    torch.manual_seed(0)
    model, x = toy_problem(num=12, steps=5)
    model = ToyModel(model.W.detach() * 0.3, sigma=1.0)
    guide = ToyGuide(3, 2)
    return model, guide, x


KW = dict(epochs=EPOCHS, batch_size=4, lr=0.05, num_particles=2, annealing="linear",
          progress=False, device="cpu", seed=11)


@pytest.mark.parametrize(
    "signame, resume_in_subprocess",
    [("SIGKILL", False), pytest.param("SIGTERM", True, marks=pytest.mark.slow)],
)
def test_killed_run_resumes_like_an_uninterrupted_one(tmp_path, signame, resume_in_subprocess):
    model, guide, x = _straight()
    straight = fit(model, guide, x, **KW)

    # die in the middle of epoch 3 (its second batch): epochs 1-2 are checkpointed
    kill_call = 2 * BATCHES_PER_EPOCH + 2
    killed = _run(tmp_path, kill_call, signame, "fresh")
    assert killed.returncode == -getattr(signal, signame), killed.stderr
    mgr = CheckpointManager(tmp_path / "ckpt")
    assert load_checkpoint(mgr.paths()[-1])["epoch"] == 2
    assert not [f for f in os.listdir(tmp_path / "ckpt") if f.startswith(".tmp")]

    if resume_in_subprocess:
        resumed = _run(tmp_path, -1, signame, "resume")
        assert resumed.returncode == 0, resumed.stderr
        out = json.loads(resumed.stdout.strip().splitlines()[-1])
        losses, W = out["loss"], torch.tensor(out["W"], dtype=torch.float64)
    else:
        model2, guide2, x2 = _straight()
        hist = fit(model2, guide2, x2, checkpoint_dir=tmp_path / "ckpt", resume=True, **KW)
        losses, W = hist["train_loss"], model2.W.detach()
    assert len(losses) == EPOCHS
    assert max(abs(a - b) for a, b in zip(losses, straight["train_loss"], strict=True)) < TOL
    assert torch.allclose(W, model.W.detach(), atol=TOL)
