"""Forecasts with exogenous inputs: offsets b_t, d_t given for the past and the future steps.

Shapes follow pyrossm: x is (batch..., T, obs_dim), time at dim -2; offsets are (batch..., T + H,
dim): the time axis of x extended by the horizon.
"""

import warnings

import numpy as np
import pytest
import torch

from pyrossm.lgssm import LinearGaussianSSM, kalman_filter

F64 = torch.float64


def test_regression_forecast_matches_statsmodels():
    # Local level + regression on two exogenous series (statsmodels' UnobservedComponents with
    # exog), at fixed parameters: forecast means and variances with future regressors.
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(0)
    T, H = 80, 6
    exog = rng.standard_normal((T + H, 2))
    beta = np.array([0.7, -0.4])
    y = rng.standard_normal(T).cumsum() * 0.3 + exog[:T] @ beta + 0.5 * rng.standard_normal(T)
    y[[5, 40]] = np.nan
    params = [0.3, 0.1, 0.7, -0.4]  # sigma2.irregular, sigma2.level, beta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = sm.tsa.UnobservedComponents(y, level="llevel", exog=exog[:T])
        res = mod.smooth(params)
        fc = res.get_forecast(H, exog=exog[T:])
    ssm = LinearGaussianSSM.from_matrices(A=1.0, C=1.0, Q=0.1, R=0.3, init_mean=0.0,
                                          init_cov=1e6, dtype=F64)
    d = torch.tensor(exog @ beta).reshape(1, T + H, 1)
    ours = ssm.forecast(torch.tensor(y).reshape(1, T, 1), H, num_samples=0, observation_offset=d)
    np.testing.assert_allclose(ours.mean[0, :, 0], fc.predicted_mean, rtol=1e-8)
    np.testing.assert_allclose(ours.covariance[0, :, 0, 0], fc.var_pred_mean, rtol=1e-8)


def test_offsets_forecast_equals_filtering_the_future_as_missing():
    # Independent path: the filter run over T + H steps with the future unobserved predicts
    # exactly the forecast (means and covariances), offsets included; padded sequences of
    # different lengths forecast from their own ends.
    g = torch.Generator().manual_seed(1)
    n, p, T, H = 2, 3, 40, 5
    A = torch.tensor([[0.9, 0.2], [-0.1, 0.7]], dtype=F64)
    C = torch.randn(p, n, generator=g, dtype=F64)
    ssm = LinearGaussianSSM.from_matrices(A=A, C=C, Q=0.3 * torch.eye(n, dtype=F64),
                                          R=0.5 * torch.eye(p, dtype=F64), dtype=F64)
    x = torch.randn(3, T, p, generator=g, dtype=F64)
    lengths = torch.tensor([40, 31, 17])
    mask = torch.arange(T) < lengths[:, None]
    b = torch.randn(3, T + H, n, generator=g, dtype=F64)
    d = torch.randn(3, T + H, p, generator=g, dtype=F64)
    fc = ssm.forecast(x, H, num_samples=2000, mask=mask, generator=g,
                      transition_offset=b, observation_offset=d)
    m = ssm.matrices()
    for i, ell in enumerate(lengths.tolist()):
        xf = torch.cat([x[i, :ell], torch.full((H, p), float("nan"), dtype=F64)])
        ref = kalman_filter(xf, m["A"], m["C"], m["Q"], m["R"], m["init_mean"], m["init_cov"],
                            transition_offset=b[i, : ell + H], observation_offset=d[i, : ell + H])
        np.testing.assert_allclose(fc.latent_mean[i], ref.predicted_means[ell:], rtol=1e-10)
        np.testing.assert_allclose(fc.latent_covariance[i], ref.predicted_covs[ell:], rtol=1e-10)
        obs_mean = ref.predicted_means[ell:] @ C.T + d[i, ell : ell + H]
        np.testing.assert_allclose(fc.mean[i], obs_mean, rtol=1e-10)
        # the samples carry the same shift: their mean within 5 standard errors
        s = fc.samples[:, i]
        se = s.std(0) / np.sqrt(s.shape[0])
        assert bool(((s.mean(0) - obs_mean).abs() < 5 * se).all())


def test_offset_shape_errors():
    ssm = LinearGaussianSSM.from_matrices(A=1.0, C=1.0, Q=0.1, R=1.0)
    x = torch.randn(1, 20, 1)
    with pytest.raises(ValueError, match=r"observation_offset: expected shape \(\.\.\., T \+ "):
        ssm.forecast(x, 3, observation_offset=torch.zeros(1, 20, 1))
    with pytest.raises(ValueError, match="transition_offset"):
        ssm.forecast(x, 3, transition_offset=torch.zeros(1, 23, 2))
