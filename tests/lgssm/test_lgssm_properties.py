"""Properties of kalman_filter / kalman_smoother that need no external oracle.

parallel = sequential, float32 vs float64, gradients (gradcheck), smoothed = filtered at the
last step, symmetric positive-definite covariances, masking = removing steps, time-varying =
looping over steps. x is (batch..., T, obs_dim), time at dim -2.
"""

import pytest
import torch
from lgssm_oracles import assert_rel_close, random_system

from pyrossm.lgssm import kalman_filter, kalman_smoother

PAR_RTOL = 1e-6  # acceptance: parallel = sequential to 1e-6 in float64
EXACT_RTOL = 1e-10  # identities that hold up to rounding in float64
F32_LL_RTOL = 1e-4  # float32 vs float64 log-likelihood (T <= 100, well-conditioned systems)
F32_MOMENT_RTOL = 1e-3  # float32 vs float64 means / covariances
ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")
FILTER_KEYS = ("log_likelihood", "step_log_likelihoods", "predicted_means", "predicted_covs",
               "filtered_means", "filtered_covs")
SMOOTHER_KEYS = ("log_likelihood", "smoothed_means", "smoothed_covs", "smoothed_cross_covs",
                 "filtered_means", "filtered_covs", "step_log_likelihoods")
PARALLEL = [pytest.param(False, id="sequential"), pytest.param(True, id="parallel")]


def args_of(s):
    return [s[k] for k in ARGS]


def make_mask(shape, seed, p_missing=0.3):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > p_missing


# ---------------------------------------------------------------------------------------------
# parallel = sequential
@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("n,p,T,missing,batch,time_varying", [
    (1, 1, 1, "none", (3,), False),
    (2, 2, 2, "none", (), False),
    (4, 3, 100, "none", (3,), False),
    (3, 2, 63, "entries", (2, 2), False),
    (6, 4, 37, "steps", (2,), True),
    (2, 1, 128, "entries", (3,), True),
])
def test_parallel_equals_sequential(n, p, T, missing, batch, time_varying, use_mask):
    s = random_system(n, p, T, seed=n * 100 + T, batch=batch, missing=missing,
                      time_varying=time_varying)
    mask = make_mask(tuple(batch) + (T,), seed=T) if use_mask else None
    for fn, keys in ((kalman_filter, FILTER_KEYS), (kalman_smoother, SMOOTHER_KEYS)):
        seq = fn(*args_of(s), mask=mask, parallel=False)
        par = fn(*args_of(s), mask=mask, parallel=True)
        for k in keys:
            assert_rel_close(getattr(par, k), getattr(seq, k), PAR_RTOL,
                             f"{fn.__name__}.{k} parallel vs sequential")


@pytest.mark.slow
@pytest.mark.parametrize("T", [500, 1000, 1025])
def test_parallel_equals_sequential_long(T):
    s = random_system(4, 3, T, seed=T, batch=(4,), missing="entries")
    seq = kalman_smoother(*args_of(s), parallel=False)
    par = kalman_smoother(*args_of(s), parallel=True)
    for k in SMOOTHER_KEYS:
        assert_rel_close(getattr(par, k), getattr(seq, k), PAR_RTOL, f"{k} T={T}")


# ---------------------------------------------------------------------------------------------
# float32
@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("missing", ["none", "entries"])
def test_float32_agrees_with_float64(missing, parallel):
    s = random_system(3, 2, 100, seed=11, batch=(4,), missing=missing)
    s32 = {k: v.float() for k, v in s.items()}
    r64 = kalman_smoother(*args_of(s), parallel=parallel)
    r32 = kalman_smoother(*args_of(s32), parallel=parallel)
    for k in SMOOTHER_KEYS:
        assert getattr(r32, k).dtype == torch.float32, k
        assert torch.isfinite(getattr(r32, k)).all(), k
    assert_rel_close(r32.log_likelihood, r64.log_likelihood, F32_LL_RTOL, "float32 loglik")
    for k in ("smoothed_means", "smoothed_covs", "filtered_means", "filtered_covs",
              "smoothed_cross_covs"):
        assert_rel_close(getattr(r32, k), getattr(r64, k), F32_MOMENT_RTOL, f"float32 {k}")


# ---------------------------------------------------------------------------------------------
# gradients
@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("missing,time_varying", [("none", False), ("entries", False),
                                                  ("steps", True)])
def test_gradcheck_log_likelihood(missing, time_varying, parallel):
    """gradcheck of log p(x) w.r.t. A, C, Q, R, m0, P0 (covariances through factors, so that the
    perturbed matrices stay symmetric positive definite)."""
    T = 3 if time_varying else 5
    s = random_system(2, 2, T, seed=21, batch=(2,), missing=missing, time_varying=time_varying)
    x = s["x"]
    B = torch.linalg.cholesky(s["Q"]).requires_grad_()
    D = torch.linalg.cholesky(s["R"]).requires_grad_()
    L0 = torch.linalg.cholesky(s["init_cov"]).requires_grad_()
    A, C, m0 = (s[k].clone().requires_grad_() for k in ("A", "C", "init_mean"))

    def loglik(A, C, B, D, m0, L0):
        Q = B @ B.transpose(-1, -2)
        R = D @ D.transpose(-1, -2)
        P0 = L0 @ L0.transpose(-1, -2)
        return kalman_filter(x, A, C, Q, R, m0, P0, parallel=parallel).log_likelihood

    assert torch.autograd.gradcheck(loglik, (A, C, B, D, m0, L0))


@pytest.mark.parametrize("parallel", PARALLEL)
def test_gradcheck_smoother(parallel):
    s = random_system(2, 1, 4, seed=22, missing="steps")
    A = s["A"].clone().requires_grad_()
    B = torch.linalg.cholesky(s["Q"]).requires_grad_()

    def smoothed(A, B):
        Q = B @ B.T
        r = kalman_smoother(s["x"], A, s["C"], Q, s["R"], s["init_mean"], s["init_cov"],
                            parallel=parallel)
        return r.smoothed_means, r.smoothed_covs, r.smoothed_cross_covs

    assert torch.autograd.gradcheck(smoothed, (A, B))


@pytest.mark.parametrize("missing,T", [("entries", 30), ("none", 150)])
def test_gradient_matches_between_modes(missing, T):
    """Gradients w.r.t. every parameter are finite (also with NaN entries in x) and agree
    between the sequential and parallel algorithms (T = 150 without missing data exercises the
    sequential filter's steady-state shortcut)."""
    s = random_system(3, 2, T, seed=23, batch=(3,), missing=missing)

    def grads(par):
        ps = [s[k].clone().requires_grad_() for k in ARGS[1:]]
        kalman_filter(s["x"], *ps, parallel=par).log_likelihood.sum().backward()
        return [q.grad for q in ps]

    for g_seq, g_par, name in zip(grads(False), grads(True), ARGS[1:]):
        assert torch.isfinite(g_seq).all(), name
        if name in ("Q", "R", "init_cov"):
            # only the symmetric part of the gradient w.r.t. a covariance is defined (the two
            # algorithms may read the upper or the lower triangle)
            g_seq, g_par = g_seq + g_seq.mT, g_par + g_par.mT
        assert_rel_close(g_par, g_seq, PAR_RTOL, f"gradient w.r.t. {name}")


# ---------------------------------------------------------------------------------------------
# structural properties
@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("missing", ["none", "entries"])
def test_smoothed_equals_filtered_at_last_step(missing, parallel):
    s = random_system(3, 2, 25, seed=31, batch=(2,), missing=missing)
    r = kalman_smoother(*args_of(s), parallel=parallel)
    assert_rel_close(r.smoothed_means[..., -1, :], r.filtered_means[..., -1, :], EXACT_RTOL,
                     "last smoothed mean")
    assert_rel_close(r.smoothed_covs[..., -1, :, :], r.filtered_covs[..., -1, :, :], EXACT_RTOL,
                     "last smoothed cov")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_covariances_symmetric_positive_definite(dtype, parallel):
    # a nearly unit-root system with a small observation noise stresses the updates
    s = random_system(4, 2, 200, seed=41, batch=(2,), missing="entries", max_singular=0.999)
    s = {k: v.to(dtype) for k, v in s.items()}
    s["R"] = s["R"] * 1e-2
    r = kalman_smoother(*args_of(s), parallel=parallel)
    f = kalman_filter(*args_of(s), parallel=parallel)
    sym_tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, P in (("filtered_covs", r.filtered_covs), ("smoothed_covs", r.smoothed_covs),
                    ("predicted_covs", f.predicted_covs)):
        asym = (P - P.transpose(-1, -2)).abs().max() / P.abs().max()
        assert asym <= sym_tol, f"{name}: relative asymmetry {asym:.3g}"
        eig = torch.linalg.eigvalsh(P.double())
        assert eig.min() > 0, f"{name}: smallest eigenvalue {eig.min():.3g}"
    # the joint posterior of (z_{t+1}, z_t) must be a valid covariance as well
    top = torch.cat([r.smoothed_covs[..., 1:, :, :], r.smoothed_cross_covs], -1)
    bottom = torch.cat([r.smoothed_cross_covs.transpose(-1, -2), r.smoothed_covs[..., :-1, :, :]],
                       -1)
    pair = torch.cat([top, bottom], -2).double()
    assert torch.linalg.eigvalsh(0.5 * (pair + pair.transpose(-1, -2))).min() > -1e-6 * (
        pair.abs().max()), "pairwise smoothed covariance of (z_{t+1}, z_t) is not PSD"


@pytest.mark.parametrize("parallel", PARALLEL)
def test_trailing_masked_steps_equal_truncation(parallel):
    T, keep = 30, 18
    s = random_system(3, 2, T, seed=51, batch=(2,))
    mask = torch.arange(T) < keep
    full = kalman_filter(*args_of(s), mask=mask.expand(2, T), parallel=parallel)
    short = kalman_filter(s["x"][..., :keep, :], *args_of(s)[1:], parallel=parallel)
    assert_rel_close(full.log_likelihood, short.log_likelihood, EXACT_RTOL, "loglik")
    assert (full.step_log_likelihoods[..., keep:] == 0).all()
    assert_rel_close(full.filtered_means[..., :keep, :], short.filtered_means, EXACT_RTOL, "means")
    assert_rel_close(full.filtered_covs[..., :keep, :, :], short.filtered_covs, EXACT_RTOL,
                     "covs")
    sm_full = kalman_smoother(*args_of(s), mask=mask, parallel=parallel)
    sm_short = kalman_smoother(s["x"][..., :keep, :], *args_of(s)[1:], parallel=parallel)
    assert_rel_close(sm_full.smoothed_means[..., :keep, :], sm_short.smoothed_means, 1e-8,
                     "smoothed means")


@pytest.mark.parametrize("parallel", PARALLEL)
def test_interior_masked_step_equals_removed_step(parallel):
    """Masking step t = removing it and composing the two transitions around it:
    A' = A A, Q' = A Q Aᵀ + Q (a time-varying model on the T-1 remaining steps)."""
    T, gap = 12, 5
    s = random_system(2, 2, T, seed=52, batch=(2,))
    A, Q = s["A"], s["Q"]
    mask = torch.ones(T, dtype=torch.bool)
    mask[gap] = False
    masked = kalman_filter(*args_of(s), mask=mask, parallel=parallel)
    keep = [t for t in range(T) if t != gap]
    A_tv = A.expand(1, T - 1, 2, 2).clone()
    Q_tv = Q.expand(1, T - 1, 2, 2).clone()
    A_tv[0, gap] = A @ A
    Q_tv[0, gap] = A @ Q @ A.T + Q
    removed = kalman_filter(s["x"][..., keep, :], A_tv, s["C"], Q_tv, s["R"], s["init_mean"],
                            s["init_cov"], parallel=parallel)
    assert_rel_close(masked.log_likelihood, removed.log_likelihood, EXACT_RTOL, "loglik")
    assert_rel_close(masked.step_log_likelihoods[..., keep], removed.step_log_likelihoods,
                     EXACT_RTOL, "step logliks")
    assert (masked.step_log_likelihoods[..., gap] == 0).all()
    assert_rel_close(masked.filtered_means[..., keep, :], removed.filtered_means, EXACT_RTOL,
                     "filtered means")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("how", ["mask", "nan"])
def test_fully_masked_sequence(how, parallel):
    """No observation at all: log-likelihood 0 and every moment equals the prior's."""
    T = 9
    s = random_system(2, 3, T, seed=53, batch=(2,))
    if how == "mask":
        mask = torch.zeros(2, T, dtype=torch.bool)
    else:
        mask, s["x"] = None, torch.full_like(s["x"], float("nan"))
    r = kalman_smoother(*args_of(s), mask=mask, parallel=parallel)
    f = kalman_filter(*args_of(s), mask=mask, parallel=parallel)
    assert (r.log_likelihood == 0).all() and (f.step_log_likelihoods == 0).all()
    m, P = s["init_mean"], s["init_cov"]
    for t in range(T):
        if t > 0:
            m, P = s["A"] @ m, s["A"] @ P @ s["A"].T + s["Q"]
        for name, got in (("filtered", (f.filtered_means, f.filtered_covs)),
                          ("predicted", (f.predicted_means, f.predicted_covs)),
                          ("smoothed", (r.smoothed_means, r.smoothed_covs))):
            assert_rel_close(got[0][..., t, :], m.expand(2, 2), EXACT_RTOL, f"{name} mean t={t}")
            assert_rel_close(got[1][..., t, :, :], P.expand(2, 2, 2), EXACT_RTOL,
                             f"{name} cov t={t}")
    # Cov(z_{t+1}, z_t) under the prior = A Var(z_t)
    assert_rel_close(r.smoothed_cross_covs[..., 0, :, :], (s["A"] @ s["init_cov"]).expand(2, 2, 2),
                     EXACT_RTOL, "prior cross cov")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("missing", ["none", "steps"])
def test_badly_scaled_independent_states_equal_separate_filters(missing, parallel):
    """Two independent states of very different scales (diagonal A, C, Q, R, P0): each one's
    filtered and smoothed moments equal those of a 1-D filter run on it alone. Catches
    convergence tests that are relative to the largest covariance entry only."""
    T = 400
    d = torch.float64
    A = torch.diag(torch.tensor([0.5, 0.999], dtype=d))
    Q = torch.diag(torch.tensor([1e4, 1e-8], dtype=d))
    R = torch.diag(torch.tensor([1e4, 1e-4], dtype=d))
    C = torch.eye(2, dtype=d)
    m0 = torch.zeros(2, dtype=d)
    P0 = torch.diag(torch.tensor([1e4, 1.0], dtype=d))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, 2, generator=g, dtype=d) * torch.tensor([100.0, 0.01], dtype=d)
    if missing == "steps":
        x[:, 7::10] = float("nan")
    both = kalman_smoother(x, A, C, Q, R, m0, P0, parallel=parallel)

    def block(M, i):
        return M[..., i : i + 1, i : i + 1]

    ll = 0.0
    for i in range(2):
        one = kalman_smoother(x[..., i : i + 1], *(block(M, i) for M in (A, C, Q, R)),
                              m0[i : i + 1], block(P0, i), parallel=parallel)
        ll = ll + one.log_likelihood
        for k in ("filtered_means", "smoothed_means"):
            assert_rel_close(getattr(both, k)[..., i : i + 1], getattr(one, k), PAR_RTOL,
                             f"state {i}: {k}")
        for k in ("filtered_covs", "smoothed_covs", "smoothed_cross_covs"):
            assert_rel_close(block(getattr(both, k), i), getattr(one, k), PAR_RTOL,
                             f"state {i}: {k}")
    assert_rel_close(both.log_likelihood, ll, PAR_RTOL, "log-likelihood = sum of the two")


@pytest.mark.parametrize("parallel", PARALLEL)
def test_time_varying_equals_looping_one_step_calls(parallel):
    """A time-varying filter equals a loop of one-step filters, each started from the previous
    filtered moments pushed through that step's (A_t, Q_t) and using that step's (C_t, R_t)."""
    T = 8
    s = random_system(3, 2, T, seed=61, batch=(2,), time_varying=True, missing="entries")
    res = kalman_filter(*args_of(s), parallel=parallel)
    A, C, Q, R = (s[k][0] for k in "ACQR")  # (T, ., .)
    m, P = s["init_mean"].expand(2, 3), s["init_cov"].expand(2, 3, 3)
    for t in range(T):
        if t > 0:
            m = m @ A[t].T
            P = A[t] @ P @ A[t].T + Q[t]
        one = kalman_filter(s["x"][:, t : t + 1, :], A[t], C[t], Q[t], R[t], m, P,
                            parallel=parallel)
        assert_rel_close(res.step_log_likelihoods[:, t], one.log_likelihood, EXACT_RTOL,
                         f"step loglik t={t}")
        assert_rel_close(res.predicted_means[:, t], m, EXACT_RTOL, f"predicted mean t={t}")
        assert_rel_close(res.filtered_means[:, t], one.filtered_means[:, 0], EXACT_RTOL,
                         f"filtered mean t={t}")
        assert_rel_close(res.filtered_covs[:, t], one.filtered_covs[:, 0], EXACT_RTOL,
                         f"filtered cov t={t}")
        m, P = one.filtered_means[:, 0], one.filtered_covs[:, 0]


@pytest.mark.parametrize("parallel", PARALLEL)
def test_constant_time_varying_equals_time_invariant(parallel):
    T = 20
    s = random_system(3, 2, T, seed=62, batch=(2,), missing="steps")
    tv = dict(s)
    for k in "ACQR":
        tv[k] = s[k].expand((1, T) + s[k].shape)
    a = kalman_smoother(*args_of(s), parallel=parallel)
    b = kalman_smoother(*args_of(tv), parallel=parallel)
    for k in SMOOTHER_KEYS:
        assert_rel_close(getattr(b, k), getattr(a, k), EXACT_RTOL, f"time-varying constant {k}")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("name", ["A", "C", "Q", "R"])
def test_time_dim_of_size_one_broadcasts(name, parallel):
    """A time-varying parameter (dim == x.dim() + 1) with a time dim of length 1 (allowed by the
    input checks) broadcasts over time: equal to the time-invariant parameter."""
    T = 6
    s = random_system(3, 2, T, seed=65, batch=(2,), missing="entries")
    tv = dict(s)
    tv[name] = s[name].expand((1, 1) + s[name].shape)
    a = kalman_smoother(*args_of(s), parallel=parallel)
    b = kalman_smoother(*args_of(tv), parallel=parallel)
    for k in SMOOTHER_KEYS:
        assert_rel_close(getattr(b, k), getattr(a, k), EXACT_RTOL, f"size-1 time dim {k}")


@pytest.mark.parametrize("parallel", PARALLEL)
def test_per_sequence_time_varying_parameters(parallel):
    """Time-varying parameters with their own batch dim (B, T, ., .) equal separate calls."""
    systems = [random_system(2, 2, 9, seed=66 + i, time_varying=True, missing="entries")
               for i in range(3)]
    stacked = {k: torch.stack([s[k] for s in systems]) for k in ARGS}
    both = kalman_smoother(*args_of(stacked), parallel=parallel)
    for i, s in enumerate(systems):
        one = kalman_smoother(*args_of(s), parallel=parallel)
        for k in SMOOTHER_KEYS:
            assert_rel_close(getattr(both, k)[i], getattr(one, k), EXACT_RTOL,
                             f"per-sequence time-varying {k}")


@pytest.mark.parametrize("parallel", PARALLEL)
def test_shared_parameters_equal_expanded(parallel):
    """The shared-parameter fast path (one covariance recursion for the batch) equals the same
    parameters expanded to one copy per sequence."""
    s = random_system(3, 2, 30, seed=63, batch=(4,))
    e = dict(s)
    for k in ("A", "C", "Q", "R", "init_mean", "init_cov"):
        e[k] = s[k].expand((4,) + s[k].shape).clone()
    a = kalman_filter(*args_of(s), parallel=parallel)
    b = kalman_filter(*args_of(e), parallel=parallel)
    for k in FILTER_KEYS:
        assert_rel_close(getattr(b, k), getattr(a, k), EXACT_RTOL, f"expanded params {k}")


@pytest.mark.parametrize("parallel", PARALLEL)
def test_unbatched_and_extra_batch_dims(parallel):
    s = random_system(2, 2, 10, seed=64, batch=(2, 3))
    r = kalman_filter(*args_of(s), parallel=parallel)
    assert r.log_likelihood.shape == (2, 3)
    assert r.step_log_likelihoods.shape == (2, 3, 10)
    assert r.filtered_means.shape == (2, 3, 10, 2)
    assert r.filtered_covs.shape == (2, 3, 10, 2, 2)
    assert r.predicted_means.shape == (2, 3, 10, 2)
    assert r.predicted_covs.shape == (2, 3, 10, 2, 2)
    single = kalman_smoother(s["x"][1, 2], *args_of(s)[1:], parallel=parallel)
    assert single.log_likelihood.shape == ()
    assert single.smoothed_cross_covs.shape == (9, 2, 2)
    assert_rel_close(single.log_likelihood, r.log_likelihood[1, 2], EXACT_RTOL, "unbatched")


@pytest.mark.cuda
@pytest.mark.parametrize("parallel", PARALLEL)
def test_cuda_matches_cpu(parallel):
    s = random_system(3, 2, 40, seed=71, batch=(2,), missing="entries")
    mask = make_mask((2, 40), seed=71)
    cpu = kalman_smoother(*args_of(s), mask=mask, parallel=parallel)
    gpu = kalman_smoother(*[v.cuda() for v in args_of(s)], mask=mask.cuda(), parallel=parallel)
    for k in SMOOTHER_KEYS:
        assert getattr(gpu, k).device.type == "cuda", k
        assert_rel_close(getattr(gpu, k).cpu(), getattr(cpu, k), 1e-9, f"cuda {k}")
