"""What every model/guide pair of seqgen provides, and the registry from model names to constructors.

A model/guide pair is one :class:`torch.nn.Module` holding every network of the primary policy p (the Pyro
``model``) and of the guide policy q (the Pyro ``guide``), as in Pyro's ``examples/dmm.py``. The runner, the
scorer and the guide fine-tuner of :mod:`inference` need nothing model-specific beyond this interface:

* ``model(*data, num_samples=None)`` and ``guide(*data, num_samples=None)``: the Pyro programs. Their sites
  follow the library's scheme, ``z_0``, ``z_1``, … for the steps and ``x`` for the observation, inside
  ``pyro.plate("data")``; ``model(None, …, num_samples=n)`` runs p without data.
* :meth:`ModelGuidePair.sample`: ``n`` draws of p in data space, without data.
* :attr:`ModelGuidePair.latent_sites`: the names of the latent sites, in the model's order.
* :meth:`ModelGuidePair.guide_parameters`: φ, the parameters only q uses (what a guide-only fine-tune may
  touch); :meth:`ModelGuidePair.model_parameters` is the rest, θ.
* :attr:`ModelGuidePair.param_prefix`: the name under which ``pyro.module`` registers the module, so Pyro's
  parameter-store names are ``f"{param_prefix}$$${name}"``; ``model`` and ``guide`` register it with
  :meth:`ModelGuidePair.register_params`, which :func:`params_registered` turns off for a training step that
  has registered them already.

Models register under a name with :func:`register_model`; :func:`build_model` builds one by name, so
presets name models and no experiment imports another's constructors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from torch import nn

KINDS = ("generator", "imputer")

#: Whether :meth:`ModelGuidePair.register_params` registers (see :func:`params_registered`).
_REGISTERING = [True]


@contextlib.contextmanager
def params_registered() -> Iterator[None]:
    """Within the block, :meth:`ModelGuidePair.register_params` does not register the module with Pyro again:
    no ``param`` message is sent, so the model's and guide's traces have no param sites.

    For a training step that steps ``module.parameters()`` itself (the Trainer's ``--step fused``), after a
    first step has registered them and checked that they are all its parameters. ``pyro.module`` sends one
    message per parameter through the handler stack at every call, model and guide, every step, though the
    parameters are already in the store and nothing in such a step reads the records: on a host-bound step
    (the issue's launch-bound GPU step; a CPU step at small sizes) that was about a quarter of the Pyro
    objective's overhead over a hand-written loss. Values are unchanged: the networks use their own
    parameters either way. Anything that finds parameters through Pyro's messages (``SVI.step``,
    ``poutine.trace(param_only=True)``, ``poutine.lift``) must not run inside the block."""
    before, _REGISTERING[0] = _REGISTERING[0], False
    try:
        yield
    finally:
        _REGISTERING[0] = before


class ModelGuidePair(nn.Module):
    """Base class of the library's model/guide pairs (see the module docstring for the contract)."""

    #: the name under which ``pyro.module`` registers this module.
    param_prefix: str = ""

    def register_params(self) -> None:
        """``pyro.module(self.param_prefix, self)``, which ``model`` and ``guide`` call first; nothing inside
        :func:`params_registered`."""
        if _REGISTERING[0]:
            pyro.module(self.param_prefix, self)

    def model(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def guide(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @property
    def latent_sites(self) -> tuple[str, ...]:
        """The latent sites of p, in the model's order."""
        raise NotImplementedError

    def sample(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws of p in data space, shape (num_samples, x_dim), without data (for image
        models: the Bernoulli means σ(logits) of the final step)."""
        raise NotImplementedError

    def guide_parameters(self) -> list[nn.Parameter]:
        """φ: the parameters only the guide q uses."""
        raise NotImplementedError

    def model_parameters(self) -> list[nn.Parameter]:
        """θ: every parameter that is not in :meth:`guide_parameters`."""
        guide = {id(p) for p in self.guide_parameters()}
        return [p for p in self.parameters() if id(p) not in guide]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its class, the constructor arguments the name fixes, its kind and a line."""

    name: str
    cls: type[ModelGuidePair]
    kind: str
    about: str
    fixed: dict[str, Any] = field(default_factory=dict)

    def build(self, **kwargs: Any) -> ModelGuidePair:
        clash = sorted(set(kwargs) & set(self.fixed))
        if clash:
            raise ValueError(f"model {self.name!r} fixes {clash} (= {[self.fixed[k] for k in clash]}); "
                             f"do not pass them")
        return self.cls(**self.fixed, **kwargs)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, cls: type[ModelGuidePair], *, kind: str, about: str, **fixed: Any) -> None:
    """Register ``cls`` under ``name`` with constructor arguments ``fixed`` (e.g. ``update="add"``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not (isinstance(cls, type) and issubclass(cls, ModelGuidePair)):
        raise TypeError(f"{cls!r} is not a ModelGuidePair subclass")
    if name in _REGISTRY and _REGISTRY[name].cls is not cls:
        raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].cls.__name__}")
    _REGISTRY[name] = ModelSpec(name, cls, kind, about, dict(fixed))


def model_spec(name: str) -> ModelSpec:
    """The registration of ``name``; an unknown name is an error listing the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_REGISTRY)}") from None


def build_model(name: str, **kwargs: Any) -> ModelGuidePair:
    """Build the model registered as ``name`` with constructor arguments ``kwargs``."""
    return model_spec(name).build(**kwargs)


def model_names(kind: str | None = None) -> list[str]:
    """The registered names, optionally of one kind (``"generator"`` or ``"imputer"``), sorted."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)

