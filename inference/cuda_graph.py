"""A training step captured in CUDA graphs: Pyro's tracing runs once, the GPU replays its kernels.

At the papers' sizes a step on a GPU is bound by the host, not the device: Pyro's messengers, the model's
Python and the optimiser queue a few thousand small kernels, and the device waits for them (the issue's
H100 measurements: 26.6 ms for the hand-written eager step of GPSI against 7.7 ms compiled). A CUDA graph
records the kernels of one step once and replays them with one launch, so the host's per-step work is
copying the minibatch in and reading one number out. What a replay repeats is exactly the recorded
kernels, on the same memory: the objective's Python (which sites exist, which KL is analytic) is fixed at
capture, and the random draws come fresh on each replay from the CUDA generator (graph-safe Philox).

A step is two graphs, so that the loss is checked *before* the update, as in the eager Trainer:

1. ``forward``: the loss on static copies of the inputs, and its backward pass into the parameters'
   ``.grad`` (tensors owned by the graph from then on);
2. the host reads the loss (the step's one synchronisation) and stops on a NaN/inf with the parameters
   untouched;
3. ``update``: gradient clipping (global norm) and the optimiser's step.

Requirements, checked where they can be: a CUDA device; a loss whose step reads nothing back to the host
and copies no host data to the device (the first warm-up step of each shape runs under
:func:`inference.host_sync.host_syncs` and ``torch.cuda.set_sync_debug_mode("error")``, and such a step is
refused by name, :class:`StepNotCapturable`, before any capture; Pyro's validation must be off, as it is in
the Trainer's step by default); an optimiser whose state stays on the device (``torch.optim.Adam`` with
``capturable=True``, set by the Trainer; :class:`inference.optim.ClippedAdam`); inputs of fixed shapes
(each shape gets its own pair of graphs, e.g. an epoch's shorter last minibatch), reaching the same
parameters as its warm-up steps; a learning rate that the host does not change during training (it is
recorded as a constant; ClippedAdam's decay is computed on the device). After a step no ``.grad`` is left:
the graphs own the gradients' memory. The first ``warmup`` steps of each input shape run eagerly on a side
stream, as CUDA graph capture requires (lazy initialisation, the optimiser's state), and are ordinary
training steps.

Used by :class:`inference.train.Trainer` (``cuda_graph=True``; every experiment's ``--step cuda-graph``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from inference.host_sync import _Recorder

__all__ = ["GraphedStep", "StepNotCapturable", "capture_supported"]


def capture_supported(device: torch.device) -> bool:
    """Whether steps on ``device`` can be captured: CUDA only."""
    return device.type == "cuda"


@dataclass
class _Captured:
    inputs: tuple[torch.Tensor, ...]  # the static inputs the graphs read
    out: dict[str, torch.Tensor]  # "loss": the static loss the forward graph writes
    forward: Any  # torch.cuda.CUDAGraph
    update: Any


class StepNotCapturable(ValueError):
    """A step that a CUDA graph cannot hold: it reads values back to the host, copies host data to the
    device, or the optimiser meets a parameter for the first time at capture."""


class GraphedStep:
    """One training step (loss, backward, clipping, optimiser step) as a pair of CUDA graphs per input shape.

    :param loss_fn: ``loss_fn(*inputs)`` -> the scalar loss to minimise (e.g. an ELBO's
        ``differentiable_loss``); it must read nothing back to the host.
    :param params: the parameters the optimiser steps (those ``loss_fn`` reaches get gradients).
    :param optimizer: a torch optimiser over ``params`` whose step stays on the device.
    :param clip_norm: the bound of the gradients' global L2 norm, or None.
    :param warmup: eager steps per input shape before it is captured, >= 1. The first of them (per shape)
        runs under :func:`inference.host_sync.host_syncs` and, on CUDA, ``torch.cuda.set_sync_debug_mode
        ("error")``, and raises :class:`StepNotCapturable` naming the calls a graph could not hold.

    Call :meth:`loss` with a step's inputs (forward and backward; returns the loss on the device), check the
    value, then :meth:`update`.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Sequence[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, clip_norm: float | None = None, warmup: int = 3,
                 _graphs: Any = None):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs an eager step first), got {warmup}")
        self.loss_fn, self.params, self.optimizer = loss_fn, list(params), optimizer
        self.clip_norm, self.warmup = clip_norm, warmup
        device = self.params[0].device if self.params else torch.device("cpu")
        self._cuda = _graphs or _CudaGraphs(device)
        self._captured: dict[tuple, _Captured] = {}
        self._seen: dict[tuple, int] = {}
        self._pending: _Captured | str | None = None  # next update: a captured step's, "eager", or none
        self._update_checked = False

    @property
    def captured_shapes(self) -> list[tuple]:
        """The input shapes (and dtypes) captured so far."""
        return list(self._captured)

    def loss(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Forward and backward of the step on ``inputs``; returns the loss (detached, on the device). The
        gradients are in the graph's memory (or, while warming up, in ``.grad``) until :meth:`update`. A
        captured shape returns the same tensor every step, overwritten by each replay: read it before the
        next call."""
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        try:
            with self._cuda.on_device():
                return self._loss(key, inputs)
        except BaseException:
            # A refused or failed step leaves nothing to update, and no gradient of a step that did not run.
            self._pending = None
            self._clear_grads()
            raise

    def _loss(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        captured = self._captured.get(key)
        if captured is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] <= self.warmup:
                with self._cuda.side_stream(), self._checked(self._seen[key] == 1, "loss and backward"):
                    self._clear_grads()
                    loss = self.loss_fn(*inputs)
                    loss.backward()
                self._pending = "eager"
                return loss.detach()
            captured = self._captured[key] = self._capture(inputs)
        for static, value in zip(captured.inputs, inputs, strict=True):
            static.copy_(value)
        captured.forward.replay()
        self._pending = captured
        return captured.out["loss"]

    def update(self) -> None:
        """Clip the gradients of the last :meth:`loss` and step the optimiser."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("GraphedStep.update() needs a loss() first (one update per loss)")
        try:
            with self._cuda.on_device():
                if pending != "eager":
                    pending.update.replay()
                    return
                # The first eager update is checked as the first loss of each shape is: clipping and the
                # optimiser's step are captured too.
                check, self._update_checked = not self._update_checked, True
                with self._cuda.side_stream(), self._checked(check, "clipping and the optimiser's step"):
                    self._clip_and_step()
        finally:
            self._clear_grads()  # after a step no .grad is left, captured or eager (see _capture)

    # ------------------------------------------------------------------ capture

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(t.clone() for t in inputs)
        out: dict[str, torch.Tensor] = {}

        def forward() -> None:
            # Gradients start as None, so the captured backward writes (not adds) them: each replay
            # overwrites the last step's.
            self._clear_grads()
            value = self.loss_fn(*static)
            value.backward()
            out["loss"] = value.detach()  # the static output: each replay writes the step's loss into it

        forward_graph = self._cuda.capture(forward)
        new = [p for p in self.params if p.grad is not None and self.optimizer.state
               and not self.optimizer.state.get(p)]
        if new:
            # Its state would be created inside the graph and reset on every replay.
            raise StepNotCapturable(f"{len(new)} parameter(s) first get a gradient at capture (shape "
                                    f"{[tuple(t.shape) for t in inputs]}), after the warm-up steps; the "
                                    "optimiser has no state for them")
        # The update reads the gradients the forward graph wrote: one memory pool for the pair, and only for
        # the pair. Never share it with another shape's graphs: the gradients' memory, let go of below, could
        # then be handed to another capture.
        update_graph = self._cuda.capture(self._clip_and_step, pool=forward_graph)
        # The graphs own the gradients' memory now; Python lets go of it, so that nothing outside the graphs
        # (a fine-tuning after training, a later backward) reads or adds into it.
        self._clear_grads()
        return _Captured(static, out, forward_graph, update_graph)

    def _clip_and_step(self) -> None:
        if self.clip_norm is not None:
            # foreach norms and a clamped scale: no host read, unlike error_if_nonfinite.
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.clip_norm)
        self.optimizer.step()

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    @contextlib.contextmanager
    def _checked(self, check: bool, what: str) -> Iterator[None]:
        """With ``check``: run the block watching for what a graph cannot hold, and refuse it by name."""
        if not check:
            yield
            return
        with self._cuda.sync_debug(), _Recorder() as recorder:
            try:
                yield
            except RuntimeError as e:
                if _SYNC_ERROR not in str(e):  # not torch.cuda's sync debug mode
                    raise
                seen = "; ".join(str(f) for f in recorder.found[-3:]) or "none seen from Python"
                raise StepNotCapturable(f"the step's {what} synchronises with the host, which a CUDA graph "
                                        f"cannot hold ({e}; the last calls that read back: {seen})") from e
        if recorder.found:
            calls = "; ".join(str(f) for f in recorder.found[:8])
            raise StepNotCapturable(
                f"the step's {what} reads values back to the host or copies host data to the device, which "
                f"a CUDA graph cannot hold ({len(recorder.found)} call(s): {calls}). Turn off Pyro's "
                "validation in the step, or use --step fused (not captured)")


#: What torch.cuda's sync debug mode "error" raises with.
_SYNC_ERROR = "called a synchronizing CUDA operation"


class _CudaGraphs:
    """torch.cuda's graphs on one device; tests on a CPU put a stand-in with the same methods in their
    place."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream: torch.cuda.Stream | None = None
        self._capture_stream: torch.cuda.Stream | None = None

    def on_device(self) -> contextlib.AbstractContextManager:
        # Streams and graphs belong to the current device: make it the parameters' (cuda:N).
        return torch.cuda.device(self.device)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        # Warm-up steps run on a side stream, as torch's CUDA graph documentation prescribes.
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            torch.cuda.current_stream().wait_stream(self._stream)

    @contextlib.contextmanager
    def sync_debug(self) -> Iterator[None]:
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)

    def capture(self, fn: Callable[[], None], pool: Any = None) -> Any:
        # A capture stream of this device (torch's default one is made on whichever device was current at
        # the process's first capture).
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=None if pool is None else pool.pool(), stream=self._capture_stream):
            fn()
        return graph
