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
    # exact Kalman log-likelihood per step of the Nile flows, in their original units: pykalman
    # at the run's fitted parameters, on the standardised series, minus log(scale) per step
    from pykalman import KalmanFilter

    from pyrossm.app.runs import load_run
    from pyrossm.datasets import load_nile

    cfg, model, _, _ = load_run(run)
    stats = cfg["data"]["standardization"]
    flows = np.asarray(load_nile().flow, dtype=float).reshape(-1, 1)
    z = (flows - stats["mean"][0]) / stats["scale"][0]
    p = {k: v.detach().double().numpy() for k, v in model.matrices().items()}
    kf = KalmanFilter(transition_matrices=p["A"], observation_matrices=p["C"],
                      transition_covariance=p["Q"], observation_covariance=p["R"],
                      initial_state_mean=p["init_mean"], initial_state_covariance=p["init_cov"])
    oracle = (kf.loglikelihood(z) - len(z) * np.log(stats["scale"][0])) / len(z)
    assert metrics["exact_ll_per_step"] == pytest.approx(oracle, rel=1e-8)
    # and the MLE of this 1-state model is close to the local level's (-6.41 per step)
    assert -6.45 < metrics["exact_ll_per_step"] < -6.3
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


def test_lgssm_forecast_of_a_padded_file_starts_at_each_sequences_end(tmp_path):
    # Two series in one .npy; the second is 12 steps long and padded with NaN rows to 20.
    import torch

    from pyrossm.app.runs import load_run, standardize

    rng = np.random.default_rng(1)
    x = np.cumsum(rng.normal(size=(2, 20, 1)), axis=1)
    x[1, 12:] = np.nan
    path = tmp_path / "padded.npy"
    np.save(path, x)
    run = tmp_path / "run"
    assert main(["train", "--model", "lgssm", "--data", str(path), "--out", str(run),
                 "--state-dim", "1", "--epochs", "3"]) == 0
    out = tmp_path / "fc.csv"
    assert main(["forecast", "--run", str(run), "--data", str(path), "--horizon", "4",
                 "--num-samples", "10", "--out", str(out), "--plot", "none"]) == 0
    table = np.loadtxt(out, delimiter=",", skiprows=1)  # sequence, step, feature, mean, lo, hi
    cfg, model, _, _ = load_run(run)
    stats = cfg["data"]["standardization"]
    for b, length in ((0, 20), (1, 12)):
        prefix = torch.as_tensor(x[b : b + 1, :length])
        xs, _ = standardize(prefix, stats)
        with torch.no_grad():
            fc = model.forecast(xs.to(model.init_mean.dtype), 4, num_samples=0)
        expected = fc.mean[0, :, 0].double() * stats["scale"][0] + stats["mean"][0]
        got = table[table[:, 0] == b][:, 3]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6)
