"""Guides on an LGSSM with missing entries: posterior gap and speed, conjugate vs structured.

Setting (issue 14): state 3, obs 2, a decaying rotation plus a decaying third state, correlated
state and observation noise, ``T = 60``; the model is fixed at the truth, so
``log p(x) - ELBO = KL(q || p(z | x))`` is the guide's gap, with the exact ``log p(x)`` from the
Kalman filter. Entries of ``x`` are set to NaN independently with probability 0, 0.15, 0.40.
Each guide is trained by :func:`pyrossm.infer.fit` (same settings for both) and evaluated on
held-out sequences: ELBO gap (100 draws) and IWAE gap (``K`` draws), nats per step, with
standard errors over sequences; speed as training seconds per epoch and milliseconds per
forward+backward of one batch, in the same run (ratios conjugate / structured).

Run from the repository root (about 10 minutes on one core)::

    python benchmarks/guides.py            # writes benchmarks/results/guides.json
    python benchmarks/guides.py --quick    # smaller, for a smoke test
    python benchmarks/guides.py --speed-only   # untrained guides, time per step only
                                               # (benchmarks/results/guides_speed.json)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyrossm.guides import StructuredGuide  # noqa: E402
from pyrossm.guides.conjugate import ConjugateGuide  # noqa: E402
from pyrossm.infer import elbo, fit, log_likelihood  # noqa: E402
from pyrossm.infer.handlers import elbo_objective, elbo_traces  # noqa: E402
from pyrossm.lgssm import LinearGaussianSSM  # noqa: E402


def truth() -> LinearGaussianSSM:
    """State 3 (rotation by 0.3 rad with decay 0.95, and a state decaying at 0.7), obs 2."""
    c, s = math.cos(0.3), math.sin(0.3)
    A = [[0.95 * c, -0.95 * s, 0.0], [0.95 * s, 0.95 * c, 0.0], [0.0, 0.0, 0.7]]
    C = [[1.0, 0.5, -0.3], [0.2, 1.0, 0.8]]
    Q = [[0.3, 0.1, 0.05], [0.1, 0.2, 0.0], [0.05, 0.0, 0.25]]
    R = [[0.5, 0.3], [0.3, 0.4]]
    return LinearGaussianSSM.from_matrices(A=A, C=C, Q=Q, R=R, dtype=torch.float64)


def data(ssm, T, num_train, num_test, missing, seed=0):
    pyro.set_rng_seed(seed)
    _, x_train = ssm.sample(T, num_samples=num_train)
    _, x_test = ssm.sample(T, num_samples=num_test)
    for x in (x_train, x_test):
        x[torch.rand(x.shape) < missing] = float("nan")
    return x_train, x_test


def make_guide(kind, ssm):
    if kind == "conjugate":
        return ConjugateGuide(2, 3, transition=ssm).double()
    return StructuredGuide(2, 3, hidden_dim=8, direction="backward", combiner="linear",
                           cell="linear").double()


def gap(exact, estimate, T):
    d = (exact - estimate) / T
    return d.mean().item(), (d.std() / math.sqrt(d.numel())).item()


def train_and_measure(kind, ssm, x_train, x_test, epochs, num_iwae, seed=0):
    pyro.set_rng_seed(seed)
    guide = make_guide(kind, ssm)
    hist = fit(ssm, guide, x_train, epochs=epochs, batch_size=16, lr=0.02, lr_decay=0.999,
               num_particles=4, device="cpu", seed=seed, progress=False)
    T = x_test.shape[1]
    exact = ssm.log_prob(x_test)
    e_gap, e_se = gap(exact, elbo(ssm, guide, x_test, num_samples=100), T)
    i_gap, i_se = gap(exact, log_likelihood(ssm, guide, x_test, num_samples=num_iwae), T)
    seconds = sum(r["seconds"] for r in hist.records) / len(hist.records)
    return guide, dict(elbo_gap=e_gap, elbo_gap_se=e_se, iwae_gap=i_gap, iwae_gap_se=i_se,
                       seconds_per_epoch=seconds)


def step_ms(guides, ssm, x, repeats):
    """Median milliseconds of one forward + backward of the 4-particle objective, per guide;
    the guides take turns, so that a change in the machine's load affects them alike."""
    times = {name: [] for name in guides}
    for _ in range(repeats):
        for name, guide in guides.items():
            t0 = time.perf_counter()
            obj = elbo_objective(*elbo_traces(ssm.model, guide, x, None, 4), 4)
            obj.surrogate.backward()
            times[name].append(time.perf_counter() - t0)
            guide.zero_grad()
    return {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}


def speed_only(ssm, T, num_train, out, repeats=60):
    """Milliseconds per 4-particle step (batch 16) of freshly built guides, interleaved."""
    rows = []
    for missing in (0.0, 0.15, 0.40):
        x_train, _ = data(ssm, T, num_train, 1, missing)
        guides = {kind: make_guide(kind, ssm) for kind in ("conjugate", "structured")}
        ms = step_ms(guides, ssm, x_train[:16], repeats)
        rows.append(dict(missing=missing, **{f"{k}_ms": v for k, v in ms.items()},
                         ratio=ms["conjugate"] / ms["structured"]))
        print(f"missing {missing:.2f}: conjugate {ms['conjugate']:.1f} ms, structured "
              f"{ms['structured']:.1f} ms per step, ratio {rows[-1]['ratio']:.2f}")
    with open(out, "w") as f:
        json.dump(dict(settings=dict(T=T, batch=16, num_particles=4, repeats=repeats,
                                     threads=1), torch=torch.__version__, pyro=pyro.__version__,
                       load_average=os.getloadavg(), results=rows), f, indent=2)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "guides.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    T, num_train, num_test, epochs, num_iwae = (60, 64, 32, 100, 1000) if not args.quick else \
        (30, 16, 8, 10, 100)
    ssm = truth()
    if args.speed_only:
        return speed_only(ssm, T, num_train, args.out.replace("guides.json", "guides_speed.json"))
    results = []
    print(f"{'missing':>8} {'guide':>10} {'ELBO gap':>16} {'IWAE gap':>16} {'s/epoch':>8} "
          f"{'ms/step':>8}")
    for missing in (0.0, 0.15, 0.40):
        x_train, x_test = data(ssm, T, num_train, num_test, missing)
        trained = {}
        for kind in ("conjugate", "structured"):
            trained[kind], res = train_and_measure(kind, ssm, x_train, x_test, epochs, num_iwae)
            res.update(missing=missing, guide=kind)
            results.append(res)
        ms = step_ms(trained, ssm, x_train[:16], 5 if args.quick else 40)
        for res in results[-2:]:
            kind = res["guide"]
            res["ms_per_step"] = ms[kind]
            print(f"{missing:8.2f} {kind:>10} {res['elbo_gap']:8.4f}+-{res['elbo_gap_se']:.4f} "
                  f"{res['iwae_gap']:8.4f}+-{res['iwae_gap_se']:.4f} "
                  f"{res['seconds_per_epoch']:8.3f} {res['ms_per_step']:8.2f}")
    ratios = {}
    for missing in (0.0, 0.15, 0.40):
        a, b = (next(r for r in results if r["missing"] == missing and r["guide"] == k)
                for k in ("conjugate", "structured"))
        ratios[str(missing)] = dict(seconds_per_epoch=a["seconds_per_epoch"]
                                    / b["seconds_per_epoch"],
                                    ms_per_step=a["ms_per_step"] / b["ms_per_step"])
        print(f"missing {missing:.2f}: conjugate / structured time per epoch "
              f"{ratios[str(missing)]['seconds_per_epoch']:.2f}, per step "
              f"{ratios[str(missing)]['ms_per_step']:.2f}")
    payload = dict(
        settings=dict(T=T, num_train=num_train, num_test=num_test, epochs=epochs,
                      num_iwae=num_iwae, batch_size=16, lr=0.02, lr_decay=0.999,
                      num_particles=4, threads=1, quick=args.quick),
        torch=torch.__version__, pyro=pyro.__version__, machine=platform.machine(),
        results=results, ratios_conjugate_over_structured=ratios)
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
