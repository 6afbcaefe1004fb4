"""Counting the tensor operations a training step dispatches: the launch count of a launch-bound GPU step.

On a GPU at the papers' sizes a training step is launch-bound (issue 17 measured the compiled floor of
GPSI-add flat from batch 200 to 1000): its time follows the number of kernels it launches more than the
arithmetic in them. That number can be counted on any machine: :func:`count_operations` runs a function
under a :class:`torch.utils._python_dispatch.TorchDispatchMode`, which sees every ATen operation below
autograd, the backward pass's included, and counts those that compute, leaving out views (which alias
their input and launch nothing) and the metadata-only operations in :data:`NO_KERNEL`. On a GPU each
counted operation is about one kernel launch (a few are fused or split by their CUDA kernels), so two
steps' counts compare their launch overhead without a GPU; the counts are deterministic, unlike times.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["NO_KERNEL", "count_operations"]

aten = torch.ops.aten

#: Operations that are not views but launch no kernel: they make or rewrap a tensor's metadata.
NO_KERNEL = frozenset({
    aten.detach.default, aten.lift_fresh.default, aten.empty.memory_format, aten.empty_strided.default,
    aten.empty_like.default, aten.new_empty.default, aten.new_empty_strided.default,
})


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in NO_KERNEL:
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_operations(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Counter[str]]:
    """``fn(*args, **kwargs)`` and the ATen operations it dispatched that compute, by name (``"mm"``,
    ``"add"``, ...): forward, and backward where ``fn`` calls it; views and :data:`NO_KERNEL` left out.
    ``sum(counts.values())`` is the step's operation count."""
    with _Counter() as counter:
        out = fn(*args, **kwargs)
    return out, counter.counts
