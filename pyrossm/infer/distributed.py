"""Data-parallel training helpers for :func:`pyrossm.infer.fit` under ``torchrun``.

What :func:`~pyrossm.infer.fit` does with ``distributed=True`` (or automatically when the
environment variable ``WORLD_SIZE`` is larger than 1, as ``torchrun`` sets it):

* :func:`setup` initialises ``torch.distributed`` if nobody has yet -- NCCL when training on
  CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the CPU -- from the usual environment
  variables ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (``LOCAL_RANK`` for the GPU).
* Sharding, like ``torch.utils.data.DistributedSampler`` but per *batch*: every rank draws the
  same permutation of the training set for an epoch (a private generator seeded with
  ``shuffle_seed + epoch``, :func:`global_batches`), cuts it into the same *global* batches of
  ``batch_size`` sequences, and takes its contiguous slice of each (:func:`shard`). The global
  batch is therefore exactly the batch a single process would use.
* Gradients: pyrossm's models and guides are Pyro modules called as functions inside a Pyro
  trace, not a ``forward`` that ``DistributedDataParallel`` could wrap, so instead of DDP's
  bucketed hooks the loop calls :func:`all_reduce_gradients` on the explicit parameter list after
  ``backward()`` and before the optimiser step -- the same arithmetic as DDP in one flat
  ``all_reduce``. pyrossm's loss is a *sum* over the batch's sequences (not a mean), so the
  gradients are *summed* over ranks: the result equals the single-process gradient of the same
  global batch exactly (DDP's averaging would be the same after scaling every rank's loss by the
  world size). A parameter without a gradient on every rank keeps ``grad = None``.
* Parameters and buffers are broadcast from rank 0 at the start (as DDP does), so all replicas
  start equal and, receiving equal gradients, stay equal.
* Scalars (epoch loss totals, validation ELBO sums, stop flags) are combined with
  :func:`all_reduce_sum` / :func:`all_reduce_min`; arbitrary objects (a checkpoint loaded by
  rank 0) with :func:`broadcast_object`.

Example (2 CPU processes)::

    torchrun --nproc_per_node=2 train.py        # train.py calls fit(..., distributed=True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "all_reduce_gradients",
    "all_reduce_min",
    "all_reduce_sum",
    "broadcast_modules",
    "broadcast_object",
    "global_batches",
    "setup",
    "shard",
    "wants_distributed",
]


@dataclass
class DistributedContext:
    """The process group a training run uses.

    ``rank`` / ``world_size`` of the default group, ``local_rank`` (GPU index on the node),
    ``backend`` (``"nccl"`` or ``"gloo"``), ``created`` (True if :func:`setup` initialised the
    group and :meth:`close` should destroy it) and the ``device`` of this process.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    created: bool
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes checkpoints, logs and progress bars."""
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if :func:`setup` created it.

        Every rank first waits at a barrier, so that no rank tears down its communication
        threads (and, on rank 0, the rendezvous store) while another still uses them -- a rank
        that exits early can make the others abort ("terminate called without an active
        exception").
        """
        if self.created and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
                self.created = False


def wants_distributed(distributed) -> bool:
    """``distributed`` if a bool, else (None) True iff ``WORLD_SIZE`` > 1 or a group exists."""
    if distributed is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size() > 1
        try:
            return int(os.environ.get("WORLD_SIZE", "1")) > 1
        except ValueError:
            raise ValueError(f"WORLD_SIZE: expected an integer environment variable, got "
                             f"{os.environ.get('WORLD_SIZE')!r}") from None
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected True, False or None, got {distributed!r}")
    return distributed


def setup(device) -> DistributedContext:
    """Initialise (or join) the default process group; returns the :class:`DistributedContext`.

    :param device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``. With CUDA, the
        process uses ``cuda:LOCAL_RANK`` and NCCL; otherwise the CPU and gloo.
    """
    if not dist.is_available():
        raise RuntimeError("distributed=True but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} was requested but no CUDA device is available")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    created = False
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise ValueError(
                f"distributed=True: torch.distributed is not initialised and the environment "
                f"variables {missing} are not set; launch with torchrun (e.g. `torchrun "
                f"--nproc_per_node=2 train.py`) or call torch.distributed.init_process_group "
                f"first"
            )
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    backend = str(dist.get_backend())
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("device: the process group uses NCCL, which needs CUDA tensors; got "
                         f"device {device!r}")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, backend,
                              created, dev)


def global_batches(dataset, batch_size: int, epoch: int, shuffle_seed: int,
                   shuffle: bool = True, bucket: bool = False) -> list[torch.Tensor]:
    """The global batches of ``epoch``: identical on every rank (CPU index tensors).

    The order comes from a private ``torch.Generator`` seeded with ``shuffle_seed + epoch``
    (the global RNG is not touched), as in ``DistributedSampler.set_epoch``.
    """
    from pyrossm.infer.data import batch_indices

    g = torch.Generator().manual_seed(int(shuffle_seed) + int(epoch))
    return list(batch_indices(dataset, batch_size, shuffle=shuffle, bucket=bucket, generator=g))


def shard(index: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (sizes differ by at most one; may be empty).

    >>> [shard(torch.arange(5), r, 2).tolist() for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    return index.tensor_split(world_size)[rank]


def all_reduce_gradients(params) -> None:
    """Sum the ``.grad`` of ``params`` over all ranks in place (one flat ``all_reduce``).

    A missing gradient counts as zero; a parameter that has no gradient on any rank keeps
    ``grad = None`` (so the optimiser skips it, as it would in a single process).
    """
    params = list(params)
    if not params:
        return
    ref = params[0]
    flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(
        p.numel(), dtype=p.dtype, device=p.device) for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
    dtypes = {t.dtype for t in flat}
    if len(dtypes) == 1:
        buffer = torch.cat(flat + [has])
        dist.all_reduce(buffer)
        grads, has = buffer[:-len(params)], buffer[-len(params):]
        pieces = grads.split([p.numel() for p in params])
    else:  # mixed precisions: one reduction per tensor
        pieces = []
        for t in flat:
            dist.all_reduce(t)
            pieces.append(t)
        dist.all_reduce(has)
    for p, g, h in zip(params, pieces, has.tolist(), strict=True):
        p.grad = g.view_as(p).clone() if h > 0 else None


def all_reduce_sum(values, device) -> list[float]:
    """Sum a list of Python numbers over the ranks (float64); returns the list of sums."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_min(value: bool, device) -> bool:
    """Logical AND of a flag over the ranks (e.g. "this rank's loss is finite")."""
    t = torch.tensor([1.0 if value else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; tensors should be on the CPU)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_modules(*modules: torch.nn.Module) -> None:
    """Copy every parameter and buffer of ``modules`` from rank 0 to all ranks."""
    seen = set()
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) in seen:
                    continue
                seen.add(id(t))
                dist.broadcast(t.data, src=0)
