"""Results of a maximum-likelihood fit of a linear-Gaussian state-space model.

:class:`MLEResults` (returned by ``LinearGaussianSSM.fit``) holds the estimates with standard
errors, the log-likelihood, AIC/BIC, the optimiser's
convergence report and the standardised one-step-ahead residuals with a Ljung–Box test, and
prints a ``summary()`` table. Sequences are ``(batch, time, obs_dim)`` with time at dim -2.

Reference: Durbin & Koopman, *Time Series Analysis by State Space Methods* (2012), §2.12, §7.3;
Ljung & Box, "On a measure of lack of fit in time series models", Biometrika 65 (1978).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch

__all__ = ["MLEResults", "ljung_box", "standardized_residuals"]


def standardized_residuals(x, filt, C, R):
    """Standardised one-step-ahead forecast errors ``(batch, T, obs_dim)``.

    v_t = x_t − C m_{t|t−1}, F_t = C P_{t|t−1} Cᵀ + R; fully observed steps give
    ``L_t⁻¹ v_t`` with ``F_t = L_t L_tᵀ`` (lower Cholesky, as statsmodels'
    ``standardized_forecasts_error``), partially observed steps ``v_{t,i} / √F_{t,ii}`` for
    the observed entries; missing entries are NaN.
    """
    v = x - filt.predicted_means @ C.T
    F = C @ filt.predicted_covs @ C.T + R
    L = torch.linalg.cholesky(0.5 * (F + F.transpose(-1, -2)))
    full = torch.linalg.solve_triangular(L, torch.nan_to_num(v).unsqueeze(-1), upper=False)
    full = full.squeeze(-1)
    marginal = v / torch.diagonal(F, dim1=-2, dim2=-1).sqrt()
    complete = ~torch.isnan(x).any(-1, keepdim=True)
    return torch.where(complete, full, marginal)


def ljung_box(e, lags):
    """Ljung–Box statistic Q = n(n+2) Σ_{k≤lags} ρ̂_k² / (n−k) of a series ``e`` (NaNs dropped)
    and its χ²(lags) p-value. Returns ``(Q, p_value)`` floats.

    >>> q, p = ljung_box(np.random.default_rng(0).standard_normal(200), 10)
    >>> 0.05 < p < 1
    True
    """
    e = np.asarray(e, dtype=np.float64)
    e = e[~np.isnan(e)]
    n = len(e)
    if n <= lags + 1:
        return float("nan"), float("nan")
    d = e - e.mean()
    denom = float(d @ d)
    acf = np.array([float(d[k:] @ d[:-k]) / denom for k in range(1, lags + 1)])
    q = n * (n + 2) * float(np.sum(acf**2 / (n - np.arange(1, lags + 1))))
    return q, float(scipy.stats.chi2.sf(q, lags))


class MLEResults(list):
    """A maximum-likelihood fit: estimates, standard errors, fit statistics, diagnostics.

    For backward compatibility the object *is* the list of the loss history (the negative
    log-likelihood per observed step at the start and after each L-BFGS iteration), so
    ``losses[-1]`` still works.

    Attributes:
        names: labels of the free natural parameters (``"A[0,1]"``, ``"sigma2.level"``, ...).
        estimates, std_errors: ``(k,)`` float64 tensors; standard errors from the observed
            information: the inverse of minus the autograd Hessian of the log-likelihood in
            the natural parameterisation (variances, matrix entries; ``cov_type="approx"``
            of statsmodels).
        cov_params: ``(k, k)`` their covariance, computed when first used (``std_errors``,
            ``summary()``), as the Hessian costs about as much as the fit.
        params, system: the fitted natural values by name, and the system matrices.
        log_likelihood: the maximised log-likelihood, first ``burn`` steps' terms dropped.
        nobs: number of steps with an observation after the burn.
        iterations, evaluations, grad_norm, converged, message, seconds: the optimiser's report
            (``grad_norm``: max |∂ loss / ∂θ| in the unconstrained parameters).
        at_boundary: names of parameters on the boundary (a variance at its floor).
        residuals: standardised one-step-ahead residuals ``(batch, T, obs_dim)``, NaN where
            missing and during the burn.
    """

    def __init__(self, history, **fields):
        super().__init__(history)
        for key, value in fields.items():
            setattr(self, key, value)

    @property
    def history(self):
        return list(self)

    @property
    def cov_params(self):
        """``(k, k)`` covariance of the estimates (computed on first use: an autograd Hessian)."""
        if getattr(self, "_cov", None) is None:
            self._cov = self.covariance()
        return self._cov

    @property
    def std_errors(self):
        """NaN for parameters on the boundary or not identified."""
        return torch.diagonal(self.cov_params).sqrt()

    @property
    def num_params(self):
        return int(self.estimates.numel())

    @property
    def aic(self):
        """Akaike: −2 log L + 2k (k = number of free natural parameters)."""
        return -2 * self.log_likelihood + 2 * self.num_params

    @property
    def bic(self):
        """Schwarz: −2 log L + k log(nobs)."""
        return -2 * self.log_likelihood + self.num_params * math.log(max(self.nobs, 1))

    def ljung_box(self, lags=None):
        """Ljung–Box test of each standardised residual series: arrays ``(batch, obs_dim)`` of
        the statistic and p-value; ``lags`` default ``min(10, nobs // 5)`` (statsmodels')."""
        r = self.residuals.numpy()
        if lags is None:
            lags = max(1, min(10, self.nobs // (5 * r.shape[0])))
        out = np.array([[ljung_box(r[b, :, i], lags) for i in range(r.shape[2])]
                        for b in range(r.shape[0])])
        return out[..., 0], out[..., 1]

    def summary(self):
        """A text table of the fit (print it)."""
        se = self.std_errors
        z = self.estimates / se
        pvals = 2 * scipy.stats.norm.sf(np.abs(z.numpy()))
        width = max([len(n) for n in self.names] + [9])
        lines = [
            "LinearGaussianSSM maximum-likelihood fit",
            f"log-likelihood {self.log_likelihood:.4f}   AIC {self.aic:.4f}   BIC {self.bic:.4f}",
            f"observations {self.nobs} (first {self.burn} steps burned)   parameters "
            f"{self.num_params}",
            f"L-BFGS: converged {self.converged}, {self.iterations} iterations, "
            f"{self.evaluations} evaluations, max |gradient| {self.grad_norm:.2e}, "
            f"{self.seconds:.2f} s",
            "",
            f"{'parameter':<{width}} {'estimate':>13} {'std err':>12} {'z':>8} {'P>|z|':>7}",
        ]
        for name, est, s, zz, pv in zip(self.names, self.estimates.tolist(), se.tolist(),
                                        z.tolist(), pvals):
            lines.append(f"{name:<{width}} {est:>13.6g} {s:>12.4g} {zz:>8.2f} {pv:>7.3f}")
        q, p = self.ljung_box()
        lines.append("")
        for i, (qi, pi) in enumerate(zip(q.reshape(-1), p.reshape(-1))):
            lines.append(f"Ljung-Box residual series {i}: Q = {qi:.3f}, p = {pi:.3f}")
        if self.at_boundary:
            lines.append(f"warning: on the boundary: {', '.join(self.at_boundary)}")
        return "\n".join(lines)

    def __repr__(self):
        return (f"MLEResults(log_likelihood={self.log_likelihood:.4f}, "
                f"num_params={self.num_params}, converged={self.converged})")
