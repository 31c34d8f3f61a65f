"""Input checks for the Kalman functions: clear errors instead of deep stack traces."""

from __future__ import annotations

import torch

from pyrossm._checks import check_mask
from pyrossm._gaussian import broadcast_shapes


def _fail(name, expected, got):
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")


def _check_square(name, value, size, x_dim):
    if value.dim() < 2 or value.shape[-2:] != (size, size):
        _fail(name, f"shape (..., {size}, {size})", f"shape {tuple(value.shape)}")
    if value.dim() > x_dim + 1:
        _fail(
            name,
            f"at most {x_dim + 1} dims (batch dims of x, T, {size}, {size})",
            f"shape {tuple(value.shape)}",
        )


def _check_finite(name, value):
    if not bool(torch.isfinite(value).all()):
        _fail(name, "finite values", "NaN or Inf entries")


def _check_covariance(name, value):
    with torch.no_grad():
        asym = (value - value.transpose(-1, -2)).abs().max()
        scale = value.abs().max().clamp_min(1e-30)
        if bool(asym > 1e-6 * scale):  # (one synchronisation)
            _fail(name, "a symmetric covariance matrix", f"max |M - Mᵀ| = {float(asym):.3g}")
        # Positive semi-definite up to rounding: singular Q (e.g. a deterministic trend) is fine.
        # A Cholesky factorisation that succeeds proves it (a few µs; eigvalsh takes ~15 µs
        # per matrix), else the eigenvalues decide.
        if not bool(torch.linalg.cholesky_ex(value).info.any()):
            return
        eig_min = torch.linalg.eigvalsh(value.to(torch.float64)).min()
        tol = 1e-8 * float(scale) if value.dtype == torch.float64 else 1e-5 * float(scale)
        if float(eig_min) < -tol:
            _fail(
                name,
                "a positive (semi-)definite covariance matrix",
                f"smallest eigenvalue {float(eig_min):.4g}",
            )


def _check_covariances(named):
    """:func:`_check_covariance` for several matrices: those of one shape are first checked
    together (one symmetry test, each against its own scale, and one Cholesky factorisation:
    a dozen small operations instead of a dozen each); any doubt, and the matrices of a shape
    of their own, go through :func:`_check_covariance` one by one, which names the culprit."""
    groups = {}
    for name, value in named.items():
        groups.setdefault(tuple(value.shape), []).append(name)
    for names in groups.values():
        if len(names) > 1:
            with torch.no_grad():
                v = torch.stack([named[k] for k in names])
                asym = (v - v.transpose(-1, -2)).abs().reshape(len(names), -1).amax(1)
                scale = v.abs().reshape(len(names), -1).amax(1).clamp_min(1e-30)
                if bool((asym <= 1e-6 * scale).all()) and not bool(
                        torch.linalg.cholesky_ex(v).info.any()):
                    continue
        for name in names:
            _check_covariance(name, named[name])


def all_finite(x):
    """True when every entry of x is finite: one reduction (a sum is finite when all entries
    are, unless it overflows; then the exact elementwise test decides)."""
    with torch.no_grad():
        if bool(torch.isfinite(x.sum())):
            return True
        return bool(torch.isfinite(x).all())


def _majority(sizes):
    sizes = [s for s in sizes if s is not None]
    return max(sizes, key=lambda s: (sizes.count(s), -sizes.index(s)))


def validate_inputs(x, A, C, Q, R, init_mean, init_cov, mask):
    """Raise ``ValueError``/``TypeError`` naming the argument for any malformed input.
    Returns whether every entry of x is finite (no NaN)."""
    named = dict(x=x, A=A, C=C, Q=Q, R=R, init_mean=init_mean, init_cov=init_cov)
    for name, value in named.items():
        _check_tensor(name, value)
    if x.dim() < 2:
        _fail("x", "shape (..., T, obs_dim) with time at dim -2", f"shape {tuple(x.shape)}")
    # The state and observation dims are the ones most arguments agree on, so the error names
    # the odd one out (a wrong A is blamed on A, a wrong init_mean on init_mean).
    n = _majority(
        [
            A.shape[-1],
            A.shape[-2] if A.dim() > 1 else None,
            C.shape[-1],
            Q.shape[-1],
            init_mean.shape[-1] if init_mean.dim() else None,
            init_cov.shape[-1],
        ]
    )
    p = _majority([x.shape[-1], C.shape[-2] if C.dim() > 1 else None, R.shape[-1]])
    _check_square("A", A, n, x.dim())
    if init_mean.dim() < 1 or init_mean.shape[-1] != n:
        _fail("init_mean", f"shape (..., {n}) (state_dim)", f"shape {tuple(init_mean.shape)}")
    if x.shape[-1] != p:
        _fail(
            "x",
            f"shape (..., T, {p}) (obs_dim {p}, the rows of C and the size of R)",
            f"shape {tuple(x.shape)}",
        )
    if C.dim() < 2 or C.shape[-2:] != (p, n):
        _fail("C", f"shape (..., {p}, {n}) (obs_dim, state_dim)", f"shape {tuple(C.shape)}")
    if C.dim() > x.dim() + 1:
        _fail("C", f"at most {x.dim() + 1} dims", f"shape {tuple(C.shape)}")
    _check_square("Q", Q, n, x.dim())
    _check_square("R", R, p, x.dim())
    _check_square("init_cov", init_cov, n, x.dim() - 1)
    T = x.shape[-2]
    for name in "ACQR":
        value = named[name]
        if value.dim() == x.dim() + 1 and value.shape[-3] not in (1, T):
            _fail(
                name,
                f"a time dim of length {T} (time-varying parameter)",
                f"shape {tuple(value.shape)}",
            )
    params = ("A", "C", "Q", "R", "init_mean", "init_cov")
    for name in params:
        if named[name].dtype != x.dtype:
            raise TypeError(
                f"{name}: expected dtype {x.dtype} (the dtype of x), got {named[name].dtype}"
            )
        if named[name].device != x.device:
            raise ValueError(
                f"{name}: expected a tensor on {x.device} (the device of x), got one on "
                f"{named[name].device}; move the parameters and the data together"
            )
    # all parameters at once (a finite sum proves it), then the culprit by name
    if not all_finite(torch.cat([named[name].detach().reshape(-1) for name in params])):
        for name in params:
            _check_finite(name, named[name])
    finite = all_finite(x)
    if not finite and bool(torch.isinf(x).any()):
        _fail("x", "finite values or NaN for missing entries", "Inf entries")
    _check_covariances({name: named[name] for name in ("Q", "R", "init_cov")})
    check_mask(mask, tuple(x.shape[:-1]), broadcast=True)
    try:
        broadcast_shapes(x.shape[:-2], init_mean.shape[:-1])
    except RuntimeError:
        _fail(
            "init_mean",
            f"batch dims broadcastable with x's {tuple(x.shape[:-2])}",
            f"shape {tuple(init_mean.shape)}",
        )
    return finite


def validate_offsets(x, init_mean, transition_offset, observation_offset):
    """Check ``transition_offset (..., T, n)`` and ``observation_offset (..., T, p)``."""
    T, p = x.shape[-2], x.shape[-1]
    n = init_mean.shape[-1]
    for name, value, size in (
        ("transition_offset", transition_offset, n),
        ("observation_offset", observation_offset, p),
    ):
        if value is None:
            continue
        _check_tensor(name, value)
        if value.dim() < 2 or value.shape[-1] != size or value.shape[-2] not in (1, T):
            _fail(
                name,
                f"shape (..., {T}, {size}) (time at dim -2, a time dim of 1 broadcasts)",
                f"shape {tuple(value.shape)}",
            )
        if value.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {value.dtype}")
        _check_finite(name, value)
        try:
            broadcast_shapes(value.shape[:-2], x.shape[:-2])
        except RuntimeError:
            _fail(
                name,
                f"batch dims broadcastable with x's {tuple(x.shape[:-2])}",
                f"shape {tuple(value.shape)}",
            )
