"""Independent references ("oracles") for the exact linear-Gaussian tests.

Model (column vectors, time index t = 1..T, stored at position t - 1)::

    z_1 ~ N(m0, P0);  z_t = A_t z_{t-1} + w_t, w_t ~ N(0, Q_t)
    x_t = C_t z_t + v_t, v_t ~ N(0, R_t)

Every oracle takes one sequence ``x`` of shape ``(T, p)`` (time at dim -2; NaN entries are not
observed) and parameters either time-invariant (``A (n, n)``) or time-varying (``A (T, n, n)``,
where ``A[0]`` and ``Q[0]`` are never used). They return numpy float64 arrays in pyrossm's layout:
``(T, n)`` for means, ``(T, n, n)`` for covariances, ``(T - 1, n, n)`` for the lag-one smoothed
cross covariances ``Cov(z_{t+1}, z_t | x_{1:T})``.

* :func:`dense_oracle` -- brute force: the joint Gaussian of ``(z_{1:T}, x_{1:T})`` conditioned
  with dense linear algebra (short T only).
* :func:`statsmodels_oracle` -- ``statsmodels.tsa.statespace.kalman_smoother.KalmanSmoother``.
* :func:`pykalman_oracle` -- ``pykalman.KalmanFilter`` (whole-step missing data only).
* :func:`gaussian_hmm` -- Pyro's ``GaussianHMM`` (row vectors, initial state before step 1).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.stats
import torch

__all__ = [
    "assert_rel_close",
    "rescale_system",
    "dense_oracle",
    "gaussian_hmm",
    "pykalman_oracle",
    "random_system",
    "statsmodels_oracle",
    "to_numpy",
]


# ----------------------------------------------------------------------------------------------
# random systems and comparison helpers
# ----------------------------------------------------------------------------------------------
def _random_pd(rng: np.random.Generator, d: int, floor: float = 0.2) -> np.ndarray:
    F = rng.normal(size=(d, d)) / np.sqrt(d)
    return F @ F.T + floor * np.eye(d)


def random_system(
    n: int,
    p: int,
    T: int,
    seed: int,
    batch: tuple = (),
    time_varying: bool = False,
    missing: str = "none",
    max_singular: float = 0.95,
) -> dict:
    """A random stable LGSSM and data simulated from it, as float64 torch tensors.

    ``missing``: ``"none"``, ``"steps"`` (whole steps NaN), ``"entries"`` (random entries NaN,
    so some vectors are partially observed). Returns a dict with ``x (*batch, T, p)``, ``A``,
    ``C``, ``Q``, ``R`` (``(n, n)`` etc., or ``(*batch or 1s, T, ., .)`` when ``time_varying``),
    ``init_mean (n,)``, ``init_cov (n, n)``.
    """
    rng = np.random.default_rng(seed)

    def stable_A():
        U = scipy.stats.ortho_group.rvs(n, random_state=rng) if n > 1 else np.ones((1, 1))
        V = scipy.stats.ortho_group.rvs(n, random_state=rng) if n > 1 else np.ones((1, 1))
        s = rng.uniform(0.3, max_singular, size=n)
        return (U * s) @ V.T

    if time_varying:
        lead = tuple(1 for _ in batch)
        A = np.stack([stable_A() for _ in range(T)]).reshape(lead + (T, n, n))
        C = rng.normal(size=lead + (T, p, n))
        Q = np.stack([_random_pd(rng, n) for _ in range(T)]).reshape(lead + (T, n, n))
        R = np.stack([_random_pd(rng, p) for _ in range(T)]).reshape(lead + (T, p, p))
    else:
        A, C, Q, R = stable_A(), rng.normal(size=(p, n)), _random_pd(rng, n), _random_pd(rng, p)
    m0 = rng.normal(size=n)
    P0 = _random_pd(rng, n, floor=0.5)

    # simulate
    num = int(np.prod(batch)) if batch else 1
    x = np.empty((num, T, p))
    for b in range(num):
        z = rng.multivariate_normal(m0, P0)
        for t in range(T):
            At, Ct, Qt, Rt = (_at(M, t) for M in (A, C, Q, R))
            if t > 0:
                z = At @ z + rng.multivariate_normal(np.zeros(n), Qt)
            x[b, t] = Ct @ z + rng.multivariate_normal(np.zeros(p), Rt)
    x = x.reshape(tuple(batch) + (T, p))
    if missing == "steps":
        x[rng.random(x.shape[:-1]) < 0.3] = np.nan
    elif missing == "entries":
        x[rng.random(x.shape) < 0.3] = np.nan
    elif missing != "none":
        raise ValueError(f"missing: unknown option {missing!r}")
    t64 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)
    return dict(
        x=t64(x), A=t64(A), C=t64(C), Q=t64(Q), R=t64(R), init_mean=t64(m0), init_cov=t64(P0)
    )


def rescale_system(s: dict, state_scales, obs_scales) -> dict:
    """The same model in rescaled coordinates z' = S z, x' = U x (S, U diagonal): A' = S A S⁻¹,
    C' = U C S⁻¹, Q' = S Q S, R' = U R U, m0' = S m0, P0' = S P0 S. Used to build badly scaled
    (but equivalent) systems."""
    S = torch.as_tensor(state_scales, dtype=torch.float64)
    U = torch.as_tensor(obs_scales, dtype=torch.float64)
    out = dict(s)
    out["A"] = s["A"] * S.unsqueeze(-1) / S
    out["C"] = s["C"] * U.unsqueeze(-1) / S
    out["Q"] = s["Q"] * S.unsqueeze(-1) * S
    out["R"] = s["R"] * U.unsqueeze(-1) * U
    out["init_mean"] = s["init_mean"] * S
    out["init_cov"] = s["init_cov"] * S.unsqueeze(-1) * S
    out["x"] = s["x"] * U
    return out


def _at(M: np.ndarray, t: int) -> np.ndarray:
    """Parameter at time index t: M is (d1, d2) or (..., T, d1, d2) with size-1 batch dims."""
    M = np.asarray(M)
    if M.ndim == 2:
        return M
    return M.reshape(M.shape[-3:])[t]


def to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def assert_rel_close(actual, expected, rtol: float, name: str = "") -> None:
    """Elementwise ``|a - e| <= rtol * (|e| + max|e|)``: relative to each entry, with a floor
    relative to the array's magnitude (so entries near zero do not demand absolute agreement
    beyond the scale of the array)."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    scale = np.abs(e).max() if e.size else 0.0
    err = np.abs(a - e)
    bound = rtol * (np.abs(e) + scale + 1e-300)
    if not np.all(err <= bound):
        i = np.unravel_index(np.argmax(err / bound), err.shape)
        raise AssertionError(
            f"{name}: max relative error {np.max(err / (np.abs(e) + scale + 1e-300)):.3e} > "
            f"{rtol:.1e} at index {i}: got {a[i]!r}, expected {e[i]!r}"
        )


# ----------------------------------------------------------------------------------------------
# dense joint Gaussian
# ----------------------------------------------------------------------------------------------
def _joint_moments(A, C, Q, R, m0, P0, T):
    n, p = m0.shape[0], _at(C, 0).shape[0]
    # z - E z = M w with w = (w_1 ~ N(0, P0), w_2 ~ N(0, Q_2), ...)
    M = np.zeros((T * n, T * n))
    mean_z = np.zeros(T * n)
    W = np.zeros((T * n, T * n))
    m = m0
    for t in range(T):
        if t > 0:
            m = _at(A, t) @ m
        mean_z[t * n : (t + 1) * n] = m
        W[t * n : (t + 1) * n, t * n : (t + 1) * n] = P0 if t == 0 else _at(Q, t)
        for s in range(t + 1):
            if s == t:
                blk = np.eye(n)
            else:
                blk = _at(A, t) @ M[(t - 1) * n : t * n, s * n : (s + 1) * n]
            M[t * n : (t + 1) * n, s * n : (s + 1) * n] = blk
    S_zz = M @ W @ M.T
    Cb = scipy.linalg.block_diag(*[_at(C, t) for t in range(T)])
    Rb = scipy.linalg.block_diag(*[_at(R, t) for t in range(T)])
    mean_x = Cb @ mean_z
    S_zx = S_zz @ Cb.T
    S_xx = Cb @ S_zz @ Cb.T + Rb
    return mean_z, mean_x, S_zz, S_zx, S_xx, n, p


def dense_oracle(x, A, C, Q, R, init_mean, init_cov) -> dict:
    """Exact results for one short sequence ``x (T, p)`` by conditioning the dense joint
    Gaussian of ``(z_{1:T}, x_{1:T})``. Keys: ``log_likelihood``, ``step_log_likelihoods``,
    ``predicted_means``, ``predicted_covs``, ``filtered_means``, ``filtered_covs``,
    ``smoothed_means``, ``smoothed_covs``, ``smoothed_cross_covs``, ``joint_cov`` (the smoothed
    covariance of the whole trajectory, ``(T n, T n)``)."""
    x, A, C, Q, R, m0, P0 = (to_numpy(a) for a in (x, A, C, Q, R, init_mean, init_cov))
    m0, P0 = m0.reshape(m0.shape[-1]), P0.reshape(P0.shape[-2:])  # drop size-1 batch dims
    T = x.shape[0]
    mean_z, mean_x, S_zz, S_zx, S_xx, n, p = _joint_moments(A, C, Q, R, m0, P0, T)
    xf = x.reshape(-1)
    obs = ~np.isnan(xf)
    time_of = np.repeat(np.arange(T), p)

    def condition(sel):
        if not sel.any():
            return mean_z.copy(), S_zz.copy(), 0.0
        Soo = S_xx[np.ix_(sel, sel)]
        Szo = S_zx[:, sel]
        r = xf[sel] - mean_x[sel]
        L = scipy.linalg.cho_factor(Soo, lower=True)
        mean = mean_z + Szo @ scipy.linalg.cho_solve(L, r)
        cov = S_zz - Szo @ scipy.linalg.cho_solve(L, Szo.T)
        logp = scipy.stats.multivariate_normal(mean_x[sel], Soo).logpdf(xf[sel])
        return mean, cov, float(logp)

    blk = lambda v, t: v[t * n : (t + 1) * n]
    blk2 = lambda S, t, s: S[t * n : (t + 1) * n, s * n : (s + 1) * n]
    out = {k: [] for k in ("predicted_means", "predicted_covs", "filtered_means", "filtered_covs")}
    prev_logp, steps = 0.0, []
    for t in range(T):
        mp, Sp, _ = condition(obs & (time_of < t))
        mf, Sf, logp = condition(obs & (time_of <= t))
        out["predicted_means"].append(blk(mp, t))
        out["predicted_covs"].append(blk2(Sp, t, t))
        out["filtered_means"].append(blk(mf, t))
        out["filtered_covs"].append(blk2(Sf, t, t))
        steps.append(logp - prev_logp)
        prev_logp = logp
    ms, Ss, logp = condition(obs)
    out = {k: np.stack(v) for k, v in out.items()}
    out["step_log_likelihoods"] = np.array(steps)
    out["log_likelihood"] = np.array(logp)
    out["smoothed_means"] = ms.reshape(T, n)
    out["smoothed_covs"] = np.stack([blk2(Ss, t, t) for t in range(T)])
    out["smoothed_cross_covs"] = np.array(
        [blk2(Ss, t + 1, t) for t in range(T - 1)]
    ).reshape(T - 1, n, n)
    out["joint_cov"] = Ss
    return out


# ----------------------------------------------------------------------------------------------
# statsmodels
# ----------------------------------------------------------------------------------------------
def statsmodels_oracle(x, A, C, Q, R, init_mean, init_cov) -> dict:
    """statsmodels' Kalman filter and smoother for one sequence ``x (T, p)`` (NaN = missing,
    also per entry). statsmodels' state ``alpha_1 ~ N(a_1, P_1)`` is our ``z_1``; its
    ``transition[..., t]`` maps ``alpha_{t+1} -> alpha_{t+2}``, i.e. our ``A[t + 1]``."""
    from statsmodels.tsa.statespace.kalman_smoother import KalmanSmoother

    x, A, C, Q, R, m0, P0 = (to_numpy(a) for a in (x, A, C, Q, R, init_mean, init_cov))
    T, p = x.shape
    n = m0.shape[0]
    ks = KalmanSmoother(k_endog=p, k_states=n, k_posdef=n)
    ks.bind(np.asfortranarray(x.T))  # statsmodels stores endog as (p, T)

    def tv(M, shift):
        if M.ndim == 2:
            return M
        M = M.reshape(M.shape[-3:])
        idx = np.minimum(np.arange(T) + shift, T - 1)
        return np.ascontiguousarray(np.moveaxis(M[idx], 0, -1))  # (d1, d2, T)

    ks["design"] = tv(C, 0)
    ks["obs_cov"] = tv(R, 0)
    ks["transition"] = tv(A, 1)
    ks["state_cov"] = tv(Q, 1)
    ks["selection"] = np.eye(n)
    ks.initialize_known(m0, P0)
    # statsmodels switches to the steady-state filter when the predicted covariance changes by
    # less than an *absolute* 1e-19; for systems with small covariances that is premature (1e-4
    # relative errors seen), so the shortcut is disabled here.
    ks.tolerance = 0.0
    res = ks.smooth()
    cov = lambda a: np.moveaxis(np.asarray(a), -1, 0)
    out = dict(
        log_likelihood=np.array(res.llf_obs.sum()),
        step_log_likelihoods=np.asarray(res.llf_obs),
        predicted_means=np.asarray(res.predicted_state)[:, :T].T,
        predicted_covs=cov(res.predicted_state_cov)[:T],
        filtered_means=np.asarray(res.filtered_state).T,
        filtered_covs=cov(res.filtered_state_cov),
        smoothed_means=np.asarray(res.smoothed_state).T,
        smoothed_covs=cov(res.smoothed_state_cov),
    )
    # smoothed_state_autocov[..., t] = Cov(alpha_{t+1}, alpha_t) in statsmodels' 0-based storage
    # (checked against the dense oracle in test_lgssm_oracles.py).
    out["smoothed_cross_covs"] = cov(res.smoothed_state_autocov)[: T - 1]
    return out


# ----------------------------------------------------------------------------------------------
# pykalman
# ----------------------------------------------------------------------------------------------
def pykalman_oracle(x, A, C, Q, R, init_mean, init_cov) -> dict:
    """pykalman's filter, smoother and log-likelihood for one sequence ``x (T, p)``; missing
    steps are passed as a masked array (pykalman drops a step if any entry is masked, so use it
    only with whole-step missing data)."""
    from pykalman import KalmanFilter

    x, A, C, Q, R, m0, P0 = (to_numpy(a) for a in (x, A, C, Q, R, init_mean, init_cov))

    def tv(M, shift):
        if M.ndim == 2:
            return M
        M = M.reshape(M.shape[-3:])
        return M[shift:] if shift else M  # pykalman: transition_matrices[t] maps z_t -> z_{t+1}

    kf = KalmanFilter(
        transition_matrices=tv(A, 1),
        observation_matrices=tv(C, 0),
        transition_covariance=tv(Q, 1),
        observation_covariance=tv(R, 0),
        initial_state_mean=m0,
        initial_state_covariance=P0,
    )
    X = np.ma.masked_invalid(x)
    fm, fc = kf.filter(X)
    sm, sc = kf.smooth(X)
    out = dict(
        filtered_means=fm,
        filtered_covs=fc,
        smoothed_means=sm,
        smoothed_covs=sc,
    )
    # pykalman's loglikelihood() does not index a time-varying observation covariance by time
    # (it fails on a broadcast), so only time-invariant R gives a log-likelihood here.
    if R.ndim == 2:
        out["log_likelihood"] = np.array(kf.loglikelihood(X))
    return out


# ----------------------------------------------------------------------------------------------
# Pyro GaussianHMM
# ----------------------------------------------------------------------------------------------
def gaussian_hmm(A, C, Q, R, init_loc, init_cov, num_steps=None):
    """Pyro's ``GaussianHMM`` for our model, with its initial state ``z_0 ~ N(init_loc,
    init_cov)`` one step *before* the first observation, so that in our convention
    ``z_1 ~ N(A_1 init_loc, A_1 init_cov A_1^T + Q_1)``. Time-varying A/Q (``(..., T, n, n)``):
    the HMM's step t uses ``A[t]`` for ``z_t = A[t] z_{t-1}``, so ``A[0]`` maps ``z_0 -> z_1``.
    Returns ``(hmm, init_mean, init_cov)`` with the equivalent pyrossm initial moments.
    Row vectors: the HMM's transition_matrix is ``A^T``, its observation_matrix ``C^T``."""
    import pyro.distributions as dist

    A0 = A if A.dim() == 2 else A[..., 0, :, :]
    Q0 = Q if Q.dim() == 2 else Q[..., 0, :, :]
    m0 = (A0 @ init_loc.unsqueeze(-1)).squeeze(-1)
    P0 = A0 @ init_cov @ A0.transpose(-1, -2) + Q0
    n, p = A.shape[-1], C.shape[-2]
    hmm = dist.GaussianHMM(
        dist.MultivariateNormal(init_loc, init_cov),
        A.transpose(-1, -2),
        dist.MultivariateNormal(torch.zeros(n, dtype=A.dtype), Q),
        C.transpose(-1, -2),
        dist.MultivariateNormal(torch.zeros(p, dtype=C.dtype), R),
        duration=num_steps,
    )
    return hmm, m0, P0
