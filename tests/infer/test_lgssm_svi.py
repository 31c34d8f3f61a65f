"""Issue 3 acceptance: SVI with pyrossm's guides on an LGSSM, checked against the Kalman filter.

Setting: state dim 2, obs dim 2, simulated data, float64. With the model fixed at the truth,
``log p(x) - ELBO = KL(q || p(z | x)) >= 0`` is the guide's gap; the exact ``log p(x)`` comes
from the Kalman filter. Gaps are reported in nats per time step, on held-out sequences, with
standard errors over sequences. The full-size checks (T = 100) are ``slow``; the default suite
runs smaller versions with looser, stated tolerances.
"""

import copy
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyrossm.experiments.per_step import MarkovLGSSMModel, PerStepGuide
from pyrossm.guides import FilteringLSTMGuide, StructuredGuide
from pyrossm.infer import elbo, fit, log_likelihood
from pyrossm.lgssm import LinearGaussianSSM

K_SE = 3.0  # Monte Carlo / sampling tolerance, in standard errors
TRUTH = dict(
    A=[[0.8, 0.2], [-0.2, 0.8]],
    C=[[1.0, 0.5], [0.0, 1.0]],
    Q=[[0.3, 0.1], [0.1, 0.2]],
    R=[[0.5, 0.0], [0.0, 0.5]],
)


def _truth():
    return LinearGaussianSSM.from_matrices(**TRUTH, dtype=torch.float64)


def _data(T, num_train, num_test, seed=0):
    pyro.set_rng_seed(seed)
    ssm = _truth()
    _, x_train = ssm.sample(T, num_samples=num_train)
    _, x_test = ssm.sample(T, num_samples=num_test)
    return ssm, x_train, x_test


def _gap(exact, estimate, T):
    """Mean and standard error over sequences of (exact - estimate) / T."""
    d = (exact - estimate) / T
    return d.mean().item(), (d.std() / math.sqrt(d.numel())).item()


def _structured_linear():
    return StructuredGuide(
        2, 2, hidden_dim=8, direction="backward", combiner="linear", cell="linear"
    ).double()


def _train(ssm, guide, x, epochs, lr, lr_decay, num_particles=4, batch_size=16):
    """Adam steps of ``fit`` on minibatches of ``batch_size`` sequences, ``num_particles`` draws."""
    return fit(
        ssm,
        guide,
        x,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_decay=lr_decay,
        num_particles=num_particles,
        device="cpu",
        seed=0,
        progress=False,
    )


# ---------------------------------------------------------------- the per-step reference
def test_per_step_formulation_has_the_same_elbo():
    """Same guide parameters, same trajectory: one-site and per-step (pyro.markov) ELBOs agree."""
    ssm = _truth()
    _, x = ssm.sample(9, num_samples=4)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = False
    guide = StructuredGuide(2, 2, hidden_dim=5, direction="bidirectional", cell="gru").double()
    guide_trace = poutine.trace(guide).get_trace(x, mask)
    model_trace = poutine.trace(poutine.replay(ssm.model, trace=guide_trace)).get_trace(x, mask)
    z = guide_trace.nodes["z"]["value"]
    values = {f"z_{t + 1}": z[:, t] for t in range(9)}
    step_guide = poutine.trace(poutine.condition(PerStepGuide(guide), data=values)).get_trace(
        x, mask
    )
    step_model = poutine.trace(poutine.condition(MarkovLGSSMModel(ssm), data=values)).get_trace(
        x, mask
    )
    for tr in (guide_trace, model_trace, step_guide, step_model):
        tr.compute_log_prob()

    def per_seq(tr, names):
        return sum(tr.nodes[n]["log_prob"] for n in names)

    steps = [f"z_{t + 1}" for t in range(9)]
    elbo_vec = per_seq(model_trace, ["z", "x"]) - per_seq(guide_trace, ["z"])
    elbo_step = per_seq(step_model, steps + [f"x_{t + 1}" for t in range(9)]) - per_seq(
        step_guide, steps
    )
    torch.testing.assert_close(elbo_vec, elbo_step, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_per_step_formulation_same_elbo_in_expectation():
    """Independent draws: the two Trace_ELBO estimates agree within K_SE standard errors."""
    ssm = _truth()
    _, x = ssm.sample(6, num_samples=2)
    guide = StructuredGuide(2, 2, hidden_dim=4, combiner="linear").double()
    loss = pyro.infer.Trace_ELBO()
    n = 100
    a = torch.tensor([loss.loss(ssm.model, guide, x) for _ in range(n)])
    b = torch.tensor([loss.loss(MarkovLGSSMModel(ssm), PerStepGuide(guide), x) for _ in range(n)])
    se = math.sqrt(a.var() / n + b.var() / n)
    assert abs(a.mean() - b.mean()) < K_SE * se


# ---------------------------------------------------------------- parameters fixed at the truth
def _fixed_truth_check(T, num_train, num_test, epochs, tol_elbo, tol_iwae, num_iwae, particles=4):
    ssm, x_train, x_test = _data(T, num_train, num_test)
    guide = _structured_linear()
    _train(ssm, guide, x_train, epochs=epochs, lr=0.02, lr_decay=0.999, num_particles=particles)
    exact = ssm.log_prob(x_test)
    gap, se = _gap(exact, elbo(ssm, guide, x_test, num_samples=100), T)
    iwae_gap, iwae_se = _gap(exact, log_likelihood(ssm, guide, x_test, num_samples=num_iwae), T)
    print(
        f"\n[T={T}] backward linear structured guide: ELBO gap {gap:.4f} +- {se:.4f} "
        f"nats/step; IWAE K={num_iwae} gap {iwae_gap:.4f} +- {iwae_se:.4f} nats/step"
    )
    assert gap > -K_SE * se  # an ELBO cannot exceed log p(x)
    assert gap < tol_elbo
    assert abs(iwae_gap) < tol_iwae
    return ssm, x_train, x_test, gap


def test_structured_guide_elbo_close_to_kalman_small():
    _fixed_truth_check(
        T=40, num_train=32, num_test=16, epochs=40, tol_elbo=0.04, tol_iwae=0.02, num_iwae=200
    )


@pytest.mark.slow
def test_structured_guide_elbo_close_to_kalman_full():
    """Acceptance: T = 100, ELBO within 0.02 nats/step, IWAE K=1000 within 0.01 nats/step."""
    _fixed_truth_check(
        T=100, num_train=64, num_test=32, epochs=120, tol_elbo=0.02, tol_iwae=0.01, num_iwae=1000
    )


def _filtering_check(T, num_train, num_test, epochs, hidden_dim, particles=4):
    ssm, x_train, x_test = _data(T, num_train, num_test)
    guide = FilteringLSTMGuide(2, 2, hidden_dim=hidden_dim).double()
    _train(ssm, guide, x_train, epochs=epochs, lr=0.01, lr_decay=0.999, num_particles=particles)
    exact = ssm.log_prob(x_test)
    gap, se = _gap(exact, elbo(ssm, guide, x_test, num_samples=100), T)
    means = guide.posterior_stats(x_test).means
    filtered = ssm.filter(x_test).filtered_means
    smoothed = ssm.smooth(x_test).smoothed_means
    rmse_filtered = (means - filtered).pow(2).mean().sqrt().item()
    rmse_smoothed = (means - smoothed).pow(2).mean().sqrt().item()
    spread = filtered.std().item()
    print(
        f"\n[T={T}] filtering LSTM guide: ELBO gap {gap:.4f} +- {se:.4f} nats/step; "
        f"RMSE of q means vs Kalman filtered means {rmse_filtered:.3f}, vs smoothed "
        f"{rmse_smoothed:.3f} (filtered means' std {spread:.3f})"
    )
    return gap, se, rmse_filtered, rmse_smoothed, spread


def _assert_filtering(gap, se, rmse_filtered, rmse_smoothed, spread, max_gap, max_rmse):
    assert gap > K_SE * se  # strictly worse than exact: it cannot represent the smoother
    assert gap < max_gap
    assert rmse_filtered < max_rmse * spread
    assert rmse_filtered < rmse_smoothed  # it tracks the filter, not the smoother


def test_filtering_guide_gap_and_means_small():
    _assert_filtering(
        *_filtering_check(T=40, num_train=32, num_test=16, epochs=30, hidden_dim=16),
        max_gap=1.0,
        max_rmse=0.5,
    )


@pytest.mark.slow
def test_filtering_guide_gap_and_means_full():
    _assert_filtering(
        *_filtering_check(T=100, num_train=64, num_test=32, epochs=80, hidden_dim=32),
        max_gap=0.6,
        max_rmse=0.35,
    )


# ---------------------------------------------------------------- parameters learned by SVI
def _learned_check(T, num_train, num_test, epochs, tol, particles=4):
    _, x_train, x_test = _data(T, num_train, num_test, seed=1)
    pyro.set_rng_seed(0)
    svi_ssm = LinearGaussianSSM(2, 2, dtype=torch.float64)
    mle_ssm = copy.deepcopy(svi_ssm)
    mle_ssm.fit(x_train)
    guide = _structured_linear()
    _train(svi_ssm, guide, x_train, epochs=epochs, lr=0.02, lr_decay=0.999, num_particles=particles)
    with torch.no_grad():
        ll_svi = svi_ssm.log_prob(x_test).sum().item() / x_test.shape[:2].numel()
        ll_mle = mle_ssm.log_prob(x_test).sum().item() / x_test.shape[:2].numel()
    print(
        f"\n[T={T}] held-out exact log-lik per step: SVI-learned {ll_svi:.4f}, MLE {ll_mle:.4f},"
        f" difference {ll_mle - ll_svi:.4f} nats/step"
    )
    assert abs(ll_mle - ll_svi) < tol


def test_svi_learned_lgssm_close_to_mle_small():
    _learned_check(T=30, num_train=32, num_test=16, epochs=60, tol=0.05, particles=2)


@pytest.mark.slow
def test_svi_learned_lgssm_close_to_mle_full():
    _learned_check(T=100, num_train=64, num_test=32, epochs=200, tol=0.02)
