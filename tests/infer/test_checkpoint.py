"""Checkpoints: atomic writes, checksums, fallback to the previous file, exact resume, NaN stop."""

import math
import os

import pytest
import torch
from infer_toy import ToyGuide, ToyModel, toy_problem

from pyrossm.infer import (
    CheckpointError,
    CheckpointManager,
    TrainingDivergedError,
    fit,
    load_checkpoint,
    save_checkpoint,
)

RESUME_TOL = 1e-6


def _fresh(seed=0):
    torch.manual_seed(seed)
    model, x = toy_problem(num=12, steps=5)
    model = ToyModel(model.W.detach() * 0.3, sigma=1.0)
    return model, ToyGuide(3, 2), x


KW = dict(batch_size=4, lr=0.05, num_particles=2, annealing="linear", progress=False,
          device="cpu", seed=11, lr_decay=0.999)


def test_save_load_roundtrip(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", {"x": torch.arange(3), "n": 2, "s": "ok"})
    out = load_checkpoint(path)
    assert torch.equal(out["x"], torch.arange(3)) and out["n"] == 2 and out["s"] == "ok"
    assert os.listdir(tmp_path) == ["a.pt"]  # no temporary file left


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
def test_corruption_is_detected(tmp_path, damage):
    path = save_checkpoint(tmp_path / "a.pt", {"w": torch.randn(100)})
    raw = bytearray(open(path, "rb").read())
    if damage == "flip":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "header":
        raw[:5] = b"XXXXX"
    else:
        raw = bytearray()
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match="a.pt"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"v": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["v"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


def test_manager_keeps_two_and_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for e in (1, 2, 3):
        mgr.save({"epoch": e}, e)
    assert [os.path.basename(p) for p in mgr.paths()] == ["checkpoint-000002.pt",
                                                          "checkpoint-000003.pt"]
    with open(mgr.path(3), "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        path, state = mgr.latest()
    assert state["epoch"] == 2 and path == mgr.path(2)
    assert os.path.exists(mgr.path(3))  # kept for inspection


def test_resume_equals_uninterrupted_run(tmp_path):
    model, guide, x = _fresh()
    straight = fit(model, guide, x, val_data=x[:4], epochs=4, **KW)
    w_straight = model.W.detach().clone()

    model, guide, x = _fresh()

    def interrupt(record):
        if record["epoch"] == 3:  # before epoch 3's checkpoint is written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model, guide, x, val_data=x[:4], epochs=4, checkpoint_dir=tmp_path,
            callbacks=[interrupt], **KW)
    assert load_checkpoint(CheckpointManager(tmp_path).paths()[-1])["epoch"] == 2
    model, guide, x = _fresh(seed=99)  # new objects; everything must come from the checkpoint
    resumed = fit(model, guide, x, val_data=x[:4], epochs=4, checkpoint_dir=tmp_path,
                  resume=True, **{**KW, "seed": 12345})
    assert len(resumed) == 4
    for key in ("train_loss", "train_neg_elbo", "train_kl", "val_neg_elbo", "beta", "lr"):
        a, b = straight[key], resumed[key]
        assert max(abs(u - v) for u, v in zip(a, b, strict=True)) < RESUME_TOL, key
    assert torch.allclose(model.W, w_straight, atol=RESUME_TOL, rtol=0)


def test_resume_skips_corrupt_newest_checkpoint(tmp_path):
    model, guide, x = _fresh()
    fit(model, guide, x, epochs=3, checkpoint_dir=tmp_path, **KW)
    mgr = CheckpointManager(tmp_path)
    with open(mgr.path(3), "r+b") as f:
        f.truncate(100)
    model, guide, x = _fresh()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        hist = fit(model, guide, x, epochs=3, checkpoint_dir=tmp_path, resume=True, **KW)
    assert [r["epoch"] for r in hist.records] == [1, 2, 3]
    assert load_checkpoint(mgr.path(3))["epoch"] == 3  # rewritten, valid again


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    model, guide, x = _fresh()
    hist = fit(model, guide, x, epochs=1, checkpoint_dir=tmp_path / "new", resume=True, **KW)
    assert len(hist) == 1 and (tmp_path / "new" / "checkpoint-000001.pt").exists()


def test_nan_stops_with_diagnostic_and_keeps_checkpoint(tmp_path):
    model, guide, x = _fresh()
    # 3 batches per epoch; forward call 8 = epoch 3, batch 1 (validation is off)
    model.poison_calls = {8}
    with pytest.raises(TrainingDivergedError) as info:
        fit(model, guide, x, epochs=5, checkpoint_dir=tmp_path, **KW)
    err = info.value
    assert err.epoch == 3 and err.batch == 1 and "model:x" in err.sites
    assert "epoch 3" in str(err) and "batch 1" in str(err) and "model:x" in str(err)
    mgr = CheckpointManager(tmp_path)
    assert err.checkpoint == mgr.path(2)
    assert load_checkpoint(mgr.path(2))["epoch"] == 2
    assert len(mgr.paths()) == 2  # epochs 1 and 2, untouched


def test_nan_skip_takes_no_step_for_that_batch(tmp_path):
    model, guide, x = _fresh()
    model.poison_calls = {2}  # epoch 1, batch 1
    hist = fit(model, guide, x, epochs=2, on_nan="skip", checkpoint_dir=tmp_path, **KW)
    assert hist["skipped_batches"] == [1, 0]
    assert all(math.isfinite(v) for v in hist["train_neg_elbo"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = load_checkpoint(CheckpointManager(tmp_path).path(2))
    # 2 epochs x 3 batches, one skipped: every parameter took exactly 5 Adam steps
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {5}
    assert state["global_step"] == 6


def test_nan_parameter_rejected_by_distribution_is_reported_as_divergence(tmp_path):
    model, guide, x = _fresh()
    calls = [0]

    def poison_guide(module, args):
        calls[0] += 1
        if calls[0] == 4:  # epoch 2, batch 0: a NaN guide parameter
            with torch.no_grad():
                module.net.bias.fill_(float("nan"))

    guide.register_forward_pre_hook(poison_guide)
    with pytest.raises(TrainingDivergedError, match="epoch 2, batch 0") as info:
        fit(model, guide, x, epochs=3, checkpoint_dir=tmp_path, **KW)
    assert "rejected its arguments" in str(info.value)
    assert "guide.net.bias" in str(info.value)
    assert info.value.checkpoint == CheckpointManager(tmp_path).path(1)
