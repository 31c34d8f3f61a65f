"""pyrossm.plotting: every function runs under Agg and draws the expected artists."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pyrossm import plotting  # noqa: E402
from pyrossm.infer import History  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_bands_from_std_are_gaussian_intervals():
    ax = plotting.plot_bands([0.0, 0.0], [1.0, 2.0], level=0.9, label="exact")
    verts = ax.collections[0].get_paths()[0].vertices
    assert np.isclose(verts[:, 1].max(), 1.6448536 * 2, atol=1e-6)
    assert ax.lines[0].get_label() == "exact"


def test_trajectories_band_paths_and_data():
    samples = torch.randn(200, 30, 2).cumsum(1)
    obs = torch.randn(30, 2)
    obs[3] = float("nan")
    ax = plotting.plot_trajectories(samples, observed=obs, dim=1, num_paths=4)
    assert len(ax.lines) == 1 + 4  # median + paths
    assert len(ax.collections) == 2  # band + data points
    np.testing.assert_allclose(ax.lines[0].get_ydata(), samples[..., 1].median(0).values.numpy(),
                               atol=0.2)


def test_forecast_from_samples_and_from_gaussian():
    past = torch.randn(20, 1)
    ax = plotting.plot_forecast(past, samples=torch.randn(100, 5, 1), future=torch.randn(5, 1))
    assert ax.lines[0].get_xdata().tolist() == list(range(20))
    assert ax.lines[1].get_xdata().tolist() == list(range(20, 25))
    ax = plotting.plot_forecast(past, means=torch.zeros(5, 1), covs=torch.ones(5, 1, 1))
    assert len(ax.collections) == 1
    with pytest.raises(ValueError, match="samples, means/covs"):
        plotting.plot_forecast(past)


def test_posterior_comparison_one_band_per_posterior():
    m, s = torch.zeros(25, 2), torch.ones(25, 2)
    ax = plotting.plot_posterior_comparison(m, s, {"filtering": (m + 1, s), "backward": (m, 2 * s)},
                                            observations=torch.randn(25, 1))
    assert len(ax.lines) == 3 and len(ax.collections) == 4  # 3 bands + data
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "filtering" in labels and "backward" in labels


def test_piano_roll_image_and_mask():
    roll = torch.rand(40, 88) > 0.9
    mask = torch.arange(40) < 30
    ax = plotting.plot_piano_roll(roll, mask=mask, title="data")
    (img,) = ax.images
    assert img.get_array().shape == (88, 30)
    assert ax.get_title() == "data"


def test_training_curves_from_history_and_dict():
    recs = [{"epoch": e, "train_neg_elbo_per_step": 3.0 / e, "val_neg_elbo_per_step": 3.2 / e,
             "train_kl": 1.0 + e, "beta": min(1.0, 0.2 * e)} for e in range(1, 6)]
    fig = plotting.plot_training_curves(History(recs), reference={"exact": 0.5})
    axes = fig.axes
    assert len(axes) == 3
    assert len(axes[0].lines) == 3  # train, validation, reference
    np.testing.assert_allclose(axes[2].lines[0].get_ydata(), [0.2, 0.4, 0.6, 0.8, 1.0])
    fig = plotting.plot_training_curves({"a": History(recs), "b": {"records": recs}})
    assert len(fig.axes[1].lines) == 2


def test_bad_input_raises_named_errors():
    with pytest.raises(ValueError, match="level"):
        plotting.plot_bands([0.0], [1.0], level=1.5)
    with pytest.raises(ValueError, match="samples"):
        plotting.plot_trajectories(torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match="history"):
        plotting.plot_training_curves(42)


def test_forecast_object_exact_band_and_padding():
    """plot_forecast(forecast=...): exact Gaussian band of the LGSSM forecast (its 90% interval),
    from each sequence's own length; sampled forecasts give the empirical band."""
    from pyrossm.forecast import Forecast
    from pyrossm.lgssm import LinearGaussianSSM
    from pyrossm.protocol import lengths_to_mask

    ssm = LinearGaussianSSM.from_matrices(A=[[0.9]], C=[[1.0]], Q=[[0.5]], R=[[1.0]],
                                          dtype=torch.float64)
    _, x = ssm.sample(12, 2)
    mask = lengths_to_mask(torch.tensor([12, 8]), 12)
    fc = ssm.forecast(x, 3, num_samples=0, mask=mask)
    ax = plotting.plot_forecast(x[1], forecast=fc, sequence=1, level=0.9)
    assert ax.lines[0].get_xdata().tolist() == list(range(8))  # past cut at its length
    assert ax.lines[1].get_xdata().tolist() == [8, 9, 10]
    verts = ax.collections[0].get_paths()[0].vertices
    lower, upper = fc.interval(0.9)
    np.testing.assert_allclose(verts[:, 1].max(), float(upper[1, :, 0].max()), rtol=1e-9)
    np.testing.assert_allclose(verts[:, 1].min(), float(lower[1, :, 0].min()), rtol=1e-9)
    sampled = Forecast(torch.randn(50, 2, 3, 1), None, torch.zeros(2, 3, 1))
    ax = plotting.plot_forecast(x[0], forecast=sampled, sequence=0)
    assert ax.lines[1].get_xdata().tolist() == [12, 13, 14]
    with pytest.raises(ValueError, match="sequence"):
        plotting.plot_forecast(x[0], forecast=fc, sequence=5)
    with pytest.raises(ValueError, match="forecast, samples"):
        plotting.plot_forecast(x[0], forecast=fc, samples=torch.randn(5, 3, 1))
