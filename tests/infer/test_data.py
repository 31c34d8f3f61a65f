"""Batching helpers: datasets from tensors / masks / lengths, padding, bucketing, particles."""

import pytest
import torch

from pyrossm.infer import (
    SequenceDataset,
    as_dataset,
    batch_indices,
    pad_sequences,
    repeat_particles,
)


def test_as_dataset_forms_agree():
    x = torch.randn(4, 5, 2)
    lengths = torch.tensor([5, 2, 3, 1])
    mask = torch.arange(5) < lengths[:, None]
    a, b = as_dataset((x, lengths)), as_dataset((x, mask))
    assert torch.equal(a.mask, b.mask) and a.lengths.tolist() == [5, 2, 3, 1]
    assert as_dataset(x).mask.all() and as_dataset(a) is a
    tokens = as_dataset(torch.randint(0, 7, (3, 4)))
    assert tokens.x.dtype == torch.long and tokens.num_steps.tolist() == [4, 4, 4]


@pytest.mark.parametrize(
    "data, exc, match",
    [
        (torch.randn(4, 5), ValueError, "obs_dim"),
        (torch.randn(4, 5, 2, 1), ValueError, "obs_dim"),
        ((torch.randn(4, 5, 2), torch.tensor([1, 2])), ValueError, "lengths"),
        ((torch.randn(4, 5, 2), torch.tensor([1, 2, 3, 6])), ValueError, "exceeds"),
        ((torch.randn(4, 5, 2), torch.ones(4, 4, dtype=torch.bool)), ValueError, "mask"),
        ((torch.randn(4, 5, 2), torch.full((4, 5), 2.0)), TypeError, "mask"),
        ((torch.randn(4, 5, 2), torch.full((4, 5), 2)), ValueError, "mask"),
        ("abc", TypeError, "data"),
        (torch.randn(0, 5, 2), ValueError, "empty"),
        (torch.tensor([[[0.0], [float("inf")]]]), ValueError, "infinite value at index"),
    ],
)
def test_bad_data(data, exc, match):
    with pytest.raises(exc, match=match):
        as_dataset(data)


def test_pad_sequences():
    x, mask = pad_sequences([torch.ones(2, 3), 2 * torch.ones(4, 3)])
    assert x.shape == (2, 4, 3) and mask.sum(1).tolist() == [2, 4]
    assert (x[0, 2:] == 0).all()
    with pytest.raises(ValueError, match="sequences"):
        pad_sequences([])


def test_batches_cover_dataset_and_trim():
    lengths = torch.tensor([3, 9, 1, 4, 9, 2, 7, 5, 6, 8])
    data = SequenceDataset(torch.randn(10, 9, 1), lengths=lengths)
    for bucket in (False, True):
        batches = list(batch_indices(data, 3, shuffle=True, bucket=bucket))
        assert sorted(torch.cat(batches).tolist()) == list(range(10))
        assert max(len(b) for b in batches) == 3
    x, mask = data.batch(torch.tensor([0, 2, 5]))
    assert x.shape == (3, 3, 1) and mask.sum().item() == 6


def test_bucketing_reduces_padding():
    torch.manual_seed(0)
    lengths = torch.randint(1, 50, (200,))
    data = SequenceDataset(torch.randn(200, 50, 1), lengths=lengths)

    def padding(bucket):
        total = 0
        for b in batch_indices(data, 10, bucket=bucket, bucket_batches=20):
            _, mask = data.batch(b)
            total += (~mask).sum().item()
        return total

    assert padding(True) < 0.25 * padding(False)


def test_repeat_particles_layout():
    x = torch.arange(3.0).reshape(3, 1, 1)
    mask = torch.tensor([[True], [False], [True]])
    xr, mr = repeat_particles(x, mask, 2)
    assert xr.flatten().tolist() == [0, 0, 1, 1, 2, 2]
    assert mr.flatten().tolist() == [True, True, False, False, True, True]
    assert repeat_particles(x, None, 1) == (x, None)
