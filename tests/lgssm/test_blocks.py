"""The filter's means with time-varying gains solved in blocks (``pyrossm.lgssm._blocks``).

Without missing data and without parameter batch dims, the means and log-likelihoods before
the Riccati fixed point (all of them when the steady-state stop is off) come from per-block
operators once the batch is large enough (``_steps._BLOCK_STEPS_MIN_WORK``). Here that
threshold is forced to 1 or to never, and the two paths are compared in float64 (values and
gradients), and the block path against the dense joint Gaussian. Sequences are
(batch, time, dim), time at dim -2.
"""

import pytest
import torch
from lgssm_oracles import assert_rel_close, dense_oracle, random_system

from pyrossm.lgssm import _blocks, _steps, kalman_filter, kalman_log_likelihood

ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")


def _run(s, offsets, blocks, monkeypatch, steady):
    """kalman_filter and kalman_log_likelihood, and the gradients of a loss that uses every
    output, with the block path forced on or off."""
    monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_WORK", 1 if blocks else 1 << 62)
    monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_BATCH", 1)
    monkeypatch.setattr(_steps, "STEADY_STATE", steady)
    leaves = {k: s[k].clone().requires_grad_() for k in ("x", "A", "C", "R", "init_mean")}
    extra = {k: v.clone().requires_grad_() for k, v in offsets.items()}
    args = [leaves.get(k, s[k]) for k in ARGS]
    res = kalman_filter(*args, parallel=False, **extra)
    ll = kalman_log_likelihood(*args, per_step=True, **extra)
    loss = res.log_likelihood.sum() + res.filtered_means.pow(2).sum()
    loss = loss + res.predicted_means.sum() + ll.pow(2).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()) + list(extra.values()))
    return res, ll, grads


def _assert_paths_agree(s, offsets, monkeypatch, steady):
    """Both paths give the same outputs (1e-11) and gradients (1e-9)."""
    res_b, ll_b, g_b = _run(s, offsets, True, monkeypatch, steady)
    res_s, ll_s, g_s = _run(s, offsets, False, monkeypatch, steady)
    for key in res_b._fields:
        assert_rel_close(getattr(res_b, key), getattr(res_s, key), 1e-11, key)
    assert_rel_close(ll_b, ll_s, 1e-11, "kalman_log_likelihood")
    for a, c in zip(g_b, g_s):
        assert_rel_close(a, c, 1e-9, "gradient")


@pytest.mark.parametrize("steady", [False, True])
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("B,T", [(3, 1), (3, 2), (5, 37), (70, 40), (2, 160)])
def test_block_path_equals_step_path(B, T, offsets, steady, monkeypatch):
    """Every output of both filters and the gradients w.r.t. x, A, C, R, the initial mean
    and the offsets agree, for T = 1 and 2 (one padded block), 37 (blocks of 8 and a padded
    last one), 40 with 70 sequences (blocks of 8 instead of 4), 160 with the fixed point
    reached (the block path then only covers the steps before it)."""
    s = random_system(3, 2, T, seed=B + T, batch=(B,))
    g = torch.Generator().manual_seed(T)
    extra = {}
    if offsets:
        extra = dict(transition_offset=torch.randn(B, T, 3, generator=g, dtype=torch.float64),
                     observation_offset=torch.randn(T, 2, generator=g, dtype=torch.float64))
    _assert_paths_agree(s, extra, monkeypatch, steady)


@pytest.mark.parametrize("offsets", [False, True])
def test_block_path_time_varying_parameters(offsets, monkeypatch):
    """Time-varying A and C (one sequence, so the parameters have no batch): the step-0
    transition is never used, the others per block step."""
    T, n, p = 29, 3, 2
    s = random_system(n, p, T, seed=3)
    g = torch.Generator().manual_seed(4)
    d = dict(dtype=torch.float64)
    s["A"] = s["A"] + 0.1 * torch.randn(T, n, n, generator=g, **d)
    s["C"] = s["C"] + 0.3 * torch.randn(T, p, n, generator=g, **d)
    extra = dict(transition_offset=torch.randn(T, n, generator=g, **d)) if offsets else {}
    _assert_paths_agree(s, extra, monkeypatch, False)


def test_block_path_equals_dense_joint_gaussian(monkeypatch):
    """An independent oracle: the log-likelihood and filtered means of each sequence by
    conditioning the dense joint Gaussian of (z, x)."""
    B, T = 4, 13
    s = random_system(2, 2, T, seed=21, batch=(B,))
    monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_WORK", 1)
    monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_BATCH", 1)
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    res = kalman_filter(*[s[k] for k in ARGS], parallel=False)
    for b in range(B):
        ref = dense_oracle(s["x"][b], *[s[k] for k in ARGS[1:]])
        assert_rel_close(res.log_likelihood[b], torch.as_tensor(ref["log_likelihood"]), 1e-10,
                         "log-likelihood")
        assert_rel_close(res.filtered_means[b], torch.as_tensor(ref["filtered_means"]), 1e-9,
                         "filtered means")


def test_block_length_and_threshold_choices(monkeypatch):
    """Blocks of 4 steps below 64 sequences, of ``block_length(T)`` from 64 on; below the
    thresholds the step path runs (the block function is not called): fewer sequences x
    steps than ``_BLOCK_STEPS_MIN_WORK``, or fewer sequences than ``_BLOCK_STEPS_MIN_BATCH``."""
    calls = []
    original = _blocks.varying_block_steps

    def spy(prep, batch, K, Linv, half_logdet, Td, moments, blk, *flags):
        calls.append(blk)
        return original(prep, batch, K, Linv, half_logdet, Td, moments, blk, *flags)

    monkeypatch.setattr(_steps, "varying_block_steps", spy)
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    for B, expected in ((8, 4), (64, None)):
        s = random_system(2, 2, 40, seed=B, batch=(B,))
        monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_WORK", 1)
        kalman_log_likelihood(*[s[k] for k in ARGS])
        assert calls[-1] == expected
        monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_WORK", 1 << 62)
        count = len(calls)
        kalman_log_likelihood(*[s[k] for k in ARGS])
        assert len(calls) == count
    x = torch.randn(2, 20000, 2, dtype=torch.float64)  # much work, too few sequences
    monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_WORK", 1 << 15)
    kalman_log_likelihood(x, *[s[k] for k in ARGS[1:]])
    assert len(calls) == count


def test_block_path_float32_matches_float64(monkeypatch):
    """In float32 the block path stays within float32 rounding of the float64 filter over
    1000 steps (the per-block operators are products of at most 8 step matrices)."""
    s = random_system(4, 4, 1000, seed=2, batch=(16,))
    monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_WORK", 1)
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    ll64 = kalman_log_likelihood(*[s[k] for k in ARGS], per_step=True)
    ll32 = kalman_log_likelihood(*[s[k].float() for k in ARGS], per_step=True)
    assert (ll32.double() - ll64).abs().max() < 1e-3


def test_block_path_float32_long_constant_level(monkeypatch):
    """The slowly converging case of ``test_float32_long_constant_level_matches_float64`` (A =
    1, Q = 0, R = 2e6: no fixed point is ever reached, so every step runs) for a batch of 8
    sequences, which takes the block path: float32 within 1% of the float64 textbook filter."""
    import numpy as np
    from test_lgssm_exactness import FLOAT32_LONG_RTOL, _textbook_scalar_filter

    T, r, p0, N = 200_000, 2e6, 1.0, 8
    x = 0.5 + np.sqrt(r) * np.random.default_rng(0).normal(size=(N, T))
    calls = []
    original = _blocks.varying_block_steps
    monkeypatch.setattr(_steps, "varying_block_steps",
                        lambda *a: calls.append(a[5]) or original(*a))
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    res = kalman_filter(torch.as_tensor(x, dtype=torch.float32).unsqueeze(-1), f32([[1.0]]),
                        f32([[1.0]]), f32([[0.0]]), f32([[r]]), f32([0.0]), f32([[p0]]))
    assert calls == [T]
    for b in range(2):
        P_ref, m_ref, ll_ref = _textbook_scalar_filter(x[b], r, p0)
        assert abs(res.filtered_covs[b, -1, 0, 0].item() / P_ref - 1) < FLOAT32_LONG_RTOL
        assert abs(res.filtered_means[b, -1, 0].item() / m_ref - 1) < FLOAT32_LONG_RTOL
        assert abs(res.log_likelihood[b].item() / ll_ref - 1) < FLOAT32_LONG_RTOL


@pytest.mark.parametrize("offsets", [False, True])
def test_block_path_without_autograd_in_chunks(offsets, monkeypatch):
    """Without autograd the log-likelihoods and the means are computed in chunks of sequences
    through one buffer and written batch-major (here 300 sequences of 201 steps in float64:
    26 blocks of 8, the last one padded, chunks of 157 and 143 sequences), the data read
    through a strided block view; equal to the step path."""
    s = random_system(3, 2, 201, seed=8)
    g = torch.Generator().manual_seed(2)
    s["x"] = torch.randn(300, 201, 2, generator=g, dtype=torch.float64)  # any data will do
    extra = dict(transition_offset=torch.randn(300, 201, 3, generator=g,
                                               dtype=torch.float64)) if offsets else {}
    args = [s[k] for k in ARGS]
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    with torch.no_grad():
        block = kalman_log_likelihood(*args, per_step=True, **extra)
        block_res = kalman_filter(*args, parallel=False, **extra)
        monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_WORK", 1 << 62)
        step = kalman_log_likelihood(*args, per_step=True, **extra)
        step_res = kalman_filter(*args, parallel=False, **extra)
    assert_rel_close(block, step, 1e-11, "log-likelihood")
    for key in ("filtered_means", "predicted_means", "log_likelihood"):
        assert_rel_close(getattr(block_res, key), getattr(step_res, key), 1e-11, key)


@pytest.mark.parametrize("offsets", [False, True])
def test_log_likelihood_totals_without_autograd(offsets, monkeypatch):
    """``kalman_log_likelihood`` (totals, no autograd) sums each chunk's squares over the
    blocks where they are made, when the blocks tile the steps (here 300 sequences of 200
    steps, blocks of 8); equal to the step path's summed step log-likelihoods in float64."""
    s = random_system(3, 2, 200, seed=11)
    g = torch.Generator().manual_seed(3)
    s["x"] = torch.randn(300, 200, 2, generator=g, dtype=torch.float64)
    extra = dict(transition_offset=torch.randn(300, 200, 3, generator=g,
                                               dtype=torch.float64)) if offsets else {}
    args = [s[k] for k in ARGS]
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    calls = []
    original = _blocks._sum_of_squares
    monkeypatch.setattr(_blocks, "_sum_of_squares", lambda w: calls.append(1) or original(w))
    with torch.no_grad():
        total = kalman_log_likelihood(*args, **extra)
        assert calls, "the totals path was not taken"
        monkeypatch.setattr(_steps, "_BLOCK_STEPS_MIN_WORK", 1 << 62)
        step = kalman_log_likelihood(*args, per_step=True, **extra)
    assert total.shape == (300,)
    assert_rel_close(total, step.sum(-1), 1e-11, "log-likelihood totals")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("N, T", [(3, 7), (4, 6)])  # N T odd (one step per row) and even
def test_predicted_means_from_filtered(N, T, n, dtype):
    """``_blocks.predicted_means``: m⁻_0 = m_0 and m⁻_t = A m_{t-1} + b_t for every sequence,
    with several steps per row of the product where N T allows it, equal to a loop over the
    steps; the autograd path gives the same values."""
    g = torch.Generator().manual_seed(n)
    fm = torch.randn(N, T, n, generator=g, dtype=torch.float64)
    m0 = torch.randn(N, n, generator=g, dtype=torch.float64)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    b = torch.randn(N, T, n, generator=g, dtype=torch.float64)
    for offsets in (None, b):
        ref = torch.stack([m0] + [fm[:, t - 1] @ A.mT + (0 if offsets is None else b[:, t])
                                  for t in range(1, T)], 1)
        args = [v.to(dtype) for v in (fm, m0, A.mT)] + [None if offsets is None
                                                        else offsets.to(dtype)]
        got = _blocks.predicted_means(*args)
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
        leaf = args[0].clone().requires_grad_()
        with_grad = _blocks.predicted_means(leaf, *args[1:])
        assert with_grad.requires_grad
        torch.testing.assert_close(with_grad.detach(), got, rtol=tol, atol=tol)
