"""The smoother's backward pass when the covariances are shared by all sequences (no missing
data): an associative scan for the covariances and block recurrences for the means
(``pyrossm.lgssm._smoother``), against the step-by-step loop (float64, values and gradients).
Sequences are (batch, time, dim), time at dim -2."""

import pytest
import torch
from lgssm_oracles import assert_rel_close, random_system

from pyrossm.lgssm import _smoother, kalman_filter, kalman_smoother

ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")


@pytest.mark.parametrize("T", [2, 9, 40, 333])
@pytest.mark.parametrize("time_varying", [False, True])
def test_shared_backward_pass_equals_the_loop(T, time_varying, monkeypatch):
    monkeypatch.setattr(_smoother, "_CHUNKED_MIN_STEPS", 10**9)  # the reference is the loop
    s = random_system(3, 2, T, seed=T, batch=(5,), time_varying=time_varying)
    A = s["A"].clone().requires_grad_()
    f = kalman_filter(s["x"], A, *[s[k] for k in ARGS[2:]])
    fm, fc, pm, pc = f.filtered_means, f.filtered_covs, f.predicted_means, f.predicted_covs
    fc, pc = fc[0], pc[0]  # shared: (T, n, n), as the smoother sees them
    A_all = A.reshape(-1, 3, 3).expand(T, 3, 3) if not time_varying else A.reshape(T, 3, 3)
    G = _smoother.gains(fc, pc, A_all)
    assert G.dim() == 3
    sc, sm = _smoother.backward_pass(G, fm, fc, pm, pc)
    # the loop: the same inputs with a batch dim of 1 on the covariances
    sc_ref, sm_ref = _smoother.backward_pass(G[None], fm, fc[None], pm, pc[None])
    assert_rel_close(sc, sc_ref[0], 1e-10, "smoothed covariances")
    assert_rel_close(sm, sm_ref, 1e-10, "smoothed means")
    w = torch.randn(sm.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g1, = torch.autograd.grad((sm * w).sum() + sc.sum(), A, retain_graph=True)
    g2, = torch.autograd.grad((sm_ref * w).sum() + sc_ref.sum(), A)
    assert_rel_close(g1, g2, 1e-8, "gradient w.r.t. A")


def test_smoother_without_missing_data_takes_the_shared_path(monkeypatch):
    calls = []
    original = _smoother._scanned_covs
    monkeypatch.setattr(_smoother, "_scanned_covs",
                        lambda *a: calls.append(1) or original(*a))
    s = random_system(2, 2, 50, seed=3, batch=(4,))
    res = kalman_smoother(*[s[k] for k in ARGS])
    assert calls and res.smoothed_means.shape == (4, 50, 2)
    s = random_system(2, 2, 50, seed=3, batch=(4,), missing="entries")
    calls.clear()
    kalman_smoother(*[s[k] for k in ARGS])
    assert not calls  # per-sequence covariances: the loop


def _path_equals_the_loop(s, monkeypatch, path, switches, rtol, grad_rtol):
    """Smooth ``s`` (values and the gradient w.r.t. A) once through ``_smoother.<path>`` (it
    must be taken) and once with the module constants ``switches`` raised (the step-by-step
    loop); both must agree to ``rtol`` (the gradients to ``grad_rtol``)."""
    def run():
        A = s["A"].clone().requires_grad_()
        r = kalman_smoother(s["x"], A, *[s[k] for k in ARGS[2:]])
        (r.smoothed_means.sum() + r.smoothed_covs.pow(2).sum()).backward()
        return r, A.grad

    calls = []
    original = getattr(_smoother, path)
    monkeypatch.setattr(_smoother, path, lambda *a: calls.append(1) or original(*a))
    fast, g_fast = run()
    assert calls
    for name in switches:
        monkeypatch.setattr(_smoother, name, 10**9)
    ref, g_ref = run()
    assert len(calls) == 1
    for key in ("smoothed_means", "smoothed_covs", "smoothed_cross_covs"):
        assert_rel_close(getattr(fast, key), getattr(ref, key), rtol, key)
    assert_rel_close(g_fast, g_ref, grad_rtol, "gradient w.r.t. A")


@pytest.mark.parametrize("batch", [(20,), (4, 5)])
def test_batch_last_loop_equals_the_batched_loop(batch, monkeypatch):
    """Per-sequence covariances (NaN entries) of 20 sequences: the batch-last loop gives the
    batched loop's smoothed moments and gradients (float64)."""
    s = random_system(3, 2, 30, seed=7, batch=batch, missing="entries")
    _path_equals_the_loop(s, monkeypatch, "_batch_last_loop", ["_BATCH_LAST_MIN"], 1e-12, 1e-10)


def test_batch_last_loop_without_autograd_reuses_buffers(monkeypatch):
    """Without autograd the batch-last loop keeps its arrays in buffers reused between calls:
    its results equal the batched loop's, and a second call with other data leaves the first
    call's results unchanged (float64, 20 sequences with NaN entries)."""
    s = random_system(3, 2, 30, seed=8, batch=(20,), missing="entries")
    args = [s[k] for k in ("x", "A", "C", "Q", "R", "init_mean", "init_cov")]
    calls = []
    original = _smoother._batch_last_loop
    monkeypatch.setattr(_smoother, "_batch_last_loop", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        first = kalman_smoother(*args)
        kept = [v.clone() for v in first]
        other = [torch.randn_like(args[0]) * 2] + args[1:]  # other data and R: other means
        other[0][torch.isnan(args[0])] = float("nan")         # and covariances
        other[4] = 2 * args[4]
        kalman_smoother(*other)
        assert len(calls) == 2
        for a, b in zip(first, kept):
            assert torch.equal(a, b)
        monkeypatch.setattr(_smoother, "_BATCH_LAST_MIN", 10**9)
        ref = kalman_smoother(*args)
    for key in ("smoothed_means", "smoothed_covs"):
        assert_rel_close(getattr(first, key), getattr(ref, key), 1e-12, key)


@pytest.mark.parametrize("batch,T", [((1,), 100), ((3,), 97), ((2, 2), 64)])
def test_chunked_pass_equals_the_loop(batch, T, monkeypatch):
    """Few sequences with NaN entries, long enough to be cut into chunks of time (97 and 64
    steps leave a partial last chunk: identity steps pad it): the chunked backward pass gives
    the step-by-step loop's smoothed moments and gradients (float64)."""
    s = random_system(3, 2, T, seed=T, batch=batch, missing="entries")
    _path_equals_the_loop(s, monkeypatch, "_chunked_pass",
                          ["_CHUNKED_MIN_STEPS", "_BATCH_LAST_MIN"], 1e-10, 1e-9)
