"""The steady-state means of the sequential filter (``pyrossm.lgssm._steps``), against plain loops.

Past the Riccati fixed point the filtered means solve m_t = F m_{t-1} + u_t with a constant F
(before it, with F_t varying); ``pyrossm.lgssm._recurrence`` solves both in blocks of steps,
recursively on the block starts, reading and writing strided views of time. Checked here
against a step-by-step loop in float64, and the whole filter (values and gradients, with
offsets) against the same filter without the steady-state stop. Sequences are
(batch, time, dim), time at dim -2.
"""

import pytest
import torch
from lgssm_oracles import assert_rel_close, random_system

from pyrossm.lgssm import _recurrence, _steps, kalman_filter, kalman_log_likelihood

ARGS = ("x", "A", "C", "Q", "R", "init_mean", "init_cov")


def _loop(inputs, map_in, FT, m):
    out = []
    for t in range(inputs.shape[1]):
        m = m @ FT + inputs[:, t] @ map_in
        out.append(m)
    return torch.stack(out, 1) if out else inputs.new_zeros(inputs.shape[0], 0, FT.shape[-1])


@pytest.mark.parametrize("steps", [0, 1, 16, 24, 25, 31, 200, 1001])
@pytest.mark.parametrize("strided", [False, True])
def test_affine_recurrence_equals_a_loop(steps, strided):
    """Every step count (padding of the last block, one level, several levels; 1001 steps
    take three), with an input map of another width than the state or none, from a
    contiguous array or a strided view over time (which is left as it was)."""
    g = torch.Generator().manual_seed(steps)
    N, n, k, skip = 3, 3, 5, 7
    d = dict(dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, **d))
    FT = 0.95 * U  # spectral radius 0.95: errors of a wrong block operator would not fade
    map_in = torch.randn(k, n, generator=g, **d)
    m = torch.randn(N, n, generator=g, **d)
    full = torch.randn(N, skip + steps, k, generator=g, **d)
    inputs = full[:, skip:] if strided else full[:, skip:].contiguous()
    before = full.clone()
    got = _recurrence.affine_recurrence(inputs, map_in, FT, m)
    assert got.shape == (N, steps, n)
    torch.testing.assert_close(got, _loop(inputs, map_in, FT, m), rtol=1e-12, atol=1e-12)
    assert torch.equal(full, before)
    u = inputs[..., :n]
    got = _recurrence.affine_recurrence(u, None, FT, m)
    ref = _loop(u, torch.eye(n, **d), FT, m)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("T", [296, 300, 307])
def test_steady_means_and_gradients_equal_full_recursion(offsets, T, monkeypatch):
    """The steady-state path (fixed point after a few dozen steps) gives the full
    recursion's log-likelihoods, moments and gradients w.r.t. x, A, C, R and the offsets, in
    float64, with transition and observation offsets or without. T = 296 and 300 take blocks
    of 8 and 10 steps that tile the series (one product over all sequences); 307 (prime)
    takes blocks of 8 as strided views and a last block of 3 steps."""
    assert _recurrence.block_length(296) == 8 and _recurrence.block_length(300) == 10
    assert 307 % _recurrence.block_length(307)
    s = random_system(3, 2, T, seed=5, batch=(4,))
    g = torch.Generator().manual_seed(1)
    b = torch.randn(4, T, 3, generator=g, dtype=torch.float64) if offsets else None
    dd = torch.randn(T, 2, generator=g, dtype=torch.float64) if offsets else None

    def run():
        leaves = {k: s[k].clone().requires_grad_() for k in ("x", "A", "C", "R")}
        extra = {}
        if offsets:
            extra = dict(transition_offset=b.clone().requires_grad_(),
                         observation_offset=dd.clone().requires_grad_())
        args = [leaves.get(k, s[k]) for k in ARGS]
        res = kalman_filter(*args, **extra)
        loss = res.log_likelihood.sum() + res.filtered_means.pow(2).sum()
        loss = loss + res.predicted_means.sum()
        loss.backward()
        grads = [leaves[k].grad for k in leaves] + [v.grad for v in extra.values()]
        return res, grads

    calls = []
    original = _steps.riccati_sequential
    monkeypatch.setattr(
        _steps, "riccati_sequential", lambda *a, **k: calls.append(original(*a, **k)) or calls[-1]
    )
    fast, g_fast = run()
    assert calls[-1][-1] is not None  # the shortcut was taken
    assert calls[-1][-1] < T - 3 * _recurrence.block_length(T)  # and the blocks were used
    ll_only = kalman_log_likelihood(*[s[k] for k in ARGS], per_step=True,
                                    **({} if b is None else dict(transition_offset=b,
                                                                 observation_offset=dd)))
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    full, g_full = run()
    for key in fast._fields:
        assert_rel_close(getattr(fast, key), getattr(full, key), 1e-11, key)
    assert_rel_close(ll_only, full.step_log_likelihoods, 1e-11, "kalman_log_likelihood")
    for a, c in zip(g_fast, g_full):
        assert_rel_close(a, c, 1e-9, "gradient")


def test_steady_path_under_no_grad_equals_with_grad():
    """Without autograd the products write into the outputs directly (``out=``); with it they
    go through copies. Both give the same numbers."""
    s = random_system(2, 2, 500, seed=9, batch=(3,))
    args = [s[k].to(torch.float32) for k in ARGS]
    with torch.no_grad():
        a = kalman_filter(*args)
    A = args[1].clone().requires_grad_()
    b = kalman_filter(args[0], A, *args[2:])
    for key in a._fields:
        torch.testing.assert_close(getattr(a, key), getattr(b, key).detach())


@pytest.mark.parametrize("steps", [0, 5, 24, 31, 200, 1001])
def test_varying_affine_recurrence_equals_a_loop(steps):
    """Time-varying F_t (each block its own operators; 1001 steps take three levels), inputs
    given as a strided time-major view, gradients too."""
    g = torch.Generator().manual_seed(steps + 1)
    N, n = 3, 3
    d = dict(dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(steps, n, n, generator=g, **d))[0] if steps else \
        torch.zeros(0, n, n, **d)
    FT = (0.97 * U).requires_grad_()
    m = torch.randn(N, n, generator=g, **d)
    u = torch.randn(steps, N, n, generator=g, **d).transpose(0, 1)  # (N, S, n), strided
    got = _recurrence.varying_affine_recurrence(u, FT, m)
    ref, cur = [], m
    for t in range(steps):
        cur = cur @ FT[t] + u[:, t]
        ref.append(cur)
    ref = torch.stack(ref, 1) if ref else u.new_zeros(N, 0, n)
    assert got.shape == (N, steps, n)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    if steps:
        w = torch.randn(N, steps, n, generator=g, **d)
        g1, = torch.autograd.grad((got * w).sum(), FT)
        g2, = torch.autograd.grad((ref * w).sum(), FT)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [0, 5, 24, 31, 200, 1001])
@pytest.mark.parametrize("strided", [False, True])
def test_column_recurrence_equals_a_loop(steps, strided):
    """The column-form recurrence m_t = F_t m_{t-1} + u_t (inputs ``(S, n, N)``, contiguous or
    a strided view; 1001 steps take three levels and a tail at each) equals a loop, with
    gradients w.r.t. F, the inputs and the start; the inputs are left as they were."""
    g = torch.Generator().manual_seed(steps + 2)
    N, n = 5, 3
    d = dict(dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(steps, n, n, generator=g, **d))[0] if steps else \
        torch.zeros(0, n, n, **d)
    F = (0.97 * U).requires_grad_()
    m = torch.randn(n, N, generator=g, **d).requires_grad_()
    full = torch.randn(steps, n, N + 2, generator=g, **d)
    u = (full[..., 2:] if strided else full[..., 2:].contiguous()).requires_grad_()
    before = full.clone()
    got = _recurrence.column_recurrence(u, F, m)
    ref, cur = [], m
    for t in range(steps):
        cur = F[t] @ cur + u[t]
        ref.append(cur)
    ref = torch.stack(ref) if ref else u.new_zeros(0, n, N)
    assert got.shape == (steps, n, N)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    assert torch.equal(full, before)
    if steps:
        w = torch.randn(steps, n, N, generator=g, **d)
        for a, b in zip(torch.autograd.grad((got * w).sum(), (F, u, m)),
                        torch.autograd.grad((ref * w).sum(), (F, u, m))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [296, 307])
def test_log_likelihood_only_values_and_gradients(T):
    """``kalman_log_likelihood`` (no means written past the fixed point: block ends and
    innovations only) equals ``kalman_filter``'s log-likelihood, with gradients w.r.t. x, A,
    C, Q and R, in float64; and without autograd (products written in place) too."""
    s = random_system(3, 2, T, seed=11, batch=(2, 3))

    def grads(fn):
        leaves = {k: s[k].clone().requires_grad_() for k in ("x", "A", "C", "Q", "R")}
        ll = fn(*[leaves.get(k, s[k]) for k in ARGS])
        return ll, torch.autograd.grad(ll.sum(), list(leaves.values()))

    ll, g_ll = grads(kalman_log_likelihood)
    ref, g_ref = grads(lambda *a: kalman_filter(*a).log_likelihood)
    assert ll.shape == (2, 3)
    assert_rel_close(ll, ref, 1e-12, "log-likelihood")
    for a, c in zip(g_ll, g_ref):
        assert_rel_close(a, c, 1e-10, "gradient")
    with torch.no_grad():
        assert_rel_close(kalman_log_likelihood(*[s[k] for k in ARGS]), ref, 1e-12, "no_grad")
    with pytest.raises(TypeError, match="per_step"):
        kalman_log_likelihood(*[s[k] for k in ARGS], per_step=1)


@pytest.mark.parametrize("n,p", [(1, 1), (1, 2), (2, 1), (3, 2)])
@pytest.mark.parametrize("T", [64, 133])
@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_steady_path_every_dimension_and_batch(n, p, T, batch, monkeypatch):
    """The block path for state and observation dims of 1 (transposed 1-wide matrices once
    broke ``torch.kron``), no batch or two batch dims, T = 64 (blocks of 8 tiling it) and 133
    (strided blocks and a tail), transition offsets with their own batch: every output of
    ``kalman_filter`` and ``kalman_log_likelihood`` equals the full recursion in float64."""
    s = random_system(n, p, T, seed=T + 10 * n + p, batch=batch)
    g = torch.Generator().manual_seed(T)
    offset = torch.randn(*(batch[-1:] + (T, n)), generator=g, dtype=torch.float64)
    args = [s[k] for k in ARGS]
    fast = kalman_filter(*args, transition_offset=offset)
    ll = kalman_log_likelihood(*args, transition_offset=offset)
    monkeypatch.setattr(_steps, "STEADY_STATE", False)
    full = kalman_filter(*args, transition_offset=offset)
    for key in fast._fields:
        assert_rel_close(getattr(fast, key), getattr(full, key), 1e-9, key)
    assert_rel_close(ll, full.log_likelihood, 1e-11, "kalman_log_likelihood")


@pytest.mark.parametrize("n,p,k", [(1, 2, 2), (3, 2, 2), (2, 1, 3)])
def test_filter_block_operators_equal_a_loop(n, p, k):
    """The block operators give the filtered means, predicted means and whitened innovations
    of a block of steps, and their leading rows those of a shorter block; the matrices are
    passed as transposed views (a (1, k) matrix transposed once broke ``torch.kron``)."""
    g = torch.Generator().manual_seed(10 * n + p)
    d = dict(dtype=torch.float64)
    mat = lambda r, c: torch.randn(c, r, generator=g, **d).mT  # noqa: E731 (a transposed view)
    FT, AT, map_in, direct_pred, direct_w, CWT = (mat(n, n), mat(n, n), mat(k, n), mat(k, n),
                                                  mat(k, p), mat(n, p))
    blk, N = 5, 3
    ops = _recurrence.filter_block_operators(FT, AT, map_in, direct_pred, direct_w, CWT, blk)
    z = torch.randn(N, blk, k, generator=g, **d)
    m = torch.randn(N, n, generator=g, **d)
    fm, pm, w = [], [], []
    cur = m
    for t in range(blk):
        pred = cur @ AT + z[:, t] @ direct_pred
        w.append(z[:, t] @ direct_w - pred @ CWT)
        cur = cur @ FT + z[:, t] @ map_in
        fm.append(cur)
        pm.append(pred)
    for (W, V), ref in zip(ops, (fm, pm, w)):
        ref = torch.stack(ref, 1).reshape(N, -1)
        torch.testing.assert_close(z.reshape(N, -1) @ W + m @ V, ref, rtol=1e-12, atol=1e-12)
        r, width = 2, ref.shape[1] // blk  # the leading blocks: a block of r steps
        short = z[:, :r].reshape(N, -1) @ W[: r * k, : r * width] + m @ V[:, : r * width]
        torch.testing.assert_close(short, ref[:, : r * width], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("L", [1, 2, 3, 8, 13, 64, 100])
def test_doubling_prefixes_equal_the_associative_scan(L):
    """With time-invariant parameters every filtering element after the first is the same, and
    the covariance prefixes come from doubling (``_scan._doubling_prefixes``); they equal the
    general associative scan over the expanded elements, with parameter batch dims, in
    float64, and so do their gradients."""
    from pyrossm.lgssm import _scan
    from pyrossm.lgssm._scan import associative_scan

    s = random_system(3, 2, 5, seed=L, batch=(2,))
    A = s["A"].clone().requires_grad_()
    n = 3
    eye = torch.eye(n, dtype=torch.float64)
    Fm = (0.5 * A).expand(2, 1, n, n)  # any element with symmetric PSD C and J will do
    Cov = (s["Q"] + eye).expand(2, 1, n, n)
    J = (A.mT @ A).expand(2, 1, n, n)
    Cov1 = (2 * eye).expand(2, 1, n, n)
    got = _scan._doubling_prefixes(Cov1, (Fm, Cov, J), L)
    full = lambda M: M.expand(2, L, n, n)  # noqa: E731
    elems = (torch.cat([torch.zeros_like(Fm), full(Fm)[:, 1:]], 1),
             torch.cat([Cov1, full(Cov)[:, 1:]], 1),
             torch.cat([torch.zeros_like(J), full(J)[:, 1:]], 1))
    ref = associative_scan(_scan._cov_combine, elems, (-3, -3, -3))[1]
    assert got.shape == (2, L, n, n)
    assert_rel_close(got, ref, 1e-12, "prefixes")
    if L == 1:  # the first element alone: nothing depends on A
        return
    w = torch.randn(2, L, n, n, dtype=torch.float64)
    g1, = torch.autograd.grad((got * w).sum(), A, retain_graph=True)
    g2, = torch.autograd.grad((ref * w).sum(), A)
    assert_rel_close(g1, g2, 1e-10, "gradient")


@pytest.mark.parametrize("L", [1, 2, 3, 8, 13, 64, 100, 300])
def test_doubling_of_one_system_without_autograd_equals_the_scan(L):
    """One shared system without autograd (``_scan._doubling_single``: each level's prefixes
    and the power's squaring in one batch; from 64 prefixes by the Kronecker sandwich): the
    prefixes equal the general associative scan in float64."""
    from pyrossm.lgssm import _scan
    from pyrossm.lgssm._scan import associative_scan

    s = random_system(3, 2, 5, seed=L)
    n = 3
    eye = torch.eye(n, dtype=torch.float64)
    Fm, Cov, J = 0.9 * s["A"], s["Q"] + eye, s["A"].mT @ s["A"] + 0.1 * eye
    Cov1 = (2 * eye).unsqueeze(0)
    with torch.no_grad():
        got = _scan._doubling_prefixes(Cov1, (Fm, Cov, J), L)
    full = lambda M: M.expand(L, n, n)  # noqa: E731
    elems = (torch.cat([torch.zeros_like(Fm)[None], full(Fm)[1:]]),
             torch.cat([Cov1, full(Cov)[1:]]),
             torch.cat([torch.zeros_like(J)[None], full(J)[1:]]))
    ref = associative_scan(_scan._cov_combine, elems, (-3, -3, -3))[1]
    assert got.shape == (L, n, n)
    assert_rel_close(got, ref, 1e-12, "prefixes")


def test_unrolled_innovation_factors_equal_lapack(monkeypatch):
    """Past ``_UNROLLED_MIN_STEPS`` steps (here forced from 1) the innovation covariances are
    factorised entry by entry (``_small``): log-likelihoods, moments and gradients equal the
    LAPACK path in float64, without the steady-state stop."""
    s = random_system(3, 2, 300, seed=4, batch=(3,))
    monkeypatch.setattr(_steps, "STEADY_STATE", False)

    def run(min_steps):
        monkeypatch.setattr(_steps, "_UNROLLED_MIN_STEPS", min_steps)
        leaves = {k: s[k].clone().requires_grad_() for k in ("A", "C", "Q", "R")}
        res = kalman_filter(*[leaves.get(k, s[k]) for k in ARGS])
        loss = res.log_likelihood.sum() + res.filtered_means.pow(2).sum()
        return res, torch.autograd.grad(loss, list(leaves.values()))

    (fast, g_fast), (ref, g_ref) = run(1), run(1 << 62)
    for key in fast._fields:
        assert_rel_close(getattr(fast, key), getattr(ref, key), 1e-11, key)
    for a, c in zip(g_fast, g_ref):
        assert_rel_close(a, c, 1e-9, "gradient")


@pytest.mark.parametrize("missing", ["none", "entries"])
@pytest.mark.parametrize("per_step", [False, True])
def test_log_likelihood_without_gradients_returns_a_normal_tensor(missing, per_step):
    """Without anything to differentiate ``kalman_log_likelihood`` runs its kernels under
    ``torch.inference_mode()``; what it returns is still a normal tensor (in-place updates and
    use in a later autograd graph work) with the values of the differentiable call. Under the
    caller's own inference mode, or with the compiled kernel on, it stays out of it."""
    from pyrossm.lgssm import inference, set_compile

    s = random_system(3, 2, 150, seed=4, batch=(5,), missing=missing)
    args = [s[k] for k in ARGS]
    ll = kalman_log_likelihood(*args, per_step=per_step)
    assert not ll.is_inference() and not ll.requires_grad
    x = s["x"].clone().requires_grad_()
    ref = kalman_log_likelihood(x, *args[1:], per_step=per_step)
    assert ref.requires_grad
    assert_rel_close(ll, ref.detach(), 1e-12, "log-likelihood")
    w = torch.ones_like(ll, requires_grad=True)
    (g,) = torch.autograd.grad((w * ll).sum(), w)  # ll saved for backward
    assert torch.equal(g, ll)
    ll.add_(1.0)
    with torch.inference_mode():
        inner = kalman_log_likelihood(*args, per_step=per_step)
    assert_rel_close(inner, ref.detach(), 1e-12, "inside inference mode")
    assert inference._inference_pays(args)
    previous = set_compile(True)
    try:
        assert not inference._inference_pays(args)
    finally:
        set_compile(previous)
    assert not inference._inference_pays([x, *args[1:]])


@pytest.mark.parametrize("steady", [True, False])
@pytest.mark.parametrize("which", ["x", "init_mean"])
def test_gradient_for_the_data_alone(steady, which, monkeypatch):
    """With only the data (or the initial mean) differentiated, the parameter-only work may
    run under inference mode but what the data's backward saves may not: the gradients of
    the filter's and the smoother's outputs equal those taken with A differentiated too."""
    from pyrossm.lgssm import kalman_smoother

    monkeypatch.setattr(_steps, "STEADY_STATE", steady)
    # (64 x 520: the per-block operators of _blocks without the stop)
    s = random_system(3, 2, 520, seed=21, batch=(64,))

    def grad(with_A):
        leaves = {which: s[which].clone().requires_grad_()}
        if with_A:
            leaves["A"] = s["A"].clone().requires_grad_()
        args = [leaves.get(k, s[k]) for k in ARGS]
        f = kalman_filter(*args)
        out = f.log_likelihood.sum() + f.filtered_means.sum() + f.predicted_means.sum()
        out = out + kalman_smoother(*args).smoothed_means.sum()
        return torch.autograd.grad(out, leaves[which])[0]

    assert_rel_close(grad(False), grad(True), 1e-12, f"gradient w.r.t. {which}")


@pytest.mark.parametrize("steady", [True, False])
@pytest.mark.parametrize("batch", [(2,), (64,)])
@pytest.mark.parametrize("missing", ["none", "entries"])
def test_no_returned_tensor_is_an_inference_tensor(steady, batch, missing, monkeypatch):
    """Whatever path runs (stop or not, the step or the block path, missing entries or not),
    every tensor the filter and the smoother return is a normal tensor: part of their work
    runs under inference mode, and an inference tensor handed back could not be updated in
    place or saved for backward later."""
    from pyrossm.lgssm import kalman_smoother

    monkeypatch.setattr(_steps, "STEADY_STATE", steady)
    s = random_system(3, 2, 520 if batch == (64,) else 200, seed=8, batch=batch, missing=missing)
    args = [s[k] for k in ARGS]
    for res in (kalman_filter(*args), kalman_smoother(*args)):
        for name, v in res._asdict().items():
            assert not v.is_inference(), name
