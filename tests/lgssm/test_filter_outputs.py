"""``kalman_filter(..., predicted=False, per_step=False)``: the outputs a caller does not ask for.

Without them the filter returns what dynamax's ``lgssm_filter`` returns (the log-likelihood and
the filtered moments); the fast kernel (no missing data, no parameter batch dims) then never
computes the predicted means or the per-step log-likelihoods, and every other path computes and
drops them. On every path the fields that remain equal the full filter's in float64 (1e-11), and
so do the gradients. Sequences are (batch, time, dim), time at dim -2.
"""

import pytest
import torch
from lgssm_oracles import assert_rel_close, random_system

from pyrossm.lgssm import _blocks, _steps, kalman_filter

ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")
FLAGS = [(False, True), (True, False), (False, False)]


def _case(name):
    """A problem (a dict of float64 tensors and keyword arguments) for each path."""
    g = torch.Generator().manual_seed(5)
    if name == "blocks":  # 300 x 200: the blocks (8 steps) tile the series
        s = random_system(3, 2, 200, seed=11)
        s["x"] = torch.randn(300, 200, 2, generator=g, dtype=torch.float64)
        return s, {}
    if name == "blocks_padded":  # 201 steps: the last block padded
        s = random_system(3, 2, 201, seed=8)
        s["x"] = torch.randn(300, 201, 2, generator=g, dtype=torch.float64)
        return s, {}
    if name == "offsets":
        s = random_system(3, 2, 200, seed=12)
        s["x"] = torch.randn(300, 200, 2, generator=g, dtype=torch.float64)
        return s, dict(transition_offset=torch.randn(300, 200, 3, generator=g,
                                                     dtype=torch.float64),
                       observation_offset=torch.randn(200, 2, generator=g, dtype=torch.float64))
    if name == "few_sequences":
        return random_system(2, 3, 50, seed=3, batch=(2,)), {}
    if name == "missing":
        return random_system(3, 2, 60, seed=4, batch=(5,), missing="entries"), {}
    if name == "time_varying":
        return random_system(2, 2, 40, seed=6, batch=(64,), time_varying=True), {}
    if name == "parameter_batch":  # A with batch dims: the general path
        s = random_system(2, 2, 30, seed=7, batch=(3,))
        s["A"] = s["A"] * torch.tensor([1.0, 0.9, 0.8], dtype=torch.float64).view(3, 1, 1)
        return s, {}
    raise AssertionError(name)


CASES = ["blocks", "blocks_padded", "offsets", "few_sequences", "missing", "time_varying",
         "parameter_batch"]


@pytest.mark.parametrize("steady", [False, True])
@pytest.mark.parametrize("predicted,per_step", FLAGS)
@pytest.mark.parametrize("case", CASES)
def test_fields_left_out_are_none_and_the_rest_equal(case, predicted, per_step, steady,
                                                     monkeypatch):
    monkeypatch.setattr(_steps, "STEADY_STATE", steady)
    s, extra = _case(case)
    args = [s[k] for k in ARGS]
    full = kalman_filter(*args, **extra)
    lean = kalman_filter(*args, predicted=predicted, per_step=per_step, **extra)
    assert (lean.predicted_means is None) == (lean.predicted_covs is None) == (not predicted)
    assert (lean.step_log_likelihoods is None) == (not per_step)
    for key in lean._fields:
        if getattr(lean, key) is not None:
            assert getattr(lean, key).shape == getattr(full, key).shape, key
            assert_rel_close(getattr(lean, key), getattr(full, key), 1e-11, key)


@pytest.mark.parametrize("parallel", [False, True])
def test_parallel_and_float32(parallel):
    s, _ = _case("few_sequences")
    args = [s[k].float() for k in ARGS]
    full = kalman_filter(*args, parallel=parallel)
    lean = kalman_filter(*args, parallel=parallel, predicted=False, per_step=False)
    assert lean.predicted_means is None and lean.step_log_likelihoods is None
    assert lean.filtered_means.dtype == torch.float32
    for key in ("log_likelihood", "filtered_means", "filtered_covs"):
        assert torch.equal(getattr(lean, key), getattr(full, key)), key


def test_fast_kernel_skips_the_work(monkeypatch):
    """Without missing data the predicted means are never computed and the log-likelihoods
    are summed block by block where they are made (no per-step array)."""
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    s, _ = _case("blocks")
    args = [s[k] for k in ARGS]
    calls = {"sums": 0, "predicted": 0}
    sums, predicted = _blocks._sum_of_squares, _blocks.predicted_means
    monkeypatch.setattr(_blocks, "_sum_of_squares",
                        lambda w: calls.__setitem__("sums", calls["sums"] + 1) or sums(w))
    monkeypatch.setattr(_blocks, "predicted_means", lambda *a: calls.__setitem__(
        "predicted", calls["predicted"] + 1) or predicted(*a))
    with torch.no_grad():
        kalman_filter(*args, predicted=False, per_step=False)
    assert calls["sums"] > 0 and calls["predicted"] == 0
    with torch.no_grad():
        kalman_filter(*args)
    assert calls["predicted"] == 1


@pytest.mark.parametrize("steady", [False, True])
def test_gradients_equal_the_full_filter(steady, monkeypatch):
    monkeypatch.setattr(_steps, "STEADY_STATE", steady)
    s, _ = _case("blocks")

    def grads(**flags):
        leaves = {k: s[k].clone().requires_grad_() for k in ("x", "A", "C", "Q", "init_mean")}
        res = kalman_filter(*[leaves.get(k, s[k]) for k in ARGS], **flags)
        loss = res.log_likelihood.sum() + res.filtered_means.pow(2).sum()
        return torch.autograd.grad(loss, list(leaves.values()))

    for a, b in zip(grads(predicted=False, per_step=False), grads()):
        assert_rel_close(a, b, 1e-10, "gradient")


@pytest.mark.parametrize("flag", ["predicted", "per_step"])
def test_flags_must_be_bools(flag):
    s, _ = _case("few_sequences")
    with pytest.raises(TypeError, match=f"{flag}: expected a bool, got str"):
        kalman_filter(*[s[k] for k in ARGS], **{flag: "no"})
