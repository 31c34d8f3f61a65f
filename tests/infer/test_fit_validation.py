"""fit checks its data against the model and guide before training, naming the argument."""

import pytest
import torch

from pyrossm.guides import FilteringLSTMGuide, StructuredGuide
from pyrossm.infer import fit
from pyrossm.infer.data import as_dataset
from pyrossm.nonlinear import DeepMarkovModel


def _pair(obs_dim=3, z_dim=2, guide_state=None):
    model = DeepMarkovModel(obs_dim, z_dim=z_dim, transition_dim=8, emission_dim=8,
                            emission="gaussian")
    guide = FilteringLSTMGuide(obs_dim, guide_state or z_dim, hidden_dim=8)
    return model, guide


def _fit(model, guide, data, **kw):
    return fit(model, guide, data, epochs=1, batch_size=4, lr=1e-3, device="cpu",
               progress=False, **kw)


def test_float64_data_into_float32_model_is_converted_with_a_warning():
    model, guide = _pair()
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"train_data: converted from torch.float64 to "
                                         r"torch.float32"):
        hist = _fit(model, guide, x)
    assert hist.records[0]["train_neg_elbo"] == hist.records[0]["train_neg_elbo"]  # not NaN


def test_guide_state_dim_must_equal_model_z_dim():
    model, guide = _pair(z_dim=2, guide_state=3)
    with pytest.raises(ValueError, match=r"guide: expected state_dim = 2 \(the model's z_dim\)"):
        _fit(model, guide, torch.randn(6, 5, 3))
    structured = StructuredGuide(3, 4, hidden_dim=8)
    with pytest.raises(ValueError, match="guide: expected state_dim = 2"):
        _fit(model, structured, torch.randn(6, 5, 3))


def test_obs_dim_mismatch_names_the_data():
    model, guide = _pair(obs_dim=3)
    with pytest.raises(ValueError, match=r"train_data: expected obs_dim = 3"):
        _fit(model, guide, torch.randn(6, 5, 4))
    with pytest.raises(ValueError, match=r"val_data: expected obs_dim = 3"):
        _fit(model, guide, torch.randn(6, 5, 3), val_data=torch.randn(2, 5, 2))


def test_list_of_variable_length_sequences_is_padded():
    model, guide = _pair()
    seqs = [torch.randn(t, 3) for t in (5, 2, 4, 3)]
    data = as_dataset(seqs)
    assert data.lengths.tolist() == [5, 2, 4, 3] and data.x.shape == (4, 5, 3)
    hist = _fit(model, guide, seqs)
    assert hist.records[0]["train_neg_elbo"] * 4 == pytest.approx(
        hist.records[0]["train_neg_elbo_per_step"] * 14)
    with pytest.raises(ValueError, match="one obs_dim"):
        as_dataset([torch.randn(3, 2), torch.randn(4, 3)])


def test_two_dimensional_float_data_points_to_the_fix():
    model, guide = _pair()
    with pytest.raises(ValueError, match=r"x.unsqueeze\(0\).*pad_sequences"):
        _fit(model, guide, torch.randn(5, 3))


def test_warnings_for_missing_and_unstandardised_data():
    model, guide = _pair()
    with pytest.warns(UserWarning, match="train_data: every entry is missing"):
        _fit(model, guide, torch.full((4, 5, 3), float("nan")))
    x = torch.randn(6, 5, 3)
    x[..., 1] = 1000.0 + 50.0 * x[..., 1]
    with pytest.warns(UserWarning, match=r"train_data: features \[1\] are far from standardised"):
        _fit(model, guide, x)


def test_both_nonlinear_models_default_to_a_gaussian_emission():
    from pyrossm.nonlinear import LSTMStateSpaceModel

    dmm = DeepMarkovModel(3, z_dim=2, transition_dim=4, emission_dim=4)
    lstm = LSTMStateSpaceModel(3, z_dim=2, rnn_dim=4, emission_dim=4, hidden_dim=4)
    assert dmm.emission_kind == lstm.emission_kind == "gaussian"


def test_fit_config_validates_and_reproduces_fit():
    """fit's options as one object (issue 15): checked by name, and usable with fit(**vars)."""
    from pyrossm.infer.fit import FitConfig

    with pytest.raises(ValueError, match="num_particles"):
        FitConfig(epochs=1, batch_size=4, lr=1e-2, num_particles=0).check(False)
    with pytest.raises(ValueError, match="early_stopping_patience needs val_data"):
        FitConfig(epochs=1, batch_size=4, lr=1e-2, early_stopping_patience=2).check(False)
    cfg = FitConfig(epochs=2, batch_size=4, lr=1e-2, seed=0, device="cpu", progress=False)
    x = torch.randn(6, 5, 3)
    runs = []
    for kwargs in (vars(cfg), dict(epochs=2, batch_size=4, lr=1e-2, seed=0, device="cpu",
                                   progress=False)):
        torch.manual_seed(0)
        model, guide = _pair()
        runs.append([r["train_neg_elbo"] for r in fit(model, guide, x, **kwargs).records])
    assert runs[0] == runs[1]
