"""JSB / Pyro-DMM comparison pieces: Pyro's example's options in pyrossm, and the per-step Pyro
program of benchmarks/dmm_vs_pyro.py defining the very same model and guide."""

import importlib.util
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

from pyrossm.experiments.nonlinear import JSB_DEFAULTS, PYRO_EXAMPLE_OPTIONS, build_jsb
from pyrossm.guides.encoders import RecurrentEncoder
from pyrossm.nonlinear.networks import BernoulliEmission, GatedTransition

ATOL = 1e-10  # float64 agreement of two programs computing the same sums
SMALL = dict(z_dim=3, transition_dim=5, emission_dim=4, rnn_dim=6)
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "dmm_vs_pyro.py"


@pytest.fixture(autouse=True)
def _fresh():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def _bench():
    spec = importlib.util.spec_from_file_location("dmm_vs_pyro", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 5, 3, 6])
    mask = torch.arange(7) < lengths[:, None]
    x = (torch.rand(4, 7, 88, generator=g, dtype=torch.float64) < 0.2).double()
    return x * mask[..., None], mask, lengths


def test_relu_cell_is_the_plain_relu_recursion():
    enc = RecurrentEncoder(3, 4, cell="relu", missing_indicators=False).double()
    with torch.no_grad():
        enc.h0.normal_()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    rnn = enc.rnn
    h, out = enc.h0[0].expand(2, -1), []
    for t in range(5):  # h_t = relu(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
        h = torch.relu(x[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0
                       + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0)
        out.append(h)
    torch.testing.assert_close(enc(x), torch.stack(out, 1), atol=ATOL, rtol=0)
    assert (enc(x) >= 0).all()


def test_bernoulli_probs_equals_logits_and_saturates_like_pyro():
    e = BernoulliEmission(2, 3, 4).double()
    z = torch.randn(6, 2, dtype=torch.float64)
    x = torch.bernoulli(torch.full((6, 3), 0.5, dtype=torch.float64))
    by_logits = e(z).log_prob(x)
    e.parameterization = "probs"
    torch.testing.assert_close(e(z).log_prob(x), by_logits, atol=1e-9, rtol=0)
    # A logit far beyond the clamp gets no gradient by probabilities, some by logits.
    a = torch.tensor(-40.0, requires_grad=True)
    grad_probs, = torch.autograd.grad(
        pyro.distributions.Bernoulli(probs=torch.sigmoid(a)).log_prob(torch.tensor(1.0)), a)
    grad_logits, = torch.autograd.grad(
        pyro.distributions.Bernoulli(logits=a).log_prob(torch.tensor(1.0)), a)
    assert grad_probs == 0 and grad_logits > 0.99
    with pytest.raises(ValueError, match="parameterization"):
        BernoulliEmission(2, 3, 4, parameterization="probits")


def test_transition_scale_floor():
    t = GatedTransition(2, 4, scale_floor=0.0)
    with torch.no_grad():
        t.scale.bias.fill_(-200.0)  # softplus underflows: the scale is the floor
        t.scale.weight.zero_()
    with torch.no_grad():
        assert float(t(torch.zeros(1, 2))[1].max()) == 0.0
        t.scale_floor = 0.5
        assert float(t(torch.zeros(1, 2))[1].min()) == 0.5
    with pytest.raises(ValueError, match="scale_floor"):
        GatedTransition(2, 4, scale_floor=-1.0)


def test_build_jsb_options():
    model, guide = build_jsb("dmm_backward", SMALL)
    assert model.emitter.parameterization == "logits"
    assert model.dynamics.transition.scale_floor == JSB_DEFAULTS["transition_scale_floor"]
    assert guide.combiner.hidden_to_scale.floor == JSB_DEFAULTS["guide_scale_floor"]
    model, guide = build_jsb("dmm_backward", {**SMALL, **PYRO_EXAMPLE_OPTIONS})
    assert model.dynamics.transition.scale_floor == 0.0
    assert guide.combiner.hidden_to_scale.floor == 0.0
    assert guide.encoders[0].rnn.nonlinearity == "relu"
    with pytest.raises(ValueError, match="bernoulli"):
        build_jsb("dmm_backward", {**SMALL, "bernoulli": "probit"})
    with pytest.raises(ValueError, match="guide_scale_floor"):
        build_jsb("dmm_backward", {**SMALL, "guide_scale_floor": -1e-3})
    _, guide = build_jsb("dmm_backward", {**SMALL, "num_iafs": 2, "iaf_dim": 5})
    assert type(guide).__name__ == "IAFGuide" and len(guide.flows) == 2
    with pytest.raises(ValueError, match="num_iafs"):
        build_jsb("dmm_filtering", {**SMALL, "num_iafs": 1})


def test_pyro_program_is_the_same_model_and_guide():
    """With Pyro's options, pyrossm's pair and the per-step Pyro program of the benchmark give the
    same log p(x, z), log q(z | x) and gradients at the same z (float64, to rounding)."""
    bench = _bench()
    model, guide = build_jsb("dmm_backward", {**SMALL, **PYRO_EXAMPLE_OPTIONS})
    model, guide = model.double(), guide.double()
    peer = bench.PyroDMM(88, 3, 4, 5, 6).double().load_pyrossm(model, guide)
    x, mask, lengths = _batch()
    z = guide(x, mask).detach()
    steps = {f"z_{t + 1}": z[:, t] for t in range(x.shape[1])}
    for beta in (1.0, 0.3):
        lp = poutine.trace(poutine.condition(peer.model, steps)).get_trace(x, mask, lengths, beta)
        lq = poutine.trace(poutine.condition(peer.guide, steps)).get_trace(x, mask, lengths, beta)
        peer_loss = lq.log_prob_sum() - lp.log_prob_sum()
        mp = poutine.trace(poutine.condition(model.model, {"z": z})).get_trace(x, mask)
        mq = poutine.trace(poutine.condition(guide, {"z": z})).get_trace(x, mask)
        # the annealing factor scales the z sites of both programs alike
        log_joint = mp.log_prob_sum()
        obs = mp.nodes["x"]["log_prob_sum"]
        loss = beta * (mq.log_prob_sum() - (log_joint - obs)) - obs
        torch.testing.assert_close(loss, peer_loss, atol=ATOL, rtol=0)
    ours = [model.emitter.logits_net[0].weight, model.dynamics.transition.scale.weight,
            guide.encoders[0].rnn.weight_hh_l0, guide.combiner.hidden_to_scale.diag.weight,
            guide.encoders[0].h0, guide.combiner.z0]
    theirs = [peer.emitter.hidden1.weight, peer.trans.scale.weight, peer.rnn.weight_hh_l0,
              peer.combiner.to_scale.weight, peer.h_0, peer.z_q_0]
    for a, b in zip(torch.autograd.grad(loss, ours), torch.autograd.grad(peer_loss, theirs)):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b.view_as(a), atol=ATOL, rtol=0)


def test_annealing_factor_and_example_log_parser():
    bench = _bench()
    assert bench.annealing_factor(0, 0, 12, 1000, 0.2) == pytest.approx(0.2 + 0.8 / 12000)
    assert bench.annealing_factor(1000, 0, 12, 1000, 0.2) == 1.0
    log = ("[training epoch 0000]  21.3000 \t\t\t\t(dt = 7.012 sec)\n"
           "[training epoch 0001]  14.1000 \t\t\t\t(dt = 6.988 sec)\n"
           "[val/test epoch 0050]  11.7000  11.6500\n")
    seconds, tests = bench.parse_example_log(log)
    assert seconds == [7.012, 6.988] and tests == {50: 11.65}
    assert math.isfinite(sum(seconds))


def _jsb_dir():
    from pyrossm.experiments.nonlinear import default_data_dir

    path = default_data_dir()
    return path if path and (Path(path) / "jsb_chorales.pickle").is_file() else None


@pytest.mark.skipif(_jsb_dir() is None, reason="jsb_chorales.pickle not found (PYROSSM_DATA_DIR)")
def test_cli_match_pyro_test_curve_survives_resume(tmp_path):
    from pyrossm.experiments.nonlinear import main

    args = ["jsb", "--configs", "dmm_backward", "--epochs", "2", "--z-dim", "2",
            "--transition-dim", "4", "--emission-dim", "4", "--rnn-dim", "4", "--iwae-samples",
            "2", "--match-pyro", "--guide-scale-floor", "1e-4", "--eval-every", "1",
            "--curve-draws", "1", "--data-dir", _jsb_dir(),
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    first = main(args + ["--resume", "--output", str(tmp_path / "a.json")])  # nothing to resume
    settings = first["settings"]
    assert settings["encoder_cell"] == "relu" and settings["bernoulli"] == "probs"
    assert settings["transition_scale_floor"] == 0.0 and settings["guide_scale_floor"] == 1e-4
    curve = first["results"]["dmm_backward"]["test_curve"]
    assert curve["epoch"] == [1, 2] and all(math.isfinite(v) for v in curve["neg_elbo_per_frame"])
    done = main(args[:4] + ["3"] + args[5:] + ["--resume", "--output", str(tmp_path / "b.json")])
    resumed = done["results"]["dmm_backward"]["test_curve"]
    assert resumed["epoch"] == [1, 2, 3]
    assert resumed["neg_elbo_per_frame"][:2] == curve["neg_elbo_per_frame"]
