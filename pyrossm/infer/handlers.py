"""Pyro handlers and trace-based objectives used by the training loop and the evaluators.

* :class:`LatentScaleMessenger` multiplies the scale of every *unobserved* sample site by a KL
  annealing factor ``beta`` (model and guide alike), leaving observed sites untouched.
* :func:`elbo_traces` runs the guide, replays the model against it (``poutine.trace`` +
  ``poutine.replay``, as Pyro's ``Trace_ELBO``) on a batch repeated ``K`` times (``K`` particles:
  the vectorized-particle estimator). Only what is repeated is scaled by ``1/K``: the sites
  inside the ``"sequences"`` plate (:class:`ParticleScaleMessenger`). A *global* latent site
  (outside the plate, e.g. a parameter with a prior) is drawn once per step and keeps scale 1,
  so its KL is counted once, not ``1/K`` times.
* :func:`elbo_objective` turns the two traces into the loss of one step: the Trace_ELBO surrogate
  (score-function terms included), or the *free bits* objective (Kingma et al. 2016,
  "Improved variational inference with inverse autoregressive flow"), defined **per
  sequence**::

      loss = -sum_b E_q log p(x_b | z_b) + sum_b max(lambda, KL_b) + KL_global

  where ``KL_b = log q(z_b | x_b) - log p(z_b)`` is sequence ``b``'s single-sample estimate
  (averaged over its ``K`` particles) summed over its latent sites, and ``lambda`` is in nats per
  sequence: below ``lambda`` a sequence's KL term has no gradient, so the encoder is not pushed
  to collapse onto the prior. Because the loss is a sum of per-sequence terms, it does not depend
  on how the data are batched (minibatch size, length buckets, ``torch.distributed`` slices);
  with ``chunk_length`` a chunk is a sequence. Global latent sites (``KL_global``) are not
  clamped. (With annealing the KL terms are multiplied by ``beta``.) Per dimension (Kingma et
  al.'s groups of one coordinate each), the KL term is ``sum_b sum_j max(lambda, KL_bj)``:
  every coordinate of every sequence may carry ``lambda`` nats for free, which spreads the
  information over many latent units instead of a few.
* :class:`FreeBitsELBO`: the same objective as a loss callable for ``pyro.infer.SVI``.
* :func:`site_log_probs_per_row` reduces a site's log-density to one number per batch row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyrossm.infer.data import repeat_particles

__all__ = [
    "FreeBitsELBO",
    "LatentScaleMessenger",
    "ParticleScaleMessenger",
    "StepObjective",
    "elbo_objective",
    "elbo_traces",
    "foreign_params",
    "latent_sites",
    "nonfinite_sites",
    "site_log_probs_per_row",
    "trace_elbo_particle",
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


SEQUENCES = "sequences"


def in_sequences_plate(site) -> bool:
    """True if the site is inside the ``"sequences"`` plate (repeated per particle)."""
    return any(frame.name == SEQUENCES for frame in site["cond_indep_stack"])


class ParticleScaleMessenger(Messenger):
    """Scale the sample sites inside the ``"sequences"`` plate by ``1 / num_particles``.

    With ``K`` particles made by repeating every sequence ``K`` times, the rows of the plate are
    ``K`` copies of each sequence, so their log-densities are averaged (scale ``1/K``); a site
    outside the plate (a global latent) is *not* repeated and keeps its scale.
    """

    def __init__(self, num_particles: int):
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles: expected a positive int, got {num_particles!r}")
        super().__init__()
        self.factor = 1.0 / num_particles

    def _process_message(self, msg):
        if msg["type"] == "sample" and in_sequences_plate(msg):
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

    Log-densities of the sites in the ``"sequences"`` plate are scaled by ``1 / num_particles``
    (:class:`ParticleScaleMessenger`) and those of unobserved sites by ``beta`` as well. Returns
    ``(model_trace, guide_trace)`` with ``log_prob`` (and the guide's ``score_parts``) computed;
    a site's ``unscaled_log_prob`` has neither scale.
    """
    xr, mr = repeat_particles(x, mask, num_particles)
    with ParticleScaleMessenger(num_particles), LatentScaleMessenger(beta):
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


def _downstream_cost(model_trace, guide_trace, site) -> torch.Tensor:
    """``log p - log q`` (detached) summed to the plates of ``site``: the score-function weight.

    The one plate of the protocol (``"sequences"``, dim -1): for a site inside it, the
    per-row sums of the sites inside it plus the totals of the global sites; for a global site,
    the total. (Pyro's ``Trace_ELBO`` computes the same with its ``MultiFrameTensor``.)
    """
    per_row = in_sequences_plate(site)
    total = 0.0
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for s in trace.nodes.values():
            if s["type"] != "sample" or site_is_subsample(s):
                continue
            lp = s["log_prob"].detach()
            total = total + sign * (lp if per_row and in_sequences_plate(s) else lp.sum())
    return total


def trace_elbo_particle(model_trace, guide_trace):
    """``(loss, surrogate)`` of one (vectorized) particle: the Trace_ELBO estimator.

    ``loss = -(sum log p - sum log q)`` over the sample sites (scaled log-densities from
    :func:`elbo_traces`); the surrogate's gradient is the ELBO gradient estimate: the
    reparameterized terms through ``log p`` and the guide's entropy term, plus, for guide
    sites without ``rsample``, the score-function term ``cost * d log q`` with the downstream
    cost of :func:`_downstream_cost` (Ranganath et al. 2014; Schulman et al. 2015).
    """
    elbo = surrogate = 0.0
    for _, site in model_trace.nodes.items():
        if site["type"] == "sample":
            elbo = elbo + site["log_prob_sum"].detach()
            surrogate = surrogate + site["log_prob_sum"]
    for _, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        _, score_function_term, entropy_term = site["score_parts"]
        elbo = elbo - site["log_prob_sum"].detach()
        if not is_identically_zero(entropy_term):
            surrogate = surrogate - entropy_term.sum()
        if not is_identically_zero(score_function_term):
            cost = _downstream_cost(model_trace, guide_trace, site)
            surrogate = surrogate + (cost * score_function_term).sum()
    return -elbo, -surrogate


FREE_BITS_PER = ("sequence", "dimension")


def elbo_objective(
    model_trace, guide_trace, num_particles: int = 1, beta: float = 1.0, free_bits=None,
    free_bits_per: str = "sequence",
) -> StepObjective:
    """Objective of one step from :func:`elbo_traces` output; see the module docstring.

    ``free_bits_per="dimension"`` applies ``lambda`` to every latent coordinate separately
    (the last event dimension of each latent site, which must be a diagonal distribution with
    ``event_dim == 1``, or a trajectory distribution with diagonal steps and a
    ``coordinate_log_prob`` -- then ``KL_bj`` sums over the steps): ``sum_b sum_j max(lambda,
    KL_bj)``. Free bits are per sequence (each ``KL_b`` averaged over the sequence's
    ``num_particles`` rows, then clamped), so the loss of a batch is the sum of its sequences'
    losses whatever the batching.
    """
    if free_bits_per not in FREE_BITS_PER:
        raise ValueError(f"free_bits_per: expected one of {FREE_BITS_PER}, got {free_bits_per!r}")
    kl = 0.0
    for sign, trace in ((1.0, guide_trace), (-1.0, model_trace)):
        for _, site in latent_sites(trace):
            factor = 1.0 / num_particles if in_sequences_plate(site) else 1.0
            kl = kl + sign * factor * _masked(site["unscaled_log_prob"], site).sum()
    if not isinstance(kl, torch.Tensor):  # no latent site (e.g. a language model)
        kl = _any_tensor(model_trace).new_zeros(())
    kl = kl.detach()
    if free_bits is None:
        # the Trace_ELBO estimator for one (vectorized) particle: reparameterized and
        # score-function terms
        loss, surrogate = trace_elbo_particle(model_trace, guide_trace)
        if not isinstance(surrogate, torch.Tensor):
            surrogate = kl.new_tensor(surrogate)
        loss = torch.as_tensor(loss, dtype=surrogate.dtype, device=surrogate.device).detach()
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
    lam = float(free_bits)
    kl_term = 0.0
    per_row = {}  # name -> KL per row (rows,) or per row and coordinate (rows, D), unscaled
    for sign, trace in ((1.0, guide_trace), (-1.0, model_trace)):
        for name, site in latent_sites(trace):
            if not in_sequences_plate(site):  # a global latent: its KL is not clamped
                kl_term = kl_term + sign * site["log_prob_sum"]
                continue
            if free_bits_per == "dimension":
                lp = sign * _log_prob_per_dimension(name, site, rows)
            else:
                lp = sign * site_log_probs_per_row(site, rows, "unscaled_log_prob")
            per_row[name] = per_row[name] + lp if name in per_row else lp
    if per_row:
        total = sum(per_row.values())  # (rows,) or (rows, D)
        per_seq = total.reshape((rows // num_particles, num_particles) + total.shape[1:]).mean(1)
        kl_term = kl_term + beta * torch.clamp(per_seq, min=lam).sum()
    if not isinstance(kl_term, torch.Tensor):
        kl_term = kl.new_zeros(())
    surrogate = kl_term - rec
    loss = surrogate.detach()
    neg_elbo = (kl - rec).detach()
    return StepObjective(surrogate, loss, neg_elbo, kl)


def _log_prob_per_dimension(name, site, rows: int) -> torch.Tensor:
    """Unscaled, masked log-density of a latent site per row and coordinate: ``(rows, D)``."""
    fn = site["fn"]
    if hasattr(fn, "coordinate_log_prob"):  # pyrossm's trajectory distributions, event (T, D)
        lp = fn.coordinate_log_prob(site["value"])
    else:
        base = getattr(fn, "base_dist", None)
        if (fn.event_dim != 1 or base is None
                or getattr(fn, "reinterpreted_batch_ndims", None) != 1):
            raise NotImplementedError(
                f"free_bits_per='dimension' needs latent sites distributed as "
                f"Independent(base, 1) with event_dim 1, or a pyrossm trajectory distribution "
                f"with diagonal steps (coordinate_log_prob); site {name!r} has "
                f"{type(fn).__name__} with event_dim {fn.event_dim}"
            )
        lp = base.log_prob(site["value"])
    if site.get("mask") is not None:
        lp = torch.where(site["mask"].unsqueeze(-1), lp, lp.new_zeros(()))
    return lp.reshape(-1, rows, lp.shape[-1]).sum(0)


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

    :param free_bits: ``lambda`` in nats per sequence (each sequence's KL is clamped), or per
        latent coordinate of each sequence with ``free_bits_per="dimension"``.
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
