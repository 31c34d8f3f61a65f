"""to_inference_data: named dims, groups, layouts, errors; arviz functions run on the result."""

import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
az = pytest.importorskip("arviz")

from pyrossm.inference_data import to_inference_data  # noqa: E402
from pyrossm.lgssm import LinearGaussianSSM  # noqa: E402


def test_posterior_dims_and_values_are_kept():
    z = torch.randn(40, 3, 12, 2)
    idata = to_inference_data(posterior={"z": z}, observed_data={"x": torch.randn(3, 12, 1)})
    post = idata.posterior["z"]
    assert post.dims == ("chain", "draw", "sequence", "time", "state")
    assert dict(post.sizes) == {"chain": 1, "draw": 40, "sequence": 3, "time": 12, "state": 2}
    np.testing.assert_array_equal(post.values[0], z.numpy())
    assert idata.observed_data["x"].dims == ("sequence", "time", "obs")


def test_chains_and_single_sequence_layouts():
    idata = to_inference_data(posterior=torch.randn(2, 30, 4, 5, 3))  # chains in front
    assert dict(idata.posterior["z"].sizes)["chain"] == 2
    idata = to_inference_data(posterior=torch.randn(30, 5, 3))  # (draws, time, dim)
    assert dict(idata.posterior["z"].sizes) == {"chain": 1, "draw": 30, "sequence": 1,
                                                "time": 5, "state": 3}


def test_prior_from_model_sample_and_forecast_predictions():
    ssm = LinearGaussianSSM.from_matrices(A=[[0.9]], C=[[1.0], [0.5]], Q=[[0.5]],
                                          R=0.1 * torch.eye(2))
    prior = ssm.sample(20, num_samples=50)
    x = prior.x if hasattr(prior, "x") else prior[1]
    fc = ssm.forecast(x[:2], horizon=4, num_samples=60)
    idata = to_inference_data(prior={"z": prior[0], "x": prior[1]},
                              predictions={"x": fc.samples}, observed_data={"x": x[:2]})
    assert idata.prior["z"].dims[-1] == "state" and idata.prior["x"].dims[-1] == "obs"
    # prior samples are one sequence each; predictions continue the observed time axis
    assert idata.predictions["x"].coords["time"].values.tolist() == [20, 21, 22, 23]
    hdi = az.hdi(idata.predictions, hdi_prob=0.9)["x"]
    assert hdi.shape == (2, 4, 2, 2)  # sequence, time, obs, (lower, higher)
    assert bool((hdi.sel(hdi="lower") < hdi.sel(hdi="higher")).all())


def test_summary_and_plot_hdi_run():
    import matplotlib

    matplotlib.use("Agg")
    z = torch.randn(2, 100, 1, 8, 1).cumsum(-2)
    idata = to_inference_data(posterior={"z": z})
    summary = az.summary(idata, var_names=["z"])
    assert len(summary) == 8 and {"mean", "sd", "r_hat", "ess_bulk"} <= set(summary.columns)
    post = idata.posterior["z"].isel(sequence=0, state=0)
    ax = az.plot_hdi(np.arange(8), post, hdi_prob=0.9)
    assert len(ax.collections) == 1


def test_latent_option_and_coordinates():
    idata = to_inference_data(posterior={"x": torch.randn(5, 1, 3, 2)}, latent=("x",),
                              time=[1871, 1872, 1873], sequence_names=["nile"])
    assert idata.posterior["x"].dims[-1] == "state"
    assert idata.posterior["x"].coords["time"].values.tolist() == [1871, 1872, 1873]
    assert idata.posterior["x"].coords["sequence"].values.tolist() == ["nile"]


@pytest.mark.parametrize("kwargs, match", [
    ({}, "at least one group"),
    ({"posterior": torch.randn(5, 3)}, r"\(draws, sequences, time, dim\)"),
    ({"posterior": torch.randn(5, 2, 3, 1), "observed_data": torch.randn(4, 3, 1)},
     "same number of sequences"),
    ({"posterior": torch.randn(5, 2, 3, 1), "has_chain": True}, "with chains"),
    ({"posterior": torch.randn(5, 1, 3, 1), "time": [0, 1]}, "time: expected 3"),
    ({"posterior": np.array([["a"]])}, "numeric"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        to_inference_data(**kwargs)


def test_forecast_object_as_predictions():
    """A Forecast goes to the predictions group whole: x = samples, z = latent samples, time
    continuing after each sequence's length."""
    ssm = LinearGaussianSSM.from_matrices(A=[[0.9]], C=[[1.0], [0.5]], Q=[[0.5]],
                                          R=0.1 * torch.eye(2))
    _, x = ssm.sample(15, num_samples=3)
    fc = ssm.forecast(x, horizon=4, num_samples=30)
    idata = to_inference_data(predictions=fc)
    assert idata.predictions["x"].dims == ("chain", "draw", "sequence", "time", "obs")
    assert idata.predictions["z"].dims[-1] == "state"
    assert idata.predictions["x"].coords["time"].values.tolist() == [15, 16, 17, 18]
    np.testing.assert_array_equal(idata.predictions["x"].values[0], fc.samples.numpy())
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(predictions=ssm.forecast(x, horizon=2, num_samples=0))
