"""Batching of padded sequences for the training loop and the evaluators.

Data follow :mod:`pyrossm.protocol`: ``x`` of shape ``(batch, time, obs_dim)`` (float; time at
dim -2) or ``(batch, time)`` (long token ids), and a boolean ``mask`` of shape ``(batch, time)``
that is True on the steps that belong to a sequence (right padding is False).

* :class:`SequenceDataset` holds ``(x, mask)`` and the per-sequence lengths.
* :func:`as_dataset` accepts a tensor, ``(x, mask)``, ``(x, lengths)``, a *list* of
  variable-length ``(T_i, obs_dim)`` tensors (padded with :func:`pad_sequences`) or a dataset.
* :func:`check_compatible` checks data against a model and guide before training (dtype,
  ``obs_dim``, latent sizes) and warns about data that are entirely missing or far from
  standardised.
* :func:`pad_sequences` right-pads a list of ``(T_i, ...)`` tensors.
* :func:`batch_indices` yields index batches, optionally *length-bucketed* (sorted by length
  within chunks of several batches, so that a batch holds sequences of similar length and the
  padding is small), and :meth:`SequenceDataset.batch` trims the trailing all-padding steps.
* :func:`chunk_sequences` cuts long sequences into fixed-length chunks with masks (truncated
  backpropagation through time, see :func:`pyrossm.infer.fit`'s ``chunk_length``).
* :func:`repeat_particles` repeats every sequence ``K`` times (``repeat_interleave``), which is
  how several ELBO particles and the importance-weighted bound are computed.

Example
-------
>>> x = torch.zeros(3, 5, 2)
>>> data = as_dataset((x, torch.tensor([5, 2, 3])))
>>> data.lengths.tolist()
[5, 2, 3]
>>> xb, mb = data.batch(torch.tensor([1, 2]))
>>> tuple(xb.shape), mb.sum().item()
((2, 3, 2), 5)
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from pyrossm._checks import check_mask
from pyrossm.protocol import lengths_to_mask

__all__ = [
    "Chunks",
    "SequenceDataset",
    "as_dataset",
    "batch_indices",
    "check_compatible",
    "chunk_sequences",
    "pad_sequences",
    "repeat_particles",
]


class SequenceDataset:
    """Padded sequences ``x`` (N, T, D) float or (N, T) long, with a mask (N, T) bool.

    :param x: the sequences, time at dim 1 (dim -2 for float data).
    :param mask: ``(N, T)`` bool, True on real steps; default all True.
    :param lengths: alternative to ``mask``: 1-D long tensor of lengths (right padding).
    """

    def __init__(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.is_floating_point():
            if x.dim() != 3:
                hint = (" (one sequence: x.unsqueeze(0); sequences of different lengths: a list "
                        "of (T_i, obs_dim) tensors, or pad_sequences)") if x.dim() == 2 else ""
                raise ValueError(
                    f"x: expected float data of shape (batch, time, obs_dim), got "
                    f"{tuple(x.shape)}{hint}"
                )
            if bool(torch.isinf(x).any()):
                bad = torch.isinf(x).nonzero()[0].tolist()
                raise ValueError(
                    f"x: expected finite values or NaN (= missing), got an infinite value at "
                    f"index {tuple(bad)}"
                )
        elif x.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            if x.dim() != 2:
                raise ValueError(
                    f"x: expected token ids of shape (batch, time), got {tuple(x.shape)}"
                )
            x = x.long()
        else:
            raise TypeError(f"x: expected a float or integer tensor, got dtype {x.dtype}")
        num, steps = x.shape[0], x.shape[1]
        if num == 0:
            raise ValueError("x: expected at least one sequence, got an empty batch")
        if steps == 0:
            raise ValueError(f"x: expected sequences of at least one time step, got shape "
                             f"{tuple(x.shape)} (empty sequences)")
        if mask is not None and lengths is not None:
            raise ValueError("give either mask or lengths, not both")
        if lengths is not None:
            if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
                raise ValueError(
                    f"lengths: expected a 1-D tensor of length {num}, got "
                    f"{getattr(lengths, 'shape', type(lengths).__name__)}"
                )
            if lengths.shape[0] != num:
                raise ValueError(f"lengths: expected {num} lengths, got {lengths.shape[0]}")
            if lengths.numel() and int(lengths.max()) > steps:
                raise ValueError(
                    f"lengths: a length ({int(lengths.max())}) exceeds the time dimension of x "
                    f"({steps})"
                )
            mask = lengths_to_mask(lengths.to(x.device).long(), steps)
        if mask is None:
            mask = torch.ones(num, steps, dtype=torch.bool, device=x.device)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point() and not mask.is_complex():
            # user data: a 0/1 integer mask is read as bool (documented), anything else is not
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("mask: expected a boolean (or 0/1 integer) tensor")
            mask = mask.bool()
        check_mask(mask, (num, steps))
        self.x = x
        self.mask = mask.to(x.device)
        # Lengths as "last True step + 1": for right-padded data this is the length; the trailing
        # all-padding steps of a batch are trimmed with it. Kept on the CPU (bookkeeping only).
        steps_idx = torch.arange(1, steps + 1, device=x.device)
        self.lengths = (self.mask.long() * steps_idx).amax(dim=1).cpu()
        # Observed steps per sequence, the one "per step" of pyrossm: steps inside the mask with
        # at least one observed entry (a step whose entries are all NaN is not counted).
        observed = self.mask
        if x.is_floating_point():
            observed = observed & ~torch.isnan(x).reshape(num, steps, -1).all(-1)
        self.num_steps = observed.sum(dim=1).cpu()

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device) -> "SequenceDataset":
        """A copy on ``device`` (self if already there)."""
        device = torch.device(device)
        if self.x.device == device:
            return self
        out = SequenceDataset.__new__(SequenceDataset)
        out.x, out.mask = self.x.to(device), self.mask.to(device)
        out.lengths, out.num_steps = self.lengths, self.num_steps
        return out

    def batch(
        self, index: torch.Tensor, trim: bool = True, device_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x[index], mask[index])``, trimmed to the longest sequence of the batch if ``trim``.

        ``index`` is a 1-D long tensor (on any device); ``device_index``, if given, is the same
        index already on the data's device (saves a host-to-device copy per batch).
        """
        cpu_index = index.cpu() if index.device.type != "cpu" else index
        if device_index is not None:
            dev_index = device_index
        else:
            dev_index = index if index.device == self.x.device else index.to(self.x.device)
        x, mask = self.x[dev_index], self.mask[dev_index]
        if trim:
            t = max(int(self.lengths[cpu_index].max()), 1)
            if t < x.shape[1]:
                x, mask = x[:, :t], mask[:, :t]
        return x, mask


def as_dataset(data, name: str = "data") -> SequenceDataset:
    """Turn ``data`` into a :class:`SequenceDataset`.

    Accepted: a tensor ``x``; a tuple ``(x, mask)`` with a ``(N, T)`` bool mask; a tuple
    ``(x, lengths)`` with 1-D integer lengths; a list of variable-length sequences (tensors or
    NumPy arrays), each
    ``(T_i, obs_dim)`` float or ``(T_i,)`` token ids (right-padded by :func:`pad_sequences`);
    a :class:`SequenceDataset`.

    >>> as_dataset([torch.zeros(2, 3), torch.zeros(4, 3)]).lengths.tolist()
    [2, 4]
    """
    if isinstance(data, SequenceDataset):
        return data
    if isinstance(data, torch.Tensor):
        return SequenceDataset(data)
    if isinstance(data, list) and data and all(isinstance(s, np.ndarray) for s in data):
        # NumPy arrays keep their dtype (float64 stays float64; fit converts with a warning)
        data = [torch.from_numpy(s) for s in data]
    if isinstance(data, list) and data and all(isinstance(s, torch.Tensor) for s in data):
        first = data[0]
        ndim = 2 if first.is_floating_point() else 1
        if all(s.dim() == ndim for s in data):  # a list of sequences, not (x, mask)
            shapes = {tuple(s.shape[1:]) for s in data}
            if len(shapes) > 1:
                raise ValueError(f"{name}: expected a list of (T_i, obs_dim) sequences with one "
                                 f"obs_dim, got trailing shapes {sorted(shapes)}")
            return SequenceDataset(*pad_sequences(data))
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, second = data
        if second is None:
            return SequenceDataset(x)
        if not isinstance(second, torch.Tensor):
            raise TypeError(
                f"{name}: expected (x, mask) or (x, lengths) tensors, got second element of type "
                f"{type(second).__name__}"
            )
        if second.dim() == 1 and second.dtype != torch.bool:
            return SequenceDataset(x, lengths=second)
        return SequenceDataset(x, mask=second)
    raise TypeError(
        f"{name}: expected a tensor x, a tuple (x, mask), a tuple (x, lengths) or a "
        f"SequenceDataset, got {type(data).__name__}"
    )


def _first_attr(module, names):
    for n in names:
        value = getattr(module, n, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return n, value
    return None, None


def check_compatible(data: SequenceDataset, model, guide, name: str = "train_data"):
    """Check ``data`` against the model and guide modules before training; returns the data.

    * Float data whose dtype differs from the modules' parameters are converted to it (with a
      warning naming ``name``): float64 arrays into a float32 model are the usual case.
    * ``obs_dim`` of the model or guide (if they have one) must equal ``x.shape[-1]``.
    * The guide's latent size (``state_dim``) must equal the model's (``z_dim``/``state_dim``).
    * Warnings: every entry missing (NaN); observed entries far from standardised (a feature
      with ``|mean| > 10`` or ``std > 10``: optimisers and initialisations assume unit scale).
    """
    params = [p for m in (model, guide) for p in m.parameters() if p.is_floating_point()]
    x = data.x
    if x.is_floating_point() and params and x.dtype != params[0].dtype:
        dtype = params[0].dtype
        warnings.warn(f"{name}: converted from {x.dtype} to {dtype}, the dtype of the model's "
                      f"and guide's parameters (convert the data, or the modules with "
                      f".to({x.dtype}), to choose)", stacklevel=3)
        out = SequenceDataset.__new__(SequenceDataset)
        out.__dict__.update(data.__dict__)
        out.x = x.to(dtype)
        data, x = out, out.x
    if x.is_floating_point():
        for who, module in (("model", model), ("guide", guide)):
            obs_dim = getattr(module, "obs_dim", None)
            if isinstance(obs_dim, int) and obs_dim != x.shape[-1]:
                raise ValueError(f"{name}: expected obs_dim = {obs_dim} (the {who}'s) in x of "
                                 f"shape (batch, time, obs_dim), got shape {tuple(x.shape)}")
    m_name, m_dim = _first_attr(model, ("z_dim", "state_dim", "latent_dim"))
    g_name, g_dim = _first_attr(guide, ("state_dim", "z_dim", "latent_dim"))
    if m_dim is not None and g_dim is not None and m_dim != g_dim:
        raise ValueError(f"guide: expected {g_name} = {m_dim} (the model's {m_name}), got "
                         f"{g_dim}")
    if x.is_floating_point():
        observed = ~torch.isnan(x) & data.mask.unsqueeze(-1)
        if not bool(observed.any()):
            warnings.warn(f"{name}: every entry is missing (NaN or masked): there is nothing "
                          f"to learn from", stacklevel=3)
        else:
            counts = observed.sum((0, 1)).clamp_min(1)
            x0 = torch.where(observed, x, x.new_zeros(()))
            mean = x0.sum((0, 1)) / counts
            std = (torch.where(observed, x - mean, x.new_zeros(())).pow(2).sum((0, 1))
                   / counts).sqrt()
            bad = ((mean.abs() > 10) | (std > 10)).nonzero().flatten().tolist()
            if bad:
                warnings.warn(
                    f"{name}: features {bad[:10]} are far from standardised (mean "
                    f"{[round(float(mean[i]), 3) for i in bad[:3]]}, std "
                    f"{[round(float(std[i]), 3) for i in bad[:3]]}); training usually works "
                    f"better on (x - mean) / std", stacklevel=3)
    return data


def pad_sequences(
    sequences: Sequence[torch.Tensor], padding_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of ``(T_i, ...)`` tensors to ``(N, max T_i, ...)``; returns ``(x, mask)``.

    >>> x, mask = pad_sequences([torch.ones(2, 1), torch.ones(3, 1)])
    >>> tuple(x.shape), mask.sum(1).tolist()
    ((2, 3, 1), [2, 3])
    """
    if len(sequences) == 0:
        raise ValueError("sequences: expected at least one sequence, got none")
    lengths = torch.tensor([s.shape[0] for s in sequences])
    x = torch.nn.utils.rnn.pad_sequence(
        list(sequences), batch_first=True, padding_value=padding_value
    )
    return x, lengths_to_mask(lengths.to(x.device), x.shape[1])


def batch_indices(
    dataset: SequenceDataset,
    batch_size: int,
    shuffle: bool = True,
    bucket: bool = False,
    bucket_batches: int = 20,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield 1-D CPU index tensors covering the dataset once.

    :param shuffle: random order (drawn from ``generator`` or torch's global RNG).
    :param bucket: length bucketing: the (shuffled) indices are cut into chunks of
        ``batch_size * bucket_batches``, each chunk is sorted by length and cut into batches, and
        the batches are shuffled; a batch then holds sequences of similar lengths.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if not bucket:
        yield from order.split(batch_size)
        return
    batches = []
    for chunk in order.split(batch_size * max(int(bucket_batches), 1)):
        by_length = chunk[torch.argsort(dataset.lengths[chunk], stable=True)]
        batches.extend(by_length.split(batch_size))
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    yield from batches


def repeat_particles(
    x: torch.Tensor, mask: torch.Tensor | None, num_particles: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Repeat each sequence ``num_particles`` times along the batch (``repeat_interleave``).

    Row ``b * K + k`` is particle ``k`` of sequence ``b``, so a per-row quantity ``v`` of shape
    ``(B * K,)`` is viewed per sequence with ``v.reshape(B, K)``.
    """
    if num_particles == 1:
        return x, mask
    x = x.repeat_interleave(num_particles, dim=0)
    if mask is not None:
        mask = mask.repeat_interleave(num_particles, dim=0)
    return x, mask


class Chunks(NamedTuple):
    """Result of :func:`chunk_sequences`.

    ``x`` ``(M, L, ...)``, ``mask`` ``(M, L)`` bool, and for each chunk the row of the original
    batch it comes from (``sequence``, ``(M,)`` long) and its first time step (``start``).
    """

    x: torch.Tensor
    mask: torch.Tensor
    sequence: torch.Tensor
    start: torch.Tensor


def chunk_sequences(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    chunk_length: int,
    overlap: int = 0,
    drop_empty: bool = False,
) -> Chunks:
    """Cut sequences ``x`` of shape ``(N, T, ...)`` (time at dim 1) into chunks of ``L`` steps.

    With ``overlap = 0`` the result has ``N * ceil(T / L)`` chunks of shape ``(L, ...)``, ordered
    sequence by sequence; chunk ``k`` of sequence ``n`` holds steps ``k L .. k L + L - 1``. The
    last chunk is right-padded with zeros whose mask is False, and the chunks keep the original
    mask, so padding never enters the ELBO and the total number of observed steps is unchanged.
    With ``overlap = o`` (``0 <= o < L``) consecutive chunks share ``o`` steps (stride ``L - o``,
    ``ceil((max(T - o, 1)) / (L - o))`` chunks per sequence): the shared steps give each chunk
    some context, but they are observed in two chunks and so counted twice by a chunked ELBO.

    Training on chunks is truncated backpropagation through time: a chunk is an independent
    sequence, so its latent state restarts from the model's initial state (an approximation;
    see :func:`pyrossm.infer.fit`).

    :param x: ``(N, T, D)`` float or ``(N, T)`` token ids.
    :param mask: ``(N, T)`` bool (True = real step) or None (all True).
    :param drop_empty: drop chunks without any True step (e.g. beyond a short sequence's end).

    >>> c = chunk_sequences(torch.zeros(2, 5, 1), torch.tensor([[1, 1, 1, 1, 1],
    ...                     [1, 1, 0, 0, 0]]).bool(), 2)
    >>> tuple(c.x.shape), c.mask.sum(1).tolist(), c.start.tolist()
    ((6, 2, 1), [2, 2, 1, 2, 0, 0], [0, 2, 4, 0, 2, 4])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (N, T, ...), got "
                        f"{type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (N, T, ...) with time at dim 1, got "
                         f"{tuple(x.shape)}")
    if not isinstance(chunk_length, int) or isinstance(chunk_length, bool) or chunk_length < 1:
        raise ValueError(f"chunk_length: expected a positive integer, got {chunk_length!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not (
            0 <= overlap < chunk_length):
        raise ValueError(f"overlap: expected an integer in [0, chunk_length = {chunk_length}), "
                         f"got {overlap!r}")
    num, steps = x.shape[0], x.shape[1]
    if num == 0 or steps == 0:
        raise ValueError(f"x: expected at least one sequence of at least one step, got shape "
                         f"{tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(num, steps, dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != (num, steps):
        raise ValueError(f"mask: expected shape (N, T) = {(num, steps)}, got "
                         f"{tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise TypeError(f"mask: expected a bool (or 0/1 integer) tensor, got {mask.dtype}")
        mask = mask.bool()
    mask = mask.to(x.device)
    stride = chunk_length - overlap
    per_seq = math.ceil(max(steps - overlap, 1) / stride)
    padded = (per_seq - 1) * stride + chunk_length
    if padded > steps:
        x = torch.cat([x, x.new_zeros((num, padded - steps) + tuple(x.shape[2:]))], dim=1)
        mask = torch.cat([mask, mask.new_zeros(num, padded - steps)], dim=1)
    # unfold puts the window at the end: (N, per_seq, ..., L) -> (N, per_seq, L, ...)
    xc = x.unfold(1, chunk_length, stride).movedim(-1, 2)
    mc = mask.unfold(1, chunk_length, stride)
    xc = xc.reshape((num * per_seq, chunk_length) + tuple(x.shape[2:]))
    mc = mc.reshape(num * per_seq, chunk_length)
    sequence = torch.arange(num, device=x.device).repeat_interleave(per_seq)
    start = (torch.arange(per_seq, device=x.device) * stride).repeat(num)
    if drop_empty:
        keep = mc.any(dim=1)
        if not bool(keep.any()):
            raise ValueError("mask: every chunk is empty (mask has no True step)")
        xc, mc, sequence, start = xc[keep], mc[keep], sequence[keep], start[keep]
    return Chunks(xc.contiguous(), mc.contiguous(), sequence, start)
