"""Benchmark: one training step of Gaussian diffusion through Pyro against a hand-written PyTorch loss of the
same network and batch.

The model is DDPM (Ho et al. 2020, "Denoising diffusion probabilistic models") as the model/guide pair
:class:`ppl_models.gaussian_diffusion.GaussianDiffusion`: a fixed noising guide q and a learned denoising
model p, the diffusion of Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.3,
Eq. 9 (guided policy search trained with the path-wise KL; time reversed here, x_0 is the data). The data x
in [0, 1] is observed as x_0 = 2x − 1. Two training losses, each summed over the batch:

- ``simple``: Ho's L_simple (Eq. 14), :class:`inference.diffusion_simple.SimpleDiffusionLoss`::

      t ~ U{1..T},  ε ~ N(0, I),  L = || ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t) ||²  (summed over pixels)

- ``bound``: the path-wise bound (Ho Eq. 5; Bachman & Precup Eq. 9 and 17) with the time step subsampled,
  :class:`inference.diffusion_elbo.SubsampledDiffusionELBO`::

      L = KL(q(x_T | x_0) || N(0, I)) − log p(x_0 | x_1)
          + (T − 1) · KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),
      x_1 ~ q(x_1 | x_0),  t ~ U{2..T} per image,  x_t ~ q(x_t | x_0),

  with Ho's discretised decoder p(x_0 | x_1) (Eq. 13) and Gaussian KLs in closed form.

Symbols to code: ε_θ -> ``pair.eps_net`` (the U-Net); the schedule's coefficients (index t − 1) -> the pair's
buffers ``sqrt_ab`` (√ᾱ_t), ``sqrt_1m_ab`` (√(1 − ᾱ_t)), ``eps_coef`` (β_t/√(1 − ᾱ_t)), ``inv_sqrt_alpha``
(1/√α_t), ``post_c0`` and ``post_ct`` (μ̃_t's two coefficients), ``post_std`` (√β̃_t) and ``sigma`` (σ_t); T
-> ``pair.num_steps``, μ_θ(x_t, t) -> :func:`eps_to_mean`, μ̃_t -> :func:`posterior_mean`, KL ->
:func:`normal_kl`, −log p(x_0 | x_1) -> :func:`discretized_gaussian_nll`; :func:`handwritten_simple_loss` and
:func:`handwritten_bound_loss` compute the two losses with those very modules and buffers and no Pyro, drawing
their random numbers in the order the Pyro losses do (so with the same torch seed the values agree).

    python -m experiments.benchmark_diffusion --preset quick --repeats 5
    python -m experiments.benchmark_diffusion --preset paper --device cuda --repeats 50

Variants timed, per loss (each a full training step on the same batch and the same module: loss, backward,
optimiser step, gradients cleared):

- (a) ``svi``: ``pyro.infer.SVI(pair.model, pair.guide, pyro.optim.Adam, loss).step(x)``;
- (b) ``pyro-diff``: ``loss.differentiable_loss(pair.model, pair.guide, x)``, backward, ``torch.optim.Adam``;
- (c) ``handwritten``: :func:`handwritten_simple_loss` / :func:`handwritten_bound_loss`, backward,
  ``torch.optim.Adam``.

Both losses' variants run interleaved in one loop (:func:`experiments.benchmark_gpsi.time_interleaved`:
warm-up rounds, then ``--repeats`` rounds in which every variant runs once, the order rotated each round; on
CUDA the device is synchronised before each clock reading). Reported: median and interquartile range per
variant, the ratios (a)/(c) and (b)/(c) of the medians and the medians of the per-round paired ratios. Speed
is a ratio measured in one run; absolute times only count from a GPU.

Outputs in ``--out``: benchmark.json (every time in ms, the sizes, the environment) and benchmark.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from torch.special import log_ndtr

from experiments.benchmark_gpsi import (
    PROTOCOL,
    _load_average,
    add_timing_args,
    device_and_threads,
    environment,
    environment_sentence,
    paired_ratio,
    refuse_existing,
    summarise,
    time_interleaved,
)
from experiments.common import Parser, build_registered, non_negative_int, positive_int
from experiments.config import load_preset, raw_presets
from experiments.data import IMAGE_SHAPES, DataError, load_dataset
from experiments.diffusion import GREY_LEVELS, model_sizes
from experiments.report import markdown_table, reproduce_command, write_report
from inference.diffusion_elbo import SubsampledDiffusionELBO
from inference.diffusion_simple import SimpleDiffusionLoss
from ppl_models.gaussian_diffusion import GaussianDiffusion

EXPERIMENT = "diffusion"  # the presets are the diffusion experiment's
DEFAULT_OUT = "runs/benchmark-diffusion"
DATASET = "fashion-mnist"  # the benchmark's images: Fashion-MNIST, or random images of its shape and levels
SHAPE = IMAGE_SHAPES[DATASET]
LEVELS = GREY_LEVELS[DATASET]
LOSSES = ("simple", "bound")
SPEED_NOTE = ("Speed is a ratio measured in one run (same batch, same module, variants interleaved); "
              "absolute times only count from a GPU.")

# name -> description; the order is the table's
VARIANTS = {
    "svi": "(a) Pyro SVI.step + pyro.optim.Adam",
    "pyro-diff": "(b) differentiable_loss + backward + torch.optim.Adam",
    "handwritten": "(c) hand-written PyTorch loss + backward + torch.optim.Adam",
}
LOSS_NAMES = {
    "simple": "L_simple (Ho Eq. 14), SimpleDiffusionLoss",
    "bound": "subsampled path-wise bound, SubsampledDiffusionELBO",
}


# ----------------------------------------------------------------------------------- the hand-written losses


def _at(buf: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """buf[t − 1], as a column to broadcast against flat images when t holds one step per row."""
    return buf[t - 1].unsqueeze(-1) if isinstance(t, torch.Tensor) else buf[t - 1]


def eps_to_mean(pair: GaussianDiffusion, xt: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """μ_θ(x_t, t) = (x_t − β_t / √(1 − ᾱ_t) ε_θ(x_t, t)) / √(1 − β_t) (Ho Eq. 11)."""
    return (xt - _at(pair.eps_coef, t) * pair.eps_net(xt, t)) * _at(pair.inv_sqrt_alpha, t)


def posterior_mean(pair: GaussianDiffusion, xt: torch.Tensor, x0: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """μ̃_t(x_t, x_0) = √ᾱ_{t-1} β_t / (1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t) x_t (Ho Eq. 7)."""
    return _at(pair.post_c0, t) * x0 + _at(pair.post_ct, t) * xt


def normal_kl(mu_q: torch.Tensor, std_q: torch.Tensor, mu_p: torch.Tensor,
              std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, std_q²) || N(mu_p, std_p²)) per pixel, summed over the last dimension."""
    var_ratio = (std_q / std_p).pow(2)
    t1 = ((mu_q - mu_p) / std_p).pow(2)
    return (0.5 * (var_ratio + t1 - 1 - var_ratio.log())).sum(-1)


def discretized_gaussian_nll(x0: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                             levels: int | None) -> torch.Tensor:
    """−log p(x_0 | x_1) summed over pixels: Ho's discretised Gaussian (Eq. 13), the mass of N(loc, scale²)
    over the grey-level bin of each x_0 ∈ [−1, 1] (the outer bins reaching ±∞, stood in by ±1e4 standard
    deviations), or a Gaussian density when ``levels`` is None."""
    if levels is None:
        z = (x0 - loc) / scale
        return (0.5 * z.pow(2) + scale.log() + 0.5 * math.log(2 * math.pi)).sum(-1)
    half = 1.0 / (levels - 1)
    lo = torch.where(x0 <= -1 + half / 2, -1e4, (x0 - half - loc) / scale)
    hi = torch.where(x0 >= 1 - half / 2, 1e4, (x0 + half - loc) / scale)
    # log(Φ(hi) − Φ(lo)), evaluated on the side of zero where the normal CDF is precise
    upper = lo + hi > 0
    a, b = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
    log_b = log_ndtr(b)
    diff = (log_ndtr(a) - log_b).clamp(max=-1e-12)
    return -(log_b + torch.log(-torch.expm1(diff))).sum(-1)


def handwritten_simple_loss(pair: GaussianDiffusion, x: torch.Tensor) -> torch.Tensor:
    """L_simple (Ho Eq. 14) summed over the batch, in plain PyTorch: t ~ U{1..T} and ε ~ N(0, I) drawn in the
    order :class:`SimpleDiffusionLoss` draws them, so with the same torch seed the value and the gradients
    equal ``SimpleDiffusionLoss().differentiable_loss(pair.model, pair.guide, x)``.

    :param pair: the module whose ``eps_net`` and schedule buffers are used.
    :param x: grey levels in [0, 1], shape (B, D).
    :returns: a 0-dim tensor.
    """
    t = torch.randint(1, pair.num_steps + 1, (x.shape[0],), device=x.device)
    x0 = 2 * x - 1
    noise = torch.randn_like(x0)
    xt = _at(pair.sqrt_ab, t) * x0 + _at(pair.sqrt_1m_ab, t) * noise
    return (noise - pair.eps_net(xt, t)).pow(2).sum()


def handwritten_bound_loss(pair: GaussianDiffusion, x: torch.Tensor) -> torch.Tensor:
    """The subsampled path-wise bound summed over the batch, in plain PyTorch: L_T + (−log p(x_0 | x_1)) +
    (T − 1) · KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) with x_1 ~ q(x_1 | x_0), t ~ U{2..T} per image and
    x_t ~ q(x_t | x_0) drawn in the order :class:`SubsampledDiffusionELBO` draws them, so with the same torch
    seed the value and the gradients equal ``SubsampledDiffusionELBO().differentiable_loss(pair.model,
    pair.guide, x)``.

    :param pair: the module whose ``eps_net`` and schedule buffers are used.
    :param x: grey levels in [0, 1], shape (B, D).
    :returns: a 0-dim tensor.
    """
    T, n = pair.num_steps, x.shape[0]
    x0 = 2 * x - 1
    # L_T = KL(q(x_T | x_0) || N(0, I))
    total = normal_kl(pair.sqrt_ab[T - 1] * x0, pair.sqrt_1m_ab[T - 1].expand_as(x0), torch.zeros_like(x0),
                      torch.ones_like(x0))
    # L_0 = −log p(x_0 | x_1), x_1 ~ q(x_1 | x_0); the decoder's variance is β_1 whatever σ_t² is
    x1 = pair.sqrt_ab[0] * x0 + pair.sqrt_1m_ab[0] * torch.randn_like(x0)
    loc = eps_to_mean(pair, x1, 1)
    total = total + discretized_gaussian_nll(x0, loc, pair.sigma[0].expand_as(loc), pair.levels)
    if T < 2:
        return total.sum()
    # (T − 1) · L_{t-1} at one t ~ U{2..T} per image
    t = torch.randint(2, T + 1, (n,), device=x.device)
    xt = _at(pair.sqrt_ab, t) * x0 + _at(pair.sqrt_1m_ab, t) * torch.randn_like(x0)
    mu_q = posterior_mean(pair, xt, x0, t)
    kl = normal_kl(mu_q, _at(pair.post_std, t).expand_as(mu_q), eps_to_mean(pair, xt, t),
                   _at(pair.sigma, t).expand_as(mu_q))
    return (total + (T - 1) * kl).sum()


HANDWRITTEN: dict[str, Callable[[GaussianDiffusion, torch.Tensor], torch.Tensor]] = {
    "simple": handwritten_simple_loss,
    "bound": handwritten_bound_loss,
}


def pyro_loss(loss: str) -> SubsampledDiffusionELBO:
    """The project's Pyro objective for ``loss`` ("simple" or "bound")."""
    return SimpleDiffusionLoss() if loss == "simple" else SubsampledDiffusionELBO()


# ----------------------------------------------------------------------------------------------- timing


def make_actions(pair: GaussianDiffusion, x: torch.Tensor, losses: tuple[str, ...], lr: float,
                 betas: tuple[float, float]) -> dict[str, Callable[[], Any]]:
    """One callable per (loss, variant), named ``<loss>/<variant>``; each does one training step on x."""
    pyro.clear_param_store()
    actions: dict[str, Callable[[], Any]] = {}

    def torch_step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> torch.Tensor:
        value = loss_fn()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    for name in losses:
        objective = pyro_loss(name)
        svi = pyro.infer.SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": lr, "betas": betas}),
                             pyro_loss(name))
        # One torch optimiser per variant, so that no variant inherits another's moment estimates.
        opt_diff = torch.optim.Adam(pair.parameters(), lr=lr, betas=betas)
        opt_hand = torch.optim.Adam(pair.parameters(), lr=lr, betas=betas)
        hand = HANDWRITTEN[name]

        def diff_loss(objective: SubsampledDiffusionELBO = objective) -> torch.Tensor:
            return objective.differentiable_loss(pair.model, pair.guide, x)

        def hand_loss(hand: Callable[..., torch.Tensor] = hand) -> torch.Tensor:
            return hand(pair, x)

        actions[f"{name}/svi"] = lambda svi=svi: svi.step(x)
        actions[f"{name}/pyro-diff"] = lambda f=diff_loss, o=opt_diff: torch_step(f, o)
        actions[f"{name}/handwritten"] = lambda f=hand_loss, o=opt_hand: torch_step(f, o)
    return actions


def loss_check(pair: GaussianDiffusion, x: torch.Tensor, loss: str, seed: int) -> dict[str, float]:
    """Both losses from the same torch seed (same t, same noise), without gradients."""
    with torch.no_grad():
        torch.manual_seed(seed)
        p = float(pyro_loss(loss).differentiable_loss(pair.model, pair.guide, x))
        torch.manual_seed(seed)
        h = float(HANDWRITTEN[loss](pair, x))
    return {"pyro": p, "handwritten": h, "abs_diff": abs(p - h), "rel_diff": abs(p - h) / max(abs(p), 1e-30)}


# ------------------------------------------------------------------------------------------------- setup


def make_batch(data_source: str, batch_size: int, device: torch.device, seed: int,
               data_dir: str | None) -> tuple[torch.Tensor, str]:
    """The benchmark's one batch of grey levels in [0, 1] and a sentence saying what it is. ``data_source``:
    "real" (the first Fashion-MNIST training images; a DataError when the files are missing), "random"
    (uniform grey levels k/255) or "auto" (real when the files load, else random)."""
    if data_source in ("real", "auto"):
        try:
            data = load_dataset(DATASET, data_dir)
        except DataError as e:
            if data_source == "real":
                raise
            why = f" (Fashion-MNIST not available: {e})"
        else:
            x = data.train[:batch_size]
            return x.to(device), (f"real: {data.name}, the first {x.shape[0]} training images (grey levels "
                                  f"/ {LEVELS - 1})")
    else:
        why = ""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, LEVELS, (batch_size, SHAPE[0] * SHAPE[1]), generator=g).float() / (LEVELS - 1)
    return x.to(device), (f"random: {batch_size} images of {SHAPE[0]}x{SHAPE[1]} uniform grey levels k/"
                          f"{LEVELS - 1} (seed {seed}){why}")


def build_pair(config: dict[str, Any]) -> GaussianDiffusion:
    """The Gaussian diffusion pair sized by the preset's ``gaussian`` section, for Fashion-MNIST's 28x28
    images on 256 grey levels (whatever the preset's data set)."""
    pair = build_registered("diffusion-gaussian", model_sizes("gaussian", {**config, "dataset": DATASET}),
                            SHAPE[0] * SHAPE[1])
    assert isinstance(pair, GaussianDiffusion)
    return pair


def run(config: dict[str, Any], losses: tuple[str, ...], batch_size: int, data_source: str, device: str,
        repeats: int, warmup: int, seed: int, data_dir: str | None, out: Path,
        command: str | None = None) -> dict[str, Any]:
    """Build the module and batch, check the losses agree, time every variant of every loss interleaved,
    write benchmark.json and benchmark.md."""
    dev = torch.device(device)
    load_before = _load_average()
    x, about = make_batch(data_source, batch_size, dev, seed, data_dir)
    pyro.set_rng_seed(seed)
    pair = build_pair(config).to(dev)
    params = list(pair.parameters())
    train = config["train_gaussian"]
    lr, betas = float(train["lr"]), tuple(float(b) for b in train["betas"])

    # Sanity check before timing: each pair of losses agrees on the same draws (float32: to rounding only).
    checks = {name: loss_check(pair, x, name, seed) for name in losses}

    actions = make_actions(pair, x, losses, lr, betas)
    t0 = time.time()
    times = time_interleaved(actions, params, dev, repeats, warmup)
    wall = time.time() - t0

    per_loss = {}
    for name in losses:
        stats = {v: {**summarise(times[f"{name}/{v}"]), "description": VARIANTS[v]} for v in VARIANTS}
        med = {v: s["median_ms"] for v, s in stats.items()}
        hand = times[f"{name}/handwritten"]
        per_loss[name] = {
            "description": LOSS_NAMES[name],
            "variants": stats,
            "ratios": {"svi_over_handwritten": med["svi"] / med["handwritten"],
                       "differentiable_over_handwritten": med["pyro-diff"] / med["handwritten"]},
            "paired_ratios": {
                "svi_over_handwritten": paired_ratio(times[f"{name}/svi"], hand),
                "differentiable_over_handwritten": paired_ratio(times[f"{name}/pyro-diff"], hand),
            },
            "loss_check": checks[name],
        }
    g = config["gaussian"]
    result = {
        "protocol": PROTOCOL,
        "protocol_details": (
            f"{warmup} warm-up rounds, then {repeats} rounds; in each round every variant of every loss runs "
            "once, in an order rotated by one per round; gradients set to None before each call (not timed); "
            "the device is synchronised before each clock reading; times are wall-clock (time.perf_counter) "
            "in ms"
        ),
        "speed_note": SPEED_NOTE,
        "model": {"x_dim": int(x.shape[1]), "image_shape": list(SHAPE), "levels": pair.levels,
                  "num_steps": pair.num_steps, "channels": g["channels"], "mult": list(g["mult"]),
                  "groups": g["groups"], "embed_dim": g["embed_dim"], "variance": pair.variance,
                  "parameters": sum(p.numel() for p in params), "dtype": str(x.dtype)},
        "batch": {"batch_size": int(x.shape[0]), "data": about, "source": about.split(":")[0]},
        "preset": config["preset"], "seed": seed, "lr": lr, "betas": list(betas), "warmup": warmup,
        "repeats": repeats,
        "environment": environment(dev),
        "load_average": {"before": load_before, "after": _load_average()},
        "wall_seconds": wall,
        "losses": per_loss,
        "times_ms": times,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, "benchmark", result, render_markdown(result), command=command)
    return result


def render_markdown(r: dict[str, Any]) -> str:
    rows, ratio_rows = [], []
    for name, res in r["losses"].items():
        base = res["variants"]["handwritten"]["median_ms"]
        for s in res["variants"].values():
            rows.append([name, s["description"], f"{s['median_ms']:.2f}", f"{s['iqr_ms']:.2f}",
                         f"{s['q1_ms']:.2f}–{s['q3_ms']:.2f}", f"{s['median_ms'] / base:.2f}"])
        rt, pr = res["ratios"], res["paired_ratios"]
        a, b = pr["svi_over_handwritten"], pr["differentiable_over_handwritten"]
        c = res["loss_check"]
        ratio_rows.append([name, f"{rt['svi_over_handwritten']:.2f}", f"{a['median']:.2f} ({a['q1']:.2f}–"
                           f"{a['q3']:.2f})", f"{rt['differentiable_over_handwritten']:.2f}",
                           f"{b['median']:.2f} ({b['q1']:.2f}–{b['q3']:.2f})",
                           f"{c['pyro']:.4f} / {c['handwritten']:.4f}"])
    m, b = r["model"], r["batch"]
    losses = "; ".join(f"{k}: {v['description']}" for k, v in r["losses"].items())
    return "\n".join([
        f"# Gaussian diffusion training step: Pyro vs hand-written PyTorch (preset {r['preset']})",
        "",
        SPEED_NOTE,
        "",
        f"Protocol: {r['protocol']}. {r['protocol_details']}.",
        "",
        f"Model: DDPM, {m['image_shape'][0]}x{m['image_shape'][1]} images on {m['levels']} grey levels, "
        f"T = {m['num_steps']}, U-Net {m['channels']} channels × {m['mult']}, {m['groups']} groups, step "
        f"embedding {m['embed_dim']}, σ_t² = {m['variance']}, {m['parameters']} parameters, {m['dtype']}. "
        f"Batch: {b['batch_size']} images; data: {b['data']}. Losses: {losses}. Optimisers: Adam, lr "
        f"{r['lr']}, betas {tuple(r['betas'])}.",
        "",
        markdown_table(["loss", "variant", "median ms", "IQR ms", "q1–q3 ms", "ratio to hand-written (c)"],
                       rows),
        "",
        markdown_table(["loss", "svi / hand-written (medians)", "svi / hand-written (paired, q1–q3)",
                        "pyro-diff / hand-written (medians)", "pyro-diff / hand-written (paired, q1–q3)",
                        "loss check: Pyro / hand-written (same draws)"], ratio_rows),
        "",
        "Paired ratios are the median (and quartiles) of the per-round ratios, both terms timed in the same "
        "round.",
        "",
        environment_sentence(r),
        "",
    ])


# --------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    presets = raw_presets(EXPERIMENT)
    parser = Parser(
        prog="python -m experiments.benchmark_diffusion",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--preset", default="cpu", choices=sorted(presets),
                        help="(default cpu) model sizes from section 'gaussian' of experiments/presets/"
                        "diffusion.json (num_steps, channels, mult, groups, embed_dim, variance) and the "
                        "optimiser and batch size from 'train_gaussian'; the images are always 28x28 on 256 "
                        "levels: " + "; ".join(f"{k}: {v.get('about', '')}" for k, v in presets.items()))
    parser.add_argument("--loss", default="both", choices=("simple", "bound", "both"),
                        help="which training loss to time: 'simple' (Ho's L_simple, Eq. 14), 'bound' (the "
                        "subsampled path-wise bound: prior KL + decoder NLL + (T-1) x one step's KL), or "
                        "'both' (default), interleaved in one loop")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, default=None,
                        help="images in the batch, >= 1 (default: the preset's train_gaussian.batch_size)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda, cuda:N or auto (CUDA when present); absolute times only "
                        "count from a GPU")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="seed of the random data, the weights and the loss check's draws, >= 0 "
                        "(default: the preset's)")
    parser.add_argument("--data", default="auto", choices=("auto", "real", "random"),
                        help="'real': the first Fashion-MNIST training images; 'random': uniform grey levels "
                        "k/255 on 28x28 (no data files needed); 'auto' (default): real when the files load, "
                        "else random (the output says which)")
    add_timing_args(parser)
    parser.add_argument("--out", default=None,
                        help=f"output directory for benchmark.json and benchmark.md (default "
                        f"{DEFAULT_OUT}-<preset>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = {**load_preset(EXPERIMENT, args.preset), "preset": args.preset}
    device = device_and_threads(parser, args)
    if args.no_validation:
        pyro.enable_validation(False)
    losses = LOSSES if args.loss == "both" else (args.loss,)
    out = Path(args.out or f"{DEFAULT_OUT}-{args.preset}")
    refuse_existing(parser, out, args.force)
    try:
        run(config, losses, args.batch_size or config["train_gaussian"]["batch_size"], args.data, device,
            args.repeats, args.warmup, config["seed"] if args.seed is None else args.seed, args.data_dir, out,
            reproduce_command("experiments.benchmark_diffusion", sys.argv[1:] if argv is None else argv, out,
                              device))
    except DataError as e:
        parser.error(f"{e} (use --data random to benchmark without data files)")
    print((out / "benchmark.md").read_text())
    print(f"results: {out / 'benchmark.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
