"""pyrossm.build: one builder for the CLI, the demo and the experiments."""

import pytest
import torch

from pyrossm.build import ModelSpec, build
from pyrossm.guides import FilteringLSTMGuide, StructuredGuide
from pyrossm.lgssm import LinearGaussianSSM
from pyrossm.nonlinear import DeepMarkovModel, LSTMStateSpaceModel


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_dmm_sizes_follow_the_spec():
    spec = ModelSpec("dmm", obs_dim=5, state_dim=3, hidden=7, transition_dim=11,
                     emission_dim=13, rnn_dim=17, emission="bernoulli")
    model, guide = build(spec)
    assert isinstance(model, DeepMarkovModel) and isinstance(guide, StructuredGuide)
    reference = DeepMarkovModel(5, 3, transition_dim=11, emission_dim=13, emission="bernoulli")
    assert _num_params(model) == _num_params(reference)
    reference_guide = StructuredGuide(5, 3, hidden_dim=17, direction="backward")
    assert _num_params(guide) == _num_params(reference_guide)


def test_lstm_ssm_and_filtering_guide():
    model, guide = build(ModelSpec("lstm-ssm", 4, 2, hidden=6, guide="filtering-lstm"))
    assert isinstance(model, LSTMStateSpaceModel) and isinstance(guide, FilteringLSTMGuide)
    reference = LSTMStateSpaceModel(4, 2, rnn_dim=6, emission="gaussian", emission_dim=6,
                                    hidden_dim=6)
    assert _num_params(model) == _num_params(reference)


def test_lgssm_mle_has_no_guide_and_follows_dtype():
    model, guide = build(ModelSpec("lgssm", 3, 2, guide="none", dtype="float64"))
    assert isinstance(model, LinearGaussianSSM) and guide is None
    assert model.A.dtype == torch.float64


def test_old_guide_names_and_dict_round_trip():
    spec = ModelSpec("dmm", 2, 2, guide="backward-structured")
    assert spec.guide == "backward"
    again = ModelSpec.from_dict({**spec.to_dict(), "unknown_key": 1})
    assert again == spec


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(model="hmm", obs_dim=2), "model"),
        (dict(model="dmm", obs_dim=2, guide="iaf"), "guide"),
        (dict(model="dmm", obs_dim=0), "obs_dim"),
        (dict(model="dmm", obs_dim=2, state_dim=0), "state_dim"),
        (dict(model="dmm", obs_dim=2, dtype="float16"), "dtype"),
    ],
)
def test_bad_specs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        ModelSpec(**kwargs)


def test_sequence_vae_needs_a_vocabulary():
    with pytest.raises(ValueError, match="^vocab:"):
        build(ModelSpec("seqvae", state_dim=4))
    with pytest.raises(TypeError, match="^spec:"):
        build({"model": "dmm"})


def test_filtering_guide_rejects_other_cells():
    with pytest.raises(ValueError, match="^encoder_cell:"):
        build(ModelSpec("dmm", 2, 2, guide="filtering-lstm", encoder_cell="gru"))


def test_conjugate_guide():
    from pyrossm.guides import ConjugateGuide

    _, guide = build(ModelSpec("lgssm", 2, 3, guide="conjugate"))
    assert isinstance(guide, ConjugateGuide)
    _, guide = build(ModelSpec("dmm", 2, 3, hidden=5, guide="conjugate"))
    assert isinstance(guide, ConjugateGuide)
