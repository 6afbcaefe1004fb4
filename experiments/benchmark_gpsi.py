"""Benchmark: one training step of GPSI through Pyro against a hand-written PyTorch loss of the same model.

The model is the direct imputation policy GPSI of Bachman & Precup (2015), "Data generation as sequential
decision making", Sec. 3.1, trained on the Eq. 17 objective (negative ELBO with path-wise KL):

    L = E_q[ −Σ_{d missing} log Bernoulli(x_d | σ(c_{T,d})) ]
        + Σ_t KL( q_t(z_t | c_{t-1}, x) || p_t(z_t | c_{t-1}, x_k) )

with one reparameterised guide path per image and closed-form one-step KLs (:class:`PathwiseKL_ELBO`).
Symbols to code: q_t -> ``gpsi.q_net`` + :func:`diag_normal`, p_t -> ``gpsi.p_net`` + :func:`diag_normal`,
ω -> ``gpsi.omega``, c_0 -> ``gpsi.c0``, c_t -> ``canvas`` (update by :func:`update_canvas`), T ->
``gpsi.num_steps``; :func:`handwritten_gpsi_loss` computes L with those very modules and no Pyro.

    python -m experiments.benchmark_gpsi --preset cpu --device cpu --repeats 30 \
        --out results/benchmark-gpsi-cpu
    python -m experiments.benchmark_gpsi --preset paper --device cuda --repeats 50

Variants timed (each a full training step on the same batch and the same module: loss, backward, optimiser
step, gradients cleared):

- (a) ``svi``: ``pyro.infer.SVI(model, guide, pyro.optim.Adam, PathwiseKL_ELBO()).step(x, mask)``;
- (b) ``pyro-diff``: ``PathwiseKL_ELBO().differentiable_loss(model, guide, x, mask)``, backward,
  ``torch.optim.Adam``;
- (b′) ``pyro-diff-every-density``: (b) with ``PathwiseKL_ELBO(every_density=True)``, which computes every
  site's density as Trace_ELBO does instead of only those its terms read (with validation on, (b) does too);
- (e) ``fused``: (b) with one :class:`inference.optim.ClippedAdam` over all parameters and the loss read
  back, inside :func:`ppl_models.base.params_registered` (the model and guide do not call ``pyro.module``):
  the Trainer's ``--step fused``;
- (c) ``handwritten``: :func:`handwritten_gpsi_loss`, backward, ``torch.optim.Adam``. It evaluates the
  networks as two separate programs (the guide rolls out q and ω, then the model, on the guide's z, rolls
  out p and ω again), as Pyro's model/guide pair did before its model took the guide's path
  (:class:`ppl_models.policy_parts.SharedPath`);
- (d) ``handwritten-1pass``: the same loss computed in one roll-out (p evaluated on the guide's canvases,
  ω once per step), what a hand-written loss would naturally do and the computation Pyro's pair now does:
  (a)/(d), (b)/(d) and (e)/(d) measure Pyro's overhead.

and, to see where overhead goes, the forward loss alone (no backward) of the Pyro ELBO (shared by (a) and
(b)), of (c) and of (d). Protocol: warm-up rounds, then ``--repeats`` rounds in which every variant runs once,
in an order rotated each round so machine load and cache state affect all alike; on CUDA the device is
synchronised before each clock reading. Reported: median and interquartile range per variant, ratios of
medians, and the median of the per-round paired ratios.

Outputs in ``--out``: benchmark.json (every time in ms, the environment and sizes) and benchmark.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from pyro.infer.util import is_validation_enabled
from torch.distributions import kl_divergence

from experiments.common import (
    Parser,
    build_imputer,
    non_negative_int,
    positive_int,
    resolve_device,
)
from experiments.config import load_preset, raw_presets
from experiments.data import IMAGE_SHAPES, DataError, dynamic_binarize, load_dataset
from experiments.report import markdown_table, reproduce_command, write_report
from inference.optim import ClippedAdam
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models.base import params_registered
from ppl_models.gpsi import GPSI
from ppl_models.masks import make_mask_process, validate_mask
from ppl_models.policy_parts import cat_inputs, diag_normal, update_canvas

EXPERIMENT = "imputation"  # the presets are the imputation experiment's
DEFAULT_OUT = "runs/benchmark-gpsi"
LR = 1e-4
PROTOCOL = "ratio measured in one run, interleaved, same batch, same module"
RANDOM_SHAPE = IMAGE_SHAPES["fashion-mnist"]  # Fashion-MNIST-shaped random data for --data random

# name -> (kind, description); the order is the table's
VARIANTS = {
    "svi": ("step", "(a) Pyro SVI.step: PathwiseKL_ELBO + pyro.optim.Adam"),
    "pyro-diff": ("step", "(b) PathwiseKL_ELBO.differentiable_loss + backward + torch.optim.Adam"),
    "handwritten": ("step", "(c) handwritten_gpsi_loss (two roll-outs: ω twice per step, as Pyro's "
                    "model/guide pair did before the model took the guide's path) + backward + torch Adam"),
    "handwritten-1pass": ("step", "(d) handwritten_gpsi_loss(one_pass=True) (ω once per step, as Pyro's pair "
                          "does with ppl_models.policy_parts.SharedPath) + backward + torch.optim.Adam"),
    "pyro-diff-every-density": ("step", "(b′) (b) with every site's density computed, as Trace_ELBO "
                                "does (PathwiseKL_ELBO(every_density=True); with validation on, (b) does "
                                "that too)"),
    "fused": ("step", "(e) the Trainer's --step fused: (b) with one inference.optim.ClippedAdam over all "
              "parameters instead of torch's Adam, the loss read back (no gradient clip, as in every "
              "variant), inside ppl_models.base.params_registered as the Trainer's steps after its first"),
    "pyro-forward": ("forward", "forward only: PathwiseKL_ELBO.differentiable_loss (of (a) and (b))"),
    "pyro-forward-every-density": ("forward", "forward only: the same with every density (of (b′))"),
    "handwritten-forward": ("forward", "forward only: handwritten_gpsi_loss (of (c))"),
    "handwritten-1pass-forward": ("forward", "forward only: handwritten_gpsi_loss(one_pass=True) (of (d))"),
}
BASELINE = {"step": "handwritten", "forward": "handwritten-forward"}


# ------------------------------------------------------------------------------------ the hand-written loss


def _roll_out_guide(gpsi: GPSI, x: torch.Tensor, mask: torch.Tensor):
    """q's roll-out with reparameterised draws, in the guide's order: z_1, ..., z_T."""
    canvas = gpsi.c0.expand(x.shape[0], -1)
    known = mask * x
    canvases, q_dists, zs = [canvas], [], []
    for _ in range(gpsi.num_steps):
        guess = torch.sigmoid(canvas)
        current = known + (1 - mask) * guess
        q_t = diag_normal(gpsi.q_net(cat_inputs([current, mask, x - guess])))
        z = q_t.rsample()
        canvas = update_canvas(canvas, gpsi.omega(z), gpsi.update)
        canvases.append(canvas)
        q_dists.append(q_t)
        zs.append(z)
    return canvases, q_dists, zs


def _p_step(gpsi: GPSI, canvas: torch.Tensor, known: torch.Tensor, mask: torch.Tensor):
    current = known + (1 - mask) * torch.sigmoid(canvas)
    return diag_normal(gpsi.p_net(cat_inputs([current, mask])))


def handwritten_gpsi_loss(
    gpsi: GPSI, x: torch.Tensor, mask: torch.Tensor, *, one_pass: bool = False
) -> torch.Tensor:
    """PathwiseKL_ELBO's negative ELBO (Eq. 17) for GPSI, summed over the batch, in plain PyTorch.

    Draws the guide's z_1..z_T with ``rsample`` in the order the Pyro guide does, so with the same torch
    seed the path, the value and the gradients equal ``PathwiseKL_ELBO().differentiable_loss(gpsi.model,
    gpsi.guide, x, mask)``.

    :param gpsi: the module whose networks (``q_net``, ``p_net``, ``omega``, ``c0``) are used.
    :param x: binary data, shape (B, D).
    :param mask: 1 = known, 0 = missing, shape (B, D) or (D,).
    :param one_pass: ``False`` (default) evaluates the networks as two separate programs: the mask is
        validated by each, q and ω roll out the guide path, then p and ω are evaluated again along the model
        path rebuilt from the same z. ``True`` evaluates p on the guide's canvases (ω once per step): the same
        number, less work, which is what the Pyro pair does since its model takes the guide's canvases
        (:class:`ppl_models.policy_parts.SharedPath`).
    :returns: a 0-dim tensor, −ELBO summed over the batch.
    """
    mask_q = validate_mask(mask, x, is_validation_enabled()).to(x.dtype)
    canvases, q_dists, zs = _roll_out_guide(gpsi, x, mask_q)
    kl = 0.0  # each term is the registered closed form PathwiseKL_ELBO uses (analytic_kl)
    if one_pass:
        known = mask_q * x
        for q_t, canvas in zip(q_dists, canvases[:-1], strict=True):
            kl = kl + kl_divergence(q_t, _p_step(gpsi, canvas, known, mask_q)).sum()
        canvas, mask_p = canvases[-1], mask_q
    else:
        # As the model replayed on the guide's z: its own mask check, then p and ω step by step.
        mask_p = validate_mask(mask, x, is_validation_enabled()).to(x.dtype)
        known = mask_p * x
        canvas = gpsi.c0.expand(x.shape[0], -1)
        for q_t, z in zip(q_dists, zs, strict=True):
            kl = kl + kl_divergence(q_t, _p_step(gpsi, canvas, known, mask_p)).sum()
            canvas = update_canvas(canvas, gpsi.omega(z), gpsi.update)
    # −log Bernoulli(x | σ(c)) on missing pixels only; where(), as Pyro's .mask(), so 0 · inf cannot arise.
    nll = F.binary_cross_entropy_with_logits(canvas, x, reduction="none")
    cost = torch.where(mask_p < 0.5, nll, nll.new_zeros(())).sum()
    return cost + kl


# ----------------------------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fused_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """The rest of the Trainer's ``--step fused`` step after its loss: backward, the loss read back (the
    Trainer checks it before the update), the update, gradients cleared. Returns the loss."""
    loss.backward()
    value = float(loss.detach())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def make_actions(gpsi: GPSI, x: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """One callable per variant of :data:`VARIANTS`; each does one step (or one forward) on (x, mask)."""
    pyro.clear_param_store()
    elbo = PathwiseKL_ELBO()
    svi = pyro.infer.SVI(gpsi.model, gpsi.guide, pyro.optim.Adam({"lr": LR}), PathwiseKL_ELBO())
    # One torch optimiser per variant, so no variant inherits another's moment estimates' state layout.
    every = PathwiseKL_ELBO(every_density=True)
    opts = {k: torch.optim.Adam(gpsi.parameters(), lr=LR)
            for k in ("pyro-diff", "every", "handwritten", "1pass")}

    def torch_step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def pyro_loss() -> torch.Tensor:
        return elbo.differentiable_loss(gpsi.model, gpsi.guide, x, mask)

    fused_opt = ClippedAdam(gpsi.parameters(), lr=LR, betas=(0.9, 0.999), clip_norm=1e12)

    def fused_step() -> float:
        with params_registered():  # as the Trainer's steps after its first
            return fused_update(pyro_loss(), fused_opt)

    def every_density_loss() -> torch.Tensor:
        return every.differentiable_loss(gpsi.model, gpsi.guide, x, mask)

    def hand_loss() -> torch.Tensor:
        return handwritten_gpsi_loss(gpsi, x, mask)

    def one_pass_loss() -> torch.Tensor:
        return handwritten_gpsi_loss(gpsi, x, mask, one_pass=True)

    return {
        "svi": lambda: svi.step(x, mask),
        "pyro-diff": lambda: torch_step(pyro_loss, opts["pyro-diff"]),
        "handwritten": lambda: torch_step(hand_loss, opts["handwritten"]),
        "handwritten-1pass": lambda: torch_step(one_pass_loss, opts["1pass"]),
        "pyro-diff-every-density": lambda: torch_step(every_density_loss, opts["every"]),
        "fused": fused_step,
        "pyro-forward": pyro_loss,
        "pyro-forward-every-density": every_density_loss,
        "handwritten-forward": hand_loss,
        "handwritten-1pass-forward": one_pass_loss,
    }


def time_interleaved(actions: dict[str, Callable[[], Any]], params: list[torch.Tensor], device: torch.device,
                     repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call of each action: ``warmup`` untimed rounds, then ``repeats`` rounds, each calling
    every action once, the order rotated by one each round."""
    names = list(actions)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            for p in params:  # every variant starts without gradients (SVI leaves zero tensors behind)
                p.grad = None
            _synchronize(device)
            t0 = time.perf_counter()
            out = actions[name]()
            _synchronize(device)
            elapsed = time.perf_counter() - t0
            del out  # a forward's graph is freed outside the timed region
            if r >= warmup:
                times[name].append(1e3 * elapsed)
    return times


def summarise(ms: list[float]) -> dict[str, float]:
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "min_ms": float(min(ms)), "n": len(ms)}


def paired_difference(a: list[float], b: list[float]) -> float:
    """Median of the per-round differences a_i − b_i, in ms."""
    return float(np.median(np.asarray(a) - np.asarray(b)))


def paired_ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """Median and IQR of the per-round ratios a_i / b_i (both timed in the same round)."""
    q1, med, q3 = np.percentile(np.asarray(a) / np.asarray(b), [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3)}


# ------------------------------------------------------------------------------------------------- setup


def make_batch(
    config: dict[str, Any], data_source: str, mask_spec: str, batch_size: int, device: torch.device,
    seed: int, data_dir: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """The benchmark's one batch (x, mask), the mean image for c_0, and a sentence saying what the data is."""
    g = torch.Generator().manual_seed(seed)
    if data_source == "dataset":
        data = load_dataset(config["dataset"], data_dir)
        grey = data.train[:batch_size]
        x = dynamic_binarize(grey, g)
        shape, mean = data.image_shape, data.train.mean(0)
        about = (f"{data.name}: the first {x.shape[0]} training images, binarised once (Bernoulli of the "
                 f"grey levels, seed {seed})")
    else:
        shape = RANDOM_SHAPE
        x = (torch.rand(batch_size, shape[0] * shape[1], generator=g) < 0.3).float()
        mean = x.mean(0)
        about = f"random binary {shape[0]}x{shape[1]} images (pixels on with probability 0.3, seed {seed})"
    mask = make_mask_process(mask_spec, shape).sample(x, generator=g)
    return x.to(device), mask.to(device), mean, about


def _load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "device": str(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "pyro_validation": pyro.infer.util.is_validation_enabled(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def run(config: dict[str, Any], method: str, mask_spec: str, batch_size: int, data_source: str, device: str,
        repeats: int, warmup: int, seed: int, data_dir: str | None, out: Path,
        command: str | None = None) -> dict[str, Any]:
    """Build the module and batch, time every variant interleaved, write benchmark.json and benchmark.md."""
    dev = torch.device(device)
    load_before = _load_average()
    x, mask, mean, about = make_batch(config, data_source, mask_spec, batch_size, dev, seed, data_dir)
    pyro.set_rng_seed(seed)
    gpsi = build_imputer(method, config, x.shape[1], mean).to(dev)
    if not isinstance(gpsi, GPSI):
        raise ValueError(f"{method} is not a GPSI method")
    params = list(gpsi.parameters())

    # Sanity check before timing: both losses agree on one shared path (float32, so only to rounding).
    torch.manual_seed(seed)
    with torch.no_grad():
        pyro_value = float(PathwiseKL_ELBO().differentiable_loss(gpsi.model, gpsi.guide, x, mask))
        torch.manual_seed(seed)
        hand_value = float(handwritten_gpsi_loss(gpsi, x, mask))

    actions = make_actions(gpsi, x, mask)
    t0 = time.time()
    times = time_interleaved(actions, params, dev, repeats, warmup)
    wall = time.time() - t0

    stats = {n: {**summarise(ms), "kind": VARIANTS[n][0], "description": VARIANTS[n][1]}
             for n, ms in times.items()}
    med = {n: s["median_ms"] for n, s in stats.items()}
    ratios = {
        "svi_over_handwritten": med["svi"] / med["handwritten"],
        "differentiable_over_handwritten": med["pyro-diff"] / med["handwritten"],
        "one_pass_over_handwritten": med["handwritten-1pass"] / med["handwritten"],
        "forward_pyro_over_handwritten": med["pyro-forward"] / med["handwritten-forward"],
        "forward_one_pass_over_handwritten": med["handwritten-1pass-forward"] / med["handwritten-forward"],
        # Against what one would naturally hand-write: Pyro's overhead plus the model/guide split's.
        "svi_over_one_pass": med["svi"] / med["handwritten-1pass"],
        "differentiable_over_one_pass": med["pyro-diff"] / med["handwritten-1pass"],
    }
    paired = {
        "svi_over_handwritten": paired_ratio(times["svi"], times["handwritten"]),
        "differentiable_over_handwritten": paired_ratio(times["pyro-diff"], times["handwritten"]),
        "forward_pyro_over_handwritten": paired_ratio(times["pyro-forward"], times["handwritten-forward"]),
        "svi_over_one_pass": paired_ratio(times["svi"], times["handwritten-1pass"]),
        "differentiable_over_one_pass": paired_ratio(times["pyro-diff"], times["handwritten-1pass"]),
        "fused_over_one_pass": paired_ratio(times["fused"], times["handwritten-1pass"]),
        "every_density_over_differentiable": paired_ratio(times["pyro-diff-every-density"],
                                                          times["pyro-diff"]),
        "forward_every_density_over_pyro": paired_ratio(times["pyro-forward-every-density"],
                                                        times["pyro-forward"]),
    }
    # Where the step overhead of (b) over (c) goes: the forward difference, the rest is backward + optimiser.
    # Medians of per-round differences: both terms of a difference ran in the same round, under the same load.
    step_over = paired_difference(times["pyro-diff"], times["handwritten"])
    fwd_over = paired_difference(times["pyro-forward"], times["handwritten-forward"])
    attribution = {
        "step_overhead_ms": step_over,
        "forward_overhead_ms": fwd_over,
        "backward_and_optimiser_overhead_ms": step_over - fwd_over,
        "svi_over_differentiable_ms": paired_difference(times["svi"], times["pyro-diff"]),
        "svi_over_fused_ms": paired_difference(times["svi"], times["fused"]),
        "handwritten_backward_and_optimiser_ms": paired_difference(times["handwritten"],
                                                                   times["handwritten-forward"]),
    }
    g = config["gpsi"]
    result = {
        "protocol": PROTOCOL,
        "protocol_details": (
            f"{warmup} warm-up rounds, then {repeats} rounds; in each round every variant runs once, in an "
            "order rotated by one per round; gradients set to None before each call (not timed); the device "
            "is synchronised before each clock reading; times are wall-clock (time.perf_counter) in ms"
        ),
        "model": {"method": method, "x_dim": int(x.shape[1]), "z_dim": g["z_dim"], "hidden": g["hidden"],
                  "num_steps": gpsi.num_steps, "update": gpsi.update,
                  "parameters": sum(p.numel() for p in params), "dtype": str(x.dtype)},
        "batch": {"batch_size": int(x.shape[0]), "mask": mask_spec,
                  "missing_fraction": float(1 - mask.mean()), "data": about},
        "preset": config["preset"], "seed": seed, "lr": LR, "warmup": warmup, "repeats": repeats,
        "environment": environment(dev),
        "load_average": {"before": load_before, "after": _load_average()},
        "wall_seconds": wall,
        "loss_check": {"pyro": pyro_value, "handwritten": hand_value,
                       "abs_diff": abs(pyro_value - hand_value)},
        "variants": stats,
        "ratios": ratios,
        "paired_ratios": paired,
        "attribution_ms": attribution,
        "times_ms": times,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, "benchmark", result, render_markdown(result), command=command)
    return result


def paired_text(q: dict[str, float]) -> str:
    """A paired ratio as "median (q1–q3)"."""
    return f"{q['median']:.2f} ({q['q1']:.2f}–{q['q3']:.2f})"


def _paired_extra(p: dict[str, Any]) -> str:
    """The paired ratios added with the every-density and fused variants (absent from earlier pages)."""
    if "every_density_over_differentiable" not in p:
        return ""
    return (f"; paired, (a)/(d) {paired_text(p['svi_over_one_pass'])}, (b)/(d) "
            f"{paired_text(p['differentiable_over_one_pass'])}, (e)/(d) "
            f"{paired_text(p['fused_over_one_pass'])}. "
            f"Every density against those read (paired): step (b′)/(b) "
            f"{paired_text(p['every_density_over_differentiable'])}, forward "
            f"{paired_text(p['forward_every_density_over_pyro'])}")


def render_markdown(r: dict[str, Any]) -> str:
    rows = []
    for s in r["variants"].values():
        base = r["variants"][BASELINE[s["kind"]]]["median_ms"]
        rows.append([s["description"], f"{s['median_ms']:.2f}", f"{s['iqr_ms']:.2f}",
                     f"{s['q1_ms']:.2f}–{s['q3_ms']:.2f}", f"{s['median_ms'] / base:.2f}"])
    m, b, a = r["model"], r["batch"], r["attribution_ms"]
    p = r["paired_ratios"]
    return "\n".join([
        f"# GPSI training step: Pyro vs hand-written PyTorch ({m['method']}, preset {r['preset']})",
        "",
        f"Protocol: {r['protocol']}. {r['protocol_details']}.",
        "",
        f"Model: GPSI-{m['update']}, x {m['x_dim']}, hidden {m['hidden']}, z {m['z_dim']}, "
        f"T = {m['num_steps']}, {m['parameters']} parameters, {m['dtype']}. Batch: {b['batch_size']} "
        f"images, mask {b['mask']} ({100 * b['missing_fraction']:.1f}% missing); data: {b['data']}. "
        f"Optimisers: Adam, lr {r['lr']}.",
        "",
        markdown_table(["variant", "median ms", "IQR ms", "q1–q3 ms", "ratio to hand-written (c)"], rows),
        "",
        "Forward rows are compared with the hand-written forward. Paired ratios (median of per-round ratios, "
        f"q1–q3): (a)/(c) {paired_text(p['svi_over_handwritten'])}, (b)/(c) "
        f"{paired_text(p['differentiable_over_handwritten'])}, forward "
        f"{p['forward_pyro_over_handwritten']['median']:.2f}. Against the one-pass hand-written loss (d) "
        f"(Pyro's overhead plus the cost of evaluating p and q on separate model and guide paths): (a)/(d) "
        f"{r['ratios']['svi_over_one_pass']:.2f}, (b)/(d) {r['ratios']['differentiable_over_one_pass']:.2f}"
        + _paired_extra(p) + ".",
        "",
        "Where the overhead goes (medians of per-round differences): (b) − (c) = "
        f"{a['step_overhead_ms']:.2f} ms per step, of which {a['forward_overhead_ms']:.2f} ms in the "
        "forward (tracing, replay, site densities and bookkeeping) and "
        f"{a['backward_and_optimiser_overhead_ms']:.2f} ms in backward + optimiser (the remainder of two "
        "noisy numbers: read it only when it is large against the IQRs); SVI.step adds "
        f"{a['svi_over_differentiable_ms']:.2f} ms over (b) (param capture, per-parameter Pyro optimisers, "
        "zeroing)"
        + (f" and {a['svi_over_fused_ms']:.2f} ms over (e)" if "svi_over_fused_ms" in a else "") + ".",
        "",
        f"Loss check on one shared path: Pyro {r['loss_check']['pyro']:.4f}, hand-written "
        f"{r['loss_check']['handwritten']:.4f}.",
        "",
        environment_sentence(r),
        "",
    ])


def environment_sentence(r: dict[str, Any]) -> str:
    """The report's line on where the times were taken (``r``: a benchmark result with ``environment``,
    ``load_average`` and ``wall_seconds``)."""
    e = r["environment"]
    gpu = f", {e['gpu']}" if "gpu" in e else ""
    return (f"Environment: {e['device']}{gpu} ({e['cpu']}, {e['cpu_count']} CPUs), torch {e['torch']}, pyro "
            f"{e['pyro']}, python {e['python']}, torch threads {e['torch_threads']} (OMP_NUM_THREADS="
            f"{e['OMP_NUM_THREADS']}), Pyro validation {'on' if e['pyro_validation'] else 'off'}; load "
            f"average before {r['load_average']['before']}, after {r['load_average']['after']}; "
            f"{r['wall_seconds']:.1f} s in all.")


# --------------------------------------------------------------------------------------------------- CLI


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """The options every step benchmark has: --repeats, --warmup, --data-dir, --no-validation."""
    parser.add_argument("--repeats", type=positive_int, default=30,
                        help="timed rounds, each running every variant once, >= 1 (default 30)")
    parser.add_argument("--warmup", type=non_negative_int, default=5,
                        help="untimed rounds before the timed ones, >= 0 (default 5)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the Fashion-MNIST IDX .gz files (default: "
                        "$SEQGEN_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--no-validation", action="store_true",
                        help="switch off Pyro's and torch.distributions' argument validation (on by default "
                        "here; the training step runs with it off unless an experiment gets --validate)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing benchmark in --out")


def refuse_existing(parser: argparse.ArgumentParser, out: Path, force: bool, resumable: bool = False) -> None:
    """A usage error where ``out`` already holds a benchmark and ``force`` is not given: no run overwrites
    another's results. ``resumable``: the benchmark has ``--resume``, which the message offers too."""
    if (out / "benchmark.json").exists() and not force:
        resume = "--resume continues it (the models not yet timed), " if resumable else ""
        parser.error(f"{out / 'benchmark.json'} exists: {resume}--force overwrites it, or choose another "
                     "--out")


def device_and_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The benchmark's resolved ``--device`` (a usage error naming the available ones if it is not), after
    setting torch's intra-op threads to ``--threads`` where the parser has that option and it was given."""
    try:
        device = str(resolve_device(args.device))
    except ValueError as e:
        parser.error(str(e))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return device


def build_parser() -> argparse.ArgumentParser:
    presets = raw_presets(EXPERIMENT)
    parser = Parser(
        prog="python -m experiments.benchmark_gpsi",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--preset", default="cpu", choices=sorted(presets),
                        help="(default cpu) sizes (gpsi z_dim, hidden, num_steps; train.batch_size; "
                        "dataset) from experiments/presets/imputation.json: "
                        + "; ".join(f"{k}: {v.get('about', '')}" for k, v in presets.items()))
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda, cuda:N or auto (CUDA when present)")
    parser.add_argument("--method", default="gpsi-add", choices=("gpsi-add", "gpsi-jump"),
                        help="GPSI with the additive (default) or the jump canvas update")
    parser.add_argument("--mask", default=None,
                        help="mask setting, mcar-<percent> or mar-<size> (default: the preset's "
                        "table.rollout_mask: mar-16 for cpu and paper, mar-4 for quick's 8x8 digits)")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, default=None,
                        help="images in the batch, >= 1 (default: the preset's train.batch_size)")
    parser.add_argument("--data", default="dataset", choices=("dataset", "random"),
                        help="'dataset': the first training images of the preset's data set; 'random': "
                        "random binary 28x28 images (no data files needed); default 'dataset'")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="seed of the data, the mask and the weights, >= 0 (default: the preset's)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads, >= 1 (default: torch's, which follows OMP_NUM_THREADS)")
    add_timing_args(parser)
    parser.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT}/<preset>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = {**load_preset(EXPERIMENT, args.preset), "preset": args.preset}
    mask_spec = args.mask or config["table"]["rollout_mask"]
    shape = RANDOM_SHAPE if args.data == "random" else IMAGE_SHAPES[config["dataset"]]
    try:
        make_mask_process(mask_spec, shape)
    except ValueError as e:
        parser.error(str(e))
    device = device_and_threads(parser, args)
    if args.no_validation:
        pyro.enable_validation(False)
    out = Path(args.out or f"{DEFAULT_OUT}/{args.preset}")
    refuse_existing(parser, out, args.force)
    try:
        run(config, args.method, mask_spec, args.batch_size or config["train"]["batch_size"], args.data,
            device, args.repeats, args.warmup, config["seed"] if args.seed is None else args.seed,
            args.data_dir, out, reproduce_command("experiments.benchmark_gpsi",
                                                  sys.argv[1:] if argv is None else argv, out, device))
    except DataError as e:
        parser.error(f"{e} (use --data random to benchmark without data files)")
    print((out / "benchmark.md").read_text())
    print(f"results: {out / 'benchmark.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
