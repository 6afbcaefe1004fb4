"""The imputation experiment, one cell of Table 1: train (if it learns) and evaluate one method under one mask
setting, and write its numbers with their protocol.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 4, Table 1, Fig. 2-3; the
methods: GPSI-add/-jump (Sec. 3.1), LSTM-add/-jump (Sec. 3.2), VAE imputation (Sec. 9.2), honest and
oracular template matching (Sec. 4), and MIWAE (Mattei & Frellsen 2019).

    python -m experiments.imputation --preset quick --method gpsi-add --mask mar-4
    python -m experiments.imputation --preset cpu --method lstm-add --mask mar-16
    python -m experiments.imputation --preset paper --method gpsi-jump --mask mcar-80 --device cuda

Protocol (stated in every output). Images are binarised: training images dynamically (a fresh Bernoulli draw
per minibatch), validation and test images once with seed 0; the trained policies see a fresh mask from the
chosen mask distribution for every minibatch. Test masks come from the same distribution, drawn once with a
fixed seed on all test images, identical for every method. Scores are on the true (binarised) missing values:

- imputation NLL in nats per image (summed over its missing pixels) and per missing pixel (total NLL over all
  test images / total missing pixels);
- trained policies: the bound, E_q[−log p(x_u | c_T)] + KL(q || p), averaged over ``bound_draws``
  single-sample bounds per image as the paper's code did, and an importance-weighted estimate
  −log p̂(x_u | x_k) from K guide roll-outs (IWAE-K), with PSIS k-hat;
- VAE imputation: the expected NLL of the final step's imputations over several runs (honest), and the best
  step chosen on the test set itself (the paper's "found oracularly" score, marked as such);
- template matching: exact NLL of the chosen training image used as Bernoulli means;
- MIWAE: its importance-weighted estimate of −log p(x_u | x_k) (a ratio of two importance sums);
- MSE on the missing pixels of the method's point imputation against the grey-level test image (the GAIN
  literature's metric): the policies' mean of σ(c_T) over several roll-outs of p, VAE imputation's final step
  averaged over runs, the matched template, MIWAE's self-normalised importance mean;
- calibration of the per-pixel predicted probability P(x_d = 1 | x_k) of every hidden pixel against the
  binarised test pixel the NLL scores: a reliability diagram in 10 equal-width bins and the expected
  calibration error (ECE, Guo et al. 2017; :mod:`inference.calibration`). The probability is the same point
  imputation the MSE uses, read as a Bernoulli mean (each method's is stated in ``calibration.predicted``):
  the policies' mean of σ(c_T) over roll-outs of p, VAE imputation's final-step decoder mean averaged over
  runs, the matched training image's grey level, MIWAE's importance mixture of decoder means.

Outputs in ``--out``: result.json (every number and its protocol), result.md, and for the trained methods
metrics.jsonl, checkpoint.pt, best.pt (best validation bound, the weights evaluated) and rollouts.png (two
independent roll-outs of p from the same start, every step shown).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch

from experiments.common import (
    batched,
    build_imputer,
    build_registered,
    load_vae,
    positive_int,
    train_best,
)
from experiments.data import (
    IMAGE_SHAPES,
    Dataset,
    binarization_protocol,
    dynamic_binarize,
    fixed_binarize,
    load_dataset,
)
from experiments.report import KHAT_KEYS, markdown_table, save_image_grid, write_report
from experiments.runner import Experiment, RunContext
from experiments.runs import vae_imputation
from inference.calibration import reliability
from inference.iwae import IWAE_ELBO
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.scoring import nll_summary, score_bound_and_iwae
from ppl_models.imputation_policy import ImputationPolicy
from ppl_models.masks import MaskProcess, make_mask_process
from ppl_models.miwae import miwae_impute
from ppl_models.template_matching import template_match

EXPERIMENT = "imputation"
DEFAULT_OUT = "runs/imputation"
POLICIES = ("gpsi-add", "gpsi-jump", "lstm-add", "lstm-jump")
METHODS = (*POLICIES, "vae-imp", "tm-honest", "tm-oracular", "miwae")
TEST_MASK_SEED = 1234
CALIBRATION_BINS = 10
CALIBRATION_TARGET = ("the binarised test pixel (the fixed binarisation, seed 0, whose NLL is scored), "
                      "hidden pixels only")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="imputation method (required): the trained policies (gpsi-*, lstm-*), VAE "
                        "imputation, honest/oracular template matching, or MIWAE")
    parser.add_argument("--mask", required=True,
                        help="mask distribution for training and test (required): mcar-<percent> with "
                        "percent in (0, 100] (mcar-100 = unconditional), mar-<size> (a size x size square), "
                        "e.g. mar-14, mcar-80")
    parser.add_argument("--num-steps", dest="num_steps", type=positive_int, default=None,
                        help="refinement steps T of a trained policy (gpsi-*, lstm-*), >= 1 (num_steps; "
                        "default: the preset's, per model family)")


# ----------------------------------------------------------------------------------------------- data


def test_masks(process: MaskProcess, x: torch.Tensor, seed: int = TEST_MASK_SEED) -> torch.Tensor:
    """The fixed test masks of a mask setting: one draw with a seeded generator, the same for every method."""
    return process.sample(x, generator=torch.Generator().manual_seed(seed))


def mask_transform(process: MaskProcess):
    """Per-minibatch transform of the training data: dynamic binarisation and a fresh mask."""

    def transform(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = dynamic_binarize(x, generator)
        return x, process.sample(x, generator=generator)

    return transform


# ------------------------------------------------------------------------------------------ metrics


def summarise(nll: torch.Tensor, missing: torch.Tensor, kind: str, behind: str) -> dict[str, Any]:
    """Per-image and per-missing-pixel NLL of per-image values ``nll`` (B,) given the (B, D) missing mask."""
    s = nll_summary(nll, missing.sum(-1))
    return {"nll_per_image": s["nll"], "nll_per_image_stderr": s["stderr"],
            "nll_per_pixel": s["nll_per_unit"], "num_images": s["num"], "kind": kind, "behind": behind}


def missing_mse(imputation: torch.Tensor, grey: torch.Tensor, missing: torch.Tensor) -> float:
    """Mean squared error on the missing pixels, pooled over the test set."""
    err = ((imputation - grey) ** 2 * missing).sum()
    return float(err / missing.sum().clamp_min(1))


def calibration(prob: torch.Tensor, x: torch.Tensor, missing: torch.Tensor, predicted: str) -> dict[str, Any]:
    """Reliability diagram and ECE of the predicted probabilities ``prob`` (B, D) of the hidden pixels
    (``missing`` = 1) against the binarised test images ``x``, pooled over the test set; ``predicted`` says
    what the probability is."""
    rel = reliability(prob, x, mask=missing, num_bins=CALIBRATION_BINS)
    return {**rel.to_dict(), "predicted": predicted, "target": CALIBRATION_TARGET}


# ------------------------------------------------------------------------------------------ methods


def evaluate_policy(policy: ImputationPolicy, x: torch.Tensor, mask: torch.Tensor, grey: torch.Tensor,
                    ev: dict[str, Any], progress: bool) -> dict[str, Any]:
    missing = 1 - mask
    bs = ev["batch_size"]
    s = score_bound_and_iwae(policy.model, policy.guide, (x, mask), bound_draws=ev["bound_draws"],
                             iw_samples=ev["iw_samples"], iw_limit=ev["iw_limit"], batch_size=bs,
                             iw_batch=ev["iw_batch"], iw_chunk=ev["iw_chunk"], progress=progress)
    with torch.no_grad():
        rollouts = ev["mse_rollouts"]
        mean_imp = torch.cat(batched(
            lambda a, b: torch.stack([policy.impute(a, b)[-1] for _ in range(rollouts)]).mean(0),
            x, mask, batch_size=bs))
    draws, K, n_iw, health = s.bound_draws, ev["iw_samples"], s.num_iw, s.estimate.summary()
    predicted = (f"mean over {rollouts} roll-outs of p of the final Bernoulli mean sigma(c_T) of the pixel "
                 "(the MSE's point imputation): a Monte Carlo estimate of p's P(x_d = 1 | x_k)")
    return {
        "bound": summarise(s.bound, missing, "bound (upper bound on -log p(x_u|x_k))",
                           f"mean of {draws} single-sample path-wise KL bounds per image"),
        "iw_estimate": {
            **summarise(s.iwae, missing[:n_iw], f"estimate (IWAE-{K} of -log p(x_u|x_k))",
                        f"K={K} guide roll-outs per image, first {n_iw} test images"),
            **{k: health[k] for k in KHAT_KEYS}, "ess_mean": health["ess_mean"],
        },
        "mse": missing_mse(mean_imp, grey, missing),
        "mse_protocol": f"mean of sigma(c_T) over {rollouts} roll-outs of p vs grey-level test pixels",
        "calibration": calibration(mean_imp, x, missing, predicted),
    }


def rollout_figure(policy: ImputationPolicy, x: torch.Tensor, mask: torch.Tensor, image_shape, path: Path,
                   title: str, num_images: int = 6) -> None:
    """Fig. 3/8 style: for each start, two independent roll-outs of p (rows), every step c_0..c_T, then the
    truth. Missing pixels of the start are shown as the first guess σ(c_0)."""
    rows = []
    with torch.no_grad():
        for i in range(num_images):
            for _ in range(2):
                steps = policy.impute(x[i : i + 1], mask[i : i + 1])[:, 0]
                rows.append(torch.cat([steps, x[i : i + 1]]))
    grid = torch.cat(rows)
    save_image_grid(grid, image_shape, path, ncol=rows[0].shape[0], title=title)


def run(config: dict[str, Any], method: str, mask_spec: str, out: Path, device: str, resume: bool,
        progress: bool, data_dir: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Train (where the method learns) and evaluate one method under one mask setting."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    data: Dataset = load_dataset(config["dataset"], data_dir).to(device)
    process = make_mask_process(mask_spec, data.image_shape)
    grey = data.test
    if config.get("eval_limit"):
        grey = grey[: config["eval_limit"]]
    x_test = fixed_binarize(grey)
    m_test = test_masks(process, x_test)
    missing = 1 - m_test
    x_valid = fixed_binarize(data.valid)[: config["train"].get("valid_limit", 2000)]
    m_valid = test_masks(process, x_valid, seed=TEST_MASK_SEED + 1)
    x_dim = data.train.shape[1]
    ev = config["eval"]
    result: dict[str, Any] = {"method": method, "mask": process.name, "config": config, "device": device}
    t0 = time.time()
    pyro.set_rng_seed(config["seed"])

    if method in POLICIES:
        policy = build_imputer(method, config, x_dim, data.train.mean(0)).to(device)
        elbo = PathwiseKL_ELBO()
        fit = train_best(policy, elbo, lambda a, m: -elbo.per_datum(policy.model, policy.guide, a, m).sum(),
                         config, data.train, mask_transform(process), (x_valid, m_valid), out, device, resume,
                         progress)
        result["train"] = {"epochs": fit["epochs"], "evaluated_epoch": fit["evaluated_epoch"],
                           "valid_bound_nll": fit["valid_nll"], "selection": "best validation bound",
                           "updates": fit["updates"]}
        result["train_seconds"] = time.time() - t0
        t0 = time.time()
        result.update(evaluate_policy(policy, x_test, m_test, grey, ev, progress))
        rollout_figure(policy, x_test, m_test, data.image_shape, out / "rollouts.png",
                       f"{method}, {process.name}, {data.name} test: 2 roll-outs of p per start "
                       "(steps 0..T, then truth)")
    elif method == "vae-imp":
        vae = load_vae(config, data, out, device, progress, data_dir)
        runs, steps = ev["vae_runs"], ev["vae_steps"]
        parts = batched(lambda a, b: vae_imputation(vae, a, b, data.train.mean(0), steps, runs), x_test,
                        m_test, batch_size=ev["batch_size"])
        nll = torch.cat([p.nll for p in parts], dim=2)  # (runs, steps, B)
        per_step = nll.mean(dim=(0, 2))
        best_step = int(per_step.argmin())
        result["honest_final_step"] = summarise(nll[:, -1].mean(0), missing, "estimate (expected NLL of "
                                                "final-step imputations)", f"{runs} runs of {steps} steps")
        result["oracular_best_step"] = {
            **summarise(nll[:, best_step].mean(0), missing, "oracular: best step chosen on the test set "
                        "(the paper's reported score)", f"{runs} runs of {steps} steps"),
            "step": best_step + 1,
        }
        result["per_step_nll_per_image"] = per_step.tolist()
        final_mean = torch.cat([p.final_mean for p in parts])
        result["mse"] = missing_mse(final_mean, grey, missing)
        result["mse_protocol"] = f"final-step imputation averaged over {runs} runs vs grey-level test pixels"
        result["calibration"] = calibration(
            final_mean, x_test, missing,
            f"mean over {runs} runs of the final step's (step {steps}) decoder Bernoulli mean "
            "sigma(decoder(z)) of the pixel (the MSE's point imputation; the honest NLL scores each run's "
            "means separately, this is their mixture)")
    elif method in ("tm-honest", "tm-oracular"):
        mode = method.split("-")[1]
        # The training images (grey levels) are the Bernoulli means, as in the paper's code.
        tm = template_match(data.train, x_test, m_test, mode=mode, chunk_size=ev.get("tm_chunk", 4096))
        result["exact"] = summarise(tm.nll, missing, "exact NLL under the matched training image",
                                    f"{data.train.shape[0]} training images as templates")
        result["mse"] = missing_mse(tm.imputation, grey, missing)
        result["mse_protocol"] = "matched training image (grey levels) vs grey-level test pixels"
        matched = "known pixels" if mode == "honest" else "missing pixels (oracular: it sees the truth)"
        result["calibration"] = calibration(
            tm.imputation, x_test, missing,
            f"grey level of the pixel in the training image matched on the {matched}: the Bernoulli mean the "
            "exact NLL scores (which clamps it to [1e-6, 1 - 1e-6])")
    else:  # miwae
        mc = config["miwae"]
        miwae = build_registered("miwae", {k: mc[k] for k in ("z_dim", "hidden")}, x_dim).to(device)
        iwae = IWAE_ELBO(num_particles=mc["train_particles"])
        cfg = {**config, "train": {**config["train"], **mc.get("train", {})}}
        fit = train_best(miwae, iwae, lambda a, m: iwae.loss(miwae.model, miwae.guide, a, m), cfg, data.train,
                         mask_transform(process), (x_valid, m_valid), out, device, resume, progress)
        result["train"] = {"epochs": fit["epochs"], "evaluated_epoch": fit["evaluated_epoch"],
                           "valid_iwae_bound_known": fit["valid_nll"], "updates": fit["updates"],
                           "selection": f"best validation IWAE-{mc['train_particles']} bound on known pixels"}
        result["train_seconds"] = time.time() - t0
        t0 = time.time()
        K = ev["miwae_samples"]
        parts = batched(lambda a, b: miwae_impute(miwae, a, b, num_samples=K), x_test, m_test,
                        batch_size=ev["batch_size"])
        result["iw_estimate"] = summarise(-torch.cat([p.log_lik for p in parts]), missing,
                                          "estimate (self-normalised importance ratio)",
                                          f"K={K} encoder samples per image")
        imputed = torch.cat([p.imputation for p in parts])
        result["mse"] = missing_mse(imputed, grey, missing)
        result["mse_protocol"] = f"self-normalised importance mean (K={K}) vs grey-level test pixels"
        result["calibration"] = calibration(
            imputed, x_test, missing,
            f"self-normalised importance mixture sum_k w_k sigma(decoder(z_k)) of the pixel's decoder means, "
            f"K={K} encoder samples (the MSE's point imputation): MIWAE's estimate of P(x_d = 1 | x_k)")

    result["eval_seconds"] = time.time() - t0
    result["protocol"] = {
        "data": data.describe(),
        "binarization": binarization_protocol(),
        "split_scored": "test",
        "num_test_images": int(x_test.shape[0]),
        "test_masks": f"{process.name}, drawn once with seed {TEST_MASK_SEED} (same for every method)",
        "nll_units": "nats; per image = summed over the image's missing pixels; per pixel = total NLL / "
        "total missing pixels",
        "mse": "on missing pixels, point imputation vs the grey-level (unbinarised) test image",
        "calibration": f"reliability of the per-pixel predicted probability of each hidden pixel against "
        f"{CALIBRATION_TARGET}; {CALIBRATION_BINS} equal-width bins; ECE = sum_b (n_b/N)|freq_b - conf_b| "
        "(Guo et al. 2017)",
    }
    write_report(out, "result", result, render_markdown([result]), config=config, command=command)
    return result


def headline(r: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The number a table shows for a method: the tightest honest one, and its kind."""
    if "iw_estimate" in r and r["method"] != "miwae":
        return r["iw_estimate"], "IWAE estimate"
    if "iw_estimate" in r:
        return r["iw_estimate"], "IS estimate"
    if "exact" in r:
        return r["exact"], "exact"
    return r["honest_final_step"], "final step"


def render_markdown(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        main, kind = headline(r)
        bound = r.get("bound")
        orac = r.get("oracular_best_step")
        rows.append([
            r["method"], r["mask"], f"{main['nll_per_image']:.1f} ± {main['nll_per_image_stderr']:.1f}",
            f"{main['nll_per_pixel']:.4f}", kind,
            f"{bound['nll_per_image']:.1f}" if bound else "–",
            f"{orac['nll_per_image']:.1f} (step {orac['step']})" if orac else "–",
            f"{r['mse']:.4f}",
            f"{r['calibration']['ece']:.4f}" if "calibration" in r else NOT_MEASURED,
        ])
    p = results[0]["protocol"]
    d = p["data"]
    lines = [
        f"Data: {d['name']}, scored on the test split ({p['num_test_images']} images); binarisation: "
        f"{p['binarization']['description']} Test masks: {p['test_masks']}. NLL in {p['nll_units']}.",
        "",
        markdown_table(["method", "mask", "NLL nats/image", "nats/missing px", "kind", "bound nats/image",
                        "oracular (paper's VAE score)", "MSE missing", "ECE hidden px"], rows),
        "",
    ]
    for r in results:
        if "calibration" in r:
            lines += [calibration_markdown(r["calibration"], f"{r['method']}, {r['mask']}"), ""]
    return "\n".join(lines)


NOT_MEASURED = "not measured (rerun the cell with --force)"


def calibration_markdown(c: dict[str, Any], name: str) -> str:
    """A cell's calibration: what was scored, its ECE, and the reliability diagram as a table of bins."""
    edges = c["bin_edges"]
    bins = [f"{'[' if b == 0 else '('}{edges[b]:.2f}, {edges[b + 1]:.2f}]" for b in range(c["num_bins"])]
    rows = [[label, n, "–" if conf is None else f"{conf:.3f}", "–" if freq is None else f"{freq:.3f}"]
            for label, n, conf, freq in zip(bins, c["bin_count"], c["bin_mean_prob"], c["bin_freq"],
                                            strict=True)]
    return "\n".join([
        f"Calibration of {name} on {c['num_pixels']} hidden test pixels: **ECE {c['ece']:.4f}** (largest bin "
        f"gap, MCE, {c['mce']:.3f}). Predicted probability: {c['predicted']}. Against: {c['target']}. "
        f"{c['num_bins']} equal-width bins; ECE = sum_b (n_b/N)|frequency_b - mean predicted_b|.",
        "",
        markdown_table(["predicted probability bin", "pixels", "mean predicted", "frequency of 1s"], rows),
    ])


def prepare(config: dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check --mask and the options that only some methods use; the method and mask are part of the
    configuration (resume compares them)."""
    try:
        process = make_mask_process(args.mask, IMAGE_SHAPES[config["dataset"]])
    except ValueError as e:
        parser.error(f"--mask {args.mask}: {e}")
    if getattr(process, "percent", None) == 0:
        parser.error(f"--mask {args.mask} hides no pixel: nothing to impute; use a percentage in (0, 100]")
    if args.num_steps is not None and args.method not in POLICIES:
        parser.error(f"--num-steps sets the refinement steps of a trained policy ({', '.join(POLICIES)}); "
                     f"{args.method} has none")
    args.out = args.out or f"{DEFAULT_OUT}/{args.preset}/{args.mask}/{args.method}"
    config["method"], config["mask"] = args.method, args.mask


def run_from_command_line(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    return run(config, ctx.args.method, ctx.args.mask, ctx.out, ctx.device, ctx.resume, ctx.progress,
               ctx.data_dir, ctx.command)


IMPUTATION_EXPERIMENT = Experiment(
    name=EXPERIMENT, prog="python -m experiments.imputation", description=__doc__, default_out=DEFAULT_OUT,
    run=run_from_command_line, add_args=add_args, prepare=prepare, summary=(("result.md", "result.json"),),
)


def main(argv: list[str] | None = None) -> int:
    return IMPUTATION_EXPERIMENT.main(argv)


if __name__ == "__main__":
    sys.exit(main())
