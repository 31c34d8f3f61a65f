"""Validation under ``fit(objective="fivo")``: the held-out FIVO bound, ``val_every``, and
keeping the parameters with the best held-out bound.

Monte Carlo tolerances are in standard errors (``K_SE``).
"""

import math
from dataclasses import replace

import pyro
import pytest
import torch

from pyrossm import DeepMarkovModel, LinearGaussianSSM, StructuredGuide
from pyrossm.infer import fit
from pyrossm.infer.data import as_dataset
from pyrossm.infer.evaluate import elbo
from pyrossm.infer.fit import FitConfig
from pyrossm.infer.loop import _validation_terms

K_SE = 4.0

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(num, T, seed):
    ssm = LinearGaussianSSM.from_matrices(A=[[0.9, 0.2], [-0.1, 0.8]], C=[[1.0, 0.3]],
                                          Q=[[0.3, 0.0], [0.0, 0.2]], R=[[0.4]])
    pyro.set_rng_seed(seed)
    return ssm.sample(T, num_samples=num)[1]


def _pair(seed=0):
    torch.manual_seed(seed)
    model = DeepMarkovModel(obs_dim=1, z_dim=2, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    return model, StructuredGuide(obs_dim=1, state_dim=2, hidden_dim=8)


def test_one_particle_fivo_validation_is_the_elbo_in_expectation():
    """K = 1 never resamples (ESS = 1 >= K/2), so log p̂ is one importance weight of the guide's
    per-step proposals: its mean is the ELBO. And K = 32 is a tighter bound than the ELBO."""
    model, guide = _pair()
    val = as_dataset(_data(num=8, T=12, seed=1))
    cfg = FitConfig(epochs=1, batch_size=8, lr=0.01, objective="fivo", num_particles=1,
                    val_num_samples=400)
    pyro.set_rng_seed(2)
    one, _, steps = _validation_terms(model, guide, val, cfg, "cpu")
    draws = torch.stack([elbo(model, guide, val, num_samples=1) for _ in range(400)])
    ref, se = draws.mean(0), draws.std(0) / math.sqrt(400)
    z = (one - ref) / (se * math.sqrt(2))  # both sides are means of 400 draws
    assert float(z.abs().max()) < K_SE, z
    tight, _, _ = _validation_terms(model, guide, val,
                                    replace(cfg, num_particles=32, val_num_samples=4), "cpu")
    assert float(tight.sum()) > float(ref.sum()) + 4 * float(se.pow(2).sum().sqrt())
    assert steps.tolist() == [12] * 8
    assert model.training and guide.training  # the modes are restored


def test_val_objective_default_follows_the_training_objective():
    x, x_val = _data(num=16, T=10, seed=3), _data(num=8, T=10, seed=4)
    recs = {}
    for vo in (None, "elbo"):
        model, guide = _pair()
        hist = fit(model, guide, x, val_data=x_val, epochs=2, batch_size=8, lr=0.01,
                   num_particles=16, objective="fivo", val_objective=vo, seed=0,
                   progress=False)
        recs[vo] = hist["val_neg_elbo_per_step"]
    # the same parameters after the same steps (seeded): the FIVO bound with 16 particles
    # lies well above the one-draw ELBO on an untrained model
    assert recs[None][0] < recs["elbo"][0] - 0.05, recs


def test_val_every_and_the_best_parameters_are_kept():
    x, x_val = _data(num=16, T=10, seed=5), _data(num=8, T=10, seed=6)
    model, guide = _pair()
    snapshots = []

    def snapshot(record):
        snapshots.append((record["val_neg_elbo"],
                          {k: v.clone() for k, v in model.state_dict().items()}))

    hist = fit(model, guide, x, val_data=x_val, epochs=7, batch_size=8, lr=0.05,
               num_particles=4, objective="fivo", val_every=3, early_stopping_patience=100,
               seed=0, progress=False, callbacks=[snapshot])
    vals = hist["val_neg_elbo"]
    assert [v is not None for v in vals] == [False, False, True, False, False, True, True]
    best = min(range(7), key=lambda i: math.inf if vals[i] is None else vals[i])
    assert hist.best_epoch == best + 1
    for k, v in model.state_dict().items():  # the run ends with the best epoch's parameters
        torch.testing.assert_close(v, snapshots[best][1][k])


def test_bad_validation_options():
    model, guide = _pair()
    x = _data(num=4, T=5, seed=7)
    with pytest.raises(ValueError, match="val_objective"):
        fit(model, guide, x, val_data=x, epochs=1, batch_size=4, lr=0.01, val_objective="iwae",
            progress=False)
    with pytest.raises(ValueError, match="val_every"):
        fit(model, guide, x, val_data=x, epochs=1, batch_size=4, lr=0.01, val_every=0,
            progress=False)


def test_epoch_line_names_the_objectives(capsys):
    """The progress line says which bound it prints: FIVO for training and validation by
    default under ``objective="fivo"``, the ELBO for validation with ``val_objective="elbo"``."""
    x = _data(num=4, T=6, seed=3)
    for val_objective, expected in ((None, "val -fivo/step"), ("elbo", "val -elbo/step")):
        model, guide = _pair()
        fit(model, guide, x, val_data=x, epochs=1, batch_size=4, lr=0.01, objective="fivo",
            num_particles=2, val_objective=val_objective, progress=True)
        err = capsys.readouterr().err
        assert "epoch 1: -fivo/step" in err and expected in err, err
