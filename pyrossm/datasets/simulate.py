"""Simulated sequences: linear-Gaussian state-space models, a noisy pendulum, Lorenz-63.

Every simulator returns ``Simulation(z, x)``: latent states ``z`` of shape
``(num_sequences, num_steps, state_dim)`` and observations ``x`` of shape
``(num_sequences, num_steps, obs_dim)`` (time at dim -2). Results are deterministic given
``seed=`` (an int) or ``generator=`` (a ``torch.Generator``); with neither, the global torch RNG
is used. Random numbers are drawn on the generator's device (the CPU by default) and then moved
to ``device``, so a seed gives the same numbers on every device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "LORENZ_CENTER",
    "LORENZ_SCALE",
    "LinearGaussianParams",
    "Simulation",
    "lorenz_obs_matrix",
    "random_stable_system",
    "simulate_linear_gaussian",
    "simulate_lorenz",
    "simulate_pendulum",
]

# Approximate mean and standard deviation of the Lorenz-63 attractor (σ=10, ρ=28, β=8/3),
# used to standardize the state before the observation nonlinearity.
LORENZ_CENTER = (0.0, 0.0, 23.5)
LORENZ_SCALE = (7.9, 9.0, 8.6)


class LinearGaussianParams(NamedTuple):
    """Parameters of z_1 ~ N(init_mean, init_cov), z_t = A z_{t-1} + w_t, x_t = C z_t + v_t,
    w_t ~ N(0, Q), v_t ~ N(0, R). Shapes: A (n, n), C (p, n), Q (n, n), R (p, p),
    init_mean (n,), init_cov (n, n)."""

    A: torch.Tensor
    C: torch.Tensor
    Q: torch.Tensor
    R: torch.Tensor
    init_mean: torch.Tensor
    init_cov: torch.Tensor


class Simulation(NamedTuple):
    """Simulated latents ``z`` (N, T, state_dim) and observations ``x`` (N, T, obs_dim)."""

    z: torch.Tensor
    x: torch.Tensor


def _make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("seed, generator: expected at most one of them, got both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator: expected a torch.Generator, got {type(generator).__name__}"
            )
        return generator
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        return torch.Generator().manual_seed(seed)
    return None


def _randn(shape, gen, dtype, device) -> torch.Tensor:
    gen_device = gen.device if gen is not None else torch.device("cpu")
    return torch.randn(*shape, generator=gen, dtype=dtype, device=gen_device).to(device)


def _rand(shape, gen, dtype, device) -> torch.Tensor:
    gen_device = gen.device if gen is not None else torch.device("cpu")
    return torch.rand(*shape, generator=gen, dtype=dtype, device=gen_device).to(device)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _resolve_dtype(dtype: torch.dtype | None) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    return dtype


def random_stable_system(
    state_dim: int,
    obs_dim: int,
    *,
    spectral_radius: float = 0.9,
    process_noise: float = 0.1,
    obs_noise: float = 0.1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LinearGaussianParams:
    """A random stable linear-Gaussian state-space model.

    A = G · spectral_radius / ρ(G) with G = (Haar orthogonal) · diag(s), s_i ~ U(0.5, 1), so
    ρ(A) = spectral_radius exactly and ‖A‖₂ ≤ 2 · spectral_radius;
    C_ij ~ N(0, 1); Q = process_noise · (W Wᵀ/n + I), R = obs_noise · (V Vᵀ/p + I),
    init_cov = U Uᵀ/n + I (all positive definite); init_mean ~ N(0, I).

    >>> p = random_stable_system(3, 2, seed=0, dtype=torch.float64)
    >>> p.A.shape, p.C.shape, round(torch.linalg.eigvals(p.A).abs().max().item(), 6)
    (torch.Size([3, 3]), torch.Size([2, 3]), 0.9)
    """
    n, p = _check_count("state_dim", state_dim), _check_count("obs_dim", obs_dim)
    if not 0 <= spectral_radius < 1:
        raise ValueError(f"spectral_radius: expected a value in [0, 1), got {spectral_radius}")
    for name, value in (("process_noise", process_noise), ("obs_noise", obs_noise)):
        if not value > 0:
            raise ValueError(f"{name}: expected a positive variance scale, got {value}")
    dtype = _resolve_dtype(dtype)
    gen = _make_generator(seed, generator)
    f64 = torch.float64
    # G = (random orthogonal) · diag(s), s ~ U(0.5, 1): ρ(G) ≥ |det G|^(1/n) ≥ 0.5, so the
    # rescaled A is well conditioned (‖A‖₂ ≤ 2 · spectral_radius) yet not normal.
    H, Rfac = torch.linalg.qr(_randn((n, n), gen, f64, "cpu"))
    H = H * torch.sign(torch.diagonal(Rfac)).where(torch.diagonal(Rfac) != 0, torch.ones(()))
    G = H * (0.5 + 0.5 * _rand((n,), gen, f64, "cpu"))
    rho = torch.linalg.eigvals(G).abs().max()
    A = G * (spectral_radius / rho)
    C = _randn((p, n), gen, f64, "cpu")
    W = _randn((n, n), gen, f64, "cpu")
    V = _randn((p, p), gen, f64, "cpu")
    U = _randn((n, n), gen, f64, "cpu")
    init_mean = _randn((n,), gen, f64, "cpu")
    eye_n, eye_p = torch.eye(n, dtype=f64), torch.eye(p, dtype=f64)
    # F Fᵀ is not always bitwise symmetric (an AVX-512 matmul sums (i, j) and (j, i) in
    # different orders): the mean with the transpose is
    def spd(F, d, eye):
        M = F @ F.T
        return 0.5 * (M + M.T) / d + eye
    Q = process_noise * spd(W, n, eye_n)
    R = obs_noise * spd(V, p, eye_p)
    init_cov = spd(U, n, eye_n)
    return LinearGaussianParams(
        *(t.to(device=device, dtype=dtype) for t in (A, C, Q, R, init_mean, init_cov))
    )


def simulate_linear_gaussian(
    A: torch.Tensor,
    C: torch.Tensor,
    Q: torch.Tensor,
    R: torch.Tensor,
    init_mean: torch.Tensor,
    init_cov: torch.Tensor,
    num_steps: int,
    num_sequences: int = 1,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Simulation:
    """Sample sequences from a linear-Gaussian state-space model (column vectors):

        z_1 ~ N(init_mean, init_cov),  z_t = A z_{t-1} + w_t,  x_t = C z_t + v_t,
        w_t ~ N(0, Q),  v_t ~ N(0, R).

    Shapes: A (n, n), C (p, n), Q (n, n), R (p, p), init_mean (n,), init_cov (n, n).
    Returns ``Simulation(z (num_sequences, num_steps, n), x (num_sequences, num_steps, p))``
    on A's device and dtype. Q, R and init_cov may be singular (positive semi-definite).
    The sampler is :func:`pyrossm.lgssm.sampling.sample_lgssm` (shared with
    ``LinearGaussianSSM.sample`` and ``.forecast``); without ``seed``/``generator`` it draws from
    the global RNG on A's device.

    >>> p = random_stable_system(2, 1, seed=0)
    >>> z, x = simulate_linear_gaussian(*p, num_steps=50, num_sequences=4, seed=1)
    >>> z.shape, x.shape
    (torch.Size([4, 50, 2]), torch.Size([4, 50, 1]))
    """
    for name, value in (
        ("A", A),
        ("C", C),
        ("Q", Q),
        ("R", R),
        ("init_mean", init_mean),
        ("init_cov", init_cov),
    ):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A: expected shape (n, n), got {tuple(A.shape)}")
    n = A.shape[0]
    if C.dim() != 2 or C.shape[1] != n:
        raise ValueError(f"C: expected shape (p, {n}), got {tuple(C.shape)}")
    p = C.shape[0]
    expected = {
        "Q": (Q, (n, n)),
        "R": (R, (p, p)),
        "init_mean": (init_mean, (n,)),
        "init_cov": (init_cov, (n, n)),
    }
    for name, (value, shape) in expected.items():
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")
    for name, value in (("A", A), ("C", C), *((k, v) for k, (v, _) in expected.items())):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: expected finite values, got NaN or Inf entries")
    num_steps = _check_count("num_steps", num_steps)
    num_sequences = _check_count("num_sequences", num_sequences)
    dtype, device = A.dtype, A.device
    if not dtype.is_floating_point:
        raise ValueError(f"A: expected a floating dtype, got {dtype}")
    C, Q, R, init_mean, init_cov = (
        t.to(device=device, dtype=dtype) for t in (C, Q, R, init_mean, init_cov)
    )
    # The one LGSSM sampler (also behind LinearGaussianSSM.sample and .forecast).
    from ..lgssm.sampling import sample_lgssm

    gen = _make_generator(seed, generator)  # None: the global RNG, on A's device
    z, x = sample_lgssm(A, C, Q, R, init_mean, init_cov, num_steps, (num_sequences,),
                        generator=gen)
    return Simulation(z, x)


def simulate_pendulum(
    num_sequences: int,
    num_steps: int,
    *,
    dt: float = 0.1,
    gravity_over_length: float = 9.81,
    damping: float = 0.05,
    process_noise: float = 0.1,
    obs_noise: float = 0.05,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Simulation:
    """A noisy damped pendulum whose angle is seen through (sin, cos) plus noise.

    Latent z_t = (θ_t, ω_t) (angle, not wrapped; angular velocity), semi-implicit Euler steps:

        ω_t = ω_{t-1} + dt (−(g/l) sin θ_{t-1} − damping ω_{t-1}) + √dt · process_noise · ε_t
        θ_t = θ_{t-1} + dt ω_t
        x_t = (sin θ_t, cos θ_t) + obs_noise · η_t,     ε_t, η_t ~ N(0, I)

    with θ_1 ~ Uniform(−π, π), ω_1 ~ N(0, 1). Returns ``Simulation(z (N, T, 2), x (N, T, 2))``.

    >>> z, x = simulate_pendulum(3, 40, seed=0)
    >>> z.shape, x.shape
    (torch.Size([3, 40, 2]), torch.Size([3, 40, 2]))
    """
    N, T = _check_count("num_sequences", num_sequences), _check_count("num_steps", num_steps)
    for name, value in (("dt", dt), ("gravity_over_length", gravity_over_length)):
        if not value > 0:
            raise ValueError(f"{name}: expected a positive number, got {value}")
    for name, value in (
        ("damping", damping),
        ("process_noise", process_noise),
        ("obs_noise", obs_noise),
    ):
        if not value >= 0:
            raise ValueError(f"{name}: expected a non-negative number, got {value}")
    dtype = _resolve_dtype(dtype)
    gen = _make_generator(seed, generator)
    theta = (2 * _rand((N,), gen, dtype, device) - 1) * math.pi
    omega = _randn((N,), gen, dtype, device)
    eps = _randn((N, T - 1), gen, dtype, device) * (math.sqrt(dt) * process_noise)
    eta = _randn((N, T, 2), gen, dtype, device) * obs_noise
    states = [torch.stack([theta, omega], dim=-1)]
    for t in range(T - 1):
        omega = omega + dt * (-gravity_over_length * torch.sin(theta) - damping * omega) + eps[:, t]
        theta = theta + dt * omega
        states.append(torch.stack([theta, omega], dim=-1))
    z = torch.stack(states, dim=-2)
    x = torch.stack([torch.sin(z[..., 0]), torch.cos(z[..., 0])], dim=-1) + eta
    return Simulation(z, x)


def lorenz_obs_matrix(
    obs_dim: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The default observation map of :func:`simulate_lorenz`: a fixed (obs_dim, 3) matrix with
    N(0, 1/3) entries drawn from its own seed (0), the same for every data seed."""
    obs_dim = _check_count("obs_dim", obs_dim)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(obs_dim, 3, generator=gen, dtype=torch.float64) / math.sqrt(3)
    return W.to(device=device, dtype=_resolve_dtype(dtype))


def _lorenz_drift(z: torch.Tensor, sigma: float, rho: float, beta: float) -> torch.Tensor:
    u, v, w = z.unbind(-1)
    return torch.stack([sigma * (v - u), u * (rho - w) - v, u * v - beta * w], dim=-1)


def simulate_lorenz(
    num_sequences: int,
    num_steps: int,
    *,
    obs_dim: int = 6,
    dt: float = 0.05,
    substeps: int = 5,
    sigma: float = 10.0,
    rho: float = 28.0,
    beta: float = 8.0 / 3.0,
    process_noise: float = 1.0,
    obs_noise: float = 0.1,
    burn_in: int = 100,
    obs_matrix: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Simulation:
    """The Lorenz-63 system with process noise, seen through tanh of a linear map plus noise.

        dz = f(z) dt + process_noise dW,  f(u, v, w) = (σ(v − u), u(ρ − w) − v, uv − βw)
        x_t = tanh(W (z_t − center) / scale) + obs_noise · η_t,   η_t ~ N(0, I)

    Each recorded step spans ``dt``, integrated by ``substeps`` steps of size h = dt/substeps
    (a Runge–Kutta-4 drift step plus a √h · process_noise · N(0, I) increment). The start is
    drawn around the attractor and ``burn_in`` unrecorded steps are discarded. ``center`` and
    ``scale`` are the attractor's approximate mean and standard deviation
    (:data:`LORENZ_CENTER`, :data:`LORENZ_SCALE`); W is ``obs_matrix`` (obs_dim, 3), by default
    :func:`lorenz_obs_matrix` (fixed, independent of the data seed, so train/test sets
    simulated with different seeds share one system).
    Returns ``Simulation(z (N, T, 3), x (N, T, obs_dim))``.

    Reference: Lorenz (1963), "Deterministic nonperiodic flow", J. Atmos. Sci. 20, 130–141.

    >>> z, x = simulate_lorenz(2, 30, obs_dim=4, seed=0)
    >>> z.shape, x.shape
    (torch.Size([2, 30, 3]), torch.Size([2, 30, 4]))
    """
    N, T = _check_count("num_sequences", num_sequences), _check_count("num_steps", num_steps)
    substeps = _check_count("substeps", substeps)
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in: expected a non-negative int, got {burn_in!r}")
    if not dt > 0:
        raise ValueError(f"dt: expected a positive number, got {dt}")
    for name, value in (("process_noise", process_noise), ("obs_noise", obs_noise)):
        if not value >= 0:
            raise ValueError(f"{name}: expected a non-negative number, got {value}")
    dtype = _resolve_dtype(dtype)
    if obs_matrix is None:
        W = lorenz_obs_matrix(obs_dim, dtype=dtype, device=device)
    else:
        if (
            not isinstance(obs_matrix, torch.Tensor)
            or obs_matrix.dim() != 2
            or (obs_matrix.shape[1] != 3)
        ):
            raise ValueError(
                f"obs_matrix: expected a tensor of shape (obs_dim, 3), got "
                f"{getattr(obs_matrix, 'shape', type(obs_matrix).__name__)}"
            )
        W = obs_matrix.to(device=device, dtype=dtype)
    gen = _make_generator(seed, generator)
    center = torch.tensor(LORENZ_CENTER, dtype=dtype, device=device)
    scale = torch.tensor(LORENZ_SCALE, dtype=dtype, device=device)
    h = dt / substeps
    noise_scale = math.sqrt(h) * process_noise

    def step(z: torch.Tensor) -> torch.Tensor:
        noise = _randn((substeps, N, 3), gen, dtype, device) * noise_scale
        for s in range(substeps):
            k1 = _lorenz_drift(z, sigma, rho, beta)
            k2 = _lorenz_drift(z + 0.5 * h * k1, sigma, rho, beta)
            k3 = _lorenz_drift(z + 0.5 * h * k2, sigma, rho, beta)
            k4 = _lorenz_drift(z + h * k3, sigma, rho, beta)
            z = z + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4) + noise[s]
        return z

    z_t = center + scale * _randn((N, 3), gen, dtype, device)
    for _ in range(burn_in):
        z_t = step(z_t)
    states = [z_t]
    for _ in range(T - 1):
        z_t = step(z_t)
        states.append(z_t)
    z = torch.stack(states, dim=-2)
    eta = _randn((N, T, W.shape[0]), gen, dtype, device) * obs_noise
    x = torch.tanh(((z - center) / scale) @ W.T) + eta
    return Simulation(z, x)
