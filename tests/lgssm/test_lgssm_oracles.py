"""kalman_filter / kalman_smoother against independent oracles, float64.

Oracles (tests/lgssm/lgssm_oracles.py): statsmodels' KalmanSmoother, pykalman, Pyro's
GaussianHMM, and the dense joint Gaussian of (z_{1:T}, x_{1:T}) conditioned by brute force.
Shapes follow pyrossm: x is (batch..., T, obs_dim), time at dim -2.
"""

import numpy as np
import pytest
import torch
from lgssm_oracles import (
    assert_rel_close,
    dense_oracle,
    gaussian_hmm,
    pykalman_oracle,
    random_system,
    rescale_system,
    statsmodels_oracle,
)

from pyrossm.lgssm import kalman_filter, kalman_smoother

RTOL = 1e-8  # acceptance: agreement to 1e-8 relative in float64
FILTER_KEYS = (
    "log_likelihood",
    "step_log_likelihoods",
    "predicted_means",
    "predicted_covs",
    "filtered_means",
    "filtered_covs",
)
SMOOTHER_KEYS = ("smoothed_means", "smoothed_covs", "smoothed_cross_covs")
ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")
PARALLEL = [pytest.param(False, id="sequential"), pytest.param(True, id="parallel")]


def run_both(s, parallel, mask=None):
    """Filter and smoother results of pyrossm as one dict of tensors."""
    args = [s[k] for k in ARGS]
    f = kalman_filter(*args, mask=mask, parallel=parallel)
    sm = kalman_smoother(*args, mask=mask, parallel=parallel)
    out = f._asdict()
    out.update({k: getattr(sm, k) for k in SMOOTHER_KEYS})
    # the smoother repeats the filter's log-likelihood and filtered moments: they must agree
    for k in ("log_likelihood", "filtered_means", "filtered_covs"):
        assert_rel_close(getattr(sm, k), out[k], RTOL, f"smoother.{k} vs filter.{k}")
    return out


def seq_params(s, idx):
    """Parameters of sequence ``idx`` (time-varying params have size-1 batch dims)."""
    return [s["x"][idx]] + [s[k] for k in ARGS[1:]]


def compare(ours, ref, idx, keys, tag):
    for k in keys:
        if k in ref:
            assert_rel_close(ours[k][idx], ref[k], RTOL, f"{tag} {k} [sequence {idx}]")


def all_indices(batch):
    return list(np.ndindex(*batch)) if batch else [()]


# (state_dim, obs_dim, T, missing, batch)
STATSMODELS_CASES = [
    (1, 1, 30, "none", (2,)),
    (2, 1, 25, "steps", (3,)),
    (3, 2, 40, "entries", (2,)),
    (4, 4, 20, "none", (2, 2)),
    (2, 3, 15, "entries", (2,)),
    (6, 3, 50, "entries", (2,)),
    (5, 4, 1, "none", (2,)),
    (3, 2, 2, "steps", (3,)),
]


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("n,p,T,missing,batch", STATSMODELS_CASES)
def test_against_statsmodels(n, p, T, missing, batch, parallel):
    s = random_system(n, p, T, seed=100 + n * 10 + p + T, batch=batch, missing=missing)
    ours = run_both(s, parallel)
    for idx in all_indices(batch):
        ref = statsmodels_oracle(*seq_params(s, idx))
        compare(ours, ref, idx, FILTER_KEYS + SMOOTHER_KEYS, "statsmodels")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("missing", ["none", "entries"])
def test_against_statsmodels_badly_scaled(missing, parallel):
    """An equivalent system in coordinates scaled by 1e-3 .. 1e3 (states and observations)."""
    s = random_system(3, 2, 200, seed=150, batch=(2,), missing=missing, max_singular=0.99)
    s = rescale_system(s, [1e-3, 1.0, 1e3], [1e2, 1e-2])
    ours = run_both(s, parallel)
    for idx in all_indices((2,)):
        ref = statsmodels_oracle(*seq_params(s, idx))
        for k in FILTER_KEYS + SMOOTHER_KEYS:
            a, e = ours[k][idx], torch.as_tensor(ref[k])
            if k.endswith("means"):  # compare each state in its own scale
                for i in range(3):
                    assert_rel_close(a[..., i], e[..., i], RTOL, f"scaled {k}[{i}] [{idx}]")
            elif k.endswith("covs"):  # correlation scale: P_ij / sqrt(P_ii P_jj)
                var = torch.as_tensor(ref["smoothed_covs" if k == "smoothed_cross_covs" else k])
                d = torch.diagonal(var, dim1=-2, dim2=-1).sqrt()
                if k == "smoothed_cross_covs":  # Cov(z_{t+1}, z_t): scales of t+1 and t
                    norm = d[1:].unsqueeze(-1) * d[:-1].unsqueeze(-2)
                else:
                    norm = d.unsqueeze(-1) * d.unsqueeze(-2)
                assert_rel_close(a / norm, e / norm, RTOL, f"scaled {k} [{idx}]")
            else:
                assert_rel_close(a, e, RTOL, f"scaled {k} [{idx}]")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("n,p,T,missing,batch", [
    (1, 1, 30, "none", (2,)),
    (3, 2, 40, "steps", (3,)),
    (4, 4, 20, "none", (2, 2)),
    (6, 2, 35, "steps", (2,)),
])
def test_against_pykalman(n, p, T, missing, batch, parallel):
    s = random_system(n, p, T, seed=200 + n * 10 + p + T, batch=batch, missing=missing)
    ours = run_both(s, parallel)
    for idx in all_indices(batch):
        ref = pykalman_oracle(*seq_params(s, idx))
        compare(ours, ref, idx, FILTER_KEYS + SMOOTHER_KEYS, "pykalman")


DENSE_CASES = [
    (1, 1, 1, "none"),
    (2, 1, 4, "none"),
    (3, 2, 5, "steps"),
    (4, 3, 6, "entries"),
    (6, 4, 6, "none"),
    (2, 3, 3, "entries"),
    (5, 2, 6, "steps"),
]


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("time_varying", [False, True], ids=["static", "time_varying"])
@pytest.mark.parametrize("n,p,T,missing", DENSE_CASES)
def test_against_dense_joint(n, p, T, missing, time_varying, parallel):
    batch = (2,)
    s = random_system(n, p, T, seed=300 + n * 10 + p + T, batch=batch, missing=missing,
                      time_varying=time_varying)
    ours = run_both(s, parallel)
    for idx in all_indices(batch):
        ref = dense_oracle(*seq_params(s, idx))
        compare(ours, ref, idx, FILTER_KEYS + SMOOTHER_KEYS, "dense joint")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("n,p,T,missing", [(3, 2, 30, "entries"), (2, 2, 20, "steps"),
                                           (4, 1, 12, "none")])
def test_time_varying_against_statsmodels(n, p, T, missing, parallel):
    batch = (3,)
    s = random_system(n, p, T, seed=400 + n + p + T, batch=batch, missing=missing,
                      time_varying=True)
    ours = run_both(s, parallel)
    for idx in all_indices(batch):
        ref = statsmodels_oracle(*seq_params(s, idx))
        compare(ours, ref, idx, FILTER_KEYS + SMOOTHER_KEYS, "statsmodels (time-varying)")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("time_varying", [False, True], ids=["static", "time_varying"])
@pytest.mark.parametrize("n,p,T,batch", [(1, 1, 25, (3,)), (3, 2, 40, (2, 3)), (5, 4, 17, (4,))])
def test_against_pyro_gaussian_hmm(n, p, T, batch, time_varying, parallel):
    s = random_system(n, p, T, seed=500 + n + p + T, batch=batch, time_varying=time_varying)
    g = torch.Generator().manual_seed(n + p + T)
    loc = torch.randn(n, generator=g, dtype=torch.float64)
    F = torch.randn(n, n, generator=g, dtype=torch.float64)
    cov = F @ F.T + 0.5 * torch.eye(n, dtype=torch.float64)
    hmm, m0, P0 = gaussian_hmm(s["A"], s["C"], s["Q"], s["R"], loc, cov)
    # pyrossm with z_1 ~ N(A_1 loc, A_1 cov A_1^T + Q_1), the HMM's first-step prior.
    res = kalman_filter(s["x"], s["A"], s["C"], s["Q"], s["R"], m0, P0, parallel=parallel)
    assert_rel_close(res.log_likelihood, hmm.log_prob(s["x"]), RTOL, "GaussianHMM log_prob")
    last = hmm.filter(s["x"])  # distribution of z_T | x_{1:T}
    assert_rel_close(res.filtered_means[..., -1, :], last.loc, RTOL, "GaussianHMM filter loc")
    assert_rel_close(res.filtered_covs[..., -1, :, :], last.covariance_matrix, RTOL,
                     "GaussianHMM filter covariance")


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("missing", ["none", "entries"])
def test_batched_equals_looped(missing, parallel):
    batch = (2, 3)
    s = random_system(3, 2, 20, seed=600, batch=batch, missing=missing)
    ours = run_both(s, parallel)
    for idx in all_indices(batch):
        single = dict(s, x=s["x"][idx])
        one = run_both(single, parallel)
        for k in FILTER_KEYS + SMOOTHER_KEYS:
            assert_rel_close(ours[k][idx], one[k], 1e-12, f"batched vs looped {k}")


@pytest.mark.parametrize("parallel", PARALLEL)
def test_batched_parameters_equal_looped(parallel):
    """Parameters with their own batch dim (one system per sequence) equal separate calls."""
    systems = [random_system(2, 2, 15, seed=700 + i) for i in range(3)]
    stacked = {k: torch.stack([s[k] for s in systems]) for k in ARGS}
    ours = run_both(stacked, parallel)
    for i, s in enumerate(systems):
        ref = statsmodels_oracle(*[s[k] for k in ARGS])
        compare(ours, ref, i, FILTER_KEYS + SMOOTHER_KEYS, "per-sequence parameters")


@pytest.mark.parametrize("parallel", PARALLEL)
def test_mask_argument_equals_nan_steps(parallel):
    """mask=False at a step is the same as an all-NaN step (statsmodels as the reference)."""
    s = random_system(3, 2, 30, seed=800, batch=(3,))
    mask = torch.rand(3, 30, generator=torch.Generator().manual_seed(1)) > 0.3
    ours = run_both(s, parallel, mask=mask)
    x_nan = s["x"].masked_fill(~mask.unsqueeze(-1), float("nan"))
    for b in range(3):
        ref = statsmodels_oracle(x_nan[b], *[s[k] for k in ARGS[1:]])
        compare(ours, ref, b, FILTER_KEYS + SMOOTHER_KEYS, "mask vs NaN (statsmodels)")


@pytest.mark.parametrize("parallel", PARALLEL)
def test_broadcast_mask(parallel):
    """A mask of shape (T,) broadcasts over the batch dims of x."""
    s = random_system(2, 2, 12, seed=810, batch=(3,))
    mask = torch.tensor([True, False] * 6)
    a = kalman_filter(*[s[k] for k in ARGS], mask=mask, parallel=parallel)
    b = kalman_filter(*[s[k] for k in ARGS], mask=mask.expand(3, 12), parallel=parallel)
    for k in FILTER_KEYS:
        assert_rel_close(getattr(a, k), getattr(b, k), 1e-12, f"broadcast mask {k}")


# ---------------------------------------------------------------------------------------------
# bigger sweeps (acceptance sizes): python -m pytest -m slow tests/lgssm
@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("missing", ["none", "steps", "entries"])
@pytest.mark.parametrize("n,p", [(1, 1), (2, 4), (3, 2), (4, 3), (5, 1), (6, 4)])
def test_statsmodels_sweep_T500(n, p, missing, parallel):
    batch = (2,)
    s = random_system(n, p, 500, seed=900 + n * 10 + p, batch=batch, missing=missing)
    ours = run_both(s, parallel)
    for idx in all_indices(batch):
        ref = statsmodels_oracle(*seq_params(s, idx))
        compare(ours, ref, idx, FILTER_KEYS + SMOOTHER_KEYS, "statsmodels T=500")
        if missing != "entries":
            ref = pykalman_oracle(*seq_params(s, idx))
            compare(ours, ref, idx, FILTER_KEYS + SMOOTHER_KEYS, "pykalman T=500")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("n,p", [(1, 1), (3, 2), (6, 4)])
def test_time_varying_sweep_T500(n, p, parallel):
    s = random_system(n, p, 500, seed=950 + n + p, batch=(2,), missing="entries",
                      time_varying=True)
    ours = run_both(s, parallel)
    for idx in all_indices((2,)):
        ref = statsmodels_oracle(*seq_params(s, idx))
        compare(ours, ref, idx, FILTER_KEYS + SMOOTHER_KEYS, "statsmodels time-varying T=500")
