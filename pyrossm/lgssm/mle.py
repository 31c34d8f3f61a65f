"""Maximum-likelihood fitting of linear-Gaussian state-space models.

The exact Kalman log-likelihood (of :func:`~pyrossm.lgssm.kalman_filter`, missing entries
allowed) is maximised over an *unconstrained* vector θ with L-BFGS (scipy's ``L-BFGS-B``, the
gradient by autograd, float64). θ maps to the *natural* parameters (the matrices) through
transforms that keep them admissible:

====================  ========================================  ===========================
kind                  natural value from θ                      keeps
====================  ========================================  ===========================
``free``              s θ                                       —
``variance``          floor + (s θ)²  (a scalar or a diagonal)  variance ≥ floor
``cov``               L Lᵀ + floor I,  L = tril(s θ)             positive definite
``contraction``       chol(I + M Mᵀ)⁻¹ M,  M = θ                 all singular values < 1
``ar``                Durbin–Levinson of r = θ / √(1 + θ²)       AR polynomial stationary
====================  ========================================  ===========================

s is a data scale (so θ is of order 1) and ``floor = floor_rel · s²`` (1e-12 · s²). A contraction is
stable; with Q and C free it loses no generality (every stable A is a contraction in some
basis, and the likelihood is invariant under a change of state basis). ``ar`` is the
partial-autocorrelation transform of Monahan (1984) / Jones (1980), as statsmodels'
``constrain_stationary_univariate``.

Start values: a moment / principal-component estimate (see :func:`pca_start`), then L-BFGS to
``gtol``/``ftol``. The gradient: central differences of the univariate-treatment likelihood
(:mod:`pyrossm.lgssm._univariate`; a full R is whitened per step), all 2k + 1 parameter sets
in one batched NumPy pass — much cheaper than a taped autograd pass through T small steps
(autograd through :func:`~pyrossm.lgssm.kalman_filter` when R is singular and not diagonal,
and for up to 100 polishing iterations when the difference gradient stalls).
Standard errors: observed information, the autograd Hessian of the exact (Kalman)
log-likelihood in the *natural* parameterisation (the entries of A, C, vech(Q), ... — as
statsmodels' ``cov_type="approx"``), inverted.

Reference: Durbin & Koopman, *Time Series Analysis by State Space Methods* (2012), ch. 7;
Harvey (1989), §3.4.

>>> import torch
>>> from pyrossm.lgssm import LinearGaussianSSM
>>> x = torch.randn(1, 60, 2, dtype=torch.float64).cumsum(-2)
>>> res = LinearGaussianSSM(1, 2, init="diffuse", dtype=torch.float64).fit(x)
>>> res.converged, res.std_errors.shape == res.estimates.shape
(True, True)
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np
import scipy.optimize
import torch

from ._univariate import univariate_log_likelihood, whitened_log_likelihood
from .inference import kalman_filter, kalman_log_likelihood
from .initial import diffuse_covariance, stationary_covariance
from .results import MLEResults, standardized_residuals

__all__ = ["Block", "ModelSpec", "fit_spec", "fit_model", "pca_start"]

KINDS = ("free", "variance", "cov", "contraction", "ar")
FLOOR_REL = 1e-12  # variance floor, relative to the data's variance s²
BOUNDARY_REL = 1e-6  # a variance below BOUNDARY_REL · s² is reported as on the boundary
CONVERGED_GRAD = 1e-4  # max |gradient| of the per-observed-step loss accepted as converged
POLISH_ITER = 100  # autograd L-BFGS iterations after a stalled difference-gradient run


class Block:
    """One natural parameter: ``name``, ``kind`` (see the module table), natural ``shape``,
    scale ``s`` of θ and the variance ``floor``."""

    def __init__(self, name, kind, shape, scale=1.0, floor=0.0):
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        self.name, self.kind, self.shape = name, kind, tuple(shape)
        self.scale, self.floor = float(scale), float(floor)

    def __repr__(self):
        return f"Block({self.name!r}, {self.kind!r}, {self.shape})"

    @property
    def k(self):
        return self.shape[-1] if self.shape else 1

    @property
    def size(self):
        """Number of free (unconstrained = natural) scalars."""
        if self.kind == "cov":
            return self.k * (self.k + 1) // 2
        return math.prod(self.shape)

    def labels(self):
        if self.kind == "cov":
            rows, cols = np.tril_indices(self.k)
            return [f"{self.name}[{i},{j}]" for i, j in zip(rows, cols)]
        if not self.shape:
            return [self.name]
        if len(self.shape) == 1:
            return [f"{self.name}[{i}]" for i in range(self.k)]
        return [f"{self.name}[{i},{j}]" for i in range(self.shape[0]) for j in range(self.shape[1])]

    # θ → natural value, and back
    def constrain(self, theta):
        s, f = self.scale, self.floor
        if self.kind == "free":
            return (s * theta).reshape(self.shape)
        if self.kind == "variance":
            return (f + (s * theta) ** 2).reshape(self.shape)
        if self.kind == "cov":
            L = _vech_to_tril(s * theta, self.k)
            eye = torch.eye(self.k, dtype=theta.dtype, device=theta.device)
            return L @ L.T + f * eye
        if self.kind == "contraction":
            M = theta.reshape(self.shape)
            eye = torch.eye(self.k, dtype=theta.dtype, device=theta.device)
            L = torch.linalg.cholesky(eye + M @ M.T)
            return torch.linalg.solve_triangular(L, M, upper=False)
        return _pacf_to_ar(theta / torch.sqrt(1 + theta**2))

    def unconstrain(self, value):
        value = torch.as_tensor(value, dtype=torch.float64)
        s, f = self.scale, self.floor
        if self.kind == "free":
            return value.reshape(-1) / s
        if self.kind == "variance":
            return ((value - f).clamp_min(1e-4 * s**2)).sqrt().reshape(-1) / s
        if self.kind == "cov":
            eye = torch.eye(self.k, dtype=value.dtype)
            evals, evecs = torch.linalg.eigh(0.5 * (value + value.T) - f * eye)
            shifted = (evecs * evals.clamp_min(1e-4 * s**2)) @ evecs.T
            L = torch.linalg.cholesky(0.5 * (shifted + shifted.T))
            rows, cols = torch.tril_indices(self.k, self.k)
            return L[rows, cols] / s
        if self.kind == "contraction":
            U, S, Vh = torch.linalg.svd(value)
            A = U @ torch.diag(S.clamp_max(1 - 1e-6)) @ Vh
            eye = torch.eye(self.k, dtype=value.dtype)
            # M = L A with L lower-triangular, Lᵀ L = (I - A Aᵀ)⁻¹ (a "reversed" Cholesky),
            # so that I + M Mᵀ = L Lᵀ and chol(I + M Mᵀ)⁻¹ M = A.
            G = torch.linalg.inv(eye - A @ A.T)
            L = torch.linalg.cholesky(0.5 * (G + G.T).flip((0, 1))).T.flip((0, 1))
            return (L @ A).reshape(-1)
        r = _ar_to_pacf(value).clamp(-1 + 1e-6, 1 - 1e-6)
        return r / torch.sqrt(1 - r**2)

    # natural value ↔ the vector of free natural scalars (for standard errors)
    def natural_vector(self, value):
        if self.kind == "cov":
            rows, cols = torch.tril_indices(self.k, self.k)
            return value[rows, cols]
        return value.reshape(-1)

    def from_natural_vector(self, vec):
        if self.kind == "cov":
            L = _vech_to_tril(vec, self.k)
            return L + L.T - torch.diag(torch.diagonal(L))
        return vec.reshape(self.shape)

    def boundary_entries(self, value):
        """Per free natural scalar: a variance at its floor (its standard error is NaN)."""
        if self.kind == "variance":
            return (value.detach() - self.floor).reshape(-1) < BOUNDARY_REL * self.scale**2
        return torch.zeros(self.size, dtype=torch.bool)

    def at_boundary(self, value):
        """Whether the natural value sits on the boundary of its admissible set."""
        value = value.detach()
        lim = BOUNDARY_REL * self.scale**2
        if self.kind == "variance":
            return bool(((value - self.floor) < lim).any())
        if self.kind == "cov":
            eye = torch.eye(self.k, dtype=value.dtype)
            return bool(torch.linalg.eigvalsh(value - self.floor * eye).min() < lim)
        if self.kind == "contraction":
            return bool(torch.linalg.matrix_norm(value, 2) > 1 - BOUNDARY_REL)
        if self.kind == "ar":
            pacf = _ar_to_pacf(value)
            return bool(pacf.abs().max() > 1 - BOUNDARY_REL) if value.numel() else False
        return False


def _vech_to_tril(vec, k):
    rows, cols = torch.tril_indices(k, k, device=vec.device)
    L = vec.new_zeros(k, k)
    return L.index_put((rows, cols), vec)


def _pacf_to_ar(r):
    """Durbin–Levinson: partial autocorrelations r (p,) in (-1, 1) → stationary AR coefficients."""
    phi = r[:0]
    for k in range(r.shape[0]):
        phi = torch.cat([phi - r[k] * phi.flip(0), r[k : k + 1]])
    return phi


def _ar_to_pacf(phi):
    """Inverse of :func:`_pacf_to_ar` (for a stationary AR polynomial)."""
    phi = torch.as_tensor(phi, dtype=torch.float64).clone()
    r = torch.zeros_like(phi)
    for k in range(phi.shape[0] - 1, -1, -1):
        r[k] = phi[k].clamp(-0.999999, 0.999999)
        if k:
            phi = (phi[:k] + r[k] * phi[:k].flip(0)) / (1 - r[k] ** 2)
    return r


# ---------------------------------------------------------------------------------------------
# the parameter specification of a plain LinearGaussianSSM


def _nan_scale(x):
    xc = x - torch.nanmean(x, dim=(0, 1))
    v = float(torch.nanmean(xc**2))
    return math.sqrt(v) if v > 0 else 1.0


class ModelSpec:
    """Natural parameters of a :class:`~pyrossm.lgssm.LinearGaussianSSM`: its learnable
    matrices (A free or a contraction with ``stationary``; Q, R, init_cov full or diagonal with
    a floor), the others fixed at the model's values; the initial state from ``model.init``."""

    def __init__(self, model, x, floor_rel=FLOOR_REL):
        s = _nan_scale(x)
        self.scale = s
        learn, diag = model._learn, model.diagonal
        self.init, self.kappa = model.init, model.diffuse_variance
        self.burn = model.loglikelihood_burn
        n, p = model.state_dim, model.obs_dim
        state_scale = 1.0 if "C" in learn else s
        scales = dict(A=1.0, C=s, Q=state_scale, R=s, init_mean=state_scale, init_cov=state_scale)
        shapes = dict(A=(n, n), C=(p, n), Q=(n, n), R=(p, p), init_mean=(n,), init_cov=(n, n))
        self.blocks, self.fixed = [], {}
        self.n, self.p = n, p
        for name in ("A", "C", "Q", "R", "init_mean", "init_cov"):
            if name not in learn:
                if name != "init_cov" or self.init in ("fixed", "learned"):
                    self.fixed[name] = getattr(model, name).detach().to(torch.float64).cpu()
                continue
            sc = scales[name]
            if name in ("Q", "R", "init_cov"):
                kind = "variance" if name in diag else "cov"
                shape = (shapes[name][0],) if name in diag else shapes[name]
                self.blocks.append(Block(name, kind, shape, sc, floor_rel * sc**2))
            elif name == "A":
                self.blocks.append(Block("A", "contraction" if model.stationary else "free",
                                         shapes["A"]))
            else:
                self.blocks.append(Block(name, "free", shapes[name], sc))
        self.diag = diag
        self.current = {b.name: _natural_of(model, b) for b in self.blocks}

    def system(self, values, x):
        """The system matrices (float64) from natural ``values``, and the data to filter."""
        m = dict(self.fixed)
        for name, v in values.items():
            m[name] = torch.diag_embed(v) if name in self.diag else v
        n = m["A"].shape[-1]
        if self.init == "stationary":
            m["init_mean"] = m["A"].new_zeros(n)
            m["init_cov"] = stationary_covariance(m["A"], m["Q"], check=False)
        elif self.init == "diffuse":
            m["init_mean"] = m["A"].new_zeros(n)
            m["init_cov"] = diffuse_covariance(n, self.kappa, dtype=m["A"].dtype)
        return m, x

    def start(self, x, how="auto"):
        if how == "current":
            return dict(self.current)
        return pca_start(self, x)


def _natural_of(model, block):
    value = getattr(model, block.name).detach().to(torch.float64).cpu()
    return torch.diagonal(value) if block.kind == "variance" and value.dim() == 2 else value


def pca_start(spec, x):
    """Moment start for a :class:`ModelSpec`: C from the leading principal components of the
    (pairwise-complete) sample covariance, A by least squares on the component scores, Q their
    residual covariance, R the unexplained variance (diagonal)."""
    x = x.to(torch.float64)
    p = x.shape[-1]
    obs = ~torch.isnan(x)
    xc = torch.where(obs, x - torch.nanmean(x, dim=(0, 1)), torch.zeros((), dtype=x.dtype))
    o = obs.to(x.dtype).reshape(-1, p)
    flat = xc.reshape(-1, p)
    S = (flat.T @ flat) / (o.T @ o).clamp_min(1)
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.T))
    evals, evecs = evals.flip(0).clamp_min(1e-8 * float(evals.max())), evecs.flip(1)
    fixed = spec.fixed
    n = spec.n
    k = min(n, p)
    if "C" in fixed:
        C = fixed["C"]
        z = xc @ torch.linalg.pinv(C).T
    else:
        C = torch.full((p, n), 0.1 * spec.scale, dtype=x.dtype)
        C[:, :k] = evecs[:, :k] * evals[:k].sqrt()
        z = torch.zeros(x.shape[:-1] + (n,), dtype=x.dtype)
        z[..., :k] = (xc @ evecs[:, :k]) / evals[:k].sqrt()
    z0, z1 = z[:, :-1].reshape(-1, n), z[:, 1:].reshape(-1, n)
    eye = torch.eye(n, dtype=x.dtype)
    if "A" in fixed:
        A = fixed["A"]
    else:
        A = torch.linalg.solve(z0.T @ z0 + 1e-3 * len(z0) * eye, z0.T @ z1).T
        norm = float(torch.linalg.matrix_norm(A, 2))
        stable = any(b.name == "A" and b.kind == "contraction" for b in spec.blocks)
        limit = 0.95 if spec.init == "stationary" or stable else 1.0
        if norm > limit:
            A = A * (limit / norm)
    resid = z1 - z0 @ A.T
    Q = resid.T @ resid / max(len(resid), 1) + 0.05 * eye
    if spec.init == "stationary" and "C" not in fixed:
        Q = eye - A @ A.T + 0.05 * eye
    Sdiag = torch.diagonal(S)
    Rdiag = (Sdiag - (C @ C.T).diagonal()).clamp_min(0.05 * float(Sdiag.mean()))
    guesses = dict(A=A, C=C, Q=Q, R=torch.diag(Rdiag), init_mean=z[:, 0].mean(0),
                   init_cov=eye * (1.0 if "C" not in fixed else spec.scale**2))
    out = {}
    for b in spec.blocks:
        g = guesses[b.name]
        out[b.name] = torch.diagonal(g) if b.kind == "variance" and g.dim() == 2 else g
    return out


# ---------------------------------------------------------------------------------------------
# fitting


def _unpack(theta, blocks):
    values, i = {}, 0
    for b in blocks:
        values[b.name] = b.constrain(theta[i : i + b.size])
        i += b.size
    return values


def _pack(values, blocks):
    return torch.cat([b.unconstrain(values[b.name]) for b in blocks])


def _from_natural_vector(vec, blocks):
    values, i = {}, 0
    for b in blocks:
        values[b.name] = b.from_natural_vector(vec[i : i + b.size])
        i += b.size
    return values


def burned_log_likelihood(spec, values, x, burn):
    """Σ over sequences and steps t ≥ burn of log p(x_t | x_{<t}) at natural ``values``."""
    m, xx = spec.system(values, x)
    steps = kalman_log_likelihood(xx, m["A"], m["C"], m["Q"], m["R"], m["init_mean"],
                                  m["init_cov"], validate=False, per_step=True,
                                  transition_offset=m.get("transition_offset"))
    return steps[..., burn:].sum()


def fit_spec(spec, x, burn=0, start="auto", max_iter=500, gtol=1e-6, ftol=1e-12):
    """Maximise the burned log-likelihood over the spec's natural parameters (L-BFGS).

    ``x (batch, T, obs_dim)`` float64, NaN = missing. Returns ``(values, info)`` where
    ``info`` holds ``iterations``, ``evaluations``, ``grad_norm`` (of the per-observed-step loss
    in θ), ``converged``, ``message``, ``history`` (loss per observed step per iteration) and
    ``start_values``.
    """
    blocks = spec.blocks
    values0 = spec.start(x, start)
    theta0 = _pack(values0, blocks)
    n_obs = max(int((~torch.isnan(x[..., burn:, :])).any(-1).sum()), 1)  # observed steps

    def exact_loss_and_grad(theta_np):
        theta = torch.tensor(theta_np, dtype=torch.float64, requires_grad=True)
        try:
            ll = burned_log_likelihood(spec, _unpack(theta, blocks), x, burn)
        except (ValueError, torch.linalg.LinAlgError):  # an extreme trial step: reject it
            return 1e10, np.zeros_like(theta_np)
        loss = -ll / n_obs
        if not torch.isfinite(loss):
            return 1e10, np.zeros_like(theta_np)
        (grad,) = torch.autograd.grad(loss, theta)
        return float(loss.detach()), grad.numpy().astype(np.float64)

    def fast_loss_and_grad(theta_np):  # central differences, one batched pass
            k = len(theta_np)
            h = 1e-5 * np.maximum(1.0, np.abs(theta_np))
            thetas = np.concatenate([theta_np[None], theta_np + np.diag(h), theta_np - np.diag(h)])
            loss = -_batched_log_likelihood(spec, thetas, x, burn) / n_obs
            if not np.isfinite(loss).all():
                return 1e10, np.zeros_like(theta_np)
            return float(loss[0]), (loss[1 : k + 1] - loss[k + 1 :]) / (2 * h)

    fast = _univariate_ok(spec, values0, x)
    use = {"fn": fast_loss_and_grad if fast else exact_loss_and_grad}
    last = {}

    def evaluate(theta_np):
        out = use["fn"](theta_np)
        last["theta"], last["out"] = theta_np.copy(), out
        return out

    def record(theta_np):  # the loss at the iterate: the last evaluation (the line search's)
        same = "theta" in last and np.array_equal(last["theta"], theta_np)
        history.append((last["out"] if same else evaluate(theta_np))[0])

    history = [evaluate(theta0.numpy())[0]]
    opt = scipy.optimize.minimize(
        evaluate, theta0.numpy(), jac=True, method="L-BFGS-B", callback=record,
        options=dict(maxiter=max_iter, gtol=gtol, ftol=ftol, maxcor=20),
    )
    iterations, evaluations = int(opt.nit), int(opt.nfev)
    record(opt.x)
    if fast and not opt.success and float(np.abs(last["out"][1]).max()) >= CONVERGED_GRAD:
        # the difference gradient stalled (an ill-conditioned optimum): polish with autograd
        use["fn"] = exact_loss_and_grad
        opt = scipy.optimize.minimize(
            evaluate, opt.x, jac=True, method="L-BFGS-B", callback=record,
            options=dict(maxiter=POLISH_ITER, gtol=gtol, ftol=ftol, maxcor=20),
        )
        iterations, evaluations = iterations + int(opt.nit), evaluations + int(opt.nfev)
        record(opt.x)
    theta = torch.tensor(opt.x, dtype=torch.float64)
    final, grad = last["out"]
    if len(history) > 1 and history[-1] == history[-2]:
        history.pop()
    with torch.no_grad():
        values = _unpack(theta, blocks)
    grad_norm = float(np.abs(grad).max())
    # A line search that stops at the noise level of the difference gradient is converged too.
    converged = bool(opt.success) or grad_norm < CONVERGED_GRAD
    info = dict(iterations=iterations, evaluations=evaluations, converged=converged,
                grad_norm=grad_norm, message=str(opt.message), history=history,
                start_values=values0)
    return values, info


def _univariate_ok(spec, values, x):
    """Whether the fast univariate likelihood applies: R diagonal, or positive definite (then
    whitened at each step)."""
    m, _ = spec.system(values, x)
    R = m["R"]
    return bool((R == torch.diag(torch.diagonal(R))).all()) or int(
        torch.linalg.cholesky_ex(R)[1]) == 0


def _batched_log_likelihood(spec, thetas, x, burn):
    """The burned log-likelihood at each row of ``thetas (K, dim θ)`` (NumPy, univariate)."""
    systems, data = [], []
    with torch.no_grad():
        for th in thetas:
            m, xx = spec.system(_unpack(torch.from_numpy(th), spec.blocks), x)
            systems.append(m)
            data.append(xx)
    st = {k: np.stack([m[k].numpy() for m in systems]) for k in systems[0]}
    xs = np.stack([d.numpy() for d in data]) if data[0] is not x else x.numpy()
    r = np.diagonal(st["R"], axis1=-2, axis2=-1)
    b = st.get("transition_offset")
    if np.array_equal(st["R"], r[..., None] * np.eye(r.shape[-1])):  # diagonal R
        return univariate_log_likelihood(xs, st["A"], st["C"], st["Q"], r, st["init_mean"],
                                         st["init_cov"], burn, b)
    return whitened_log_likelihood(xs, st["A"], st["C"], st["Q"], st["R"], st["init_mean"],
                                   st["init_cov"], burn, b)


def observed_information(spec, values, x, burn):
    """Minus the autograd Hessian of the burned log-likelihood (exact Kalman filter) in the
    natural parameterisation. Returns ``(information (k, k), natural vector (k,))``."""
    blocks = spec.blocks
    eta = torch.cat([b.natural_vector(values[b.name]).detach() for b in blocks])

    def ll(vec):
        return burned_log_likelihood(spec, _from_natural_vector(vec, blocks), x, burn)

    return -torch.autograd.functional.hessian(ll, eta), eta


@contextlib.contextmanager
def _one_thread():
    """Small matrices gain nothing from intra-op threads; on a busy machine the autograd
    Hessian with 2 threads measured 36x slower than with 1 (377 s vs 10.6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_model(model, x, mask=None, **kwargs):
    """Fit ``model`` (a LinearGaussianSSM) by maximum likelihood; see ``LinearGaussianSSM.fit``.

    Writes the estimates into the model and returns a :class:`~pyrossm.lgssm.MLEResults`.
    Runs single-threaded (small matrices).
    """
    with _one_thread():
        return _fit_model(model, x, mask, **kwargs)


def _fit_model(model, x, mask=None, *, spec=None, burn=None, start="auto", max_iter=500,
               gtol=1e-6, ftol=1e-12, std_errors=True, floor_rel=FLOOR_REL):
    if x.dim() == 2:
        x = x.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    x = x.detach().to(torch.float64).cpu()
    if mask is not None:
        x = torch.where(mask.cpu().unsqueeze(-1), x, torch.full((), float("nan"), dtype=x.dtype))
    t0 = time.perf_counter()
    if spec is None:
        spec = getattr(model, "_structure", None)
        spec = spec.spec(x) if spec is not None else ModelSpec(model, x, floor_rel)
    if not spec.blocks:
        raise ValueError("learn: the model has no learnable parameters to fit")
    if model.init == "learned" and x.shape[0] == 1:
        warnings.warn(
            "init='learned' with one sequence: init_mean and init_cov are estimated from a single "
            "draw and tend to degenerate; prefer init='stationary' or init='diffuse'",
            stacklevel=4,
        )
    burn = spec.burn if burn is None else int(burn)
    values, info = fit_spec(spec, x, burn, start, max_iter, gtol, ftol)
    info["seconds_optimizer"] = time.perf_counter() - t0
    boundary = [b.name for b in spec.blocks if b.at_boundary(values[b.name])]
    if boundary:
        warnings.warn(
            f"fit: the optimum is on the boundary for {boundary} (a variance at its floor or A "
            "at the edge of stationarity); standard errors there are not meaningful",
            stacklevel=4,
        )
    if not info["converged"]:
        warnings.warn(f"fit: L-BFGS did not converge: {info['message']}", stacklevel=4)
    labels = [lab for b in spec.blocks for lab in b.labels()]
    eta = torch.cat([b.natural_vector(values[b.name]) for b in spec.blocks]).detach()

    def covariance():  # computed when first asked for (the Hessian costs about one fit)
        if not std_errors:
            return torch.full((len(eta), len(eta)), float("nan"), dtype=torch.float64)
        with _one_thread():
            info_matrix, _ = observed_information(spec, values, x, burn)
        unusable = torch.cat([b.boundary_entries(values[b.name]) for b in spec.blocks])
        return _invert_information(info_matrix, unusable)
    with torch.no_grad():
        m, xx = spec.system(values, x)
        filt = kalman_filter(xx, m["A"], m["C"], m["Q"], m["R"], m["init_mean"], m["init_cov"],
                             transition_offset=m.get("transition_offset"))
        loglik = float(filt.step_log_likelihoods[..., burn:].sum())
        resid = standardized_residuals(xx, filt, m["C"], m["R"])
        resid[..., :burn, :] = float("nan")
    _write_back(model, spec, values, m)
    nobs = int((~torch.isnan(x[..., burn:, :])).any(-1).sum())
    seconds = time.perf_counter() - t0
    return MLEResults(
        info["history"], names=labels, estimates=eta, covariance=covariance,
        log_likelihood=loglik, nobs=nobs, burn=burn, iterations=info["iterations"],
        evaluations=info["evaluations"], grad_norm=info["grad_norm"],
        converged=info["converged"], message=info["message"], seconds=seconds,
        seconds_optimizer=info["seconds_optimizer"], at_boundary=boundary, residuals=resid,
        params={k: v.detach() for k, v in values.items()},
        system={k: v.detach() for k, v in m.items()},
    )


def _invert_information(info_matrix, unusable):
    """Covariance of the estimates: the inverse information. Directions where it is not
    positive definite (parameters not identified, e.g. a rotation of the state) are dropped,
    and the parameters that load on them, or sit on the boundary (``unusable``), get NaN."""
    info_matrix = 0.5 * (info_matrix + info_matrix.T)
    keep = ~unusable
    sub = info_matrix[keep][:, keep]
    cov = torch.full_like(info_matrix, float("nan"))
    if sub.numel() == 0:
        return cov
    evals, evecs = torch.linalg.eigh(sub)
    good = evals > 1e-9 * evals.abs().max()
    inv_sub = (evecs[:, good] / evals[good]) @ evecs[:, good].T
    bad = (evecs[:, ~good] ** 2).sum(-1) > 1e-6  # parameters in a non-identified direction
    if bool((~good).any()):
        warnings.warn(
            "fit: the observed information is singular or not positive definite (parameters "
            "not identified, e.g. a rotation of the state); their standard errors are NaN",
            stacklevel=5,
        )
    inv_sub[bad] = float("nan")
    inv_sub[:, bad] = float("nan")
    idx = keep.nonzero().squeeze(-1)
    cov[idx.unsqueeze(-1), idx] = inv_sub
    return cov


def _write_back(model, spec, values, m):
    """Store the fitted natural values in the model (its dtype and device)."""
    device, dtype = model._param_device_dtype()
    if getattr(model, "_structure", None) is not None:
        names = ("Q", "R", "init_cov", "A")  # a structural model: its derived matrices
    else:
        names = tuple(values)
    for name in names:
        model._set(name, m[name].detach().to(device=device, dtype=dtype).clone())
