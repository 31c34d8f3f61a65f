"""The one check of a ``mask`` argument, shared by every module that takes one.

A mask is a bool tensor over ``(batch..., time)``: True marks steps that belong to the sequence
(right padding is False) or, for the exact Kalman functions, steps that are observed. A mask
that is not a tensor or not bool raises ``TypeError``; one of the wrong shape ``ValueError``;
both name the argument and say what was expected and what was received.
"""

from __future__ import annotations

import torch

__all__ = ["check_mask"]


def check_mask(mask, shape, name: str = "mask", *, broadcast: bool = False):
    """Return ``mask`` unchanged (None passes) after checking its type and shape.

    ``shape``: the expected ``(batch..., T)``. With ``broadcast=True`` any shape that
    broadcasts with it and ends in ``T`` is accepted.

    >>> check_mask(torch.ones(2, 3, dtype=torch.bool), (2, 3)).shape
    torch.Size([2, 3])
    >>> check_mask(torch.ones(2, 3), (2, 3))
    Traceback (most recent call last):
    ...
    TypeError: mask: expected a bool tensor of shape (2, 3) (batch, time), got dtype torch.float32
    """
    if mask is None:
        return None
    shape = tuple(shape)
    expected = f"a bool tensor of shape {shape} (batch, time)"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected {expected}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected {expected}, got dtype {mask.dtype}")
    ok = tuple(mask.shape) == shape
    if broadcast and not ok and mask.dim() >= 1 and shape and mask.shape[-1] == shape[-1]:
        try:
            torch.broadcast_shapes(mask.shape, shape)
            ok = True
        except RuntimeError:
            ok = False
    if not ok:
        kind = "broadcastable with " if broadcast else ""
        raise ValueError(
            f"{name}: expected a bool tensor of shape {kind}{shape} (batch, time), "
            f"got shape {tuple(mask.shape)}"
        )
    return mask
