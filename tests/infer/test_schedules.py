"""KL annealing schedules: values at known steps and the spec parser."""

import math

import pytest

from pyrossm.infer import Constant, Cyclical, Linear, Sigmoid, make_schedule


def test_constant():
    assert [Constant(0.3)(s) for s in (0, 5, 10**6)] == [0.3, 0.3, 0.3]


def test_linear_pyro_dmm_style():
    s = Linear(num_steps=100, start=0.2)
    assert s(0) == pytest.approx(0.2)
    assert s(50) == pytest.approx(0.6)
    assert s(100) == 1.0 and s(10**6) == 1.0
    values = [s(i) for i in range(120)]
    assert all(b >= a for a, b in zip(values[:-1], values[1:], strict=True))


def test_sigmoid_bowman():
    s = Sigmoid(x0=1000, k=0.01)
    assert s(1000) == pytest.approx(0.5)
    assert s(0) == pytest.approx(1 / (1 + math.exp(10)))
    assert s(2000) == pytest.approx(1 / (1 + math.exp(-10)))
    assert Sigmoid(x0=0, k=1.0)(10**6) == 1.0  # no overflow
    assert Sigmoid(x0=10**6, k=1.0)(0) == pytest.approx(0.0)


def test_cyclical_fu():
    s = Cyclical(total_steps=400, num_cycles=4, ratio=0.5)
    # period 100: rise over the first 50 steps, then 1
    assert s(0) == 0.0 and s(25) == pytest.approx(0.5) and s(50) == 1.0 and s(99) == 1.0
    assert s(100) == 0.0 and s(125) == pytest.approx(0.5) and s(399) == 1.0
    assert s(400) == 1.0 and s(10**5) == 1.0  # fully annealed after the run


def test_make_schedule_specs():
    assert make_schedule(None)(7) == 1.0
    assert make_schedule(0.5)(7) == 0.5
    assert make_schedule("constant")(3) == 1.0
    assert make_schedule("linear:num_steps=10,start=0.5")(5) == pytest.approx(0.75)
    assert make_schedule({"name": "sigmoid", "x0": 5, "k": 1})(5) == pytest.approx(0.5)
    assert make_schedule("linear", total_steps=100)(25) == pytest.approx(0.5)  # over half the run
    assert make_schedule("cyclical", total_steps=40) == Cyclical(40)
    s = Linear(10)
    assert make_schedule(s) is s
    assert make_schedule(s.to_dict()) == s
    f = make_schedule(lambda step: 0.1 * step)
    assert f(3) == pytest.approx(0.3) and f.to_dict()["name"] == "callable"


def test_bad_specs():
    with pytest.raises(ValueError, match="schedule name"):
        make_schedule("exponential")
    with pytest.raises(ValueError, match="num_steps"):
        make_schedule("linear")  # needs num_steps or total_steps
    with pytest.raises(ValueError, match="key=value"):
        make_schedule("linear:10")
    with pytest.raises(TypeError, match="annealing"):
        make_schedule([1, 2])
    with pytest.raises(ValueError, match="ratio"):
        Cyclical(10, ratio=0.0)
    with pytest.raises(ValueError, match="step"):
        Linear(10)(-1)
