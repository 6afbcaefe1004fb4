"""Benchmark: one training step of each paper's model through the project's Pyro objective against the
same loss hand-written in PyTorch, eager and ``torch.compile``\\ d, in one run.

Models (the project's registered pairs, sized by a preset of their experiment, ``--sizes``):

- ``gpsi-add``: GPSI (Bachman & Precup 2015, "Data generation as sequential decision making", Sec. 3.1),
  :class:`inference.pathwise_kl_elbo.PathwiseKL_ELBO` (Eq. 17), masks ``mcar-80``; hand-written loss
  :func:`handwritten_gpsi_one_pass` (:func:`experiments.benchmark_gpsi.handwritten_gpsi_loss` with ω once
  per step);
- ``lstm-add``: the LSTM imputer (same paper, Sec. 3.2), ``PathwiseKL_ELBO``; :func:`handwritten_lstm_loss`;
- ``draw-extended-add``: the extended DRAW-style generator (same paper, Sec. 2.5), ``PathwiseKL_ELBO``;
  :func:`handwritten_draw_loss`;
- ``vae``: the VAE (Kingma & Welling 2014; Sec. 2.5's one-step policy), ``PathwiseKL_ELBO``;
  :func:`handwritten_vae_loss`;
- ``diffusion-gaussian``: DDPM's L_simple (Ho et al. 2020, Eq. 14) through
  :class:`inference.diffusion_simple.SimpleDiffusionLoss`; hand-written
  :func:`experiments.benchmark_diffusion.handwritten_simple_loss`.

Every hand-written loss draws its random numbers in the order the Pyro objective does and evaluates the
networks as the model/guide pair does (the guide's roll-out, then the model's along the same draws, on the
writer's path that the guide computed, as :class:`ppl_models.policy_parts.SharedPath` hands it over), so at
the same torch seed its value and gradients equal the Pyro loss's (``tests/test_benchmark_steps.py`` checks
it in float64): the floor is the same computation without Pyro's tracing, replay and bookkeeping.

Variants timed per model (each a full step on one fixed batch and the same module: loss, backward, Adam step,
gradients cleared):

- ``svi``: ``pyro.infer.SVI(...).step`` with argument validation on;
- ``svi-novalid``: the same with validation off, which is what the Trainer's SVI mode does per step by
  default (``Trainer(validate=None)``);
- ``pyro-diff``: the objective's ``differentiable_loss``, backward, ``torch.optim.Adam``;
- ``pyro-diff-novalid``: the same with Pyro's and torch.distributions' argument validation off;
- ``handwritten``: the hand-written loss, eager;
- ``handwritten-compiled``: the same function through ``torch.compile`` (default mode, inductor); its first
  call, which compiles, is timed apart and reported as the compile time;
- ``svi-novalid-compiled-nets``: ``svi-novalid`` with the model's networks (MLPs, the U-Net) through
  ``torch.compile`` and the Pyro objective eager around them (:mod:`inference.compiled`, what the Trainer's
  ``compile=True`` does); its first call is timed apart too;
- ``fused``: ``differentiable_loss`` with validation off, backward, and one
  :class:`inference.optim.ClippedAdam` over all parameters (Pyro's ClippedAdam update; ``torch._foreach``
  kernels off the CPU), the loss read back as the Trainer reads it, inside
  :func:`ppl_models.base.params_registered` as the Trainer's steps after its first: the Trainer's step with
  ``--step fused``;
- ``fused-unshared``: ``fused`` with the model computing p's writer path again along the guide's draws
  instead of taking the guide's (:func:`ppl_models.policy_parts.shared_paths`): what
  :class:`ppl_models.policy_parts.SharedPath` saves, in the same run (the VAE and diffusion have no such
  path: there it is ``fused`` again);
- ``svi-novalid-unshared``: ``svi-novalid`` (the SVI training step, ``--step svi``) with the path not
  shared, as ``fused-unshared``: the shared path's saving in the SVI step;
- ``fused-every-density``: ``fused`` with the objective computing every site's density, as Trace_ELBO does
  (``PathwiseKL_ELBO(every_density=True)``), instead of only those its estimator reads: what that saves, in
  the same run (diffusion's objective has no traces: there it is ``fused`` again);
- ``fused-registering``: ``fused`` with the model and guide calling ``pyro.module`` at every call, as they
  do outside :func:`ppl_models.base.params_registered` (which the Trainer's fused step enters after its
  first step): what that saves, in the same run;
- ``cuda-graph`` (CUDA only): the ``fused`` step captured in CUDA graphs (:mod:`inference.cuda_graph`,
  ``--step cuda-graph``); its warm-up steps and capture are timed apart.

Protocol: per model, ``--warmup`` untimed rounds and ``--repeats`` timed rounds in which every variant runs
once, in an order rotated each round (:func:`experiments.benchmark_gpsi.time_interleaved`; on CUDA the device
is synchronised before each clock reading). Reported: medians and IQRs, and ratios to the hand-written eager
step. Speed is a ratio measured in one run; absolute times only count from a GPU.

    python -m experiments.benchmark_steps --device cpu --batch-size 16 --out results/benchmark-steps-cpu
    python -m experiments.benchmark_steps --device cuda --batch-size 200 --out results/benchmark-steps-gpu

Besides the times, each model's row counts the operations of one loss and its backward
(:func:`operation_counts`, :data:`OPERATION_COUNTS`): the ATen operations that compute, views left out, on a
GPU about one kernel launch each. A launch-bound GPU step's overhead is in that count, which any machine can
take, and which is the same on every run.

Outputs in ``--out``: benchmark.json (every time in ms, sizes, the environment) and benchmark.md, written
after each model: a run stopped by a time limit keeps the models it finished, marked incomplete, and
``--resume`` times the rest with the same options (for a GPU lent for a few minutes per call). A
``cuda-graph`` variant that fails its warm-up or capture is left out of its model's row with the error
recorded. ``--variants`` picks the variants to time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro.infer.util import is_validation_enabled
from torch.distributions import kl_divergence

from experiments.benchmark_diffusion import handwritten_simple_loss
from experiments.benchmark_gpsi import (
    PROTOCOL,
    _load_average,
    _synchronize,
    device_and_threads,
    environment,
    environment_sentence,
    fused_update,
    handwritten_gpsi_loss,
    paired_ratio,
    paired_text,
    refuse_existing,
    summarise,
    time_interleaved,
)
from experiments.common import Parser, build_registered, non_negative_int, positive_float, positive_int
from experiments.config import load_preset
from experiments.diffusion import model_sizes
from experiments.report import markdown_table, reproduce_command, write_report
from inference.compiled import is_network
from inference.cuda_graph import GraphedStep
from inference.diffusion_simple import SimpleDiffusionLoss
from inference.op_count import count_operations
from inference.optim import ClippedAdam
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models.base import params_registered
from ppl_models.draw import DRAWGenerator
from ppl_models.gpsi import GPSI
from ppl_models.lstm_imputer import LSTMImputer
from ppl_models.masks import make_mask_process, validate_mask
from ppl_models.policy_parts import cat_inputs, diag_normal, lstm_step, shared_paths, writer_step
from ppl_models.vae import VAE

DEFAULT_OUT = "runs/benchmark-steps"
SHAPE = (28, 28)  # Fashion-MNIST-shaped random data: the timing does not depend on the pixel values
LR = 1e-4
MASK = "mcar-80"
VARIANTS = {
    "svi": "Pyro SVI.step (+ pyro.optim.Adam), argument validation on",
    "svi-novalid": "the same with validation off: the Trainer's SVI step (--step svi)",
    "pyro-diff": "objective.differentiable_loss + backward + torch Adam",
    "pyro-diff-novalid": "the same, argument validation off",
    "fused": "objective.differentiable_loss + backward + one ClippedAdam (inference.optim; foreach kernels "
             "off the CPU) over all parameters, validation off, the loss read back, the model and guide "
             "not registering their parameters again (ppl_models.base.params_registered): the Trainer's "
             "step with --step fused",
    "fused-unshared": "the fused step with the model computing p's writer path again along the guide's draws "
                      "(ppl_models.policy_parts.shared_paths(False)): the two programs' plain cost",
    "svi-novalid-unshared": "the SVI training step (svi-novalid) with the model computing p's writer "
                            "path again, as in fused-unshared",
    "fused-every-density": "the fused step with the objective computing every site's density as Trace_ELBO "
                           "does (PathwiseKL_ELBO(every_density=True)) instead of only those it reads",
    "fused-registering": "the fused step with the model and guide registering their parameters with Pyro "
                         "(pyro.module) at every call, as outside params_registered",
    "handwritten": "hand-written loss (same computation) + backward + torch Adam, eager, validation off",
    "handwritten-compiled": "the hand-written loss through torch.compile + backward + torch Adam, validation "
                            "off",
    "svi-novalid-compiled-nets": "the training step with the model's networks compiled (the Trainer's "
                                 "compile=True, --compile): SVI.step, validation off",
    "cuda-graph": "the fused step captured in CUDA graphs and replayed (inference.cuda_graph; --step "
                  "cuda-graph); CUDA only",
}
BASELINE = "handwritten"
#: The variants that compile (``--no-compile`` leaves them out).
COMPILED_VARIANTS = ("handwritten-compiled", "svi-novalid-compiled-nets")
#: Calls of the cuda-graph variant before its timed ones: GraphedStep's eager warm-up steps and the capture.
GRAPH_FIRST_CALLS = 4


# ------------------------------------------------------------------------------------ hand-written losses


def _bce_sum(logits: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """−log Bernoulli(x | σ(logits)) summed, over the pixels where ``keep`` (all without it); where(), as
    Pyro's ``.mask()``, so 0 · inf cannot arise."""
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return (nll if keep is None else torch.where(keep, nll, nll.new_zeros(()))).sum()


def handwritten_gpsi_one_pass(gpsi: GPSI, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`experiments.benchmark_gpsi.handwritten_gpsi_loss` with ω once per step (``one_pass``): p on
    q's canvases, as the model's replay takes them (:class:`ppl_models.policy_parts.SharedPath`)."""
    return handwritten_gpsi_loss(gpsi, x, mask, one_pass=True)


def handwritten_vae_loss(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """``PathwiseKL_ELBO``'s negative ELBO of :class:`ppl_models.vae.VAE`, summed over the batch: one
    reparameterised z_0 ~ q(z_0 | x), the analytic KL to N(0, I), −log Bernoulli(x | σ(decoder(z_0)))."""
    loc, scale = vae.encode(x)
    q = torch.distributions.Normal(loc, scale)
    z = q.rsample()
    return _bce_sum(vae.decode(z), x) + kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()


def handwritten_lstm_loss(policy: LSTMImputer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``PathwiseKL_ELBO``'s negative ELBO (Eq. 17) of the LSTM imputer, summed over the batch: q's roll-out
    (z_0..z_T reparameterised, in the guide's order), then p's reader along the same draws on q's writer
    path (as the model's replay takes it, :class:`ppl_models.policy_parts.SharedPath`), one analytic KL per
    step, −log p(x_u | c_T) on the missing pixels."""
    # The guide's check, as ImputationPolicy.guide does (a value scan while validation is on)
    mask_q = validate_mask(mask, x, is_validation_enabled()).to(x.dtype)

    def read(canvas: torch.Tensor, m: torch.Tensor, guide: bool) -> list[torch.Tensor]:
        guess = torch.sigmoid(canvas)
        return [m * x + (1 - m) * guess, m] + ([x - guess] if guide else [])

    # q: z_0 ~ q(z_0 | c_0, x), the initial states, then the guide LSTM's steps
    canvas = policy.c0.expand(x.shape[0], -1)
    q_dists, zs = [diag_normal(policy.q_z0(cat_inputs(read(canvas, mask_q, True))))], []
    zs.append(q_dists[0].rsample())
    reader, writer, state = policy.initial(zs[0])
    canvases, writers = [canvas], [writer]
    for _ in range(policy.num_steps):
        state = lstm_step(policy.guide_lstm, cat_inputs([*read(canvas, mask_q, True), writer[0]]), state)
        q_dists.append(diag_normal(policy.q_step(state[0])))
        zs.append(q_dists[-1].rsample())
        writer, canvas = writer_step(policy.writer, policy.write, zs[-1], writer, canvas, policy.update)
        canvases.append(canvas)
        writers.append(writer)
    # p along the same z: the model's own mask check, then its reader on q's writer path
    mask_p = validate_mask(mask, x, is_validation_enabled()).to(x.dtype)
    p_t = diag_normal(policy.p_z0(cat_inputs(read(canvases[0], mask_p, False))))
    kl = kl_divergence(q_dists[0], p_t).sum()
    state = reader
    for t, q_t in enumerate(q_dists[1:]):
        reads = cat_inputs([*read(canvases[t], mask_p, False), writers[t][0]])
        state = lstm_step(policy.reader, reads, state)
        kl = kl + kl_divergence(q_t, diag_normal(policy.p_step(state[0]))).sum()
    return _bce_sum(canvases[-1], x, mask_p < 0.5) + kl


def handwritten_draw_loss(draw: DRAWGenerator, x: torch.Tensor) -> torch.Tensor:
    """``PathwiseKL_ELBO``'s negative ELBO (Eq. 13) of the extended DRAW generator, summed over the batch:
    q's roll-out (z_0..z_T reparameterised), then p's step distributions along q's writer path (as the
    model's replay takes it, :class:`ppl_models.policy_parts.SharedPath`), one analytic KL per step."""
    if draw.prior != "extended":
        raise ValueError("handwritten_draw_loss is written for the extended generator")
    n = x.shape[0]
    q0 = diag_normal(draw.q_z0(x))
    zs, q_dists = [q0.rsample()], [q0]
    writer, guide_state = draw.initial(zs[0])
    canvas = draw.c0.expand(n, -1)
    writers = [writer]
    for _ in range(draw.num_steps):
        read = cat_inputs([x, x - torch.sigmoid(canvas), writer[0]])
        guide_state = lstm_step(draw.guide_lstm, read, guide_state)
        q_dists.append(diag_normal(draw.q_step(guide_state[0])))
        zs.append(q_dists[-1].rsample())
        writer, canvas = writer_step(draw.writer, draw.write, zs[-1], writer, canvas, draw.update)
        writers.append(writer)
    # p along the same z: N(0, I) for z_0, then p(z_t | s_{t-1}) from the writer's state
    prior0 = pyro.distributions.Normal(x.new_zeros(draw.z0_dim), x.new_ones(draw.z0_dim)).to_event(1)
    kl = kl_divergence(q_dists[0], prior0).sum()
    for t, q_t in enumerate(q_dists[1:]):
        kl = kl + kl_divergence(q_t, diag_normal(draw.p_step(writers[t][0]))).sum()
    return _bce_sum(canvas, x) + kl


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Case:
    """One benchmarked model: the module, its inputs, the project's objective and the hand-written loss."""

    name: str
    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    objective: Any
    handwritten: Callable[..., torch.Tensor]
    sizes: dict[str, Any]
    preset: str


#: The size keys that are widths (of layers, LSTM states, latents), which ``--width-scale`` scales; the
#: others (steps, levels, the variance schedule) set the step's structure and are kept.
WIDTH_KEYS = ("z_dim", "z0_dim", "hidden", "lstm_dim", "mix_hidden", "channels", "embed_dim")


def narrowed(sizes: dict[str, Any], scale: float) -> dict[str, Any]:
    """``sizes`` with every width (:data:`WIDTH_KEYS`) times ``scale``, rounded, at least 1; the U-Net's
    ``channels`` stay a multiple of its GroupNorm ``groups`` and its ``embed_dim`` even and >= 2. Steps,
    layers and levels are kept, so the step runs the same operations on smaller tensors (the counts of
    :func:`operation_counts` do not change): at ``scale`` 1/50 and batch 1 a CPU step is bound by the host's
    per-operation cost, as the issue's GPU step is by kernel launches."""
    if not 0 < scale <= 1:
        raise ValueError(f"width scale must be in (0, 1], got {scale!r}")
    if scale == 1:
        return dict(sizes)

    def width(v: int, multiple: int = 1, least: int = 1) -> int:
        return max(least, multiple * round(v * scale / multiple))

    out = dict(sizes)
    for key in WIDTH_KEYS:
        if key not in out:
            continue
        if key == "hidden":
            out[key] = [width(h) for h in out[key]]
        elif key == "channels":
            out[key] = width(out[key], out.get("groups", 1), out.get("groups", 1))
        elif key == "embed_dim":
            out[key] = width(out[key], 2, 2)
        else:
            out[key] = width(out[key])
    return out


def _sizes(experiment: str, preset: str, section: str) -> dict[str, Any]:
    return dict(load_preset(experiment, preset)[section])


def build_case(name: str, sizes: str, batch_size: int, device: torch.device, seed: int,
               dtype: torch.dtype = torch.float32, width_scale: float = 1.0) -> Case:
    """The model ``name`` sized by preset ``sizes`` of its experiment, its widths times ``width_scale``
    (:func:`narrowed`), with a random batch of ``batch_size`` Fashion-MNIST-shaped images (binary, or grey
    levels for diffusion) and masks."""
    g = torch.Generator().manual_seed(seed)
    x_dim = SHAPE[0] * SHAPE[1]
    binary = (torch.rand(batch_size, x_dim, generator=g) < 0.3).to(dtype)
    torch.manual_seed(seed)  # the initial weights
    if name in ("gpsi-add", "lstm-add"):
        section = name.split("-")[0]
        kw = narrowed(_sizes("imputation", sizes, section), width_scale)
        mask = make_mask_process(MASK, SHAPE).sample(binary, generator=g).to(dtype)
        module = build_registered(name, kw, x_dim, init_mean=binary.mean(0))
        hand = handwritten_gpsi_one_pass if section == "gpsi" else handwritten_lstm_loss
        inputs, objective = (binary, mask), PathwiseKL_ELBO()
    elif name == "draw-extended-add":
        kw = narrowed(_sizes("draw", sizes, "generator"), width_scale)
        module = build_registered(name, kw, x_dim, init_mean=binary.mean(0))
        inputs, objective, hand = (binary,), PathwiseKL_ELBO(), handwritten_draw_loss
    elif name == "vae":
        kw = narrowed(_sizes("vae", sizes, "model"), width_scale)
        module = build_registered(name, kw, x_dim)
        inputs, objective, hand = (binary,), PathwiseKL_ELBO(), handwritten_vae_loss
    elif name == "diffusion-gaussian":
        config = load_preset("diffusion", sizes)
        kw = narrowed(model_sizes("gaussian", {**config, "dataset": "fashion-mnist"}), width_scale)
        module = build_registered(name, kw, x_dim)
        grey = torch.randint(0, 256, (batch_size, x_dim), generator=g).to(dtype) / 255
        inputs, objective, hand = (grey,), SimpleDiffusionLoss(), handwritten_simple_loss
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    module = module.to(device=device, dtype=dtype)
    return Case(name, module, tuple(t.to(device) for t in inputs), objective, hand,
                {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}, sizes)


MODELS = ("gpsi-add", "lstm-add", "draw-extended-add", "vae", "diffusion-gaussian")


# ------------------------------------------------------------------------------------------------ timing


def every_density_objective(objective: Any) -> Any:
    """A copy of the objective computing every site's density, as Trace_ELBO does: ``PathwiseKL_ELBO``'s
    option ``every_density``. An objective without it (diffusion's, which has no traces) is returned as is."""
    if not isinstance(objective, PathwiseKL_ELBO):
        return objective
    every = copy.copy(objective)
    every.every_density = True
    return every


def make_actions(case: Case, compiled: Callable[..., torch.Tensor] | None) -> dict[str, Callable[[], Any]]:
    """One callable per variant of :data:`VARIANTS` (the two compiled ones only when ``compiled``)."""
    pyro.clear_param_store()
    m, args = case.module, case.inputs
    svi = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": LR}), type(case.objective)())
    svi_novalid = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": LR}), type(case.objective)())
    svi_nets = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": LR}), type(case.objective)())
    # The networks' compiled forwards, put on the instances only while their variant runs (one module,
    # one param store for every variant), as inference.compiled.compile_networks puts them for good.
    nets = {name: torch.compile(child.forward) for name, child in m.named_children() if is_network(child)}

    def svi_step_novalid() -> float:
        with pyro.validation_enabled(False):
            return svi_novalid.step(*args)

    def svi_step_compiled_nets() -> float:
        for name, forward in nets.items():
            getattr(m, name).forward = forward
        try:
            with pyro.validation_enabled(False):
                return svi_nets.step(*args)
        finally:
            for name in nets:
                del getattr(m, name).forward
    opts = {k: torch.optim.Adam(m.parameters(), lr=LR) for k in VARIANTS}
    fused_opt = ClippedAdam(m.parameters(), lr=LR, betas=(0.9, 0.999), clip_norm=1e12)

    every_density = every_density_objective(case.objective)

    def fused_step(objective: Any = case.objective, register: bool = False) -> float:
        # As the Trainer's step after its first: the parameters are registered already.
        with pyro.validation_enabled(False), contextlib.nullcontext() if register else params_registered():
            return fused_update(objective.differentiable_loss(m.model, m.guide, *args), fused_opt)

    def fused_unshared_step() -> float:
        with shared_paths(False):
            return fused_step()

    def svi_novalid_unshared_step() -> float:
        with shared_paths(False):
            return svi_step_novalid()

    def step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def pyro_loss() -> torch.Tensor:
        return case.objective.differentiable_loss(m.model, m.guide, *args)

    def novalid() -> torch.Tensor:
        with pyro.validation_enabled(False):
            return pyro_loss()

    def floor(loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        # The floor checks nothing: its mask checks (as the model's) are validation, off as in the step.
        with pyro.validation_enabled(False):
            return loss_fn(m, *args)

    actions = {
        "svi": lambda: svi.step(*args),
        "svi-novalid": svi_step_novalid,
        "pyro-diff": lambda: step(pyro_loss, opts["pyro-diff"]),
        "pyro-diff-novalid": lambda: step(novalid, opts["pyro-diff-novalid"]),
        "handwritten": lambda: step(lambda: floor(case.handwritten), opts["handwritten"]),
        "fused": fused_step,
        "fused-unshared": fused_unshared_step,
        "svi-novalid-unshared": svi_novalid_unshared_step,
        "fused-every-density": lambda: fused_step(every_density),
        "fused-registering": lambda: fused_step(register=True),
    }
    if case.inputs[0].is_cuda:
        graphed = GraphedStep(lambda *a: case.objective.differentiable_loss(m.model, m.guide, *a),
                              list(m.parameters()), ClippedAdam(m.parameters(), lr=LR, clip_norm=1e12))

        def graph_step() -> float:
            with pyro.validation_enabled(False):
                value = float(graphed.loss(*args))
                graphed.update()
            return value
        actions["cuda-graph"] = graph_step
    if compiled is not None:
        opt = opts["handwritten-compiled"]
        actions["handwritten-compiled"] = lambda: step(lambda: floor(compiled), opt)
        actions["svi-novalid-compiled-nets"] = svi_step_compiled_nets
    return actions


def loss_check(case: Case, seed: int) -> dict[str, float]:
    """The Pyro objective and the hand-written loss from the same torch seed, without gradients."""
    m = case.module
    with torch.no_grad():
        torch.manual_seed(seed)
        p = float(case.objective.differentiable_loss(m.model, m.guide, *case.inputs))
        torch.manual_seed(seed)
        h = float(case.handwritten(m, *case.inputs))
    return {"pyro": p, "handwritten": h, "rel_diff": abs(p - h) / max(abs(p), 1e-30)}


#: The losses whose operations :func:`operation_counts` counts (forward and backward, no optimiser, whose
#: kernels differ by device), with what each is.
OPERATION_COUNTS = {
    "handwritten": "the hand-written loss",
    "objective": "the objective's differentiable_loss, validation off: the training step's loss",
    "every-density": "the same computing every site's density, as Trace_ELBO does (every_density=True)",
    "unshared": "the same with the model computing p's writer path again (shared_paths(False))",
    "validation-on": "the objective's loss with Pyro's validation on",
    "svi-step": "a whole step of the SVI training step (--step svi): Pyro's SVI.step, validation off, with "
                "pyro.optim.ClippedAdam (one optimiser per parameter)",
    "fused-step": "a whole step of --step fused: the objective's loss, backward and one "
                  "inference.optim.ClippedAdam with foreach kernels (capturable, as it runs off the CPU)",
}


def operation_counts(case: Case, seed: int) -> dict[str, int]:
    """The ATen operations that compute (views left out; :func:`inference.op_count.count_operations`) in one
    loss and its backward, per entry of :data:`OPERATION_COUNTS`: on a GPU about one kernel launch each, so
    the launch overhead of a launch-bound step, counted on any machine. Deterministic: the same on every
    run of the same code, sizes and device type."""
    m, args = case.module, case.inputs
    every = every_density_objective(case.objective)

    def objective(o: Any) -> Callable[[], torch.Tensor]:
        return lambda: o.differentiable_loss(m.model, m.guide, *args)

    losses = {"handwritten": (lambda: case.handwritten(m, *args), False, True),
              "objective": (objective(case.objective), False, True),
              "every-density": (objective(every), False, True),
              "unshared": (objective(case.objective), False, False),
              "validation-on": (objective(case.objective), True, True)}
    out = {}
    for key, (loss, validate, shared) in losses.items():
        torch.manual_seed(seed)
        with pyro.validation_enabled(validate), shared_paths(shared):
            _, counts = count_operations(lambda f: f().backward(), loss)
        m.zero_grad(set_to_none=True)
        out[key] = sum(counts.values())
    # The whole steps, optimiser included: each counted on its second call (the first makes the optimiser's
    # state), then the module's weights are put back as they were.
    weights = copy.deepcopy(m.state_dict())
    pyro.clear_param_store()
    svi = pyro.infer.SVI(m.model, m.guide, pyro.optim.ClippedAdam({"lr": LR, "clip_norm": 1e12}),
                         copy.copy(case.objective))
    fused = ClippedAdam(m.parameters(), lr=LR, clip_norm=1e12, capturable=True)

    def fused_step() -> None:
        case.objective.differentiable_loss(m.model, m.guide, *args).backward()
        fused.step()
        fused.zero_grad(set_to_none=True)

    for key, step in (("svi-step", lambda: svi.step(*args)), ("fused-step", fused_step)):
        with pyro.validation_enabled(False):
            step()
            _, counts = count_operations(step)
        out[key] = sum(counts.values())
    m.load_state_dict(weights)
    pyro.clear_param_store()
    return out


def _seconds(call: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call (a first, compiling call), the device synchronised before reading."""
    t0 = time.perf_counter()
    call()
    _synchronize(device)
    return time.perf_counter() - t0


def bench_model(name: str, sizes: str, batch_size: int, device: torch.device, seed: int, repeats: int,
                warmup: int, variants: tuple[str, ...] = tuple(VARIANTS),
                width_scale: float = 1.0) -> dict[str, Any]:
    """Time the ``variants`` of one model (those that run on ``device``); returns its sizes, times, medians,
    ratios and compile times. A ``cuda-graph`` variant that fails its warm-up or capture is dropped and its
    error recorded (``cuda_graph_error``), so the other variants' times still come back."""
    case = build_case(name, sizes, batch_size, device, seed, width_scale=width_scale)
    check = loss_check(case, seed)
    operations = operation_counts(case, seed)
    compiled, compile_s = None, None
    if any(v in variants for v in COMPILED_VARIANTS):
        torch._dynamo.reset()
        compiled = torch.compile(case.handwritten)
        with pyro.validation_enabled(False):  # as the timed calls run it (no recompilation for the switch)
            compile_s = _seconds(lambda: compiled(case.module, *case.inputs).backward(), device)
        for p in case.module.parameters():
            p.grad = None
    actions = {k: a for k, a in make_actions(case, compiled).items() if k in variants}
    params = list(case.module.parameters())
    nets_s = graph_s = graph_error = None
    if "svi-novalid-compiled-nets" in actions:  # the networks' first compiled call, apart from the timed ones
        nets_s = _seconds(actions["svi-novalid-compiled-nets"], device)
    if "cuda-graph" in actions:  # its eager warm-up steps and the capture, apart from the timed replays
        try:
            graph_s = _seconds(lambda: [actions["cuda-graph"]() for _ in range(GRAPH_FIRST_CALLS)], device)
        except Exception as e:  # noqa: BLE001 - recorded in the report; the other variants still run
            graph_error = f"{type(e).__name__}: {e}"
            print(f"{name}: the cuda-graph variant failed and is left out: {graph_error}", file=sys.stderr)
            del actions["cuda-graph"]
            for p in params:
                p.grad = None
    times = time_interleaved(actions, params, device, repeats, warmup)
    stats = {k: summarise(v) for k, v in times.items()}
    base = stats[BASELINE]["median_ms"]
    return {
        "model": name, "sizes_preset": sizes, "width_scale": width_scale, "sizes": case.sizes,
        "batch_size": batch_size,
        "objective": type(case.objective).__name__,
        "parameters": sum(p.numel() for p in params),
        "loss_check": check, "operations": operations,
        "compile_seconds": compile_s, "compile_nets_seconds": nets_s,
        "cuda_graph_first_calls_seconds": graph_s, "cuda_graph_error": graph_error,
        "environment": environment(device),
        "variants": stats,
        "ratios_to_handwritten": {k: s["median_ms"] / base for k, s in stats.items()},
        "times_ms": times,
    }


class BenchmarkExists(Exception):
    """``--out`` holds a benchmark that this run may not continue with its options."""


def run(models: tuple[str, ...], sizes: str, batch_size: int, device: str, repeats: int, warmup: int,
        seed: int, out: Path, variants: tuple[str, ...] = tuple(VARIANTS), command: str | None = None,
        progress: bool = True, resume: bool = False, width_scale: float = 1.0) -> dict[str, Any]:
    """Benchmark every model in turn and write benchmark.json and benchmark.md after each, so a run stopped
    by a time limit keeps the models it finished (``"complete": false`` until the last). ``resume``
    continues such a run in ``out``: the models already timed are kept, the others are timed with the same
    settings (the machine may differ: each model's row names its own ``environment``); without it a
    benchmark in ``out`` is overwritten (the command line refuses that without ``--force``)."""
    from tqdm.auto import tqdm

    dev = torch.device(device)
    # What a resumed run must share with the run it continues (each model's row names its own machine).
    settings = {"models_requested": sorted(models), "sizes_preset": sizes, "width_scale": width_scale,
                "batch_size": batch_size,
                "seed": seed, "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
                "variants_requested": [v for v in VARIANTS if v in variants], "device_type": dev.type}
    load_before = _load_average()
    rows, wall_before = _earlier_rows(out, settings) if resume else ([], 0.0)
    done = {r["model"] for r in rows}
    t0 = time.time()

    def report() -> dict[str, Any]:
        result = _result(rows, models, settings, load_before, wall_before + time.time() - t0)
        out.mkdir(parents=True, exist_ok=True)
        write_report(out, "benchmark", result, render_markdown(result), command=command)
        return result

    result = None
    for m in tqdm([m for m in models if m not in done], desc="models", disable=not progress):
        load = _load_average()
        rows.append({**bench_model(m, sizes, batch_size, dev, seed, repeats, warmup, variants, width_scale),
                     "load_average_before": load})
        rows.sort(key=lambda r: models.index(r["model"]))
        result = report()
    return result or report()  # nothing left to time: the earlier page, rewritten as it was


def _result(rows: list[dict[str, Any]], models: tuple[str, ...], settings: dict[str, Any],
            load_before: float | None, wall: float) -> dict[str, Any]:
    done = {r["model"] for r in rows}
    return {
        "protocol": PROTOCOL,
        "protocol_details": (f"per model: {settings['warmup']} warm-up rounds, then {settings['repeats']} "
                             "rounds, every variant once per round in an order rotated by one each round; "
                             "gradients set to None before each call (not timed); wall-clock ms "
                             "(time.perf_counter), the device synchronised before each reading"),
        "data": (f"random {SHAPE[0]}x{SHAPE[1]} images, batch {settings['batch_size']}: binary (pixels on "
                 f"with probability 0.3) for the Bernoulli models with {MASK} masks for the imputers, grey "
                 f"levels k/255 for diffusion; seed {settings['seed']}"),
        "lr": LR, **settings,
        "complete": all(m in done for m in models),
        "models_pending": [m for m in models if m not in done],
        "environment": rows[0]["environment"] if rows else environment(torch.device(settings["device_type"])),
        "load_average": {"before": load_before, "after": _load_average()},
        "wall_seconds": wall,
        "models": rows,
    }


def _earlier_rows(out: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """The finished rows and wall seconds of the benchmark in ``out`` that a resume continues (none where
    there is none yet)."""
    path = out / "benchmark.json"
    if not path.exists():
        return [], 0.0
    earlier = json.loads(path.read_text())
    earlier.setdefault("width_scale", 1.0)  # benchmarks written before --width-scale ran at full width
    differ = {k: (earlier.get(k), v) for k, v in settings.items() if earlier.get(k) != v}
    if differ:
        raise BenchmarkExists(
            f"--resume: {path} was run with other settings: "
            + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in differ.items())
            + "; give the options it ran with (--models, --sizes, --width-scale, --batch-size, --seed, "
            "--repeats, --warmup, --threads, --variants/--no-compile, the device's type; its command is in "
            "benchmark.json), or another --out")
    return earlier["models"], float(earlier.get("wall_seconds", 0.0))


#: Same-run comparisons the page gives as paired ratios (numerator, denominator, what it measures).
PAIRS = (
    ("svi-novalid", "handwritten", "SVI step / hand-written"),
    ("fused", "handwritten", "fused / hand-written"),
    ("fused", "handwritten-compiled", "fused / compiled floor"),
    ("svi-novalid-unshared", "svi-novalid", "SVI step, path not shared / shared"),
    ("fused-unshared", "fused", "fused, path not shared / shared"),
    ("fused-every-density", "fused", "fused, every density / those read"),
    ("fused-registering", "fused", "fused, registering / registered"),
)


def _paired_section(r: dict[str, Any]) -> list[str]:
    """Paired ratios of :data:`PAIRS` per model, from the per-round times (both variants of a round ran
    under the same load, so these are steadier than ratios of medians)."""
    rows = []
    for m in r["models"]:
        times = m.get("times_ms", {})
        cells = [paired_text(paired_ratio(times[a], times[b])) if a in times and b in times else "n/a"
                 for a, b, _ in PAIRS]
        if any(c != "n/a" for c in cells):
            rows.append([m["model"], *cells])
    if not rows:
        return []
    return [
        "**Paired ratios**: the median of the per-round ratios of two variants, with its quartiles.",
        "",
        markdown_table(["model", *(f"{what} (`{a}` / `{b}`)" for a, b, what in PAIRS)], rows),
        "",
    ]


def _operations_section(r: dict[str, Any]) -> list[str]:
    """The operation counts' table (rows of pages written before they were counted have none)."""
    counted = [m for m in r["models"] if m.get("operations")]
    if not counted:
        return []
    rows = []
    for m in counted:
        ops, base = m["operations"], m["operations"]["handwritten"]
        rows.append([m["model"], *("n/a" if k not in ops else f"{ops[k]:,}"
                                   + ("" if k == "handwritten" else f" ×{ops[k] / base:.3f}")
                                   for k in OPERATION_COUNTS)])
    return [
        "**Operations per loss and backward, and per step** (counted, not timed: the ATen operations that "
        "compute, views left out, forward and backward of one loss on this batch, and for the two steps the "
        "optimiser's update too; on a GPU about one kernel "
        "launch each, so a launch-bound step's overhead; the same on every run of this code on this device "
        "type). ×: the ratio to the hand-written loss's count (for the two steps: loss, backward and update "
        "against the hand-written loss and backward). "
        + "; ".join(f"`{k}`: {v}" for k, v in OPERATION_COUNTS.items()) + ".",
        "",
        markdown_table(["model", *OPERATION_COUNTS], rows),
        "",
    ]


def render_markdown(r: dict[str, Any]) -> str:
    names = [k for k in VARIANTS if any(k in m["variants"] for m in r["models"])]
    graphs = "cuda-graph" in names
    rows = []
    for m in r["models"]:
        cells = [f"{m['model']} ({m['parameters']:,} params)"]
        for k in names:
            s = m["variants"].get(k)
            cells.append("n/a" if s is None else
                         f"{s['median_ms']:.2f} ({s['iqr_ms']:.2f}) ×{m['ratios_to_handwritten'][k]:.2f}")
        cells.append("n/a" if m["compile_seconds"] is None else f"{m['compile_seconds']:.0f}")
        nets_s = m.get("compile_nets_seconds")
        cells.append("n/a" if nets_s is None else f"{nets_s:.0f}")
        if graphs:
            graph_s = m.get("cuda_graph_first_calls_seconds")
            cells.append("n/a" if graph_s is None else f"{graph_s:.1f}")
        cells.append(f"{m['loss_check']['rel_diff']:.1e}")
        rows.append(cells)
    sizes = "; ".join(f"{m['model']}: {m['sizes']}" for m in r["models"])
    status = []
    if not r.get("complete", True):
        status = [f"**Incomplete**: not yet timed: {', '.join(r['models_pending'])} (`--resume` times them).",
                  ""]
    failed = [f"- {m['model']}: the `cuda-graph` variant failed and is left out of its row: "
              f"`{m['cuda_graph_error']}`" for m in r["models"] if m.get("cuda_graph_error")]
    return "\n".join([
        f"# Training step: project objective vs hand-written PyTorch (sizes of preset `{r['sizes_preset']}`"
        + (f", widths × {r['width_scale']:g}" if r.get("width_scale", 1.0) != 1.0 else "") + ")",
        "",
        *status,
        f"Protocol: {r['protocol']}. {r['protocol_details']}.",
        "",
        f"Data: {r['data']}. Adam, lr {r['lr']}. Sizes: {sizes}.",
        "",
        "Each cell: median ms (IQR) ×ratio to the hand-written eager step. Compile: seconds of the compiled "
        "loss's first call in this process (forward and backward; inductor's on-disk cache may hold an "
        "earlier run's compilation, so this can be far below a cold compile); compile nets: the same for "
        "the first step with the networks compiled"
        + ("; graph s: the cuda-graph variant's warm-up steps and capture" if graphs else "")
        + ". The compiled hand-written variant draws "
        "its noise with inductor's own generator (same distributions, other numbers). Check: relative "
        "difference of the Pyro and hand-written losses at the same seed (float32).",
        "",
        markdown_table(["model", *[f"{k}" for k in names], "compile s", "compile nets s",
                        *(["graph s"] if graphs else []), "check"], rows),
        "",
        *([*failed, ""] if failed else []),
        "Variants: " + "; ".join(f"`{k}`: {VARIANTS[k]}" for k in names) + ".",
        "",
        *_paired_section(r),
        *_operations_section(r),
        environment_sentence(r),
        *_machines_sentence(r),
        "",
    ])


def _machines_sentence(r: dict[str, Any]) -> list[str]:
    """Where a resumed benchmark's rows were timed on different machines, which row ran where (ratios are
    within a row, so they stay comparable; absolute times across such rows are not)."""
    def machine(e: dict[str, Any]) -> str:
        return f"{e.get('gpu', e['device'])} ({e['cpu']}, {e['cpu_count']} CPUs, torch {e['torch']})"
    where = {m["model"]: machine(m["environment"]) for m in r["models"] if "environment" in m}
    if len(set(where.values())) <= 1:
        return []
    return ["", "Rows timed on different machines (the benchmark was resumed): "
            + "; ".join(f"{k}: {v}" for k, v in where.items())
            + ". Compare absolute times only within a row."]


# --------------------------------------------------------------------------------------------------- CLI


def width_scale(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.benchmark_steps", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="variants:\n" + "\n".join(f"  {k}: {v}" for k, v in VARIANTS.items()))
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated models to time (default all: {','.join(MODELS)})")
    parser.add_argument("--sizes", default="paper", choices=("quick", "cpu", "paper"),
                        help="the preset whose network sizes each model takes from its experiment's presets "
                        "file (default paper: the papers' sizes)")
    parser.add_argument("--width-scale", dest="width_scale", type=width_scale, default=1.0,
                        help="multiply every width of those sizes (layers, LSTM states, latents, U-Net "
                        "channels) by this, in (0, 1]; steps and layers are kept, so the step runs the same "
                        "operations on smaller tensors. With 0.02 and --batch-size 1 a CPU step is bound by "
                        "the per-operation cost of the host, as the issue's GPU step is by kernel launches "
                        "(default 1: the sizes as they are)")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, default=16,
                        help="images per step, >= 1 (default 16: small, where per-step overhead dominates "
                        "as it does on a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--repeats", type=positive_int, default=20,
                        help="timed rounds per model, each running every variant once, >= 1 (default 20)")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed rounds per model before the timed ones, >= 0 (default 3)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the data, masks and weights, >= 0 (default 0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads, >= 1 (default: torch's, which follows OMP_NUM_THREADS)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants to time (default all that run on the device: "
                        f"{','.join(VARIANTS)}); must include the baseline {BASELINE!r}")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the two torch.compile variants (they need a C++ compiler on the CPU, and "
                        "compiling takes minutes at the papers' sizes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT}/<sizes>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the benchmark in --out: keep the models it timed, time the others. "
                        "Every option but --out, --device's index and --no-progress must be as it ran (the "
                        "report is written after each model, so a run stopped by a time limit keeps what "
                        "it finished)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing benchmark in --out (not with --resume)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.force:
        parser.error("--resume continues the benchmark in --out, --force overwrites it: give one")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown or 'empty list'}; choose from {','.join(MODELS)}")
    variants = tuple(VARIANTS) if args.variants is None else tuple(
        v.strip() for v in args.variants.split(",") if v.strip())
    wrong = [v for v in variants if v not in VARIANTS]
    if wrong or BASELINE not in variants:
        problem = f"unknown {wrong}" if wrong else f"the baseline {BASELINE!r} is missing"
        parser.error(f"--variants: {problem}; choose from {','.join(VARIANTS)}, {BASELINE!r} included")
    if args.no_compile:
        variants = tuple(v for v in variants if v not in COMPILED_VARIANTS)
    device = device_and_threads(parser, args)
    out = Path(args.out or f"{DEFAULT_OUT}/{args.sizes}")
    if not args.resume:
        refuse_existing(parser, out, args.force, resumable=True)
    try:
        run(models, args.sizes, args.batch_size, device, args.repeats, args.warmup, args.seed, out,
            variants, progress=not args.no_progress, resume=args.resume, width_scale=args.width_scale,
            command=reproduce_command("experiments.benchmark_steps", sys.argv[1:] if argv is None else argv,
                                      out, device))
    except BenchmarkExists as e:
        parser.error(str(e))
    print((out / "benchmark.md").read_text())
    print(f"results: {out / 'benchmark.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
