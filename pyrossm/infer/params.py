"""Which tensors the training loop optimises, and Pyro's global parameter store.

Models and guides own their parameters (:mod:`pyrossm.protocol`). The training loop optimises
the explicit list ``model.parameters() + guide.parameters()`` (a parameter shared by both is
listed once), so a plain ``nn.Module`` inside a ``PyroModule`` is optimised without
``pyro.module`` and no parameter is stepped twice.

``PyroModule`` still mirrors its parameters into Pyro's *global* parameter store under their
module names (``"loc"``, ``"rnn.weight"``...) and, when a name is already there, *replaces its
own parameter by the stored tensor*. Two hazards follow, both handled by
:func:`claim_param_store`: a stale entry left by an earlier module of the same class (the stale
value would silently win), and a model and a guide whose parameters have the same Pyro name
(they would silently share one tensor) -- the latter raises ``ValueError``.
"""

from __future__ import annotations

import pyro
import torch
from pyro.nn.module import PyroModule, _make_name
from pyro.params.param_store import param_with_module_name

__all__ = ["claim_param_store", "named_parameters", "owner_module"]


def owner_module(fn, name: str = "model") -> torch.nn.Module:
    """The ``nn.Module`` that owns ``fn``: ``fn`` itself, or the module of a bound method."""
    if isinstance(fn, torch.nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        return owner
    raise TypeError(
        f"{name}: expected a torch.nn.Module or a bound method of one (see pyrossm.protocol), "
        f"got {type(fn).__name__}"
    )


def named_parameters(model: torch.nn.Module, guide: torch.nn.Module) -> dict:
    """``{"model.<name>" | "guide.<name>": parameter}``, each trainable tensor exactly once."""
    out, seen = {}, set()
    for prefix, module in (("model", model), ("guide", guide)):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"{prefix}: expected a torch.nn.Module (see pyrossm.protocol), got "
                f"{type(module).__name__}"
            )
        for name, p in module.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            out[f"{prefix}.{name}"] = p
    return out


def _pyro_names(module: torch.nn.Module):
    """(name in Pyro's param store, tensor, swaps) for the parameters a PyroModule mirrors.

    ``swaps`` is True for ``PyroParam`` s, which PyroModule *replaces* by the stored tensor when
    the name is already taken; plain ``nn.Parameter`` s and the ``pyro.module`` names
    (``"child$$$weight"``) of plain ``nn.Module`` children are only mirrored.
    """
    for m in module.modules():
        if not isinstance(m, PyroModule):
            continue
        pyro_params = m.__dict__.get("_pyro_params", {})
        for pname, p in m._parameters.items():
            if p is None:
                continue
            base = pname[: -len("_unconstrained")] if pname.endswith("_unconstrained") else None
            if base in pyro_params:
                yield _make_name(m._pyro_name, base), p, True
            else:
                yield _make_name(m._pyro_name, pname), p, False
        for child_name, child in m._modules.items():
            if child is None or isinstance(child, PyroModule):
                continue
            prefix = _make_name(m._pyro_name, child_name)
            for pname, p in child.named_parameters():
                yield param_with_module_name(prefix, pname), p, False


def claim_param_store(model: torch.nn.Module, guide: torch.nn.Module) -> None:
    """Make Pyro's global param store agree with the parameters the modules hold now.

    Entries under one of the modules' Pyro names but holding another tensor (left over from an
    earlier module) are removed, so the module's own value is registered on the next call. A
    name shared by a model and a guide parameter where one is a ``PyroParam`` raises
    ``ValueError`` (PyroModule would silently make them one tensor).
    """
    owner: dict = {}
    ours = set()
    for prefix, module in (("model", model), ("guide", guide)):
        for fullname, p, swaps in _pyro_names(module):
            ours.add(id(p))
            if fullname in owner:
                other_prefix, other, other_swaps = owner[fullname]
                if other is not p and (swaps or other_swaps):
                    raise ValueError(
                        f"model and guide both have a parameter named {fullname!r} in Pyro's "
                        f"param store ({other_prefix} and {prefix}) and one is a PyroParam: "
                        f"PyroModule would make them share one tensor. Rename one of them "
                        f"(e.g. put the guide's parameters in a submodule)."
                    )
                continue
            owner[fullname] = (prefix, p, swaps)
    store = pyro.get_param_store()
    for fullname in owner:
        if fullname in store:
            stored = store[fullname]
            stored = stored.unconstrained() if hasattr(stored, "unconstrained") else stored
            if id(stored) not in ours:
                del store[fullname]
