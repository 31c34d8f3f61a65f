"""The error contract across pyrossm's public entry points (issue 7, "Bad input").

Every case feeds one wrong input -- a wrong shape or rank, a wrong dtype, NaN/Inf in a parameter,
a mask of the wrong shape, an empty sequence, lengths inconsistent with the data, a vocabulary
without its special tokens, a missing or corrupt file -- and expects a ``ValueError``,
``TypeError`` or ``FileNotFoundError`` whose message names the argument (as a word). Cases where an
entry point does not honour the contract yet are ``xfail(strict=True)`` with what happens instead;
they start failing (XPASS) as soon as the entry point is fixed, so the mark must then be removed.
"""

import re

import pytest
import torch

from pyrossm import datasets, guides, lgssm, nonlinear, seqvae
from pyrossm.infer import elbo, fit, load_checkpoint, log_likelihood
from pyrossm.infer.data import chunk_sequences

CONTRACT = (ValueError, TypeError, FileNotFoundError)
F64 = torch.float64


def _system():
    return dict(A=0.9 * torch.eye(2, dtype=F64), C=torch.ones(3, 2, dtype=F64),
                Q=0.1 * torch.eye(2, dtype=F64), R=0.2 * torch.eye(3, dtype=F64),
                init_mean=torch.zeros(2, dtype=F64), init_cov=torch.eye(2, dtype=F64))


def _x(n=2, t=5, d=3):
    return torch.randn(n, t, d, dtype=F64)


def _with(name, value, **over):
    p = _system()
    p[name] = value
    p.update(over)
    return p


def _kf(x=None, mask=None, smoother=False, **params):
    fn = lgssm.kalman_smoother if smoother else lgssm.kalman_filter
    p = _system()
    p.update(params)
    return fn(_x() if x is None else x, p["A"], p["C"], p["Q"], p["R"], p["init_mean"],
              p["init_cov"], mask=mask)


def _nan(shape):
    t = torch.eye(*shape, dtype=F64) if len(shape) == 2 else torch.zeros(shape, dtype=F64)
    t.view(-1)[0] = float("nan")
    return t


def _ssm():
    return lgssm.LinearGaussianSSM(2, 3, dtype=F64)


def _pair():
    """The smallest model/guide pair for the infer entry points: a LGSSM and a structured guide."""
    return _ssm().model, guides.StructuredGuide(3, 2, hidden_dim=4).double()


def _vocab():
    return seqvae.Vocabulary.from_corpus([["a", "b"], ["b", "c"]])


def _dmm():
    return nonlinear.DeepMarkovModel(3, z_dim=2, transition_dim=4, emission_dim=4,
                                     emission="gaussian").double()


def _lstm_ssm():
    return nonlinear.LSTMStateSpaceModel(3, z_dim=2, rnn_dim=4, emission_dim=4,
                                         hidden_dim=4).double()


def _corrupt(tmp_path, name, content=b"\x00garbage\xff"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


# (id, callable(tmp_path), argument name the message must contain)
CASES = [
    # --- pyrossm.lgssm: exact Kalman filter / smoother ---
    ("kalman_filter-x-rank1", lambda tp: _kf(x=torch.zeros(5, dtype=F64)), "x"),
    ("kalman_filter-x-wrong-obs-dim", lambda tp: _kf(x=_x(d=4)), "x"),
    ("kalman_filter-x-int-dtype", lambda tp: _kf(x=torch.zeros(2, 5, 3, dtype=torch.long)), "x"),
    ("kalman_filter-x-inf", lambda tp: _kf(x=_x().index_fill(1, torch.tensor([2]),
                                                               float("inf"))), "x"),
    ("kalman_filter-x-empty-sequence", lambda tp: _kf(x=_x(t=0)), "x"),
    ("kalman_filter-A-not-square", lambda tp: _kf(A=torch.ones(2, 3, dtype=F64)), "A"),
    ("kalman_filter-A-nan", lambda tp: _kf(A=_nan((2, 2))), "A"),
    ("kalman_filter-C-wrong-shape", lambda tp: _kf(C=torch.ones(3, 3, dtype=F64)), "C"),
    ("kalman_filter-Q-nan", lambda tp: _kf(Q=_nan((2, 2))), "Q"),
    ("kalman_filter-Q-not-pd", lambda tp: _kf(Q=-torch.eye(2, dtype=F64)), "Q"),
    ("kalman_filter-R-inf", lambda tp: _kf(R=torch.eye(3, dtype=F64) * float("inf")), "R"),
    ("kalman_filter-init_mean-shape", lambda tp: _kf(init_mean=torch.zeros(3, dtype=F64)),
     "init_mean"),
    ("kalman_filter-init_cov-nan", lambda tp: _kf(init_cov=_nan((2, 2))), "init_cov"),
    ("kalman_filter-mask-shape", lambda tp: _kf(mask=torch.ones(2, 4, dtype=torch.bool)),
     "mask"),
    ("kalman_filter-mask-float", lambda tp: _kf(mask=torch.full((2, 5), 0.5)), "mask"),
    ("kalman_filter-dtype-mismatch", lambda tp: _kf(x=_x().float()), "x"),
    ("kalman_smoother-x-rank1", lambda tp: _kf(x=torch.zeros(5, dtype=F64), smoother=True), "x"),
    ("kalman_smoother-mask-shape",
     lambda tp: _kf(mask=torch.ones(3, 5, dtype=torch.bool), smoother=True), "mask"),
    ("kalman_smoother-Q-nan", lambda tp: _kf(Q=_nan((2, 2)), smoother=True), "Q"),
    # --- pyrossm.lgssm.LinearGaussianSSM ---
    ("LinearGaussianSSM-state_dim-zero", lambda tp: lgssm.LinearGaussianSSM(0, 3), "state_dim"),
    ("LinearGaussianSSM-obs_dim-float", lambda tp: lgssm.LinearGaussianSSM(2, 1.5), "obs_dim"),
    ("LinearGaussianSSM.from_matrices-A-not-square",
     lambda tp: lgssm.LinearGaussianSSM.from_matrices(**_with("A", torch.ones(2, 3, dtype=F64),
                                                              dtype=F64)), "A"),
    ("LinearGaussianSSM.from_matrices-A-nan",
     lambda tp: lgssm.LinearGaussianSSM.from_matrices(**_with("A", _nan((2, 2)), dtype=F64)),
     "A"),
    ("LinearGaussianSSM.from_matrices-Q-not-pd",
     lambda tp: lgssm.LinearGaussianSSM.from_matrices(**_with("Q", -torch.eye(2, dtype=F64),
                                                              dtype=F64)), "Q"),
    ("LinearGaussianSSM.log_prob-x-wrong-obs-dim", lambda tp: _ssm().log_prob(_x(d=2)), "x"),
    ("LinearGaussianSSM.log_prob-mask-shape",
     lambda tp: _ssm().log_prob(_x(), mask=torch.ones(2, 6, dtype=torch.bool)), "mask"),
    ("LinearGaussianSSM.filter-x-rank1", lambda tp: _ssm().filter(torch.zeros(5, dtype=F64)),
     "x"),
    ("LinearGaussianSSM.smooth-x-empty", lambda tp: _ssm().smooth(_x(t=0)), "x"),
    ("LinearGaussianSSM.sample-num_steps-zero", lambda tp: _ssm().sample(0), "num_steps"),
    ("LinearGaussianSSM.forecast-horizon-negative", lambda tp: _ssm().forecast(_x(), -1),
     "horizon"),
    ("LinearGaussianSSM.model-x-wrong-obs-dim", lambda tp: _ssm().model(_x(d=2)), "x"),
    ("LinearGaussianSSM.fit-x-rank1", lambda tp: _ssm().fit(torch.zeros(5, dtype=F64)), "x"),
    # --- pyrossm.infer ---
    ("fit-train_data-list", lambda tp: fit(*_pair(), [[0.0, 1.0]], epochs=1, batch_size=1,
                                           lr=0.1, progress=False), "train_data"),
    ("fit-lengths-exceed-time", lambda tp: fit(*_pair(), (_x(), torch.tensor([5, 6])), epochs=1,
                                               batch_size=1, lr=0.1, progress=False), "lengths"),
    ("fit-lengths-wrong-count", lambda tp: fit(*_pair(), (_x(), torch.tensor([5, 5, 5])),
                                               epochs=1, batch_size=1, lr=0.1, progress=False),
     "lengths"),
    ("fit-mask-shape", lambda tp: fit(*_pair(), (_x(), torch.ones(2, 4, dtype=torch.bool)),
                                      epochs=1, batch_size=1, lr=0.1, progress=False), "mask"),
    ("fit-x-empty-batch", lambda tp: fit(*_pair(), _x(n=0), epochs=1, batch_size=1, lr=0.1,
                                         progress=False), "x"),
    ("fit-x-empty-sequence", lambda tp: fit(*_pair(), _x(t=0), epochs=1, batch_size=1, lr=0.1,
                                            progress=False), "x"),
    ("fit-x-inf", lambda tp: fit(*_pair(), _x() / 0.0, epochs=1, batch_size=1, lr=0.1,
                                 progress=False), "x"),
    ("fit-x-rank2-float", lambda tp: fit(*_pair(), torch.zeros(2, 5, dtype=F64), epochs=1,
                                         batch_size=1, lr=0.1, progress=False), "x"),
    ("fit-x-complex-dtype", lambda tp: fit(*_pair(), _x().to(torch.complex64), epochs=1,
                                           batch_size=1, lr=0.1, progress=False), "x"),
    ("fit-lr-nan", lambda tp: fit(*_pair(), _x(), epochs=1, batch_size=1, lr=float("nan"),
                                  progress=False), "lr"),
    ("fit-batch_size-zero", lambda tp: fit(*_pair(), _x(), epochs=1, batch_size=0, lr=0.1,
                                           progress=False), "batch_size"),
    ("fit-chunk_length-zero", lambda tp: fit(*_pair(), _x(), epochs=1, batch_size=1, lr=0.1,
                                             chunk_length=0, progress=False), "chunk_length"),
    ("fit-device-bogus", lambda tp: fit(*_pair(), _x(), epochs=1, batch_size=1, lr=0.1,
                                        device="tpu9", progress=False), "device"),
    ("fit-distributed-not-bool", lambda tp: fit(*_pair(), _x(), epochs=1, batch_size=1, lr=0.1,
                                                distributed="yes", progress=False),
     "distributed"),
    ("fit-model-not-callable", lambda tp: fit(3, _pair()[1], _x(), epochs=1, batch_size=1,
                                              lr=0.1, progress=False), "model"),
    ("elbo-data-wrong-type", lambda tp: elbo(*_pair(), "data"), "data"),
    ("elbo-mask-shape", lambda tp: elbo(*_pair(), (_x(), torch.ones(3, 5, dtype=torch.bool))),
     "mask"),
    ("log_likelihood-num_samples-zero", lambda tp: log_likelihood(*_pair(), _x(), num_samples=0),
     "num_samples"),
    ("log_likelihood-lengths-negative",
     lambda tp: log_likelihood(*_pair(), (_x(), torch.tensor([-1, 5])), num_samples=2),
     "lengths"),
    ("chunk_sequences-overlap", lambda tp: chunk_sequences(_x(), None, 2, overlap=2), "overlap"),
    ("load_checkpoint-missing", lambda tp: load_checkpoint(tp / "nope.pt"), "nope.pt"),
    ("load_checkpoint-corrupt", lambda tp: load_checkpoint(_corrupt(tp, "c.pt")), "c.pt"),
    # --- pyrossm.guides ---
    ("StructuredGuide-obs_dim-zero", lambda tp: guides.StructuredGuide(0, 2), "obs_dim"),
    ("StructuredGuide-direction", lambda tp: guides.StructuredGuide(3, 2, direction="up"),
     "direction"),
    ("StructuredGuide-combiner", lambda tp: guides.StructuredGuide(3, 2, combiner="magic"),
     "combiner"),
    ("StructuredGuide-x-wrong-obs-dim",
     lambda tp: guides.StructuredGuide(3, 2, hidden_dim=4).double()(_x(d=2)), "x"),
    ("StructuredGuide-mask-shape",
     lambda tp: guides.StructuredGuide(3, 2, hidden_dim=4).double()(
         _x(), mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    ("StructuredGuide-x-empty-sequence",
     lambda tp: guides.StructuredGuide(3, 2, hidden_dim=4).double()(_x(t=0)), "x"),
    ("FilteringLSTMGuide-cell", lambda tp: guides.FilteringLSTMGuide(3, 2, cell="tcn"), "cell"),
    ("FilteringLSTMGuide-x-rank2",
     lambda tp: guides.FilteringLSTMGuide(3, 2, hidden_dim=4).double()(torch.zeros(5, 3,
                                                                               dtype=F64)),
     "x"),
    ("FilteringLSTMGuide-x-int-dtype",
     lambda tp: guides.FilteringLSTMGuide(3, 2, hidden_dim=4)(torch.zeros(2, 5, 3,
                                                                          dtype=torch.long)),
     "x"),
    # --- pyrossm.nonlinear ---
    ("DeepMarkovModel-obs_dim-negative", lambda tp: nonlinear.DeepMarkovModel(-1), "obs_dim"),
    ("DeepMarkovModel-emission", lambda tp: nonlinear.DeepMarkovModel(3, emission="poisson"),
     "emission"),
    ("DeepMarkovModel-x-wrong-obs-dim", lambda tp: _dmm()(_x(d=2)), "x"),
    ("DeepMarkovModel-mask-shape",
     lambda tp: _dmm()(_x(), mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    ("DeepMarkovModel-x-empty-sequence", lambda tp: _dmm()(_x(t=0)), "x"),
    ("LSTMStateSpaceModel-x-int-dtype",
     lambda tp: _lstm_ssm()(torch.zeros(2, 5, 3, dtype=torch.long)), "x"),
    ("LSTMStateSpaceModel-x-rank2", lambda tp: _lstm_ssm()(torch.zeros(5, 3, dtype=F64)), "x"),
    ("LSTMStateSpaceModel-mask-float",
     lambda tp: _lstm_ssm()(_x(), mask=torch.full((2, 5), 0.5, dtype=F64)), "mask"),
    # --- pyrossm.seqvae ---
    ("Vocabulary-missing-special-tokens", lambda tp: seqvae.Vocabulary(["a", "b"]), "tokens"),
    ("Vocabulary-duplicates",
     lambda tp: seqvae.Vocabulary(["<pad>", "<unk>", "<sos>", "<eos>", "a", "a"]), "tokens"),
    ("Vocabulary.load-missing", lambda tp: seqvae.Vocabulary.load(tp / "vocab.json"),
     "vocab.json"),
    ("Vocabulary.load-corrupt", lambda tp: seqvae.Vocabulary.load(_corrupt(tp, "v.json")),
     "v.json"),
    ("SequenceVAE-latent_dim-zero", lambda tp: seqvae.SequenceVAE(_vocab(), latent_dim=0),
     "latent_dim"),
    ("SequenceVAE-vocab-wrong-type", lambda tp: seqvae.SequenceVAE(["a", "b"]), "vocab"),
    ("SequenceVAE-x-float", lambda tp: seqvae.SequenceVAE(_vocab(), 4, 4, 2)(_x()), "x"),
    ("SequenceVAE-x-id-out-of-range",
     lambda tp: seqvae.SequenceVAE(_vocab(), 4, 4, 2)(torch.full((2, 5), 99)), "x"),
    ("SequenceVAE-mask-shape",
     lambda tp: seqvae.SequenceVAE(_vocab(), 4, 4, 2)(
         torch.ones(2, 5, dtype=torch.long), mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    ("SequenceVAE-x-empty-sequence",
     lambda tp: seqvae.SequenceVAE(_vocab(), 4, 4, 2)(torch.ones(2, 0, dtype=torch.long)), "x"),
    ("SequenceVAEGuide-x-rank3",
     lambda tp: seqvae.SequenceVAEGuide(_vocab(), 4, 4, 2)(torch.ones(2, 5, 1, dtype=torch.long)),
     "x"),
    ("GaussianSequenceVAE-x-rank2",
     lambda tp: seqvae.GaussianSequenceVAE(3, 4, 2)(torch.zeros(5, 3)), "x"),
    # --- pyrossm.datasets ---
    ("load_array-missing", lambda tp: datasets.load_array(tp / "missing.npy"), "missing.npy"),
    ("load_array-corrupt", lambda tp: datasets.load_array(_corrupt(tp, "bad.npy")), "bad.npy"),
    ("load_jsb_chorales-split", lambda tp: datasets.load_jsb_chorales("bogus", data_dir=tp,
                                                                      download=False), "split"),
    ("load_jsb_chorales-missing-file",
     lambda tp: datasets.load_jsb_chorales("train", data_dir=tp, download=False), "jsb"),
    ("load_ptb-split", lambda tp: datasets.load_ptb("bogus", data_dir=tp, download=False),
     "split"),
    ("load_ptb-missing-file", lambda tp: datasets.load_ptb("train", data_dir=tp, download=False),
     "ptb"),
    ("verify_sha256-mismatch",
     lambda tp: datasets.verify_sha256(_corrupt(tp, "f.bin"), "0" * 64), "f.bin"),
    ("simulate_linear_gaussian-A-nan",
     lambda tp: datasets.simulate_linear_gaussian(**_with("A", _nan((2, 2)), num_steps=5)), "A"),
    ("simulate_linear_gaussian-num_steps-zero",
     lambda tp: datasets.simulate_linear_gaussian(**_system(), num_steps=0), "num_steps"),
    ("simulate_linear_gaussian-C-wrong-shape",
     lambda tp: datasets.simulate_linear_gaussian(
         **_with("C", torch.ones(3, 3, dtype=F64), num_steps=5)), "C"),
]

# Entry points that do not honour the contract yet: id -> what happens instead.
XFAIL = {}


def _params():
    out = []
    for case_id, fn, name in CASES:
        marks = ()
        if case_id in XFAIL:
            marks = pytest.mark.xfail(strict=True, reason=XFAIL[case_id])
        out.append(pytest.param(fn, name, id=case_id, marks=marks))
    return out


@pytest.mark.parametrize("call,name", _params())
def test_bad_input_raises_a_clear_error(call, name, tmp_path):
    with pytest.raises(CONTRACT) as info:
        call(tmp_path)
    message = str(info.value)
    assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9])", message, re.I), (
        f"{type(info.value).__name__} does not name {name!r}: {message}")


@pytest.mark.parametrize(
    "call",
    [
        lambda m: _kf(mask=m),
        lambda m: _ssm().log_prob(_x(), mask=m),
        lambda m: _dmm()(_x(), mask=m),
        lambda m: _lstm_ssm()(_x(), mask=m),
    ],
    ids=["kalman_filter", "LinearGaussianSSM.log_prob", "DeepMarkovModel", "LSTMStateSpaceModel"],
)
def test_one_mask_check_one_exception_type(call):
    # one checker (pyrossm._checks.check_mask): wrong dtype -> TypeError, wrong shape -> ValueError
    with pytest.raises(TypeError, match="^mask: expected a bool tensor"):
        call(torch.ones(2, 5))
    with pytest.raises(ValueError, match="^mask: expected a bool tensor"):
        call(torch.ones(2, 4, dtype=torch.bool))
