"""Training the nonlinear models with pyrossm.infer.fit and every guide; evaluation; JSB; Kalman."""

import math
import os
from pathlib import Path

import pytest
import torch
from pyro import poutine

from pyrossm.experiments.synthetic import run_synthetic
from pyrossm.guides import FilteringLSTMGuide, StructuredGuide
from pyrossm.infer import elbo, fit, importance_log_weights, log_likelihood
from pyrossm.nonlinear import DeepMarkovModel, LSTMStateSpaceModel
from pyrossm.protocol import lengths_to_mask

OBS_DIM, Z_DIM, T = 3, 2, 12
GUIDES = ["filtering", "forward", "backward", "bidirectional"]
SMALL_LINEAR_TOLERANCE = 0.3  # nats/step, tiny run (untrained: ~2); the full run targets 0.05
FULL_LINEAR_TOLERANCE = 0.05


def make_guide(kind, obs_dim=OBS_DIM, z_dim=Z_DIM, hidden=8):
    if kind == "filtering":
        return FilteringLSTMGuide(obs_dim, z_dim, hidden_dim=hidden)
    return StructuredGuide(obs_dim, z_dim, hidden_dim=hidden, direction=kind)


def make_model(kind, emission="gaussian"):
    if kind == "dmm":
        return DeepMarkovModel(OBS_DIM, Z_DIM, transition_dim=8, emission_dim=8, emission=emission)
    return LSTMStateSpaceModel(OBS_DIM, Z_DIM, rnn_dim=8, emission=emission, emission_dim=8,
                               hidden_dim=8)


def toy_data(n=12):
    x = torch.cumsum(0.3 * torch.randn(n, T, OBS_DIM), dim=1)
    lengths = torch.randint(4, T + 1, (n,))
    mask = lengths_to_mask(lengths, T)
    return x.masked_fill(~mask.unsqueeze(-1), 0.0), mask


@pytest.mark.parametrize("guide_kind", GUIDES)
@pytest.mark.parametrize("model_kind", ["dmm", "lstm"])
def test_trains_with_fit_every_guide_and_annealing(model_kind, guide_kind):
    x, mask = toy_data()
    model, guide = make_model(model_kind), make_guide(guide_kind)
    before = [p.detach().clone() for p in model.parameters()]
    hist = fit(model, guide, (x, mask), epochs=2, batch_size=6, lr=1e-2, progress=False,
               annealing={"name": "linear", "start": 0.2, "num_steps": 2}, device="cpu")
    assert len(hist) == 2 and all(math.isfinite(v) for v in hist["train_neg_elbo_per_step"])
    assert hist["beta"][0] < 1.0 and hist["beta"][-1] == pytest.approx(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("emission", ["bernoulli", "categorical"])
def test_discrete_emissions_train(emission):
    x, mask = toy_data()
    if emission == "bernoulli":
        x = (x > 0).float()
    else:  # one-hot vectors, so the guides read them as ordinary vectors
        x = torch.nn.functional.one_hot(x.argmax(-1), OBS_DIM).float()
    model, guide = make_model("dmm", emission), make_guide("backward")
    hist = fit(model, guide, (x, mask), epochs=2, batch_size=6, lr=1e-2, progress=False,
               device="cpu")
    assert all(math.isfinite(v) for v in hist["train_neg_elbo_per_step"])


def _log_weight(model, guide, x, mask, z):
    """log p(x, z) - log q(z | x) per sequence for a given trajectory z."""
    gtr = poutine.trace(poutine.condition(guide, data={"z": z})).get_trace(x, mask)
    mtr = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x, mask)
    gtr.compute_log_prob()
    mtr.compute_log_prob()
    return mtr.nodes["z"]["log_prob"] + mtr.nodes["x"]["log_prob"] - gtr.nodes["z"]["log_prob"]


@pytest.mark.parametrize("guide_kind", GUIDES)
@pytest.mark.parametrize("model_kind", ["dmm", "lstm"])
def test_padding_never_changes_the_elbo(model_kind, guide_kind):
    """The ELBO integrand of padded sequences = that of each sequence alone; the padding's
    values never matter (for the model and every guide)."""
    x, mask = toy_data(4)
    model, guide = make_model(model_kind).double(), make_guide(guide_kind).double()
    x = x.double()
    z = guide(x, mask).detach()
    padded = _log_weight(model, guide, x, mask, z)
    for b in range(4):
        n = int(mask[b].sum())
        alone = _log_weight(model, guide, x[b:b + 1, :n], None, z[b:b + 1, :n])
        assert torch.allclose(alone, padded[b:b + 1], atol=1e-9)
    x2 = x.clone()
    x2[~mask] = 1e3
    torch.manual_seed(7)
    a = importance_log_weights(model, guide, (x, mask), num_samples=3, batch_size=4)
    torch.manual_seed(7)
    b = importance_log_weights(model, guide, (x2, mask), num_samples=3, batch_size=4)
    assert torch.allclose(a, b, atol=1e-9)


def test_iwae_at_least_elbo_on_average():
    x, mask = toy_data(16)
    model, guide = make_model("dmm"), make_guide("filtering")
    fit(model, guide, (x, mask), epochs=2, batch_size=8, lr=1e-2, progress=False, device="cpu")
    e = elbo(model, guide, (x, mask), num_samples=64)
    ll = log_likelihood(model, guide, (x, mask), num_samples=64)
    # E[IWAE_K] >= ELBO; the ELBO estimate averages 64 draws, so its s.e. is small
    weights = importance_log_weights(model, guide, (x, mask), num_samples=64)
    se = (weights.std(1) / 8).pow(2).sum().sqrt()
    assert ll.sum() > e.sum() - 3 * se
    assert ll.sum() > e.sum()  # typical gap is many standard errors


def test_forecast_with_structured_guide_continues_each_sequence():
    torch.manual_seed(0)
    length = 5
    # the real prefix sits at +3, what follows it in the full-length sequence at -3
    x = torch.full((1, T, OBS_DIM), 3.0)
    x[:, length:] = -3.0
    mask = lengths_to_mask(torch.tensor([length]), T)
    model, guide = make_model("dmm"), make_guide("backward")
    # a short fit on sequences that switch level, so that the latent state carries the level
    signs = torch.randn(32, 2, 1, 1).sign()
    levels = torch.where(torch.arange(T).view(1, T, 1) < length, 3 * signs[:, 0], 3 * signs[:, 1])
    train = levels.expand(32, T, OBS_DIM) + 0.3 * torch.randn(32, T, OBS_DIM)
    fit(model, guide, train, epochs=40, batch_size=16, lr=2e-2, progress=False, seed=0)
    # What lies in the padding does not matter, to the bit (same shapes: same random draws).
    clean = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    junk = x.masked_fill(~mask.unsqueeze(-1), 100.0)
    torch.manual_seed(1)
    a = model.forecast(clean, horizon=4, num_samples=6, guide=guide, mask=mask)
    torch.manual_seed(1)
    b = model.forecast(junk, horizon=4, num_samples=6, guide=guide, mask=mask)
    assert a.samples.shape == (6, 1, 4, OBS_DIM) and a.z.shape == (6, 1, 4, Z_DIM)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    # The padded forecast continues from step `length`: it has the distribution of the forecast
    # of the truncated sequence (Monte Carlo, 4,000 draws each, within 5 standard errors).
    n = 4000
    torch.manual_seed(2)
    padded = model.forecast(clean, horizon=4, num_samples=n, guide=guide, mask=mask).z
    torch.manual_seed(3)
    cut = model.forecast(clean[:, :length], horizon=4, num_samples=n, guide=guide).z
    se = ((padded.var(0) + cut.var(0)) / n).sqrt()
    assert ((padded.mean(0) - cut.mean(0)).abs() <= 5 * se + 1e-6).all()
    # ... and not from the padded end: the forecast of the full-length sequence differs.
    torch.manual_seed(4)
    full = model.forecast(x, horizon=4, num_samples=n, guide=guide).z
    se_full = ((padded.var(0) + full.var(0)) / n).sqrt()
    assert ((padded.mean(0) - full.mean(0)).abs() > 5 * se_full).any()


def _jsb_dir():
    env = os.environ.get("PYROSSM_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return path if (path / "jsb_chorales.pickle").is_file() else None


@pytest.mark.skipif(_jsb_dir() is None, reason="jsb_chorales.pickle not found in "
                    "$PYROSSM_DATA_DIR or <repo>/../shared/data")
def test_tiny_jsb_subset_trains_and_loss_falls():
    from pyrossm.datasets import load_jsb_chorales

    data = load_jsb_chorales("train", _jsb_dir())
    x, mask = data.piano_rolls[:16, :24], data.mask[:16, :24]
    model = DeepMarkovModel(88, z_dim=8, transition_dim=16, emission_dim=16,
                            emission="bernoulli")
    guide = StructuredGuide(88, 8, hidden_dim=16, direction="backward", missing_indicators=False)
    hist = fit(model, guide, (x, mask), epochs=12, batch_size=8, lr=1e-2, progress=False,
               device="cpu", seed=0)
    losses = hist["train_neg_elbo_per_step"]
    # 88 keys start near 88 * log 2 = 61 nats/frame; a model of key frequencies is ~10
    assert losses[0] > 30 and losses[-1] < 0.5 * losses[0]


def test_linear_system_iwae_close_to_kalman_small():
    """Small, fast version: held-out IWAE NLL per step near the exact Kalman NLL per step."""
    res = run_synthetic("linear", models=("dmm",), num_train=64, num_test=32, num_steps=20,
                        hidden=16, epochs=100, batch_size=16, lr=1e-2, iwae_samples=100)
    gap = res["results"]["dmm"]["gap_to_exact"]
    assert -0.05 < gap < SMALL_LINEAR_TOLERANCE  # IWAE NLL >= exact NLL up to MC error



@pytest.mark.slow
def test_linear_system_iwae_close_to_kalman_full():
    res = run_synthetic("linear", models=("dmm",), epochs=300)
    assert res["results"]["dmm"]["gap_to_exact"] < FULL_LINEAR_TOLERANCE


@pytest.mark.skipif(_jsb_dir() is None, reason="jsb_chorales.pickle not found in "
                    "$PYROSSM_DATA_DIR or <repo>/../shared/data")
def test_experiment_cli_jsb_smoke(tmp_path):
    from pyrossm.experiments.nonlinear import main

    out = tmp_path / "jsb.json"
    payload = main(["jsb", "--configs", "dmm_filtering", "--epochs", "1", "--z-dim", "2",
                    "--free-bits", "0.5",
                    "--transition-dim", "4", "--emission-dim", "4", "--rnn-dim", "4",
                    "--iwae-samples", "2", "--data-dir", str(_jsb_dir()), "--output", str(out)])
    r = payload["results"]["dmm_filtering"]
    assert out.is_file() and r["epochs_done"] == 1
    assert r["test"]["iwae_nll_per_frame"] <= r["test"]["neg_elbo_per_frame"] + 1.0
    assert r["test"]["frames"] == 4725  # JSB test split frames (77 chorales)
    assert len(r["test"]["kl_per_dimension"]) == 2 and 0 <= r["test"]["active_dims"] <= 2
    assert payload["settings"]["free_bits"] == 0.5
    assert payload["settings"]["free_bits_per"] == "dimension"


def test_experiment_cli_jsb_time_budget_pauses_and_resume_continues(tmp_path):
    from pyrossm.experiments.nonlinear import main

    args = ["jsb", "--configs", "dmm_backward", "--epochs", "2", "--z-dim", "2",
            "--transition-dim", "4", "--emission-dim", "4", "--rnn-dim", "4", "--iwae-samples",
            "2", "--data-dir", str(_jsb_dir()), "--checkpoint-dir", str(tmp_path / "ckpt")]
    first = main(args + ["--output", str(tmp_path / "a.json")])["results"]["dmm_backward"]
    assert first["epochs_done"] == 2 and first["stop_reason"] is None
    # a spent budget trains nothing (and still evaluates); more epochs continue the run
    paused = main(args[:4] + ["3"] + args[5:] + ["--resume", "--minutes", "0", "--output",
                                               str(tmp_path / "b.json")])
    r = paused["results"]["dmm_backward"]
    assert r["epochs_done"] == 2 and r["stop_reason"] == "max_seconds"
    assert r["test"]["neg_elbo_per_frame"] == pytest.approx(
        first["test"]["neg_elbo_per_frame"], rel=0.05)
    done = main(args[:4] + ["3"] + args[5:] + ["--resume", "--output", str(tmp_path / "c.json")])
    assert done["results"]["dmm_backward"]["epochs_done"] == 3


def test_experiment_cli_synthetic_smoke(tmp_path):
    from pyrossm.experiments.nonlinear import main

    out = tmp_path / "syn.json"
    payload = main(["synthetic", "--system", "pendulum", "--models", "lstm_ssm", "--epochs", "1",
                    "--iwae-samples", "2", "--num-train", "8", "--num-test", "4",
                    "--num-steps", "6", "--hidden", "4", "--lgssm-state-dims", "1",
                    "--output", str(out)])
    assert out.is_file()
    r = payload["results"]["lstm_ssm"]
    assert r["margin_over_lgssm"] == pytest.approx(
        payload["baseline"]["lgssm_mle"]["best_nll_per_frame"] - r["iwae_nll_per_frame"])


def test_build_jsb_encoder_cell():
    from torch import nn

    from pyrossm.experiments.nonlinear import build_jsb

    small = dict(z_dim=2, transition_dim=4, emission_dim=4, rnn_dim=4)
    _, guide = build_jsb("dmm_backward", {**small, "encoder_cell": "rnn"})
    assert any(isinstance(m, nn.RNN) for m in guide.modules())
    assert not any(isinstance(m, nn.LSTM) for m in guide.modules())
    _, guide = build_jsb("dmm_backward", small)
    assert any(isinstance(m, nn.LSTM) for m in guide.modules())
    with pytest.raises(ValueError, match="encoder_cell"):
        build_jsb("dmm_filtering", {**small, "encoder_cell": "gru"})
