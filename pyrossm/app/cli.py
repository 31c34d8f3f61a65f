"""The ``pyrossm`` command line: ``demo``, ``train``, ``evaluate``, ``sample``, ``forecast``.

    pyrossm demo --out results/demo                      # the main job (offline, a few minutes)
    pyrossm train --model lgssm --data nile --out runs/nile
    pyrossm train --model dmm --data jsb --epochs 50 --out runs/jsb-dmm
    pyrossm evaluate --run runs/jsb-dmm --num-samples 500
    pyrossm sample --run runs/nile --steps 100 --out samples.npz
    pyrossm forecast --run runs/nile --horizon 20 --out forecast.csv

Bad input (a missing file, a wrong shape, an unknown option value) is reported in one line
without a traceback and a non-zero exit status (1; 2 for usage errors and for model families
not available in this installation). ``python -m pyrossm ...`` is the same command.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "main"]

_EPILOG = """Run `pyrossm COMMAND --help` for the options of a command.
Data (--data): nile (built in), jsb (JSB chorales piano rolls), ptb (Penn Treebank), or a
.csv/.npy/.npz file of shape (time, features) or (sequences, time, features); NaN or empty cells
= missing values. jsb and ptb are read from --data-dir or $PYROSSM_DATA_DIR."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; appends "(default: X)" when there is a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False and default != argparse.SUPPRESS
                and "%(default)" not in text and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _common(p, device=True, seed=True):
    if device:
        p.add_argument("--device", default="auto",
                       help="where SVI runs: 'auto' (cuda if available), 'cpu' or 'cuda'")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (torch, numpy, python)")


def _data_options(p, required):
    p.add_argument("--data", required=required, default=None,
                   help="nile, jsb, ptb, or a path to a .csv/.npy/.npz file (time x features or "
                        "sequences x time x features; NaN = missing)"
                        + ("" if required else "; default: the data the run was trained on"))
    p.add_argument("--data-dir", default=None,
                   help="directory holding jsb_chorales.pickle / ptb.*.txt "
                        "(default: $PYROSSM_DATA_DIR, then the download cache)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyrossm`` command (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="pyrossm", formatter_class=_Formatter, epilog=_EPILOG,
        description="Sequential latent-variable models in Pyro: exact Kalman baselines, "
                    "LSTM state-space models, deep Markov models, sequence VAEs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="the main job: Kalman baselines vs SVI on Nile, a simulated LGSSM and a pendulum",
        description="Fits the exact Kalman MLE, the LGSSM by SVI (filtering LSTM guide and "
                    "backward structured guide) and the LSTM-driven nonlinear SSM on embedded "
                    "data (no download); prints held-out log-likelihood per step (exact vs IWAE "
                    "vs ELBO) against the Kalman baseline; writes report.json and PNG plots.")
    p.add_argument("--out", default="results/demo", help="output folder (report.json, *.png)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few epochs (about a minute; used by the tests)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per SVI fit")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (small tensors: more threads rarely help)")
    _common(p)

    p = sub.add_parser(
        "train", formatter_class=_Formatter, help="train a model on a data set, save the run",
        description="Train a model and write a run folder (run.json, model.pt, history.json, "
                    "checkpoints/, metrics.json) that evaluate/sample/forecast read. Real-valued "
                    "data are standardized per feature; reported log-likelihoods are in the "
                    "data's original units. Held out (validation during SVI and the final "
                    "evaluation): the valid split of jsb/ptb, the last --test-fraction of the "
                    "sequences of a user file (with >= 5 sequences); otherwise in-sample.")
    p.add_argument("--model", required=True, choices=("lgssm", "lstm-ssm", "dmm", "seqvae"),
                   help="lgssm: linear-Gaussian SSM (exact MLE or SVI); lstm-ssm: LSTM-driven "
                        "nonlinear SSM; dmm: deep Markov model; seqvae: Bowman sequence VAE (ptb)")
    _data_options(p, required=True)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--epochs", type=int, default=None,
                   help="SVI epochs (default 100); for --method mle the maximum number of L-BFGS "
                        "steps of up to 50 iterations each (default 10)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT/checkpoints (SVI)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="SVI: stop after this much wall clock (checked before every step); the "
                        "checkpoint stays resumable with --resume")
    p.add_argument("--method", choices=("mle", "svi"), default="mle",
                   help="lgssm only: exact maximum likelihood (L-BFGS on the Kalman "
                        "log-likelihood) or SVI with --guide")
    p.add_argument("--guide", choices=("backward", "forward", "bidirectional", "filtering-lstm"),
                   default="backward",
                   help="variational family for trajectory models: structured guide "
                        "q(z_t | z_{t-1}, h_t) with an RNN run backward (DKS), forward or both "
                        "ways, or the filtering LSTM encoder q(z_t | x_<=t)")
    p.add_argument("--state-dim", type=int, default=None,
                   help="latent dimension (default: 2 for real data, 16 for jsb, 16 for ptb)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size of the networks (default: 32 for real data, 128 for jsb/ptb)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per SVI step")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 1e-2 for real data, 1e-3 for jsb/ptb)")
    p.add_argument("--annealing", default=None,
                   help="KL annealing: constant, linear, sigmoid, cyclical, or e.g. "
                        "'linear:num_steps=1000,start=0.2' (default: none, beta = 1)")
    p.add_argument("--word-dropout", type=float, default=0.0, help="seqvae: word dropout rate")
    p.add_argument("--max-vocab", type=int, default=10000, help="ptb: vocabulary size (words)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="user files with >= 5 sequences: fraction held out (the last ones)")
    p.add_argument("--num-samples", type=int, default=100,
                   help="IWAE samples for the held-out evaluation at the end")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first LIMIT training and held-out sequences (quick trials)")
    p.add_argument("--no-standardize", action="store_true",
                   help="train on the raw values of real-valued data")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _common(p)

    p = sub.add_parser(
        "evaluate", formatter_class=_Formatter, help="held-out log-likelihood of a trained run",
        description="Held-out log-likelihood per step: exact (Kalman filter) for the LGSSM, and "
                    "IWAE (importance-weighted bound, --num-samples draws) and ELBO with the "
                    "guide for SVI-trained models. Writes RUN/metrics.json (or --out).")
    p.add_argument("--run", required=True, help="run folder written by `pyrossm train`")
    _data_options(p, required=False)
    p.add_argument("--split", choices=("test", "valid"), default="test",
                   help="jsb/ptb split to evaluate on")
    p.add_argument("--num-samples", type=int, default=100, help="IWAE importance samples K")
    p.add_argument("--elbo-samples", type=int, default=10, help="guide draws averaged in the ELBO")
    p.add_argument("--out", default=None,
                   help="JSON file for the metrics (default RUN/metrics.json)")
    _common(p)

    p = sub.add_parser(
        "sample", formatter_class=_Formatter, help="sample trajectories from a trained model",
        description="Draw latent and observed trajectories from the model's prior (in the "
                    "data's original units) and save them, with a plot. seqvae: sentences.")
    p.add_argument("--run", required=True, help="run folder written by `pyrossm train`")
    p.add_argument("--steps", type=int, default=100, help="trajectory length T")
    p.add_argument("--num-samples", type=int, default=100, help="number of trajectories")
    p.add_argument("--out", required=True,
                   help=".npz (arrays z (S, T, state), x (S, T, obs)) or .csv (one row per "
                        "sample and step); seqvae: .txt (one sentence per line)")
    p.add_argument("--plot", default=None,
                   help="PNG file (default: OUT with .png; 'none' = no plot)")
    p.add_argument("--dim", type=int, default=0, help="observed coordinate to plot")
    p.add_argument("--temperature", type=float, default=1.0, help="seqvae: sampling temperature")
    _common(p)

    p = sub.add_parser(
        "forecast", formatter_class=_Formatter, help="forecast the continuation of sequences",
        description="Condition on each sequence of --data and sample HORIZON future steps "
                    "(LGSSM: exact Kalman predictive; nonlinear models: the guide's latent state "
                    "rolled forward through the prior). Saves samples, means and central "
                    "--level intervals, and a plot.")
    p.add_argument("--run", required=True, help="run folder written by `pyrossm train`")
    _data_options(p, required=False)
    p.add_argument("--horizon", type=int, required=True, help="number of future steps")
    p.add_argument("--num-samples", type=int, default=200, help="sampled future trajectories")
    p.add_argument("--level", type=float, default=0.9, help="central interval probability")
    p.add_argument("--out", required=True,
                   help=".npz (samples (S, N, H, obs), mean, lower, upper) or .csv (sequence, "
                        "step, feature, mean, lower, upper)")
    p.add_argument("--plot", default=None,
                   help="PNG file (default: OUT with .png; 'none' = no plot)")
    p.add_argument("--sequence", type=int, default=0, help="sequence to plot")
    p.add_argument("--dim", type=int, default=0, help="observed coordinate to plot")
    _common(p)
    return parser


def _positive(name, value, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a positive number, got {value}")


def main(argv=None) -> int:
    """Entry point of the ``pyrossm`` console script; returns the exit status."""
    from pyrossm.app import commands

    args = build_parser().parse_args(argv)
    handler = {"demo": commands.demo, "train": commands.train, "evaluate": commands.evaluate,
               "sample": commands.sample, "forecast": commands.forecast}[args.command]
    try:
        for name in ("epochs", "num_samples", "horizon", "steps", "batch_size", "hidden",
                     "state_dim", "elbo_samples", "limit", "threads"):
            _positive(f"--{name.replace('_', '-')}", getattr(args, name, None))
        if getattr(args, "level", None) is not None and not 0 < args.level < 1:
            raise ValueError(f"--level: expected a probability in (0, 1), got {args.level}")
        return int(handler(args) or 0)
    except commands.ModelNotAvailable as e:
        print(f"pyrossm: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        print(f"pyrossm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from pyrossm.infer import TrainingDivergedError

        if isinstance(e, TrainingDivergedError):
            print(f"pyrossm {args.command}: training diverged: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("pyrossm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
