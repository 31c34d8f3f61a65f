"""Annealing messenger, the trace-based objective (vs Pyro's Trace_ELBO) and free bits."""

import pyro
import pytest
import torch
from infer_toy import ToyGuide, toy_problem
from pyro.infer import SVI, Trace_ELBO

from pyrossm.infer import FreeBitsELBO, LatentScaleMessenger, fit
from pyrossm.infer.handlers import elbo_objective, elbo_traces, nonfinite_sites

TOL = 1e-10


def test_annealing_scales_latent_sites_only_in_model_and_guide():
    model, x = toy_problem(num=3, steps=4)
    guide = ToyGuide(3, 2)
    model_trace, guide_trace = elbo_traces(model, guide, x, None, num_particles=2, beta=0.3)
    assert guide_trace.nodes["z"]["scale"] == pytest.approx(0.15)
    assert model_trace.nodes["z"]["scale"] == pytest.approx(0.15)
    assert model_trace.nodes["x"]["scale"] == pytest.approx(0.5)
    assert model_trace.nodes["z"]["value"].shape[0] == 6  # particles by repetition
    with pytest.raises(ValueError, match="factor"):
        LatentScaleMessenger(-1.0)


def test_objective_equals_pyro_trace_elbo():
    model, x = toy_problem(num=5, steps=4)
    guide = ToyGuide(3, 2)
    params = list(guide.parameters()) + list(model.parameters())
    pyro.set_rng_seed(3)
    obj = elbo_objective(*elbo_traces(model, guide, x, None))
    ours = torch.autograd.grad(obj.surrogate, params)
    pyro.set_rng_seed(3)
    ref = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x)
    theirs = torch.autograd.grad(ref, params)
    assert obj.loss.item() == pytest.approx(ref.item(), rel=TOL)
    assert obj.neg_elbo.item() == pytest.approx(ref.item(), rel=TOL)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_annealed_objective_decomposition():
    model, x = toy_problem(num=5, steps=4)
    guide = ToyGuide(3, 2)
    beta = 0.25
    obj = elbo_objective(*elbo_traces(model, guide, x, None, beta=beta), beta=beta)
    # loss = -rec + beta KL, neg_elbo = -rec + KL
    assert obj.neg_elbo.item() - obj.loss.item() == pytest.approx((1 - beta) * obj.kl.item())


def _grads(model, guide, x, free_bits, seed=0):
    pyro.set_rng_seed(seed)
    obj = elbo_objective(*elbo_traces(model, guide, x, None), free_bits=free_bits)
    return obj, torch.autograd.grad(obj.surrogate, [guide.scale_unconstrained, model.W])


def test_free_bits_zero_is_the_elbo_and_large_removes_kl_gradient():
    model, x = toy_problem(num=5, steps=4)
    guide = ToyGuide(3, 2)
    plain, g_plain = _grads(model, guide, x, None)
    zero, g_zero = _grads(model, guide, x, 0.0)
    assert zero.loss.item() == pytest.approx(plain.loss.item(), rel=TOL)
    for a, b in zip(g_plain, g_zero, strict=True):
        assert torch.allclose(a, b, rtol=1e-9)
    kl_mean = plain.kl.item() / x.shape[0]
    big, g_big = _grads(model, guide, x, kl_mean + 100.0)
    # the KL term is the constant lambda * B: loss = -rec + lambda * B
    rec = plain.kl.item() - plain.neg_elbo.item()
    assert big.loss.item() == pytest.approx(-rec + (kl_mean + 100.0) * x.shape[0], rel=1e-9)
    # gradient of -rec alone (reconstruction) w.r.t. the guide scale
    pyro.set_rng_seed(0)
    mt, gt = elbo_traces(model, guide, x, None)
    rec_t = mt.nodes["x"]["log_prob_sum"]
    g_rec = torch.autograd.grad(-rec_t, [guide.scale_unconstrained])[0]
    assert torch.allclose(g_big[0], g_rec, rtol=1e-9)
    assert not torch.allclose(g_big[0], g_plain[0])


def test_free_bits_loss_callable_with_svi_and_fit():
    model, x = toy_problem(num=6, steps=4)
    guide = ToyGuide(3, 2)
    pyro.module("guide", guide)  # SVI only optimises what is in the param store
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=FreeBitsELBO(2.0))
    assert torch.isfinite(torch.as_tensor(svi.step(x)))
    hist = fit(model, guide, x, epochs=2, batch_size=3, lr=1e-2, free_bits=1e4,
               progress=False, device="cpu")
    for r in hist.records:
        assert r["train_loss"] > r["train_neg_elbo"]  # KL below lambda: loss uses lambda


def test_nonfinite_sites_names_the_site():
    model, x = toy_problem(num=3, steps=4)
    guide = ToyGuide(3, 2)
    model.poison_calls = {1}
    traces = elbo_traces(model, guide, x, None)
    assert nonfinite_sites(*traces) == ["model:x"]


class _VectorLatentModel(torch.nn.Module):
    """z_b ~ N(0, I_3), x_b ~ N(W z_b, I_2): a latent site with event_dim 1."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

    def forward(self, x, mask=None):
        with pyro.plate("sequences", x.shape[0], dim=-1):
            z = pyro.sample("z", pyro.distributions.Normal(
                x.new_zeros(x.shape[0], 3), 1.0).to_event(1))
            pyro.sample("x", pyro.distributions.Normal(z @ self.W.T, 1.0).to_event(1), obs=x)


class _VectorLatentGuide(torch.nn.Module):
    def __init__(self, loc):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.as_tensor(loc, dtype=torch.float64))

    def forward(self, x, mask=None):
        with pyro.plate("sequences", x.shape[0], dim=-1):
            loc = self.loc.expand(x.shape[0], 3)
            pyro.sample("z", pyro.distributions.Normal(loc, 1.0).to_event(1))


def _dim_objective(free_bits, free_bits_per, seed=1):
    torch.manual_seed(0)
    model, x = _VectorLatentModel(), torch.randn(4, 2, dtype=torch.float64)
    # coordinate 0 far from the prior (KL_b0 = 8 z - 32 ~ 32 +- 8 nats in every row, far above
    # lambda = 1), 1 and 2 equal to it (KL exactly 0)
    guide = _VectorLatentGuide([8.0, 0.0, 0.0])
    pyro.set_rng_seed(seed)
    traces = elbo_traces(model, guide, x, None)
    obj = elbo_objective(*traces, free_bits=free_bits, free_bits_per=free_bits_per)
    rec = traces[0].nodes["x"]["log_prob_sum"]
    g_total, = torch.autograd.grad(obj.surrogate, [guide.loc], retain_graph=True)
    g_rec, = torch.autograd.grad(-rec, [guide.loc])
    return obj, g_total, g_rec, rec, x.shape[0]


def test_free_bits_per_dimension_clamps_each_coordinate():
    plain, g_plain, _, _, _ = _dim_objective(None, "sequence")
    zero, g_zero, _, _, _ = _dim_objective(0.0, "dimension")
    assert zero.loss.item() == pytest.approx(plain.loss.item(), rel=1e-12)
    assert torch.allclose(g_zero, g_plain, rtol=1e-12)
    lam = 1.0
    obj, g, g_rec, rec, batch = _dim_objective(lam, "dimension")
    # coordinate 0 keeps its KL gradient; 1 and 2 (KL 0 < lambda) feel only the reconstruction
    assert torch.allclose(g[0], g_plain[0], rtol=1e-12)
    assert torch.allclose(g[1:], g_rec[1:], rtol=1e-12)
    assert not torch.allclose(g[0], g_rec[0])
    # value: -rec + KL_0 + 2 * lambda * B (each clamped coordinate contributes lambda per row)
    kl0 = plain.kl.item()
    assert obj.loss.item() == pytest.approx(-rec.item() + kl0 + 2 * lam * batch, rel=1e-12)
    # per sequence, the same lambda is below the total KL: no clamping, the plain objective
    seq, g_seq, _, _, _ = _dim_objective(lam, "sequence")
    assert torch.allclose(g_seq, g_plain, rtol=1e-12)


def test_free_bits_per_dimension_rejects_multi_dimensional_events_and_bad_modes():
    model, x = toy_problem(num=3, steps=4)
    guide = ToyGuide(3, 2)
    traces = elbo_traces(model, guide, x, None)
    with pytest.raises(NotImplementedError, match="'z'"):
        elbo_objective(*traces, free_bits=0.1, free_bits_per="dimension")
    with pytest.raises(ValueError, match="free_bits_per"):
        fit(model, guide, x, epochs=1, batch_size=3, lr=1e-2, free_bits=0.1,
            free_bits_per="dim", progress=False, device="cpu")
    with pytest.raises(ValueError, match="free_bits_per"):
        FreeBitsELBO(1.0, free_bits_per="row")
    with pytest.raises(ValueError, match="free_bits_per"):
        elbo_objective(*traces, free_bits=0.1, free_bits_per="dim")


def test_free_bits_per_dimension_on_trajectory_sites():
    """DMM + structured guide (one site "z" of event shape (T, D)): per-coordinate log-densities
    sum to the sites' log-densities, and a huge per-coordinate threshold makes the KL term
    D * threshold exactly."""
    from pyrossm.guides import FilteringLSTMGuide, StructuredGuide
    from pyrossm.nonlinear import DeepMarkovModel

    pyro.set_rng_seed(0)
    x = torch.randn(4, 6, 3)
    mask = torch.arange(6) < torch.tensor([6, 4, 5, 2])[:, None]
    model = DeepMarkovModel(obs_dim=3, z_dim=2, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    for guide in (StructuredGuide(3, 2, hidden_dim=8), FilteringLSTMGuide(3, 2, hidden_dim=8)):
        model_trace, guide_trace = elbo_traces(model, guide, x, mask)
        for trace in (model_trace, guide_trace):
            site = trace.nodes["z"]
            per_coord = site["fn"].coordinate_log_prob(site["value"])
            assert per_coord.shape == (4, 2)
            assert torch.allclose(per_coord.sum(-1), site["fn"].log_prob(site["value"]),
                                  atol=1e-4)
        rec = float(model_trace.nodes["x"]["log_prob_sum"].detach())
        obj = elbo_objective(model_trace, guide_trace, free_bits=1e4, free_bits_per="dimension")
        # threshold = free_bits * rows (4 sequences), for each of the 2 coordinates
        assert float(obj.loss) == pytest.approx(2 * 1e4 * 4 - rec, rel=1e-6)
    with pytest.raises(NotImplementedError, match="full covariance"):
        tril = StructuredGuide(3, 2, hidden_dim=8, combiner="linear")
        elbo_objective(*elbo_traces(model, tril, x, mask), free_bits=1.0,
                       free_bits_per="dimension")


# ---------------------------------------------------------------- particles and global latents
class _GlobalLatentModel(torch.nn.Module):
    """theta ~ N(0, 1) once (a global latent), x_b ~ N(theta, 1) for each sequence b."""

    def forward(self, x, mask=None):
        theta = pyro.sample("theta", pyro.distributions.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("sequences", x.shape[0], dim=-1):
            pyro.sample("x", pyro.distributions.Normal(theta, 1.0).expand(x.shape).to_event(1),
                        obs=x)


class _GlobalLatentGuide(torch.nn.Module):
    """q(theta) = delta(0.5): the ELBO is a deterministic closed form."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x, mask=None):
        pyro.sample("theta", pyro.distributions.Delta(self.loc))


@pytest.mark.parametrize("free_bits", [None, 0.0])
def test_particles_do_not_shrink_a_global_latent(free_bits):
    """Issue 14: with K particles only the sites in the "sequences" plate are averaged."""
    x = torch.randn(5, 2, dtype=torch.float64)
    normal = pyro.distributions.Normal(torch.tensor(0.5, dtype=torch.float64), 1.0)
    exact = -(normal.log_prob(x).sum() + pyro.distributions.Normal(0.0, 1.0).log_prob(
        torch.tensor(0.5, dtype=torch.float64)))
    for k in (1, 4):
        traces = elbo_traces(_GlobalLatentModel(), _GlobalLatentGuide(), x, None, k)
        assert traces[0].nodes["theta"]["scale"] == 1.0
        obj = elbo_objective(*traces, k, free_bits=free_bits)
        assert obj.neg_elbo.item() == pytest.approx(exact.item(), rel=TOL), k
        assert obj.loss.item() == pytest.approx(exact.item(), rel=TOL), k


# ---------------------------------------------------------------- free bits per sequence
class _DeltaGuide(torch.nn.Module):
    """z_b = W x_b (a point mass): KL_b = -log N(z_b; 0, I) is deterministic."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
                                                 dtype=torch.float64))

    def forward(self, x, mask=None):
        with pyro.plate("sequences", x.shape[0], dim=-1):
            pyro.sample("z", pyro.distributions.Delta(x @ self.W.T).to_event(1))


@pytest.mark.parametrize("free_bits_per", ["sequence", "dimension"])
def test_free_bits_are_per_sequence_whatever_the_batching(free_bits_per):
    """The free-bits loss of a batch is the sum of its sequences' losses (issue 14): it does not
    depend on batch size, bucketing or distributed slices. Rows 0-1 have a KL below lambda, rows
    2-3 far above it, so a batch-mean threshold would give different values."""
    x = torch.tensor([[0.1, 0.0], [0.0, 0.2], [3.0, 2.0], [-2.5, 3.0]], dtype=torch.float64)
    model, guide, lam = _VectorLatentModel(), _DeltaGuide(), 4.0

    def loss(rows, k=1):
        traces = elbo_traces(model, guide, x[rows], None, k)
        return elbo_objective(*traces, k, free_bits=lam, free_bits_per=free_bits_per).loss

    whole = loss([0, 1, 2, 3])
    assert whole.item() == pytest.approx((loss([0, 1]) + loss([2, 3])).item(), rel=TOL)
    assert whole.item() == pytest.approx(sum(loss([i]).item() for i in range(4)), rel=TOL)
    assert whole.item() == pytest.approx(loss([0, 1, 2, 3], k=3).item(), rel=TOL)
    # closed form: sum_b max(lambda, KL_b) - rec with KL_b = -log N(z_b; 0, I)
    z = x @ guide.W.T
    prior = pyro.distributions.Normal(torch.zeros_like(z), 1.0).log_prob(z)
    kl = -prior.sum(-1) if free_bits_per == "sequence" else -prior
    rec = pyro.distributions.Normal(z @ model.W.T, 1.0).log_prob(x).sum()
    assert whole.item() == pytest.approx((kl.clamp(min=lam).sum() - rec).item(), rel=TOL)


# ---------------------------------------------------------------- own Trace_ELBO surrogate
class _DiscreteModel(torch.nn.Module):
    """theta ~ N(0, 1) (global), k_b ~ Bernoulli(0.3), x_b ~ N(theta + 2 k_b, 1)."""

    def forward(self, x, mask=None):
        theta = pyro.sample("theta", pyro.distributions.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("sequences", x.shape[0], dim=-1):
            k = pyro.sample("k", pyro.distributions.Bernoulli(x.new_full((x.shape[0],), 0.3)))
            pyro.sample("x", pyro.distributions.Normal(theta + 2 * k, 1.0), obs=x)


class _DiscreteGuide(torch.nn.Module):
    """A non-reparameterized (Bernoulli) site in the plate and a reparameterized global one."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.4, dtype=torch.float64))
        self.loc = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))

    def forward(self, x, mask=None):
        pyro.sample("theta", pyro.distributions.Normal(self.loc, 0.5))
        with pyro.plate("sequences", x.shape[0], dim=-1):
            pyro.sample("k", pyro.distributions.Bernoulli(logits=self.w * x))


@pytest.mark.parametrize("seed", [0, 1])
def test_score_function_surrogate_equals_pyro_trace_elbo(seed):
    """The own surrogate (no Pyro private API) gives Trace_ELBO's loss and gradients."""
    x = torch.tensor([0.3, 2.5, -1.0, 1.8], dtype=torch.float64)
    model, guide = _DiscreteModel(), _DiscreteGuide()
    pyro.set_rng_seed(seed)
    obj = elbo_objective(*elbo_traces(model, guide, x, None))
    ours = torch.autograd.grad(obj.surrogate, [guide.w, guide.loc])
    pyro.set_rng_seed(seed)
    ref = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x)
    theirs = torch.autograd.grad(ref, [guide.w, guide.loc])
    assert obj.loss.item() == pytest.approx(ref.item(), rel=TOL)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
