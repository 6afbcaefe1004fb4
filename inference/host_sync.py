"""Finding the places where a training step reads a value back from the device.

On a GPU the host queues kernels ahead of the device; a call that needs a tensor's *value* on the host
(``Tensor.item()``, ``bool(t)`` in an ``if``, ``.tolist()``, ``.cpu()``), an output whose *shape* depends
on values (``nonzero``, boolean-mask indexing and assignment, ``unique``, ``one_hot`` without a class count,
``repeat_interleave`` without an output size) or a copy of host data to the device (``torch.tensor(1.0,
device=x.device)``, which ``torch.distributions`` makes of a number parameter) waits for the device or
blocks the host. A step with such a call cannot run ahead of the device, and cannot be captured in a CUDA
graph at all (:mod:`inference.cuda_graph`). Such calls are invisible on a CPU, where nothing is queued;
:func:`host_syncs` records them on any device, so a test on a CPU can find them.

It watches the calls through a :class:`torch.overrides.TorchFunctionMode`, which sees every torch function,
factory and tensor method called from Python. It cannot see what C++ kernels do inside, and a copy between
devices only where one of them is not the CPU, so it is a necessary check, not a sufficient one: on a GPU,
``torch.cuda.set_sync_debug_mode("error")`` catches the rest (:class:`inference.cuda_graph.GraphedStep`
runs its warm-up steps under both). The watched calls are :data:`SYNCING` and :func:`_reads_back`'s.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SYNCING", "HostSync", "host_syncs"]

#: Calls that read a value back to the host, or whose output shape depends on values.
SYNCING: frozenset[Callable[..., Any]] = frozenset({
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
    torch.Tensor.__index__, torch.Tensor.__complex__, torch.Tensor.tolist, torch.Tensor.numpy,
    torch.Tensor.cpu, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.argwhere, torch.argwhere,
    torch.Tensor.masked_select, torch.masked_select, torch.Tensor.unique, torch.unique,
    torch.unique_consecutive, torch.Tensor.__repr__, torch.Tensor.__format__,
})


@dataclass(frozen=True)
class HostSync:
    """One call that reads the device back: the function's name and where it was called from."""

    call: str
    where: str

    def __str__(self) -> str:
        return f"{self.call} at {self.where}"


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[HostSync] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING or _reads_back(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("overrides.py")]
            where = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in reversed(frames[-3:]))
            self.found.append(HostSync(getattr(func, "__name__", str(func)), where))
        return func(*args, **kwargs)


def _reads_back(func: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    """Indexing and assignment with a boolean tensor (the number of True values sets a shape), ``one_hot``
    and ``repeat_interleave`` without their sizes, tensors made from host data on a named device, and
    copies between the host and a device."""
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if func is torch.Tensor.__setitem__ and (len(args) < 3 or not isinstance(args[2], torch.Tensor)
                                                 or args[2].numel() == 1):
            return False  # x[mask] = value with one value: a masked_fill, no count needed
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if func is torch.nn.functional.one_hot:
        return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if func in (torch.tensor, torch.as_tensor):
        # Host data put on a device: on a GPU a copy that blocks (and fails under capture). A device named
        # explicitly, even the CPU of a CPU run, is where the data would be on a GPU run.
        data = args[0] if args else kwargs.get("data")
        return kwargs.get("device") is not None and not isinstance(data, torch.Tensor)
    if func is torch.Tensor.to:
        # A copy to the host (named as such, "cpu", or from a tensor on a device), or from the host to a
        # device. A ``.to(device=x.device)`` that stays on the CPU is no copy on a GPU either.
        source = args[0].device.type if isinstance(args[0], torch.Tensor) else "cpu"
        targets = [t for t in (*args[1:], kwargs.get("device")) if isinstance(t, (str, torch.device))]
        kinds = {torch.device(t).type for t in targets if not isinstance(t, str) or t[:3] in ("cpu", "cud")}
        named_cpu = any(isinstance(t, str) and t.startswith("cpu") for t in targets)
        return named_cpu or any((kind == "cpu") != (source == "cpu") for kind in kinds)
    return False


def _short(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def host_syncs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, list[HostSync]]:
    """Run ``fn(*args, **kwargs)`` and return (its result, the calls it made that read the device back to
    the host, in order). On a CPU nothing waits, but the same calls would stall a GPU."""
    with _Recorder() as recorder:
        result = fn(*args, **kwargs)
    return result, recorder.found
