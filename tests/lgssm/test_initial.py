"""Initial-state options of LinearGaussianSSM (float64): stationary = the discrete Lyapunov
solution (scipy oracle), approximate diffuse = κ I with the first state_dim terms burned,
fixed, learned (warns with one sequence); dtype follows tensor inputs."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from pyrossm.lgssm import LinearGaussianSSM, kalman_filter, stationary_covariance

F64 = torch.float64
RTOL = 1e-10


def stable_system(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64)
    A = 0.9 * A / torch.linalg.eigvals(A).abs().max()
    B = torch.randn(n, n, generator=g, dtype=F64)
    return A, B @ B.T + 0.1 * torch.eye(n, dtype=F64)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_stationary_covariance_is_the_lyapunov_solution(n):
    A, Q = stable_system(n, seed=n)
    P = stationary_covariance(A, Q)
    expected = scipy.linalg.solve_discrete_lyapunov(A.numpy(), Q.numpy())
    np.testing.assert_allclose(P.numpy(), expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    # and it is the fixed point of the covariance recursion
    torch.testing.assert_close(A @ P @ A.T + Q, P, rtol=RTOL, atol=1e-12)


def test_stationary_covariance_is_differentiable_and_batched():
    A, Q = stable_system(2)
    A = torch.stack([A, 0.5 * A]).requires_grad_()
    P = stationary_covariance(A, Q)
    assert P.shape == (2, 2, 2)
    P.sum().backward()
    assert torch.isfinite(A.grad).all()


def test_unstable_A_raises():
    with pytest.raises(ValueError, match="A: expected a stable matrix"):
        stationary_covariance(torch.eye(2, dtype=F64), torch.eye(2, dtype=F64))
    ssm = LinearGaussianSSM.from_matrices(A=1.01, C=1.0, Q=1.0, R=1.0, init="stationary")
    with pytest.raises(ValueError, match="spectral radius"):
        _ = ssm.init_cov


def test_model_stationary_init():
    A, Q = stable_system(2)
    ssm = LinearGaussianSSM.from_matrices(A=A, C=torch.ones(1, 2, dtype=F64), Q=Q, R=1.0,
                                          init="stationary")
    expected = scipy.linalg.solve_discrete_lyapunov(A.numpy(), Q.numpy())
    np.testing.assert_allclose(ssm.init_cov.detach().numpy(), expected, rtol=1e-10)
    assert float(ssm.init_mean.abs().max()) == 0.0 and ssm.loglikelihood_burn == 0
    x = torch.randn(2, 20, 1, dtype=F64)
    ref = kalman_filter(x, A, ssm.C, Q, ssm.R, torch.zeros(2, dtype=F64),
                        torch.tensor(expected))
    torch.testing.assert_close(ssm.log_prob(x), ref.log_likelihood, rtol=RTOL, atol=0)
    # sampling uses the same initial distribution
    z, _ = ssm.sample(3, num_samples=4)
    assert z.shape == (4, 3, 2)


def test_model_diffuse_init():
    ssm = LinearGaussianSSM(2, 1, dtype=F64, init="diffuse")
    torch.testing.assert_close(ssm.init_cov, 1e6 * torch.eye(2, dtype=F64))
    assert ssm.loglikelihood_burn == 2
    assert "init_mean" not in ssm._learn and "init_cov" not in ssm._learn
    ssm = LinearGaussianSSM(2, 1, dtype=F64, init="diffuse", diffuse_variance=1e4)
    assert float(ssm.init_cov[0, 0]) == 1e4


def test_init_options_and_learn():
    assert LinearGaussianSSM(1, 1).init == "learned"
    assert LinearGaussianSSM(1, 1, learn=("A", "Q")).init == "fixed"
    fixed = LinearGaussianSSM(1, 1, init="fixed")
    assert "init_mean" not in fixed._learn
    learned = LinearGaussianSSM(1, 1, learn=("Q",), init="learned")
    assert {"init_mean", "init_cov", "Q"} <= set(learned._learn)
    assert LinearGaussianSSM(1, 1, init="stationary").stationary  # A learned: kept stable
    with pytest.raises(ValueError, match="init"):
        LinearGaussianSSM(1, 1, init="exact")
    with pytest.raises(ValueError, match="init_mean, init_cov"):
        LinearGaussianSSM.from_matrices(A=0.5, C=1.0, Q=1.0, R=1.0, init_cov=2.0, init="diffuse")


def test_learned_init_with_one_sequence_warns():
    x = torch.randn(1, 30, 1, dtype=F64)
    with pytest.warns(UserWarning, match="init='learned' with one sequence"):
        LinearGaussianSSM(1, 1, dtype=F64, init="learned").fit(x, num_steps=1, std_errors=False)


def test_default_init_on_one_sequence_is_diffuse_and_converges():
    # The call: LinearGaussianSSM(2, 3).fit(x) on one standardised 3-column series with
    # NaN. A learned initial state from one draw degenerated (R singular, unconverged); the
    # default now switches to the approximate diffuse prior and reaches the diffuse MLE.
    g = torch.Generator().manual_seed(0)
    truth = LinearGaussianSSM.from_matrices(
        A=[[0.8, 0.1], [0.0, 0.5]], C=[[1.0, 0.0], [0.5, 1.0], [0.3, -0.7]],
        Q=[[0.5, 0.0], [0.0, 0.3]], R=0.4 * torch.eye(3), dtype=F64,
    )
    torch.manual_seed(0)
    _, x = truth.sample(200, num_samples=1)
    x[torch.rand(x.shape, generator=g, dtype=F64) < 0.1] = float("nan")
    default = LinearGaussianSSM(2, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # boundary notes are not the point here
        res = default.fit(x, std_errors=False)
        explicit = LinearGaussianSSM(2, 3, dtype=F64, init="diffuse")
        ref = explicit.fit(x, std_errors=False)
    assert default.init == "diffuse" and "init_mean" not in default._learn
    assert res.converged, res.message
    assert float(res.log_likelihood) == pytest.approx(float(ref.log_likelihood), abs=1e-4)
    f = default.forecast(x, 4)
    assert torch.isfinite(f.means).all() and torch.isfinite(f.covs).all()
    # several sequences keep the learned initial state
    many = LinearGaussianSSM(1, 1, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        many.fit(torch.randn(4, 30, 1, dtype=F64), num_steps=1, std_errors=False)
    assert many.init == "learned"


def test_from_matrices_dtype_follows_tensor_inputs():
    A = torch.eye(2, dtype=F64)
    ssm = LinearGaussianSSM.from_matrices(A=A, C=torch.ones(1, 2, dtype=F64), Q=A, R=[[1.0]])
    assert ssm.A.dtype == F64 and ssm.Q.dtype == F64 and ssm.init_mean.dtype == F64
    x = torch.randn(1, 5, 1, dtype=F64)
    assert ssm.log_prob(x).dtype == F64
    assert LinearGaussianSSM.from_matrices(A=0.5, C=1.0, Q=1.0, R=1.0).A.dtype == torch.float32
    assert LinearGaussianSSM.from_matrices(A=A, C=torch.ones(1, 2), Q=A, R=1.0,
                                           dtype=torch.float32).A.dtype == torch.float32


def test_fixed_singular_Q_is_accepted():
    Q = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    ssm = LinearGaussianSSM.from_matrices(A=torch.eye(2, dtype=F64), C=torch.ones(1, 2, dtype=F64),
                                          Q=Q, R=1.0)
    torch.testing.assert_close(ssm.Q, Q)
    with pytest.raises(ValueError, match="Q: expected a symmetric positive-definite"):
        LinearGaussianSSM.from_matrices(A=torch.eye(2, dtype=F64), C=torch.ones(1, 2, dtype=F64),
                                        Q=Q, R=1.0, learn=("Q",))
