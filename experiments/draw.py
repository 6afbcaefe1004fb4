"""The sequential-generation experiment: train the DRAW-style generators, score them on test data with and
without guide fine-tuning, and set them beside the foundation VAE under the same protocol.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.4-2.5 (the open-loop and
the extended generator), Sec. 9.1 (sizes, fine-tuning), Fig. 1 (σ(c_t) over the steps). Models:
:class:`ppl_models.draw.DRAWGenerator` and :class:`ppl_models.vae.VAE`.

    python -m experiments.draw --preset quick
    python -m experiments.draw --preset cpu --out results/draw-cpu
    python -m experiments.draw --preset paper --device cuda --variants extended-add

Variants: ``open-loop`` (Sec. 2.4, c_t = c_{t-1} + ω(v_t)), ``extended-add`` (Sec. 2.5, same canvas),
``extended-jump`` (Sec. 2.5, c_t = L(h_t)), and ``vae`` (the VAE of ``experiments.vae``: its best.pt, else
trained with that experiment's preset; it is not retrained here).

Protocol (stated in every output). Training images are binarised dynamically (a fresh Bernoulli draw per
minibatch); validation and test images once, with seed 0. The weights of the epoch with the best validation
bound are evaluated. For each variant, on the test split:

- the bound: −ELBO per image, the mean over ``bound_draws`` single-sample path-wise KL bounds per image, on
  every scored test image (an upper bound on −log p(x) in expectation);
- the estimate: IWAE-K, −log of the mean of K importance weights from the guide, per image, on the first
  ``iw_limit`` test images, with PSIS k-hat and ESS (an estimate of −log p(x), in expectation still an upper
  bound; k-hat > 0.7 says it is unreliable; images whose PSIS tail is degenerate, fewer than 5 distinct
  weights, are counted apart with their mean ESS, k-hat saying nothing there);
- both again after guide fine-tuning (Sec. 2.5): the guide alone is re-fitted to the scored test images with
  the model frozen (:func:`inference.finetune.finetune_guide`); the model scored is the same.

Paired differences to the VAE are taken image by image on the same test images, which is why their standard
errors are far smaller than those of the separate means.

Outputs in ``--out``: per variant ``<variant>/result.json``, ``result.md``, ``metrics.jsonl``,
``checkpoint.pt``, ``best.pt``, ``finetune/`` (the fine-tuning run) and ``steps.png`` (σ(c_t) of p's samples
over the steps, Fig. 1 style); for the whole run ``table.md`` and ``table.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch

from experiments.common import (
    build_registered,
    load_vae,
    non_negative_int,
    positive_int,
    section_sizes,
    setting_differences,
    train_best,
)
from experiments.data import Dataset, binarization_protocol, dynamic_binarize, fixed_binarize, load_dataset
from experiments.report import (
    KHAT_KEYS,
    degenerate_cell,
    fmt_or_na,
    markdown_table,
    save_image_grid,
    write_json,
    write_report,
)
from experiments.runner import Experiment, RunContext
from inference.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint
from inference.finetune import finetune_guide
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.scoring import nll_summary, score_bound_and_iwae
from ppl_models.draw import DRAWGenerator

EXPERIMENT = "draw"
#: The settings of the fine-tuning stage, which a resumed run may change (the raw scores are kept).
FINETUNE = ("finetune.",)
DEFAULT_OUT = "runs/draw"
GENERATORS = {
    "open-loop": ("open-loop", "add"),
    "extended-add": ("extended", "add"),
    "extended-jump": ("extended", "jump"),
}
VARIANTS = (*GENERATORS, "vae")
DESCRIPTIONS = {
    "open-loop": "open-loop generator (Sec. 2.4): p(z_t) = N(0, I), c_t = c_(t-1) + ω(v_t)",
    "extended-add": "extended generator (Sec. 2.5): z_0 mixture, p(z_t | s_(t-1)), c_t = c_(t-1) + ω(v_t)",
    "extended-jump": "extended generator (Sec. 2.5): z_0 mixture, p(z_t | s_(t-1)), c_t = L(h_t)",
    "vae": "the foundation VAE (experiments.vae), one Gaussian latent layer",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants to run, from " + ", ".join(VARIANTS)
                        + " (default: the preset's list); variants of one table may run as parallel "
                        "processes into one --out with --resume, and a last --resume run assembles the table")
    parser.add_argument("--redo-finetune", action="store_true",
                        help="with --resume: fine-tune the guides of finished variants again (from their "
                        "best.pt, keeping their raw scores), e.g. after a change of the fine-tuning "
                        "settings or code")
    parser.add_argument("--num-steps", dest="num_steps", type=positive_int, default=None,
                        help="steps T of the generators, >= 1 (generator.num_steps; default: the preset's)")
    parser.add_argument("--iw-samples", dest="iw_samples", type=positive_int, default=None,
                        help="K, importance samples per test image for the IWAE estimate, >= 1 "
                        "(eval.iw_samples; default: the preset's)")
    parser.add_argument("--finetune-epochs", dest="finetune_epochs", type=non_negative_int, default=None,
                        help="passes of guide fine-tuning over the scored test images (0 = none), >= 0 "
                        "(finetune.epochs; default: the preset's)")


def build_generator(variant: str, config: dict[str, Any], x_dim: int,
                    init_mean: torch.Tensor) -> DRAWGenerator:
    return build_registered(f"draw-{variant}", section_sizes(config, "generator"), x_dim, init_mean=init_mean)


# ----------------------------------------------------------------------------------------- evaluation


def score(module, x: torch.Tensor, ev: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The bound on every row of ``x`` and the IWAE-K estimate on the first ``iw_limit`` rows."""
    s = score_bound_and_iwae(module.model, module.guide, x, bound_draws=ev["bound_draws"],
                             iw_samples=ev["iw_samples"], iw_limit=ev["iw_limit"],
                             batch_size=ev["batch_size"], iw_batch=ev["iw_batch"], iw_chunk=ev["iw_chunk"],
                             progress=progress)
    bound, iw, health = nll_summary(s.bound), nll_summary(s.iwae), s.estimate.summary()
    K, n_iw = ev["iw_samples"], s.num_iw
    return {
        "bound": {"nll": bound["nll"], "stderr": bound["stderr"], "num_images": bound["num"],
                  "kind": "bound (upper bound on -log p(x) in expectation)",
                  "behind": f"mean of {s.bound_draws} single-sample path-wise KL bounds per image",
                  "first_iw_images": float(s.bound[:n_iw].mean())},
        "iwae": {"nll": iw["nll"], "stderr": iw["stderr"], "num_images": iw["num"], "K": K,
                 "kind": f"estimate (IWAE-{K} of -log p(x))",
                 "behind": f"K={K} guide samples per image, first {n_iw} test images",
                 **{k: health[k] for k in KHAT_KEYS}, "ess_mean": health["ess_mean"],
                 "per_image": s.iwae.tolist()},
    }


def steps_figure(gen: DRAWGenerator, image_shape, path: Path, title: str, num: int = 8) -> None:
    """Fig. 1 style: each row one sample of p, each column σ(c_t) for t = 0..T."""
    steps = gen.sample_steps(num)  # (T + 1, num, D)
    grid = steps.transpose(0, 1).reshape(-1, steps.shape[-1])
    save_image_grid(grid, image_shape, path, ncol=steps.shape[0], title=title)


def run_variant(config: dict[str, Any], variant: str, data: Dataset, out: Path, device: str, resume: bool,
                progress: bool, data_dir: str | None = None, command: str | None = None,
                redo_finetune: bool = False) -> dict[str, Any]:
    """Train (generators) or load (VAE), score raw and fine-tuned, and write ``out/result.json``. When
    resuming, finished stages are kept: a finished training (best.pt), the raw scores, and a finished
    fine-tuning unless ``redo_finetune``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    out.mkdir(parents=True, exist_ok=True)
    x_test = fixed_binarize(data.test)
    if config.get("eval_limit"):
        x_test = x_test[: config["eval_limit"]]
    x_valid = fixed_binarize(data.valid)[: config["train"]["valid_limit"]]
    ev, ft = config["eval"], config["finetune"]
    result: dict[str, Any] = {"variant": variant, "description": DESCRIPTIONS[variant], "config": config,
                              "device": device}
    pyro.set_rng_seed(config["seed"])
    t0 = time.time()
    previous = _read_result(out / "result.json") if resume else None
    # A finished training whose checkpoint.pt is gone (results keep only best.pt) is not redone.
    trained = (previous is not None and variant != "vae" and not (out / CHECKPOINT_NAME).is_file()
               and (out / BEST_NAME).is_file()
               and not setting_differences(previous["config"], config, FINETUNE)
               and previous.get("train", {}).get("epochs") == config["train"]["epochs"])
    if variant == "vae":
        module = load_vae(config, data, out, device, progress, data_dir)
        result["train"] = {"source": str(config["vae"].get("checkpoint")),
                           "selection": "best validation ELBO (experiments.vae)"}
    else:
        module = build_generator(variant, config, data.train.shape[1], data.train.mean(0)).to(device)
        elbo = PathwiseKL_ELBO()
    if trained:
        module.load_state_dict(load_checkpoint(out / BEST_NAME)["module"])
        result["train"] = previous["train"]
    elif variant != "vae":
        fit = train_best(module, elbo, lambda a: -elbo.per_datum(module.model, module.guide, a).sum(), config,
                         data.train, lambda x, g: dynamic_binarize(x, g), (x_valid,), out, device,
                         resume and (out / "checkpoint.pt").is_file(), progress)
        result["train"] = {"epochs": fit["epochs"], "evaluated_epoch": fit["evaluated_epoch"],
                           "valid_bound_nll": fit["valid_nll"], "updates": fit["updates"],
                           "selection": "best validation bound (validation split, fixed binarisation)",
                           "seconds_this_process": time.time() - t0}  # per-epoch times: metrics.jsonl
        steps_figure(module, data.image_shape, out / "steps.png",
                     f"{variant}, {data.name}: sigma(c_t), t = 0..T, one sample of p per row")
    module.eval()
    result["num_parameters"] = sum(p.numel() for p in module.parameters())
    result["protocol"] = protocol(data, x_test.shape[0])
    if previous is not None and "raw" in previous and not setting_differences(previous["config"], config,
                                                                              FINETUNE):
        result["raw"] = previous["raw"]  # scored before an interruption; the weights are the same best.pt
    else:
        t0 = time.time()
        result["raw"] = score(module, x_test, ev, progress)
        result["raw"]["seconds"] = time.time() - t0
    result["complete"] = False
    write_json(out / "result.json", result)  # the raw scores survive an interrupted fine-tuning
    if ft["epochs"] > 0:
        t0 = time.time()
        metrics = finetune_guide(module, module.model, module.guide, module.guide_parameters(),
                                 PathwiseKL_ELBO(), x_test, epochs=ft["epochs"], batch_size=ft["batch_size"],
                                 lr=ft["lr"], seed=config["seed"], device=device, out_dir=out / "finetune",
                                 clip_norm=config["train"]["clip_norm"], progress=progress,
                                 resume=resume and not redo_finetune
                                 and (out / "finetune" / "checkpoint.pt").is_file())
        module.eval()
        result["finetune"] = {"epochs": ft["epochs"], "updates": ft["epochs"] * -(-x_test.shape[0]
                                                                                 // ft["batch_size"]),
                              "lr": ft["lr"], "data": f"the {x_test.shape[0]} scored test images",
                              "train_loss": [m["train_loss"] for m in metrics],
                              "seconds": time.time() - t0}
        result["finetuned"] = score(module, x_test, ev, progress)
    result["complete"] = True
    write_report(out, "result", result, render_table([result]), config=config, command=command)
    return result


def _read_result(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def protocol(data: Dataset, num_test: int) -> dict[str, Any]:
    return {
        "data": data.describe(),
        "binarization": binarization_protocol(),
        "split_scored": "test",
        "num_test_images": int(num_test),
        "nll_units": "nats per image",
        "finetuning": "guide only, model frozen, on the scored test images; the model scored is unchanged",
    }


# ------------------------------------------------------------------------------------------- table


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")


def render_table(results: list[dict[str, Any]]) -> str:
    """The markdown table: bound and IWAE estimate, raw and fine-tuned, k-hat, and paired differences to the
    VAE where the VAE was run."""
    vae = next((r for r in results if r["variant"] == "vae"), None)
    rows = []
    for r in results:
        row = [r["variant"]]
        for stage in ("raw", "finetuned"):
            s = r.get(stage)
            if s is None:
                row += ["–"] * 3
                continue
            row += [f"{s['bound']['nll']:.2f} ± {s['bound']['stderr']:.2f}",
                    f"{s['iwae']['nll']:.2f} ± {s['iwae']['stderr']:.2f}",
                    f"{fmt_or_na(s['iwae']['khat_median'], '.2f')} / "
                    f"{fmt_or_na(100 * s['iwae']['khat_frac_gt_0.7'], '.0f')} % / "
                    f"{degenerate_cell(s['iwae'], percent=True)}"]
        if vae is not None and r is not vae:
            stage = "finetuned" if "finetuned" in r and "finetuned" in vae else "raw"
            m, se = _paired(r[stage]["iwae"]["per_image"], vae[stage]["iwae"]["per_image"])
            row.append(f"{m:+.2f} ± {se:.2f} ({stage})")
        else:
            row.append("–")
        rows.append(row)
    first = results[0]
    p, ev = first["protocol"], first["config"]["eval"]
    d = p["data"]
    iw = first["raw"]["iwae"]
    header = ["model", "bound (raw)", f"IWAE-{iw['K']} (raw)", "k-hat median / >0.7 / degenerate (ESS) (raw)",
              "bound (fine-tuned)", f"IWAE-{iw['K']} (fine-tuned)", "k-hat (fine-tuned)",
              "IWAE − VAE, paired"]
    return "\n".join([
        f"Data: {d['name']}, test split; binarisation: {p['binarization']['description']} "
        f"Nats per image (lower is better), mean ± standard error over images.",
        f"Bound: mean of {ev['bound_draws']} single-sample path-wise KL bounds per image, on "
        f"{first['raw']['bound']['num_images']} test images (an upper bound). IWAE-{iw['K']}: an importance "
        f"estimate of -log p(x) on the first {iw['num_images']} test images. Fine-tuned: the guide alone "
        f"re-fitted to the scored test images, model frozen ({p['finetuning']}).",
        "k-hat: PSIS median over the images with a fitted tail / fraction of all images above 0.7 "
        "(unreliable) / fraction of all images whose PSIS tail is degenerate (fewer than 5 distinct weights, "
        "or k-hat not finite: k-hat says nothing there, never counted as unreliable) with their mean ESS of "
        "K; n/a: not computed or not recorded.",
        "",
        markdown_table(header, rows),
        "",
    ])


def run(config: dict[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Run every variant (a finished one is read back when resuming) and write the table."""
    variants = ctx.args.variants.split(",") if ctx.args.variants else list(config["variants"])
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    data = load_dataset(config["dataset"], ctx.data_dir).to(ctx.device)
    results = []
    for v in variants:
        done = _read_result(ctx.out / v / "result.json") if ctx.resume else None
        if done is not None and done.get("complete") and not ctx.args.redo_finetune:
            results.append(done)
            continue
        results.append(run_variant(config, v, data, ctx.out / v, ctx.device, ctx.resume, ctx.progress,
                                   ctx.data_dir, ctx.command, ctx.args.redo_finetune))
    rows = [{k: v for k, v in r.items() if k not in ("config", "command")} for r in results]
    write_report(ctx.out, "table", {"protocol": results[0]["protocol"], "results": rows},
                 render_table(results), config=config, command=ctx.command)
    return results


def check_variants(config: dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    variants = args.variants.split(",") if args.variants else list(config["variants"])
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")


DRAW_EXPERIMENT = Experiment(
    name=EXPERIMENT, prog="python -m experiments.draw", description=__doc__, default_out=DEFAULT_OUT, run=run,
    add_args=add_args, prepare=check_variants,
    # Fine-tuning is a stage a resumed run may redo with other settings (the raw scores are kept).
    resumable=FINETUNE, summary=(("table.md", "table.json"),),
)


def main(argv: list[str] | None = None) -> int:
    return DRAW_EXPERIMENT.main(argv)


if __name__ == "__main__":
    sys.exit(main())
