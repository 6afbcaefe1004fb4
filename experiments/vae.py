"""The VAE experiment: train a Bernoulli VAE with the path-wise KL ELBO, evaluate it with an
importance-sampled log-likelihood (IWAE-K) and PSIS diagnostics, and write a report.

    python -m experiments.vae --preset quick          # scikit-learn digits, CPU, about a minute
    python -m experiments.vae --preset fashion        # Fashion-MNIST, CPU-sized (the README's number)
    python -m experiments.vae --preset paper --device cuda

Protocol (stated in every output): training images are binarised dynamically (a fresh Bernoulli draw of
the grey levels for every minibatch); validation and test images are binarised once with a fixed seed;
the test NLL is -log p̂(x) from K importance samples of the guide, averaged over the test set, with PSIS
k-hat and the ESS of the weights per image; the bound is the mean of 10 single-sample path-wise KL
ELBOs per image. Training follows every experiment's rule (:func:`experiments.common.train_best`: Adam with a
per-update learning-rate decay, the global gradient norm clipped where the preset says). Outputs in
``--out``: results.json, results.md, samples.png, curves.png, metrics.jsonl, config.json, checkpoint.pt
(last epoch, for --resume) and best.pt (best validation epoch, the one evaluated).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pyro
import torch

from experiments.common import build_registered, positive_int, train_best
from experiments.data import Dataset, binarization_protocol, dynamic_binarize, fixed_binarize, load_dataset
from experiments.report import fmt_or_na, markdown_table, save_curves, save_image_grid, write_report
from experiments.runner import Experiment, RunContext
from inference.diagnostics import bound_ladder, khat_summary
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.scoring import nll_summary, score_bound_and_iwae
from ppl_models.vae import VAE

EXPERIMENT = "vae"
DEFAULT_OUT = "runs/vae"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--z-dim", dest="z_dim", type=positive_int, default=None,
                        help="latent dimension, >= 1 (model.z_dim; default: the preset's)")
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=None,
                        help="hidden layer sizes of the MLPs, each >= 1 (model.hidden; default: the "
                        "preset's)")
    parser.add_argument("--iw-samples", dest="iw_samples", type=positive_int, default=None,
                        help="K, importance samples per test image for the log-likelihood estimate, >= 1 "
                        "(eval.iw_samples; default: the preset's)")


def train_and_score(config: dict[str, Any], out: Path, device: str, resume: bool, progress: bool,
                    data_dir: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns (and writes) the results."""
    data: Dataset = load_dataset(config["dataset"], data_dir).to(device)
    t, ev = config["train"], config["eval"]
    valid = fixed_binarize(data.valid)[: t["valid_limit"]]
    test = fixed_binarize(data.test)
    if config.get("eval_limit"):
        test = test[: config["eval_limit"]]

    pyro.set_rng_seed(config["seed"])
    vae: VAE = build_registered("vae", config["model"], data.train.shape[1])
    elbo = PathwiseKL_ELBO()
    t0 = time.time()
    # Model selection on the validation split: the weights of the best validation ELBO are evaluated.
    fit = train_best(vae, elbo, lambda x: -elbo.per_datum(vae.model, vae.guide, x).sum(), config, data.train,
                     lambda x, g: dynamic_binarize(x, g), (valid,), out, device, resume, progress)
    train_seconds = time.time() - t0

    t0 = time.time()
    s = score_bound_and_iwae(vae.model, vae.guide, test, bound_draws=ev["bound_draws"],
                             iw_samples=ev["iw_samples"], iw_limit=ev["iw_limit"],
                             batch_size=ev["batch_size"], iw_batch=ev["iw_batch"], iw_chunk=ev["iw_chunk"],
                             progress=progress)
    eval_seconds = time.time() - t0
    iw, bound = nll_summary(s.iwae), nll_summary(s.bound)
    K = ev["iw_samples"]
    n_ladder = min(ev["ladder_images"], test.shape[0])
    ladder = None
    if n_ladder:
        lad = bound_ladder(vae.model, vae.guide, test[:n_ladder], ks=(1, 10, 100, 1000), progress=progress)
        ladder = {"num_images": n_ladder, "elbo": lad["elbo"], "iwae": lad["iwae"],
                  **khat_summary(lad["khat"], lad["degenerate"], lad["ess"])}

    metrics = fit["metrics"]
    results = {
        "experiment": EXPERIMENT,
        "config": config,
        "protocol": {
            "data": data.describe(),
            "binarization": binarization_protocol(),
            "split_scored": "test",
            "num_test_images": int(test.shape[0]),
            "nll_estimate": f"importance-sampled estimate, K={K} guide samples per image (IWAE-{K}); "
            "an estimate of -log p(x), not a bound",
            "bound": f"mean over {ev['bound_draws']} draws of the single-sample path-wise KL ELBO (analytic "
            "KL); an upper bound on -log p(x) in expectation",
        },
        "test": {
            "nll_iwae": iw["nll"],
            "nll_iwae_stderr": iw["stderr"],
            "nll_bound": bound["nll"],
            "nll_bound_stderr": bound["stderr"],
            "importance_sampling": s.estimate.summary(),
        },
        "ladder_first_test_images": ladder,
        "train": {
            "epochs": fit["epochs"],
            "updates": fit["updates"],
            "evaluated_epoch": fit["evaluated_epoch"],
            "evaluated_epoch_valid_elbo": -fit["valid_nll"],
            "selection": f"weights of the epoch with the best validation ELBO (first {valid.shape[0]} "
            "validation images, fixed binarisation)",
            "final_train_loss": metrics[-1]["train_loss"] if metrics else None,
            "seconds_this_process": train_seconds,
        },
        "eval_seconds": eval_seconds,
        "device": device,
        "torch": torch.__version__,
    }
    write_report(out, "results", results, render_markdown(results), config=config, command=command)
    save_image_grid(vae.sample(64), data.image_shape, out / "samples.png",
                    title=f"VAE samples (decoder means), {data.name}")
    if metrics:
        neg = [{"epoch": m["epoch"], "train -ELBO": m["train_loss"], "valid -ELBO": -m["valid_bound"]}
               for m in metrics if "valid_bound" in m]
        save_curves(neg, ["train -ELBO", "valid -ELBO"], out / "curves.png", ylabel="nats per image",
                    title=f"VAE on {data.name}: negative ELBO per image")
    return results


def render_markdown(r: dict[str, Any]) -> str:
    p, t, c = r["protocol"], r["test"], r["config"]
    d, tr = p["data"], c["train"]
    K = c["eval"]["iw_samples"]
    imp = t["importance_sampling"]
    lr = f"lr {tr['lr']} (constant)" if tr["lr"] == tr["lr_final"] else \
        f"lr {tr['lr']} decayed per update to {tr['lr_final']}"
    clip = "no gradient clipping" if tr["clip_norm"] is None else \
        f"global gradient-norm clip {tr['clip_norm']}"
    lines = [
        f"# VAE on {d['name']} — preset `{c['preset']}`",
        "",
        f"Data: {d['name']} ({d['source']}), split {d['splits']}; scored on the **test** split "
        f"({p['num_test_images']} images).",
        "",
        f"Binarisation: {p['binarization']['description']}.",
        "",
        f"Model: MLP VAE, z = {c['model']['z_dim']}, hidden {c['model']['hidden']}, Bernoulli decoder; "
        f"trained {r['train']['epochs']} epochs ({r['train']['updates']} updates of batch "
        f"{tr['batch_size']}) with PathwiseKL_ELBO (analytic KL), Adam {lr}, betas {tuple(tr['betas'])}, "
        f"{clip}; evaluated with the weights of epoch "
        f"{r['train']['evaluated_epoch']}, the best validation ELBO "
        f"({r['train']['evaluated_epoch_valid_elbo']:.2f} nats per image).",
        "",
        markdown_table(
            ["quantity (nats per test image, lower is better)", "value", "kind", "samples behind it"],
            [
                ["test NLL, importance-sampled", f"{t['nll_iwae']:.2f} ± {t['nll_iwae_stderr']:.2f}",
                 "estimate of -log p(x) (an upper bound on it in expectation)", f"K={K} per image"],
                ["test -ELBO (path-wise KL)",
                 f"{t['nll_bound']:.2f} ± {fmt_or_na(t.get('nll_bound_stderr'), '.2f')}",
                 "bound (upper bound on -log p(x) in expectation)",
                 f"{c['eval']['bound_draws']} draws per image"],
            ],
        ),
        "",
        "± is the standard error over test images. Importance-sampling health of the K weights per image: "
        f"PSIS k-hat median {fmt_or_na(imp['khat_median'], '.2f')}, fraction > 0.7: "
        f"{fmt_or_na(imp['khat_frac_gt_0.7'], '.3f')}, fraction > 0.5: "
        f"{fmt_or_na(imp['khat_frac_gt_0.5'], '.3f')}, fraction degenerate: "
        f"{fmt_or_na(imp.get('khat_frac_degenerate'), '.3f')} (their ESS mean "
        f"{fmt_or_na(imp.get('ess_mean_degenerate'), '.1f')}); ESS mean {imp['ess_mean']:.1f}, "
        f"min {imp['ess_min']:.1f} (of {K}). Degenerate: the PSIS tail has fewer than 5 distinct weights (or "
        "k-hat is not finite), so k-hat says nothing there; such images are not counted in the fractions "
        "above 0.5 and 0.7, and the median is over the others.",
        "",
    ]
    lad = r.get("ladder_first_test_images")
    if lad:
        lines += [
            f"Bound ladder on the first {lad['num_images']} test images (log-likelihood bounds, higher is "
            "tighter; IWAE-k from K=1000 samples in groups of k):",
            "",
            markdown_table(["ELBO", *[f"IWAE-{k}" for k in lad["iwae"]]],
                           [[lad["elbo"], *lad["iwae"].values()]]),
            "",
        ]
    return "\n".join(lines)


def run(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    return train_and_score(config, ctx.out, ctx.device, ctx.resume, ctx.progress, ctx.data_dir, ctx.command)


VAE_EXPERIMENT = Experiment(
    name=EXPERIMENT, prog="python -m experiments.vae", description=__doc__, default_out=DEFAULT_OUT, run=run,
    add_args=add_args,
    # More epochs on --resume: allowed with a constant learning rate (lr == lr_final), where the longer run is
    # the run made with the longer count from the start; this experiment trains them.
    more_epochs_retrain=True,
    summary=(("results.md", "results.json"),),
)


def main(argv: list[str] | None = None) -> int:
    return VAE_EXPERIMENT.main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
