"""Shared pieces of the experiments: the per-frame evaluation every experiment reports."""

from __future__ import annotations

import time

from pyrossm.infer import evaluate as infer_evaluate
from pyrossm.nonlinear.diagnostics import kl_per_dimension

__all__ = ["evaluate"]


def evaluate(model, guide, data, *, iwae_samples: int = 100, elbo_samples: int = 1,
             batch_size: int = 20, chunk_size: int | None = None,
             smc_particles: int = 0) -> dict:
    """Per-frame −ELBO and IWAE NLL of ``data = (x, mask)`` (x: (N, T, obs_dim), time at -2),
    by :func:`pyrossm.infer.evaluate` (the library's one evaluation path), as a JSON-ready dict.

    Returns ``{"neg_elbo_per_frame", "iwae_nll_per_frame", "iwae_samples", "elbo_samples",
    "frames", "sequences", "seconds"}``; IWAE uses ``iwae_samples`` guide draws per sequence.
    ``smc_particles > 0`` adds ``"smc_nll_per_frame"`` (particle filter with the guide as
    proposal) and ``"smc_particles"``. With a diagonal guide also ``"kl_per_frame"``,
    ``"kl_per_dimension"`` and ``"active_dims"`` (KL > 0.01 nats/frame;
    :func:`~pyrossm.nonlinear.kl_per_dimension`, 4 guide draws).
    """
    x, mask = data
    chunk = chunk_size or max(1, 512 // batch_size)
    t0 = time.perf_counter()
    ev = infer_evaluate(model, guide, (x, mask), num_samples=iwae_samples,
                        elbo_samples=elbo_samples, smc_particles=smc_particles,
                        batch_size=batch_size, chunk_size=chunk)
    out = {
        "neg_elbo_per_frame": -ev.elbo_per_step,
        "iwae_nll_per_frame": -ev.log_likelihood_per_step,
        "iwae_samples": iwae_samples,
        "elbo_samples": elbo_samples,
        "frames": int(ev.num_steps.sum()),
        "sequences": int(x.shape[0]),
        "seconds": time.perf_counter() - t0,
    }
    if ev.smc is not None:
        out.update(smc_nll_per_frame=-ev.smc_per_step, smc_particles=smc_particles)
    try:
        kl = kl_per_dimension(model, guide, (x, mask), num_samples=4, batch_size=batch_size)
    except (TypeError, ValueError):  # e.g. a full-covariance guide: no per-coordinate split
        return out
    out.update(kl_per_frame=kl.kl_per_frame, active_dims=kl.active_dims,
               kl_per_dimension=[round(v, 5) for v in kl.kl_per_dimension.tolist()])
    return out
