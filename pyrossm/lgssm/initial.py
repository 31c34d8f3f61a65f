"""Initial-state distributions z_1 ~ N(init_mean, init_cov) for linear-Gaussian SSMs.

The four options of :class:`~pyrossm.lgssm.LinearGaussianSSM` (``init=``), as statsmodels has
them (``statsmodels.tsa.statespace.initialization``):

* ``"stationary"``: z_1 has the stationary distribution of z_t = A z_{t-1} + B ε_t,
  mean 0 and covariance P solving the discrete Lyapunov equation ``P = A P Aᵀ + Q``
  (needs A stable: all eigenvalues inside the unit circle).
* ``"diffuse"``: *approximate* diffuse initialisation, as statsmodels'
  ``approximate_diffuse``: mean 0, covariance ``κ I`` with κ = 1e6 by default, and the
  log-likelihood terms of the first ``state_dim`` steps dropped ("burned"), as statsmodels'
  ``loglikelihood_burn``. It is not the exact diffuse filter of Durbin & Koopman (2012, §5.2):
  the burned likelihood agrees with the exact diffuse one up to O(1/κ) relative terms when
  the data's scale is much smaller than √κ.
* ``"fixed"``: given values, not learned.
* ``"learned"``: init_mean and init_cov are parameters. Only meaningful with many sequences:
  from one sequence the initial covariance is estimated from a single draw and degenerates.

Reference: Durbin & Koopman, *Time Series Analysis by State Space Methods* (2012), §5.6.

>>> import torch
>>> A = torch.tensor([[0.5]], dtype=torch.float64); Q = torch.tensor([[0.75]], dtype=torch.float64)
>>> stationary_covariance(A, Q)          # 0.75 / (1 - 0.25)
tensor([[1.]], dtype=torch.float64)
"""

from __future__ import annotations

import torch

__all__ = ["DIFFUSE_VARIANCE", "INIT_OPTIONS", "diffuse_covariance", "stationary_covariance"]

INIT_OPTIONS = ("stationary", "diffuse", "fixed", "learned")
DIFFUSE_VARIANCE = 1e6  # statsmodels' approximate_diffuse_variance


def stationary_covariance(A: torch.Tensor, Q: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Solution P of the discrete Lyapunov equation ``P = A P Aᵀ + Q``.

    ``A (..., n, n)``, ``Q (..., n, n)`` → ``P (..., n, n)``. Solved as the linear system
    ``(I - A ⊗ A) vec P = vec Q`` (differentiable in A and Q; O(n⁶), fine for n ≲ 30).
    With ``check`` (default) a ValueError is raised when A is not stable (spectral radius
    ≥ 1): then no stationary distribution exists.

    >>> import torch
    >>> stationary_covariance(torch.eye(2) * 0.5, torch.eye(2) * 0.75)
    tensor([[1., 0.],
            [0., 1.]])
    """
    if A.shape[-1] != A.shape[-2] or Q.shape[-2:] != A.shape[-2:]:
        raise ValueError(
            f"A, Q: expected square matrices of the same size (n, n), got {tuple(A.shape)} "
            f"and {tuple(Q.shape)}"
        )
    n = A.shape[-1]
    if check:
        radius = float(torch.linalg.eigvals(A.detach()).abs().max())
        if not radius < 1.0:
            raise ValueError(
                f"A: expected a stable matrix (spectral radius < 1) for init='stationary', got "
                f"spectral radius {radius:.6g}; use init='diffuse' or fit with stationary=True"
            )
    batch = torch.broadcast_shapes(A.shape[:-2], Q.shape[:-2])
    A = A.expand(batch + (n, n))
    kron = (A.unsqueeze(-1).unsqueeze(-3) * A.unsqueeze(-2).unsqueeze(-4)).reshape(
        batch + (n * n, n * n)
    )
    eye = torch.eye(n * n, dtype=A.dtype, device=A.device)
    vec_q = Q.expand(batch + (n, n)).reshape(batch + (n * n, 1))
    P = torch.linalg.solve(eye - kron, vec_q).reshape(batch + (n, n))
    return 0.5 * (P + P.transpose(-1, -2))


def diffuse_covariance(n: int, variance: float = DIFFUSE_VARIANCE, dtype=None, device=None):
    """``variance · I_n``: the approximate diffuse initial covariance (statsmodels' 1e6).

    >>> diffuse_covariance(2, 10.0)
    tensor([[10.,  0.],
            [ 0., 10.]])
    """
    if not variance > 0:
        raise ValueError(f"diffuse_variance: expected a positive number, got {variance!r}")
    return variance * torch.eye(n, dtype=dtype, device=device)
