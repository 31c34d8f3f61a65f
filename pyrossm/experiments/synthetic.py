"""Synthetic checks of the nonlinear models against Kalman baselines (issue 4).

* ``system="linear"``: data from a random stable linear-Gaussian SSM. The exact log-likelihood
  (Kalman filter, true parameters) is the yardstick: a nonlinear model that has learned the
  system has a held-out IWAE NLL per step close to the exact NLL per step (target: within 0.05).
* ``system="pendulum"`` / ``"lorenz"``: data from a nonlinear system seen through a nonlinearity
  (:func:`pyrossm.datasets.simulate_pendulum`, :func:`pyrossm.datasets.simulate_lorenz`). The
  baseline is the best (over state dimensions) maximum-likelihood LGSSM
  (:meth:`pyrossm.lgssm.LinearGaussianSSM.fit`) scored exactly on held-out data; the nonlinear
  models should beat it.

Figures per step (= per frame): ``iwae_nll_per_frame`` (IWAE NLL, an upper bound on the true
NLL that tightens with K) and ``neg_elbo_per_frame`` (−ELBO, looser); exact Kalman NLLs are
exact. Lower is better everywhere.

    python -m pyrossm.experiments.nonlinear synthetic --system linear
"""

from __future__ import annotations

import math
import time

import pyro
import torch

from pyrossm.build import ModelSpec, build
from pyrossm.datasets import (
    random_stable_system,
    simulate_linear_gaussian,
    simulate_lorenz,
    simulate_pendulum,
)
from pyrossm.experiments.common import evaluate
from pyrossm.infer import fit
from pyrossm.lgssm import LinearGaussianSSM, kalman_filter

__all__ = ["build_synthetic", "make_synthetic_data", "run_synthetic", "synthetic_table"]

SYSTEMS = ("linear", "pendulum", "lorenz")
MODELS = ("dmm", "lstm_ssm")


def make_synthetic_data(system: str, num_train: int, num_test: int, num_steps: int,
                        seed: int = 0) -> dict:
    """``{"train": x, "test": x, "state_dim", "obs_dim", "exact_nll_per_frame" (linear only)}``.

    ``x`` has shape (N, num_steps, obs_dim) (time at dim -2), float32; the exact NLL per frame
    of the test set under the true linear system is computed in float64.
    """
    if system not in SYSTEMS:
        raise ValueError(f"system: expected one of {SYSTEMS}, got {system!r}")
    n = num_train + num_test
    out = {}
    if system == "linear":
        p = random_stable_system(2, 2, seed=seed, dtype=torch.float64)
        x = simulate_linear_gaussian(*p, num_steps=num_steps, num_sequences=n, seed=seed + 1).x
        test = x[num_train:]
        ll = kalman_filter(test, p.A, p.C, p.Q, p.R, p.init_mean, p.init_cov).log_likelihood
        out["exact_nll_per_frame"] = -float(ll.sum()) / test[..., 0].numel()
        out["state_dim"] = 2
    elif system == "pendulum":
        x = simulate_pendulum(n, num_steps, seed=seed, dtype=torch.float64).x
        out["state_dim"] = 2
    else:
        x = simulate_lorenz(n, num_steps, seed=seed, dtype=torch.float64).x
        out["state_dim"] = 3
    x = x.float()
    out.update(train=x[:num_train], test=x[num_train:], obs_dim=x.shape[-1])
    return out


def build_synthetic(kind: str, obs_dim: int, z_dim: int, hidden: int = 32):
    """``(model, guide)``: a small DMM or LSTM-SSM (Gaussian emission) + backward guide."""
    if kind not in MODELS:
        raise ValueError(f"kind: expected one of {MODELS}, got {kind!r}")
    # the DMM gets a first state of its own: the systems start from a spread wider than their noise
    spec = ModelSpec(
        "dmm" if kind == "dmm" else "lstm-ssm", obs_dim=obs_dim, state_dim=z_dim, hidden=hidden,
        emission="gaussian", initial="learned" if kind == "dmm" else "transition",
        missing_indicators=False,
    )
    return build(spec)


def best_lgssm_nll(train, test, state_dims=(1, 2, 3, 4), num_steps=100) -> dict:
    """Held-out exact NLL per frame of MLE-fitted LGSSMs for each state dim, and the best."""
    per_dim = {}
    for d in state_dims:
        torch.manual_seed(d)
        ssm = LinearGaussianSSM(d, train.shape[-1], dtype=torch.float64)
        ssm.fit(train.double(), num_steps=num_steps)
        with torch.no_grad():
            ll = ssm.log_prob(test.double())
        per_dim[d] = -float(ll.sum()) / test[..., 0].numel()
    best = min(per_dim, key=per_dim.get)
    return {"per_state_dim": per_dim, "best_state_dim": best, "best_nll_per_frame": per_dim[best]}


def run_synthetic(system: str = "linear", models=MODELS, *, num_train: int = 400,
                  num_test: int = 200, num_steps: int = 50, z_dim: int | None = None,
                  hidden: int = 32, epochs: int = 300, minutes: float | None = None,
                  batch_size: int = 32, lr: float = 3e-3, iwae_samples: int = 500,
                  lgssm_state_dims=(1, 2, 3, 4), seed: int = 0) -> dict:
    """Train the nonlinear models on synthetic data and compare with the Kalman baselines.

    Returns a dict with, per model, held-out ``iwae_nll_per_frame`` and ``neg_elbo_per_frame``
    and either ``gap_to_exact`` (linear: IWAE NLL − exact NLL, per frame) or
    ``margin_over_lgssm`` (nonlinear: best LGSSM NLL − IWAE NLL, per frame; positive = better).
    """
    data = make_synthetic_data(system, num_train, num_test, num_steps, seed)
    z_dim = z_dim or data["state_dim"]
    test = (data["test"], torch.ones(data["test"].shape[:2], dtype=torch.bool))
    baseline = {}
    if system == "linear":
        baseline["exact_nll_per_frame"] = data["exact_nll_per_frame"]
        reference = data["exact_nll_per_frame"]
    else:
        baseline["lgssm_mle"] = best_lgssm_nll(data["train"], data["test"], lgssm_state_dims)
        reference = baseline["lgssm_mle"]["best_nll_per_frame"]
    total_steps = epochs * math.ceil(num_train / batch_size)
    results = {}
    for kind in models:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide = build_synthetic(kind, data["obs_dim"], z_dim, hidden)
        t0 = time.perf_counter()
        history = fit(model, guide, data["train"], epochs=epochs, batch_size=batch_size, lr=lr,
                      lr_decay=0.1 ** (1 / total_steps),
                      annealing={"name": "linear", "start": 0.2,
                                 "num_steps": max(1, total_steps // 4)},
                      device="cpu", seed=seed, progress=False,
                      max_seconds=60.0 * minutes if minutes else None)
        res = evaluate(model, guide, test, iwae_samples=iwae_samples, elbo_samples=10,
                       batch_size=50, chunk_size=50)
        res.update(epochs_done=len(history), train_seconds=time.perf_counter() - t0,
                   final_train_neg_elbo_per_frame=history["train_neg_elbo_per_step"][-1])
        if system == "linear":
            res["gap_to_exact"] = res["iwae_nll_per_frame"] - reference
        else:
            res["margin_over_lgssm"] = reference - res["iwae_nll_per_frame"]
        results[kind] = res
    return {
        "experiment": f"synthetic {system} system: nonlinear SSMs vs Kalman baselines",
        "metrics": {"iwae_nll_per_frame": "IWAE NLL per step (held out)",
                    "neg_elbo_per_frame": "-ELBO per step (held out)",
                    "exact_nll_per_frame": "exact Kalman NLL per step (true parameters)",
                    "best_nll_per_frame": "exact NLL per step of the best MLE-fitted LGSSM"},
        "settings": {"system": system, "num_train": num_train, "num_test": num_test,
                     "num_steps": num_steps, "z_dim": z_dim, "hidden": hidden,
                     "epochs": epochs, "minutes": minutes, "batch_size": batch_size, "lr": lr,
                     "iwae_samples": iwae_samples, "seed": seed,
                     "threads": torch.get_num_threads()},
        "baseline": baseline,
        "results": results,
    }


def synthetic_table(payload) -> str:
    system = payload["settings"]["system"]
    base = payload["baseline"]
    if system == "linear":
        head = f"exact Kalman NLL/step (true params): {base['exact_nll_per_frame']:.4f}"
        col = "gap to exact"
        key = "gap_to_exact"
    else:
        b = base["lgssm_mle"]
        head = (f"best MLE LGSSM NLL/step (state dim {b['best_state_dim']}): "
                f"{b['best_nll_per_frame']:.4f}")
        col = "margin vs LGSSM"
        key = "margin_over_lgssm"
    lines = [head, f"{'model':<10} {'epochs':>6} {'-ELBO/step':>11} {'IWAE NLL/step':>14} "
             f"{col:>16}"]
    for name, r in payload["results"].items():
        lines.append(f"{name:<10} {r['epochs_done']:>6} {r['neg_elbo_per_frame']:>11.4f} "
                     f"{r['iwae_nll_per_frame']:>14.4f} {r[key]:>16.4f}")
    return "\n".join(lines)
