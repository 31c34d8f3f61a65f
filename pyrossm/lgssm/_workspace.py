"""Scratch buffers kept from call to call for the Kalman kernels' large temporaries (private,
but :func:`release_workspace` is public).

PyTorch allocates CPU memory with ``malloc``, and glibc hands large freed blocks back to the
system, so an array of a few MB is fresh memory on every call: one page fault per 4 KB on
first touch (about 3-4 µs each on the benchmark machine). The missing-data kernel keeps every
step's innovations and covariances in arrays of tens of MB (256 sequences x 1000 steps: some
60 MB, 15,000 faults per call, a third of its time). Arrays that never leave a call are taken
from here instead: one buffer per name and thread, grown to the largest size asked for and
reused. (JAX/XLA pools its buffers the same way; so does PyTorch's CUDA allocator, which is
why only CPU tensors come from here.)
"""

from __future__ import annotations

import math
import threading

import torch

# Arrays larger than this are allocated afresh every time (the buffers are held between calls).
MAX_BYTES = 1 << 28


class _Buffers(threading.local):
    def __init__(self):
        self.by_name = {}


_buffers = _Buffers()


def scratch(name, shape, dtype, device):
    """An uninitialised ``shape`` tensor for a temporary that does not outlive the caller's
    call and is not differentiated: a view of a buffer kept under ``name`` (per thread), or a
    new tensor for non-CPU devices and arrays above ``MAX_BYTES``. Contents are undefined;
    a later call with the same ``name`` overwrites them."""
    device = torch.device(device)
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or numel * itemsize > MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = _buffers.by_name.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        # a normal tensor even when the first call runs under torch.inference_mode(): an
        # inference tensor could not be written to by later calls outside it
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype, device=device)
        _buffers.by_name[name] = buf
    return buf[:numel].view(shape)


def release_workspace() -> int:
    """Free the scratch buffers the Kalman kernels keep between calls (this thread's) and return
    how many bytes they held. They are kept so that repeated calls do not pay for fresh memory
    (page faults); at most a few times the size of the largest batch's per-step innovations.

    >>> import pyrossm
    >>> pyrossm.lgssm.release_workspace() >= 0
    True
    """
    held = sum(b.numel() * b.element_size() for b in _buffers.by_name.values())
    _buffers.by_name.clear()
    return held
