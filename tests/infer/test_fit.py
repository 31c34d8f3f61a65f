"""pyrossm.infer.fit: parameters, particles, annealing, history, devices, early stopping."""

import json
import math

import pyro
import pytest
import torch
from infer_toy import ExactGuide, ToyGuide, ToyModel, toy_problem
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from pyrossm.infer import History, fit, log_likelihood, make_schedule, resolve_device
from pyrossm.infer.handlers import elbo_objective, elbo_traces
from pyrossm.infer.params import claim_param_store, named_parameters

LR = 1e-3


def _snapshot(*modules):
    return {f"{i}.{n}": p.detach().clone()
            for i, m in enumerate(modules) for n, p in m.named_parameters()}


def test_every_parameter_is_updated_exactly_once():
    model, x = toy_problem(num=8)
    guide = ToyGuide(3, 2)
    before = _snapshot(model, guide)
    fit(model, guide, x, epochs=1, batch_size=8, lr=LR, progress=False, device="cpu")
    after = _snapshot(model, guide)
    # model.W (nn.Parameter of a PyroModule), model.sigma (constrained PyroParam),
    # guide.net.* (plain nn.Linear inside a PyroModule), guide.scale (constrained PyroParam)
    assert set(before) == {"0.W", "0.sigma_unconstrained", "1.net.weight", "1.net.bias",
                           "1.scale_unconstrained"}
    for name in before:
        delta = (after[name] - before[name]).abs()
        # A first Adam step moves every coordinate with a non-zero gradient by lr (up to eps);
        # a parameter stepped twice would move by about 2 lr.
        assert delta.max() > 0.9 * LR, name
        assert delta.max() < 1.01 * LR, name


def test_shared_parameter_listed_once():
    model, _ = toy_problem(num=4)
    guide = ToyGuide(3, 2)
    guide.shared = model.W  # the same tensor in both
    params = named_parameters(model, guide)
    assert sum(p is model.W for p in params.values()) == 1


def test_param_name_collision_between_model_and_guide_raises():
    class G(PyroModule):
        def __init__(self):
            super().__init__()
            self.W = PyroParam(torch.ones(3, 2, dtype=torch.float64),
                               constraint=constraints.positive)

    model, _ = toy_problem(num=4)
    with pytest.raises(ValueError, match="'W'"):
        claim_param_store(model, G())
    # two plain nn.Parameters with one name are only mirrored, never swapped: allowed
    plain = PyroModule()
    plain.W = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    claim_param_store(model, plain)


def test_stale_param_store_entry_does_not_override_module():
    model_old, x = toy_problem(num=4)
    guide = ToyGuide(3, 2)
    fit(model_old, guide, x, epochs=1, batch_size=4, lr=LR, progress=False, device="cpu")
    assert "W" in pyro.get_param_store()
    model_new = ToyModel(torch.ones(3, 2, dtype=torch.float64))
    w_new = model_new.W
    fit(model_new, guide, x, epochs=1, batch_size=4, lr=LR, progress=False, device="cpu")
    assert model_new.W is w_new and model_old.W is not w_new
    assert (model_new.W - 1).abs().max() < 2 * LR  # trained from its own value


def test_fit_learns_and_history_is_complete(tmp_path):
    model, x = toy_problem(num=32, steps=5)
    truth = model.exact_log_prob(x).sum().item()
    model_fit = ToyModel(torch.randn(3, 2, dtype=torch.float64) * 0.1, sigma=1.0)
    guide = ToyGuide(3, 2)
    val = x[:8]
    hist = fit(model_fit, guide, x, val_data=val, epochs=25, batch_size=8, lr=0.08,
               progress=False, device="cpu", seed=1)
    assert isinstance(hist, History) and len(hist) == 25
    assert hist["train_neg_elbo"][-1] < hist["train_neg_elbo"][0]
    steps = x.shape[0] * x.shape[1]
    # per-step figure = per-sequence figure * sequences / observed steps
    assert hist["train_neg_elbo_per_step"][-1] == pytest.approx(
        hist["train_neg_elbo"][-1] * x.shape[0] / steps)
    assert hist["val_neg_elbo_per_step"][-1] == pytest.approx(hist["val_neg_elbo"][-1] / 5)
    assert all(r["val_kl"] is not None and r["seconds"] > 0 for r in hist.records)
    learned = model_fit.exact_log_prob(x).sum().item()
    # the learned model explains the data about as well as the truth (within 0.1 nats/step)
    assert learned / steps > truth / steps - 0.1
    d = json.loads(hist.to_json(tmp_path / "h.json"))
    assert History.from_dict(d).records == hist.records


def test_padding_never_enters_training():
    """Garbage in padded positions changes nothing: same seed -> identical history."""
    model, x = toy_problem(num=12, steps=7)
    lengths = torch.tensor([7, 3, 5, 1, 7, 2, 6, 4, 7, 7, 3, 5])
    mask = torch.arange(7) < lengths[:, None]
    runs = []
    for fill in (0.0, 1e6):
        xp = torch.where(mask[..., None], x, torch.full_like(x, fill))
        m = ToyModel(model.W.detach() * 0.5, sigma=0.8)
        torch.manual_seed(3)
        g = ToyGuide(3, 2)
        runs.append(fit(m, g, (xp, lengths), epochs=3, batch_size=4, lr=0.05, seed=5,
                        progress=False, device="cpu", bucket=True)["train_neg_elbo"])
    assert runs[0] == runs[1]
    assert all(math.isfinite(v) for v in runs[0])


def test_particles_reduce_gradient_variance_and_keep_the_mean():
    model, x = toy_problem(num=6, steps=4)
    guide = ToyGuide(3, 2)
    params = named_parameters(model, guide)
    p = params["guide.net.weight"]

    def grads(k, reps=60):
        out, losses = [], []
        for _ in range(reps):
            obj = elbo_objective(*elbo_traces(model, guide, x, None, k), k)
            g, = torch.autograd.grad(obj.surrogate, [p])
            out.append(g.flatten())
            losses.append(obj.loss.item())
        return torch.stack(out), torch.tensor(losses, dtype=torch.float64)

    g1, l1 = grads(1)
    g8, l8 = grads(8)
    ratio = (g8.var(0).sum() / g1.var(0).sum()).item()
    assert 0.05 < ratio < 0.3  # 1/8 in expectation
    se = math.sqrt(l1.var().item() / len(l1) + l8.var().item() / len(l8))
    assert abs(l1.mean().item() - l8.mean().item()) < 4 * se


def test_particle_loss_with_exact_guide_is_exact():
    model, x = toy_problem(num=5, steps=4)
    guide = ExactGuide(model)
    for k in (1, 3):
        obj = elbo_objective(*elbo_traces(model, guide, x, None, k), k)
        assert obj.neg_elbo.item() == pytest.approx(-model.exact_log_prob(x).sum().item(),
                                                    rel=1e-10)


def test_annealing_factor_recorded_and_objective_annealed():
    model, x = toy_problem(num=8, steps=4)
    guide = ToyGuide(3, 2)
    sched = make_schedule({"name": "linear", "num_steps": 8, "start": 0.1})
    hist = fit(model, guide, x, epochs=3, batch_size=4, lr=1e-2, annealing=sched,
               progress=False, device="cpu")
    # two steps per epoch; the recorded beta is that of the epoch's last step (step 1, 3, 5)
    assert hist["beta"] == pytest.approx([sched(1), sched(3), sched(5)])
    for r in hist.records:
        # loss = -ELBO - (1 - beta) KL, up to beta varying within the epoch
        assert r["train_loss"] <= r["train_neg_elbo"] + 1e-9


def test_early_stopping_restores_best_parameters():
    model_a, x_train = toy_problem(num=16, steps=4, seed=1)
    model_b, x_val = toy_problem(num=16, steps=4, seed=2, sigma=0.1)
    model = ToyModel(model_b.W.detach().clone(), sigma=0.1)  # optimal for val, not for train
    guide = ExactGuide(model)
    guide.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    snapshots = []
    hist = fit(model, guide, x_train, val_data=x_val, epochs=30, batch_size=8, lr=0.05,
               early_stopping_patience=2, progress=False, device="cpu",
               callbacks=[lambda r: snapshots.append(model.W.detach().clone())])
    assert hist.stopped_early and len(hist) < 30
    vals = hist["val_neg_elbo"]
    best = min(range(len(vals)), key=vals.__getitem__)
    assert hist.best_epoch == best + 1 and len(hist) == best + 1 + 2
    assert torch.equal(model.W, snapshots[best])


def test_callback_can_stop():
    model, x = toy_problem(num=4)
    hist = fit(model, ToyGuide(3, 2), x, epochs=10, batch_size=4, lr=1e-2, progress=False,
               device="cpu", callbacks=[lambda r: r["epoch"] == 3])
    assert len(hist) == 3


def test_max_steps_stops_midway_and_a_resume_continues(tmp_path):
    model, x = toy_problem(num=8, steps=4)
    guide = ToyGuide(3, 2)
    kw = dict(epochs=10, batch_size=2, lr=1e-2, progress=False, device="cpu", seed=0,
              checkpoint_dir=tmp_path)  # 4 batches per epoch
    hist = fit(model, guide, x, max_steps=6, **kw)
    assert hist.stop_reason == "max_steps" and not hist.stopped_early
    assert hist["batches"] == [4, 2] and hist["global_step"] == [4, 6]
    hist = fit(model, guide, x, resume=True, max_steps=13, **kw)
    # the budget is counted in total steps; the resumed run starts a fresh epoch
    assert hist["batches"] == [4, 2, 4, 3] and hist["global_step"][-1] == 13
    hist = fit(model, guide, x, resume=True, **kw)
    assert hist.stop_reason is None and len(hist) == 10 and sum(hist["batches"]) == 13 + 6 * 4
    hist = fit(model, guide, x, resume=True, **kw)  # a finished run does not train again
    assert len(hist) == 10


def test_max_seconds_is_checked_before_every_step():
    model, x = toy_problem(num=8, steps=4)
    w = model.W.detach().clone()
    hist = fit(model, ToyGuide(3, 2), x, epochs=5, batch_size=2, lr=1e-2, progress=False,
               device="cpu", max_seconds=0)
    assert hist.stop_reason == "max_seconds" and len(hist) == 0 and torch.equal(model.W, w)
    assert History.from_dict(hist.to_dict()).stop_reason == "max_seconds"


def test_callback_stop_finishes_the_run(tmp_path):
    model, x = toy_problem(num=4)
    kw = dict(epochs=10, batch_size=4, lr=1e-2, progress=False, device="cpu",
              checkpoint_dir=tmp_path)
    hist = fit(model, ToyGuide(3, 2), x, callbacks=[lambda r: r["epoch"] == 3], **kw)
    assert hist.stop_reason == "callback" and len(hist) == 3


def test_progress_bar_runs(capsys):
    model, x = toy_problem(num=4)
    fit(model, ToyGuide(3, 2), x, epochs=2, batch_size=2, lr=1e-2, progress=True, device="cpu")
    assert "epoch 2" in capsys.readouterr().err


def test_bad_arguments():
    model, x = toy_problem(num=4)
    guide = ToyGuide(3, 2)
    kw = dict(epochs=1, batch_size=2, lr=1e-2, progress=False, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, guide, x, **{**kw, "batch_size": 0})
    with pytest.raises(ValueError, match="on_nan"):
        fit(model, guide, x, on_nan="ignore", **kw)
    with pytest.raises(ValueError, match="val_data"):
        fit(model, guide, x, early_stopping_patience=2, **kw)
    with pytest.raises(ValueError, match="x: expected float data"):
        fit(model, guide, x[0], **kw)
    with pytest.raises(ValueError, match="lengths"):
        fit(model, guide, (x, torch.tensor([1, 2, 3])), **kw)
    with pytest.raises(ValueError, match="device"):
        fit(model, guide, x, **{**kw, "device": "tpu9"})
    with pytest.raises(ValueError, match="max_steps: expected a non-negative integer"):
        fit(model, guide, x, max_steps=2.5, **kw)
    with pytest.raises(ValueError, match="max_seconds: expected a non-negative number"):
        fit(model, guide, x, max_seconds=-1, **kw)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.cuda
def test_fit_and_evaluate_on_cuda():
    model, x = toy_problem(num=8, steps=4)
    guide = ToyGuide(3, 2)
    hist = fit(model, guide, x, epochs=2, batch_size=4, lr=1e-2, progress=False, device="cuda")
    assert next(model.parameters()).is_cuda and next(guide.parameters()).is_cuda
    assert math.isfinite(hist["train_neg_elbo"][-1])
    ll = log_likelihood(model, guide, x, num_samples=10)
    assert ll.is_cuda and ll.shape == (8,)


def test_warns_about_global_pyro_param_not_owned_by_modules():
    model, x = toy_problem(num=4)

    class LeakyGuide(ToyGuide):
        def forward(self, x, mask=None):
            pyro.param("global_shift", torch.zeros(2, dtype=torch.float64))
            return super().forward(x, mask)

    with pytest.warns(UserWarning, match="global_shift"):
        fit(model, LeakyGuide(3, 2), x, epochs=1, batch_size=4, lr=1e-2, progress=False,
            device="cpu")


def test_no_warning_for_module_parameters(recwarn):
    model, x = toy_problem(num=4)
    fit(model, ToyGuide(3, 2), x, epochs=1, batch_size=4, lr=1e-2, progress=False, device="cpu")
    assert not [w for w in recwarn if "NOT optimised" in str(w.message)]


def test_resuming_an_early_stopped_run_does_not_train(tmp_path):
    model, x = toy_problem(num=8, steps=4)
    guide = ToyGuide(3, 2)
    kw = dict(epochs=10, batch_size=4, lr=1e-2, progress=False, device="cpu",
              checkpoint_dir=tmp_path, callbacks=[lambda r: r["epoch"] == 2])
    fit(model, guide, x, **kw)
    w = model.W.detach().clone()
    hist = fit(model, guide, x, resume=True, **kw)
    assert len(hist) == 2 and torch.equal(model.W, w)


def test_bound_methods_are_accepted_and_their_modules_trained():
    model, x = toy_problem(num=4)
    guide = ToyGuide(3, 2)
    w = model.W.detach().clone()
    fit(model.forward, guide.forward, x, epochs=1, batch_size=4, lr=1e-2, progress=False,
        device="cpu")
    assert not torch.equal(model.W, w)
    assert log_likelihood(model.forward, guide.forward, x, num_samples=2).shape == (4,)
    with pytest.raises(TypeError, match="model"):
        fit(lambda x, mask=None: None, guide, x, epochs=1, batch_size=4, lr=1e-2)


def test_evaluators_are_not_fooled_by_stale_param_store_entries():
    model, x = toy_problem(num=4)
    guide = ToyGuide(3, 2, init_scale=5.0)
    log_likelihood(model, guide, x, num_samples=2)  # registers "scale" = 5
    fresh = ToyGuide(3, 2, init_scale=0.1)
    log_likelihood(model, fresh, x, num_samples=2)
    assert torch.allclose(fresh.scale, torch.full((2,), 0.1, dtype=torch.float64))
