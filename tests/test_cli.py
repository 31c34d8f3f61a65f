"""The pyrossm command line: help, train/evaluate/sample/forecast round trips, clean errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyrossm.app.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def user_npy(tmp_path_factory):
    rng = np.random.default_rng(0)
    z = np.cumsum(rng.normal(size=(6, 20, 1)), axis=1)
    x = np.concatenate([z, 0.5 * z + rng.normal(size=z.shape)], axis=-1)
    x[0, 3, 1] = np.nan  # a missing entry
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, x.astype("float32"))
    return path


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "sample", "forecast"])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{command} {action.option_strings} has no help text"


def test_lgssm_on_nile_train_evaluate_sample_forecast(tmp_path, capsys):
    run = tmp_path / "nile"
    assert main(["train", "--model", "lgssm", "--data", "nile", "--out", str(run),
                 "--epochs", "1", "--state-dim", "1"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # exact Kalman log-likelihood per step of the Nile flows, in their original units
    assert -7.0 < metrics["exact_ll_per_step"] < -6.2
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["exact_ll_per_step"] == pytest.approx(metrics["exact_ll_per_step"], rel=1e-9)

    assert main(["sample", "--run", str(run), "--steps", "15", "--num-samples", "7",
                 "--out", str(tmp_path / "s.npz")]) == 0
    s = np.load(tmp_path / "s.npz")
    assert s["x"].shape == (7, 15, 1) and s["z"].shape == (7, 15, 1)
    assert 300 < np.median(s["x"]) < 1600  # mapped back to the Nile's units
    assert (tmp_path / "s.png").is_file()

    out = tmp_path / "f.csv"
    assert main(["forecast", "--run", str(run), "--horizon", "4", "--out", str(out),
                 "--plot", "none"]) == 0
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    assert table.shape == (4, 6)  # sequence, step, feature, mean, lower, upper
    assert np.all(table[:, 4] < table[:, 3]) and np.all(table[:, 3] < table[:, 5])
    assert not (tmp_path / "f.png").exists()


def test_svi_model_on_user_file_with_missing_values(tmp_path, user_npy):
    run = tmp_path / "run"
    assert main(["train", "--model", "dmm", "--data", str(user_npy), "--out", str(run),
                 "--epochs", "2", "--hidden", "8", "--batch-size", "4", "--num-samples", "4",
                 "--no-progress"]) == 0
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["data"]["test_name"].startswith("held-out")
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["iwae_ll_per_step"]) and np.isfinite(metrics["elbo_per_step"])
    assert (run / "checkpoints").is_dir()
    # resume continues from the checkpoint written at the end of epoch 2
    assert main(["train", "--model", "dmm", "--data", str(user_npy), "--out", str(run),
                 "--epochs", "3", "--hidden", "8", "--batch-size", "4", "--num-samples", "4",
                 "--no-progress", "--resume"]) == 0
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history["records"]] == [1, 2, 3]
    assert main(["forecast", "--run", str(run), "--horizon", "3", "--num-samples", "5",
                 "--out", str(tmp_path / "f.npz")]) == 0
    f = np.load(tmp_path / "f.npz")
    assert f["samples"].shape == (5, 6, 3, 2) and f["mean"].shape == (6, 3, 2)


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "lgssm", "--data", "missing.csv"], "no such file"),
    (["train", "--model", "lgssm", "--data", "nile.xlsx"], "expected one of"),
    (["train", "--model", "seqvae", "--data", "nile"], "expected token data"),
    (["evaluate", "--run", "no-such-run"], "not a training run"),
    (["sample", "--run", "no-such-run", "--out", "s.npz", "--steps", "0"], "--steps"),
    (["train", "--model", "dmm", "--data", "nile", "--method", "svi", "--max-minutes", "-1"],
     "--max-minutes"),
])
def test_bad_input_exits_nonzero_without_traceback(argv, message, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "r")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_csv_through_the_module_entry_point(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\nx,3\n")
    proc = subprocess.run([sys.executable, "-m", "pyrossm", "train", "--model", "lgssm",
                           "--data", str(bad), "--out", str(tmp_path / "r")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "line 3" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "hmm", "--data", "nile", "--out", "x"])
    assert exit_info.value.code == 2
