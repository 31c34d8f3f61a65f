"""LinearGaussianSSM: construction, exact methods, sampling, forecasting and the Pyro model.

Sequences are (batch, T, obs_dim), time at dim -2. Monte Carlo checks state their tolerance in
standard errors (K_SE); exact identities use float64 and a relative tolerance.
"""

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import scipy.linalg
import torch
from lgssm_oracles import assert_rel_close, dense_oracle, random_system

from pyrossm.lgssm import LinearGaussianSSM, kalman_filter, kalman_smoother

RTOL = 1e-10  # exact identities in float64
K_SE = 5.0  # Monte Carlo tolerance in standard errors
FIT_STEPS = 1  # L-BFGS outer steps (each up to 50 iterations)
EM_ITERS = 25
NAMES = ("A", "C", "Q", "R", "init_mean", "init_cov")


def model_of(s, **kw):
    return LinearGaussianSSM.from_matrices(
        A=s["A"], C=s["C"], Q=s["Q"], R=s["R"], init_mean=s["init_mean"],
        init_cov=s["init_cov"], dtype=torch.float64, **kw,
    )


def stationary_system(n, p, seed):
    """A stable system started in its stationary distribution: z_t ~ N(0, Σ) for every t."""
    s = random_system(n, p, 1, seed=seed)
    A, Q = s["A"].numpy(), s["Q"].numpy()
    Sigma = scipy.linalg.solve_discrete_lyapunov(A, Q)  # Σ = A Σ Aᵀ + Q
    s["init_mean"] = torch.zeros(n, dtype=torch.float64)
    s["init_cov"] = torch.as_tensor(0.5 * (Sigma + Sigma.T))
    return s


def assert_within_se(estimate, expected, se, name):
    z = ((estimate - expected) / se).abs()
    assert bool((z <= K_SE).all()), f"{name}: max |error| = {float(z.max()):.2f} SE > {K_SE}"


def sample_cov_se(cov_a, cov_b, cross, n):
    """Standard error of a sample covariance entry Cov(a_i, b_j) of Gaussians, n draws:
    sqrt((Var a_i Var b_j + Cov(a_i, b_j)^2) / n)."""
    return ((torch.diagonal(cov_a).unsqueeze(-1) * torch.diagonal(cov_b).unsqueeze(-2)
             + cross ** 2) / n).sqrt()


# ---------------------------------------------------------------------------------------------
# construction and exact methods
def test_from_matrices_B_D_equals_Q_R():
    s = random_system(3, 2, 20, seed=1, batch=(2,))
    g = torch.Generator().manual_seed(1)
    B = torch.randn(3, 3, generator=g, dtype=torch.float64)
    D = torch.randn(2, 2, generator=g, dtype=torch.float64)
    kw = dict(A=s["A"], C=s["C"], init_mean=s["init_mean"], init_cov=s["init_cov"],
              dtype=torch.float64)
    a = LinearGaussianSSM.from_matrices(B=B, D=D, **kw)
    b = LinearGaussianSSM.from_matrices(Q=B @ B.T, R=D @ D.T, **kw)
    assert_rel_close(a.Q, B @ B.T, RTOL, "Q from B")
    assert_rel_close(a.R, D @ D.T, RTOL, "R from D")
    assert_rel_close(a.log_prob(s["x"]), b.log_prob(s["x"]), RTOL, "log_prob B/D vs Q/R")


def test_from_matrices_rectangular_factor():
    """B (n, k) with k != n: Q = B Bᵀ."""
    B = torch.tensor([[1.0, 0.2, 0.0], [0.5, -1.0, 0.3]], dtype=torch.float64)
    ssm = LinearGaussianSSM.from_matrices(A=0.5 * torch.eye(2), C=torch.ones(1, 2), B=B,
                                          R=torch.eye(1), dtype=torch.float64)
    assert_rel_close(ssm.Q, B @ B.T, 1e-6, "Q from a rectangular B")


def test_parameters_round_trip_and_methods_delegate():
    s = random_system(3, 2, 25, seed=2, batch=(3,), missing="entries")
    ssm = model_of(s)
    for k in NAMES:
        assert_rel_close(getattr(ssm, k), s[k], RTOL, f"ssm.{k}")
    args = [s[k] for k in NAMES]
    f = kalman_filter(s["x"], *args)
    sm = kalman_smoother(s["x"], *args)
    assert_rel_close(ssm.log_prob(s["x"]), f.log_likelihood, RTOL, "log_prob")
    assert_rel_close(ssm.filter(s["x"]).filtered_means, f.filtered_means, RTOL, "filter")
    assert_rel_close(ssm.smooth(s["x"]).smoothed_covs, sm.smoothed_covs, RTOL, "smooth")
    mask = torch.rand(3, 25, generator=torch.Generator().manual_seed(0)) > 0.5
    assert_rel_close(ssm.log_prob(s["x"], mask=mask),
                     kalman_filter(s["x"], *args, mask=mask).log_likelihood, RTOL, "masked")


def test_learnable_parameters_and_state_dict():
    ssm = LinearGaussianSSM(3, 2)
    names = {n for n, p in ssm.named_parameters() if p.requires_grad}
    assert len(names) == 6, names
    ssm2 = LinearGaussianSSM(3, 2)
    with torch.no_grad():
        for p in ssm.parameters():
            p.add_(0.01)
    ssm2.load_state_dict(ssm.state_dict())
    x = torch.randn(2, 10, 2)
    assert torch.equal(ssm.log_prob(x), ssm2.log_prob(x))
    for k in ("Q", "R", "init_cov"):
        assert torch.linalg.eigvalsh(getattr(ssm, k)).min() > 0, k


# ---------------------------------------------------------------------------------------------
# sampling
def test_sample_shapes_and_seed_determinism():
    s = random_system(3, 2, 1, seed=3)
    ssm = model_of(s)
    pyro.set_rng_seed(7)
    z1, x1 = ssm.sample(12, num_samples=5)
    pyro.set_rng_seed(7)
    z2, x2 = ssm.sample(12, num_samples=5)
    assert z1.shape == (5, 12, 3) and x1.shape == (5, 12, 2)
    assert z1.dtype == torch.float64
    assert torch.equal(z1, z2) and torch.equal(x1, x2)
    z3, _ = ssm.sample(12, num_samples=5)
    assert not torch.equal(z1, z3)
    z, x = ssm.sample(4)
    assert z.shape == (1, 4, 3) and x.shape == (1, 4, 2)


@pytest.mark.parametrize("n,p", [(1, 1), (3, 2)])
def test_sample_moments_match_stationary_distribution(n, p):
    num, T = 4000, 3
    s = stationary_system(n, p, seed=4 + n)
    ssm = model_of(s)
    z, x = ssm.sample(T, num_samples=num)
    Sigma, A, C, R = s["init_cov"], s["A"], s["C"], s["R"]
    Sx = C @ Sigma @ C.T + R
    for t in range(T):
        assert_within_se(z[:, t].mean(0), torch.zeros(n, dtype=torch.float64),
                         (torch.diagonal(Sigma) / num).sqrt(), f"mean z_{t}")
        zc = z[:, t] - z[:, t].mean(0)
        assert_within_se(zc.T @ zc / (num - 1), Sigma, sample_cov_se(Sigma, Sigma, Sigma, num),
                         f"Cov z_{t}")
        xc = x[:, t] - x[:, t].mean(0)
        assert_within_se(xc.T @ xc / (num - 1), Sx, sample_cov_se(Sx, Sx, Sx, num), f"Cov x_{t}")
        if t > 0:
            # lag one: Cov(z_t, z_{t-1}) = A Σ (fails if A were applied transposed)
            prev = z[:, t - 1] - z[:, t - 1].mean(0)
            cross = A @ Sigma
            assert_within_se(zc.T @ prev / (num - 1), cross,
                             sample_cov_se(Sigma, Sigma, cross, num), f"Cov(z_{t}, z_{t-1})")
            # Cov(x_t, z_t) = C Σ
            cxz = C @ Sigma
            assert_within_se(xc.T @ zc / (num - 1), cxz, sample_cov_se(Sx, Sigma, cxz, num),
                             f"Cov(x_{t}, z_{t})")


# ---------------------------------------------------------------------------------------------
# forecasting
def closed_form_forecast(s, x, horizon):
    f = kalman_filter(x, *[s[k] for k in NAMES])
    m, P = f.filtered_means[..., -1, :], f.filtered_covs[..., -1, :, :]
    A, C, Q, R = s["A"], s["C"], s["Q"], s["R"]
    means, covs = [], []
    for h in range(1, horizon + 1):
        Ah = torch.linalg.matrix_power(A, h)
        mh = m @ Ah.T  # A^h m
        Ph = Ah @ P @ Ah.T + sum(torch.linalg.matrix_power(A, j) @ Q @
                                 torch.linalg.matrix_power(A, j).T for j in range(h))
        means.append(mh @ C.T)
        covs.append(C @ Ph @ C.T + R)
    return torch.stack(means, -2), torch.stack(covs, -3)


def test_forecast_matches_closed_form_and_samples():
    s = random_system(3, 2, 30, seed=5, batch=(2,), missing="entries")
    ssm = model_of(s)
    horizon, num = 4, 4000
    fc = ssm.forecast(s["x"], horizon, num_samples=num)
    means, covs = closed_form_forecast(s, s["x"], horizon)
    assert fc.samples.shape == (num, 2, horizon, 2)
    assert fc.means.shape == (2, horizon, 2) and fc.covs.shape == (2, horizon, 2, 2)
    assert_rel_close(fc.means, means, 1e-9, "forecast means")
    assert_rel_close(fc.covs, covs, 1e-9, "forecast covs")
    se = (torch.diagonal(covs, dim1=-2, dim2=-1) / num).sqrt()
    assert_within_se(fc.samples.mean(0), means, se, "forecast sample means")
    centred = fc.samples - fc.samples.mean(0)
    emp = torch.einsum("sbhi,sbhj->bhij", centred, centred) / (num - 1)
    var = torch.diagonal(covs, dim1=-2, dim2=-1)
    se_cov = ((var.unsqueeze(-1) * var.unsqueeze(-2) + covs ** 2) / num).sqrt()
    assert_within_se(emp, covs, se_cov, "forecast sample covariances")


def test_forecast_of_a_local_level_is_flat():
    """Random walk plus noise: the forecast mean is the last filtered level for every horizon,
    and the variance grows by Q per step."""
    x = torch.cumsum(torch.randn(1, 40, 1, dtype=torch.float64), -2)
    ssm = LinearGaussianSSM.from_matrices(A=1.0, C=1.0, Q=0.5, R=2.0, init_cov=10.0,
                                          dtype=torch.float64)
    fc = ssm.forecast(x, 5, num_samples=10)
    f = ssm.filter(x)
    level, P = f.filtered_means[0, -1, 0], f.filtered_covs[0, -1, 0, 0]
    assert_rel_close(fc.means[0, :, 0], level.expand(5), RTOL, "flat forecast")
    expected = P + 0.5 * torch.arange(1, 6, dtype=torch.float64) + 2.0
    assert_rel_close(fc.covs[0, :, 0, 0], expected, RTOL, "forecast variance")


# ---------------------------------------------------------------------------------------------
# the Pyro model
def chain_log_density(z, sm):
    """log p(z_{1:T} | x) of a Gauss-Markov posterior from the smoother's marginals and lag-one
    cross covariances: p(z_1 | x) ∏ p(z_{t+1} | z_t, x)."""
    mvn = torch.distributions.MultivariateNormal
    m, P, X = sm.smoothed_means, sm.smoothed_covs, sm.smoothed_cross_covs
    out = mvn(m[..., 0, :], P[..., 0, :, :]).log_prob(z[..., 0, :])
    for t in range(z.shape[-2] - 1):
        G = torch.linalg.solve(P[..., t, :, :], X[..., t, :, :].transpose(-1, -2)).transpose(
            -1, -2)  # Cov(z_{t+1}, z_t) Var(z_t)^{-1}
        mean = m[..., t + 1, :] + (G @ (z[..., t, :] - m[..., t, :]).unsqueeze(-1)).squeeze(-1)
        cov = P[..., t + 1, :, :] - G @ X[..., t, :, :].transpose(-1, -2)
        out = out + mvn(mean, 0.5 * (cov + cov.transpose(-1, -2))).log_prob(z[..., t + 1, :])
    return out


def traced(ssm, x, mask=None):
    tr = poutine.trace(ssm.model).get_trace(x, mask=mask)
    tr.compute_log_prob()
    return tr


def test_model_trace_sites_and_shapes():
    s = random_system(3, 2, 6, seed=6, batch=(4,))
    ssm = model_of(s)
    tr = traced(ssm, s["x"])
    z, x = tr.nodes["z"], tr.nodes["x"]
    assert not z["is_observed"] and x["is_observed"]
    assert torch.equal(x["value"], s["x"])
    assert z["fn"].batch_shape == (4,) and z["fn"].event_shape == (6, 3)
    assert x["fn"].batch_shape == (4,) and x["fn"].event_shape == (6, 2)
    assert z["value"].shape == (4, 6, 3)
    assert z["log_prob"].shape == (4,) and x["log_prob"].shape == (4,)
    for site in (z, x):
        frames = [f for f in site["cond_indep_stack"]]
        assert [(f.name, f.dim, f.size) for f in frames] == [("sequences", -1, 4)]
    latent = [n for n in tr.stochastic_nodes if n != "sequences"]  # (the plate's own node)
    assert latent == ["z"] and tr.observation_nodes == ["x"]


@pytest.mark.parametrize("missing", ["none", "entries", "steps"])
@pytest.mark.parametrize("n,p,T", [(1, 1, 5), (3, 2, 6), (2, 3, 4)])
def test_model_density_identity(n, p, T, missing):
    """log p(x, z) (from the Pyro trace) − log p(z | x) (exact smoother posterior) = log p(x)
    for any z: the model's joint density agrees with the Kalman likelihood."""
    s = random_system(n, p, T, seed=7 + 10 * n + p, batch=(3,), missing=missing)
    ssm = model_of(s)
    tr = traced(ssm, s["x"])
    z = tr.nodes["z"]["value"]
    log_joint = tr.nodes["z"]["log_prob"] + tr.nodes["x"]["log_prob"]
    sm = ssm.smooth(s["x"])
    log_post = chain_log_density(z, sm)
    assert_rel_close(log_joint - log_post, sm.log_likelihood, 1e-9, "log p(x,z) - log p(z|x)")
    # the same with the dense joint Gaussian posterior of the whole trajectory
    for b in range(3):
        ref = dense_oracle(s["x"][b], *[s[k] for k in NAMES])
        mvn = torch.distributions.MultivariateNormal(
            torch.as_tensor(ref["smoothed_means"]).reshape(-1),
            torch.as_tensor(ref["joint_cov"]))
        dense_post = mvn.log_prob(z[b].reshape(-1))
        assert_rel_close(log_joint[b] - dense_post, torch.as_tensor(ref["log_likelihood"]),
                         1e-9, "dense posterior identity")


def test_model_density_identity_with_padding_mask():
    """Right-padded sequences (protocol mask): padding contributes nothing, so the identity
    holds on each sequence's own steps."""
    T, lengths = 6, [6, 4, 1]
    s = random_system(2, 2, T, seed=8, batch=(3,))
    mask = torch.arange(T) < torch.tensor(lengths).unsqueeze(-1)
    ssm = model_of(s)
    tr = traced(ssm, s["x"], mask=mask)
    z = tr.nodes["z"]["value"]
    log_joint = tr.nodes["z"]["log_prob"] + tr.nodes["x"]["log_prob"]
    for b, L in enumerate(lengths):
        sm = ssm.smooth(s["x"][b : b + 1, :L])
        post = chain_log_density(z[b : b + 1, :L], sm)
        assert_rel_close(log_joint[b] - post[0], sm.log_likelihood[0], 1e-9, f"length {L}")
        assert_rel_close(ssm.log_prob(s["x"][b : b + 1], mask=mask[b : b + 1]),
                         sm.log_likelihood, RTOL, "masked log_prob = truncated")


def test_model_elbo_with_exact_posterior_guide_equals_log_likelihood():
    """Trace_ELBO with the exact smoother posterior as guide equals log p(x) (up to MC noise
    that is zero here, since log p(x,z) - log q(z) is constant in z)."""
    s = random_system(2, 2, 5, seed=9, batch=(2,))
    ssm = model_of(s)
    sm = ssm.smooth(s["x"])
    ref = [dense_oracle(s["x"][b], *[s[k] for k in NAMES]) for b in range(2)]
    loc = torch.stack([torch.as_tensor(r["smoothed_means"]).reshape(-1) for r in ref])
    cov = torch.stack([torch.as_tensor(r["joint_cov"]) for r in ref])

    def guide(x, mask=None):
        with pyro.plate("sequences", 2, dim=-1):
            d = pyro.distributions.MultivariateNormal(loc, cov)
            pyro.sample("z", pyro.distributions.TransformedDistribution(
                d, [pyro.distributions.transforms.ReshapeTransform((10,), (5, 2))]))

    elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=False,
                                 max_plate_nesting=1)
    loss = elbo.loss(ssm.model, guide, s["x"])
    assert abs(-loss - float(sm.log_likelihood.sum())) < 1e-8 * abs(loss)


def test_fit_increases_likelihood_to_the_mle():
    """A fully learnable model fitted to simulated data reaches at least the log-likelihood of
    the true parameters (an MLE can only be better)."""
    s = random_system(2, 2, 50, seed=10, batch=(2,))
    ssm = LinearGaussianSSM(2, 2, dtype=torch.float64)
    with torch.no_grad():
        start = float(ssm.log_prob(s["x"]).sum())
    losses = ssm.fit(s["x"], num_steps=FIT_STEPS, start="current")
    assert len(losses) >= 1 and np.isfinite(losses).all()
    # the history is the negative log-likelihood per observed step; its first entry is the
    # loss at the starting point (here the model's current values)
    assert abs(losses[0] + start / s["x"][..., 0].numel()) < 1e-9 * abs(start)
    with torch.no_grad():
        end = float(ssm.log_prob(s["x"]).sum())
    true = float(kalman_filter(*[s[k] for k in ("x",) + NAMES]).log_likelihood.sum())
    assert end > start
    assert end >= true - 1e-3 * abs(true), (end, true)
    # the last entry is the loss at the returned parameters
    assert losses[-1] < losses[0]
    assert abs(losses[-1] + end / s["x"][..., 0].numel()) < 1e-9 * abs(end)


@pytest.mark.parametrize("missing", ["none", "steps"])
def test_fit_em_is_monotone(missing):
    """EM never decreases the log-likelihood (history = log-likelihood per observed step at the
    start of each iteration)."""
    s = random_system(2, 2, 40, seed=11, batch=(2,), missing=missing)
    em = LinearGaussianSSM(2, 2, dtype=torch.float64)
    hist = em.fit_em(s["x"], num_iters=EM_ITERS, tolerance=0.0)
    assert len(hist) == EM_ITERS
    diffs = np.diff(hist)
    assert (diffs >= -1e-10 * np.abs(hist[1:])).all(), f"EM decreased: min step {diffs.min():.3g}"
    with torch.no_grad():
        n_obs = float((~torch.isnan(s["x"]).all(-1)).sum())
        final = float(em.log_prob(s["x"]).sum()) / n_obs
    assert final >= hist[-1] - 1e-10 * abs(final) and final > hist[0] + 0.01


@pytest.mark.slow
def test_fit_em_converges_to_the_gradient_mle_on_nile():
    """EM's fixed point is the MLE that the gradient fit finds: Nile local level, Q and R
    learned, A = C = 1 and the diffuse initial state fixed, full log-likelihood (no burn).
    (On systems whose MLE has a nearly singular R, EM crawls: thousands of iterations.)"""
    from pyrossm.datasets import load_nile

    x = load_nile().flow.to(torch.float64).reshape(1, -1, 1)

    def local_level():
        return LinearGaussianSSM.from_matrices(A=1.0, C=1.0, Q=5000.0, R=5000.0, init_mean=0.0,
                                               init_cov=1e6, learn=("Q", "R"),
                                               dtype=torch.float64)

    em, gd = local_level(), local_level()
    em.fit_em(x, num_iters=300, tolerance=1e-12)
    gd.fit(x)
    with torch.no_grad():
        ll_em, ll_gd = float(em.log_prob(x)), float(gd.log_prob(x))
    assert abs(ll_em - ll_gd) < 1e-8 * abs(ll_gd), (ll_em, ll_gd)
    for k in ("Q", "R"):
        assert_rel_close(getattr(em, k), getattr(gd, k), 2e-3, f"EM vs gradient MLE: {k}")


def test_model_float32_runs():
    ssm = LinearGaussianSSM(3, 2)
    x = torch.randn(4, 20, 2)
    tr = traced(ssm, x)
    assert tr.nodes["z"]["value"].dtype == torch.float32
    assert torch.isfinite(tr.log_prob_sum())
    assert ssm.log_prob(x).shape == (4,)
