"""Neural networks of the sequence VAE: a recurrent encoder and an autoregressive decoder.

Shapes: inputs ``(batch, time, dim)`` (time at dim -2), token ids ``(batch, time)``; recurrent
states ``(num_layers, batch, hidden)`` (a pair ``(h, c)`` for an LSTM).

* :class:`SequenceEncoder` — ``h_t = RNN(e_t, h_{t-1})``; the top-layer output at the last real step
  ``h_T`` gives ``q(z | x) = N(μ(h_T), diag σ²(h_T))`` (Bowman et al. 2016, §3).
* :class:`RecurrentDecoder` — ``h_0 = W_h z + b_h`` (and ``c_0`` for an LSTM; a learned constant
  when there is no latent), ``h_t = RNN([e_{t-1}; z], h_{t-1})`` with the optional ``z`` input.
* :class:`TokenDecoder` — embeddings + :class:`RecurrentDecoder` + a softmax layer over the
  vocabulary, with word dropout, teacher forcing, scheduled sampling and one-step decoding.

Reference: S. Bowman et al., "Generating sentences from a continuous space", CoNLL 2016;
S. Bengio et al., "Scheduled sampling for sequence prediction with RNNs", NeurIPS 2015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CELLS", "RecurrentDecoder", "SequenceEncoder", "TokenDecoder", "make_rnn"]

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
SCALE_FLOOR = 1e-4


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1) -> nn.RNNBase:
    """A batch-first recurrent network: ``cell`` is ``"lstm"`` (default elsewhere), ``"gru"`` or
    ``"rnn"`` (tanh)."""
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {cell!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
    return CELLS[cell](input_size, hidden_size, num_layers=num_layers, batch_first=True)


class SequenceEncoder(nn.Module):
    """``q(z | x) = N(μ(h_T), diag σ²(h_T))`` from the last real step of a recurrent network.

    ``forward(inputs, lengths)``: ``inputs`` ``(batch, time, input_dim)``, ``lengths`` ``(batch,)``
    (≥ 1) → ``(loc, scale)`` each ``(batch, latent_dim)``. The network is unidirectional, so the
    state at step ``lengths - 1`` does not depend on the padding after it.
    """

    def __init__(self, input_dim, hidden_dim, latent_dim, cell="lstm", num_layers=1):
        super().__init__()
        self.rnn = make_rnn(cell, input_dim, hidden_dim, num_layers)
        self.to_loc = nn.Linear(hidden_dim, latent_dim)
        self.to_scale = nn.Linear(hidden_dim, latent_dim)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor):
        out, _ = self.rnn(inputs)  # (batch, time, hidden)
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        h = out.gather(1, last).squeeze(1)
        return self.to_loc(h), F.softplus(self.to_scale(h)) + SCALE_FLOOR


class RecurrentDecoder(nn.Module):
    """A recurrent network whose initial state is an affine function of ``z`` (or learned).

    ``init_state(z, batch)`` → state; ``forward(inputs, z, state)`` → ``(outputs, state)`` with
    ``inputs`` ``(batch, time, input_dim)``, ``z`` ``(batch, latent_dim)`` or ``None``,
    ``outputs`` ``(batch, time, hidden_dim)``.
    """

    def __init__(
        self, input_dim, hidden_dim, latent_dim=0, cell="lstm", num_layers=1, z_to_inputs=False
    ):
        super().__init__()
        self.cell, self.num_layers, self.hidden_dim = cell, num_layers, hidden_dim
        self.latent_dim = latent_dim
        self.z_to_inputs = bool(z_to_inputs and latent_dim > 0)
        rnn_in = input_dim + (latent_dim if self.z_to_inputs else 0)
        self.rnn = make_rnn(cell, rnn_in, hidden_dim, num_layers)
        n_states = 2 if cell == "lstm" else 1
        if latent_dim > 0:
            self.z_to_state = nn.Linear(latent_dim, n_states * num_layers * hidden_dim)
        else:
            self.state0 = nn.Parameter(torch.zeros(n_states, num_layers, 1, hidden_dim))

    def init_state(self, z: torch.Tensor | None, batch: int):
        L, H = self.num_layers, self.hidden_dim
        if self.latent_dim > 0:
            if z is None or z.dim() != 2 or z.shape[-1] != self.latent_dim:
                raise ValueError(
                    f"z: expected shape (batch, {self.latent_dim}), got "
                    f"{None if z is None else tuple(z.shape)}"
                )
            s = self.z_to_state(z).view(z.shape[0], -1, L, H).permute(1, 2, 0, 3)
            s = s.contiguous()
        else:
            s = self.state0.expand(-1, -1, batch, -1).contiguous()
        if self.cell == "lstm":
            return (torch.tanh(s[0]), s[1])
        return torch.tanh(s[0])

    def forward(self, inputs: torch.Tensor, z: torch.Tensor | None, state=None):
        if state is None:
            state = self.init_state(z, inputs.shape[0])
        if self.z_to_inputs:
            zz = z.unsqueeze(-2).expand(*inputs.shape[:-1], z.shape[-1])
            inputs = torch.cat([inputs, zz], dim=-1)
        return self.rnn(inputs, state)


class TokenDecoder(nn.Module):
    """``p(x_t | x_<t, z) = softmax(W h_t + b)``, ``h_t = RNN([emb(x_{t-1}); z], h_{t-1})``,
    ``x_0 = <sos>``.

    Parameters: ``vocab_size, embed_dim, hidden_dim, latent_dim`` (0: a language model),
    ``cell``, ``num_layers``, ``z_to_inputs``, and the ids ``sos_id, unk_id, pad_id``.
    """

    def __init__(
        self,
        vocab_size,
        embed_dim,
        hidden_dim,
        latent_dim,
        sos_id,
        unk_id,
        pad_id,
        cell="lstm",
        num_layers=1,
        z_to_inputs=False,
    ):
        super().__init__()
        self.sos_id, self.unk_id, self.pad_id = sos_id, unk_id, pad_id
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.rnn = RecurrentDecoder(
            embed_dim, hidden_dim, latent_dim, cell, num_layers, z_to_inputs
        )
        self.output = nn.Linear(hidden_dim, vocab_size)

    def decoder_inputs(self, x: torch.Tensor, word_dropout: float = 0.0) -> torch.Tensor:
        """``(<sos>, x_1, …, x_{T-1})``, each word replaced by ``<unk>`` w.p. ``word_dropout``."""
        sos = torch.full_like(x[:, :1], self.sos_id)
        inputs = torch.cat([sos, x[:, :-1]], dim=1)
        if word_dropout > 0:
            drop = torch.rand(inputs.shape, device=x.device) < word_dropout
            drop[:, 0] = False
            inputs = inputs.masked_fill(drop, self.unk_id)
        return inputs

    def teacher_forcing_logits(self, x, z, word_dropout=0.0) -> torch.Tensor:
        """Logits ``(batch, T, vocab)`` of ``p(x_t | x_<t, z)`` for every t in one RNN call."""
        out, _ = self.rnn(self.embedding(self.decoder_inputs(x, word_dropout)), z)
        return self.output(out)

    def scheduled_sampling_logits(self, x, z, teacher_prob: float, word_dropout=0.0):
        """Logits ``(batch, T, vocab)`` when step t reads the true ``x_{t-1}`` with probability
        ``teacher_prob`` and otherwise a token sampled from the model's own ``p(x_{t-1} | …)``
        (Bengio et al. 2015). Sequential over time; the sampled tokens are not differentiated."""
        inputs = self.decoder_inputs(x, word_dropout)
        state = self.rnn.init_state(z, x.shape[0])
        logits = []
        prev = inputs[:, 0]
        for t in range(x.shape[1]):
            step_logits, state = self.step(prev, z, state)
            logits.append(step_logits)
            if t + 1 < x.shape[1]:
                with torch.no_grad():
                    own = torch.distributions.Categorical(logits=step_logits).sample()
                    coin = torch.rand(own.shape, device=x.device) < teacher_prob
                prev = torch.where(coin, inputs[:, t + 1], own)
        return torch.stack(logits, dim=1)

    def step(self, tokens: torch.Tensor, z: torch.Tensor | None, state):
        """One decoding step: ``tokens`` ``(n,)`` → ``(logits (n, vocab), state)``."""
        out, state = self.rnn(self.embedding(tokens).unsqueeze(1), z, state)
        return self.output(out.squeeze(1)), state
