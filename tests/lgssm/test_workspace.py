"""The scratch buffers the Kalman kernels keep between calls (``pyrossm.lgssm._workspace``).

They must behave as fresh memory to every caller: whatever mode the first call ran in
(``torch.inference_mode`` makes inference tensors, which later calls outside it could not
write to), and whichever function made them. Shapes follow pyrossm: x is (batch..., T,
obs_dim), time at dim -2.
"""

import pytest
import torch
from lgssm_oracles import random_system

from pyrossm.lgssm import (
    _chunked,
    kalman_filter,
    kalman_log_likelihood,
    kalman_smoother,
    release_workspace,
)
from pyrossm.lgssm.inference import _prepare

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")


def _calls(args):
    return (kalman_filter(*args).log_likelihood, kalman_log_likelihood(*args),
            kalman_smoother(*args).smoothed_means)


def test_buffers_made_under_inference_mode_serve_later_calls():
    """First calls under ``torch.inference_mode()`` (so that every buffer is made there),
    then the same calls in normal mode and with autograd: equal results, and a gradient.
    (Session 15's buffers were inference tensors then, and the normal calls raised
    "Inplace update to inference tensor outside InferenceMode".)"""
    s = random_system(3, 2, 100, seed=5, batch=(256,), missing="entries")
    args = [s[k] for k in ARGS]
    assert _chunked.applicable(_prepare(*args, None, True))  # the kernel with buffers
    release_workspace()
    with torch.inference_mode():
        first = _calls(args)
    again = _calls(args)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    A = s["A"].clone().requires_grad_()
    ll = kalman_filter(*[A if k == "A" else s[k] for k in ARGS]).log_likelihood.sum()
    (g,) = torch.autograd.grad(ll, A)
    assert torch.isfinite(g).all()
    assert release_workspace() > 0
