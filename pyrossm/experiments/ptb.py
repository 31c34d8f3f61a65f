"""Penn Treebank experiment: LSTM language model vs sequence VAE under three training regimes.

Runs (Bowman et al. 2016, "Generating sentences from a continuous space"; Fu et al. 2019)::

    lm  LSTMLanguageModel (the VAE's decoder without z)
    a   SequenceVAE, no KL annealing, no word dropout      (expected: posterior collapse, KL ≈ 0)
    b   SequenceVAE, sigmoid KL annealing + word dropout   (Bowman et al.)
    c   SequenceVAE, cyclical KL annealing + free bits     (Fu et al. 2019; Kingma et al. 2016)

Each run trains with :func:`pyrossm.infer.fit` (length-bucketed batches) for ``--epochs``, or
until ``--max-steps`` optimisation steps or ``--train-minutes`` (whichever comes first; keep
``--anneal-steps`` below the step budget so that every run ends with β = 1), then reports on the
test set:

* ``test.nll_elbo``: −ELBO per sentence (nats), one sample of q (full test set);
* ``subset.nll_iwae``: importance-weighted NLL with ``--iwae-samples`` samples on the first
  ``--iwae-sentences`` test sentences (the LM's exact NLL on the same sentences alongside);
* perplexities ``exp(Σ NLL / Σ tokens)`` (``<eos>`` counted), KL, I(x; z), active units;
* prior samples, reconstructions and one homotopy (VAE runs); training tokens per second (wall
  clock and per CPU-second).

Results go to a JSON file per invocation; ``--table FILES`` merges JSON files into a Markdown table.

The default CPU configuration (8 epochs, ≈ 50 min per run on an idle core; four processes, one
thread each)::

    for r in lm a b c; do OMP_NUM_THREADS=1 python -m pyrossm.experiments.ptb --runs $r \
        --data-dir ../shared/data --output benchmarks/results/ptb_$r.json & done; wait
    python -m pyrossm.experiments.ptb --table benchmarks/results/ptb_{lm,a,b,c}.json \
        --output benchmarks/results/ptb.json

The runs recorded in ``benchmarks/results/ptb.json`` (merged from ``ptb_lm_27min.json``,
``ptb_a_2000steps.json``, ``ptb_b_2000steps.json``, ``ptb_c_perdim035.json``; shared CPU,
``--iwae-samples 100 --iwae-sentences 500``) used ``--train-minutes 27`` for the LM,
``--max-steps 2000 --anneal-steps 1500`` for (a) and (b), and ``--max-steps 5316
--train-minutes 45`` for (c). ``--config paper`` is a GPU-sized configuration (bigger networks,
10 epochs, K = 500 on the whole test set).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import pyro
import torch

from pyrossm.build import ModelSpec, build
from pyrossm.seqvae.decoding import homotopy, reconstruct, sample_prior, to_text
from pyrossm.seqvae.metrics import evaluate
from pyrossm.seqvae.vocab import Vocabulary, pad_batch

CONFIGS = {
    # Sized for tokens/s on one shared CPU thread: the 10k-way softmax dominates the cost.
    # ~2,500 training tokens per CPU-second (one thread): 8 epochs ≈ 50 min on an idle core.
    "cpu": dict(embed_dim=128, hidden_dim=128, latent_dim=16, batch_size=32, lr=2e-3, epochs=8,
                max_steps=None, anneal_steps=3000, train_minutes=60.0, iwae_samples=100,
                iwae_sentences=1000, eval_batch_size=20),
    "paper": dict(embed_dim=300, hidden_dim=512, latent_dim=32, batch_size=32, lr=1e-3,
                  epochs=10, max_steps=None, anneal_steps=10000, train_minutes=float("inf"),
                  iwae_samples=500,
                  iwae_sentences=None, eval_batch_size=20),
}
RUNS = {
    "lm": dict(kind="lm", annealing=None, word_dropout=0.0, free_bits=None),
    "a": dict(kind="vae", annealing=None, word_dropout=0.0, free_bits=None),
    "b": dict(kind="vae", annealing="sigmoid", word_dropout=0.25, free_bits=None),
    # free bits per latent coordinate (0.35 nats each, 5.6 nats in all for the CPU config's
    # 16 dims): a threshold of 4 nats on the total KL let 3 coordinates carry all of it; 0.25
    # nats per coordinate ended below 3 nats of KL.
    "c": dict(kind="vae", annealing="cyclical", word_dropout=0.0, free_bits=0.35,
              free_bits_per="dimension"),
}


class _Progress:
    """Forward pre-hook on the guide: counts training steps and tokens and logs progress every
    ``log_every`` steps (:func:`fit`'s ``max_steps``/``max_seconds`` stop the training)."""

    def __init__(self, log=None, log_every=50):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.steps = self.tokens = 0
        self.log, self.log_every = log, log_every

    def __call__(self, module, args, kwargs=None):
        if not module.training:
            return
        mask = (kwargs or {}).get("mask")
        self.steps += 1
        self.tokens += int(mask.sum()) if mask is not None else args[0].numel()
        if self.log is not None and self.steps % self.log_every == 0:
            self.log(f"step {self.steps}: {self.tokens} tokens, {self.elapsed:.0f}s "
                     f"({self.tokens / self.elapsed:.0f} tokens/s)")

    @property
    def elapsed(self):
        return time.perf_counter() - self.start

    @property
    def cpu_seconds(self):
        return time.process_time() - self.cpu_start


def annealing_spec(name, anneal_steps):
    if name is None:
        return None
    if name == "sigmoid":  # β = 1/2 at anneal_steps/2, ≈ 1 (0.993) at anneal_steps
        return {"name": "sigmoid", "x0": anneal_steps / 2, "k": 10.0 / anneal_steps}
    if name == "cyclical":
        return {"name": "cyclical", "total_steps": anneal_steps, "num_cycles": 4, "ratio": 0.5}
    if name == "linear":
        return {"name": "linear", "num_steps": anneal_steps}
    raise ValueError(f"annealing: unknown schedule {name!r}")


def build_run(run, vocab, cfg):
    """``(model, guide)`` of run ``run`` (a key of :data:`RUNS`)."""
    spec = RUNS[run]
    return build(ModelSpec(
        "lm" if spec["kind"] == "lm" else "seqvae", state_dim=cfg["latent_dim"],
        hidden=cfg["hidden_dim"], embed_dim=cfg["embed_dim"],
        word_dropout=spec["word_dropout"], z_to_inputs=True,
    ), vocab)


def _batches(vocab, sentences, batch_size):
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        out.append(pad_batch(vocab, [sentences[j] for j in idx], index=idx))
    return out


def run_one(run, cfg, data_dir, seed, log=print, save=None):
    from pyrossm.datasets.ptb import load_ptb
    from pyrossm.infer import fit, make_schedule

    train, test = load_ptb("train", data_dir), load_ptb("test", data_dir)
    if cfg.get("max_train_sentences"):
        train = random.Random(seed).sample(train, min(cfg["max_train_sentences"], len(train)))
    if cfg.get("max_test_sentences"):
        test = test[: cfg["max_test_sentences"]]
    vocab = Vocabulary.from_corpus(train)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide = build_run(run, vocab, cfg)
    spec = RUNS[run]
    full = pad_batch(vocab, train)
    counter = _Progress(log=lambda m: log(f"[{run}] {m}"))
    hook = guide.register_forward_pre_hook(counter, with_kwargs=True)
    anneal = annealing_spec(spec["annealing"], cfg["anneal_steps"])
    log(f"[{run}] vocab {len(vocab)}, {len(train)} train sentences, config {cfg}, run {spec}")
    history = None
    try:
        if cfg.get("load_dir"):  # evaluate saved parameters, no training
            state = torch.load(Path(cfg["load_dir"]) / f"ptb_{run}.pt")
            model.load_state_dict(state["model"])
            guide.load_state_dict(state["guide"])
        else:
            history = fit(
                model, guide, (full.x, full.mask), epochs=cfg["epochs"],
                batch_size=cfg["batch_size"], lr=cfg["lr"], annealing=anneal,
                free_bits=spec["free_bits"],
                free_bits_per=spec.get("free_bits_per", "sequence"), device="cpu", seed=seed,
                bucket=True,
                progress=False, clip_norm=10.0, max_steps=cfg.get("max_steps"),
                max_seconds=cfg["train_minutes"] * 60.0,
                callbacks=[lambda r: log(f"[{run}] epoch {r['epoch']}: -elbo/seq "
                                         f"{r['train_neg_elbo']:.2f} kl {r['train_kl']:.2f} "
                                         f"beta {r['beta']:.3f}")])
    finally:
        hook.remove()
    train_seconds, train_cpu = counter.elapsed, counter.cpu_seconds
    stop_reason = history.stop_reason if history is not None else None
    if save is not None and not cfg.get("load_dir"):
        save(run, model, guide)
    final_beta = make_schedule(anneal)(max(counter.steps - 1, 0))
    log(f"[{run}] trained {counter.steps} steps, {counter.tokens} tokens in {train_seconds:.0f}s "
        f"({counter.tokens / max(train_seconds, 1e-9):.0f} tokens/s); stopped early: "
        f"{stop_reason}; final beta {final_beta:.3f}")

    result = dict(
        run=run, settings=spec, config={k: (None if v == float("inf") else v)
                                        for k, v in cfg.items()},
        seed=seed, vocab_size=len(vocab),
        train=dict(steps=counter.steps, tokens=counter.tokens, seconds=train_seconds,
                   tokens_per_second=counter.tokens / max(train_seconds, 1e-9),
                   cpu_seconds=train_cpu,
                   tokens_per_cpu_second=counter.tokens / max(train_cpu, 1e-9),
                   epochs_equivalent=counter.tokens / int(full.mask.sum()),
                   stopped_early=stop_reason, final_beta=final_beta,
                   history=history.to_dict()["records"] if history is not None else None,
                   threads=torch.get_num_threads()),
    )
    model.eval()
    guide.eval()
    t0 = time.perf_counter()
    if not cfg.get("skip_full_test"):
        test_batches = [(b.x, b.mask) for b in _batches(vocab, test, cfg["eval_batch_size"])]
        ev = evaluate(model, guide, test_batches, num_samples=1)
        result["test"] = dict(ev._asdict(), nll="nll_elbo: -ELBO per sentence (1 sample of q; "
                              "exact NLL for the LM); nll_iwae here uses K=1")
        log(f"[{run}] test (full, K=1): {ev}")
    start = cfg.get("iwae_start") or 0
    stop = None if cfg["iwae_sentences"] is None else start + cfg["iwae_sentences"]
    subset = test[start:stop]
    sub_batches = [(b.x, b.mask) for b in _batches(vocab, subset, cfg["eval_batch_size"])]
    K = cfg["iwae_samples"]
    ev_sub = evaluate(model, guide, sub_batches, num_samples=K)
    result["subset"] = dict(ev_sub._asdict(), sentences=len(subset), first_sentence=start,
                            nll=f"nll_iwae: importance-weighted NLL per sentence, K={K} "
                                f"(exact NLL for the LM)")
    log(f"[{run}] test subset ({len(subset)} sentences, K={K}): {ev_sub}")
    result["eval_seconds"] = time.perf_counter() - t0

    if cfg.get("skip_full_test"):
        return result, model, guide
    torch.manual_seed(seed)
    if spec["kind"] == "vae":
        result["prior_samples_greedy"] = [" ".join(s) for s in
                                          to_text(vocab, sample_prior(model, 8, method="greedy"))]
    result["prior_samples_t1"] = [" ".join(s) for s in to_text(
        vocab, sample_prior(model, 8, temperature=1.0, method="sample"))]
    if spec["kind"] == "vae":
        pick = [s for s in test if 6 <= len(s) <= 14][:6]
        b = pad_batch(vocab, pick)
        rec_g = to_text(vocab, reconstruct(model, guide, b.x, b.mask, method="greedy"))
        rec_b = to_text(vocab, reconstruct(model, guide, b.x, b.mask, method="beam"))
        result["reconstructions"] = [
            {"input": " ".join(s), "greedy": " ".join(g), "beam5": " ".join(r)}
            for s, g, r in zip(pick, rec_g, rec_b)
        ]
        a, c = pad_batch(vocab, pick[:1]), pad_batch(vocab, pick[1:2])
        hom = {m: to_text(vocab, homotopy(model, guide, a.x, c.x, steps=7, method=m,
                                          mask_a=a.mask, mask_b=c.mask))
               for m in ("greedy", "beam")}
        result["homotopy"] = {"from": " ".join(pick[0]), "to": " ".join(pick[1]),
                              "greedy": [" ".join(s) for s in hom["greedy"]],
                              "beam5": [" ".join(s) for s in hom["beam"]]}
    return result, model, guide


def table(results):
    lines = [
        "| run | settings | NLL −ELBO (full test) | PPL (−ELBO) | NLL IWAE (subset) | "
        "PPL (IWAE) | KL | MI | AU | train tokens/s | train time | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r["run"] != "lm"):
        if "test" not in r:  # a --skip-full-test re-evaluation: no full-test row
            continue
        s, t, u, tr = r["settings"], r["test"], r["subset"], r["train"]
        desc = (f"{s['kind']}, anneal={s['annealing']}, wdrop={s['word_dropout']}, "
                f"free_bits={s['free_bits']}"
                + (f" per {s['free_bits_per']}" if s.get("free_bits_per") else ""))
        lines.append(
            f"| {r['run']} | {desc} | {t['nll_elbo']:.2f} | {t['perplexity_elbo']:.1f} | "
            f"{u['nll_iwae']:.2f} (K={u['iwae_samples'] or 'exact'}, {u['sentences']} sent.) | "
            f"{u['perplexity_iwae']:.1f} | {t['kl']:.2f} | {t['mutual_info']:.2f} | "
            f"{t['active_units']} | {tr['tokens_per_second']:.0f} | {tr['seconds'] / 60:.1f} min | "
            f"{tr['epochs_equivalent']:.2f} |"
        )
    lines.append("")
    lines.append("NLL in nats per sentence; −ELBO uses one sample of q on the full test set; IWAE "
                 "uses K samples on the first test sentences; the LM's NLL is exact in both "
                 "columns. PPL = exp(Σ NLL / Σ tokens), <eos> counted.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyrossm.experiments.ptb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="lm,a,b,c", help="comma-separated subset of lm,a,b,c")
    p.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    p.add_argument("--data-dir", default=os.environ.get("PYROSSM_DATA_DIR"),
                   help="directory with ptb.{train,valid,test}.txt (default $PYROSSM_DATA_DIR)")
    p.add_argument("--output", default="benchmarks/results/ptb.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    for key in ("epochs", "anneal_steps", "iwae_samples", "iwae_sentences", "batch_size",
                "max_train_sentences", "max_test_sentences", "max_steps", "iwae_start"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    p.add_argument("--skip-full-test", action="store_true",
                   help="evaluate only the IWAE subset (with --load-dir: a cheap re-evaluation)")
    p.add_argument("--train-minutes", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--save-dir", default=None, help="save model/guide state_dicts here")
    p.add_argument("--load-dir", default=None,
                   help="evaluate the state_dicts saved there by --save-dir (no training)")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="only merge these result files into a Markdown table (printed and "
                        "written next to --output as .md)")
    args = p.parse_args(argv)

    if args.table:
        results = []
        for f in args.table:
            data = json.loads(Path(f).read_text())
            results.extend(data["results"])
        text = table(results)
        print(text)
        Path(args.output).with_suffix(".md").write_text(text + "\n")
        Path(args.output).write_text(json.dumps({"results": results}, indent=1))
        return 0

    torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS[args.config])
    for key in ("epochs", "anneal_steps", "iwae_samples", "iwae_sentences", "batch_size",
                "train_minutes", "lr", "max_train_sentences", "max_test_sentences", "load_dir",
                "max_steps", "iwae_start", "skip_full_test"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        p.error(f"--runs: unknown run(s) {bad}; choose from {sorted(RUNS)}")
    random.seed(args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    def save(run, model, guide):
        if args.save_dir:
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "guide": guide.state_dict()},
                       Path(args.save_dir) / f"ptb_{run}.pt")

    for run in runs:
        res, model, guide = run_one(run, cfg, args.data_dir, args.seed, log, save)
        results.append(res)
        out.write_text(json.dumps({"results": results}, indent=1, default=str))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
