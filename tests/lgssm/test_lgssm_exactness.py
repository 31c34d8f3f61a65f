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
