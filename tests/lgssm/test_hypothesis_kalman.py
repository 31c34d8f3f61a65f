"""Property-based checks of the Kalman filter and smoother on random stable systems.

Hypothesis draws systems (dimensions, matrices, noise, data and masks); every property is an
exact identity, so the tolerances are rounding-level (float64).
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrossm.lgssm import kalman_filter, kalman_smoother

NUM_SYSTEMS = 500  # the issue asks for at least 500 random systems and masks
RTOL = 1e-8
ATOL = 1e-9


@st.composite
def systems(draw):
    n = draw(st.integers(1, 4))
    p = draw(st.integers(1, 3))
    T = draw(st.integers(2, 10))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    radius = draw(st.floats(0.1, 0.99))
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    A = randn(n, n)
    A = radius * A / torch.linalg.eigvals(A).abs().max().clamp_min(1e-6)
    B, D, L0 = randn(n, n), randn(p, p), randn(n, n)
    Q = B @ B.T + 0.05 * torch.eye(n, dtype=torch.float64)
    R = D @ D.T + 0.05 * torch.eye(p, dtype=torch.float64)
    P0 = L0 @ L0.T + 0.1 * torch.eye(n, dtype=torch.float64)
    x = randn(batch, T, p) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    missing = torch.rand(batch, T, p, generator=g) < draw(st.sampled_from([0.0, 0.2, 0.5]))
    x = x.masked_fill(missing, float("nan"))
    mask = torch.rand(batch, T, generator=g) > draw(st.sampled_from([0.0, 0.3]))
    return dict(x=x, A=A, C=randn(p, n), Q=Q, R=R, init_mean=randn(n), init_cov=P0, mask=mask)


def _run(s, **kw):
    args = (s["x"], s["A"], s["C"], s["Q"], s["R"], s["init_mean"], s["init_cov"])
    return kalman_smoother(*args, mask=s["mask"], **kw)


def _assert_spd(covs):
    assert torch.allclose(covs, covs.transpose(-1, -2), rtol=0, atol=1e-10 * covs.abs().max())
    assert bool((torch.linalg.eigvalsh(covs) > 0).all())


def _check_finite_spd_and_batched_equals_looped(s):
    res = _run(s)
    for value in res:
        assert bool(torch.isfinite(value).all())
    _assert_spd(res.filtered_covs)
    _assert_spd(res.smoothed_covs)
    for b in range(s["x"].shape[0]):
        one = dict(s, x=s["x"][b], mask=s["mask"][b])
        single = _run(one, validate=False)
        np.testing.assert_allclose(single.log_likelihood, res.log_likelihood[b], RTOL, ATOL)
        np.testing.assert_allclose(single.smoothed_means, res.smoothed_means[b], RTOL, ATOL)
        np.testing.assert_allclose(single.smoothed_covs, res.smoothed_covs[b], RTOL, ATOL)


def _property_test(num_examples):
    return settings(
        max_examples=num_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )(given(systems())(_check_finite_spd_and_batched_equals_looped))


# The default suite draws 100 systems; the slow run draws the full 500.
test_random_systems_finite_spd_and_batched_equals_looped = _property_test(100)
test_random_systems_500 = pytest.mark.slow(_property_test(NUM_SYSTEMS))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(systems(), st.data())
def test_masked_step_equals_removed_step(s, data):
    """Masking step t equals removing it and bridging the gap with A_{t+1} A_t, A Q Aᵀ + Q."""
    T = s["x"].shape[-2]
    t = data.draw(st.integers(1, T - 2)) if T > 2 else None
    if t is None:
        return
    x, A, Q = s["x"], s["A"], s["Q"]
    mask = torch.ones(x.shape[:-1], dtype=torch.bool)
    mask[..., t] = False
    full = kalman_filter(x, A, s["C"], Q, s["R"], s["init_mean"], s["init_cov"], mask=mask)
    keep = [i for i in range(T) if i != t]
    A_tv = A.expand(1, T - 1, *A.shape).clone()
    Q_tv = Q.expand(1, T - 1, *Q.shape).clone()
    A_tv[0, t] = A @ A  # the transition from step t-1 to step t+1
    Q_tv[0, t] = A @ Q @ A.T + Q
    removed = kalman_filter(
        x[..., keep, :], A_tv, s["C"], Q_tv, s["R"], s["init_mean"], s["init_cov"]
    )
    np.testing.assert_allclose(full.log_likelihood, removed.log_likelihood, RTOL, ATOL)
    np.testing.assert_allclose(
        full.filtered_means[..., keep, :], removed.filtered_means, RTOL, 1e-8
    )


@settings(max_examples=30, deadline=None, derandomize=True)
@given(systems())
def test_parallel_equals_sequential_random(s):
    seq, par = _run(s), _run(s, parallel=True)
    for a, b in zip(seq, par):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_parallel_filter_long_sequence_memory():
    """T = 1e5 steps through the parallel filter and smoother on CPU (issue: long sequences)."""
    T, n = 100_000, 2
    A = torch.tensor([[0.9, 0.1], [0.0, 0.8]], dtype=torch.float64)
    I = torch.eye(n, dtype=torch.float64)
    x = torch.randn(1, T, n, dtype=torch.float64)
    par = kalman_smoother(x, A, I, I, I, torch.zeros(n, dtype=torch.float64), I, parallel=True)
    seq = kalman_filter(x, A, I, I, I, torch.zeros(n, dtype=torch.float64), I)
    np.testing.assert_allclose(par.log_likelihood, seq.log_likelihood, rtol=1e-8)
    assert bool(torch.isfinite(par.smoothed_means).all())
