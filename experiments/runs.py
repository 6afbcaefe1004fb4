"""Trained runs as models a user can apply: :func:`load_run` returns a run's trained model/guide pair.

A run directory is what an experiment writes with ``--out``: its result file (``result.json`` for the
imputation and sequential-generation experiments, ``results.json`` for the VAE experiment), which records the
configuration that actually ran, and ``best.pt``, the weights of the best validation epoch. :func:`load_run`
reads the configuration, builds the registered model (:mod:`ppl_models.base`) with those sizes and loads the
weights; nothing else of the experiment is needed, and no data::

    from experiments.runs import load_run

    run = load_run("results/draw-cpu/extended-add")
    images = run.module.sample(16)                   # (16, 784) Bernoulli means σ(c_T)
    trace_model, trace_guide = run.module.model, run.module.guide   # the Pyro programs, trained
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.common import build_registered, resolve_device, section_sizes
from experiments.data import IMAGE_SHAPES
from inference.checkpoint import BEST_NAME, load_checkpoint
from ppl_models.base import ModelGuidePair

RESULT_FILES = ("result.json", "results.json")
_IMPUTATION_FAMILIES = ("gpsi", "lstm")


@dataclass
class Run:
    """A trained run: the model/guide pair with its weights, and what it was trained on."""

    module: ModelGuidePair
    model_name: str  # the registered name (ppl_models.base.model_names())
    config: dict[str, Any]  # the configuration that ran, as the run recorded it
    dataset: str
    image_shape: tuple[int, int]
    path: Path


def _model_of(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registered model name, constructor sizes) of a run from its result file."""
    config = result["config"]
    if result.get("experiment") == "vae":
        return "vae", {"z_dim": config["z_dim"], "hidden": config["hidden"]}
    if "variant" in result:  # the sequential-generation experiment, one variant per directory
        if result["variant"] == "vae":
            raise ValueError("this directory holds the VAE row of a generator table: its weights are "
                             "those of the VAE run it names in config.vae; load that run instead")
        return f"draw-{result['variant']}", section_sizes(config, "generator")
    if "method" in result:  # one imputation cell
        method = result["method"]
        family = method.split("-")[0]
        if family in _IMPUTATION_FAMILIES:
            return method, section_sizes(config, family)
        if method == "miwae":
            return "miwae", {k: config["miwae"][k] for k in ("z_dim", "hidden")}
        raise ValueError(f"an imputation run of method {method!r} trains no model of its own; trained "
                         f"methods: gpsi-*, lstm-*, miwae")
    raise ValueError("the result file names no experiment, variant or method this library knows")


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """The trained model/guide pair of ``run_dir`` on ``device`` (``"auto"``: CUDA when present), in eval
    mode, with the weights of its best validation epoch (``best.pt``)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--run {path}: no such directory")
    found = [path / name for name in RESULT_FILES if (path / name).is_file()]
    if not found:
        raise FileNotFoundError(f"--run {path}: no {' or '.join(RESULT_FILES)}; is it a finished run's --out "
                                f"directory?")
    result = json.loads(found[0].read_text())
    name, sizes = _model_of(result)
    weights = path / BEST_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"--run {path}: no {BEST_NAME} (the trained weights); the run's results page "
                                f"names the command that makes it")
    dataset = result["config"]["dataset"]
    if dataset not in IMAGE_SHAPES:
        raise ValueError(f"--run {path}: unknown data set {dataset!r}; known: {sorted(IMAGE_SHAPES)}")
    shape = IMAGE_SHAPES[dataset]
    module = build_registered(name, sizes, shape[0] * shape[1])
    module.load_state_dict(load_checkpoint(weights)["module"])
    module.to(resolve_device(device)).eval()
    return Run(module, name, result["config"], dataset, shape, path)
