"""Apply a trained imputation model to your own images and masks.

    python -m experiments.impute --run RUN_DIR --images FILE --mask MASK --samples K --out DIR

``--run`` is a finished run of a trained imputer (an imputation cell of ``gpsi-*`` or ``lstm-*``; or a VAE
run, imputed by reconstruct-and-clamp, Bachman & Precup 2015, Sec. 9.2). ``--images`` is a ``.npy`` array
of grey levels in [0, 1], shaped N×H×W or N×(H·W), or a directory of PNG files (read in name order; colour
images are averaged to grey). ``--mask`` is a ``.npy`` or PNG of the same image size (1 = known, 0 =
hidden; one H×W mask for all images, or one per image), or a mask process name (``mar-14``: a 14×14 hidden
square; ``mcar-80``: 80 % of pixels hidden at random), drawn with ``--seed``.

Writes into ``--out``:

* ``imputations.npy``: float32, N×K×H×W: K independent imputations per image. Known pixels equal the
  input; hidden pixels hold the model's Bernoulli *probabilities* σ(c_T) of the final step of one roll-out
  of the primary policy p (for a VAE run: of one reconstruct-and-clamp chain), not binary draws;
* ``mean.npy``, ``std.npy``: float32, N×H×W: the per-pixel mean and standard deviation over the K
  imputations (zero spread at known pixels);
* ``imputations.png``: per image (first 8), the input with hidden pixels grey, the mask, up to 8
  imputations, the mean and the spread (2·std, so 1 is the largest possible spread of probabilities);
* ``scores.json`` and ``scores.md``: when the images are complete (no NaN), the hidden pixels scored as the
  experiments score them: the images are binarised by one Bernoulli draw of their grey levels
  (``experiments.data.fixed_binarize``, seed ``--seed``), then for a policy the path-wise bound (mean of
  ``--bound-draws`` single-path bounds, an upper bound on −log p(x_u | x_k) in expectation) and the
  IWAE-``--iw-samples`` estimate with PSIS k-hat, in nats per image and per hidden pixel; for a VAE run,
  the cross-entropy of the hidden pixels under its final-step imputation (no bound). Input with NaN at
  hidden pixels is imputed but not scored.

Wrong sizes, values outside [0, 1], masks that are not 0/1, masks that hide no pixel or every pixel of an
image, and known pixels that are NaN are one-line errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from experiments.common import Parser, markdown_table, non_negative_int, positive_int, write_json
from experiments.data import fixed_binarize
from experiments.runs import Run, load_run
from inference.scoring import nll_summary, score_bound_and_iwae
from ppl_models import VAE, ImputationPolicy, make_mask_process, vae_impute
from ppl_models.vae import bernoulli_nll

SHOWN_IMAGES, SHOWN_IMPUTATIONS = 8, 8
OUTPUTS = ("imputations.npy", "mean.npy", "std.npy", "imputations.png", "scores.json", "scores.md")


def read_images(path: str, image_shape: tuple[int, int]) -> torch.Tensor:
    """Grey levels as an (N, H·W) float64 tensor; NaN allowed (hidden pixels of incomplete images)."""
    p = Path(path)
    h, w = image_shape
    if p.is_dir():
        import matplotlib.image

        files = sorted(p.glob("*.png"))
        if not files:
            raise ValueError(f"--images {p}: no .png files in this directory")
        arrays = []
        for f in files:
            a = np.asarray(matplotlib.image.imread(f), dtype=np.float64)
            if a.ndim == 3:
                a = a[..., :3].mean(-1)  # colour (and alpha) to grey
            if a.shape != (h, w):
                raise ValueError(f"--images {f}: {a.shape[0]}x{a.shape[1]} pixels; the run's model takes "
                                 f"{h}x{w}")
            arrays.append(a)
        array = np.stack(arrays)
    elif p.suffix == ".npy" and p.is_file():
        array = np.load(p).astype(np.float64)
    else:
        raise ValueError(f"--images {p}: give a .npy file or a directory of .png files")
    if array.ndim == 3 and array.shape[1:] != (h, w) or array.ndim == 2 and array.shape[1] != h * w \
            or array.ndim not in (2, 3):
        raise ValueError(f"--images {p}: shape {array.shape}; the run's model takes N×{h}×{w} or N×{h * w}")
    x = torch.as_tensor(array.reshape(array.shape[0], h * w))
    finite = x[~torch.isnan(x)]
    if finite.numel() and (finite.min() < 0 or finite.max() > 1):
        raise ValueError(f"--images {p}: grey levels must lie in [0, 1], found {float(finite.min()):g} to "
                         f"{float(finite.max()):g} (divide 8-bit images by 255)")
    return x


def read_mask(spec: str, x: torch.Tensor, image_shape: tuple[int, int], seed: int) -> torch.Tensor:
    """The (N, H·W) 0/1 mask (1 = known) from a file or a mask process name, checked image by image."""
    h, w = image_shape
    p = Path(spec)
    if p.suffix in (".npy", ".png"):
        if not p.is_file():
            raise ValueError(f"--mask {p}: no such file")
        if p.suffix == ".npy":
            array = np.load(p).astype(np.float64)
        else:
            import matplotlib.image

            array = np.asarray(matplotlib.image.imread(p), dtype=np.float64)
            array = array[..., :3].mean(-1) if array.ndim == 3 else array
        if array.shape in ((h, w), (h * w,)):
            array = np.broadcast_to(array.reshape(1, h * w), (x.shape[0], h * w))
        elif array.shape in ((x.shape[0], h, w), (x.shape[0], h * w)):
            array = array.reshape(x.shape[0], h * w)
        else:
            raise ValueError(f"--mask {p}: shape {array.shape}; give {h}×{w} (one mask for all images) or "
                             f"{x.shape[0]}×{h}×{w} (one per image)")
        if not np.isin(array, (0.0, 1.0)).all():
            raise ValueError(f"--mask {p}: values must be 0 (hidden) or 1 (known)")
        mask = torch.as_tensor(np.ascontiguousarray(array))
    else:
        process = make_mask_process(spec, image_shape)
        mask = process.sample(torch.nan_to_num(x, nan=0.0), generator=torch.Generator().manual_seed(seed))
        mask = mask.to(torch.float64)
    hidden = (mask < 0.5).sum(-1)
    if (hidden == 0).any():
        raise ValueError(f"--mask {spec}: hides no pixel of image(s) {_first(hidden == 0)}: nothing to "
                         f"impute")
    if (hidden == mask.shape[1]).any():
        raise ValueError(f"--mask {spec}: hides every pixel of image(s) {_first(hidden == mask.shape[1])}; "
                         f"for images from nothing use python -m experiments.sample")
    if torch.isnan(x[mask > 0.5]).any():
        raise ValueError("--images: some known pixels (mask 1) are NaN; only hidden pixels may be NaN")
    return mask


def _first(flags: torch.Tensor, n: int = 5) -> list[int]:
    return flags.nonzero().flatten()[:n].tolist()


def impute(run: Run, x: torch.Tensor, mask: torch.Tensor, samples: int) -> torch.Tensor:
    """K imputations per image, (N, K, D): known pixels from x, hidden ones the model's probabilities."""
    module = run.module
    dev = next(module.parameters()).device
    xk = (torch.nan_to_num(x, nan=0.0) * mask).to(dev, torch.float32)  # the hidden values are never passed on
    m = mask.to(dev, torch.float32)
    draws = []
    for _ in range(samples):
        if isinstance(module, ImputationPolicy):
            draws.append(module.impute(xk, m)[-1])
        elif isinstance(module, VAE):
            draws.append(vae_impute(module, xk, m, num_steps=16, num_runs=1, fill=0.5).final_mean)
        else:
            raise ValueError(f"--run: {run.model_name} runs cannot impute here yet; trained imputers: "
                             f"gpsi-*, lstm-* and VAE runs")
    out = torch.stack(draws, 1).double().cpu()
    return mask[:, None] * torch.nan_to_num(x, nan=0.0)[:, None] + (1 - mask[:, None]) * out


def score(run: Run, x: torch.Tensor, mask: torch.Tensor, imputations: torch.Tensor, seed: int,
          bound_draws: int, iw_samples: int) -> dict[str, Any]:
    """The hidden pixels of complete images, scored on one fixed binarisation (see the module docstring)."""
    module = run.module
    dev = next(module.parameters()).device
    xb = fixed_binarize(x.float(), seed=seed).to(dev)
    m = mask.to(dev, torch.float32)
    hidden = (1 - mask).sum(-1).double()

    def summary(nll: torch.Tensor, kind: str, behind: str) -> dict[str, Any]:
        s = nll_summary(nll, hidden)
        return {"kind": kind, "behind": behind, "nll_per_image": s["nll"], "stderr": s["stderr"],
                "nll_per_hidden_pixel": s["nll_per_unit"], "num_images": s["num"]}

    out: dict[str, Any] = {"binarisation": f"one Bernoulli draw of the grey levels, seed {seed} "
                                           "(experiments.data.fixed_binarize)"}
    if isinstance(module, ImputationPolicy):
        s = score_bound_and_iwae(module.model, module.guide, (xb, m), bound_draws=bound_draws,
                                 iw_samples=iw_samples)
        out["bound"] = summary(s.bound, "upper bound on -log p(x_u | x_k) in expectation",
                               f"mean of {bound_draws} single-path bounds per image")
        out["iwae"] = {**summary(s.iwae, f"estimate (IWAE-{iw_samples})", f"K={iw_samples} guide roll-outs "
                                 "per image"),
                       **{k: v for k, v in s.estimate.summary().items() if k.startswith(("khat", "ess"))}}
    else:
        ce = bernoulli_nll(xb.double().cpu(), imputations.mean(1), 1 - mask)
        out["cross_entropy"] = summary(ce, "cross-entropy of the hidden pixels under the mean imputation "
                                       "(not a bound)", f"mean of {imputations.shape[1]} chains of 16 steps")
    return out


def save_grid(x: torch.Tensor, mask: torch.Tensor, imputations: torch.Tensor, mean: torch.Tensor,
              std: torch.Tensor, image_shape: tuple[int, int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = min(SHOWN_IMAGES, x.shape[0]), min(SHOWN_IMPUTATIONS, imputations.shape[1])
    cols = ["input", "mask"] + [f"imputation {i + 1}" for i in range(k)] + ["mean", "spread (2 sd)"]
    fig, axes = plt.subplots(n, len(cols), figsize=(len(cols) * 0.95, n * 1.0 + 0.5), squeeze=False)
    shown_input = mask * torch.nan_to_num(x, nan=0.0) + (1 - mask) * 0.5
    for i in range(n):
        row = [shown_input[i], mask[i], *imputations[i, :k], mean[i], (2 * std[i]).clamp(max=1)]
        for j, img in enumerate(row):
            ax = axes[i, j]
            ax.imshow(img.reshape(image_shape).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.axis("off")
            if i == 0:
                ax.set_title(cols[j], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.impute",
                                     description="Impute the hidden pixels of your own images with a trained "
                                                 "model; K imputations per image with their mean and spread.")
    parser.add_argument("--run", required=True, help="a finished run of a trained imputer (gpsi-*, lstm-* "
                        "imputation cell, or a VAE run)")
    parser.add_argument("--images", required=True, help=".npy (N×H×W or N×H·W, grey levels in [0, 1]) or a "
                        "directory of PNG files")
    parser.add_argument("--mask", required=True, help=".npy or PNG mask of the image size (1 = known, 0 = "
                        "hidden; one for all or one per image), or a mask name such as mar-14 or mcar-80")
    parser.add_argument("--samples", type=positive_int, default=8,
                        help="K, imputations per image, >= 1 (default 8)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the roll-outs, of a named mask and of the binarisation for scoring "
                        "(default 0)")
    parser.add_argument("--bound-draws", type=positive_int, default=10,
                        help="single-path bounds averaged per image when scoring, >= 1 (default 10)")
    parser.add_argument("--iw-samples", type=positive_int, default=500,
                        help="K of the IWAE estimate when scoring, >= 1 (default 500)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or "
                        "cuda:N (default auto)")
    parser.add_argument("--force", action="store_true", help="overwrite imputations already in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        held = [name for name in OUTPUTS if (out / name).exists()]
        if held and not args.force:
            raise FileExistsError(f"--out {out} already holds {', '.join(held)}; pass --force to overwrite")
        run = load_run(args.run, args.device)
        x = read_images(args.images, run.image_shape)
        mask = read_mask(args.mask, x, run.image_shape, args.seed)
        pyro.set_rng_seed(args.seed)
        imputations = impute(run, x, mask, args.samples)
        out.mkdir(parents=True, exist_ok=True)
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h, w = run.image_shape
    n, k = imputations.shape[:2]
    mean, std = imputations.mean(1), imputations.std(1, unbiased=False)
    np.save(out / "imputations.npy", imputations.reshape(n, k, h, w).float().numpy())
    np.save(out / "mean.npy", mean.reshape(n, h, w).float().numpy())
    np.save(out / "std.npy", std.reshape(n, h, w).float().numpy())
    save_grid(x, mask, imputations, mean, std, run.image_shape, out / "imputations.png",
              f"{run.model_name}: {k} imputations per image (Bernoulli probabilities at hidden pixels)")
    report: dict[str, Any] = {"run": args.run, "model": run.model_name, "images": args.images,
                              "mask": args.mask, "num_images": n, "samples": k, "seed": args.seed,
                              "hidden_fraction": float((1 - mask).mean())}
    if torch.isnan(x).any():
        report["scores"] = "not computed: the images have NaN at hidden pixels (the true values are unknown)"
    else:
        report["scores"] = score(run, x, mask, imputations, args.seed, args.bound_draws, args.iw_samples)
    write_json(out / "scores.json", report)
    (out / "scores.md").write_text(render(report))
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [f"# Imputations of {report['num_images']} images by {report['model']} ({report['run']})", "",
             f"Mask {report['mask']} ({100 * report['hidden_fraction']:.1f} % of pixels hidden), "
             f"{report['samples']} imputations per image, seed {report['seed']}.", ""]
    scores = report["scores"]
    if isinstance(scores, str):
        return "\n".join([*lines, f"Scores {scores}.", ""])
    rows = [[name, s["kind"].replace("|", "\\|"), f"{s['nll_per_image']:.2f} ± {s['stderr']:.2f}",
             f"{s['nll_per_hidden_pixel']:.4f}", s["behind"]]
            for name, s in scores.items() if isinstance(s, dict)]
    header = ["score", "kind", "NLL per image", "per hidden pixel", "behind it"]
    return "\n".join([*lines, f"Hidden pixels scored on binarised images: {scores['binarisation']}. Nats; ± "
                      "is the standard error over images.", "", markdown_table(header, rows), ""])


if __name__ == "__main__":
    sys.exit(main())
