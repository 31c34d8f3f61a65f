"""The contract between pyrossm's models, guides, the training loop and the evaluators.

Every sequential model in pyrossm (``LinearGaussianSSM``, ``LSTMStateSpaceModel``,
``DeepMarkovModel``, ``SequenceVAE``, ``LSTMLanguageModel``) and every guide follows it, so
that the one training loop :func:`pyrossm.infer.fit` and the evaluators
(:func:`pyrossm.infer.log_likelihood`, :func:`pyrossm.infer.elbo`) work with all of them.

Data
----
* Sequences are batched with time at dim -2: ``x`` has shape ``(batch, time, obs_dim)``
  (float), or ``(batch, time)`` of token ids (long) for language models.
* ``mask`` has shape ``(batch, time)``, dtype bool; ``True`` marks steps that belong to the
  sequence. Variable-length sequences are right-padded and their padding is ``False``; a padded
  step contributes **nothing** to any log-density (neither latent nor observed terms), so the
  ELBO of a padded batch equals the ELBO of the unpadded sequences. ``mask=None`` means all True.
* Missing observations *inside* a sequence are ``NaN`` entries of ``x`` (float data only): the
  latent state still evolves there, only the observation term is dropped. (The exact Kalman
  functions in :mod:`pyrossm.lgssm` also accept a mask meaning "not observed"; for trailing
  padding the two meanings give the same log-likelihood.)
* Helpers: :func:`lengths_to_mask`.

Models and guides
-----------------
* Both are ``torch.nn.Module`` s (usually ``pyro.nn.PyroModule``) and own **all** of their
  parameters (never ``pyro.param`` on the global store outside a module), so ``.to(device)``,
  ``state_dict()`` and checkpoints work. Tensors made inside ``model``/``guide`` are created on
  the device of the inputs (``x.device``), never on the CPU by default.
* Call signature ``model(x, mask=None)`` and ``guide(x, mask=None)``; both return ``None`` or
  the sampled latent. Extra keyword arguments are allowed but must have defaults.
* One ``pyro.plate("sequences", batch, dim=-1)`` over the batch; ``max_plate_nesting = 1``.
* The whole latent trajectory is **one** sample site named ``"z"`` whose distribution has
  ``batch_shape == (batch,)`` and ``event_shape == (time, state_dim)`` (for a sequence VAE:
  event_shape ``(latent_dim,)``), with ``log_prob`` vectorized over time and honouring ``mask``.
  Observations are one site named ``"x"`` with ``obs=`` set, its ``log_prob`` of shape
  ``(batch,)`` (the sum over the sequence's observed steps).
* Models and guides only need to handle a single leading batch dimension: the training loop
  implements several ELBO particles and the importance-weighted estimator by repeating the batch
  (``x.repeat_interleave``), not by adding plates.
* Annealing: the training loop scales every *unobserved* site (in model and guide) by the KL
  factor with a messenger; models do not need to know about annealing.
* ``model.num_observed_steps(x, mask)`` is not required; per-step figures divide by
  ``mask.sum()`` (or the number of tokens, for language models).
"""

from __future__ import annotations

import torch

__all__ = ["lengths_to_mask"]


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Boolean mask ``(batch, max_len)`` that is True at steps ``t < lengths[b]``.

    >>> lengths_to_mask(torch.tensor([1, 3]))
    tensor([[ True, False, False],
            [ True,  True,  True]])
    """
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError(
            f"lengths: expected a 1-D tensor of sequence lengths, got "
            f"{type(lengths).__name__} with shape {getattr(lengths, 'shape', None)}"
        )
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths: expected non-negative lengths, got min {int(lengths.min())}")
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    steps = torch.arange(max_len, device=lengths.device)
    return steps < lengths.unsqueeze(-1)
