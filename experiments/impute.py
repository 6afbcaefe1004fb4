"""Apply a trained imputation model to your own images and masks.

    python -m experiments.impute --run RUN_DIR --images FILE --mask MASK --samples K --out DIR

``--run`` is a finished run of a method of Table 1 (Bachman & Precup 2015, Sec. 4) that needs no true values:

* ``gpsi-add``, ``gpsi-jump``, ``lstm-add``, ``lstm-jump`` (an imputation cell): each imputation is the final
  step σ(c_T) of one roll-out of the primary policy p;
* a VAE run (``python -m experiments.vae``; a ``vae-imp`` cell imputes with the VAE run its config names:
  pass that run): each imputation is the final step of one reconstruct-and-clamp chain of 16 steps (Sec. 9.2)
  whose hidden pixels start at the mean of the run's training images, as in the imputation experiment;
* ``miwae`` (an imputation cell; Mattei & Frellsen 2019): sampling importance resampling. L latents
  z_l ~ q(z | x_k, m) get the weights w_l = p(x_k | z_l) p(z_l) / q(z_l | x_k), with L =
  ``--importance-samples`` or by default the run's own number (its ``eval.miwae_samples``); K of them are
  resampled with replacement in proportion to w_l, and each imputation is σ(decoder(z)) of one resampled z;
* ``tm-honest`` (an imputation cell): no weights; the templates are the training images of the cell's data
  set (Fashion-MNIST from ``--data-dir``, digits from scikit-learn), and the one that best matches the known
  pixels is imputed. Its predictive is that one template read as Bernoulli means, so its K probability
  imputations are identical (``--draws`` gives K draws from it).

``tm-oracular`` is refused: it chooses the template by the hidden pixels' true values.

``--images`` is a ``.npy`` array of grey levels in [0, 1], shaped N×H×W or N×(H·W), or a directory of PNG
files (read in name order; colour images are averaged to grey). ``--mask`` is a ``.npy`` or PNG of the same
image size (1 = known, 0 = hidden; one H×W mask for all images, or one per image), or a mask process name
(``mar-14``: a 14×14 hidden square; ``mcar-80``: 80 % of pixels hidden at random), drawn with ``--seed``. The
models condition on the known pixels as given (grey levels read as Bernoulli means).

Writes into ``--out``:

* ``imputations.npy``: float32, N×K×H×W: K imputations per image. Known pixels equal the input; hidden pixels
  hold Bernoulli *probabilities* (of a pixel being on) as above, not binary draws, or with ``--draws`` one
  Bernoulli draw (0/1) of those probabilities per imputation (for MIWAE that is its multiple imputation
  x_u ~ p(x_u | z));
* ``mean.npy``, ``std.npy``: float32, N×H×W: the per-pixel mean and standard deviation over the K
  imputations (zero spread at known pixels);
* ``imputations.png``: per image (first 8), the input with hidden pixels grey, the mask, up to 8
  imputations, the mean and the spread (2·std, so 1 is the largest possible spread);
* ``scores.json`` and ``scores.md``: what the imputations are (``imputations``), and when the images are
  complete (no NaN) the hidden pixels scored as the experiments score test images. Each image is binarised
  by one Bernoulli draw of its grey levels with the test protocol's fixed seed
  (``experiments.data.fixed_binarize``, seed 0, whatever ``--seed``); the model conditions on the binarised
  known pixels and is scored on the binarised hidden pixels of that same draw (so the scores are not those of
  the grey-conditioned imputations in ``imputations.npy``). In nats per image and per hidden pixel:

  - a policy: the path-wise bound (mean of ``--bound-draws`` single-path bounds, an upper bound on
    −log p(x_u | x_k) in expectation) and the IWAE-``--iw-samples`` estimate with PSIS k-hat;
  - a VAE run: the expected NLL of the final step's imputations over K chains (an estimate, not a bound: the
    imputation experiment's honest final-step score);
  - MIWAE: the self-normalised importance estimate −[log Σ_l w_l p(x_u | z_l) − log Σ_l w_l] with L latents,
    a ratio of two unbiased importance sums: consistent, not a bound (O(1/L) bias of either sign);
  - tm-honest: the exact NLL of the hidden pixels under the matched training image.

  Input with NaN at hidden pixels is imputed but not scored.

Wrong sizes, values outside [0, 1], masks that are not 0/1, masks that hide no pixel or every pixel of an
image, and known pixels that are NaN are one-line errors naming the option, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from experiments.common import Parser, non_negative_int, positive_int
from experiments.data import FIXED_BINARIZATION_SEED, DataError, fixed_binarize, load_dataset
from experiments.report import markdown_table, write_json
from experiments.runs import Run, TemplateRun, load_imputer, vae_imputation
from inference.checkpoint import save_figure, write_text
from inference.scoring import nll_summary, score_bound_and_iwae
from ppl_models import MIWAE, VAE, ImputationPolicy, make_mask_process, miwae_impute, template_match
from ppl_models.miwae import miwae_importance_draws, miwae_proposal

SHOWN_IMAGES, SHOWN_IMPUTATIONS = 8, 8
OUTPUTS = ("imputations.npy", "mean.npy", "std.npy", "imputations.png", "scores.json", "scores.md")
VAE_STEPS = 16  # reconstruct-and-clamp steps: eval.vae_steps of the imputation experiment's presets
DEFAULT_IMPORTANCE_SAMPLES = 1000  # MIWAE's L when neither --importance-samples nor the run gives one
METHODS_HELP = ("gpsi-add, gpsi-jump, lstm-add, lstm-jump, miwae or tm-honest imputation cells, or VAE runs; "
                "tm-oracular, which needs the true values, is refused")


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
            raise ValueError(f"--mask {p}: shape {array.shape}; the run's images are {h}×{w}: give an "
                             f"{h}×{w} mask (one for all images) or {x.shape[0]}×{h}×{w} (one per image)")
        if not np.isin(array, (0.0, 1.0)).all():
            hint = " (divide an 8-bit mask by 255)" if np.nanmax(array) == 255 else ""
            raise ValueError(f"--mask {p}: values must be 0 (hidden) or 1 (known), found values from "
                             f"{np.nanmin(array):g} to {np.nanmax(array):g}{hint}")
        mask = torch.as_tensor(np.ascontiguousarray(array))
    else:
        try:
            process = make_mask_process(spec, image_shape)
        except ValueError as e:
            raise ValueError(f"--mask {spec}: not a .npy or .png file, nor a mask name: {e}") from None
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


@dataclass
class Imputer:
    """A loaded run with what its method needs besides weights, on one device."""

    run: Run | TemplateRun
    device: torch.device
    train_mean: torch.Tensor | None = None  # VAE: the training images' mean, the chains' start
    importance_samples: int | None = None  # MIWAE: L
    importance_from: str = ""
    about: dict[str, Any] = field(default_factory=dict)  # what the imputations are, for the JSON

    @property
    def method(self) -> str:
        module = getattr(self.run, "module", None)
        if isinstance(self.run, TemplateRun):
            return "tm-honest"
        if isinstance(module, ImputationPolicy):
            return "policy"
        if isinstance(module, VAE):
            return "vae"
        if isinstance(module, MIWAE):
            return "miwae"
        raise ValueError(f"--run: {self.run.model_name} runs cannot impute; {METHODS_HELP}")


def load(run_dir: str, device: str, data_dir: str | None, importance_samples: int | None,
         draws: bool) -> Imputer:
    """The run of ``--run`` with its method's extras (training mean, templates, L) and their description."""
    run = load_imputer(run_dir, device, data_dir)
    dev = run.templates.device if isinstance(run, TemplateRun) else next(run.module.parameters()).device
    imp = Imputer(run, dev)
    values = ("one Bernoulli draw (0/1) per imputation of the probabilities that 'method' describes"
              if draws else "Bernoulli probabilities (of a pixel being on), not draws")
    method = imp.method
    if method == "policy":
        how = "final step sigma(c_T) of one roll-out of the primary policy p per imputation"
    elif method == "vae":
        imp.train_mean = load_dataset(run.dataset, data_dir).train.mean(0).to(dev)
        how = (f"final step of one reconstruct-and-clamp chain of {VAE_STEPS} steps per imputation, hidden "
               f"pixels started at the mean of the {run.dataset} training images (as the imputation "
               "experiment's vae-imp)")
    elif method == "miwae":
        from_run = (run.config.get("eval") or {}).get("miwae_samples")
        imp.importance_samples = importance_samples or from_run or DEFAULT_IMPORTANCE_SAMPLES
        imp.importance_from = ("--importance-samples" if importance_samples else
                               "the run's eval.miwae_samples" if from_run else
                               f"default {DEFAULT_IMPORTANCE_SAMPLES} (the run records none)")
        how = (f"sampling importance resampling: {imp.importance_samples} latents z ~ q(z | x_k, m) per "
               "image weighted by p(x_k | z) p(z) / q(z | x_k), K resampled with replacement in proportion "
               "to the weights; one imputation is sigma(decoder(z)) of one resampled z")
    else:
        how = (f"the training image ({run.templates.shape[0]} of {run.dataset}) that best matches the known "
               "pixels (least cross-entropy), read as Bernoulli means: the same for all K")
    imp.about = {"values": "draws" if draws else "probabilities", "hidden_pixels": values, "method": how}
    if method == "miwae":
        imp.about.update(importance_samples=imp.importance_samples,
                         importance_samples_from=imp.importance_from)
    return imp


@torch.no_grad()
def miwae_resample(miwae: MIWAE, x: torch.Tensor, mask: torch.Tensor, samples: int, num_importance: int,
                   chunk_size: int = 50, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling importance resampling, MIWAE's multiple imputation (Mattei & Frellsen 2019): for each image,
    ``num_importance`` draws z_l ~ q(z | x_k, m) with
    log w_l = log p(x_k | z_l) + log p(z_l) − log q(z_l | x_k)
    (the weights of :func:`ppl_models.miwae.miwae_impute`), then ``samples`` of them resampled with
    replacement with probabilities w_l / Σ w. Returns the (B, K, D) Bernoulli probabilities σ(decoder(z)) of
    the resampled latents (at every pixel; the caller clamps the known ones) and the (B,) effective sample
    size (Σ w)² / Σ w² of the weights. Only the known pixels of ``x`` are read."""
    out, ess = [], []
    for start in range(0, x.shape[0], batch_size):
        xb, mb = x[start : start + batch_size], mask[start : start + batch_size]
        q = miwae_proposal(miwae, xb, mb)
        zs, log_ws = [], []
        for done in range(0, num_importance, chunk_size):
            z, _, log_w = miwae_importance_draws(miwae, q, xb, mb, min(chunk_size, num_importance - done))
            zs.append(z)
            log_ws.append(log_w)
        z, log_w = torch.cat(zs), torch.cat(log_ws)  # (L, B, Z), (L, B)
        w = torch.softmax(log_w.double(), dim=0)
        index = torch.multinomial(w.T, samples, replacement=True)  # (B, K)
        chosen = z.transpose(0, 1).gather(1, index[..., None].expand(-1, -1, z.shape[-1]))  # (B, K, Z)
        out.append(torch.sigmoid(miwae.decode(chosen)))
        ess.append(1 / (w**2).sum(0))
    return torch.cat(out), torch.cat(ess)


@torch.no_grad()
def impute(imp: Imputer, x: torch.Tensor, mask: torch.Tensor, samples: int,
           draws: bool = False) -> torch.Tensor:
    """K imputations per image, (N, K, D) float64 on the CPU: known pixels from x, hidden ones the method's
    Bernoulli probabilities (see the module docstring), or with ``draws`` one Bernoulli draw of them."""
    dev, method = imp.device, imp.method
    xk = (torch.nan_to_num(x, nan=0.0) * mask).to(dev, torch.float32)  # the hidden values are never passed on
    m = mask.to(dev, torch.float32)
    module = getattr(imp.run, "module", None)
    if method == "policy":
        probs = torch.stack([module.impute(xk, m)[-1] for _ in range(samples)], 1)
    elif method == "vae":
        probs = torch.stack([vae_imputation(module, xk, m, imp.train_mean, VAE_STEPS, 1).final_mean
                             for _ in range(samples)], 1)
    elif method == "miwae":
        probs, ess = miwae_resample(module, xk, m, samples, imp.importance_samples)
        imp.about["ess_mean"] = float(ess.mean())
        imp.about["ess_about"] = ("effective sample size (sum w)^2 / sum w^2 of the L importance weights, "
                                  "mean over images")
    else:
        tm = template_match(imp.run.templates, xk, m, mode="honest",
                            chunk_size=(imp.run.config.get("eval") or {}).get("tm_chunk", 4096))
        probs = tm.imputation[:, None].expand(-1, samples, -1)
        imp.about["template_index"] = tm.index.tolist()
    if draws:
        probs = torch.bernoulli(probs)
    out = probs.double().cpu()
    return mask[:, None] * torch.nan_to_num(x, nan=0.0)[:, None] + (1 - mask[:, None]) * out


def score(imp: Imputer, x: torch.Tensor, mask: torch.Tensor, samples: int, bound_draws: int,
          iw_samples: int) -> dict[str, Any]:
    """The hidden pixels of complete images, scored on one fixed binarisation (see the module docstring): the
    model conditions on the binarised known pixels and is scored on the binarised hidden ones."""
    dev, method = imp.device, imp.method
    module = getattr(imp.run, "module", None)
    xb = fixed_binarize(x.float(), seed=FIXED_BINARIZATION_SEED).to(dev)
    m = mask.to(dev, torch.float32)
    hidden = (1 - mask).sum(-1).double()

    def summary(nll: torch.Tensor, kind: str, behind: str) -> dict[str, Any]:
        s = nll_summary(nll, hidden)
        return {"kind": kind, "behind": behind, "nll_per_image": s["nll"], "stderr": s["stderr"],
                "nll_per_hidden_pixel": s["nll_per_unit"], "num_images": s["num"]}

    out: dict[str, Any] = {"binarisation": f"one Bernoulli draw of the grey levels, fixed seed "
                                           f"{FIXED_BINARIZATION_SEED} as the experiments' test images "
                                           "(experiments.data.fixed_binarize); known and hidden pixels from "
                                           "the same draw"}
    if method == "policy":
        s = score_bound_and_iwae(module.model, module.guide, (xb, m), bound_draws=bound_draws,
                                 iw_samples=iw_samples)
        out["bound"] = summary(s.bound, "upper bound on -log p(x_u | x_k) in expectation",
                               f"mean of {bound_draws} single-path bounds per image")
        out["iwae"] = {**summary(s.iwae, f"estimate (IWAE-{iw_samples})", f"K={iw_samples} guide roll-outs "
                                 "per image"),
                       **{k: v for k, v in s.estimate.summary().items() if k.startswith(("khat", "ess"))}}
    elif method == "vae":
        r = vae_imputation(module, xb, m, imp.train_mean, VAE_STEPS, samples)
        out["final_step"] = summary(r.final_nll, "estimate (expected NLL of final-step imputations; not a "
                                    "bound)", f"{samples} chains of {VAE_STEPS} steps")
    elif method == "miwae":
        L = imp.importance_samples
        r = miwae_impute(module, xb, m, num_samples=L)
        out["is_estimate"] = summary(-r.log_lik, "estimate (self-normalised importance ratio; consistent, "
                                     "not a bound)",
                                     f"L={L} encoder samples per image ({imp.importance_from})")
    else:
        tm = template_match(imp.run.templates, xb, m, mode="honest",
                            chunk_size=(imp.run.config.get("eval") or {}).get("tm_chunk", 4096))
        out["exact"] = summary(tm.nll, "exact NLL under the matched training image",
                               f"{imp.run.templates.shape[0]} training images as templates")
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
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.impute", description=(
        "Impute the hidden pixels of your own images with a trained imputation method of Table 1 "
        f"({METHODS_HELP}); K imputations per image with their mean and spread, and scores of the hidden "
        "pixels when the images are complete. Hidden pixels hold Bernoulli probabilities (policies: "
        "sigma(c_T) of one roll-out of p; VAE: final step of one reconstruct-and-clamp chain started at the "
        "training mean; MIWAE: sigma(decoder(z)) of one z drawn by sampling importance resampling; "
        "tm-honest: the matched training image, the same for all K), or with --draws one Bernoulli draw of "
        "them. Scores binarise each image by one Bernoulli draw with the test protocol's fixed seed "
        f"{FIXED_BINARIZATION_SEED}, known and hidden pixels alike."))
    parser.add_argument("--run", required=True, help="a finished run: a gpsi-add, gpsi-jump, lstm-add, "
                        "lstm-jump, miwae or tm-honest imputation cell, or a VAE run (tm-oracular is "
                        "refused: it needs the hidden pixels' true values)")
    parser.add_argument("--images", required=True, help=".npy (N×H×W or N×H·W, grey levels in [0, 1]) or a "
                        "directory of PNG files")
    parser.add_argument("--mask", required=True, help=".npy or PNG mask of the image size (1 = known, 0 = "
                        "hidden; one for all or one per image), or a mask name such as mar-14 or mcar-80")
    parser.add_argument("--samples", type=positive_int, default=8,
                        help="K, imputations per image, >= 1 (default 8)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--draws", action="store_true", help="hidden pixels as one Bernoulli draw (0/1) of "
                        "the method's probabilities per imputation, instead of the probabilities")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the imputations and of a named mask (default 0); the binarisation for "
                        f"scoring always uses the test protocol's seed {FIXED_BINARIZATION_SEED}")
    parser.add_argument("--importance-samples", type=positive_int, default=None,
                        help="MIWAE: L, latents drawn per image for resampling and for its score, >= 1 "
                        f"(default: the run's eval.miwae_samples, else {DEFAULT_IMPORTANCE_SAMPLES})")
    parser.add_argument("--bound-draws", type=positive_int, default=10,
                        help="policies: single-path bounds averaged per image when scoring, >= 1 "
                        "(default 10)")
    parser.add_argument("--iw-samples", type=positive_int, default=500,
                        help="policies: K of the IWAE estimate when scoring, >= 1 (default 500)")
    parser.add_argument("--data-dir", default=None, help="tm-honest and VAE runs on Fashion-MNIST: directory "
                        "of its IDX files (the templates; the training mean), default "
                        "$SEQGEN_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist; digits ship with "
                        "scikit-learn")
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
        imp = load(args.run, args.device, args.data_dir, args.importance_samples, args.draws)
        run = imp.run
        x = read_images(args.images, run.image_shape)
        mask = read_mask(args.mask, x, run.image_shape, args.seed)
        pyro.set_rng_seed(args.seed)
        imputations = impute(imp, x, mask, args.samples, args.draws)
        out.mkdir(parents=True, exist_ok=True)
    except (FileNotFoundError, FileExistsError, ValueError, OSError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h, w = run.image_shape
    n, k = imputations.shape[:2]
    mean, std = imputations.mean(1), imputations.std(1, unbiased=False)
    np.save(out / "imputations.npy", imputations.reshape(n, k, h, w).float().numpy())
    np.save(out / "mean.npy", mean.reshape(n, h, w).float().numpy())
    np.save(out / "std.npy", std.reshape(n, h, w).float().numpy())
    values = "Bernoulli draws" if args.draws else "Bernoulli probabilities"
    save_grid(x, mask, imputations, mean, std, run.image_shape, out / "imputations.png",
              f"{run.model_name}: {k} imputations per image ({values} at hidden pixels)")
    report: dict[str, Any] = {"run": args.run, "model": run.model_name, "dataset": run.dataset,
                              "images": args.images, "mask": args.mask, "num_images": n, "samples": k,
                              "seed": args.seed, "hidden_fraction": float((1 - mask).mean()),
                              "imputations": imp.about}
    if torch.isnan(x).any():
        report["scores"] = "not computed: the images have NaN at hidden pixels (the true values are unknown)"
    else:
        pyro.set_rng_seed(args.seed)
        report["scores"] = score(imp, x, mask, args.samples, args.bound_draws, args.iw_samples)
    write_json(out / "scores.json", report)
    write_text(out / "scores.md", render(report))
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [f"# Imputations of {report['num_images']} images by {report['model']} ({report['run']})", "",
             f"Mask {report['mask']} ({100 * report['hidden_fraction']:.1f} % of pixels hidden), "
             f"{report['samples']} imputations per image, seed {report['seed']}. Hidden pixels: "
             f"{report['imputations']['hidden_pixels']}; {report['imputations']['method']}.", ""]
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
