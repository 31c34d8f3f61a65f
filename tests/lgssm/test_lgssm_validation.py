"""Bad input raises an error that names the argument and what was expected.

kalman_filter / kalman_smoother take x (batch..., T, obs_dim) with time at dim -2; here the
valid reference input is batch 2, T 7, state dim 3, obs dim 2.
"""

import re

import pytest
import torch

from pyrossm.lgssm import LinearGaussianSSM, kalman_filter, kalman_smoother

N, P, T, BATCH = 3, 2, 7, 2
NAN = float("nan")


def valid():
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    return dict(
        x=torch.randn(BATCH, T, P, generator=g, **d),
        A=0.5 * torch.eye(N, **d),
        C=torch.randn(P, N, generator=g, **d),
        Q=torch.eye(N, **d),
        R=torch.eye(P, **d),
        init_mean=torch.zeros(N, **d),
        init_cov=torch.eye(N, **d),
    )


def not_pd(d):
    M = torch.eye(d, dtype=torch.float64)
    M[0, 0] = -1.0
    return M


def not_symmetric(d):
    M = torch.eye(d, dtype=torch.float64)
    M[0, -1] = 0.5 if d > 1 else 0.0
    return M if d > 1 else -M


def with_nan(t):
    t = t.clone()
    t.view(-1)[0] = NAN
    return t


def check_message(excinfo, name, *expected):
    msg = str(excinfo.value)
    assert re.search(rf"(^|\W){re.escape(name)}(\W|$)", msg), f"{name!r} not named in: {msg}"
    for e in expected:
        assert e in msg, f"expected {e!r} in the message: {msg}"


# (argument, bad value builder, substrings the message must contain)
SHAPE_CASES = [
    ("x", lambda v: v["x"][0, :, 0], ["T", "obs_dim"]),  # rank 1
    ("A", lambda v: torch.eye(N + 1, dtype=torch.float64), [f"{N}, {N}"]),
    ("A", lambda v: torch.ones(N, N - 1, dtype=torch.float64), [f"{N}, {N}"]),
    ("C", lambda v: torch.ones(P, N + 1, dtype=torch.float64), [f"{P}, {N}"]),
    ("C", lambda v: torch.ones(P + 1, N, dtype=torch.float64), [f"{P}, {N}"]),
    ("Q", lambda v: torch.eye(N + 1, dtype=torch.float64), [f"{N}, {N}"]),
    ("R", lambda v: torch.eye(P + 1, dtype=torch.float64), [f"{P}, {P}"]),
    ("init_cov", lambda v: torch.eye(N - 1, dtype=torch.float64), [f"{N}, {N}"]),
    ("init_mean", lambda v: torch.zeros(5, N, dtype=torch.float64), []),  # batch 5 vs x's 2
    ("A", lambda v: 0.5 * torch.eye(N, dtype=torch.float64).expand(1, T + 1, N, N), [str(T)]),
    ("Q", lambda v: torch.eye(N, dtype=torch.float64).expand(1, T - 2, N, N), [str(T)]),
    ("A", lambda v: 0.5 * torch.eye(N, dtype=torch.float64).expand(1, 1, 1, T, N, N), []),
]


@pytest.mark.parametrize("fn", [kalman_filter, kalman_smoother])
@pytest.mark.parametrize("name,make,expected", SHAPE_CASES)
def test_bad_shape_raises(name, make, expected, fn):
    v = valid()
    v[name] = make(v)
    with pytest.raises(ValueError) as e:
        fn(**v)
    check_message(e, name, *expected)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("name,make", [
    ("Q", lambda: not_pd(N)),
    ("R", lambda: not_pd(P)),
    ("init_cov", lambda: not_pd(N)),
    ("Q", lambda: not_symmetric(N)),
    ("R", lambda: not_symmetric(P)),
])
def test_not_positive_definite_raises(name, make, parallel):
    v = valid()
    v[name] = make()
    with pytest.raises(ValueError) as e:
        kalman_filter(**v, parallel=parallel)
    check_message(e, name)


@pytest.mark.parametrize("name", ["A", "C", "Q", "R", "init_mean", "init_cov"])
def test_nan_in_parameters_raises(name):
    v = valid()
    v[name] = with_nan(v[name])
    with pytest.raises(ValueError) as e:
        kalman_filter(**v)
    check_message(e, name)


@pytest.mark.parametrize("name", ["A", "Q", "init_mean"])
def test_inf_in_parameters_raises_naming_it(name):
    # the parameters are checked together first; the message still names the culprit
    v = valid()
    v[name] = v[name].clone()
    v[name].view(-1)[0] = float("inf")
    with pytest.raises(ValueError) as e:
        kalman_filter(**v)
    check_message(e, name)


def test_parameter_on_another_device_raises():
    v = valid()
    v["Q"] = torch.empty(v["Q"].shape, dtype=v["Q"].dtype, device="meta")
    with pytest.raises(ValueError) as e:
        kalman_filter(**v)
    check_message(e, "Q", "device")


def test_inf_in_x_raises():
    v = valid()
    v["x"][0, 3, 1] = float("inf")
    with pytest.raises(ValueError) as e:
        kalman_filter(**v)
    check_message(e, "x")


def test_zero_length_sequence_raises():
    v = valid()
    v["x"] = v["x"][:, :0]
    with pytest.raises(ValueError) as e:
        kalman_filter(**v)
    check_message(e, "x")


@pytest.mark.parametrize("fn", [kalman_filter, kalman_smoother])
@pytest.mark.parametrize("mask_shape", [(BATCH, T + 1), (BATCH, T, P), (T - 1,), (3, T)])
def test_mask_wrong_shape_raises(mask_shape, fn):
    v = valid()
    with pytest.raises(ValueError) as e:
        fn(**v, mask=torch.ones(mask_shape, dtype=torch.bool))
    check_message(e, "mask", f"{BATCH}, {T}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.uint8])
def test_mask_wrong_dtype_raises(dtype):
    v = valid()
    # The common rules allow TypeError for a wrong dtype (the brief asked for ValueError).
    with pytest.raises((ValueError, TypeError)) as e:
        kalman_filter(**v, mask=torch.ones(BATCH, T, dtype=dtype))
    check_message(e, "mask", "bool")


def test_parameter_dtype_mismatch_raises():
    v = valid()
    v["A"] = v["A"].float()
    with pytest.raises((ValueError, TypeError)) as e:
        kalman_filter(**v)
    check_message(e, "A")


def test_non_tensor_raises():
    v = valid()
    v["C"] = v["C"].tolist()
    with pytest.raises((ValueError, TypeError)) as e:
        kalman_filter(**v)
    check_message(e, "C")


def test_validate_false_skips_checks_but_runs():
    v = valid()
    a = kalman_filter(**v, validate=False)
    b = kalman_filter(**v)
    assert torch.equal(a.log_likelihood, b.log_likelihood)


# ---------------------------------------------------------------------------------------------
# LinearGaussianSSM
@pytest.mark.parametrize("kwargs,name", [
    (dict(A=torch.eye(2), C=torch.ones(1, 3), Q=torch.eye(2), R=torch.eye(1)), "C"),
    (dict(A=torch.eye(2), C=torch.ones(1, 2), Q=torch.eye(3), R=torch.eye(1)), "Q"),
    (dict(A=torch.eye(2), C=torch.ones(1, 2), Q=-torch.eye(2), R=torch.eye(1)), "Q"),
    (dict(A=torch.eye(2), C=torch.ones(1, 2), Q=torch.eye(2), R=torch.eye(2)), "R"),
    (dict(A=torch.eye(2), C=torch.ones(1, 2), Q=torch.eye(2), R=torch.eye(1),
          init_mean=torch.zeros(3)), "init_mean"),
    (dict(A=torch.eye(2), C=torch.ones(1, 2), Q=torch.eye(2), R=torch.eye(1),
          init_cov=torch.tensor([[1.0, 2.0], [2.0, 1.0]])), "init_cov"),
    (dict(A=torch.full((2, 2), NAN), C=torch.ones(1, 2), Q=torch.eye(2), R=torch.eye(1)), "A"),
])
def test_from_matrices_bad_input_raises(kwargs, name):
    with pytest.raises(ValueError) as e:
        LinearGaussianSSM.from_matrices(**kwargs)
    check_message(e, name)


def test_model_bad_x_raises():
    ssm = LinearGaussianSSM(2, 3)
    for bad in (torch.randn(4, 10, 2), torch.randn(10)):
        with pytest.raises(ValueError) as e:
            ssm.log_prob(bad)
        check_message(e, "x", "3")
        with pytest.raises(ValueError) as e:
            ssm.model(bad)
        check_message(e, "x", "3")


def test_asymmetry_is_judged_against_each_matrix_own_scale():
    """Covariances of one shape (here Q and init_cov) are checked together, but each against
    its own scale: a 1% asymmetry in Q is an error even when init_cov is a million times
    larger."""
    v = valid()
    v["init_cov"] = v["init_cov"] * 1e6
    Q = v["Q"].clone()
    Q[0, 1] += 0.01
    v["Q"] = Q
    with pytest.raises(ValueError) as e:
        kalman_filter(**v)
    check_message(e, "Q", "symmetric")
