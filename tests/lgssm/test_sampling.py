"""LGSSM sampling: the one forward sampler and forward-filtering backward-sampling (FFBS).

Monte Carlo checks state their tolerance in standard errors (K_SE); oracles: the RTS smoother
and the dense joint Gaussian of the whole trajectory (tests/lgssm/lgssm_oracles.py).
"""

import pytest
import torch
from lgssm_oracles import dense_oracle, random_system

from pyrossm.datasets import simulate_linear_gaussian
from pyrossm.lgssm import LinearGaussianSSM, kalman_smoother
from pyrossm.lgssm.sampling import psd_factor, sample_lgssm, sample_posterior

K_SE = 5.0  # Monte Carlo tolerance in standard errors
F64 = torch.float64
NUM = 6000  # posterior draws


def params(s):
    return s["A"], s["C"], s["Q"], s["R"], s["init_mean"], s["init_cov"]


def assert_within_se(estimate, expected, se, name):
    z = ((estimate - expected) / se).abs()
    assert bool((z <= K_SE).all()), f"{name}: max |error| = {float(z.max()):.2f} SE > {K_SE}"


def check_moments(z, mean, cov, name):
    """Sample mean and covariance of draws ``z (S, d)`` against N(mean, cov), in SEs."""
    S = z.shape[0]
    var = torch.diagonal(cov)
    assert_within_se(z.mean(0), mean, (var / S).sqrt(), f"{name} means")
    c = z - z.mean(0)
    emp = c.T @ c / (S - 1)
    se = ((var.unsqueeze(-1) * var.unsqueeze(-2) + cov ** 2) / S).sqrt()
    assert_within_se(emp, cov, se, f"{name} covariances")


@pytest.mark.parametrize("missing", ["none", "entries", "steps"])
def test_ffbs_matches_smoother_and_dense_joint_gaussian(missing):
    """Draws of z_{1:T} | x: per-step moments = RTS smoother, the whole trajectory's covariance
    (lag cross-covariances included) = the dense joint Gaussian's, within K_SE standard errors."""
    T, n = 6, 2
    s = random_system(n, 2, T, seed=11, missing=missing)
    gen = torch.Generator().manual_seed(0)
    z = sample_posterior(s["x"], *params(s), num_samples=NUM, generator=gen)
    assert z.shape == (NUM, T, n)
    sm = kalman_smoother(s["x"], *params(s))
    for t in range(T):
        check_moments(z[:, t], sm.smoothed_means[t], sm.smoothed_covs[t], f"t={t}")
    oracle = dense_oracle(s["x"], *params(s))
    joint_mean = torch.as_tensor(oracle["smoothed_means"]).reshape(-1)
    check_moments(z.reshape(NUM, T * n), joint_mean, torch.as_tensor(oracle["joint_cov"]),
                  "trajectory")


def test_ffbs_mask_batch_and_model_method():
    """mask False = missing step; batched draws; LinearGaussianSSM.sample_posterior delegates."""
    s = random_system(2, 1, 7, seed=3, batch=(3,))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 2:4] = False
    x_nan = s["x"].clone()
    x_nan[0, 2:4] = float("nan")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = sample_posterior(s["x"], *params(s), 4, mask, generator=g1)
    b = sample_posterior(x_nan, *params(s), 4, generator=g2)
    assert a.shape == (4, 3, 7, 2)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ssm = LinearGaussianSSM.from_matrices(A=s["A"], C=s["C"], Q=s["Q"], R=s["R"],
                                          init_mean=s["init_mean"], init_cov=s["init_cov"],
                                          dtype=F64)
    c = ssm.sample_posterior(s["x"], 4, mask, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_ffbs_singular_Q_and_init_cov():
    """A = diag(.9, 1), Q = init_cov = diag(1, 0): the second state is the constant init_mean[1].
    Draws are finite, the constant is exact, and the first state's moments equal the smoother
    of the reduced 1-D model on x - c (within K_SE standard errors)."""
    T, c = 8, 0.7
    g = torch.Generator().manual_seed(2)
    A = torch.diag(torch.tensor([0.9, 1.0], dtype=F64))
    Q = P0 = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    C = torch.tensor([[1.0, 1.0]], dtype=F64)
    R = torch.tensor([[0.5]], dtype=F64)
    m0 = torch.tensor([0.0, c], dtype=F64)
    x = torch.randn(T, 1, generator=g, dtype=F64)
    z = sample_posterior(x, A, C, Q, R, m0, P0, num_samples=NUM,
                         generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(z).all())
    torch.testing.assert_close(z[..., 1], torch.full_like(z[..., 1], c), rtol=0, atol=1e-10)
    one = torch.ones(1, 1, dtype=F64)
    ref = kalman_smoother(x - c, 0.9 * one, one, one, R, m0[:1], one)
    for t in range(T):
        check_moments(z[:, t, :1], ref.smoothed_means[t], ref.smoothed_covs[t], f"t={t}")


def test_forward_sampler_is_shared_by_model_and_simulator():
    """LinearGaussianSSM.sample and simulate_linear_gaussian are sample_lgssm: same generator,
    same numbers."""
    s = random_system(3, 2, 1, seed=4)
    ssm = LinearGaussianSSM.from_matrices(A=s["A"], C=s["C"], Q=s["Q"], R=s["R"],
                                          init_mean=s["init_mean"], init_cov=s["init_cov"],
                                          dtype=F64)
    a = ssm.sample(9, 5, generator=torch.Generator().manual_seed(1))
    b = simulate_linear_gaussian(*params(s), num_steps=9, num_sequences=5, seed=1)
    c = sample_lgssm(*params(s), 9, (5,), generator=torch.Generator().manual_seed(1))
    for u, v in ((a, b), (a, c)):
        torch.testing.assert_close(u.z, v.z, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(u.x, v.x, rtol=1e-10, atol=1e-10)
    assert a.z.shape == (5, 9, 3) and a.x.shape == (5, 9, 2)


def test_forward_sampler_moments_and_transition_start():
    """z_2 of the prior sampler and z_1 after a 'transition' start: N(A m, A P Aᵀ + Q)."""
    s = random_system(2, 1, 1, seed=6)
    A, C, Q, R, m0, P0 = params(s)
    g = torch.Generator().manual_seed(3)
    z, x = sample_lgssm(A, C, Q, R, m0, P0, 2, (NUM,), generator=g)
    check_moments(z[:, 0], m0, P0, "z_1")
    check_moments(z[:, 1], A @ m0, A @ P0 @ A.T + Q, "z_2")
    check_moments(x[:, 1], C @ A @ m0, C @ (A @ P0 @ A.T + Q) @ C.T + R, "x_2")
    z, _ = sample_lgssm(A, C, Q, R, m0, P0, 1, (NUM,), start="transition", generator=g)
    check_moments(z[:, 0], A @ m0, A @ P0 @ A.T + Q, "transition start")


def test_psd_factor_and_bad_input():
    M = torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=F64)  # rank 1
    L = psd_factor("Q", M)
    torch.testing.assert_close(L @ L.T, M, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="Q: expected a positive semi-definite"):
        psd_factor("Q", -torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="Q: expected a symmetric"):
        psd_factor("Q", torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    s = random_system(1, 1, 4, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        sample_posterior(s["x"], *params(s), num_samples=0)
    with pytest.raises(ValueError, match="start"):
        sample_lgssm(*params(s), 3, start="end")
