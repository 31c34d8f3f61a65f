"""Training runs on disk, as used by the ``pyrossm`` command line (train / evaluate / sample /
forecast).

A run directory holds ``run.json`` (what to rebuild: model kind, sizes, data source, the
standardization of the data, the vocabulary file), ``model.pt`` (model and guide state dicts),
``history.json`` (the SVI :class:`pyrossm.infer.History`), ``checkpoints/`` (for ``--resume``)
and ``metrics.json`` (from evaluation).

Data sources (:func:`load_data`): ``"nile"``, ``"jsb"`` (88-key piano rolls), ``"ptb"`` (token
ids) or a path to a ``.csv``/``.npy``/``.npz`` file of shape ``(time, features)`` or
``(sequences, time, features)`` (NaN = missing). Real-valued data are standardized per feature
for training (means and scales stored in ``run.json``); every log-likelihood the command line
reports is mapped back to the data's original units (``log p(x) = log p(x') − Σ log scale`` over
the observed entries).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from pyrossm.build import ModelNotAvailable, ModelSpec
from pyrossm.build import build as build_from_spec

__all__ = ["MODELS", "DataSplits", "ModelNotAvailable", "build", "load_data", "load_run",
           "save_run", "standardize", "write_json"]

MODELS = ("lgssm", "lstm-ssm", "dmm", "seqvae")
GUIDES = ("backward", "forward", "bidirectional", "filtering-lstm")
BUILTIN = ("nile", "jsb", "ptb")


class DataSplits(NamedTuple):
    """``train``/``test``: ``(x, mask)`` pairs; ``x (N, T, D)`` float (time at dim -2) or
    ``(N, T)`` long token ids; ``mask (N, T)`` bool. ``kind``: ``"real"``, ``"binary"`` or
    ``"tokens"``. ``test_name`` says what the held-out part is (e.g. ``"test split"`` or
    ``"in-sample"``). ``vocab``: the :class:`~pyrossm.seqvae.vocab.Vocabulary` for tokens."""

    train: tuple
    test: tuple
    kind: str
    test_name: str
    vocab: object = None


def _mask_of(x):
    """Steps with at least one observed entry; NaN-only steps at the end are padding."""
    observed = ~torch.isnan(x).all(-1)
    # right padding = trailing steps with no observation at all
    last = torch.where(observed.any(-1), observed.shape[-1] - observed.flip(-1).int().argmax(-1),
                       torch.zeros_like(observed[:, 0], dtype=torch.long))
    return torch.arange(x.shape[1]) < last.unsqueeze(-1)


def standardize(x, stats=None):
    """``(x − mean) / scale`` per feature (NaN-aware); ``stats`` = ``{"mean", "scale"}`` lists, or
    None to compute them from ``x (N, T, D)``. Returns ``(x_std, stats)``."""
    if stats is None:
        flat = x.reshape(-1, x.shape[-1]).double()
        mean = torch.nanmean(flat, 0)
        var = torch.nanmean((flat - mean) ** 2, 0)
        scale = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
        if torch.isnan(mean).any():
            raise ValueError("data: expected at least one observed value per feature, got a column "
                             "that is all missing (NaN)")
        stats = {"mean": mean.tolist(), "scale": scale.tolist()}
    mean = torch.tensor(stats["mean"], dtype=x.dtype)
    scale = torch.tensor(stats["scale"], dtype=x.dtype)
    return (x - mean) / scale, stats


def log_jacobian(x, mask, stats) -> float:
    """``Σ log scale_j`` over the observed entries of ``x`` within ``mask``: subtract it from a
    log-density of standardized data to get the one in original units."""
    if stats is None:
        return 0.0
    log_scale = torch.tensor(stats["scale"], dtype=torch.float64).log()
    observed = (~torch.isnan(x)) & mask.unsqueeze(-1)
    return float((observed.double() * log_scale).sum())


def _split(x, test_fraction, name):
    n = x.shape[0]
    if n >= 5:
        n_test = max(1, int(round(test_fraction * n)))
        return x[: n - n_test], x[n - n_test:], f"held-out last {n_test} of {n} sequences"
    return x, x, f"in-sample ({name} has {n} sequence{'s' if n > 1 else ''})"


def load_data(source, *, data_dir=None, test_fraction=0.2, split="test", vocab=None,
              max_vocab=10000):
    """Load a data source as :class:`DataSplits` (see the module docstring)."""
    if source == "nile":
        from pyrossm.datasets import nile_tensor

        x = nile_tensor(torch.float32)
        return DataSplits((x, _mask_of(x)), (x, _mask_of(x)), "real", "in-sample (Nile, 1 series)")
    if source == "jsb":
        from pyrossm.datasets import load_jsb_chorales

        train = load_jsb_chorales("train", data_dir)
        test = load_jsb_chorales(split, data_dir)
        return DataSplits((train.piano_rolls, train.mask), (test.piano_rolls, test.mask),
                          "binary", f"JSB {split} split")
    if source == "ptb":
        from pyrossm.datasets import load_ptb
        from pyrossm.seqvae.vocab import Vocabulary, pad_batch

        train_s = load_ptb("train", data_dir)
        if vocab is None:
            vocab = Vocabulary.from_corpus(train_s, max_size=max_vocab + 4)
        test_s = load_ptb(split, data_dir)
        tr, te = pad_batch(vocab, train_s), pad_batch(vocab, test_s)
        return DataSplits((tr.x, tr.mask), (te.x, te.mask), "tokens", f"PTB {split} split", vocab)
    path = Path(str(source)).expanduser()
    if path.suffix.lower() not in (".csv", ".tsv", ".txt", ".npy", ".npz"):
        raise ValueError(f"--data: expected one of {BUILTIN} or a .csv/.npy/.npz file, got "
                         f"{source!r}")
    from pyrossm.datasets import load_array

    x = load_array(path, dtype=torch.float32)
    train, test, name = _split(x, test_fraction, path.name)
    return DataSplits((train, _mask_of(train)), (test, _mask_of(test)), "real", name)


def default_config(model, data_kind, obs_dim, args) -> dict:
    """The ``run.json`` model section from the command-line options."""
    if model not in MODELS:
        raise ValueError(f"--model: expected one of {MODELS}, got {model!r}")
    if model == "seqvae" and data_kind != "tokens":
        raise ValueError("--model seqvae: expected token data (--data ptb), got real-valued data")
    if model != "seqvae" and data_kind == "tokens":
        raise ValueError(f"--model {model}: expected real-valued or binary data, got tokens "
                         f"(use --model seqvae for --data ptb)")
    if model == "lgssm" and data_kind != "real":
        raise ValueError("--model lgssm: expected real-valued data, got binary piano rolls "
                         "(use --model dmm or lstm-ssm for --data jsb)")
    return {"model": model, "obs_dim": obs_dim, "state_dim": args.state_dim,
            "hidden": args.hidden, "guide": args.guide, "method": args.method,
            "emission": "bernoulli" if data_kind == "binary" else "gaussian"}


def spec_of(cfg) -> ModelSpec:
    """The :class:`~pyrossm.build.ModelSpec` of a ``run.json`` model section."""
    mle = cfg["model"] == "lgssm" and cfg.get("method") == "mle"
    return ModelSpec(
        cfg["model"], obs_dim=cfg.get("obs_dim"), state_dim=cfg["state_dim"],
        hidden=cfg["hidden"], guide="none" if mle else cfg["guide"],
        emission=cfg.get("emission", "gaussian"), dtype="float64" if mle else "float32",
        word_dropout=cfg.get("word_dropout", 0.0),
    )


def build(cfg, vocab=None):
    """``(model, guide)`` from a ``run.json`` model section (guide is None for an MLE LGSSM)."""
    return build_from_spec(spec_of(cfg), vocab)


def save_run(out, cfg, model, guide, history=None):
    """Write ``run.json``, ``model.pt`` (and ``history.json``) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run.json", "w") as f:
        json.dump(cfg, f, indent=1)
    torch.save({"model": model.state_dict(), "init": getattr(model, "init", None),
                "guide": guide.state_dict() if guide is not None else None}, out / "model.pt")
    if history is not None:
        (out / "history.json").write_text(history.to_json() if hasattr(history, "to_json")
                                          else json.dumps(history, indent=1))


def load_run(run_dir, device="cpu"):
    """``(cfg, model, guide, vocab)`` of a run directory written by ``pyrossm train``."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "model.pt").is_file():
        raise FileNotFoundError(f"--run: {run_dir} is not a training run (expected run.json and "
                                f"model.pt there; create one with `pyrossm train --out DIR`)")
    cfg = json.loads((run_dir / "run.json").read_text())
    vocab = None
    if cfg["model"]["model"] == "seqvae":
        from pyrossm.seqvae.vocab import Vocabulary

        vocab = Vocabulary.load(run_dir / "vocab.json")
    model, guide = build(cfg["model"], vocab)
    state = torch.load(run_dir / "model.pt", map_location=device, weights_only=True)
    init = state.get("init")
    if init is not None and getattr(model, "init", init) != init:  # e.g. fit() chose "diffuse"
        model._switch_init(init)
    model.load_state_dict(state["model"])
    if guide is not None and state["guide"] is not None:
        guide.load_state_dict(state["guide"])
    model.to(device)
    if guide is not None:
        guide.to(device)
    return cfg, model, guide, vocab


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path, payload):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1, default=_json_default))
