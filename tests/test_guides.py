"""Tests of the guides in :mod:`pyrossm.guides` (shapes, masks, missing data, directions)."""

import math

import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import site_is_subsample

from pyrossm.distributions import AutoregressiveGaussianSequence, DiagonalGaussianSequence
from pyrossm.guides import FilteringLSTMGuide, RecurrentEncoder, StructuredGuide
from pyrossm.guides.encoders import reverse_padded

EXACT = dict(rtol=1e-9, atol=1e-9)
K_SE = 4.0
OBS, STATE, HID = 3, 2, 6

GUIDE_CONFIGS = [
    ("filtering", dict(cell="lstm")),
    ("filtering", dict(cell="gru", num_layers=2)),
    ("structured", dict(direction="backward", combiner="nonlinear", cell="lstm")),
    ("structured", dict(direction="forward", combiner="nonlinear", cell="rnn")),
    ("structured", dict(direction="bidirectional", combiner="nonlinear", cell="gru", num_layers=2)),
    ("structured", dict(direction="backward", combiner="linear", cell="linear")),
    ("structured", dict(direction="bidirectional", combiner="linear", cell="lstm", scale="diag")),
    ("structured", dict(direction="forward", combiner="nonlinear", cell="linear", scale="tril")),
]


def _make(kind, kwargs):
    cls = FilteringLSTMGuide if kind == "filtering" else StructuredGuide
    return cls(OBS, STATE, hidden_dim=HID, **kwargs).double()


def _ids(configs):
    return [f"{k}-" + "-".join(str(v) for v in kw.values()) for k, kw in configs]


@pytest.mark.parametrize("kind,kwargs", GUIDE_CONFIGS, ids=_ids(GUIDE_CONFIGS))
def test_guide_site_shapes(kind, kwargs):
    guide = _make(kind, kwargs)
    x = torch.randn(4, 7, OBS, dtype=torch.float64)
    trace = poutine.trace(guide).get_trace(x)
    sites = [
        n for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
    ]
    assert sites == ["z"]
    site = trace.nodes["z"]
    assert site["fn"].batch_shape == (4,) and site["fn"].event_shape == (7, STATE)
    assert site["value"].shape == (4, 7, STATE) and site["fn"].has_rsample
    assert [f.name for f in site["cond_indep_stack"]] == ["sequences"]
    assert site["cond_indep_stack"][0].dim == -1 and site["cond_indep_stack"][0].size == 4
    trace.compute_log_prob()
    assert site["log_prob"].shape == (4,) and torch.isfinite(site["log_prob"]).all()
    # every parameter of the guide is registered with Pyro (so that SVI trains it)
    params = {n for n, s in trace.nodes.items() if s["type"] == "param"}
    assert len(params) == len(list(guide.parameters()))


@pytest.mark.parametrize("kind,kwargs", GUIDE_CONFIGS, ids=_ids(GUIDE_CONFIGS))
def test_padding_never_changes_log_q(kind, kwargs):
    """log q(z) of a right-padded row equals log q of the unpadded sequence, whatever the pad."""
    guide = _make(kind, kwargs)
    T, L = 8, 5
    x = torch.randn(2, T, OBS, dtype=torch.float64)
    x[1, L:] = 1e3  # garbage padding
    x[1, L + 1] = float("nan")
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, L:] = False
    q = guide.distribution(x, mask)
    z = q.rsample()
    q_short = guide.distribution(x[1:, :L])
    torch.testing.assert_close(q.log_prob(z)[1:], q_short.log_prob(z[1:, :L]), **EXACT)
    q_full_row0 = guide.distribution(x[:1])
    torch.testing.assert_close(q.log_prob(z)[:1], q_full_row0.log_prob(z[:1]), **EXACT)


@pytest.mark.parametrize("kind,kwargs", GUIDE_CONFIGS[:6], ids=_ids(GUIDE_CONFIGS[:6]))
def test_missing_values_give_finite_log_q_and_gradients(kind, kwargs):
    guide = _make(kind, kwargs)
    x = torch.randn(3, 6, OBS, dtype=torch.float64)
    x[0, 2, 1] = float("nan")  # one entry
    x[1, 3] = float("nan")  # a whole step
    q = guide.distribution(x)
    z = q.rsample()
    loss = -q.log_prob(z).sum() + z.pow(2).sum()
    loss.backward()
    assert torch.isfinite(loss)
    for p in guide.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # the missing entry is not read as 0: changing the indicator changes q
    x_zero = x.clone()
    x_zero[0, 2, 1] = 0.0
    assert not torch.allclose(guide.distribution(x_zero).log_prob(z)[0], q.log_prob(z)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "linear"])
def test_encoder_direction_conditioning_sets(cell):
    """Backward h_t depends on x_{t:T} only; forward h_t on x_{1:t} only."""
    T = 6
    x = torch.randn(2, T, OBS, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 2] += 1.0  # perturb step 3 (index 2)
    bwd = RecurrentEncoder(OBS, HID, cell=cell, reverse=True).double()
    fwd = RecurrentEncoder(OBS, HID, cell=cell, reverse=False).double()
    torch.nn.init.normal_(bwd.h0)
    hb, hb2 = bwd(x), bwd(x2)
    hf, hf2 = fwd(x), fwd(x2)
    torch.testing.assert_close(hb[:, 3:], hb2[:, 3:], **EXACT)
    assert not torch.allclose(hb[:, :3], hb2[:, :3])
    torch.testing.assert_close(hf[:, :2], hf2[:, :2], **EXACT)
    assert not torch.allclose(hf[:, 2:], hf2[:, 2:])


def test_learned_initial_states_receive_gradients():
    guide = StructuredGuide(OBS, STATE, hidden_dim=HID, direction="bidirectional", cell="lstm")
    q = guide.distribution(torch.randn(2, 5, OBS))
    q.log_prob(q.rsample()).sum().backward()
    for enc in guide.encoders:
        assert enc.h0.grad.abs().sum() > 0 and enc.c0.grad.abs().sum() > 0
    assert guide.combiner.z0.grad.abs().sum() > 0


def test_reverse_padded_is_an_involution():
    x = torch.randn(3, 7, 2)
    mask = torch.arange(7) < torch.tensor([[7], [4], [1]])
    torch.testing.assert_close(reverse_padded(reverse_padded(x, mask), mask), x)
    torch.testing.assert_close(reverse_padded(x, mask)[1, :4], x[1, :4].flip(0))
    torch.testing.assert_close(reverse_padded(x, mask)[1, 4:], x[1, 4:])


def test_filtering_posterior_stats_are_the_distribution_moments():
    guide = _make("filtering", dict(cell="lstm"))
    x = torch.randn(2, 5, OBS, dtype=torch.float64)
    stats = guide.posterior_stats(x)
    q = guide.distribution(x)
    assert isinstance(q, DiagonalGaussianSequence)
    torch.testing.assert_close(stats.means, q.loc, **EXACT)
    torch.testing.assert_close(stats.scales, q.scale, **EXACT)


def test_linear_structured_posterior_stats_match_monte_carlo():
    guide = _make("structured", dict(direction="backward", combiner="linear", cell="lstm"))
    with torch.no_grad():
        guide.combiner.transition.weight.copy_(torch.tensor([[0.8, 0.3], [-0.2, 0.7]]))
        guide.combiner.features_to_scale.offdiag.bias.fill_(0.4)
    x = torch.randn(1, 6, OBS, dtype=torch.float64)
    stats = guide.posterior_stats(x)
    N = 20000
    z = guide.distribution(x).sample((N,))
    se = stats.scales / math.sqrt(N)
    assert ((z.mean(0) - stats.means).abs() < K_SE * se).all()
    assert ((z.std(0) - stats.scales).abs() < K_SE * stats.scales * math.sqrt(0.5 / N)).all()


def test_nonlinear_posterior_stats_are_monte_carlo_moments():
    # no closed form for a nonlinear combiner: posterior_stats (S = 50 draws) against an
    # independent 4,000-draw estimate, within K_SE standard errors of the difference
    guide = _make("structured", dict(direction="forward", combiner="nonlinear", cell="gru"))
    x = torch.randn(3, 4, OBS, dtype=torch.float64)
    torch.manual_seed(0)
    stats = guide.posterior_stats(x, num_samples=50)
    assert stats.means.shape == (3, 4, STATE) and (stats.scales > 0).all()
    torch.manual_seed(1)
    with torch.no_grad():
        z = guide.distribution(x).sample((4000,))
    se = z.std(0) * math.sqrt(1 / 50 + 1 / 4000)
    assert ((stats.means - z.mean(0)).abs() < K_SE * se).all()
    rel_se = math.sqrt(0.5 / 50 + 0.5 / 4000)
    assert ((stats.scales / z.std(0) - 1).abs() < K_SE * rel_se).all()


@pytest.mark.parametrize("combiner", ["nonlinear", "linear"])
def test_per_step_guide_has_the_same_density(combiner):
    """Replaying the one-site draw into the per-step (pyro.markov) guide gives the same log q."""
    guide = _make("structured", dict(direction="backward", combiner=combiner, cell="gru"))
    x = torch.randn(3, 6, OBS, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 6])
    vec = poutine.trace(guide).get_trace(x, mask)
    z = vec.nodes["z"]["value"]
    assert isinstance(vec.nodes["z"]["fn"], AutoregressiveGaussianSequence)
    values = {f"z_{t + 1}": z[:, t] for t in range(6)}
    step = poutine.trace(poutine.condition(guide, data=values)).get_trace(x, mask, per_step=True)
    vec.compute_log_prob()
    step.compute_log_prob()
    log_q_steps = sum(step.nodes[f"z_{t}"]["log_prob"] for t in range(1, 7))
    torch.testing.assert_close(vec.nodes["z"]["log_prob"], log_q_steps, **EXACT)
    # and the per-step guide samples trajectories of the right shape
    assert guide(x, mask, per_step=True).shape == (3, 6, STATE)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="direction"):
        StructuredGuide(OBS, STATE, direction="sideways")
    with pytest.raises(ValueError, match="combiner"):
        StructuredGuide(OBS, STATE, combiner="quadratic")
    with pytest.raises(ValueError, match="cell"):
        FilteringLSTMGuide(OBS, STATE, cell="transformer")
    with pytest.raises(ValueError, match="scale"):
        StructuredGuide(OBS, STATE, scale="full")
    with pytest.raises(ValueError, match="hidden_dim"):
        FilteringLSTMGuide(OBS, STATE, hidden_dim=0)
    guide = FilteringLSTMGuide(OBS, STATE, hidden_dim=HID)
    with pytest.raises(ValueError, match="x: expected shape"):
        guide(torch.randn(2, 5, OBS + 1))
    with pytest.raises(ValueError, match="mask"):
        guide(torch.randn(2, 5, OBS), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="right padding"):
        guide(torch.randn(1, 3, OBS), torch.tensor([[True, False, True]]))


def test_guides_follow_the_module_device_and_dtype():
    guide = StructuredGuide(OBS, STATE, hidden_dim=HID, combiner="linear").to(torch.float64)
    z = guide(torch.randn(2, 4, OBS, dtype=torch.float64))
    assert z.dtype == torch.float64
    state = guide.state_dict()
    assert any(k.endswith("h0") for k in state) and "combiner.z0" in state
