"""Simulators: shapes, determinism, stability and moments (tolerances in standard errors)."""

from __future__ import annotations

import math

import pytest
import torch

from pyrossm.datasets import (
    LinearGaussianParams,
    lorenz_obs_matrix,
    random_stable_system,
    simulate_linear_gaussian,
    simulate_lorenz,
    simulate_pendulum,
)
from pyrossm.datasets.simulate import LORENZ_CENTER, LORENZ_SCALE

K_SE = 5.0  # Monte Carlo tolerance, in standard errors
F64 = torch.float64


def _within(estimate, truth, se, k=K_SE):
    estimate, truth, se = (torch.as_tensor(v, dtype=F64) for v in (estimate, truth, se))
    assert torch.all((estimate - truth).abs() <= k * se), (estimate, truth, se)


# --- random_stable_system ------------------------------------------------------------------


@pytest.mark.parametrize("state_dim,obs_dim", [(1, 1), (2, 3), (4, 2), (6, 4)])
@pytest.mark.parametrize("radius", [0.5, 0.9, 0.99])
def test_random_stable_system(state_dim, obs_dim, radius):
    p = random_stable_system(state_dim, obs_dim, spectral_radius=radius, seed=3, dtype=F64)
    assert isinstance(p, LinearGaussianParams)
    n, m = state_dim, obs_dim
    shapes = [(n, n), (m, n), (n, n), (m, m), (n,), (n, n)]
    assert [tuple(t.shape) for t in p] == shapes
    assert all(t.dtype == F64 for t in p)
    assert torch.linalg.eigvals(p.A).abs().max().item() == pytest.approx(radius, rel=1e-10)
    assert torch.linalg.matrix_norm(p.A, 2) <= 2 * radius + 1e-12
    for cov in (p.Q, p.R, p.init_cov):
        assert torch.equal(cov, cov.T)
        assert torch.linalg.eigvalsh(cov).min() > 0


def test_random_stable_system_determinism_and_errors():
    a = random_stable_system(3, 2, seed=7)
    b = random_stable_system(3, 2, generator=torch.Generator().manual_seed(7))
    c = random_stable_system(3, 2, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.A, c.A)
    assert a.A.dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="spectral_radius"):
        random_stable_system(2, 2, spectral_radius=1.0)
    with pytest.raises(ValueError, match="state_dim"):
        random_stable_system(0, 2)
    with pytest.raises(ValueError, match="seed, generator"):
        random_stable_system(2, 2, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="dtype"):
        random_stable_system(2, 2, dtype=torch.int64)


# --- simulate_linear_gaussian --------------------------------------------------------------


def test_linear_gaussian_shapes_dtype_determinism():
    p = random_stable_system(3, 2, seed=0, dtype=F64)
    z, x = simulate_linear_gaussian(*p, num_steps=17, num_sequences=5, seed=1)
    assert z.shape == (5, 17, 3) and x.shape == (5, 17, 2)
    assert z.dtype == F64 and x.dtype == F64
    z2, x2 = simulate_linear_gaussian(*p, num_steps=17, num_sequences=5, seed=1)
    assert torch.equal(z, z2) and torch.equal(x, x2)
    z3, _ = simulate_linear_gaussian(*p, num_steps=17, num_sequences=5, seed=2)
    assert not torch.equal(z, z3)
    torch.manual_seed(11)
    z4, _ = simulate_linear_gaussian(*p, num_steps=4)
    torch.manual_seed(11)
    z5, _ = simulate_linear_gaussian(*p, num_steps=4)
    assert torch.equal(z4, z5)


def test_linear_gaussian_follows_the_recursion():
    """With zero noise the trajectory is exactly z_t = A z_{t-1}, x_t = C z_t."""
    p = random_stable_system(3, 2, seed=0, dtype=F64)
    zeros_n, zeros_p = torch.zeros(3, 3, dtype=F64), torch.zeros(2, 2, dtype=F64)
    z, x = simulate_linear_gaussian(p.A, p.C, zeros_n, zeros_p, p.init_mean, zeros_n, 6, seed=0)
    expected = [p.init_mean]
    for _ in range(5):
        expected.append(p.A @ expected[-1])
    torch.testing.assert_close(z[0], torch.stack(expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x[0], z[0] @ p.C.T, rtol=1e-12, atol=1e-12)


def test_linear_gaussian_singular_noise():
    """A rank-one Q = [[1, 1], [1, 1]] moves both coordinates together."""
    A = torch.zeros(2, 2, dtype=F64)
    Q = torch.ones(2, 2, dtype=F64)
    z, _ = simulate_linear_gaussian(
        A,
        torch.eye(2, dtype=F64),
        Q,
        torch.eye(2, dtype=F64),
        torch.zeros(2, dtype=F64),
        Q,
        5,
        3,
        seed=0,
    )
    torch.testing.assert_close(z[..., 0], z[..., 1], rtol=0, atol=1e-12)
    assert z.std() > 0.1


def test_scalar_ar1_stationary_moments():
    """z_t = a z_{t-1} + w_t, x_t = z_t + v_t from the stationary start: Var z = q / (1 - a²),
    Cov(z_t, z_{t+1}) = a Var z, Var x = Var z + r at every t."""
    a, q, r = 0.8, 0.5, 0.2
    var = q / (1 - a**2)
    N, T = 20_000, 4
    tensor = lambda v: torch.tensor([[v]], dtype=F64)  # noqa: E731
    z, x = simulate_linear_gaussian(
        tensor(a),
        tensor(1.0),
        tensor(q),
        tensor(r),
        torch.zeros(1, dtype=F64),
        tensor(var),
        T,
        N,
        seed=5,
    )
    z, x = z[..., 0], x[..., 0]
    _within(z.mean(0), 0.0, math.sqrt(var / N))
    _within(z.var(0), var, var * math.sqrt(2 / (N - 1)))
    _within(x.var(0), var + r, (var + r) * math.sqrt(2 / (N - 1)))
    lag1 = (z[:, 1:] * z[:, :-1]).mean(0)
    _within(lag1, a * var, var * math.sqrt((1 + a**2) / N))
    _within((x * z).mean(0), var, math.sqrt((var * (var + r) + var**2) / N))


def test_scalar_ar1_transient_moments():
    """From z_1 ~ N(m, P): E z_t = a^(t-1) m, Var z_t = a² Var z_{t-1} + q."""
    a, q, m, P = 0.6, 0.3, 2.0, 0.1
    N, T = 20_000, 6
    tensor = lambda v: torch.tensor([[v]], dtype=F64)  # noqa: E731
    z, _ = simulate_linear_gaussian(
        tensor(a),
        tensor(1.0),
        tensor(q),
        tensor(1.0),
        torch.tensor([m], dtype=F64),
        tensor(P),
        T,
        N,
        seed=9,
    )
    means, variances = [m], [P]
    for _ in range(T - 1):
        means.append(a * means[-1])
        variances.append(a**2 * variances[-1] + q)
    variances = torch.tensor(variances, dtype=F64)
    _within(z[..., 0].mean(0), means, (variances / N).sqrt())
    _within(z[..., 0].var(0), variances, variances * math.sqrt(2 / (N - 1)))


def test_multivariate_stationary_covariance():
    """P = A P Aᵀ + Q (discrete Lyapunov); from z_1 ~ N(0, P), Cov z_t = P, Cov x_t = C P Cᵀ + R."""
    p = random_stable_system(2, 2, seed=1, dtype=F64)
    n = 2
    vec_P = torch.linalg.solve(torch.eye(n * n, dtype=F64) - torch.kron(p.A, p.A), p.Q.reshape(-1))
    P = vec_P.reshape(n, n)
    P = 0.5 * (P + P.T)
    N = 20_000
    z, x = simulate_linear_gaussian(p.A, p.C, p.Q, p.R, torch.zeros(n, dtype=F64), P, 3, N, seed=2)
    for samples, cov in ((z[:, -1], P), (x[:, -1], p.C @ P @ p.C.T + p.R)):
        emp = samples.T @ samples / N  # mean is zero
        se = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :] + cov**2) / N).sqrt()
        _within(emp, cov, se)


def test_linear_gaussian_input_errors():
    p = random_stable_system(2, 1, seed=0)
    with pytest.raises(ValueError, match=r"C: expected shape \(p, 2\)"):
        simulate_linear_gaussian(p.A, torch.ones(1, 3), *p[2:], num_steps=3)
    with pytest.raises(ValueError, match=r"R: expected shape \(1, 1\)"):
        simulate_linear_gaussian(p.A, p.C, p.Q, torch.eye(2), p.init_mean, p.init_cov, 3)
    with pytest.raises(ValueError, match="num_steps"):
        simulate_linear_gaussian(*p, num_steps=0)
    with pytest.raises(ValueError, match="Q: expected a positive semi-definite"):
        simulate_linear_gaussian(p.A, p.C, -torch.eye(2), p.R, p.init_mean, p.init_cov, 3)
    with pytest.raises(ValueError, match="Q: expected a symmetric"):
        simulate_linear_gaussian(
            p.A, p.C, torch.tensor([[1.0, 0.5], [0.0, 1.0]]), p.R, p.init_mean, p.init_cov, 3
        )
    with pytest.raises(TypeError, match="A: expected a torch.Tensor"):
        simulate_linear_gaussian(p.A.tolist(), *p[1:], num_steps=3)


# --- nonlinear systems ---------------------------------------------------------------------


def test_pendulum_dynamics_and_noise():
    dt, g, damping, sigma_p, sigma_o = 0.05, 9.81, 0.1, 0.3, 0.05
    N, T = 400, 30
    z, x = simulate_pendulum(
        N,
        T,
        dt=dt,
        gravity_over_length=g,
        damping=damping,
        process_noise=sigma_p,
        obs_noise=sigma_o,
        seed=0,
        dtype=F64,
    )
    assert z.shape == (N, T, 2) and x.shape == (N, T, 2) and z.dtype == F64
    theta, omega = z[..., 0], z[..., 1]
    # θ_t = θ_{t-1} + dt ω_t exactly
    torch.testing.assert_close(theta[:, 1:] - theta[:, :-1], dt * omega[:, 1:])
    # ω increments minus the drift are N(0, dt σ_p²)
    drift = dt * (-g * torch.sin(theta[:, :-1]) - damping * omega[:, :-1])
    noise = (omega[:, 1:] - omega[:, :-1] - drift).flatten()
    var_w, M = dt * sigma_p**2, noise.numel()
    _within(noise.mean(), 0.0, math.sqrt(var_w / M))
    _within(noise.var(), var_w, var_w * math.sqrt(2 / (M - 1)))
    # observation noise around (sin θ, cos θ)
    residual = (x - torch.stack([torch.sin(theta), torch.cos(theta)], -1)).flatten()
    M = residual.numel()
    _within(residual.var(), sigma_o**2, sigma_o**2 * math.sqrt(2 / (M - 1)))
    assert theta[:, 0].abs().max() <= math.pi


def test_pendulum_determinism_dtype():
    a = simulate_pendulum(3, 20, seed=4)
    b = simulate_pendulum(3, 20, generator=torch.Generator().manual_seed(4))
    c = simulate_pendulum(3, 20, seed=5)
    assert torch.equal(a.z, b.z) and torch.equal(a.x, b.x)
    assert not torch.equal(a.z, c.z)
    assert a.z.dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="dt"):
        simulate_pendulum(1, 5, dt=0.0)


def test_lorenz_shapes_determinism_and_observation_map():
    a = simulate_lorenz(4, 25, obs_dim=5, seed=1, dtype=F64)
    b = simulate_lorenz(4, 25, obs_dim=5, generator=torch.Generator().manual_seed(1), dtype=F64)
    c = simulate_lorenz(4, 25, obs_dim=5, seed=2, dtype=F64)
    assert a.z.shape == (4, 25, 3) and a.x.shape == (4, 25, 5)
    assert torch.equal(a.z, b.z) and torch.equal(a.x, b.x)
    assert not torch.equal(a.z, c.z)
    assert torch.isfinite(a.z).all() and torch.isfinite(a.x).all()
    # the default observation map is the same for every data seed
    W = lorenz_obs_matrix(5, dtype=F64)
    center, scale = (torch.tensor(v, dtype=F64) for v in (LORENZ_CENTER, LORENZ_SCALE))
    for sim in (a, c):
        residual = sim.x - torch.tanh(((sim.z - center) / scale) @ W.T)
        assert residual.abs().max() < 0.1 * 6  # obs_noise = 0.1, 6 sd
    with pytest.raises(ValueError, match="obs_matrix"):
        simulate_lorenz(1, 3, obs_matrix=torch.ones(2, 2))


def test_lorenz_drift_without_noise():
    """With no process noise one recorded step agrees with a fine Euler integration."""
    dt, sigma, rho, beta = 0.01, 10.0, 28.0, 8.0 / 3.0
    z, _ = simulate_lorenz(3, 2, dt=dt, substeps=2, process_noise=0.0, burn_in=0, seed=0, dtype=F64)
    u = z[:, 0].clone()
    h = dt / 2000
    for _ in range(2000):
        a, b, c = u.unbind(-1)
        u = u + h * torch.stack([sigma * (b - a), a * (rho - c) - b, a * b - beta * c], -1)
    torch.testing.assert_close(z[:, 1], u, rtol=0, atol=1e-3)
    assert (z[:, 1] - z[:, 0]).abs().max() > 1e-2  # it moved


def test_lorenz_stays_on_attractor():
    z, _ = simulate_lorenz(16, 200, seed=3, dtype=F64)
    mean = z.mean((0, 1))
    assert (mean[2] - LORENZ_CENTER[2]).abs() < 3.0
    assert z.abs().max() < 60


@pytest.mark.cuda
def test_simulators_on_cuda_match_cpu():
    p = random_stable_system(3, 2, seed=0, dtype=F64, device="cuda")
    assert p.A.device.type == "cuda"
    z_gpu, x_gpu = simulate_linear_gaussian(*p, num_steps=10, num_sequences=2, seed=1)
    z_cpu, x_cpu = simulate_linear_gaussian(
        *(t.cpu() for t in p), num_steps=10, num_sequences=2, seed=1
    )
    assert z_gpu.device.type == "cuda"
    torch.testing.assert_close(z_gpu.cpu(), z_cpu)
    torch.testing.assert_close(x_gpu.cpu(), x_cpu)
    for simulate in (simulate_pendulum, simulate_lorenz):
        gpu = simulate(2, 10, seed=3, dtype=F64, device="cuda")
        cpu = simulate(2, 10, seed=3, dtype=F64)
        assert gpu.z.device.type == "cuda"
        torch.testing.assert_close(gpu.z.cpu(), cpu.z)
