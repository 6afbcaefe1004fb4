"""The VAE experiment: train a Bernoulli VAE with the path-wise KL ELBO, evaluate it with an
importance-sampled log-likelihood (IWAE-K) and PSIS diagnostics, and write a report.

    python -m experiments.vae --preset quick          # scikit-learn digits, CPU, about a minute
    python -m experiments.vae --preset fashion        # Fashion-MNIST, CPU-sized (the README's number)
    python -m experiments.vae --preset paper --device cuda

Protocol (stated in every output): training images are binarised dynamically (a fresh Bernoulli draw of
the grey levels for every minibatch); validation and test images are binarised once with a fixed seed;
the test NLL is -log p̂(x) from K importance samples of the guide, averaged over the test set, with PSIS
k-hat and the ESS of the weights per image; the bound is the mean of 10 single-sample path-wise KL
ELBOs per image. Outputs in ``--out``: results.json, results.md, samples.png, curves.png, metrics.jsonl,
checkpoint.pt (last epoch, for --resume) and best.pt (best validation epoch, the one evaluated).
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
    Parser,
    add_common_args,
    fmt_or_na,
    markdown_table,
    positive_float,
    positive_int,
    resolve_config,
    run_experiment,
    save_curves,
    save_image_grid,
    write_json,
)
from experiments.data import Dataset, binarization_protocol, dynamic_binarize, fixed_binarize, load_dataset
from inference.diagnostics import bound_ladder, khat_summary
from inference.importance import importance_log_likelihood
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.train import Trainer
from ppl_models.vae import VAE

EXPERIMENT = "vae"
DEFAULT_OUT = "runs/vae"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m experiments.vae",
        description=__doc__.split("\n\n")[0],
    )
    add_common_args(parser, EXPERIMENT, DEFAULT_OUT)
    parser.add_argument("--z-dim", dest="z_dim", type=positive_int, default=None,
                        help="latent dimension, >= 1 (default: the preset's)")
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=None,
                        help="hidden layer sizes of the MLPs, each >= 1 (default: the preset's)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="Adam learning rate at the start, > 0 (default: the preset's)")
    parser.add_argument("--lr-final", dest="lr_final", type=positive_float, default=None,
                        help="learning rate reached at the last step (per-step exponential decay), > 0 "
                        "(default: the preset's)")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, default=None,
                        help="minibatch size, >= 1 (default: the preset's)")
    parser.add_argument("--eval-samples", dest="eval_samples", type=positive_int, default=None,
                        help="K, importance samples per test image for the log-likelihood estimate, >= 1 "
                        "(default: the preset's)")
    return parser


def elbo_per_image(vae: VAE, x: torch.Tensor, num_draws: int = 1, batch_size: int = 1000) -> float:
    """Mean over images of the path-wise KL ELBO, each image's bound averaged over ``num_draws`` draws."""
    elbo = PathwiseKL_ELBO()
    total = 0.0
    with torch.no_grad():
        for _ in range(num_draws):
            for start in range(0, x.shape[0], batch_size):
                total += -elbo.loss(vae.model, vae.guide, x[start : start + batch_size])
    return total / (num_draws * x.shape[0])


def run(config: dict[str, Any], out, device: str, resume: bool, progress: bool,
        data_dir: str | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns (and writes) the results."""
    data: Dataset = load_dataset(config["dataset"], data_dir).to(device)
    valid = fixed_binarize(data.valid)
    test = fixed_binarize(data.test)
    if config.get("eval_limit"):
        test = test[: config["eval_limit"]]

    pyro.set_rng_seed(config["seed"])
    vae = VAE(x_dim=data.train.shape[1], z_dim=config["z_dim"], hidden=tuple(config["hidden"]))

    def evaluate(epoch: int) -> dict[str, float]:
        return {"valid_elbo": elbo_per_image(vae, valid)}

    # Per-step learning-rate decay from lr to lr_final over the whole run (ClippedAdam's lrd).
    steps = config["epochs"] * -(-data.train.shape[0] // config["batch_size"])
    lrd = (config.get("lr_final", config["lr"]) / config["lr"]) ** (1.0 / max(steps, 1))
    trainer = Trainer(
        vae.model, vae.guide, vae, PathwiseKL_ELBO(),
        pyro.optim.ClippedAdam({"lr": config["lr"], "lrd": lrd, "clip_norm": config.get("clip_norm", 10.0)}),
        train_data=data.train, batch_size=config["batch_size"], epochs=config["epochs"],
        seed=config["seed"], device=device, out_dir=out,
        transform=lambda x, g: dynamic_binarize(x, g),
        evaluate=evaluate, progress=progress,
        # Model selection on the validation split: the best validation ELBO's weights are evaluated.
        keep_best="valid_elbo",
    )
    t0 = time.time()
    metrics = trainer.fit(resume=resume)
    train_seconds = time.time() - t0

    best = trainer.load_best()
    vae.eval()
    K = config["eval_samples"]
    t0 = time.time()
    est = importance_log_likelihood(
        vae.model, vae.guide, test, num_samples=K, batch_size=config.get("eval_batch", 100),
        chunk_size=config.get("eval_chunk", 500), progress=progress,
    )
    eval_seconds = time.time() - t0
    bound = elbo_per_image(vae, test, num_draws=10)
    n_ladder = min(500, test.shape[0])
    ladder = bound_ladder(vae.model, vae.guide, test[:n_ladder], ks=(1, 10, 100, 1000), progress=progress)

    summary = est.summary()
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
            "bound": "mean over 10 draws of the single-sample path-wise KL ELBO (analytic KL); "
            "an upper bound on -log p(x) in expectation",
        },
        "test": {
            "nll_iwae": summary["nll"],
            "nll_iwae_stderr": summary["nll_stderr"],
            "nll_bound": -bound,
            "importance_sampling": summary,
        },
        "ladder_first_test_images": {
            "num_images": n_ladder,
            "elbo": ladder["elbo"],
            "iwae": ladder["iwae"],
            **khat_summary(ladder["khat"], ladder["degenerate"], ladder["ess"]),
        },
        "train": {
            "epochs": len(metrics),
            "evaluated_epoch": best["epoch"],
            "evaluated_epoch_valid_elbo": best["value"],
            "selection": "weights of the epoch with the best validation ELBO "
            "(validation split, fixed binarisation)",
            "final_train_loss": metrics[-1]["train_loss"] if metrics else None,
            "final_valid_elbo": metrics[-1].get("valid_elbo") if metrics else None,
            "seconds_this_process": train_seconds,
        },
        "eval_seconds": eval_seconds,
        "device": device,
    }
    write_json(out / "results.json", results)
    (out / "results.md").write_text(render_markdown(results))
    save_image_grid(vae.sample(64), data.image_shape, out / "samples.png",
                    title=f"VAE samples (decoder means), {data.name}")
    save_curves(metrics, ["train_loss"], out / "curves.png", ylabel="nats per image",
                title=f"VAE on {data.name}: train loss (-ELBO, dyn. binarised)")
    if metrics and "valid_elbo" in metrics[0]:
        neg = [{"epoch": m["epoch"], "train -ELBO": m["train_loss"], "valid -ELBO": -m["valid_elbo"]}
               for m in metrics]
        save_curves(neg, ["train -ELBO", "valid -ELBO"], out / "curves.png", ylabel="nats per image",
                    title=f"VAE on {data.name}: negative ELBO per image")
    return results


def render_markdown(r: dict[str, Any]) -> str:
    p, t, c = r["protocol"], r["test"], r["config"]
    d = p["data"]
    K = p["nll_estimate"].split("K=")[1].split(" ")[0]
    imp = t["importance_sampling"]
    lines = [
        f"# VAE on {d['name']} — preset `{c['preset']}`",
        "",
        f"Data: {d['name']} ({d['source']}), split {d['splits']}; scored on the **test** split "
        f"({p['num_test_images']} images).",
        f"Binarisation: {p['binarization']['description']}",
        f"Model: MLP VAE, z = {c['z_dim']}, hidden {c['hidden']}, Bernoulli decoder; trained "
        f"{r['train']['epochs']} epochs with PathwiseKL_ELBO (analytic KL), Adam lr {c['lr']} decayed to "
        f"{c.get('lr_final', c['lr'])}, batch {c['batch_size']}; evaluated with the weights of epoch "
        f"{r['train']['evaluated_epoch']}, the best validation ELBO "
        f"({r['train']['evaluated_epoch_valid_elbo']:.2f} nats per image).",
        "",
        markdown_table(
            ["quantity (nats per test image, lower is better)", "value", "kind", "samples behind it"],
            [
                ["test NLL, importance-sampled", f"{t['nll_iwae']:.2f} ± {t['nll_iwae_stderr']:.2f}",
                 "estimate of -log p(x) (an upper bound on it in expectation)", f"K={K} per image"],
                ["test -ELBO (path-wise KL)", f"{t['nll_bound']:.2f}", "bound (upper bound on -log p(x))",
                 "10 draws per image"],
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
        f"Bound ladder on the first {r['ladder_first_test_images']['num_images']} test images "
        "(log-likelihood bounds, higher is tighter; IWAE-k from K=1000 samples in groups of k):",
        "",
        markdown_table(
            ["ELBO", *[f"IWAE-{k}" for k in r["ladder_first_test_images"]["iwae"]]],
            [[r["ladder_first_test_images"]["elbo"], *r["ladder_first_test_images"]["iwae"].values()]],
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve_config(EXPERIMENT, args)
    except ValueError as e:
        parser.error(str(e))

    def work(out: Path, device: str) -> None:
        run(config, out, device, args.resume, not args.no_progress, args.data_dir)
        print((out / "results.md").read_text())
        print(f"results: {out / 'results.json'}", file=sys.stderr)

    return run_experiment(args, DEFAULT_OUT, config, work, more_epochs_retrain=True)

if __name__ == "__main__":
    sys.exit(main())
