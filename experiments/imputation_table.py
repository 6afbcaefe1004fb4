"""The whole imputation table: every method under every mask setting of a preset (the shape of Table 1 of
Bachman & Precup 2015, "Data generation as sequential decision making", Sec. 4), the refinement-steps sweep
of Fig. 2(c), and the roll-out figures of Fig. 3/8.

    python -m experiments.imputation_table --preset quick                 # digits, CPU minutes
    python -m experiments.imputation_table --preset cpu --out results/imputation-cpu
    python -m experiments.imputation_table --preset paper --device cuda

Each cell is one run of :mod:`experiments.imputation` in ``<out>/<mask>/<method>``; a cell whose
``result.json`` exists is read, not re-run, and an interrupted cell resumes from its checkpoint, so the
command can be repeated until the table is complete. Outputs in ``--out``: table.md (the tables, each with
its protocol, and the paper's MNIST numbers quoted apart), table.json (every cell's numbers and protocol),
sweep.png and sweep.json (bound and importance-weighted estimate against the number of steps), and
calibration.png (the reliability diagram of each method's per-pixel predicted probability of the hidden test
pixels, one panel per mask; its expected calibration error is a section of table.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from experiments import imputation
from experiments.common import positive_int, run_concurrently
from experiments.report import degenerate_cell, fmt_or_na, markdown_table, write_json, write_report
from experiments.runner import Experiment, RunContext
from inference import distributed
from inference.checkpoint import save_figure

EXPERIMENT = "imputation"
DEFAULT_OUT = "runs/imputation-table"

#: Table 1 of the paper, MNIST columns (grey levels in [0, 1] scored with a Bernoulli cross-entropy; the
#: caption says normalised per imputed pixel, the public code reports nats per image). Quoted, not compared.
PAPER_MNIST = {
    "lstm-add": {"mar-14": 170, "mar-16": 167},
    "lstm-jump": {"mar-14": 172, "mar-16": 169},
    "gpsi-add": {"mar-14": 177, "mar-16": 175},
    "gpsi-jump": {"mar-14": 183, "mar-16": 177},
    "vae-imp": {"mar-14": 374, "mar-16": 394},
}

LABELS = {
    "gpsi-add": "GPSI-add", "gpsi-jump": "GPSI-jump", "lstm-add": "LSTM-add", "lstm-jump": "LSTM-jump",
    "vae-imp": "VAE imputation", "tm-honest": "template matching, honest",
    "tm-oracular": "template matching, oracular", "miwae": "MIWAE",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--masks", nargs="+", default=None,
                        help="mask settings to run (default: the preset's table.masks), e.g. mar-14 mcar-80")
    parser.add_argument("--methods", nargs="+", default=None, choices=imputation.METHODS,
                        help="methods to run (default: the preset's table.methods)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the refinement-steps sweep (Fig. 2c)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; write the tables from the cells already in --out")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="cells run at once, one process each, >= 1 (default 1): they share the GPU, or "
                        "take the GPUs in turn where there are several (--device cuda), and split the CPU "
                        "threads; each cell resumes from its own checkpoint")


def run_cell(config: dict[str, Any], method: str, mask: str, out: Path, ctx: RunContext,
             run: bool) -> dict[str, Any] | None:
    """One cell of the table: read back when finished (unless --force), else run (resuming from its
    checkpoint) when ``run``."""
    path = out / "result.json"
    if path.is_file() and not ctx.args.force:
        return json.loads(path.read_text())
    if not run:
        return None
    out.mkdir(parents=True, exist_ok=True)
    resume = (out / "checkpoint.pt").is_file()
    return imputation.run(config, method, mask, out, ctx.device, resume, ctx.progress, ctx.data_dir,
                          ctx.command)


def sweep_cells(config: dict[str, Any], out: Path) -> list[tuple[dict[str, Any], str, str, Path, int]]:
    """Fig. 2(c)'s cells: (configuration, method, mask, directory, steps) for GPSI with each number of
    refinement steps under one mask setting."""
    s = config["table"]["sweep"]
    cells = []
    for update in s["updates"]:
        for steps in s["steps"]:
            cfg = {**config, "num_steps": steps, "train": {**config["train"], "epochs": s["epochs"]},
                   "eval": {**config["eval"], **{k: v for k, v in s["eval"].items() if v is not None}}}
            cells.append((cfg, f"gpsi-{update}", s["mask"], out / "sweep" / f"gpsi-{update}-T{steps}", steps))
    return cells


def sweep(config: dict[str, Any], out: Path, ctx: RunContext, run: bool) -> list[dict[str, Any]]:
    """Fig. 2(c): GPSI trained and scored with each number of refinement steps under one mask setting."""
    rows = []
    for cfg, method, mask, cell, steps in sweep_cells(config, out):
        r = run_cell(cfg, method, mask, cell, ctx, run)
        if r is not None:
            rows.append({"method": method, "steps": steps, "mask": mask, "bound": r["bound"],
                         "iw_estimate": r["iw_estimate"], "mse": r["mse"], "epochs": r["train"]["epochs"]})
    return rows


def _cell_process(config: dict[str, Any], method: str, mask: str, out: str, device: str, data_dir: str | None,
                  command: str | None) -> None:
    """One cell in a process of its own (``--jobs``): run, resuming from its checkpoint."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    imputation.run(config, method, mask, path, device, (path / "checkpoint.pt").is_file(), False, data_dir,
                   command)


def run_pending(config: dict[str, Any], masks: list[str], methods: list[str], ctx: RunContext) -> None:
    """``--jobs`` > 1: every cell without a result.json (table and sweep), ``jobs`` at a time, one process
    each (:func:`experiments.common.run_concurrently`)."""
    force = ctx.args.force
    cells = [(config, method, mask, ctx.out / mask / method) for mask in masks for method in methods]
    if not ctx.args.no_sweep:
        cells += [c[:4] for c in sweep_cells(config, ctx.out)]
    pending = [c for c in cells if force or not (c[3] / "result.json").is_file()]
    calls = [(f"{c[3].relative_to(ctx.out)}", _cell_process,
              {"config": c[0], "method": c[1], "mask": c[2], "out": str(c[3]), "data_dir": ctx.data_dir,
               "command": ctx.command}) for c in pending]
    run_concurrently(calls, ctx.args.jobs, ctx.device, ctx.progress)


def fmt(entry: dict[str, Any] | None, key: str = "nll_per_image", digits: int = 1) -> str:
    if entry is None:
        return "–"
    value = entry[key]
    err = entry.get(f"{key}_stderr")
    return f"{value:.{digits}f} ± {err:.{digits}f}" if err is not None and key == "nll_per_image" else \
        f"{value:.{digits}f}"


def khat_cell(r: dict[str, Any] | None) -> str:
    """PSIS health of a cell's importance estimate: "k-hat median / fraction > 0.7 / degenerate (ESS)".

    Degenerate: fraction of images whose PSIS tail has fewer than 5 distinct weights (or non-finite k-hat),
    with their mean ESS; never counted in "> 0.7". Cells written before that category existed show n/a.
    """
    if r is None or "iw_estimate" not in r:
        return "–"
    e = r["iw_estimate"]
    return (f"{fmt_or_na(e.get('khat_median'), '.2f')} / {fmt_or_na(e.get('khat_frac_gt_0.7'), '.2f')} / "
            f"{degenerate_cell(e)}")


Cells = dict[str, dict[str, dict[str, Any]]]  # mask -> method -> result.json


def calibration_summary(cells: Cells, masks: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """ECE per mask and method for table.json: ``{ece, mce, num_pixels}``, or None for a cell written before
    calibration was measured (absent cells are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for mask in masks:
        for m in methods:
            r = cells.get(mask, {}).get(m)
            if r is None:
                continue
            c = r.get("calibration")
            out.setdefault(mask, {})[m] = None if c is None else \
                {"ece": c["ece"], "mce": c["mce"], "num_pixels": c["num_pixels"]}
    return out


def ece_cell(r: dict[str, Any] | None) -> str:
    """A cell of the calibration table: "ECE (N px)", "not measured ..." for an older cell, "–" for none."""
    if r is None:
        return "–"
    c = r.get("calibration")
    return imputation.NOT_MEASURED if c is None else f"{c['ece']:.4f} ({c['num_pixels']:,} px)"


def calibration_lines(cells: Cells, masks: list[str], methods: list[str], figure: bool) -> list[str]:
    """The "Calibration" section of table.md: the ECE table, what each method's probability is, the figure."""
    measured = [r["calibration"] for per in cells.values() for r in per.values() if "calibration" in r]
    bins = measured[0]["num_bins"] if measured else imputation.CALIBRATION_BINS
    lines = [
        "## Calibration of the imputations (hidden test pixels; lower ECE is better)",
        "",
        "For every hidden pixel of every test image, the method's predicted probability that the pixel is 1 "
        "is set against the binarised test pixel the NLL scores (the fixed binarisation of the test set), "
        f"pooled over the test set in {bins} equal-width bins of the probability. ECE = Σ_b (n_b/N) "
        "|frequency of 1s_b − mean predicted_b| (Guo et al. 2017, Sec. 2); 0 is calibrated, up to sampling "
        "noise of about sqrt(f (1 − f) / n_b) per bin, so with few hidden pixels small differences mean "
        "nothing. ECE is not a proper score (predicting the base rate everywhere is calibrated): read it "
        "beside the NLL. In brackets: the hidden pixels behind each number.",
        "",
        markdown_table(["method", *masks],
                       [[LABELS[m], *[ece_cell(cells.get(mask, {}).get(m)) for mask in masks]]
                        for m in methods]),
        "",
    ]
    predicted = {}
    for m in methods:
        for mask in masks:
            c = cells.get(mask, {}).get(m, {}).get("calibration")
            if c is not None:
                predicted.setdefault(m, c["predicted"])
    if predicted:
        lines += ["The predicted probability of a hidden pixel, per method:", ""]
        lines += [f"- {LABELS[m]}: {text}." for m, text in predicted.items()]
        lines.append("")
    if figure:
        lines += ["Reliability diagrams (frequency of 1s against mean predicted probability per bin; the "
                  "diagonal is calibration; above it the method predicts too few 1s, below it too many; "
                  "marker area in proportion to the pixels in the bin):", "",
                  "![calibration](calibration.png)", ""]
    return lines


def plot_calibration(cells: Cells, masks: list[str], methods: list[str], path: Path) -> bool:
    """Reliability diagrams, one panel per mask and one line per method; False (and no file) if no cell was
    measured."""
    if not any("calibration" in r for per in cells.values() for r in per.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(masks), figsize=(4.4 * len(masks), 5.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, mask in zip(axes[0], masks, strict=True):
        ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="calibrated")
        drawn = 0
        for i, m in enumerate(methods):
            c = cells.get(mask, {}).get(m, {}).get("calibration")
            if c is None:
                continue
            pts = [(conf, freq, n) for conf, freq, n in
                   zip(c["bin_mean_prob"], c["bin_freq"], c["bin_count"], strict=True) if n]
            colour = colours(i % 10)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", lw=1.1, color=colour,
                    label=f"{LABELS[m]} (ECE {c['ece']:.3f})")
            # Marker area in proportion to the bin's share of the pixels: a far-off point with a tiny
            # marker is a nearly empty bin (sampling noise), not miscalibration.
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colour, zorder=3,
                       s=[4 + 150 * p[2] / c["num_pixels"] for p in pts])
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        pixels = {c["num_pixels"] for r in cells.get(mask, {}).values() if (c := r.get("calibration"))}
        npx = f"{pixels.pop():,} hidden px" if len(pixels) == 1 else "hidden px"
        ax.set_title(f"{mask} ({npx})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("mean predicted probability of a 1 (per bin)")
        ax.set_ylabel("observed frequency of 1s")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.suptitle("Reliability of the imputations, hidden test pixels (marker area: share of the pixels in "
                 "the bin)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def render(config: dict[str, Any], cells: Cells, masks: list[str], methods: list[str],
           sweep_rows: list[dict[str, Any]], out: Path, calibration_figure: bool = False) -> str:
    any_cell = next(r for per in cells.values() for r in per.values())
    p = any_cell["protocol"]
    d = p["data"]
    c = config
    head = ["method", *masks]

    def rows(pick) -> list[list[str]]:
        return [[LABELS[m], *[pick(cells.get(mask, {}).get(m)) for mask in masks]] for m in methods]

    def headline(r, key="nll_per_image", digits=1):
        if r is None:
            return "–"
        entry, kind = imputation.headline(r)
        return f"{fmt(entry, key, digits)} ({kind})"

    def orac(r):
        return "–" if r is None or "oracular_best_step" not in r else \
            f"{r['oracular_best_step']['nll_per_image']:.1f} (step {r['oracular_best_step']['step']})"

    iw = c["eval"]
    trained = [r for per in cells.values() for r in per.values() if "train" in r]
    updates = trained[0]["train"]["updates"] if trained else "–"
    lines = [
        f"# Imputation on {d['name']} — preset `{c['preset']}`",
        "",
        "## Protocol",
        "",
        f"- Data: {d['name']} ({d['source']}), split {d['splits']}; scored on the **test** split "
        f"({p['num_test_images']} images).",
        f"- Binarisation: {p['binarization']['description']}",
        "- Masks: the trained methods see a fresh mask from the setting's distribution for every minibatch; "
        f"the test masks are drawn once per setting with seed {imputation.TEST_MASK_SEED}, the same for "
        "every method.",
        f"- Training: {c['train']['epochs']} epochs ({updates} updates of batch "
        f"{c['train']['batch_size']} on Fashion-MNIST) with Adam lr {c['train']['lr']} decayed to "
        f"{c['train']['lr_final']}, global gradient-norm clip {c['train']['clip_norm']}; weights of the "
        "epoch "
        "with the best validation bound. GPSI: nets "
        f"{c['gpsi']['hidden']}, z {c['gpsi']['z_dim']}, {c['gpsi']['num_steps']} steps. LSTM: "
        f"{c['lstm']['lstm_dim']} units, z_0 {c['lstm']['z0_dim']}, z {c['lstm']['z_dim']}, "
        f"{c['lstm']['num_steps']} steps. MIWAE: z {c['miwae']['z_dim']}, nets {c['miwae']['hidden']}, "
        f"IWAE-{c['miwae']['train_particles']} on the known pixels. VAE imputation: the VAE of "
        f"`experiments.vae` ({c['vae'].get('checkpoint') or 'trained with preset ' + c['vae']['preset']}), "
        f"{iw['vae_runs']} runs of {iw['vae_steps']} reconstruct-and-clamp steps.",
        "- NLL: -log p(x_u | x_k) of the true missing values in nats; per image = summed over its missing "
        "pixels (± standard error over test images); per pixel = total NLL / total missing pixels.",
        f"- Kinds: *IWAE estimate* = importance-weighted estimate with K={iw['iw_samples']} guide roll-outs "
        "per "
        f"image on the first {iw['iw_limit'] or 'all'} test images (an estimate; a bound in expectation); "
        "*bound* = mean of "
        f"{iw['bound_draws']} single-sample path-wise KL bounds per image on all test images (the paper's "
        "reported kind); *exact* = template matching's exact NLL; *IS estimate* = MIWAE's self-normalised "
        f"importance ratio with K={iw['miwae_samples']}; *final step* = VAE imputation's expected NLL of the "
        "last step's imputations over runs (honest).",
        "",
        "## Imputation NLL, nats per image (lower is better)",
        "",
        markdown_table(head, rows(headline)),
        "",
        "## The same, nats per missing pixel",
        "",
        markdown_table(head, rows(lambda r: headline(r, "nll_per_pixel", 4))),
        "",
        "## Trained policies: the bound (mean of single-sample bounds, all test images), nats per image",
        "",
        markdown_table(head, [[LABELS[m], *[fmt(cells.get(mask, {}).get(m, {}).get("bound"))
                                          for mask in masks]] for m in methods if m in imputation.POLICIES]),
        "",
        "## VAE imputation: best step chosen on the test set (oracular; the kind the paper reported)",
        "",
        markdown_table(head, [[LABELS["vae-imp"],
                               *[orac(cells.get(mask, {}).get("vae-imp")) for mask in masks]]]),
        "",
        "## Mean squared error on the missing pixels (point imputation vs grey-level test image)",
        "",
        markdown_table(head, rows(lambda r: "–" if r is None else f"{r['mse']:.4f}")),
        "",
        *calibration_lines(cells, masks, methods, calibration_figure),
        "## Importance-sampling health of the policies' estimates (PSIS k-hat median / fraction > 0.7 / "
        "fraction degenerate (their mean ESS))",
        "",
        "Degenerate: the PSIS tail has fewer than 5 distinct weights (or k-hat is not finite), so k-hat says "
        "nothing; such images are not counted as unreliable (> 0.7); their mean ESS is of "
        f"K={iw['iw_samples']}. n/a: not recorded (cells written before the category existed).",
        "",
        markdown_table(head, [[LABELS[m], *[khat_cell(cells.get(mask, {}).get(m)) for mask in masks]]
                              for m in methods if m in imputation.POLICIES]),
        "",
        "## For reference only: the paper's Table 1 on MNIST (not comparable)",
        "",
        "Bachman & Precup (2015), Table 1, **MNIST** (grey levels scored with a Bernoulli cross-entropy, a "
        "different data set and scoring); the numbers as printed. They are quoted to show the paper's "
        "ordering, "
        "not to be set against the Fashion-MNIST numbers above.",
        "",
        markdown_table(["method (MNIST)", "MAR-14", "MAR-16"],
                       [[LABELS[m], v["mar-14"], v["mar-16"]] for m, v in PAPER_MNIST.items()]),
        "",
    ]
    if sweep_rows:
        lines += [
            f"## Refinement steps (Fig. 2c): GPSI under {sweep_rows[0]['mask']}, "
            f"{sweep_rows[0]['epochs']} epochs each",
            "",
            markdown_table(["method", "steps", "bound nats/image", "IWAE estimate nats/image", "MSE"],
                           [[r["method"], r["steps"], fmt(r["bound"]), fmt(r["iw_estimate"]),
                             f"{r['mse']:.4f}"]
                            for r in sweep_rows]),
            "",
            "![sweep](sweep.png)",
            "",
        ]
    figs = [(mask, m) for mask in masks for m in methods if (out / mask / m / "rollouts.png").is_file()]
    if figs:
        lines += ["## Roll-out figures (two roll-outs of p per start, every step, then the truth)", ""]
        lines += [f"- {LABELS[m]}, {mask}: [{mask}/{m}/rollouts.png]({mask}/{m}/rollouts.png)"
                  for mask, m in figs]
        lines.append("")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method in sorted({r["method"] for r in rows}):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rs]
        ax.plot(steps, [r["bound"]["nll_per_image"] for r in rs], "o-", label=f"{method} bound")
        iw = [r["iw_estimate"]["nll_per_image"] for r in rs]
        ax.plot(steps, iw, "s--", label=f"{method} IWAE estimate")
    ax.set_xlabel("refinement steps T")
    ax.set_ylabel("NLL of missing values, nats/image")
    ax.set_title(f"Refinement steps, {rows[0]['mask']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def run(config: dict[str, Any], ctx: RunContext) -> None:
    """Every cell of the table (finished ones read back), the sweep, the figures and the table page."""
    args, out = ctx.args, ctx.out
    masks = args.masks or config["table"]["masks"]
    methods = args.methods or config["table"]["methods"]
    run = not args.report_only
    if run and args.jobs > 1:
        if distributed.world_size() > 1:
            raise ValueError("--jobs runs cells in processes of their own: it cannot be combined with "
                             "torchrun (use one or the other)")
        run_pending(config, masks, methods, ctx)  # then the loop below reads every cell back
        args.force = False  # the cells just run are this table's, not old ones to redo
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for mask in masks:
        for method in methods:
            r = run_cell(config, method, mask, out / mask / method, ctx, run)
            if r is not None:
                cells.setdefault(mask, {})[method] = r
    if not cells:
        raise ValueError(f"no finished cells in {out}; run without --report-only first")
    sweep_rows = [] if args.no_sweep else sweep(config, out, ctx, run)
    if sweep_rows:
        write_json(out / "sweep.json", sweep_rows)
        plot_sweep(sweep_rows, out / "sweep.png")
    figure = plot_calibration(cells, masks, methods, out / "calibration.png")
    write_report(out, "table", {"masks": masks, "methods": methods, "cells": cells,
                                "calibration": calibration_summary(cells, masks, methods),
                                "sweep": sweep_rows, "paper_table1_mnist": PAPER_MNIST,
                                "torch": torch.__version__},
                 render(config, cells, masks, methods, sweep_rows, out, figure), config=config,
                 command=ctx.command)


def prepare(config: dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    # The table is resumable cell by cell: rerunning into its own directory continues it.
    # --force starts the table afresh: no finished cell is reused.
    table = Path(args.out or f"{DEFAULT_OUT}/{args.preset}") / "table.json"
    args.resume = args.resume or args.report_only or (table.is_file() and not args.force)


TABLE_EXPERIMENT = Experiment(
    name=EXPERIMENT, prog="python -m experiments.imputation_table", description=__doc__,
    default_out=DEFAULT_OUT, run=run, add_args=add_args, prepare=prepare,
    summary=(("table.md", "table.json"),),
)


def main(argv: list[str] | None = None) -> int:
    return TABLE_EXPERIMENT.main(argv)


if __name__ == "__main__":
    sys.exit(main())
