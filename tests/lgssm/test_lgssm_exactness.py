"""Exactness of kalman_filter / kalman_smoother in the hard cases, against float64 oracles.

* offsets ``b_t`` / ``d_t`` (exogenous inputs) against the dense joint Gaussian of the shifted
  model (the offsets only move the prior means: ``z_t = z'_t + δ_t`` with ``δ_t = A δ_{t-1} +
  b_t`` and ``x_t - C δ_t - d_t`` following the model without offsets);
* the steady-state stop of the Riccati recursion in float32 on a long, slowly converging series;
* singular predicted covariances (pseudo-inverse Rauch–Tung–Striebel reference).

Shapes follow pyrossm: x is (batch..., T, obs_dim), time at dim -2.
"""

import numpy as np
import pytest
import torch
from lgssm_oracles import assert_rel_close, dense_oracle, random_system

from pyrossm.lgssm import kalman_filter, kalman_smoother

RTOL = 1e-8  # float64 agreement with the oracles
ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")
PARALLEL = [pytest.param(False, id="sequential"), pytest.param(True, id="parallel")]


# ----------------------------------------------------------------------------------------------
# offsets
def _shifted_oracle(s, b, d):
    """Dense-oracle results of the offset model for one sequence, by the shift δ_t."""
    A, C = s["A"].numpy(), s["C"].numpy()
    T, n = b.shape
    delta = np.zeros((T, n))
    for t in range(1, T):
        delta[t] = A @ delta[t - 1] + b[t]
    x = s["x"].numpy() - delta @ C.T - d
    shifted = dict(s, x=torch.as_tensor(x))
    ref = dense_oracle(*[shifted[k] for k in ARGS])
    for key in ("predicted_means", "filtered_means", "smoothed_means"):
        ref[key] = ref[key] + delta
    return ref


@pytest.mark.parametrize("missing", ["none", "entries"])
@pytest.mark.parametrize("parallel", PARALLEL)
def test_offsets_against_dense_joint(missing, parallel):
    s = random_system(n=2, p=3, T=6, seed=3, missing=missing)
    rng = np.random.default_rng(1)
    b = rng.normal(size=(6, 2))
    d = rng.normal(size=(6, 3))
    ref = _shifted_oracle(s, b, d)
    args = [s[k] for k in ARGS]
    kw = dict(transition_offset=torch.as_tensor(b), observation_offset=torch.as_tensor(d))
    f = kalman_filter(*args, parallel=parallel, **kw)
    sm = kalman_smoother(*args, parallel=parallel, **kw)
    for key in ("log_likelihood", "step_log_likelihoods", "predicted_means", "predicted_covs"):
        assert_rel_close(getattr(f, key), ref[key], RTOL, key)
    for key in ("filtered_means", "filtered_covs"):
        assert_rel_close(getattr(f, key), ref[key], RTOL, key)
    for key in ("smoothed_means", "smoothed_covs", "smoothed_cross_covs"):
        assert_rel_close(getattr(sm, key), ref[key], RTOL, key)


@pytest.mark.parametrize("parallel", PARALLEL)
def test_observation_offset_equals_subtracting_it(parallel):
    s = random_system(n=3, p=2, T=40, seed=5, batch=(2,), missing="entries")
    d = torch.randn(2, 40, 2, dtype=torch.float64)
    args = [s[k] for k in ARGS]
    a = kalman_smoother(*args, parallel=parallel, observation_offset=d)
    b = kalman_smoother(s["x"] - d, *args[1:], parallel=parallel)
    for key in a._fields:
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("parallel", PARALLEL)
def test_offsets_broadcast_and_batch(parallel):
    """A time dim of 1 broadcasts; per-sequence offsets equal looping over the sequences."""
    s = random_system(n=2, p=2, T=30, seed=7, batch=(3,), missing="steps")
    args = [s[k] for k in ARGS]
    b = torch.randn(3, 30, 2, dtype=torch.float64)
    d1 = torch.randn(1, 2, dtype=torch.float64)
    res = kalman_filter(*args, parallel=parallel, transition_offset=b, observation_offset=d1)
    for i in range(3):
        one = kalman_filter(
            s["x"][i], *args[1:], parallel=parallel,
            transition_offset=b[i], observation_offset=d1.expand(30, 2),
        )
        torch.testing.assert_close(res.log_likelihood[i], one.log_likelihood)
        torch.testing.assert_close(res.filtered_means[i], one.filtered_means)


def test_offsets_bad_shape_names_argument():
    s = random_system(n=2, p=3, T=5, seed=0)
    args = [s[k] for k in ARGS]
    with pytest.raises(ValueError, match="transition_offset"):
        kalman_filter(*args, transition_offset=torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="observation_offset"):
        kalman_filter(*args, observation_offset=torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="observation_offset"):
        kalman_filter(*args, observation_offset=torch.zeros(5, 3))


# ----------------------------------------------------------------------------------------------
# steady-state stop of the covariance recursion
FLOAT32_LONG_RTOL = 0.01  # acceptance: float32 within 1% of float64


def _textbook_scalar_filter(x, r, p0):
    """Float64 constant-level filter (A = C = 1, Q = 0): the final P, m and log-likelihood."""
    m, P, ll = 0.0, p0, 0.0
    for xt in x:
        S = P + r
        v = xt - m
        ll -= 0.5 * (np.log(2 * np.pi * S) + v * v / S)
        K = P / S
        m, P = m + K * v, (1 - K) * P
    return P, m, ll


def test_float32_long_constant_level_matches_float64():
    """A constant regression coefficient (A = 1, Q = 0) seen through huge noise converges
    sublinearly (P_t ≈ 1 / (1/P_0 + t/R)); a stop on consecutive steps agreeing to a few ulps
    froze P at t = 4 (P_T +10%, m_T -12% at T = 2e5). Now float32 is within 1% of float64."""
    T, r, p0 = 200_000, 2e6, 1.0
    rng = np.random.default_rng(0)
    x = 0.5 + np.sqrt(r) * rng.normal(size=T)
    P_ref, m_ref, ll_ref = _textbook_scalar_filter(x, r, p0)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    res = kalman_filter(
        torch.as_tensor(x, dtype=torch.float32).reshape(T, 1),
        f32([[1.0]]), f32([[1.0]]), f32([[0.0]]), f32([[r]]), f32([0.0]), f32([[p0]]),
    )
    assert abs(res.filtered_covs[-1, 0, 0].item() / P_ref - 1) < FLOAT32_LONG_RTOL
    assert abs(res.filtered_means[-1, 0].item() / m_ref - 1) < FLOAT32_LONG_RTOL
    assert abs(res.log_likelihood.item() / ll_ref - 1) < FLOAT32_LONG_RTOL


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-11), (torch.float32, 2e-4)])
def test_steady_state_stop_equals_full_recursion(dtype, rtol, monkeypatch):
    """Stopping at the Riccati fixed point gives the numbers of the full recursion."""
    from pyrossm.lgssm import _steps

    s = random_system(n=3, p=2, T=400, seed=11, batch=(2,))
    args = [s[k].to(dtype) for k in ARGS]
    calls = []
    original = _steps.riccati_sequential

    def spy(*a, **k):
        out = original(*a, **k)
        calls.append(out[-1])
        return out

    monkeypatch.setattr(_steps, "riccati_sequential", spy)
    fast = kalman_filter(*args)
    assert calls[-1] is not None and calls[-1] < 64  # the shortcut was taken
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    seen = len(calls)
    full = kalman_filter(*args)
    # without the stop a shared system skips the step-by-step start (covariances by doubling
    # from step 0); any step-by-step run must not have stopped
    assert all(c is None for c in calls[seen:])
    for key in fast._fields:
        assert_rel_close(getattr(fast, key), getattr(full, key), rtol, key)


def test_unit_root_with_zero_noise_never_stops_early(monkeypatch):
    """A = 1 with Q = 0 converges sublinearly: the contraction estimate is 1, no shortcut."""
    from pyrossm.lgssm import _steps

    calls = []
    original = _steps.riccati_sequential
    monkeypatch.setattr(
        _steps, "riccati_sequential", lambda *a, **k: calls.append(original(*a, **k)) or calls[-1]
    )
    one = torch.ones(1, 1, dtype=torch.float64)
    x = torch.randn(200, 1, dtype=torch.float64)
    kalman_filter(x, one, one, 0 * one, 1e8 * one, torch.zeros(1, dtype=torch.float64), one)
    assert calls[-1][-1] is None


# ----------------------------------------------------------------------------------------------
# singular predicted covariances
def _pinv_rts(x, A, C, Q, R, m0, P0):
    """Float64 textbook Kalman filter and Rauch–Tung–Striebel smoother with the
    pseudo-inverse of the predicted covariance in the smoother gain."""
    T = x.shape[0]
    pm, pc, fm, fc, ll = [], [], [], [], 0.0
    m, P = m0, P0
    for t in range(T):
        if t > 0:
            m, P = A @ m, A @ P @ A.T + Q
        pm.append(m)
        pc.append(P)
        S = C @ P @ C.T + R
        v = x[t] - C @ m
        ll += -0.5 * (np.linalg.slogdet(2 * np.pi * S)[1] + v @ np.linalg.solve(S, v))
        K = P @ C.T @ np.linalg.inv(S)
        m, P = m + K @ v, P - K @ S @ K.T
        fm.append(m)
        fc.append(P)
    sm, sc, cross = [fm[-1]], [fc[-1]], []
    for t in range(T - 2, -1, -1):
        G = fc[t] @ A.T @ np.linalg.pinv(pc[t + 1], hermitian=True)
        cross.append(sc[0] @ G.T)
        sm.insert(0, fm[t] + G @ (sm[0] - pm[t + 1]))
        sc.insert(0, fc[t] + G @ (sc[0] - pc[t + 1]) @ G.T)
    return dict(
        log_likelihood=ll,
        filtered_means=np.stack(fm),
        filtered_covs=np.stack(fc),
        predicted_covs=np.stack(pc),
        smoothed_means=np.stack(sm),
        smoothed_covs=np.stack(sc),
        smoothed_cross_covs=np.stack(cross[::-1]),
    )


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("missing", ["none", "entries"])
def test_singular_predicted_covariance_smoother(parallel, missing):
    """A=diag(.9, 1), Q=diag(1, 0), init_cov=diag(1, 0): the second state is deterministic, every
    predicted covariance is singular. Smoother finite and equal to a pseudo-inverse RTS."""
    A = np.diag([0.9, 1.0])
    Q = np.diag([1.0, 0.0])
    P0 = np.diag([1.0, 0.0])
    C = np.array([[1.0, 0.5], [0.3, 1.0]])
    R = np.array([[0.5, 0.1], [0.1, 0.4]])
    m0 = np.array([0.2, 1.5])
    T = 25
    rng = np.random.default_rng(4)
    x = rng.normal(size=(T, 2)) + 1.5
    if missing == "entries":
        x[rng.random(x.shape) < 0.25] = np.nan
    t64 = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    args = [t64(a) for a in (x, A, C, Q, R, m0, P0)]
    sm = kalman_smoother(*args, parallel=parallel)
    for key in sm._fields:
        assert bool(torch.isfinite(getattr(sm, key)).all()), key
    if missing == "none":
        ref = _pinv_rts(x, A, C, Q, R, m0, P0)
    else:
        ref = dense_oracle(*args)  # the joint Gaussian handles missing entries directly
        ref["log_likelihood"] = float(ref["log_likelihood"])
    f = kalman_filter(*args, parallel=parallel)
    assert_rel_close(f.log_likelihood, np.array(ref["log_likelihood"]), 1e-10, "log_likelihood")
    for key in ("filtered_means", "filtered_covs"):
        assert_rel_close(getattr(f, key), ref[key], 1e-9, key)
    for key in ("smoothed_means", "smoothed_covs", "smoothed_cross_covs"):
        assert_rel_close(getattr(sm, key), ref[key], 1e-9, key)


def test_singular_smoother_gradient_finite():
    A = torch.diag(torch.tensor([0.9, 1.0], dtype=torch.float64)).requires_grad_()
    Q = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    P0 = Q.clone()
    C = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    R = torch.tensor([[0.5]], dtype=torch.float64)
    x = torch.randn(20, 1, dtype=torch.float64)
    sm = kalman_smoother(x, A, C, Q, R, torch.zeros(2, dtype=torch.float64), P0)
    sm.smoothed_means.sum().backward()
    assert bool(torch.isfinite(A.grad).all())
