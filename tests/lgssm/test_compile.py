"""``pyrossm.lgssm.set_compile``: the missing-data Kalman filter's time steps run through
``torch.compile`` in blocks, and must give what the uncompiled steps give.

The forced chunking below makes one run mix every kind of step: the restarts (eager), blocks
of ``_BLOCK`` compiled steps, and the single steps left between them. Compiling takes 10-30 s
per shape on a CPU, so the default suite compiles two small shapes; gradients are a slow test.
Shapes follow pyrossm: x is (batch..., T, obs_dim), time at dim -2.
"""

import shutil

import pytest
import torch
from lgssm_oracles import assert_rel_close, random_system

from pyrossm.lgssm import _chunked, kalman_filter, set_compile
from pyrossm.lgssm.inference import _prepare

pytestmark = pytest.mark.usefixtures("one_thread")

# torch.compile on a CPU builds C++; without a compiler set_compile falls back (tested below).
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="no C++ compiler for torch.compile's CPU backend",
)

ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")
OUTPUTS = ("filtered_means", "filtered_covs", "predicted_means", "predicted_covs",
           "step_log_likelihoods")


@pytest.fixture
def compiled():
    previous = set_compile(True)
    _chunked._state["compiled"] = None
    yield
    set_compile(previous)
    _chunked._state["compiled"] = None


def _run(s, compile_, **kw):
    previous = set_compile(compile_)
    try:
        return _chunked.chunked_missing_filter(_prepare(*(s[k] for k in ARGS), None, True), **kw)
    finally:
        set_compile(previous)


@needs_cxx
@pytest.mark.parametrize("chunk_length,warmup", [(30, 16), (60, None)])
def test_compiled_equals_uncompiled(compiled, chunk_length, warmup):
    s = random_system(3, 4, 120, seed=11, batch=(5,), missing="entries", max_singular=0.6)
    # (30, 16): 4 chunks; local steps 1-8 and 17-40 in compiled blocks, 9-15 and 41-45 single,
    # 0 and 16 restarts. (60, None): 2 chunks with the default warm-up.
    got = _run(s, True, chunk_length=chunk_length, warmup=warmup)
    assert got is not None, "the warm-up should converge on a contracting system"
    assert _chunked._state["compile"], "the compiled kernel fell back to the uncompiled one"
    assert _chunked._state["compiled"] is not None
    ref = _run(s, False, chunk_length=chunk_length, warmup=warmup)
    for name, a, b in zip(OUTPUTS, got, ref):
        assert a.shape == b.shape, name
        assert_rel_close(a, b, 1e-12, name)


def test_compile_failure_falls_back_with_a_warning(compiled, monkeypatch):
    def broken_compile(fn):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(_chunked.torch, "compile", broken_compile)
    s = random_system(2, 3, 80, seed=12, batch=(2,), missing="entries", max_singular=0.6)
    prep = _prepare(*(s[k] for k in ARGS), None, True)
    with pytest.warns(UserWarning, match="set_compile.*no C\\+\\+ compiler"):
        got = _chunked.chunked_missing_filter(prep, chunk_length=40, warmup=16)
    assert not _chunked._state["compile"], "compiling stays off after a failure"
    ref = _run(s, False, chunk_length=40, warmup=16)
    for name, a, b in zip(OUTPUTS, got, ref):
        assert torch.equal(a, b), name


def test_set_compile_returns_the_previous_setting():
    previous = set_compile(True)
    try:
        assert set_compile(False) is True
        assert set_compile(False) is False
    finally:
        set_compile(previous)


@needs_cxx
@pytest.mark.slow
def test_compiled_gradients_equal_uncompiled(compiled):
    s = random_system(2, 2, 96, seed=13, batch=(3,), missing="entries")
    grads = []
    for compile_ in (True, False):
        set_compile(compile_)
        leaves = {k: s[k].clone().requires_grad_(True) for k in ARGS[1:]}
        res = kalman_filter(s["x"], *(leaves[k] for k in ARGS[1:]))
        loss = res.log_likelihood.sum() + res.filtered_means.pow(2).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    # With compiling on, the planner picks the chunked kernel here, and without it the
    # sequential one. For the symmetric Q, R and init_cov only the symmetric part of a gradient
    # is defined: the kernels read those matrices differently (all entries, or one triangle),
    # so the antisymmetric parts differ, and a model's Q = B Bᵀ sees only the symmetric part.
    for name, a, b in zip(ARGS[1:], *grads):
        if name in ("Q", "R", "init_cov"):
            a, b = (0.5 * (g + g.transpose(-1, -2)) for g in (a, b))
        assert_rel_close(a, b, 1e-10, name)
