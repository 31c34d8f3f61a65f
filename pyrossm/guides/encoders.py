"""Recurrent encoders of observation sequences, shared by the guides.

:class:`RecurrentEncoder` turns ``x (batch, T, obs_dim)`` (time at dim -2) into features
``h (batch, T, hidden_dim)``: run forwards, ``h_t`` summarises ``x_{1:t}``; run backwards
(``reverse=True``), ``h_t`` summarises ``x_{t:T}`` -- within each sequence's own length, so right
padding never reaches a valid step. Missing entries (``NaN``) are zero-filled and a per-entry
"missing" indicator is appended to the input. Initial hidden (and cell) states are learned.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CELLS", "LinearRecurrence", "RecurrentEncoder", "prepare_inputs", "reverse_padded"]

CELLS = ("lstm", "gru", "rnn", "relu", "linear")


def prepare_inputs(x: torch.Tensor, missing_indicators: bool = True) -> torch.Tensor:
    """``(batch, T, p)`` with NaN → zero-filled ``(batch, T, p)``, or ``(batch, T, 2p)`` with
    the missing indicators appended."""
    missing = torch.isnan(x)
    filled = torch.where(missing, x.new_zeros(()), x)
    if not missing_indicators:
        return filled
    return torch.cat([filled, missing.to(x.dtype)], dim=-1)


def reverse_padded(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reverse each sequence of ``x (batch, T, ...)`` within its length (``mask`` right-padded).

    Padded steps stay at the end, so a forward recursion over the result sees
    ``x_T, ..., x_1`` and only then the padding. The operation is its own inverse.

    >>> x = torch.arange(4.).reshape(1, 4, 1)
    >>> reverse_padded(x, torch.tensor([[True, True, True, False]])).flatten().tolist()
    [2.0, 1.0, 0.0, 3.0]
    """
    if mask is None:
        return x.flip(1)
    T = x.shape[1]
    lengths = mask.sum(-1, keepdim=True)  # (batch, 1)
    steps = torch.arange(T, device=x.device)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (batch, T)
    index = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand_as(x)
    return x.gather(1, index)


def _check_right_padded(mask: torch.Tensor, x: torch.Tensor) -> None:
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask: expected shape (batch, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask: expected right padding (True steps first, then False), got a gap")


class LinearRecurrence(nn.Module):
    r"""Stack of linear recurrences :math:`h_t = W_h h_{t-1} + W_u u_t + b` (``batch_first``).

    No nonlinearity: every feature is an affine function of the inputs, which is what an exact
    LGSSM filter/smoother needs (in steady state the Kalman mean recursions are of this form).
    Same call convention as :class:`torch.nn.RNN`: ``(u, h0) -> (h, h_last)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, num_layers: int = 1):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * num_layers
        self.inputs = nn.ModuleList(nn.Linear(d, hidden_dim) for d in dims[:-1])
        self.recurrent = nn.ModuleList(
            nn.Linear(hidden_dim, hidden_dim, bias=False) for _ in dims[1:]
        )
        for lin in self.recurrent:
            nn.init.zeros_(lin.weight)

    def forward(self, u, h0):
        last = []
        for layer, (w_u, w_h) in enumerate(zip(self.inputs, self.recurrent)):
            drive = w_u(u)  # (batch, T, hidden), all steps at once
            h, out = h0[layer], []
            for t in range(u.shape[1]):
                h = drive[:, t] + w_h(h)
                out.append(h)
            u = torch.stack(out, dim=1) if out else drive
            last.append(h)
        return u, torch.stack(last)


class RecurrentEncoder(nn.Module):
    r"""Features :math:`h_t = \mathrm{RNN}(u_t, h_{t\mp1})` of an observed sequence.

    Args:
        obs_dim: ``p``, size of each observation ``x_t``.
        hidden_dim: size of ``h_t``.
        num_layers: stacked recurrent layers.
        cell: ``"lstm"`` (default), ``"gru"``, ``"rnn"`` (tanh), ``"relu"`` (a plain ReLU RNN,
            :math:`h_t = \max(0, W_u u_t + W_h h_{t\mp1} + b)`, as in Pyro's DMM example) or
            ``"linear"`` (:class:`LinearRecurrence`).
        reverse: run from ``t = T`` down to 1 (``h_t`` summarises ``x_{t:T}``).
        missing_indicators: append the NaN indicators to the input.

    ``forward(x, mask=None)``: ``x (batch, T, p)`` → ``h (batch, T, hidden_dim)``.

    >>> enc = RecurrentEncoder(3, 8, reverse=True)
    >>> enc(torch.randn(2, 5, 3)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(
        self, obs_dim, hidden_dim, num_layers=1, cell="lstm", reverse=False, missing_indicators=True
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
        for name, value in (
            ("obs_dim", obs_dim),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.obs_dim, self.hidden_dim, self.num_layers = obs_dim, hidden_dim, num_layers
        self.cell, self.reverse, self.missing_indicators = cell, reverse, missing_indicators
        input_dim = obs_dim * (2 if missing_indicators else 1)
        if cell == "linear":
            self.rnn = LinearRecurrence(input_dim, hidden_dim, num_layers)
        else:
            rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "relu": nn.RNN}[cell]
            extra = {"nonlinearity": "relu"} if cell == "relu" else {}
            self.rnn = rnn_class(
                input_dim, hidden_dim, num_layers=num_layers, batch_first=True, **extra
            )
        self.h0 = nn.Parameter(torch.zeros(num_layers, hidden_dim))
        if cell == "lstm":
            self.c0 = nn.Parameter(torch.zeros(num_layers, hidden_dim))

    def initial_state(self, batch_size: int):
        h0 = self.h0.unsqueeze(1).expand(-1, batch_size, -1).contiguous()
        if self.cell == "lstm":
            return h0, self.c0.unsqueeze(1).expand(-1, batch_size, -1).contiguous()
        return h0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"x: expected a floating-point tensor of shape (batch, T, {self.obs_dim}), got "
                f"{getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.dim() != 3 or x.shape[-1] != self.obs_dim or x.shape[1] == 0:
            raise ValueError(
                f"x: expected shape (batch, T >= 1, obs_dim={self.obs_dim}), got {tuple(x.shape)}"
            )
        if mask is not None:
            _check_right_padded(mask, x)
        u = prepare_inputs(x, self.missing_indicators)
        if self.reverse:
            u = reverse_padded(u, mask)
        h, _ = self.rnn(u, self.initial_state(x.shape[0]))
        if self.reverse:
            h = reverse_padded(h, mask)
        return h
