"""The chunk-parallel Kalman filter with missing entries (``pyrossm.lgssm._chunked``).

It must equal the sequential filter to rounding: against the dense joint Gaussian (float64,
short T with tiny chunks forced), against the sequential kernel (all five outputs and the
gradients, batch shapes, offsets, masks), and in float32 no worse than the sequential kernel
against a float64 reference. Where the Riccati map does not forget its start (a unit root with
Q = 0) the kernel must decline, and ``kalman_filter`` still be exact.

Shapes follow pyrossm: x is (batch..., T, obs_dim), time at dim -2.
"""

import numpy as np
import pytest
import torch
from lgssm_oracles import assert_rel_close, dense_oracle, random_system

from pyrossm.lgssm import _chunked, kalman_filter
from pyrossm.lgssm._steps import missing_filter
from pyrossm.lgssm.inference import _prepare

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")
OUTPUTS = ("filtered_means", "filtered_covs", "predicted_means", "predicted_covs",
           "step_log_likelihoods")


def _prep(s, mask=None, b=None, d=None):
    return _prepare(*(s[k] for k in ARGS), mask, True, b, d)


def _both(prep, **kw):
    chunked = _chunked.chunked_missing_filter(prep, **kw)
    assert chunked is not None, "the warm-up should converge on a stable system"
    return chunked, missing_filter(prep)


@pytest.mark.parametrize("chunk_length,warmup", [(6, 12), (10, 24), (40, 0)])
def test_dense_oracle_with_forced_chunks(chunk_length, warmup):
    s = random_system(3, 4, 30, seed=1, missing="entries", max_singular=0.6)
    res = _chunked.chunked_missing_filter(_prep(s), chunk_length=chunk_length,
                                          warmup=warmup or None)
    ref = dense_oracle(*(s[k] for k in ARGS))
    for name, got in zip(OUTPUTS, res):
        assert_rel_close(got, ref[name], 1e-9, name)


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_equals_sequential_kernel(batch):
    s = random_system(4, 3, 300, seed=2, batch=batch, missing="entries")
    got, ref = _both(_prep(s), chunk_length=37, warmup=48)
    for name, a, b in zip(OUTPUTS, got, ref):
        assert a.shape == b.shape, name
        assert_rel_close(a, b, 1e-10, name)


@pytest.mark.parametrize("batch,chunk_length", [(256, 60), (64, 15), (64, 60)])
def test_padded_batch_equals_sequential_kernel(batch, chunk_length):
    """Batches whose batch-last rows are a multiple of 2 KB (256 sequences in one chunk, 64
    sequences in 4 chunks, float64) run with idle padding columns (``_run``); the padding
    must not reach the results, which equal the sequential kernel's, offsets included (64
    sequences in one chunk: no padding, for comparison)."""
    s = random_system(3, 2, 60, seed=6, batch=(batch,), missing="entries")
    b = torch.randn(batch, 60, 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    got, ref = _both(_prep(s, b=b), chunk_length=chunk_length,
                     warmup=None if chunk_length == 60 else 24)
    for name, a, r in zip(OUTPUTS, got, ref):
        assert a.shape == r.shape, name
        assert_rel_close(a, r, 1e-10, name)


def test_offsets_mask_and_batched_prior():
    s = random_system(3, 2, 250, seed=3, batch=(4,), missing="entries")
    g = torch.Generator().manual_seed(0)
    b = torch.randn(4, 250, 3, generator=g, dtype=torch.float64)
    d = torch.randn(250, 2, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 250, generator=g) > 0.2
    s["init_mean"] = torch.randn(4, 3, generator=g, dtype=torch.float64)
    got, ref = _both(_prep(s, mask, b, d), chunk_length=50, warmup=40)
    for name, a, r in zip(OUTPUTS, got, ref):
        assert_rel_close(a, r, 1e-10, name)


def test_gradients_equal_sequential():
    s = random_system(2, 2, 160, seed=4, batch=(3,), missing="entries")
    grads = []
    for kernel in ("chunked", "sequential"):
        leaves = {k: s[k].clone().requires_grad_(True) for k in ARGS[1:]}
        p = _prepare(s["x"], *(leaves[k] for k in ARGS[1:]), None, True)
        out = (_chunked.chunked_missing_filter(p, chunk_length=20, warmup=32)
               if kernel == "chunked" else missing_filter(p))
        # every output enters the loss, so every path through the kernel is checked
        loss = out[4].sum() + sum((o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)
                                                 ).reshape(o.shape)).sum() for o in out[:4])
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, a, b in zip(ARGS[1:], *grads):
        if name in ("Q", "R", "init_cov"):  # only the symmetric part is defined
            a, b = a + a.transpose(-1, -2), b + b.transpose(-1, -2)
        assert_rel_close(a, b, 1e-9, f"d/d{name}")


def _long_series(n, p, T, batch, seed):
    """A random system (from ``random_system``) with a long series simulated in torch."""
    s = random_system(n, p, 2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    LQ, LR = torch.linalg.cholesky(s["Q"]), torch.linalg.cholesky(s["R"])
    z = s["init_mean"] + torch.randn(batch, n, generator=g, dtype=torch.float64)
    xs = []
    for _ in range(T):
        z = z @ s["A"].T + torch.randn(batch, n, generator=g, dtype=torch.float64) @ LQ.T
        xs.append(z @ s["C"].T + torch.randn(batch, p, generator=g, dtype=torch.float64) @ LR.T)
    x = torch.stack(xs, -2)
    x[torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.1] = float("nan")
    return dict(s, x=x)


def test_float32_no_worse_than_sequential():
    s = _long_series(4, 4, 3000, 8, seed=5)
    ref = missing_filter(_prep(s))
    s32 = {k: v.float() for k, v in s.items()}
    got, seq = _both(_prep(s32))
    for name, a, q, r in zip(OUTPUTS, got, seq, ref):
        scale = r.abs().max()
        err_chunked = float((a.double() - r).abs().max() / scale)
        err_seq = float((q.double() - r).abs().max() / scale)
        assert err_chunked <= max(4 * err_seq, 1e-6), (name, err_chunked, err_seq)


def test_declines_when_the_riccati_map_does_not_forget():
    # A constant level (A = 1, Q = 0): the covariance shrinks like 1/t and never forgets its
    # start, so no warm-up can match; kalman_filter must fall back and stay exact.
    T = 2000
    g = torch.Generator().manual_seed(6)
    x = (3.0 + torch.randn(2, T, 1, generator=g, dtype=torch.float64))
    x[torch.rand(x.shape, generator=g) < 0.1] = float("nan")
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    args = (x, one, one, zero, one, torch.zeros(1, dtype=torch.float64), 100 * one)
    prep = _prepare(*args, None, True)
    assert _chunked.chunked_missing_filter(prep, warmup=64) is None
    res = kalman_filter(*args)
    # closed form: the posterior of a constant under a N(0, 100) prior
    obs = ~torch.isnan(x[..., 0])
    k = obs.cumsum(-1).double()
    s = torch.where(obs, x[..., 0], torch.zeros(())).cumsum(-1)
    prec = 1 / 100 + k
    np.testing.assert_allclose(res.filtered_means[..., 0], s / prec, rtol=1e-10)
    np.testing.assert_allclose(res.filtered_covs[..., 0, 0], 1 / prec, rtol=1e-10)


def test_dispatch_uses_the_kernel_where_it_pays(monkeypatch):
    s = random_system(4, 4, 2000, seed=7, batch=(4,), missing="entries")
    calls = []
    original = _chunked.chunked_missing_filter
    monkeypatch.setattr(_chunked, "chunked_missing_filter",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    res = kalman_filter(*(s[k] for k in ARGS))
    assert calls, "a long series with few sequences should be filtered in chunks"
    ref = missing_filter(_prep(s))
    assert_rel_close(res.step_log_likelihoods, ref[4], 1e-10, "step_log_likelihoods")
    # short series, or time-varying parameters: the sequential kernel
    assert not _chunked.applicable(_prep(random_system(2, 2, 50, seed=8, missing="entries")))
    tv = random_system(2, 2, 600, seed=9, time_varying=True, missing="entries")
    assert not _chunked.applicable(_prep(tv))


def test_right_padding():
    # Variable lengths (right padding = steps with nothing observed). A random walk keeps the
    # covariance of a padded stretch growing from wherever it started, so no warm-up can
    # converge there: declined up front (no failed attempts paid for). A stable transition
    # forgets even without observations: chunks are accepted and equal the sequential kernel.
    g = torch.Generator().manual_seed(10)
    B, T = 6, 900
    x = torch.randn(B, T, 2, generator=g, dtype=torch.float64).cumsum(-2)
    mask = torch.arange(T) < torch.randint(300, T + 1, (B,), generator=g)[:, None]
    eye = torch.eye(2, dtype=torch.float64)
    walk = (x, eye, eye, 0.1 * eye, eye, torch.zeros(2, dtype=torch.float64), 10 * eye)
    assert not _chunked.applicable(_prepare(*walk, mask, True))
    stable = (x, 0.7 * eye, eye, 0.1 * eye, eye) + walk[5:]
    prep = _prepare(*stable, mask, True)
    assert _chunked.applicable(prep)
    got, ref = _both(prep)
    for name, a, r in zip(OUTPUTS, got, ref):
        assert_rel_close(a, r, 1e-10, name)
    res = kalman_filter(*stable, mask=mask)
    assert_rel_close(res.log_likelihood, ref[4].sum(-1), 1e-10, "log_likelihood")


def test_singular_q_component_decaying_to_zero():
    # A state with no process noise decays to 0 geometrically: in relative terms its variance
    # keeps its start forever, but it stops mattering; the floor at the largest variance's ulp
    # lets the chunks be accepted, and the result equals the sequential kernel.
    g = torch.Generator().manual_seed(11)
    d = dict(dtype=torch.float64)
    A = torch.tensor([[0.9, 0.1], [0.0, 0.5]], **d)
    Q = torch.tensor([[1.0, 0.0], [0.0, 0.0]], **d)
    P0 = torch.tensor([[1.0, 0.0], [0.0, 1e4]], **d)
    R = torch.tensor([[1.0, 0.3], [0.3, 0.5]], **d)
    x = torch.randn(4, 1500, 2, generator=g, **d)
    x[torch.rand(x.shape, generator=g, **d) < 0.1] = float("nan")
    prep = _prepare(x, A, torch.ones(2, 2, **d), Q, R, torch.zeros(2, **d), P0, None, True)
    got, ref = _both(prep, chunk_length=100)
    for name, a, r in zip(OUTPUTS, got, ref):
        assert_rel_close(a, r, 1e-10, name)


def test_log_likelihood_only_equals_filter():
    """``kalman_log_likelihood`` with missing entries runs the chunked kernel without the
    moments (``moments=False``: no means stitched, no covariances symmetrised); its step
    log-likelihoods equal ``kalman_filter``'s, and so do their gradients."""
    from pyrossm.lgssm import kalman_log_likelihood

    s = random_system(3, 2, 1500, seed=9, batch=(6,), missing="entries")
    assert _chunked.applicable(_prep(s))
    A = s["A"].clone().requires_grad_()
    args = [A if k == "A" else s[k] for k in ARGS]
    ll = kalman_log_likelihood(*args, per_step=True)
    ref = kalman_filter(*args).step_log_likelihoods
    assert_rel_close(ll, ref, 1e-12, "step log-likelihoods")
    g1, = torch.autograd.grad(ll.sum(), A)
    g2, = torch.autograd.grad(ref.sum(), A)
    assert_rel_close(g1, g2, 1e-10, "gradient")


def test_reused_buffers_do_not_leak_into_results():
    """The chunked kernel keeps its per-step arrays in buffers reused from call to call
    (``_workspace``): a second call with other data leaves the first call's results as they
    were, with one chunk and with several, moments or not; ``release_workspace`` frees them."""
    from pyrossm.lgssm import kalman_log_likelihood, release_workspace

    for T, B in ((100, 256), (1500, 6)):  # one chunk, 15 chunks
        s = random_system(3, 2, T, seed=T, batch=(B,), missing="entries")
        assert _chunked.applicable(_prep(s))
        args = [s[k] for k in ARGS]
        with torch.no_grad():
            first = kalman_filter(*args)
            first_ll = kalman_log_likelihood(*args, per_step=True)
            kept = [v.clone() for v in first] + [first_ll.clone()]
            other = [torch.randn_like(s["x"]) * 3 if k == "x" else s[k] for k in ARGS]
            other[0][torch.isnan(s["x"])] = float("nan")
            other[ARGS.index("R")] = 2 * s["R"]  # other covariances too
            kalman_filter(*other)
            kalman_log_likelihood(*other, per_step=True)
        for a, b in zip(list(first) + [first_ll], kept):
            assert torch.equal(a, b)
    assert release_workspace() > 0
    assert release_workspace() == 0


def test_one_chunk_gradient_equals_sequential_kernel():
    """With autograd and a single chunk (256 sequences of 100 steps) the chunked kernel's
    log-likelihood and its gradient equal the sequential missing-data kernel's (float64)."""
    s = random_system(3, 2, 100, seed=12, batch=(256,), missing="entries")
    prep = _prep(s)
    assert _chunked.applicable(prep) and _chunked.plan(100, 256, 3) == 1
    A = s["A"].clone().requires_grad_()
    args = [A if k == "A" else s[k] for k in ARGS]
    ll = kalman_filter(*args).log_likelihood.sum()
    g1, = torch.autograd.grad(ll, A)
    ref = missing_filter(_prepare(*args, None, True, masked=False))[-1].sum()
    g2, = torch.autograd.grad(ref, A)
    assert_rel_close(ll, ref, 1e-12, "log-likelihood")
    assert_rel_close(g1, g2, 1e-10, "gradient")


def test_reused_buffers_are_per_thread():
    """Two threads running the chunked kernel at once on different data each get their own
    reused buffers: their results equal the same calls made one after the other."""
    import threading

    systems = [random_system(3, 2, 100, seed=20 + i, batch=(256,), missing="entries")
               for i in range(2)]
    with torch.no_grad():
        ref = [kalman_filter(*[s[k] for k in ARGS]) for s in systems]
    got, errors = [None, None], []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[i] = kalman_filter(*[systems[i][k] for k in ARGS])
        except Exception as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(got, ref):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
