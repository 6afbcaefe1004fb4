"""
The training driver shared by every experiment in this library.

A :class:`Trainer` owns one training run: it draws minibatches, takes optimiser steps, logs metrics,
writes checkpoints and resumes from them. Everything model-specific lives in the Pyro ``model`` and
``guide`` callables, one :class:`torch.nn.Module` that holds all their networks (they register it
themselves with ``pyro.module(name, module)``, as in Pyro's ``examples/vae.py``), and optional
:class:`ExtraTerm` hooks for networks trained with their own optimisers (discriminators, Q-networks...).

Design
------
**Two optimisation modes**, chosen by the type of ``optimizer``:

* *SVI mode* -- a :class:`pyro.optim.PyroOptim` (e.g. ``pyro.optim.ClippedAdam({"lr": 1e-3})``).
  A step is :meth:`pyro.infer.SVI.step` (``loss.loss_and_grads`` under a param-only trace, then the
  lazily created per-parameter optimisers), except that the loss is checked to be finite *before* the
  optimiser touches the parameters, and the hooks' :meth:`ExtraTerm.generator_loss` terms are
  back-propagated into the same gradients first. Parameters created with ``pyro.param`` outside the module are
  trained and checkpointed too. A loss with an ``online_losses(model, guide, *batch)`` generator (variational
  walkback's online update, :class:`inference.walkback.OnlineWalkbackELBO`) takes one optimiser step per
  term it yields, each on the parameters the earlier terms left; hooks' generator terms are not added then.
* *Differentiable-loss mode* -- a factory ``lambda params: torch.optim.Adam(params, lr=1e-3)``, called
  once with ``module.parameters()``. A step computes ``loss.differentiable_loss(model, guide, *batch)``
  plus the :meth:`ExtraTerm.generator_loss` of every hook, checks it is finite, back-propagates and
  steps. All trainable parameters must therefore live in ``module``.

**Captured in CUDA graphs** (``cuda_graph=True``, differentiable-loss mode on a CUDA device,
:mod:`inference.cuda_graph`): after the first step and a few warm-up steps per minibatch shape, a step replays
two recorded graphs (loss and backward; clipping and the update) with the loss read back and checked between
them, so the host's per-step work no longer bounds the step.

**Under torchrun** (:mod:`inference.distributed`) each process trains on its shard of every minibatch and
the step's loss (``differentiable_loss`` plus the generator terms, one module, :class:`_StepLoss`) runs
through ``DistributedDataParallel``, which sums the gradients over processes during the backward pass; in
SVI mode the Pyro optimiser then steps the parameters the trace reached, so all of them must live in
``module`` there too. An online loss, and one without ``differentiable_loss``, sums the gradients
explicitly after the backward pass instead.

**Losses** are reported per data point: the ELBO loss of a minibatch is assumed to be *summed* over
the minibatch (the default for a model that scores the whole batch under ``pyro.plate`` without
subsampling scale) and is divided by the minibatch size. ``train_loss`` in the metrics is the
per-data-point loss averaged over the epoch (i.e. summed batch losses divided by the number of data).

**Reproducibility.** The constructor seeds torch, numpy and ``random`` like :func:`pyro.set_rng_seed`
(build the module *before* or seed it yourself: its initial weights are the caller's business), and
the driver's own :class:`torch.Generator` (on the training device) which shuffles the data each epoch
and is handed to ``transform(batch, generator)`` for per-minibatch randomness such as dynamic
binarisation. A checkpoint holds every piece of state a step depends on -- weights, optimiser moments,
non-module Pyro params, epoch/step, the data generator, the global torch/CUDA/numpy/python RNGs, the
metrics so far, hook states and, for checkpoints taken inside an epoch, that epoch's permutation and
partial sums -- so ``fit(resume=True)`` continues with losses *bit-identical* to an uninterrupted run.
:meth:`Trainer.fit` starts with :func:`pyro.clear_param_store` so that stale parameters of an earlier
run can neither shadow the module's nor leak into the checkpoint, and resets the ``PyroOptim``'s
per-parameter optimisers; on resume their state is handed to :meth:`PyroOptim.set_state`, which is
consumed when each parameter is first seen at the first step.

**Safety.** Checkpoints are written atomically (temporary file in the same directory, flush, fsync,
:func:`os.replace`): a crash mid-write leaves the previous checkpoint intact. A NaN/inf loss raises
:class:`NonFiniteLossError` before any parameter is updated and before anything is written, so both
the parameters in memory and the checkpoint on disk are the last good ones. The checkpoint is the
source of truth for ``metrics.jsonl``: it is saved first and the metrics line appended after, and on
resume ``metrics.jsonl`` is rewritten from the checkpoint.

Checkpoints are loaded with ``torch.load(..., weights_only=False)`` (they contain numpy/python RNG
states and Pyro constraint objects): only resume from checkpoints you wrote yourself.

Example::

    # SVI mode
    trainer = Trainer(model, guide, vae, Trace_ELBO(), pyro.optim.ClippedAdam({"lr": 1e-3}),
                      train_data=x, batch_size=128, epochs=50, seed=0, device="cuda",
                      out_dir="runs/vae", transform=lambda x, g: torch.bernoulli(x, generator=g))
    metrics = trainer.fit()
    # ... killed at epoch 20; later, in a new process with the same arguments:
    metrics = trainer.fit(resume=True)  # fails clearly if out_dir has no checkpoint

    # Differentiable-loss mode, with a discriminator hook adding an adversarial generator term
    trainer = Trainer(model, guide, vae, Trace_ELBO(), lambda ps: torch.optim.Adam(ps, lr=1e-3),
                      train_data=x, batch_size=128, epochs=50, seed=0, device="cpu",
                      out_dir="runs/vae_gan", extras=[MyDiscriminator(vae)], clip_norm=10.0)
"""

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, Union

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import torch_item, zero_grads
from pyro.optim import PyroOptim
from torch import nn
from tqdm.auto import tqdm

from inference import cuda_graph as _cuda_graph
from inference import distributed
from inference.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    METRICS_NAME,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from inference.compiled import compile_networks
from ppl_models.base import params_registered

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "Batch",
    "ExtraTerm",
    "NonFiniteLossError",
    "OptimizerFactory",
    "Trainer",
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
]

_FORMAT_VERSION = 1
_RESERVED_METRICS = ("epoch", "step", "train_loss", "seconds")

#: A minibatch: one tensor, or a tuple of tensors indexed together (splatted into model/guide).
Batch = Union[torch.Tensor, tuple[torch.Tensor, ...]]
#: Differentiable-loss mode: builds the optimiser from ``module.parameters()``.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class NonFiniteLossError(RuntimeError):
    """
    Raised when a training loss is NaN or infinite. The offending step updated no parameter and
    wrote nothing to disk, so the module holds the weights of the last good step and the checkpoint
    (if any) is the last good one.

    :ivar int epoch: 1-based epoch of the bad step.
    :ivar int step: 1-based global step that produced the bad loss.
    :ivar float value: the loss value.
    :ivar checkpoint_path: the kept checkpoint, or ``None`` if none had been written in this run.
    """

    def __init__(self, epoch: int, step: int, value: float, checkpoint_path: Path | None):
        self.epoch = epoch
        self.step = step
        self.value = value
        self.checkpoint_path = checkpoint_path
        if checkpoint_path is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = f"the last good checkpoint at {checkpoint_path} was kept"
        super().__init__(
            f"non-finite loss {value} at epoch {epoch}, step {step}; training stopped before the "
            f"optimiser step (parameters in memory are those of the last good step) and {kept}"
        )

    def __reduce__(self):
        # RuntimeError pickles self.args, which would not match __init__'s signature.
        return (type(self), (self.epoch, self.step, self.value, self.checkpoint_path))


class ExtraTerm:
    """
    Base class for networks that are trained alongside the main module with their own optimiser
    (adversarial discriminators, guide functions, Q-networks...).

    Subclasses set :attr:`module` and :attr:`optimizer` (built from ``module.parameters()``) in their
    constructor; a hook that trains no network (a moment tracker updated after each step) sets
    ``optimizer = None``. The trainer moves :attr:`module` to the training device (in place, so an optimiser
    built before the move keeps valid references), checkpoints :meth:`state_dict` and, after each
    main step, zeroes :attr:`optimizer`'s gradients (they may hold gradients of
    :meth:`generator_loss`) and calls :meth:`step`. Randomness should come from the global torch RNG,
    which the trainer checkpoints.

    :ivar str name: prefix of this hook's metrics (``"<name>/<key>"``); defaults to the class name.
    """

    name: str | None = None
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    #: Under ``torchrun`` (:mod:`inference.distributed`) the hook's gradients are all-reduced before its
    #: optimiser steps: ``"mean"`` for a loss that is a mean over its minibatch (the usual hook loss),
    #: ``"sum"`` for one summed over it. A hook must then step on every process alike (decide any gate from
    #: quantities all-reduced over processes), or the collective waits for the processes that skipped it.
    gradient_reduction: str = "mean"

    def generator_loss(self, batch: Batch) -> torch.Tensor | None:
        """
        An optional scalar added to the main loss, e.g. an adversarial or collaborative term for the
        generator. It is added as is: scale it consistently with the summed-over-batch ELBO. Return
        ``None`` for no term. Its gradient reaches the main parameters in both modes: in
        differentiable-loss mode it is added to the loss before ``backward``; in SVI mode it is
        back-propagated into the same gradients after ``loss_and_grads``, before the Pyro optimiser
        steps the parameters the model and guide registered (so a parameter that only this term uses
        must be registered with ``pyro.module`` in the model or guide to be trained). Gradients it
        leaves in this hook's own networks are cleared before :meth:`step`.
        """
        return None

    def step(self, batch: Batch) -> dict[str, float]:
        """
        Update this hook's networks on the (transformed) minibatch the main step just used. Returns
        scalar metrics, averaged over the epoch's steps into ``metrics.jsonl``. A hook whose own loss is not
        finite raises :class:`FloatingPointError` before updating; the trainer stops with
        :class:`NonFiniteLossError` (the checkpoint on disk is the last good one).
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        optimizer = None if self.optimizer is None else self.optimizer.state_dict()
        return {"module": self.module.state_dict(), "optimizer": optimizer}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


class Trainer:
    """
    Trains ``model``/``guide`` (and optional :class:`ExtraTerm` hooks) on ``train_data``; see the
    module docstring for the design.

    :param model: Pyro model, called as ``model(*batch)``.
    :param guide: Pyro guide, called as ``guide(*batch)``.
    :param module: the :class:`~torch.nn.Module` holding every network ``model`` and ``guide`` use.
    :param loss: a :class:`pyro.infer.ELBO`; its loss must be summed over the minibatch.
    :param optimizer: a :class:`~pyro.optim.PyroOptim` (SVI mode) or a factory
        ``params -> torch.optim.Optimizer`` (differentiable-loss mode).
    :param train_data: a tensor with data along dim 0, or a tuple of such tensors indexed together.
    :param batch_size: minibatch size; the last, partial minibatch of an epoch is kept.
    :param epochs: total number of epochs (including those done before a resume).
    :param seed: seeds the global RNGs (on a fresh run) and the data generator.
    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (or a :class:`torch.device`).
    :param out_dir: directory for ``checkpoint.pt`` and ``metrics.jsonl``; created if missing.
    :param transform: ``transform(batch, generator) -> batch`` applied to each minibatch on the device,
        e.g. dynamic binarisation; draw its randomness from ``generator`` (which lives on the device). Under
        torchrun the batch is this process's shard and the generator is this process's own.
    :param evaluate: ``evaluate(epoch) -> dict`` called after each epoch; its scalars join the metrics.
    :param extras: :class:`ExtraTerm` hooks.
    :param progress: show a tqdm progress bar.
    :param clip_norm: if set, clip the global gradient norm of the step's parameters to this value.
    :param checkpoint_every_steps: also checkpoint every this many global steps (inside epochs).
    :param validate: Pyro's and torch.distributions' argument checks during the training step. ``None``
        (default): on only where the environment variable ``SEQGEN_VALIDATE`` is ``1`` (the test suite sets
        it; the experiments' ``--validate`` does), else off. The checks change no number, and cost a few
        milliseconds per step, which is a large part of a GPU step at small batch. Pyro's setting outside the
        step (evaluation, sampling) is left alone.
    :param compile: compile the module's networks (its children with layers of their own: MLPs, U-Nets)
        with ``torch.compile``, in place (:func:`inference.compiled.compile_networks`); the objective stays
        eager around them. ``None`` (default): on only where ``SEQGEN_COMPILE`` is ``1`` (the experiments'
        ``--compile`` sets it). Values equal the eager ones to float round-off; it pays on a GPU, where a
        step is launch-bound, not on a CPU. Evaluation and sampling use the compiled networks too.
    :param cuda_graph: capture the training step in CUDA graphs (:mod:`inference.cuda_graph`): the
        objective's Python runs once per input shape and every later step replays its kernels. Needs a CUDA
        device, differentiable-loss mode with an optimiser whose state stays on the device (torch's Adam
        family gets ``capturable=True`` here; :class:`inference.optim.ClippedAdam`), validation off in the
        step, one process, no hooks and no ``compile``. Every step reads the loss back once, to stop on a
        NaN before the update. The first steps of each input shape run eagerly (warm-up).
    :param keep_best: name of a metric returned by ``evaluate`` to *maximise* (e.g. a validation ELBO):
        the module weights of the best epoch so far are written atomically to ``out_dir/best.pt``
        (``{"module", "epoch", "metric", "value"}``); :meth:`load_best` puts them back in ``module``.
        Model selection on validation data guards against late divergence.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        module: nn.Module,
        loss: ELBO,
        optimizer: PyroOptim | OptimizerFactory,
        train_data: torch.Tensor | Sequence[torch.Tensor],
        batch_size: int,
        epochs: int,
        seed: int,
        device: str | torch.device,
        out_dir: str | os.PathLike,
        transform: Callable[[Batch, torch.Generator], Batch] | None = None,
        evaluate: Callable[[int], Mapping[str, Any]] | None = None,
        extras: Sequence[ExtraTerm] = (),
        progress: bool = True,
        clip_norm: float | None = None,
        checkpoint_every_steps: int | None = None,
        keep_best: str | None = None,
        validate: bool | None = None,
        compile: bool | None = None,
        cuda_graph: bool = False,
    ):
        _check_arguments(model, guide, module, loss, batch_size, epochs, seed, transform, evaluate, clip_norm,
                         checkpoint_every_steps, keep_best)
        self.model, self.guide, self.module, self.loss = model, guide, module, loss
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.transform, self.evaluate, self.progress = transform, evaluate, progress
        self.clip_norm, self.keep_best = clip_norm, keep_best
        self.validate = os.environ.get("SEQGEN_VALIDATE") == "1" if validate is None else bool(validate)
        self.compile = os.environ.get("SEQGEN_COMPILE") == "1" if compile is None else bool(compile)
        self.checkpoint_every_steps = checkpoint_every_steps
        self.device = resolve_device(device)
        self._data, self._data_is_tuple = _check_data(train_data)
        self.num_data = self._data[0].shape[0]
        self.world_size = distributed.world_size()
        if self.world_size > 1:
            _check_shards(self.num_data, batch_size, self.world_size)

        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create out_dir {self.out_dir}: {e}") from e
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.best_path = self.out_dir / BEST_NAME
        self.metrics_path = self.out_dir / METRICS_NAME
        self._best_value = -math.inf

        self.module.to(self.device)
        #: Names of the module's networks compiled with torch.compile (inference.compiled); [] when eager.
        self.compiled_networks = compile_networks(self.module) if self.compile else []
        self.extras = _checked_extras(extras, module)
        for extra in self.extras:
            extra.module.to(self.device)
        self.mode, self.pyro_optim, self.optimizer = self._build_optimizer(optimizer)
        self._hook_handles: list[Any] = []
        self._online = callable(getattr(loss, "online_losses", None))
        if self._online:
            adding = [_extra_name(e) for e in self.extras
                      if type(e).generator_loss is not ExtraTerm.generator_loss]
            if self.mode != "svi" or adding:
                raise ValueError(f"{type(loss).__name__} updates online, one optimiser step per term: it "
                                 "runs in SVI mode (a PyroOptim) and takes no hook's generator_loss (hooks "
                                 f"adding one: {adding})")
        if self.world_size > 1:
            # Every process starts from rank 0's weights, as DistributedDataParallel does; hooks all-reduce
            # their gradients before their optimisers step.
            distributed.broadcast_module(self.module)
            for extra in self.extras:
                distributed.broadcast_module(extra.module)
        # The step's loss as a module; under torchrun wrapped in DistributedDataParallel, which sums the
        # shards' gradients during the backward pass. An online loss steps several times per forward, and
        # a loss without differentiable_loss (Pyro's TraceGraph_ELBO, RenyiELBO...) back-propagates inside
        # loss_and_grads: for those, _clip_and_step sums the gradients instead.
        self._step_loss = _StepLoss(self)
        self._forward: nn.Module = self._step_loss
        if self.world_size > 1 and not self._online and callable(getattr(loss, "differentiable_loss", None)):
            self._forward = distributed.data_parallel(self._step_loss, self.device)

        #: The captured step (cuda_graph=True), else None.
        self.graphed_step = self._graphed_step() if cuda_graph else None

        # Fresh-run seeding; fit(resume=True) overwrites all of it from the checkpoint. Under torchrun the
        # data generator (the permutation) is seeded alike on every process, the rest per process.
        pyro.set_rng_seed(distributed.rank_seed(seed))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.transform_generator = self.generator
        if self.world_size > 1:
            self.transform_generator = torch.Generator(device=self.device)
            self.transform_generator.manual_seed(distributed.rank_seed(seed))

        self.metrics: list[dict[str, Any]] = []
        self.epoch = 0  # completed epochs
        self.step = 0  # completed global steps
        self._epoch_state: dict[str, Any] | None = None  # set when resuming inside an epoch
        self._has_checkpoint = False  # a checkpoint of *this* run exists on disk
        self._params_checked = False
        self._clip_params: list[torch.nn.Parameter] | None = None  # see _clip_order
        self._fitted = False

    def _graphed_step(self) -> _cuda_graph.GraphedStep:
        refusals = [why for refused, why in (
            (not _cuda_graph.capture_supported(self.device), f"a CUDA device (this run's is {self.device})"),
            (self.mode != "diff",
             "differentiable-loss mode (a factory params -> torch.optim.Optimizer, not a PyroOptim)"),
            (self._online, f"a loss that is not online ({type(self.loss).__name__} steps several times per "
                           "minibatch)"),
            (not callable(getattr(self.loss, "differentiable_loss", None)),
             f"a loss with differentiable_loss ({type(self.loss).__name__} has none)"),
            (bool(self.extras), "no ExtraTerm hooks (their terms are read back every step)"),
            (self.world_size > 1, "one process (not torchrun)"),
            (self.validate, "validation off in the step (its checks read values back)"),
            (self.compile, "compile off (capture the eager step, or compile the networks, not both)"),
        ) if refused]
        if refusals:
            raise ValueError("cuda_graph=True needs " + "; ".join(refusals))
        self._make_capturable()
        return _cuda_graph.GraphedStep(
            lambda *args: self.loss.differentiable_loss(self.model, self.guide, *args),
            list(self.module.parameters()), self.optimizer, self.clip_norm)

    def _make_capturable(self) -> None:
        # torch's Adam family (and inference.optim.ClippedAdam) keep the step's arithmetic on the device then.
        # Again after a resume: torch's load_state_dict takes the groups' settings from the checkpoint.
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
                for p in group["params"]:  # a checkpoint saved without capture keeps them on the host
                    step = self.optimizer.state.get(p, {}).get("step")
                    if isinstance(step, torch.Tensor) and step.device != p.device:
                        self.optimizer.state[p]["step"] = step.to(p.device)

    def _build_optimizer(self, optimizer: PyroOptim | OptimizerFactory):
        """(mode, PyroOptim or None, torch optimiser or None) from the ``optimizer`` argument."""
        if isinstance(optimizer, PyroOptim):
            return "svi", optimizer, None
        if isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "pass a factory such as `lambda params: torch.optim.Adam(params, lr=1e-3)` rather than "
                "an optimiser instance: the trainer builds it from module.parameters() on the device"
            )
        if not callable(optimizer):
            raise TypeError(
                "optimizer must be a pyro.optim.PyroOptim (SVI mode) or a callable "
                f"params -> torch.optim.Optimizer (differentiable-loss mode), got {type(optimizer).__name__}"
            )
        if not callable(getattr(self.loss, "differentiable_loss", None)):
            raise TypeError(
                f"{type(self.loss).__name__} has no differentiable_loss(); use it in SVI mode (PyroOptim)"
            )
        built = optimizer(self.module.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(
                f"the optimizer factory must return a torch.optim.Optimizer, got {type(built).__name__}"
            )
        return "diff", None, built

    # ------------------------------------------------------------------ public API

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_data / self.batch_size)

    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """
        Train up to ``epochs`` epochs and return the per-epoch metric dicts (all epochs of the run,
        including those before a resume). With ``resume=True`` continue from ``out_dir/checkpoint.pt``
        (which must exist); otherwise start afresh, truncating ``metrics.jsonl`` (an old checkpoint is
        overwritten at the end of the first epoch). A trainer can be fitted once.
        """
        if self._fitted:
            raise RuntimeError("Trainer.fit() can only be called once; build a new Trainer to continue")
        self._fitted = True
        # Stale entries would shadow the module's parameters (pyro.param returns the stored tensor).
        pyro.clear_param_store()
        if self.pyro_optim is not None:
            _reset_pyro_optim(self.pyro_optim)
        if resume:
            if not self.checkpoint_path.is_file():
                raise FileNotFoundError(
                    f"cannot resume: no checkpoint at {self.checkpoint_path} (run fit() without resume first)"
                )
            self._restore(load_checkpoint(self.checkpoint_path))
            if self.graphed_step is not None:
                self._make_capturable()
            text = "".join(_json_line(m) for m in self.metrics)
            atomic_write(self.metrics_path, lambda f: f.write(text), binary=False)
            if self.keep_best is not None and self.best_path.is_file():
                self._best_value = load_checkpoint(self.best_path)["value"]
        else:
            atomic_write(self.metrics_path, lambda f: None, binary=False)
            if distributed.is_writer():
                self.best_path.unlink(missing_ok=True)  # a stale best.pt of an earlier run must not compete
            distributed.barrier()
        self.module.train()
        for extra in self.extras:
            extra.module.train()
        if self.world_size > 1:
            self._hook_handles = [h for extra in self.extras if (h := _all_reduce_before_step(extra))]
        try:
            self._train()
        finally:
            for handle in self._hook_handles:  # a hook reused by another Trainer must not reduce twice
                handle.remove()
            self._hook_handles = []
        distributed.barrier()  # every file of this run is written before any process goes on to read it
        return [dict(m) for m in self.metrics]

    # ------------------------------------------------------------------ training loop

    def _train(self) -> None:
        steps_per_epoch = self.steps_per_epoch
        total = self.epochs * steps_per_epoch
        bar = tqdm(
            total=total, initial=min(self.step, total), desc="train", unit="step",
            disable=not self.progress or not distributed.is_writer(),
        )
        try:
            while self.epoch < self.epochs:
                epoch = self.epoch + 1
                state = self._epoch_state or {
                    "perm": torch.randperm(self.num_data, generator=self.generator, device=self.device).cpu(),
                    "batch": 0,
                    "loss_sum": 0.0,
                    "num_points": 0,
                    "sums": {},
                    "seconds": 0.0,
                }
                self._epoch_state = None
                start = time.perf_counter() - state["seconds"]
                perm = state["perm"]
                for b in range(state["batch"], steps_per_epoch):
                    idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
                    batch = self._get_batch(idx)
                    loss, terms = self._main_step(batch, epoch)
                    self.step += 1
                    for extra in self.extras:
                        # Hooks start clean: generator_loss may have left gradients in their networks.
                        if extra.optimizer is not None:
                            extra.optimizer.zero_grad(set_to_none=True)
                        try:
                            terms.update(_prefixed(extra, extra.step(batch)))
                        except FloatingPointError as e:  # a hook's own loss was not finite: it did not step
                            path = self.checkpoint_path if self._has_checkpoint else None
                            raise NonFiniteLossError(epoch, self.step, math.nan, path) from e
                    state["loss_sum"] += loss
                    state["num_points"] += idx.numel()
                    for key, value in terms.items():
                        acc = state["sums"].setdefault(key, [0.0, 0])
                        acc[0] += float(value)
                        acc[1] += 1
                    state["batch"] = b + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{state['loss_sum'] / state['num_points']:.4g}", refresh=False)
                    every = self.checkpoint_every_steps
                    if every is not None and self.step % every == 0 and b + 1 < steps_per_epoch:
                        state["seconds"] = time.perf_counter() - start
                        self._save(epoch_state=state)

                metrics = {
                    "epoch": epoch,
                    "step": self.step,
                    "train_loss": state["loss_sum"] / state["num_points"],
                }
                metrics.update({key: s / n for key, (s, n) in state["sums"].items()})
                if self.evaluate is not None:
                    metrics.update(self._run_evaluate(epoch, metrics))
                    self._update_best(epoch, metrics)
                metrics["seconds"] = time.perf_counter() - start
                self.metrics.append(metrics)
                self.epoch = epoch
                # Checkpoint first: it is the source of truth metrics.jsonl is rebuilt from on resume.
                self._save(epoch_state=None)
                if distributed.is_writer():
                    with open(self.metrics_path, "a") as f:
                        f.write(_json_line(metrics))
                        f.flush()
                        os.fsync(f.fileno())
        finally:
            bar.close()

    def _get_batch(self, idx: torch.Tensor) -> Batch:
        idx = distributed.shard(idx)  # this process's part of the minibatch (all of it outside torchrun)
        tensors = tuple(t[idx.to(t.device)].to(self.device) for t in self._data)
        batch: Batch = tensors if self._data_is_tuple else tensors[0]
        if self.transform is not None:
            batch = self.transform(batch, self.transform_generator)
        return batch

    @property
    def data_parallel(self) -> bool:
        """Whether the step runs through ``DistributedDataParallel`` (under torchrun, a loss not online)."""
        return self._forward is not self._step_loss

    def _main_step(self, batch: Batch, epoch: int) -> tuple[float, dict[str, float]]:
        """One optimiser step; returns the batch's (summed) ELBO loss and generator-loss terms."""
        args = batch if isinstance(batch, tuple) else (batch,)
        with pyro.validation_enabled(self.validate):
            if self._online:  # SVI mode, checked at construction
                return self._online_step(args, epoch)
            if self.mode == "svi" and not self.data_parallel:
                return self._svi_step(batch, args, epoch)
            return self._diff_step(batch, args, epoch)

    def _generator_terms(self, batch: Batch) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The sum of the hooks' :meth:`ExtraTerm.generator_loss` terms (None if none) and their values."""
        total, terms = None, {}
        for extra in self.extras:
            term = extra.generator_loss(batch)
            if term is not None:
                total = term if total is None else total + term
                terms[f"{_extra_name(extra)}/generator_loss"] = float(term.detach())
        return total, terms

    def _svi_step(self, batch: Batch, args: tuple, epoch: int) -> tuple[float, dict[str, float]]:
        # As pyro.infer.SVI.step, with the finiteness check moved before the update and the hooks'
        # generator terms back-propagated into the same gradients before the Pyro optimiser's step.
        with poutine.trace(param_only=True) as param_capture:
            loss = self.loss.loss_and_grads(self.model, self.guide, *args)
            extra_loss, terms = self._generator_terms(batch)
        params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
        # Some losses (e.g. ReweightedWakeSleep) return a tuple; the first entry is reported.
        values = [torch_item(v) for v in (loss if isinstance(loss, tuple) else (loss,))]
        values, terms = self._summed(values, terms)
        values_checked = values + list(terms.values())
        bad = next((v for v in values_checked if not math.isfinite(v)), None)
        if bad is not None:
            zero_grads(params)
            self._raise_non_finite(epoch, bad)
        if extra_loss is not None:
            extra_loss.backward()
        self._clip_and_step(params)
        return values[0], terms

    def _clip_and_step(self, params: set[torch.Tensor]) -> None:
        """Clip and step the parameters the loss reached (those with a gradient), then drop their gradients:
        None rather than zeros (torch's zero_grad(set_to_none=True)), so that a parameter a later step does
        not reach (a temperature level's own normalisation) is not moved by Adam's momentum, in a resumed run
        as in an uninterrupted one."""
        all_reduce = self.world_size > 1 and not self.data_parallel
        # Only the float reductions need the fixed order; the per-parameter update does not.
        ordered = _in_store_order(params) if all_reduce or self.clip_norm is not None else list(params)
        if all_reduce:
            # Summed over processes in one order on all of them (their shards' gradients add up to the
            # minibatch's); a parameter no process reached keeps no gradient.
            distributed.all_reduce_gradients(ordered)
        reached = [p for p in ordered if p.grad is not None]
        if self.clip_norm is not None:
            # A fixed order keeps the float reduction inside clip_grad_norm_ reproducible across runs.
            torch.nn.utils.clip_grad_norm_(reached, self.clip_norm)
        self.pyro_optim(reached)
        for p in reached:
            p.grad = None

    def _online_step(self, args: tuple, epoch: int) -> tuple[float, dict[str, float]]:
        # A loss that updates online (variational walkback's Alg. 1) yields several terms per minibatch; each
        # is its own optimiser step on the parameters as the earlier terms left them. A term without gradient
        # (a factor with no parameter) is only added to the reported loss. A non-finite term stops training
        # before its own update: the updates of the minibatch's earlier terms stay in memory, the checkpoint
        # on disk is the last good one.
        total, parts = 0.0, self.loss.online_losses(self.model, self.guide, *args)
        while True:
            with poutine.trace(param_only=True) as param_capture:
                part = next(parts, None)
            if part is None:
                return total, {}
            params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
            (value,), _ = self._summed([torch_item(part)], {})
            if not math.isfinite(value):
                zero_grads(params)
                self._raise_non_finite(epoch, value)
            total += value
            if not part.requires_grad or not params:
                continue
            part.backward()
            self._clip_and_step(params)

    def _diff_step(self, batch: Batch, args: tuple, epoch: int) -> tuple[float, dict[str, float]]:
        """A step through the loss module: differentiable-loss mode, and SVI mode under torchrun (there the
        Pyro optimiser steps the parameters the trace reached, as SVI would)."""
        svi = self.mode == "svi"
        if self.graphed_step is not None and self._params_checked:
            return self._graph_step(args, epoch)
        if not svi:
            assert self.optimizer is not None
            self.optimizer.zero_grad(set_to_none=True)
        params: set[torch.Tensor] = set()
        if self._params_checked and not svi:
            total, elbo_loss, terms = self._forward(batch, *args)
        else:
            with poutine.trace(param_only=True) as param_capture:
                total, elbo_loss, terms = self._forward(batch, *args)
            if not self._params_checked:  # SVI mode traces every step, for the parameters to step
                self._check_diff_params(param_capture.trace)
            params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
        (value, elbo_value), terms = self._summed([float(total.detach()), float(elbo_loss.detach())], terms)
        if not math.isfinite(value):
            self._raise_non_finite(epoch, value)
        total.backward()  # under torchrun DDP sums the gradients over processes during this pass
        if svi:
            self._clip_and_step(params)
            # A module parameter the backward reached but the trace did not (used only by a hook's term
            # without pyro.module) is not stepped; its gradient must not accumulate over steps either.
            for p in self.module.parameters():
                p.grad = None
            return elbo_value, terms
        assert self.optimizer is not None
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._clip_order(), self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return elbo_value, terms

    def _clip_order(self) -> list[torch.nn.Parameter]:
        """The module's parameters in the order SVI mode clips them (by Pyro param-store name, as
        :meth:`_clip_and_step`), so that both modes sum the gradient norm in one order and, with
        :class:`inference.optim.ClippedAdam`, take bit-identical steps on the CPU."""
        if self._clip_params is None:
            self._clip_params = _in_store_order(self.module.parameters())
        return self._clip_params

    def _graph_step(self, args: tuple, epoch: int) -> tuple[float, dict[str, float]]:
        """A step of the captured graphs: loss and gradients, the loss read back and checked, the update."""
        assert self.graphed_step is not None
        value = float(self.graphed_step.loss(*args))  # the step's one read-back
        if not math.isfinite(value):
            self._raise_non_finite(epoch, value)
        self.graphed_step.update()
        return value, {}

    def _summed(self, values: list[float], terms: dict[str, float]) -> tuple[list[float], dict[str, float]]:
        """Loss values and generator terms summed over processes (one collective; unchanged outside
        torchrun): the minibatch's, and the same on every process, so all stop alike on a non-finite one."""
        if self.world_size == 1:
            return values, terms
        summed = distributed.all_reduce_sum([*values, *terms.values()], self.device)
        return summed[: len(values)], dict(zip(terms, summed[len(values):], strict=True))

    def _raise_non_finite(self, epoch: int, value: float) -> NoReturn:
        path = self.checkpoint_path if self._has_checkpoint else None
        raise NonFiniteLossError(epoch, self.step + 1, value, path)

    def _run_evaluate(self, epoch: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        result = self.evaluate(epoch)
        if self.world_size > 1:
            # Every process evaluates (no process idles at a collective meanwhile), then takes rank 0's
            # metrics, so that all make the same keep-best decision, and rank 0's module state, in case
            # evaluate changed some (a fitted variance, batch-norm statistics).
            result = distributed.broadcast_object(result)
            distributed.broadcast_module(self.module)
        if result is None:
            result = {}
        if not isinstance(result, Mapping):
            raise TypeError(f"evaluate(epoch) must return a dict, got {type(result).__name__}")
        clash = sorted(set(result) & (set(metrics) | set(_RESERVED_METRICS)))
        if clash:
            raise ValueError(f"evaluate() returned metric names that are already used: {clash}")
        # evaluate() commonly switches to eval mode; training continues in train mode.
        self.module.train()
        for extra in self.extras:
            extra.module.train()
        return {key: _scalar(value) for key, value in result.items()}

    def _update_best(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        if self.keep_best is None:
            return
        if self.keep_best not in metrics:
            raise KeyError(f"keep_best={self.keep_best!r} is not among the metrics {sorted(metrics)}")
        value = float(metrics[self.keep_best])
        if math.isfinite(value) and value > self._best_value:
            self._best_value = value
            state = {"module": self.module.state_dict(), "epoch": epoch, "metric": self.keep_best}
            save_checkpoint({**state, "value": value}, self.best_path)

    def load_best(self) -> dict[str, Any]:
        """Load the best epoch's weights (``keep_best``) into ``module``; returns epoch, metric and value."""
        distributed.barrier()  # rank 0 has written it
        if not self.best_path.is_file():
            raise FileNotFoundError(f"no best-epoch weights at {self.best_path} (was keep_best set?)")
        best = load_checkpoint(self.best_path)
        self.module.load_state_dict(best["module"])
        return {k: best[k] for k in ("epoch", "metric", "value")}

    # ------------------------------------------------------------------ checkpoints

    def _save(self, epoch_state: dict[str, Any] | None) -> None:
        own = self._own_state()
        state: dict[str, Any] = {
            "format_version": _FORMAT_VERSION,
            "mode": self.mode,
            "num_data": self.num_data,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "epoch_state": epoch_state,
            "module": self.module.state_dict(),
            "param_store": self._non_module_params(),
            "optimizer": (
                self.pyro_optim.get_state() if self.pyro_optim is not None else self.optimizer.state_dict()
            ),
            "extra_names": [_extra_name(extra) for extra in self.extras],
            "data_generator": self.generator.get_state(),
            "metrics": self.metrics,
        }
        if self.world_size == 1:
            state.update(own)
        else:
            # What may differ between processes, every process's, in rank order, gathered on rank 0 (which
            # writes): RNGs, the transform's generator, hooks (replay buffers), the module's buffers.
            state["world_size"] = self.world_size
            state["ranks"] = distributed.gather_to_writer(
                {**own, "transform_generator": self.transform_generator.get_state(),
                 "module_buffers": {k: b.cpu() for k, b in self.module.named_buffers()}})
        save_checkpoint(state, self.checkpoint_path)
        self._has_checkpoint = True

    def _own_state(self) -> dict[str, Any]:
        return {
            "extras": [extra.state_dict() for extra in self.extras],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        }

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        path = self.checkpoint_path
        if ckpt.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported checkpoint format {ckpt.get('format_version')!r}")
        expected = {
            "mode": self.mode,
            "num_data": self.num_data,
            "batch_size": self.batch_size,
            "extra_names": [_extra_name(e) for e in self.extras],
        }
        written_by = ckpt.get("world_size", 1)
        if written_by != self.world_size:
            raise ValueError(f"cannot resume from {path}: it was written by {written_by} process(es) and "
                             f"this run has {self.world_size}; resume with the same number of processes "
                             "(torchrun --nproc_per_node × --nnodes), as the RNG state of each is in it")
        own = ckpt["ranks"][distributed.rank()] if self.world_size > 1 else ckpt
        for key, value in expected.items():
            if ckpt[key] != value:
                # The experiments' --step chooses the mode: svi, or diff for fused and cuda-graph.
                hint = (f" (the experiments' --step {'svi' if ckpt[key] == 'svi' else 'fused'} continues it)"
                        if key == "mode" else "")
                raise ValueError(
                    f"cannot resume from {path}: it was written with {key}={ckpt[key]!r}, this trainer has "
                    f"{key}={value!r}{hint}"
                )
        self.module.load_state_dict(ckpt["module"])
        store_state = ckpt["param_store"]
        if store_state["params"]:
            # Leaf tensors on the device, as pyro.param would have created them.
            params = {
                name: p.detach().to(self.device).requires_grad_(True)
                for name, p in store_state["params"].items()
            }
            pyro.get_param_store().set_state({"params": params, "constraints": store_state["constraints"]})
        if self.pyro_optim is not None:
            # Consumed lazily, when each parameter is first seen (by name) at the first step.
            self.pyro_optim.set_state(ckpt["optimizer"])
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        for extra, extra_state in zip(self.extras, own["extras"], strict=True):
            extra.load_state_dict(extra_state)
        if self.world_size > 1:
            self.transform_generator.set_state(own["transform_generator"])
            buffers = dict(self.module.named_buffers())
            with torch.no_grad():
                for name, value in own["module_buffers"].items():
                    buffers[name].copy_(value)

        self.generator.set_state(ckpt["data_generator"])
        torch.set_rng_state(own["torch_rng"])
        if own["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(own["cuda_rng"])
        np.random.set_state(own["numpy_rng"])
        random.setstate(own["python_rng"])

        self.metrics = [dict(m) for m in ckpt["metrics"]]
        self.epoch = ckpt["epoch"]
        self.step = ckpt["step"]
        self._epoch_state = ckpt["epoch_state"]
        self._has_checkpoint = True

    def _non_module_params(self) -> dict[str, Any]:
        """Param-store entries that are not parameters of the module or the hooks (e.g. pyro.param)."""
        owned = {id(p) for p in self.module.parameters()}
        for extra in self.extras:
            owned.update(id(p) for p in extra.module.parameters())
        state = pyro.get_param_store().get_state()
        names = [name for name, p in state["params"].items() if id(p) not in owned]
        return {
            "params": {name: state["params"][name] for name in names},
            "constraints": {name: state["constraints"][name] for name in names},
        }

    # ------------------------------------------------------------------ validation

    def _check_diff_params(self, trace) -> None:
        # The optimiser only knows module.parameters(); anything else would silently stay untrained.
        owned = {id(p) for p in self.module.parameters()}
        stray = sorted(
            name for name, site in trace.nodes.items() if id(site["value"].unconstrained()) not in owned
        )
        if stray:
            where = ("under torchrun (DistributedDataParallel all-reduces the module's gradients only)"
                     if self.mode == "svi" else "in differentiable-loss mode")
            remedy = "run in one process" if self.mode == "svi" else "use SVI mode"
            raise ValueError(
                f"{where} all parameters must belong to `module`; model/guide use pyro.param sites outside "
                f"it: {stray} ({remedy} or move them into the module)"
            )
        self._params_checked = True
        if self.graphed_step is not None:
            # Clip in SVI mode's order (by param-store name, known now that this step registered them), as
            # the eager fused step does; set before the captured steps' first warm-up, so before any capture.
            self.graphed_step.params = self._clip_order()


class _StepLoss(nn.Module):
    """The loss of one training step as a module, as Pyro's ``ELBOModule`` (``ELBO.__call__``) is:
    ``forward(batch, *args)`` returns (ELBO loss + the hooks' generator terms, the ELBO loss, the terms'
    values). Its only submodule is the trainer's ``module``, so ``DistributedDataParallel`` around it
    reduces exactly the main parameters' gradients (the hooks' networks have their own optimisers)."""

    def __init__(self, trainer: "Trainer"):
        super().__init__()
        self.module = trainer.module
        self._trainer = trainer

    def forward(self, batch: Batch, *args: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        t = self._trainer
        # After the first step has registered and checked the parameters, the fused step needs no Pyro
        # param messages (SVI mode finds the parameters to step through them, every step).
        fused = t._params_checked and t.mode != "svi"
        with params_registered() if fused else contextlib.nullcontext():
            elbo_loss = t.loss.differentiable_loss(t.model, t.guide, *args)
        extra_loss, terms = t._generator_terms(batch)
        return (elbo_loss if extra_loss is None else elbo_loss + extra_loss), elbo_loss, terms


# ---------------------------------------------------------------------- helpers


def _check_arguments(model, guide, module, loss, batch_size, epochs, seed, transform, evaluate, clip_norm,
                     checkpoint_every_steps, keep_best) -> None:
    """Type and range checks of the Trainer's arguments, each error naming the argument."""
    if not callable(model) or not callable(guide):
        raise TypeError("model and guide must be callables")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(loss, ELBO):
        raise TypeError(f"loss must be a pyro.infer.ELBO instance, got {type(loss).__name__}")
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("epochs", epochs, minimum=0)
    _check_int("seed", seed, minimum=None)
    if checkpoint_every_steps is not None:
        _check_int("checkpoint_every_steps", checkpoint_every_steps, minimum=1)
    if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
    for fn_name, fn in (("transform", transform), ("evaluate", evaluate)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{fn_name} must be callable or None")
    if keep_best is not None and evaluate is None:
        raise ValueError(f"keep_best={keep_best!r} needs an evaluate(epoch) callback that returns it")


def _check_shards(num_data: int, batch_size: int, world: int) -> None:
    """Under torchrun every process needs a non-empty shard of every minibatch, the last one included."""
    last = num_data % batch_size or batch_size
    if min(batch_size, last, num_data) < world:
        raise ValueError(
            f"{world} processes need at least {world} examples in every minibatch: batch_size={batch_size} "
            f"and {num_data} training examples leave a last minibatch of {min(last, num_data)}; use fewer "
            "processes or a batch size whose last minibatch is large enough")


def _all_reduce_before_step(extra: ExtraTerm) -> Any:
    """Make ``extra``'s optimiser all-reduce its gradients (mean or sum, as the hook says) before stepping;
    returns the hook's handle (``None`` for a hook without optimiser)."""
    if extra.optimizer is None:
        return None
    if extra.gradient_reduction not in ("mean", "sum"):
        raise ValueError(f"{_extra_name(extra)}.gradient_reduction must be 'mean' or 'sum', got "
                         f"{extra.gradient_reduction!r}")
    params = [p for group in extra.optimizer.param_groups for p in group["params"]]
    average = extra.gradient_reduction == "mean"
    return extra.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: distributed.all_reduce_gradients(params, average=average))


def _checked_extras(extras: Sequence[ExtraTerm], module: nn.Module) -> list[ExtraTerm]:
    """The hooks as a list, after checking each has its own module and optimiser, sharing nothing."""
    extras, names = list(extras), []
    main = {id(p) for p in module.parameters()}
    for i, extra in enumerate(extras):
        if not isinstance(extra, ExtraTerm):
            raise TypeError(f"extras[{i}] must be an ExtraTerm, got {type(extra).__name__}")
        if not isinstance(getattr(extra, "module", None), nn.Module):
            raise TypeError(f"extras[{i}].module must be a torch.nn.Module")
        if not hasattr(extra, "optimizer") or not (
                extra.optimizer is None or isinstance(extra.optimizer, torch.optim.Optimizer)):
            raise TypeError(f"extras[{i}].optimizer must be a torch.optim.Optimizer, or None for a hook "
                            "that trains no network")
        if any(id(p) in main for p in extra.module.parameters()):
            raise ValueError(f"extras[{i}].module shares parameters with the main module")
        own = {id(p) for p in extra.module.parameters()}
        groups = [] if extra.optimizer is None else extra.optimizer.param_groups
        foreign = [j for g in groups for j, p in enumerate(g["params"]) if id(p) not in own]
        if foreign:
            raise ValueError(f"extras[{i}].optimizer holds parameters that are not extras[{i}].module's: "
                             f"a hook's optimiser may only update its own networks")
        names.append(_extra_name(extra))
    if len(set(names)) != len(names):
        raise ValueError(f"ExtraTerm names must be unique (set .name), got {names}")
    return extras


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; otherwise the named device, which must exist here (a
    ``ValueError`` lists the available ones). A CUDA device gets a definite index."""
    available = _available_devices()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{device!r} is not a device; available devices: {available} (or auto)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"CUDA is not available; available devices: {available} (or auto)")
        # Pin the index so that the generator and RNG states refer to one definite GPU.
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist; available devices: {available}")
        return torch.device("cuda", index)
    if dev.type == "cpu" or (dev.type == "mps" and "mps" in available):
        return dev
    raise ValueError(f"device {device!r} is not available; available devices: {available}")


def _check_data(data: torch.Tensor | Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], bool]:
    is_tuple = not isinstance(data, torch.Tensor)
    tensors = tuple(data) if is_tuple else (data,)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("train_data must be a tensor or a non-empty tuple of tensors")
    if any(t.dim() == 0 for t in tensors):
        raise ValueError("train_data tensors must have a data dimension (dim 0)")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"train_data tensors must have the same size along dim 0, got {sorted(sizes)}")
    if sizes.pop() == 0:
        raise ValueError("train_data is empty")
    return tensors, is_tuple


def _reset_pyro_optim(optim: PyroOptim) -> None:
    # PyroOptim keys its per-parameter optimisers by tensor; reused, it would keep stale moments for
    # the same Parameter objects and never consume the state given to set_state().
    optim.optim_objs.clear()
    optim.grad_clip.clear()
    optim._state_waiting_to_be_consumed.clear()


def _in_store_order(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` sorted by their names in Pyro's param store (unregistered ones first, in their order): one
    fixed order for every float reduction over them (the gradient norm, the all-reduce)."""
    store = pyro.get_param_store()
    return sorted(params, key=lambda p: store.param_name(p) or "")


def _extra_name(extra: ExtraTerm) -> str:
    return extra.name or type(extra).__name__


def _prefixed(extra: ExtraTerm, metrics: Mapping[str, Any] | None) -> dict[str, float]:
    name = _extra_name(extra)
    return {f"{name}/{key}": _scalar(value) for key, value in (metrics or {}).items()}


def _scalar(value: Any) -> Any:
    # Tensors and numpy scalars are not JSON-serialisable.
    return value.item() if hasattr(value, "item") else value


def _json_line(metrics: Mapping[str, Any]) -> str:
    return json.dumps(dict(metrics)) + "\n"
