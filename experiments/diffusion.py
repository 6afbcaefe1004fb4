"""The diffusion experiment: Bernoulli (bit-flip) diffusion on binarised images and Gaussian diffusion (DDPM)
on grey levels, each a fixed noising guide against a learned denoising model, trained, scored with the
path-wise bound and judged by its samples.

    python -m experiments.diffusion --preset quick        # scikit-learn digits, a few minutes on a CPU
    python -m experiments.diffusion --preset cpu          # Fashion-MNIST, small U-Net, about 2 h on 2 cores
    python -m experiments.diffusion --preset paper --device cuda
    python -m experiments.diffusion --preset cpu --set 'forms=[gaussian]'   # one form only

Papers: Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.3, 7.2 and Eq. 9
(diffusion as guided policy search, time reversed here: x_0 is the data); Sohl-Dickstein et al. (2015),
"Deep unsupervised learning using nonequilibrium thermodynamics" (binomial diffusion); Ho et al. (2020),
"Denoising diffusion probabilistic models" (the Gaussian form, L_simple, the discretised decoder); the
diffusion baseline of Vargas Vieyra & Ménard, "Generative models as goal-conditioned reinforcement learning",
Sec. 4.1.

Protocol (stated in every output). Bernoulli form: trained on dynamically binarised images with the
subsampled bound (:class:`inference.SubsampledDiffusionELBO`, one time step per image), scored on the test
split binarised once with the fixed seed — the protocol of ``experiments.vae`` and ``experiments.draw``, so
its nats sit beside theirs. Gaussian form: grey levels as 8-bit values (Fashion-MNIST: 256 levels; digits:
17), trained with Ho's L_simple or the bound (``train_gaussian.loss``), scored with the discrete likelihood of
the discretised decoder (nats per image and bits/dim; not comparable with binarised bounds). The test bound
visits every time step once per image (``SubsampledDiffusionELBO(time_steps="all")``: the exact full-path
bound in expectation) on the stated number of test images; ± is the standard error over images. Every stage
trains a fixed number of updates and its last weights are evaluated (the validation curve is the one-step
subsampled bound on the first ``valid_limit`` validation images, for watching, not selection).

Outputs in ``--out``: results.json / results.md (the table), per form a directory with config.json,
metrics.jsonl, checkpoint.pt (for --resume), final.pt (the evaluated weights) and result.json (loadable by
``experiments.sample`` / ``experiments.runs.load_run``), and the figures samples_<form>.png,
trajectory_<form>.png (x_t every T/10 steps), inpaint_<form>.png and mode_coverage.png.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm import tqdm

from experiments.common import batched, build_registered, train_best, write_form_run
from experiments.data import Dataset, binarization_protocol, dynamic_binarize, fixed_binarize, load_dataset
from experiments.report import (
    markdown_table,
    save_curves,
    save_image_grid,
    save_inpainting_grid,
    write_report,
)
from experiments.runner import Experiment, RunContext
from inference.diffusion_elbo import SubsampledDiffusionELBO
from inference.diffusion_simple import SimpleDiffusionLoss
from inference.fd_classifier import (
    CLASSIFIERS,
    classifier_features,
    fd_against_features,
    load_fd_classifier,
    mode_coverage,
    save_mode_coverage_figure,
)
from inference.sample_quality import parzen_score
from inference.scoring import nll_summary
from ppl_models.diffusion import DiffusionPair
from ppl_models.masks import make_mask_process

EXPERIMENT = "diffusion"
DEFAULT_OUT = "runs/diffusion"
FORMS = ("bernoulli", "gaussian")
FINAL_WEIGHTS = "final.pt"
#: grey levels of each data set's images (experiments.data: Fashion-MNIST pixel / 255, digits pixel / 16)
GREY_LEVELS = {"fashion-mnist": 256, "digits": 17}
#: the GC-RL paper's number, quoted with its data set and feature network (not comparable in value)
PAPER_FID = ("Fashion-MNIST, Fréchet distance in Inception features, the diffusion baseline: 9.63 "
             "(Vargas Vieyra & Ménard, Table 1)")


def prepare(config: dict[str, Any], args: Any, parser: Any) -> None:
    bad = [f for f in config["forms"] if f not in FORMS]
    if bad or not config["forms"] or len(set(config["forms"])) != len(config["forms"]):
        parser.error(f"forms must be a non-empty list of distinct forms from {list(FORMS)}, got "
                     f"{config['forms']}")
    if config["train_bernoulli"]["loss"] != "bound":
        parser.error("train_bernoulli.loss must be 'bound': L_simple is the Gaussian form's ε-loss")
    if config["dataset"] not in GREY_LEVELS:
        parser.error(f"dataset {config['dataset']!r}: the diffusion experiment knows the grey levels of "
                     f"{sorted(GREY_LEVELS)}")


def model_sizes(form: str, config: dict[str, Any]) -> dict[str, Any]:
    """The registered model's constructor arguments for ``form`` (what result.json records)."""
    sizes = {k: v for k, v in config[form].items() if k != "sample_steps"}
    if form == "gaussian":
        sizes["levels"] = GREY_LEVELS[config["dataset"]]
    return sizes


def training_data(form: str, data: Dataset) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """(training images, per-batch transform, validation images) of a form: binarised for Bernoulli (dynamic
    for training, fixed for validation), the grey levels for Gaussian."""
    if form == "bernoulli":
        return data.train, dynamic_binarize, fixed_binarize(data.valid)
    return data.train, None, data.valid


def train_form(pair: DiffusionPair, form: str, config: dict[str, Any], data: Dataset, out: Path,
               ctx: RunContext) -> dict[str, Any]:
    t = config[f"train_{form}"]
    out.mkdir(parents=True, exist_ok=True)
    train, transform, valid = training_data(form, data)
    bound = SubsampledDiffusionELBO()
    loss = SimpleDiffusionLoss() if t["loss"] == "simple" else bound
    resume = ctx.resume and (out / "checkpoint.pt").is_file()
    stage = {"train": t, "eval": config["eval"], "seed": config["seed"]}
    return train_best(pair, loss, lambda x: bound.per_datum(pair.model, pair.guide, x).sum(), stage, train,
                      transform, (valid[: t["valid_limit"]],), out, ctx.device, resume, ctx.progress,
                      use_best=False)


@torch.no_grad()
def test_bound(pair: DiffusionPair, test: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    """−ELBO per test image with every time step visited once (one x_t draw each)."""
    every = SubsampledDiffusionELBO("all")
    with tqdm(total=test.shape[0], desc="test bound", disable=not progress) as bar:
        def one(x: torch.Tensor) -> torch.Tensor:
            bar.update(x.shape[0])
            return every.per_datum(pair.model, pair.guide, x).double().cpu()

        return torch.cat(batched(one, test, batch_size=batch_size))


@torch.no_grad()
def draw_samples(pair: DiffusionPair, n: int, steps: int | None, batch: int, progress: bool) -> torch.Tensor:
    return torch.cat([pair.sample(min(batch, n - i), steps)
                      for i in tqdm(range(0, n, batch), desc="samples", disable=not progress)])


def evaluate_form(pair: DiffusionPair, form: str, config: dict[str, Any], data: Dataset,
                  classifier: Any, reference: dict[str, torch.Tensor], out: Path,
                  progress: bool) -> dict[str, Any]:
    ev = config["eval"]
    test = data.test[: config["eval_limit"]] if config["eval_limit"] else data.test
    n_bound = ev[f"{form}_images"] or test.shape[0]
    scored = (fixed_binarize(test) if form == "bernoulli" else test)[:n_bound]
    t0 = time.time()
    nll = test_bound(pair, scored, ev["batch_size"], progress)
    summary = nll_summary(nll)
    D = scored.shape[1]
    bound_seconds = time.time() - t0
    t0 = time.time()
    steps = config[form]["sample_steps"]
    samples = draw_samples(pair, ev["fd_samples"], steps, ev["batch_size"], progress)
    sample_seconds = time.time() - t0
    result = {
        "bound": {**summary, "bits_per_dim": summary["nll"] / (D * math.log(2)),
                  "bits_per_dim_stderr": summary["stderr"] / (D * math.log(2)),
                  "num_images": int(nll.numel()),
                  "time_step_draws_per_image": pair.num_steps, "seconds": bound_seconds},
        "samples": {"num": int(samples.shape[0]), "sampler_steps": len(pair.strides(steps)),
                    "sampler": sampler_name(form, config), "seconds": sample_seconds},
        "fd_classifier": fd_against_features(classifier, samples, reference),
        "mode_coverage": mode_coverage(classifier, samples),
        "parzen": parzen_score(samples, data.valid[: ev["parzen_valid"]], test, ev["parzen_grid"]),
    }
    figures(pair, form, samples, config, data, out)
    return result


def sampler_name(form: str, config: dict[str, Any]) -> str:
    """What :meth:`DiffusionPair.sample` does with the preset's ``sample_steps`` (and η)."""
    steps, T = config[form]["sample_steps"], config[form]["num_steps"]
    every = steps is None or steps >= T
    if form == "bernoulli":
        return "ancestral, all T steps" if every else "strided jumps through q(x_s | x_t, x̂_0)"
    eta = config["gaussian"]["eta"]
    if every and eta == 1.0:
        return "ancestral, all T steps of p(x_{t-1} | x_t)"
    return f"DDIM (η = {eta}), {'all T' if every else 'strided'} steps, x̂_0 clipped to [−1, 1]"


def figures(pair: DiffusionPair, form: str, samples: torch.Tensor, config: dict[str, Any], data: Dataset,
            out: Path) -> None:
    ev, shape = config["eval"], data.image_shape
    steps = config[form]["sample_steps"]
    save_image_grid(samples[: ev["grid_samples"]], shape, out / f"samples_{form}.png",
                    title=f"{form} diffusion: samples without data "
                          f"({len(pair.strides(steps))} sampler steps)")
    frames = ev["trajectory_frames"]
    traj = pair.trajectory(ev["trajectory_chains"], None, frames)  # all T steps: x_t every T/frames
    save_image_grid(traj.transpose(0, 1).reshape(-1, traj.shape[-1]), shape, out / f"trajectory_{form}.png",
                    ncol=traj.shape[0],
                    title=f"{form}: denoising with all T = {pair.num_steps} steps, x_t every "
                          f"{pair.num_steps // frames} steps from x_T (left), then the final image")
    x = data.test[: ev["inpaint_images"]]
    if form == "bernoulli":
        x = fixed_binarize(x)
    mask = make_mask_process(ev["inpaint_mask"], shape)(x, torch.Generator(x.device).manual_seed(0))
    filled = pair.inpaint(x, mask, steps)
    save_inpainting_grid(x, mask, filled, shape, out / f"inpaint_{form}.png",
                         title=f"{form}: inpainting under {ev['inpaint_mask']}; per image: original | known "
                               "pixels (grey: missing) | imputed")


def save_form_curves(form: str, config: dict[str, Any], metrics: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation bound per epoch (L_simple, not a bound, on an axis of its own)."""
    simple = config[f"train_{form}"]["loss"] == "simple"
    train_key = "train L_simple (right)" if simple else "train −ELBO (one step)"
    valid_key = "valid −ELBO (one step)"
    rows = [{"epoch": r["epoch"], train_key: r["train_loss"], valid_key: -r["valid_bound"]} for r in metrics]
    save_curves(rows, [valid_key] + ([] if simple else [train_key]), path, ylabel="nats per image (bound)",
                title=f"{form} diffusion on {config['dataset']}: training loss and validation bound, each "
                      "estimated with one time step per image",
                secondary=[train_key] if simple else (), secondary_label="L_simple per image")


def protocol(config: dict[str, Any], data: Dataset) -> dict[str, Any]:
    ev, info = config["eval"], CLASSIFIERS[config["dataset"]]
    n_train, n_test = (min(ev["fd_reference"], s.shape[0]) for s in (data.train, data.test))
    levels = GREY_LEVELS[config["dataset"]]

    def schedule(t: dict[str, Any]) -> str:
        lr = (f"lr {t['lr']}" if t["lr"] == t["lr_final"] else
              f"lr {t['lr']} decayed per update to {t['lr_final']}")
        clip = "no clipping" if t["clip_norm"] is None else f"global gradient-norm clip {t['clip_norm']}"
        loss = ("Ho's L_simple (not a bound)" if t["loss"] == "simple" else
                "the subsampled path-wise bound (one time step per image)")
        return f"{loss}, {t['epochs']} epochs of batch {t['batch_size']}, Adam {lr}, {clip}; last weights"

    return {
        "data": data.describe(),
        "binarization": {f: text for f, text in (
            ("bernoulli", binarization_protocol()["description"]),
            ("gaussian", f"none: {levels} grey levels observed as 2x − 1 in [−1, 1] through Ho's discretised "
                         "Gaussian decoder (a discrete likelihood, no dequantisation)"))
            if f in config["forms"]},
        "training": {f: schedule(config[f"train_{f}"]) for f in config["forms"]},
        "bound": "−ELBO per test image with every time step t = 2..T visited once (one draw of "
                 "x_t ~ q(x_t|x_0) each) plus L_T and L_0: the full-path bound in expectation, an upper "
                 "bound on −log p(x); bits/dim = nats / (pixels · ln 2)",
        "fd_classifier": f"{info.name} (test accuracy {info.test_accuracy:.1%}): Fréchet distance in the "
                         f"classifier's 128-d penultimate features between {ev['fd_samples']} samples and "
                         f"the first {n_train} training and {n_test} test images (grey levels); biased "
                         "upwards for fewer samples, so compare at equal counts",
        "parzen": f"Gaussian Parzen window on the same samples, σ from {ev['parzen_grid']} by the mean "
                  f"log-likelihood of the first {min(ev['parzen_valid'], data.valid.shape[0])} validation "
                  "images, then the mean over the test images (grey levels): an estimate, biased in high "
                  "dimension (Breuleux et al. 2011)",
        "mode_coverage": "entropy (nats) of the classifier's predicted classes over the samples",
    }


def run(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    data = load_dataset(config["dataset"], ctx.data_dir).to(ctx.device)
    ev = config["eval"]
    classifier = load_fd_classifier(config["dataset"], device=ctx.device)
    reference = {s: classifier_features(classifier, getattr(data, s)[: ev["fd_reference"]])
                 for s in ("train", "test")}
    forms: dict[str, Any] = {}
    for form in config["forms"]:
        pyro.set_rng_seed(config["seed"])
        sizes = model_sizes(form, config)
        pair = build_registered(f"diffusion-{form}", sizes, data.train.shape[1]).to(ctx.device)
        t0 = time.time()
        fit = train_form(pair, form, config, data, ctx.out / form, ctx)
        train_seconds = time.time() - t0
        pyro.set_rng_seed(config["seed"] + 1)
        result = evaluate_form(pair, form, config, data, classifier, reference, ctx.out, ctx.progress)
        result["train"] = {"epochs": fit["epochs"], "updates": fit["updates"],
                           "loss": config[f"train_{form}"]["loss"],
                           "final_valid_subsampled_bound": fit["valid_nll"],
                           "seconds_this_process": train_seconds}
        forms[form] = result
        write_form_run(ctx.out / form, EXPERIMENT, form, config, sizes, pair, result, FINAL_WEIGHTS)
        if fit["metrics"]:
            save_form_curves(form, config, fit["metrics"], ctx.out / f"curves_{form}.png")
    save_mode_coverage_figure({f: r["mode_coverage"]["histogram"] for f, r in forms.items()},
                              ctx.out / "mode_coverage.png",
                              class_names=CLASSIFIERS[config["dataset"]].class_names,
                              title=f"predicted classes of the evaluated samples ({data.name})")
    out = {"experiment": EXPERIMENT, "config": config, "protocol": protocol(config, data), "forms": forms,
           "device": ctx.device, "torch": torch.__version__}
    write_report(ctx.out, "results", out, render_markdown(out), config=config, command=ctx.command)
    return out


def render_markdown(r: dict[str, Any]) -> str:
    c, p, f = r["config"], r["protocol"], r["forms"]
    d = p["data"]
    rows = []
    for form, x in f.items():
        b, s = x["bound"], x["samples"]
        sizes = (f"T = {c[form]['num_steps']}, MLP {c[form]['hidden']}" if form == "bernoulli" else
                 f"T = {c[form]['num_steps']}, U-Net {c[form]['channels']}×{c[form]['mult']}, σ² = "
                 f"{c[form]['variance']}")
        rows.append([form, sizes, "L_simple" if x["train"]["loss"] == "simple" else "bound",
                     x["train"]["updates"],
                     f"{b['nll']:.2f} ± {b['stderr']:.2f}",
                     f"{b['bits_per_dim']:.4f} ± {b['bits_per_dim_stderr']:.4f}",
                     f"{b['num_images']} × {b['time_step_draws_per_image']}",
                     f"{x['fd_classifier']['train']:.2f}", f"{x['fd_classifier']['test']:.2f}",
                     f"{x['parzen']['mean']:.1f} ± {x['parzen']['stderr']:.1f}",
                     f"{x['mode_coverage']['entropy']:.3f}",
                     f"{s['num']}, {s['sampler']}, {s['sampler_steps']} steps"])
    lines = [
        f"# Diffusion as a model/guide pair on {d['name']} — preset `{c['preset']}`",
        "",
        f"Data: {d['name']} ({d['source']}), split {d['splits']}; scored on the **test** split.",
        "",
        "Binarisation: " + "; ".join(f"{form} form — {text}" for form, text in p["binarization"].items())
        + ". The Bernoulli form's nats are on binarised images, the Gaussian form's on 8-bit grey levels: "
        "never compare the two with each other.",
        "",
        markdown_table(["form", "model", "trained with", "updates", "test −ELBO ↓ (nats per image, bound)",
                        "bits/dim ↓ (bound)", "images × time steps", "FD-classifier vs train ↓",
                        "FD-classifier vs test ↓", "Parzen test LL ↑ (nats, estimate)", "class entropy ↑",
                        "samples, sampler"], rows),
        "",
        f"Bound: {p['bound']}; ± is the standard error over test images. FD: {p['fd_classifier']}. "
        f"Parzen: {p['parzen']}. Class entropy: {p['mode_coverage']} (log 10 = {math.log(10):.3f}).",
        "",
        "Training: " + "; ".join(f"{form}: {p['training'][form]}" for form in f) + ".",
        "",
        f"For reference only (another feature network, not comparable in value, only in rank): {PAPER_FID}.",
        "",
    ]
    return "\n".join(lines)


DIFFUSION_EXPERIMENT = Experiment(name=EXPERIMENT, prog="python -m experiments.diffusion",
                                  description=__doc__, default_out=DEFAULT_OUT, run=run, prepare=prepare,
                                  summary=(("results.md", "results.json"),))


def main(argv: list[str] | None = None) -> int:
    return DIFFUSION_EXPERIMENT.main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
