"""chunk_sequences and fit(chunk_length=...): truncated backpropagation through time by chunks."""

import math

import pytest
import torch
from infer_toy import ExactGuide, ToyGuide, toy_problem

from pyrossm.infer import elbo, fit
from pyrossm.infer.data import chunk_sequences
from pyrossm.protocol import lengths_to_mask

TOL = 1e-10


@pytest.mark.parametrize("steps,L", [(7, 3), (6, 3), (5, 8), (1, 1)])
def test_shapes_and_mask(steps, L):
    x = torch.randn(4, steps, 2, dtype=torch.float64)
    lengths = torch.tensor([steps, 1, max(steps - 2, 1), steps])
    mask = lengths_to_mask(lengths, steps)
    c = chunk_sequences(x, mask, L)
    per = math.ceil(steps / L)
    assert c.x.shape == (4 * per, L, 2) and c.mask.shape == (4 * per, L)
    assert c.mask.dtype == torch.bool
    assert int(c.mask.sum()) == int(mask.sum())  # padding never becomes data
    # reassemble: every real step lands where it came from
    for k in range(len(c.x)):
        n, s = int(c.sequence[k]), int(c.start[k])
        width = min(L, steps - s)
        assert torch.equal(c.x[k, :width], x[n, s:s + width])
        assert torch.equal(c.mask[k, :width], mask[n, s:s + width])
        assert not c.mask[k, width:].any()  # the zero padding of the last chunk is masked out


def test_tokens_and_overlap():
    x = torch.arange(14).view(2, 7)
    c = chunk_sequences(x, None, 3, overlap=1)  # stride 2: starts 0, 2, 4
    assert c.x.dtype == torch.long and c.x.shape == (6, 3)
    assert c.start.tolist() == [0, 2, 4] * 2
    assert c.x[1].tolist() == [2, 3, 4] and c.x[5].tolist() == [11, 12, 13]


def test_drop_empty_chunks():
    x = torch.zeros(2, 6, 1)
    mask = lengths_to_mask(torch.tensor([6, 2]), 6)
    c = chunk_sequences(x, mask, 2, drop_empty=True)
    assert len(c.x) == 3 + 1 and bool(c.mask.any(1).all())
    assert c.sequence.tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("kwargs,name", [
    (dict(chunk_length=0), "chunk_length"),
    (dict(chunk_length=2.0), "chunk_length"),
    (dict(chunk_length=3, overlap=3), "overlap"),
    (dict(chunk_length=3, overlap=-1), "overlap"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        chunk_sequences(torch.zeros(2, 5, 1), None, **kwargs)


def test_bad_data():
    with pytest.raises(ValueError, match="mask"):
        chunk_sequences(torch.zeros(2, 5, 1), torch.ones(2, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="x"):
        chunk_sequences(torch.zeros(5), None, 2)
    with pytest.raises(ValueError, match="x"):
        chunk_sequences(torch.zeros(2, 0, 1), None, 2)
    with pytest.raises(TypeError, match="mask"):
        chunk_sequences(torch.zeros(2, 5, 1), torch.full((2, 5), 0.5), 2)


def test_chunked_elbo_equals_whole_sequence_when_steps_are_independent():
    """For a model without temporal dependence, chunking is exact and padding adds nothing.

    ToyModel has z_t independent over t, and ExactGuide is its exact posterior, so the ELBO is
    log p(x) exactly (zero variance) and the chunks' ELBOs must add up to each sequence's.
    """
    model, x = toy_problem(num=3, steps=7)
    mask = lengths_to_mask(torch.tensor([7, 4, 1]), 7)
    whole = model.exact_log_prob(x, mask)
    c = chunk_sequences(x, mask, 3)
    per_chunk = elbo(model, ExactGuide(model), (c.x, c.mask), num_samples=1, device="cpu")
    summed = torch.zeros(3, dtype=per_chunk.dtype).index_add_(0, c.sequence, per_chunk)
    assert torch.allclose(summed, whole, atol=TOL, rtol=0)
    assert torch.allclose(model.exact_log_prob(c.x, c.mask), per_chunk, atol=TOL, rtol=0)


def test_fit_with_chunk_length_trains_on_chunks():
    model, x = toy_problem(num=6, steps=9)
    mask = lengths_to_mask(torch.tensor([9, 9, 5, 3, 9, 1]), 9)
    chunks = chunk_sequences(x, mask, 4, drop_empty=True)
    h = fit(model, ToyGuide(3, 2), (x, mask), val_data=(x, mask), epochs=2, batch_size=4,
            lr=1e-2, chunk_length=4, device="cpu", progress=False, seed=0)
    assert h["global_step"][-1] == 2 * math.ceil(len(chunks.x) / 4)
    assert all(math.isfinite(v) for v in h["train_neg_elbo_per_step"] + h["val_neg_elbo"])
    with pytest.raises(ValueError, match="chunk_length"):
        fit(model, ToyGuide(3, 2), x, epochs=1, batch_size=4, lr=1e-2, chunk_length=0,
            progress=False)


def test_fit_chunked_recurrent_model():
    """A recurrent model/guide pair (LGSSM + StructuredGuide) trains on chunks of a long series."""
    from pyrossm.guides import StructuredGuide
    from pyrossm.lgssm import LinearGaussianSSM

    torch.manual_seed(0)
    ssm = LinearGaussianSSM(2, 1, dtype=torch.float64)
    guide = StructuredGuide(1, 2, hidden_dim=4).double()
    x = torch.randn(2, 40, 1, dtype=torch.float64).cumsum(1) * 0.1
    h = fit(ssm.model, guide, x, epochs=1, batch_size=8, lr=1e-2, chunk_length=10,
            device="cpu", progress=False, seed=0)
    assert h["global_step"][-1] == 1  # 8 chunks of 10 steps = one batch
    assert math.isfinite(h["train_neg_elbo"][-1])
