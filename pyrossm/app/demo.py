"""The main job of pyrossm (``pyrossm demo``): exact Kalman baselines against SVI, offline.

Three data sets, all available without a download:

* **Nile** (100 annual flows; the local-level model x_t = μ_t + ε_t, μ_{t+1} = μ_t + η_t):
  the exact log-likelihood at Durbin & Koopman's values (σ²_ε = 15099, σ²_η = 1469.1) with the
  approximate diffuse convention of statsmodels (init_cov = 10⁶, the first step's term dropped:
  −632.5377), the maximum-likelihood fit (L-BFGS on the exact Kalman log-likelihood), and two
  guides (the filtering LSTM encoder and the backward structured guide) trained by SVI against
  the MLE model, compared with the exact posterior (Kalman smoother) and exact evidence.
* **linear**: sequences simulated from a random stable 2-d LGSSM (2-d observations).
* **pendulum**: a noisy pendulum seen through (sin θ, cos θ) -- a nonlinear system.

Models fitted on the training sequences and scored on held-out ones:

* ``kalman-mle``: the LGSSM fitted by maximum likelihood, scored exactly (the Kalman baseline);
* ``kalman-true`` (linear only): the true system, scored exactly (the ceiling);
* ``lgssm-svi`` with the filtering LSTM guide and with the backward structured guide: the
  LGSSM's parameters *and* the guide learned by SVI; scored exactly (Kalman filter with the
  SVI-learned parameters), by IWAE and by the ELBO with the learned guide;
* ``lstm-ssm``: the LSTM-driven nonlinear SSM with the backward structured guide (IWAE, ELBO),
  trained with KL annealing (linear from 0.2 to 1 over the first quarter of the steps).

All log-likelihoods are **per observed time step** (nats, higher is better). ``exact`` is the
Kalman filter; ``IWAE`` is the importance-weighted bound with K guide draws (Burda et al.
2016), a stochastic lower bound of log p(x) that tightens as K grows; ``ELBO`` is the evidence
lower bound. ``Δ vs Kalman`` = (exact if available, else IWAE) − the ``kalman-mle`` exact value.

>>> # from pyrossm.app.demo import run_demo
>>> # report = run_demo("results/demo", quick=True)      # ~1 minute on 2 CPU cores
>>> # print(format_table(report))
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch

from pyrossm.build import ModelSpec, build
from pyrossm.datasets import (
    nile_tensor,
    random_stable_system,
    simulate_linear_gaussian,
    simulate_pendulum,
)
from pyrossm.lgssm import LinearGaussianSSM

__all__ = ["DemoConfig", "FULL", "QUICK", "format_table", "run_demo"]

NILE_DK_VARIANCES = {"obs": 15099.0, "level": 1469.1}  # Durbin & Koopman (2012), ch. 2
NILE_DIFFUSE_VARIANCE = 1e6  # statsmodels' approximate diffuse initialisation
NILE_DK_LOGLIK = -632.5377  # statsmodels UnobservedComponents('llevel').loglike at the values


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run. ``epochs``: SVI epochs on the simulated sets; ``nile_epochs``:
    SVI steps for the Nile guides (one sequence, one step per epoch)."""

    num_train: int = 96
    num_test: int = 64
    num_steps: int = 40
    batch_size: int = 32
    hidden: int = 32
    epochs: int = 120
    lstm_epochs: int = 250
    nile_epochs: int = 200
    lr: float = 1e-2
    final_lr: float = 1e-3
    iwae_samples: int = 100
    elbo_samples: int = 10
    mle_steps: int = 50


FULL = DemoConfig()
QUICK = DemoConfig(num_train=32, num_test=16, num_steps=25, batch_size=16, hidden=16, epochs=6,
                   lstm_epochs=6, nile_epochs=12, iwae_samples=16, elbo_samples=2, mle_steps=15)


def _lr_decay(cfg, steps):
    return (cfg.final_lr / cfg.lr) ** (1.0 / max(steps, 1))


def _per_step(total, x):
    """Per observed step (:func:`pyrossm.infer.observed_steps`: steps with any observation)."""
    from pyrossm.infer import observed_steps

    return float(total) / max(int(observed_steps(x).sum()), 1)


def _float64(model):
    """A fixed float64 CPU copy of an LGSSM (for exact Kalman computations)."""
    m = {k: v.detach().to("cpu", torch.float64) for k, v in model.matrices().items()}
    return LinearGaussianSSM.from_matrices(**m, dtype=torch.float64)


def _exact_ll(model, x):
    """Exact held-out log-likelihood per step of an LGSSM, evaluated in float64 on the CPU."""
    exact = _float64(model)
    with torch.no_grad():
        return _per_step(exact.log_prob(x.to("cpu", torch.float64)).sum(), x)


def _bounds(model, guide, x, cfg, device):
    from pyrossm.infer import evaluate

    ev = evaluate(model, guide, x, num_samples=cfg.iwae_samples, elbo_samples=cfg.elbo_samples,
                  device=device)
    return ev.log_likelihood_per_step, ev.elbo_per_step


def _svi(model, guide, train, cfg, epochs, device, seed, progress, batch_size=None,
         anneal=False):
    """SVI with ``pyrossm.infer.fit``; ``anneal``: KL factor linear from 0.2 to 1 over the first
    quarter of the steps (helps the nonlinear models leave the early posterior-collapse plateau)."""
    from pyrossm.infer import fit

    batch_size = batch_size or cfg.batch_size
    steps = epochs * math.ceil(len(train) / batch_size)
    annealing = None
    if anneal:
        annealing = {"name": "linear", "start": 0.2, "num_steps": max(1, steps // 4)}
    t0 = time.perf_counter()
    history = fit(model, guide, train, epochs=epochs, batch_size=batch_size, lr=cfg.lr,
                  lr_decay=_lr_decay(cfg, steps), annealing=annealing, device=device, seed=seed,
                  progress=progress)
    return history, time.perf_counter() - t0


def _guide(kind, obs_dim, state_dim, hidden):
    """The guide ``kind`` of the pyrossm builder (the demo's LGSSM models are built apart)."""
    return build(ModelSpec("lgssm", obs_dim, state_dim, hidden, guide=kind))[1]


def _lstm_ssm(obs_dim, z_dim, hidden):
    return build(ModelSpec("lstm-ssm", obs_dim, z_dim, hidden, guide="none"))[0]


def _row(dataset, model, fit, guide=None, exact=None, iwae=None, elbo=None, seconds=None,
         note=None):
    return {"dataset": dataset, "model": model, "fit": fit, "guide": guide,
            "exact_ll_per_step": exact, "iwae_ll_per_step": iwae, "elbo_per_step": elbo,
            "train_seconds": seconds, "note": note}


# --------------------------------------------------------------------------------- Nile
def _nile(cfg, device, seed, progress, log):
    x = nile_tensor(torch.float64)  # (1, 100, 1)
    dk = LinearGaussianSSM.from_matrices(
        A=1.0, C=1.0, Q=NILE_DK_VARIANCES["level"], R=NILE_DK_VARIANCES["obs"], init_mean=0.0,
        init_cov=NILE_DIFFUSE_VARIANCE, dtype=torch.float64)
    ll_dk = float(dk.filter(x).step_log_likelihoods[..., 1:].sum())
    log(f"[nile] exact log-likelihood at Durbin-Koopman's values (diffuse, burn 1): {ll_dk:.4f}")
    var = float(x.var())
    mle = LinearGaussianSSM.from_matrices(A=1.0, C=1.0, Q=var / 10, R=var / 2, init_mean=0.0,
                                          init_cov=NILE_DIFFUSE_VARIANCE, learn=("Q", "R"),
                                          dtype=torch.float64)
    t0 = time.perf_counter()
    mle.fit(x, num_steps=cfg.mle_steps, burn=1)
    mle_seconds = time.perf_counter() - t0
    with torch.no_grad():
        ll_mle = float(mle.filter(x).step_log_likelihoods[..., 1:].sum())
        sigma2_obs, sigma2_level = float(mle.R), float(mle.Q)
    log(f"[nile] MLE: sigma2_obs {sigma2_obs:.1f}, sigma2_level {sigma2_level:.2f}, "
        f"log-likelihood {ll_mle:.4f} ({mle_seconds:.1f}s)")
    result = {"loglik_dk_values": ll_dk, "loglik_dk_reference": NILE_DK_LOGLIK,
              "mle": {"sigma2_obs": sigma2_obs, "sigma2_level": sigma2_level, "loglik": ll_mle,
                      "seconds": mle_seconds},
              "convention": "init_mean 0, init_cov 1e6, first step's term dropped (burn 1)"}

    # SVI guides against the MLE model, on the standardized series (float32); log-densities are
    # mapped back to the original units by the Jacobian: log p(x) = log p(x') - T log(std).
    mean, std = float(x.mean()), float(x.std())
    xs = ((x - mean) / std).float()
    fixed = LinearGaussianSSM.from_matrices(
        A=1.0, C=1.0, Q=sigma2_level / std**2, R=sigma2_obs / std**2, init_mean=-mean / std,
        init_cov=NILE_DIFFUSE_VARIANCE / std**2)
    with torch.no_grad():
        smoothed = _float64(fixed).smooth(xs.double())
    exact_ll = _exact_ll(fixed, xs) - math.log(std)
    rows, bands, histories = [], {}, {}
    for kind in ("filtering-lstm", "backward-structured"):
        pyro.set_rng_seed(seed)
        guide = _guide(kind, 1, 1, cfg.hidden)
        history, secs = _svi(fixed, guide, xs, cfg, cfg.nile_epochs, device, seed, progress,
                             batch_size=1)
        iwae, lower = _bounds(fixed, guide, xs, cfg, device)
        rows.append(_row("nile (in-sample)", "lgssm (MLE, fixed)", "svi (guide only)", kind,
                         exact_ll, iwae - math.log(std), lower - math.log(std), secs))
        stats = guide.posterior_stats(xs.to(next(guide.parameters()).device))
        bands[kind] = (stats.means[0, :, 0].cpu() * std + mean, stats.scales[0, :, 0].cpu() * std)
        histories[kind] = history
        log(f"[nile] {kind}: IWAE {rows[-1]['iwae_ll_per_step']:.4f}, ELBO "
            f"{rows[-1]['elbo_per_step']:.4f}, exact {exact_ll:.4f} per step ({secs:.1f}s)")
    exact_band = (smoothed.smoothed_means[0, :, 0] * std + mean,
                  smoothed.smoothed_covs[0, :, 0, 0].sqrt() * std)
    return result, rows, {"x": x[0, :, 0], "exact": exact_band, "guides": bands,
                          "histories": histories,
                          # SVI ran on the standardised series: its -ELBO per step is in those
                          # units, so the exact reference of the training plot is too.
                          "exact_nll_standardized": -(exact_ll + math.log(std))}


# --------------------------------------------------------------------------- simulated
def _simulate(name, cfg, seed):
    n = cfg.num_train + cfg.num_test
    if name == "linear":
        params = random_stable_system(2, 2, seed=seed, dtype=torch.float64)
        sim = simulate_linear_gaussian(*params, num_steps=cfg.num_steps, num_sequences=n,
                                       seed=seed + 1)
    else:
        params = None
        sim = simulate_pendulum(n, cfg.num_steps, seed=seed, dtype=torch.float64)
    x = sim.x
    return params, x[: cfg.num_train], x[cfg.num_train:]


def _simulated(name, cfg, device, seed, progress, log, have_nonlinear):
    params, train, test = _simulate(name, cfg, seed)
    state_dim, obs_dim = 2, train.shape[-1]
    rows, extra = [], {"histories": {}, "test": test}
    if params is not None:
        true = LinearGaussianSSM.from_matrices(**params._asdict(), dtype=torch.float64)
        rows.append(_row(name, "kalman-true", "true parameters", exact=_exact_ll(true, test)))
    torch.manual_seed(seed)
    mle = LinearGaussianSSM(state_dim, obs_dim, dtype=torch.float64)
    t0 = time.perf_counter()
    mle.fit(train, num_steps=cfg.mle_steps)
    rows.append(_row(name, "kalman-mle", "exact MLE (L-BFGS)", exact=_exact_ll(mle, test),
                     seconds=time.perf_counter() - t0, note="the Kalman baseline"))
    extra["mle"] = mle
    log(f"[{name}] kalman-mle: exact {rows[-1]['exact_ll_per_step']:.4f} per step")
    train32, test32 = train.float(), test.float()
    if name == "linear":
        for kind in ("filtering-lstm", "backward-structured"):
            pyro.set_rng_seed(seed)
            model = LinearGaussianSSM(state_dim, obs_dim)
            guide = _guide(kind, obs_dim, state_dim, cfg.hidden)
            history, secs = _svi(model, guide, train32, cfg, cfg.epochs, device, seed, progress)
            iwae, lower = _bounds(model, guide, test32, cfg, device)
            rows.append(_row(name, "lgssm", "svi", kind, _exact_ll(model, test), iwae, lower,
                             secs))
            extra["histories"][f"lgssm/{kind}"] = history
            extra[f"svi/{kind}"] = (model, guide)
            log(f"[{name}] lgssm-svi/{kind}: exact {rows[-1]['exact_ll_per_step']:.4f}, IWAE "
                f"{iwae:.4f}, ELBO {lower:.4f} per step ({secs:.1f}s)")
    if have_nonlinear:
        pyro.set_rng_seed(seed)
        model = _lstm_ssm(obs_dim, state_dim, cfg.hidden)
        guide = _guide("backward-structured", obs_dim, state_dim, cfg.hidden)
        history, secs = _svi(model, guide, train32, cfg, cfg.lstm_epochs, device, seed, progress,
                             anneal=True)
        iwae, lower = _bounds(model, guide, test32, cfg, device)
        rows.append(_row(name, "lstm-ssm", "svi", "backward-structured", None, iwae, lower, secs))
        extra["histories"]["lstm-ssm/backward-structured"] = history
        extra["lstm-ssm"] = (model, guide)
        log(f"[{name}] lstm-ssm: IWAE {iwae:.4f}, ELBO {lower:.4f} per step ({secs:.1f}s)")
    return rows, extra


def _add_deltas(rows):
    base = {r["dataset"]: r["exact_ll_per_step"] for r in rows if r["model"] == "kalman-mle"}
    for r in rows:
        best = r["exact_ll_per_step"]
        best = r["iwae_ll_per_step"] if best is None else best
        b = base.get(r["dataset"])
        r["delta_vs_kalman"] = None if (b is None or best is None) else best - b
    return rows


def format_table(report) -> str:
    """The results table of a demo report (``run_demo``'s return value or its JSON)."""

    def f(v):
        return "      -" if v is None else f"{v:8.4f}"

    lines = [
        "Held-out log-likelihood per time step (nats, higher is better):",
        "  exact = Kalman filter (exact log p(x) of a linear-Gaussian model with its fitted "
        "parameters)",
        f"  IWAE  = importance-weighted bound, K={report['config']['iwae_samples']} guide draws "
        "(lower bound in expectation; tightens with K)",
        "  ELBO  = evidence lower bound with the trained guide",
        "  delta = (exact, else IWAE) minus the Kalman baseline (kalman-mle, exact) of the "
        "data set",
        "",
        f"{'dataset':18} {'model':18} {'fit':20} {'guide':20} {'exact':>8} {'IWAE':>8} "
        f"{'ELBO':>8} {'delta':>8}",
    ]
    for r in report["results"]:
        lines.append(f"{r['dataset']:18} {r['model']:18} {r['fit']:20} {r['guide'] or '-':20} "
                     f"{f(r['exact_ll_per_step'])} {f(r['iwae_ll_per_step'])} "
                     f"{f(r['elbo_per_step'])} {f(r.get('delta_vs_kalman'))}")
    nile = report.get("nile")
    if nile:
        lines += ["", f"Nile local-level model: exact log-likelihood at Durbin-Koopman's values "
                  f"{nile['loglik_dk_values']:.4f} (reference {nile['loglik_dk_reference']}; "
                  f"{nile['convention']})",
                  f"  MLE: sigma2_obs {nile['mle']['sigma2_obs']:.1f}, sigma2_level "
                  f"{nile['mle']['sigma2_level']:.2f}, log-likelihood {nile['mle']['loglik']:.4f}"]
    for gap in report.get("gaps", []):
        lines.append(f"GAP: {gap}")
    return "\n".join(lines)


def run_demo(out="results/demo", *, device="auto", quick=False, seed=0, progress=False,
             config: DemoConfig | None = None, plots=True, log=print, threads: int = 1) -> dict:
    """Run the demo: fit every model, print progress through ``log``, write ``report.json``
    (and PNG plots unless ``plots=False``) into ``out``; return the report (a dict).

    ``quick`` uses :data:`QUICK` sizes (about a minute on 2 CPU cores; for tests), otherwise
    :data:`FULL` (a few minutes); ``config`` overrides both. ``device``: ``"auto"``, ``"cpu"``
    or ``"cuda"`` for SVI (exact Kalman computations run in float64 on the CPU). ``threads``:
    torch CPU threads while it runs (default 1: the demo's tensors are small, and extra threads
    only wait on each other, badly so on a busy machine).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(out, device, quick, seed, progress, config, plots, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(out, device, quick, seed, progress, config, plots, log):
    from pyrossm.infer import resolve_device

    cfg = config or (QUICK if quick else FULL)
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was requested but no CUDA device is available")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    gaps = []
    try:
        import pyrossm.nonlinear  # noqa: F401

        have_nonlinear = True
    except ImportError as e:
        have_nonlinear = False
        gaps.append(f"pyrossm.nonlinear is not available ({e}); the LSTM-driven SSM was not run")
    pyro.set_rng_seed(seed)
    nile, rows, nile_extra = _nile(cfg, dev, seed, progress, log)
    extras = {"nile": nile_extra}
    for name in ("linear", "pendulum"):
        r, extras[name] = _simulated(name, cfg, dev, seed, progress, log, have_nonlinear)
        rows += r
    report = {
        "command": "pyrossm demo", "quick": bool(quick and config is None), "seed": seed,
        "device": str(dev), "config": asdict(cfg), "nile": nile, "results": _add_deltas(rows),
        "gaps": gaps,
        "histories": {f"{ds}/{k}": h.to_dict() for ds in ("nile", "linear", "pendulum")
                      for k, h in extras[ds]["histories"].items()},
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__,
                     "python": platform.python_version()},
    }
    if plots:
        report["plots"] = _write_plots(out, extras, cfg)
    report["seconds"] = time.perf_counter() - t_start
    report["cpu_seconds"] = time.process_time() - cpu_start
    with open(out / "report.json", "w") as fh:
        json.dump(report, fh, indent=1)
    log("")
    log(format_table(report))
    log(f"\nwrote {out / 'report.json'}" + (f" and {len(report['plots'])} plots" if plots else "")
        + f" in {report['seconds']:.0f}s ({report['cpu_seconds']:.0f}s of CPU time)")
    return report


def _write_plots(out, extras, cfg):
    import matplotlib

    if "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyrossm import plotting

    written = []

    def save(fig, name):
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    nile = extras["nile"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    years = torch.arange(1871, 1871 + len(nile["x"]))
    plotting.plot_posterior_comparison(
        torch.stack([nile["exact"][0]], -1), torch.stack([nile["exact"][1]], -1),
        {k: (m[:, None], s[:, None]) for k, (m, s) in nile["guides"].items()},
        observations=nile["x"], time=years, ax=ax, exact_label="exact (Kalman smoother, MLE)")
    ax.set_title("Nile: posterior of the level, 90% bands: exact vs SVI guides")
    ax.set_xlabel("year")
    save(fig, "nile_posterior.png")
    save(plotting.plot_training_curves(nile["histories"],
                                       reference={"exact -log p(x) per step (standardised)":
                                                  nile["exact_nll_standardized"]}),
         "nile_training.png")

    lin = extras["linear"]
    test = lin["test"]
    panels = [k for k in ("filtering-lstm", "backward-structured") if f"svi/{k}" in lin]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
        for ax, kind in zip(axes[0], panels):
            model, guide = lin[f"svi/{kind}"]
            x0 = test[:1].float()
            with torch.no_grad():
                sm = _float64(model).smooth(x0.double())
            stats = guide.posterior_stats(x0.to(next(guide.parameters()).device))
            if kind == "filtering-lstm":
                em, ev, lab = sm.filtered_means[0], sm.filtered_covs[0], "exact filter"
            else:
                em, ev, lab = sm.smoothed_means[0], sm.smoothed_covs[0], "exact smoother"
            plotting.plot_posterior_comparison(
                em, torch.diagonal(ev, dim1=-2, dim2=-1).sqrt(),
                {f"guide: {kind}": (stats.means[0].cpu(), stats.scales[0].cpu())}, ax=ax,
                exact_label=f"{lab} (SVI-learned LGSSM)")
            ax.set_title(f"z[0]: {kind} guide vs {lab}")
        fig.suptitle("simulated LGSSM (held-out sequence): guide vs exact posterior, 90% bands")
        fig.tight_layout()
        save(fig, "linear_posterior.png")
    if lin["histories"]:
        save(plotting.plot_training_curves(lin["histories"]), "linear_training.png")

    pend = extras["pendulum"]
    x = pend["test"][:1]
    split = max(cfg.num_steps * 3 // 5, 2)
    horizon = cfg.num_steps - split
    past, future = x[0, :split], x[0, split:]
    models = [("kalman-mle", None)]
    if "lstm-ssm" in pend:
        models.append(("lstm-ssm", pend["lstm-ssm"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.5), squeeze=False)
    torch.manual_seed(0)
    for ax, (name, pair) in zip(axes[0], models):
        if pair is None:
            fc = pend["mle"].forecast(x[:, :split], horizon, num_samples=200)
            plotting.plot_forecast(past, means=fc.means[0], covs=fc.covs[0], future=future, ax=ax,
                                   label="Kalman MLE forecast")
        else:
            model, guide = pair
            dev = next(guide.parameters()).device
            fc = model.forecast(x[:, :split].float().to(dev), horizon, num_samples=200,
                                guide=guide)
            plotting.plot_forecast(past, samples=fc.samples[:, 0].cpu(), future=future, ax=ax,
                                   label="LSTM-SSM forecast", num_paths=3)
        ax.set_title(f"pendulum, sin(theta): {name}")
    save(fig, "pendulum_forecast.png")
    if pend["histories"]:
        save(plotting.plot_training_curves(pend["histories"]), "pendulum_training.png")
    return written
