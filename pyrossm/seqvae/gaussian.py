"""Sequence VAE for real-valued sequences (Gaussian emissions).

Generative model (:class:`GaussianSequenceVAE`) for ``x_{1:T}``, ``x_t ∈ R^D``::

    z ~ N(0, I_latent_dim)
    h_0 = tanh(W_h z + b_h)                      (and c_0 = W_c z + b_c for an LSTM)
    h_t = RNN([u_{t-1}; z], h_{t-1}),  u_{t-1} = [x_{t-1} (NaN → 0); 1{x_{t-1} observed}],  u_0 = 0
    x_t ~ N(μ(h_t), diag σ²(h_t)),     σ = softplus(·) + 1e-4

Guide (:class:`GaussianSequenceVAEGuide`): ``q(z | x) = N(μ(h^e_T), diag σ²(h^e_T))`` with an
RNN over ``[x_t (NaN → 0); 1{x_t observed}]``.

Shapes: ``x`` ``(batch, T, D)`` float (time at dim -2), ``mask`` ``(batch, T)`` bool; NaN entries
are missing observations (no observation term, the decoder reads 0 and an indicator). Site ``"z"``:
batch_shape ``(batch,)``, event_shape ``(latent_dim,)``; site ``"x"``: ``log_prob`` ``(batch,)``.
``input_dropout`` (training only) zeroes whole decoder inputs ``u_{t-1}`` with that probability —
the analogue of word dropout.

Reference: S. Bowman et al., "Generating sentences from a continuous space", CoNLL 2016 (with
Gaussian instead of categorical emissions).

Example
-------
>>> import torch
>>> model = GaussianSequenceVAE(obs_dim=2, hidden_dim=8, latent_dim=3)
>>> guide = GaussianSequenceVAEGuide(obs_dim=2, hidden_dim=8, latent_dim=3)
>>> x = torch.randn(4, 5, 2)
>>> model.log_likelihood_given_z(x, None, guide.posterior(x)[0]).shape
torch.Size([4])
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .distributions import MaskedSequenceNormal
from .model import _unique_name
from .networks import SCALE_FLOOR, RecurrentDecoder, SequenceEncoder

__all__ = ["GaussianSequenceVAE", "GaussianSequenceVAEGuide", "check_real_sequences"]


def check_real_sequences(x: torch.Tensor, mask: torch.Tensor | None, obs_dim: int):
    """Validate ``x`` ``(batch, T, obs_dim)`` float and a right-padded mask; return
    ``(x, mask, lengths)``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(
            f"x: expected a float tensor of shape (batch, T, {obs_dim}), got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[-1] != obs_dim:
        raise ValueError(f"x: expected obs_dim {obs_dim} at dim -1, got shape {tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask: expected shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.bool()
    lengths = mask.sum(-1)
    if not torch.equal(torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(-1), mask):
        raise ValueError("mask: expected right padding (True steps first, then False)")
    return x, mask, lengths


def _features(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    observed = torch.isfinite(x) & mask.unsqueeze(-1)
    values = torch.where(observed, x, torch.zeros_like(x))
    return torch.cat([values, observed.to(x.dtype)], dim=-1)


class GaussianSequenceVAE(nn.Module):
    """The generative model ``p(z) p(x | z)`` above; ``forward(x, mask=None)``.

    Parameters: ``obs_dim``, ``hidden_dim``, ``latent_dim``, ``cell`` (``"lstm" | "gru" | "rnn"``),
    ``num_layers``, ``input_dropout`` (rate in [0, 1]), ``z_to_inputs``, ``name``.
    """

    def __init__(self, obs_dim, hidden_dim=64, latent_dim=8, cell="lstm", num_layers=1,
                 input_dropout=0.0, z_to_inputs=False, name=None):
        super().__init__()
        if latent_dim < 1 or obs_dim < 1:
            raise ValueError(f"obs_dim, latent_dim: expected >= 1, got {obs_dim}, {latent_dim}")
        if not 0.0 <= input_dropout <= 1.0:
            raise ValueError(f"input_dropout: expected a rate in [0, 1], got {input_dropout}")
        self.obs_dim, self.latent_dim = obs_dim, latent_dim
        self.input_dropout = float(input_dropout)
        self.decoder = RecurrentDecoder(2 * obs_dim, hidden_dim, latent_dim, cell, num_layers,
                                        z_to_inputs)
        self.to_loc = nn.Linear(hidden_dim, obs_dim)
        self.to_scale = nn.Linear(hidden_dim, obs_dim)
        self.pyro_name = name or _unique_name(type(self).__name__)

    @property
    def dtype(self):
        return self.to_loc.weight.dtype

    def emission(self, x, mask, z):
        """``(loc, scale)`` of ``p(x_t | x_<t, z)``, each ``(batch, T, obs_dim)``."""
        feats = _features(x, mask)
        inputs = torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], dim=1)
        if self.training and self.input_dropout > 0:
            keep = torch.rand(inputs.shape[:2], device=x.device) >= self.input_dropout
            inputs = inputs * keep.unsqueeze(-1).to(inputs.dtype)
        h, _ = self.decoder(inputs, z)
        return self.to_loc(h), F.softplus(self.to_scale(h)) + SCALE_FLOOR

    def log_likelihood_given_z(self, x, mask, z) -> torch.Tensor:
        """``log p(x | z)`` ``(batch,)``; no site is recorded."""
        x, mask, _ = check_real_sequences(x, mask, self.obs_dim)
        loc, scale = self.emission(x, mask, z)
        return MaskedSequenceNormal(loc, scale, mask).log_prob(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask, _ = check_real_sequences(x, mask, self.obs_dim)
        pyro.module(self.pyro_name, self)
        B = x.shape[0]
        with pyro.plate("sequences", B, dim=-1):
            loc = torch.zeros(B, self.latent_dim, dtype=x.dtype, device=x.device)
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            mu, sigma = self.emission(x, mask, z)
            pyro.sample("x", MaskedSequenceNormal(mu, sigma, mask), obs=x)
        return z

    @torch.no_grad()
    def generate(self, z: torch.Tensor, num_steps: int, mean: bool = False) -> torch.Tensor:
        """Sequences ``(n, num_steps, obs_dim)`` drawn from ``p(x | z)`` for ``z`` ``(n, latent)``
        (the emission means when ``mean=True``)."""
        n = z.shape[0]
        state = self.decoder.init_state(z, n)
        u = torch.zeros(n, 1, 2 * self.obs_dim, dtype=z.dtype, device=z.device)
        out = []
        for _ in range(num_steps):
            h, state = self.decoder(u, z, state)
            loc, scale = self.to_loc(h), F.softplus(self.to_scale(h)) + SCALE_FLOOR
            x = loc if mean else loc + scale * torch.randn_like(loc)
            out.append(x)
            u = torch.cat([x, torch.ones_like(x)], dim=-1)
        return torch.cat(out, dim=1)


class GaussianSequenceVAEGuide(nn.Module):
    """``q(z | x) = N(μ(h^e_T), diag σ²(h^e_T))`` over real-valued sequences (NaN = missing)."""

    def __init__(self, obs_dim, hidden_dim=64, latent_dim=8, cell="lstm", num_layers=1,
                 name=None):
        super().__init__()
        self.obs_dim, self.latent_dim = obs_dim, latent_dim
        self.encoder = SequenceEncoder(2 * obs_dim, hidden_dim, latent_dim, cell, num_layers)
        self.pyro_name = name or _unique_name(type(self).__name__)

    def posterior(self, x, mask=None):
        """``(loc, scale)`` of ``q(z | x)``, each ``(batch, latent_dim)``."""
        x, mask, lengths = check_real_sequences(x, mask, self.obs_dim)
        return self.encoder(_features(x, mask), lengths)

    def forward(self, x, mask=None):
        pyro.module(self.pyro_name, self)
        loc, scale = self.posterior(x, mask)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))
