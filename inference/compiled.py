"""``torch.compile`` for the networks inside a Pyro model/guide pair.

Pyro's tracing (its messengers, the ``Message`` typed dicts, ``Tensor.item()`` in the bookkeeping) breaks a
``torch.compile`` graph around every sample site, so compiling a whole ELBO gives many small graphs
(``torch._dynamo.explain`` finds 16 breaks in one :class:`inference.pathwise_kl_elbo.PathwiseKL_ELBO` loss
of the one-step VAE, more with more steps) and recompiles for every parameter site. What compiles cleanly
is the networks the model and guide call between sample sites: an MLP's ``nn.Sequential``, a U-Net.
:func:`compile_networks` compiles those in place, and the objective stays eager around them, so every
objective and diagnostic works unchanged. A single layer (``nn.Linear``, ``nn.LSTMCell``) is left eager: it
is one kernel already, and compiling it alone fuses nothing.

The forward is replaced on the instance (``network.forward = torch.compile(network.forward)``), so
``state_dict`` keys, checkpoints and ``pyro.module`` names are those of the eager module
(``nn.Module.compile`` is not used: in torch 2.13 its compiled ``_call_impl`` is not traced). Values and
gradients equal the eager ones to float round-off (``tests/test_compiled.py``, float64). Where it pays: on
a GPU, where a step is bound by kernel launches and inductor fuses each network's layers; on a CPU at the
papers' sizes it does not (``experiments.benchmark_steps``, variant ``svi-novalid-compiled-nets``). The
first step pays the compile time, and a new batch shape recompiles once with dynamic shapes. Dynamo's
recompilation limits are raised with the number of compiled networks (every ``nn.Sequential`` shares one code
object, whose default limit of 8 graphs would leave later networks eager).

Used by :class:`inference.train.Trainer` (``compile=True``; every experiment's ``--compile``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["compile_networks", "is_network"]


def is_network(module: nn.Module) -> bool:
    """Whether ``module`` is a composite network worth compiling on its own: one with submodules (an MLP's
    ``nn.Sequential``, a U-Net), as opposed to a single layer."""
    return next(module.children(), None) is not None


def compile_networks(module: nn.Module, **compile_kwargs: Any) -> list[str]:
    """Compile, in place, the forward of every direct child of ``module`` that :func:`is_network`, with
    ``torch.compile(**compile_kwargs)``; returns their names. A child compiled before is left as it is, so
    calling it twice compiles nothing new."""
    global _compiled_here
    names = []
    for name, child in module.named_children():
        if not is_network(child):
            continue
        if not getattr(child, "_seqgen_compiled", False):
            child.forward = torch.compile(child.forward, **compile_kwargs)  # type: ignore[method-assign]
            child._seqgen_compiled = True
            _compiled_here += 1
        names.append(name)
    _raise_recompile_limits(_compiled_here)
    return names


#: Networks compiled in this process so far.
_compiled_here = 0


def _raise_recompile_limits(networks: int) -> None:
    """Dynamo counts recompilations per code object, and every ``nn.Sequential`` shares
    ``Sequential.forward``'s: each network needs a few graphs of its own (training with gradients, a first
    and a dynamic batch shape, evaluation without gradients), so torch's default of 8 for all of them makes
    the later ones fall back to eager silently. Raise the limits with the number of compiled networks."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, _GRAPHS_PER_NETWORK * networks)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * _GRAPHS_PER_NETWORK * networks)


_GRAPHS_PER_NETWORK = 16
