"""The one report writer: every experiment's results as a file a program reads (JSON), a page a person reads
(markdown) and figures (PNG), each written atomically, each page ending with the configuration that ran and
the command that reproduces it.

:func:`write_report` writes ``<stem>.json`` and ``<stem>.md``; :func:`markdown_table`, :func:`fmt_or_na` and
:func:`degenerate_cell` format numbers for the pages; :func:`save_image_grid` and :func:`save_curves` draw
the figures.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from inference.checkpoint import atomic_write, save_figure


def write_report(out: Path, stem: str, results: dict[str, Any], markdown: str, *,
                 config: Mapping[str, Any] | None = None, command: str | None = None) -> None:
    """Write ``out/<stem>.json`` (``results``, with ``config`` and ``command`` added when given) and
    ``out/<stem>.md`` (``markdown``, then a section with the reproduction command and the configuration
    that ran), both atomically."""
    results = dict(results)
    if config is not None:
        results.setdefault("config", dict(config))
    if command is not None:
        results["command"] = command
    write_json(out / f"{stem}.json", results)
    page = markdown.rstrip("\n") + "\n"
    if command is not None or config is not None:
        page += "\n## Configuration that ran\n\n"
        if command is not None:
            page += f"Reproduce: `{command}`\n\n"
        if config is not None:
            page += "```json\n" + json.dumps(jsonable(config), indent=1) + "\n```\n"
    atomic_write(out / f"{stem}.md", lambda f: f.write(page), binary=False)


#: Options that only steer how an existing run directory is treated: not part of what a run is.
_STEERING = ("--resume", "--force", "--no-progress", "--report-only")


def reproduce_command(module: str, argv: Sequence[str], out: Path, device: str,
                      step: str | None = None) -> str:
    """The command line that reruns a run: ``python -m <module>`` with the options it was given, its
    resolved device, output directory and (where given) training step pinned, and the options that only
    steer how an existing run directory is treated left out (``--resume``, ``--force``, ``--no-progress``,
    ``--report-only``): into an empty ``--out`` it makes the whole run, with the step it trained with even
    where that was not the default's."""
    pinned = {"--device", "--out"} | ({"--step"} if step is not None else set())
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in pinned:
            skip = True
            continue
        if a.startswith(tuple(f"{p}=" for p in pinned)) or a in _STEERING:
            continue
        args.append(a)
    return " ".join(["python", "-m", module, *map(shlex.quote, args), "--out", shlex.quote(str(out)),
                     "--device", device, *(["--step", step] if step is not None else [])])


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors and arrays as lists, non-finite floats as strings: what JSON can hold."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return jsonable(obj.tolist())
    if hasattr(obj, "tolist"):  # numpy
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (tensors and arrays become lists)."""
    text = json.dumps(jsonable(obj), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text), binary=False)


def fmt_or_na(value: Any, spec: str) -> str:
    """``format(value, spec)`` for a finite number; "n/a" for a missing key (None), nan or inf (JSON keeps
    those as strings) or anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "n/a"


#: The k-hat summary keys an experiment keeps beside its estimate (see inference.diagnostics.khat_summary).
KHAT_KEYS = ("khat_median", "khat_frac_gt_0.7", "khat_frac_degenerate", "ess_mean_degenerate")


def degenerate_cell(entry: Mapping[str, Any], *, percent: bool = False) -> str:
    """The degenerate PSIS category of an importance estimate as a table cell: "<fraction> (ESS <mean>)".

    Points whose PSIS tail has fewer than 5 distinct values (or non-finite k-hat) are degenerate: k-hat says
    nothing there, and their mean ESS shows whether the weights are good (≈ K: near-constant weights) or
    not. The fraction is a percentage with ``percent``. Results written before the category existed have no
    such keys: "n/a".
    """
    frac = entry.get("khat_frac_degenerate")
    cell = fmt_or_na(100 * frac if percent and isinstance(frac, (int, float)) else frac,
                     ".0f" if percent else ".2f")
    if cell == "n/a":
        return cell
    cell += " %" if percent else ""
    ess = fmt_or_na(entry.get("ess_mean_degenerate"), ".0f")
    return cell if ess == "n/a" else f"{cell} (ESS {ess})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_image_grid(images: torch.Tensor, image_shape: tuple[int, int], path: str | os.PathLike,
                    ncol: int = 8, title: str | None = None) -> None:
    """Save rows of flattened grey images in [0, 1] as a PNG grid (the title wrapped to the grid's width)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().cpu().reshape(-1, *image_shape)
    n = images.shape[0]
    nrow = math.ceil(n / ncol)
    # about 13 characters of a 9-point title per 0.9-inch column
    title = textwrap.fill(title, width=max(30, ncol * 13)) if title else None
    head = 0.2 * (title.count("\n") + 2) if title else 0  # 0.4 inch for one line, as before
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * 0.9, nrow * 0.9 + head))
    for i, ax in enumerate(axes.flat if hasattr(axes, "flat") else [axes]):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def save_inpainting_grid(x: torch.Tensor, mask: torch.Tensor, filled: torch.Tensor,
                         image_shape: tuple[int, int], path: str | os.PathLike, title: str) -> None:
    """Two inpainted images per row, each as original | known pixels (missing ones grey) | imputed."""
    grid = torch.stack([x, mask * x + (1 - mask) * 0.5, filled], 1).clamp(0, 1).reshape(-1, x.shape[1])
    save_image_grid(grid, image_shape, path, ncol=6, title=title)


def save_curves(metrics: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | os.PathLike,
                ylabel: str = "nats per image", title: str | None = None,
                secondary: Sequence[str] = (), secondary_label: str = "") -> None:
    """Plot per-epoch metrics (e.g. train loss and validation bound) to a PNG; ``secondary`` keys go on a
    right-hand axis of their own (a quantity on another scale, e.g. a loss that is not a bound)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    axes = [(ax, keys)]
    if secondary:
        right = ax.twinx()
        right.set_ylabel(secondary_label)
        axes.append((right, secondary))
    n = 0
    for axis, group in axes:
        for key in group:
            pts = [(m["epoch"], m[key]) for m in metrics if key in m and m[key] is not None]
            if pts:
                axis.plot(*zip(*pts, strict=True), label=key, color=f"C{n}")
            n += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(textwrap.fill(title, 70), fontsize=9)
    handles = [h for axis, _ in axes for h in axis.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles])
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


