"""EKF / UKF: exact on linear systems (vs the Kalman filter), dynamax's numbers on the pendulum.

The pendulum reference numbers were produced once with dynamax 1.0.3 (jax 0.10.2, float64;
``dynamax.nonlinear_gaussian_ssm.extended_kalman_filter/_smoother``,
``unscented_kalman_filter/_smoother``) on ``simulate_pendulum(2, 25, seed=3, dtype=float64)``,
with dynamax's 1e-9 diagonal boost in ``psd_solve`` set to 0 so that both compute the same
maths. dynamax is not a dependency of pyrossm; the values are written below.
"""

import math

import pytest
import torch

from pyrossm.datasets import simulate_pendulum
from pyrossm.filters import (
    extended_kalman_filter,
    extended_kalman_smoother,
    unscented_kalman_filter,
    unscented_kalman_smoother,
)
from pyrossm.lgssm import kalman_filter, kalman_smoother

EXACT = 1e-8  # float64 agreement with the Kalman filter / dynamax
DT = torch.float64
UKF_SETTINGS = [dict(), dict(alpha=math.sqrt(3), beta=2.0, kappa=1.0), dict(alpha=0.5, beta=2.0)]

pytestmark = pytest.mark.usefixtures("one_thread")



def _linear_system(n=3, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = 0.4 * torch.randn(n, n, generator=g, dtype=DT)
    C = torch.randn(p, n, generator=g, dtype=DT)
    B = torch.randn(n, n, generator=g, dtype=DT)
    D = torch.randn(p, p, generator=g, dtype=DT)
    Q = 0.3 * B @ B.T + 0.1 * torch.eye(n, dtype=DT)
    R = 0.3 * D @ D.T + 0.1 * torch.eye(p, dtype=DT)
    m0 = torch.randn(n, generator=g, dtype=DT)
    P0 = 2.0 * torch.eye(n, dtype=DT)
    x = torch.randn(4, 15, p, generator=g, dtype=DT)
    # Missing data: single entries, whole steps (NaN and mask) and right padding.
    x[0, 3, 1] = math.nan
    x[1, 5] = math.nan
    x[2, 0, 0] = math.nan
    mask = torch.ones(4, 15, dtype=torch.bool)
    mask[3, 10:] = False
    mask[2, 7] = False
    return x, mask, A, C, Q, R, m0, P0


def _assert_same(result, reference):
    assert type(result) is type(reference)
    for name in reference._fields:
        got, want = getattr(result, name), getattr(reference, name)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=EXACT, atol=EXACT, msg=name)


@pytest.mark.parametrize("with_missing", [False, True])
def test_ekf_is_the_kalman_filter_on_linear_systems(with_missing):
    x, mask, A, C, Q, R, m0, P0 = _linear_system()
    if not with_missing:
        x, mask = torch.nan_to_num(x), None
    ref = kalman_smoother(x, A, C, Q, R, m0, P0, mask=mask)
    res = extended_kalman_smoother(x, lambda z: A @ z, lambda z: C @ z, Q, R, m0, P0, mask=mask)
    _assert_same(res, ref)
    _assert_same(
        extended_kalman_filter(x, lambda z: A @ z, lambda z: C @ z, Q, R, m0, P0, mask=mask),
        kalman_filter(x, A, C, Q, R, m0, P0, mask=mask),
    )


@pytest.mark.parametrize("settings", UKF_SETTINGS)
def test_ukf_is_the_kalman_filter_on_linear_systems(settings):
    x, mask, A, C, Q, R, m0, P0 = _linear_system(seed=1)
    f, h = (lambda z: A @ z), (lambda z: C @ z)
    _assert_same(unscented_kalman_smoother(x, f, h, Q, R, m0, P0, mask=mask, **settings),
                 kalman_smoother(x, A, C, Q, R, m0, P0, mask=mask))
    _assert_same(unscented_kalman_filter(x, f, h, Q, R, m0, P0, mask=mask, **settings),
                 kalman_filter(x, A, C, Q, R, m0, P0, mask=mask))


def test_masked_step_equals_removed_observation():
    """A step with mask False gives the same log-likelihood as that step's x set to NaN."""
    x, _, A, C, Q, R, m0, P0 = _linear_system()
    x = torch.nan_to_num(x)
    f, h = (lambda z: torch.tanh(A @ z)), (lambda z: C @ z + 0.1 * z[:2] ** 2)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    mask[:, 4] = False
    x_nan = x.clone()
    x_nan[:, 4] = math.nan
    for fn in (extended_kalman_filter, unscented_kalman_filter):
        a = fn(x, f, h, Q, R, m0, P0, mask=mask)
        b = fn(x_nan, f, h, Q, R, m0, P0)
        torch.testing.assert_close(a.log_likelihood, b.log_likelihood, rtol=EXACT, atol=EXACT)
        assert bool((a.step_log_likelihoods[:, 4] == 0).all())


# --------------------------------------------------------------------------------------------
# pendulum vs dynamax

PEND_DT, PEND_G, PEND_DAMP, PEND_S2 = 0.1, 9.81, 0.05, 0.1 * 0.01


def _pendulum():
    def f(z):
        om = z[1] + PEND_DT * (-PEND_G * torch.sin(z[0]) - PEND_DAMP * z[1])
        return torch.stack([z[0] + PEND_DT * om, om])

    def h(z):
        return torch.stack([torch.sin(z[0]), torch.cos(z[0])])

    Q = PEND_S2 * torch.tensor([[PEND_DT**2, PEND_DT], [PEND_DT, 1.0]], dtype=DT)
    Q = Q + 1e-5 * torch.eye(2, dtype=DT)
    R = 0.05**2 * torch.eye(2, dtype=DT)
    m0 = torch.tensor([[-2.93, 0.09], [-1.34, -0.61]], dtype=DT)
    P0 = 0.1 * torch.eye(2, dtype=DT)
    _, x = simulate_pendulum(2, 25, seed=3, dtype=DT)
    return x, f, h, Q, R, m0, P0


# (log-likelihood, filtered_means[5], filtered_means[-1], smoothed_means[0], smoothed_covs[0])
DYNAMAX = {
    "ekf": [
        (69.77775986697907, [-2.5157562117570293, 1.6075585756460429],
         [2.4427113946182835, -1.3991192243580535], [-2.979512678856398, 0.22725946929420204],
         [[0.0009983215678604973, -0.0037116112018694657],
          [-0.003711611201869468, 0.01611785186809965]]),
        (72.9569721821726, [-0.2779403592366171, 3.699889403587278],
         [-1.1381653044748596, 1.0405192612560785], [-1.3514614053674956, -0.6101904579252666],
         [[0.0005939723136214265, -0.001094247367965532],
          [-0.0010942473679655344, 0.0065726976800397074]]),
    ],
    "ukf_dynamax_defaults": [
        (68.97465499692302, [-2.5153522085454805, 1.6111678280092943],
         [2.4427876412326057, -1.3982436843048485], [-2.9819657614851476, 0.23726421714152987],
         [[0.0011235546014834018, -0.004169724645104523],
          [-0.004169724645104521, 0.017796197278364165]]),
        (72.10976932465648, [-0.27858279589428186, 3.694328810313733],
         [-1.1380685724728126, 1.0391246505203233], [-1.3486944311520979, -0.6132374897571541],
         [[0.0006364704505737034, -0.001178814023363087],
          [-0.0011788140233630854, 0.006772011469349498]]),
    ],
    "ukf_cubature": [
        (69.19379566365325, [-2.515698258113809, 1.6080253891132767],
         [2.4428436821285704, -1.3981200266092817], [-2.980244160883611, 0.2307576642092917],
         [[0.001025954974222083, -0.003813080582523819],
          [-0.0038130805825238173, 0.016490920142167645]]),
        (72.15332931660991, [-0.27818120578244676, 3.6980029101008443],
         [-1.1382613895914542, 1.0392523706899683], [-1.3510457595794438, -0.6083482273654989],
         [[0.000603731774037049, -0.0011134562495240068],
          [-0.0011134562495240035, 0.006613928411265707]]),
    ],
}


@pytest.mark.parametrize("which", sorted(DYNAMAX))
def test_pendulum_matches_dynamax(which):
    x, f, h, Q, R, m0, P0 = _pendulum()
    if which == "ekf":
        res = extended_kalman_smoother(x, f, h, Q, R, m0, P0)
    elif which == "ukf_dynamax_defaults":  # dynamax's UKFHyperParams()
        res = unscented_kalman_smoother(x, f, h, Q, R, m0, P0, alpha=math.sqrt(3), beta=2,
                                        kappa=1)
    else:
        res = unscented_kalman_smoother(x, f, h, Q, R, m0, P0)
    for b, (ll, fm5, fm_last, sm0, sc0) in enumerate(DYNAMAX[which]):
        def close(got, want):
            torch.testing.assert_close(got, torch.tensor(want, dtype=DT), rtol=EXACT, atol=EXACT)

        close(res.log_likelihood[b], ll)
        close(res.filtered_means[b, 5], fm5)
        close(res.filtered_means[b, -1], fm_last)
        close(res.smoothed_means[b, 0], sm0)
        close(res.smoothed_covs[b, 0], sc0)


def test_gradients_flow_to_parameters_and_data():
    x, f, h, Q, R, m0, P0 = _pendulum()
    log_r = torch.tensor(math.log(0.05), dtype=DT, requires_grad=True)
    x = x.clone().requires_grad_(True)
    for fn in (extended_kalman_filter, unscented_kalman_filter):
        R_ = torch.exp(2 * log_r) * torch.eye(2, dtype=DT)
        ll = fn(x, f, h, Q, R_, m0, P0).log_likelihood.sum()
        g_r, g_x = torch.autograd.grad(ll, (log_r, x))
        assert torch.isfinite(g_r) and bool(torch.isfinite(g_x).all())
        # finite-difference check of d ll / d log_r
        eps = 1e-6
        lls = [fn(x.detach(), f, h, Q, math.exp(2 * (log_r.item() + s)) * torch.eye(2, dtype=DT),
                  m0, P0).log_likelihood.sum() for s in (eps, -eps)]
        torch.testing.assert_close(g_r, (lls[0] - lls[1]) / (2 * eps), rtol=1e-5, atol=1e-5)


def test_float32_and_module_parameters():
    """float32 data and an ``nn.Module`` transition (gradients reach its weights)."""
    net = torch.nn.Linear(2, 2)
    x = torch.randn(3, 10, 2)
    eye = torch.eye(2)
    res = extended_kalman_filter(x, lambda z: torch.tanh(net(z)), lambda z: z, 0.1 * eye, eye,
                                 torch.zeros(2), eye)
    assert res.filtered_means.dtype == torch.float32
    res.log_likelihood.sum().backward()
    assert net.weight.grad is not None and bool(torch.isfinite(net.weight.grad).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(5, 2)), "x: expected shape"),
        (dict(Q=torch.eye(3)), "Q: expected shape"),
        (dict(R=torch.eye(2)), "R: expected shape"),
        (dict(init_mean=torch.zeros(4, 2)), "init_mean: expected"),
        (dict(mask=torch.ones(2, 5)), "mask: expected a bool tensor"),
        (dict(f="A"), "f: expected a callable"),
        (dict(h=lambda z: z), "h: expected the function to map"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(x=torch.zeros(2, 5, 1), f=lambda z: z, h=lambda z: z[:1], Q=torch.eye(2),
                R=torch.eye(1), init_mean=torch.zeros(2), init_cov=torch.eye(2), mask=None)
    args.update(kwargs)
    for fn in (extended_kalman_filter, unscented_kalman_filter):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(**args)


def test_ukf_bad_spread():
    eye = torch.eye(2)
    with pytest.raises(ValueError, match="alpha"):
        unscented_kalman_filter(torch.zeros(1, 3, 2), lambda z: z, lambda z: z, eye, eye,
                                torch.zeros(2), eye, alpha=0.0)
