"""Pyro handlers and trace-based objectives used by the training loop and the evaluators.

* :class:`LatentScaleMessenger` multiplies the scale of every *unobserved* sample site by a KL
  annealing factor ``beta`` (model and guide alike), leaving observed sites untouched.
* :func:`elbo_traces` runs the guide, replays the model against it (``poutine.trace`` +
  ``poutine.replay``, as Pyro's ``Trace_ELBO``) on a batch repeated ``K`` times (``K`` particles,
  each row scaled by ``1/K``: the vectorized-particle estimator).
* :func:`elbo_objective` turns the two traces into the loss of one step: the Trace_ELBO surrogate
  (score-function terms included), or the *free bits* objective (Kingma et al. 2016,
  "Improved variational inference with inverse autoregressive flow")::

      loss = -sum_b E_q log p(x_b | z_b) + B * max(lambda, mean_b KL_b)

  where ``KL_b = log q(z_b | x_b) - log p(z_b)`` (single-sample estimate summed over the latent
  sites) and ``lambda`` is in nats per sequence: below ``lambda`` the KL term has no gradient, so
  the encoder is not pushed to collapse onto the prior. (With annealing both sides are multiplied
  by ``beta``.) Per dimension (Kingma et al.'s groups of one coordinate each), the KL term is
  ``B * sum_j max(lambda, mean_b KL_bj)``: every coordinate may carry ``lambda`` nats for free,
  which spreads the information over many latent units instead of a few.
* :class:`FreeBitsELBO`: the same objective as a loss callable for ``pyro.infer.SVI``.
* :func:`site_log_probs_per_row` reduces a site's log-density to one number per batch row.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyrossm.infer.data import repeat_particles

__all__ = [
    "FreeBitsELBO",
    "LatentScaleMessenger",
    "StepObjective",
    "elbo_objective",
    "elbo_traces",
    "foreign_params",
    "latent_sites",
    "nonfinite_sites",
    "site_log_probs_per_row",
]


class LatentScaleMessenger(Messenger):
    """Multiply the log-density scale of every unobserved sample site by ``factor``.

    Used for KL annealing: under this handler the ELBO becomes
    ``E_q[log p(x|z)] - factor * (log q(z|x) - log p(z))``.

    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0., 1.))
    ...     pyro.sample("x", dist.Normal(0., 1.), obs=torch.tensor(0.))
    >>> with LatentScaleMessenger(0.25):
    ...     tr = poutine.trace(model).get_trace()
    >>> tr.nodes["z"]["scale"], tr.nodes["x"]["scale"]
    (0.25, 1.0)
    """

    def __init__(self, factor: float):
        factor = float(factor)
        if not factor >= 0.0:
            raise ValueError(f"factor: expected a non-negative annealing factor, got {factor}")
        super().__init__()
        self.factor = factor

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.factor * msg["scale"]


def latent_sites(trace):
    """Unobserved, non-subsample sample sites of a trace (name, site)."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            yield name, site


def site_log_probs_per_row(site, rows: int, key: str = "log_prob") -> torch.Tensor:
    """A site's log-density (``key``) reduced to shape ``(rows,)``: one value per batch row.

    Sites live in the ``"sequences"`` plate at dim -1, so ``log_prob`` has ``batch_shape`` ending
    in ``rows``; any further leading dims are summed. A site outside the plate (a scalar
    log-density) cannot be attributed to sequences and raises ``ValueError``.
    """
    lp = site[key]
    if key == "unscaled_log_prob" and site.get("mask") is not None:
        lp = torch.where(site["mask"], lp, lp.new_zeros(()))
    if lp.dim() == 0 or lp.shape[-1] != rows:
        if lp.dim() >= 1 and lp.shape[-1] == 1:
            lp = lp.expand(lp.shape[:-1] + (rows,))
        else:
            raise ValueError(
                f"site {site['name']!r}: expected a log-density with batch dim -1 of size {rows} "
                f"(the 'sequences' plate), got shape {tuple(lp.shape)}"
            )
    return lp.reshape(-1, rows).sum(0)


def elbo_traces(model, guide, x, mask, num_particles: int = 1, beta: float = 1.0):
    """Guide and replayed model traces on the batch repeated ``num_particles`` times.

    Log-densities of every row are scaled by ``1 / num_particles`` and those of unobserved sites
    by ``beta`` as well. Returns ``(model_trace, guide_trace)`` with ``log_prob`` (and the guide's
    ``score_parts``) computed; a site's ``unscaled_log_prob`` has neither scale.
    """
    xr, mr = repeat_particles(x, mask, num_particles)
    with poutine.scale(scale=1.0 / num_particles), LatentScaleMessenger(beta):
        return get_importance_trace("flat", 1, model, guide, (xr,), {"mask": mr})


class StepObjective(NamedTuple):
    """Result of :func:`elbo_objective` for one batch (sums over the batch's sequences).

    ``surrogate``: differentiate this. ``loss``: the (annealed, free-bits) objective value.
    ``neg_elbo``: the plain negative ELBO (beta = 1), averaged over particles. ``kl``: the summed
    single-sample ``log q(z|x) - log p(z)`` over latent sites, averaged over particles.
    """

    surrogate: torch.Tensor
    loss: torch.Tensor
    neg_elbo: torch.Tensor
    kl: torch.Tensor


_TRACE_ELBO = Trace_ELBO(max_plate_nesting=1)


FREE_BITS_PER = ("sequence", "dimension")


def elbo_objective(
    model_trace, guide_trace, num_particles: int = 1, beta: float = 1.0, free_bits=None,
    free_bits_per: str = "sequence",
) -> StepObjective:
    """Objective of one step from :func:`elbo_traces` output; see the module docstring.

    ``free_bits_per="dimension"`` applies ``lambda`` to every latent coordinate separately
    (the last event dimension of each latent site, which must be a diagonal distribution with
    ``event_dim == 1``, or a trajectory distribution with diagonal steps and a
    ``coordinate_log_prob`` -- then ``KL_bj`` sums over the steps): ``sum_j max(lambda,
    mean_b KL_bj)``.
    """
    if free_bits_per not in FREE_BITS_PER:
        raise ValueError(f"free_bits_per: expected one of {FREE_BITS_PER}, got {free_bits_per!r}")
    kl = 0.0
    for _, site in latent_sites(guide_trace):
        kl = kl + _masked(site["unscaled_log_prob"], site).sum()
    for _, site in latent_sites(model_trace):
        kl = kl - _masked(site["unscaled_log_prob"], site).sum()
    if not isinstance(kl, torch.Tensor):  # no latent site (e.g. a language model)
        kl = _any_tensor(model_trace).new_zeros(())
    kl = kl.detach() / num_particles
    if free_bits is None:
        # Pyro's Trace_ELBO estimator for one (vectorized) particle: reparameterized and
        # score-function terms.
        loss, surrogate = _TRACE_ELBO._differentiable_loss_particle(model_trace, guide_trace)
        if not isinstance(surrogate, torch.Tensor):
            surrogate = kl.new_tensor(surrogate)
        loss = surrogate.new_tensor(loss)
        neg_elbo = loss + (1.0 - beta) * kl
        return StepObjective(surrogate, loss, neg_elbo, kl)
    rec = 0.0
    for _, site in model_trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"]:
            rec = rec + site["log_prob_sum"]
    for name, site in latent_sites(guide_trace):
        if not site["fn"].has_rsample:
            raise NotImplementedError(
                f"free bits needs reparameterized latent sites; guide site {name!r} is not"
            )
    rows = _rows(model_trace)
    threshold = beta * float(free_bits) * (rows / num_particles)
    if free_bits_per == "dimension":
        kl_term = 0.0
        per_dim = {}
        for sign, trace in ((1.0, guide_trace), (-1.0, model_trace)):
            for name, site in latent_sites(trace):
                lp = sign * _log_prob_per_dimension(name, site)
                per_dim[name] = per_dim[name] + lp if name in per_dim else lp
        for vec in per_dim.values():
            kl_term = kl_term + torch.clamp(vec, min=threshold).sum()
    else:
        kl_scaled = 0.0
        for _, site in latent_sites(guide_trace):
            kl_scaled = kl_scaled + site["log_prob_sum"]
        for _, site in latent_sites(model_trace):
            kl_scaled = kl_scaled - site["log_prob_sum"]
        kl_term = torch.clamp(kl_scaled, min=threshold) if isinstance(kl_scaled, torch.Tensor) \
            else kl.new_zeros(())
    if not isinstance(kl_term, torch.Tensor):
        kl_term = kl.new_zeros(())
    surrogate = kl_term - rec
    loss = surrogate.detach()
    neg_elbo = (kl - rec).detach()
    return StepObjective(surrogate, loss, neg_elbo, kl)


def _log_prob_per_dimension(name, site) -> torch.Tensor:
    """Scaled, masked log-density of a latent site summed over rows, one entry per coordinate."""
    fn = site["fn"]
    if hasattr(fn, "coordinate_log_prob"):  # pyrossm's trajectory distributions, event (T, D)
        lp = fn.coordinate_log_prob(site["value"])
        if site.get("mask") is not None:
            lp = torch.where(site["mask"].unsqueeze(-1), lp, lp.new_zeros(()))
        return (site["scale"] * lp).reshape(-1, lp.shape[-1]).sum(0)
    base = getattr(fn, "base_dist", None)
    if (site["fn"].event_dim != 1 or base is None
            or getattr(fn, "reinterpreted_batch_ndims", None) != 1):
        raise NotImplementedError(
            f"free_bits_per='dimension' needs latent sites distributed as "
            f"Independent(base, 1) with event_dim 1, or a pyrossm trajectory distribution with "
            f"diagonal steps (coordinate_log_prob); site {name!r} has "
            f"{type(fn).__name__} with event_dim {fn.event_dim}"
        )
    lp = base.log_prob(site["value"])
    if site.get("mask") is not None:
        lp = torch.where(site["mask"].unsqueeze(-1), lp, lp.new_zeros(()))
    return (site["scale"] * lp).reshape(-1, lp.shape[-1]).sum(0)


def _any_tensor(trace) -> torch.Tensor:
    for site in trace.nodes.values():
        if site["type"] == "sample" and isinstance(site.get("log_prob"), torch.Tensor):
            return site["log_prob"]
    raise ValueError("the model trace has no sample site with a log-density")


def _masked(lp, site):
    if site.get("mask") is not None:
        lp = torch.where(site["mask"], lp, lp.new_zeros(()))
    return lp


def _rows(trace) -> int:
    for _, site in trace.nodes.items():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if frame.dim == -1 and frame.size is not None:
                    return int(frame.size)
    raise ValueError("no sample site inside a plate at dim -1 ('sequences') was found")


def foreign_params(traces, params) -> list[str]:
    """Names of ``pyro.param`` sites in the traces whose tensor is not one of ``params``.

    Such parameters (a global ``pyro.param`` outside any module) would not be optimised by the
    training loop, which works on the modules' own parameters (:mod:`pyrossm.protocol`).
    """
    ids = {id(p) for p in params}
    out = []
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] != "param":
                continue
            value = site["value"]
            unconstrained = getattr(value, "unconstrained", None)
            tensor = unconstrained() if callable(unconstrained) else value
            if id(tensor) not in ids and id(value) not in ids and getattr(
                    tensor, "requires_grad", False):
                out.append(name)
    return sorted(set(out))


def nonfinite_sites(model_trace, guide_trace) -> list[str]:
    """Names (``"model:x"``, ``"guide:z"``) of sample sites whose log-density is not finite."""
    bad = []
    for where, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            lp = site.get("log_prob")
            if lp is not None and not bool(torch.isfinite(lp).all()):
                bad.append(f"{where}:{name}")
            elif not bool(torch.isfinite(torch.as_tensor(site["value"], dtype=torch.float)).all()):
                bad.append(f"{where}:{name} (value)")
    return bad


class FreeBitsELBO:
    """Free-bits ELBO as a loss callable for ``pyro.infer.SVI`` (see module docstring).

    :param free_bits: ``lambda`` in nats per sequence (batch average of the KL), or per latent
        coordinate with ``free_bits_per="dimension"``.
    :param num_particles: particles, by repeating the batch.

    >>> # svi = SVI(model, guide, ClippedAdam({"lr": 1e-3}), loss=FreeBitsELBO(2.0))
    >>> # svi.step(x, mask)
    """

    def __init__(self, free_bits: float, num_particles: int = 1, free_bits_per: str = "sequence"):
        if not float(free_bits) >= 0:
            raise ValueError(f"free_bits: expected a non-negative number, got {free_bits}")
        if free_bits_per not in FREE_BITS_PER:
            raise ValueError(f"free_bits_per: expected one of {FREE_BITS_PER}, got "
                             f"{free_bits_per!r}")
        self.free_bits = float(free_bits)
        self.free_bits_per = free_bits_per
        self.num_particles = int(num_particles)

    def differentiable_loss(self, model, guide, x, mask=None):
        model_trace, guide_trace = elbo_traces(model, guide, x, mask, self.num_particles)
        return elbo_objective(
            model_trace, guide_trace, self.num_particles, free_bits=self.free_bits,
            free_bits_per=self.free_bits_per,
        ).surrogate

    def loss(self, model, guide, x, mask=None) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, x, mask))

    def __call__(self, model, guide, x, mask=None):
        return self.differentiable_loss(model, guide, x, mask)
