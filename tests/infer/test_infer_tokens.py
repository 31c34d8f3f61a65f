"""A model without latent variables on token data (N, T) long: fit and the evaluators."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyrossm.infer import TrainingDivergedError, elbo, fit, kl_per_step, log_likelihood


class UnigramLM(PyroModule):
    """x_t ~ Categorical(softmax(logits)) independently; padded steps masked out."""

    def __init__(self, vocab):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, x, mask=None):
        if mask is None:
            mask = torch.ones_like(x, dtype=torch.bool)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            d = dist.Categorical(logits=self.logits.expand(x.shape + (len(self.logits),)))
            pyro.sample("x", d.mask(mask).to_event(1), obs=x)


class NoGuide(torch.nn.Module):
    def forward(self, x, mask=None):
        return None


def test_language_model_without_latents():
    torch.manual_seed(0)
    probs = torch.tensor([0.6, 0.3, 0.1])
    x = torch.multinomial(probs, 40 * 6, replacement=True).reshape(40, 6)
    lengths = torch.randint(1, 7, (40,))
    model = UnigramLM(3)
    hist = fit(model, NoGuide(), (x, lengths), epochs=40, batch_size=40, lr=0.1,
               progress=False, device="cpu")
    assert hist["train_kl"][-1] == 0.0
    mask = torch.arange(6) < lengths[:, None]
    counts = torch.bincount(x[mask], minlength=3).double()
    mle = (counts / counts.sum()).log()
    nll_mle = -(counts * mle).sum().item() / mask.sum().item()
    assert abs(hist["train_neg_elbo_per_step"][-1] - nll_mle) < 0.02
    ll = log_likelihood(model, NoGuide(), (x, lengths), num_samples=3)
    e = elbo(model, NoGuide(), (x, lengths))
    assert torch.allclose(ll, e) and (kl_per_step(model, NoGuide(), (x, lengths)) == 0).all()
    assert math.isfinite(ll.sum().item())


def test_data_outside_the_support_is_an_error_not_a_divergence():
    x = torch.tensor([[0, 1, 2], [1, 5, 0]])  # token 5 is outside a vocabulary of 3
    with pytest.raises(ValueError, match="support") as info:
        fit(UnigramLM(3), NoGuide(), x, epochs=1, batch_size=2, lr=0.1, progress=False,
            device="cpu", on_nan="skip")
    assert not isinstance(info.value, TrainingDivergedError)
