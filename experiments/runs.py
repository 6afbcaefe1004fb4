"""Trained runs as models a user can apply: :func:`load_run` returns a run's trained model/guide pair.

A run directory is what an experiment writes with ``--out``: its result file (``result.json`` for the
imputation and sequential-generation experiments, ``results.json`` for the VAE experiment), which records the
configuration that actually ran, and ``best.pt``, the weights of the best validation epoch. :func:`load_run`
reads the configuration, builds the registered model (:mod:`ppl_models.base`) with those sizes and loads the
weights (``best.pt``, or the file the result names in ``weights_file``: the variational-GSN experiment
evaluates each variant's last weights, ``final.pt``); nothing else of the experiment is needed, and no
data::

    from experiments.runs import load_run

    run = load_run("results/draw-cpu/extended-add")
    images = run.module.sample(16)                   # (16, 784) Bernoulli means σ(c_T)
    trace_model, trace_guide = run.module.model, run.module.guide   # the Pyro programs, trained

:func:`load_imputer` loads what ``python -m experiments.impute`` applies: every run :func:`load_run` loads,
and an honest template-matching cell (``tm-honest``), which has no weights: its model is the training images
of the data set the cell names (:class:`TemplateRun`). Oracular template matching (``tm-oracular``) is
refused: it chooses its template by the hidden pixels' true values, which a user's images do not have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from experiments.common import build_registered, resolve_device, section_sizes
from experiments.data import IMAGE_SHAPES, load_dataset
from inference.checkpoint import BEST_NAME, load_checkpoint
from ppl_models.base import ModelGuidePair
from ppl_models.vae import VAE, ImputationResult, vae_impute

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


@dataclass
class TemplateRun:
    """An honest template-matching cell (``tm-honest``): no weights; its templates are the training images of
    the cell's data set (grey levels, read as Bernoulli means, as the imputation experiment uses them)."""

    templates: torch.Tensor  # (N, H·W) float32, the training split of ``dataset``
    model_name: str  # "tm-honest"
    config: dict[str, Any]
    dataset: str
    image_shape: tuple[int, int]
    path: Path


ORACULAR_REFUSAL = ("oracular template matching (tm-oracular) chooses its template by the hidden pixels' "
                    "true values, so it cannot impute images whose hidden pixels are unknown; use a "
                    "tm-honest run, which matches on the known pixels")


def _model_of(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registered model name, constructor sizes) of a run from its result file."""
    config = result["config"]
    if result.get("experiment") == "gsn":  # one variant of the variational-GSN experiment per directory
        return "gsn-chain", {**config["model"], "num_steps": result["num_steps"],
                             "walkback": result["walkback"]}
    if result.get("experiment") == "diffusion":  # one form of the diffusion experiment per directory
        return f"diffusion-{result['form']}", result["model_sizes"]
    if result.get("experiment") == "walkback":  # one form of the walkback experiment per directory
        if result["form"] == "toy":
            raise ValueError("this directory holds the walkback experiment's 2-D toy, not images: build "
                             "VariationalWalkback(2, **model_sizes) and load its final.pt yourself")
        return "walkback", result["model_sizes"]
    if result.get("experiment") == "professor_forcing":  # one variant of the professor-forcing experiment
        if config["data"]["kind"] == "text":
            raise ValueError("this directory holds a character model of the professor-forcing experiment, "
                             "not an image model: build gru-chars with the corpus' alphabet size (its "
                             "results.json names it) and load its best.pt yourself")
        return "gru-pixels", {"hidden": config["model"]["hidden"]}
    if result.get("experiment") == "gcrl":  # the GC-RL generator (agent/) or its VAE baseline (vae/)
        return ("gcrl" if result["form"] == "gcrl" else "conv-vae"), result["model_sizes"]
    if result.get("experiment") == "vae":
        sizes = config.get("model", config)  # the sizes sat at the top level before the one preset schema
        return "vae", {"z_dim": sizes["z_dim"], "hidden": sizes["hidden"]}
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
        if method == "vae-imp":
            raise ValueError("an imputation run of method 'vae-imp' trains no model of its own: it imputes "
                             "with the VAE run of its config.vae (checkpoint "
                             f"{config.get('vae', {}).get('checkpoint')!r}); load that VAE run instead")
        if method == "tm-honest":
            raise ValueError("an imputation run of method 'tm-honest' trains no model of its own (its "
                             "templates are the training images): load it with load_imputer")
        raise ValueError(f"an imputation run of method {method!r} trains no model of its own; trained "
                         f"methods: gpsi-*, lstm-*, miwae")
    raise ValueError("the result file names no experiment, variant or method this library knows")


def _read_result(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"--run {path}: no such directory")
    found = [path / name for name in RESULT_FILES if (path / name).is_file()]
    if not found:
        raise FileNotFoundError(f"--run {path}: no {' or '.join(RESULT_FILES)}; is it a finished run's --out "
                                f"directory?")
    return json.loads(found[0].read_text())


def _image_shape(path: Path, dataset: str) -> tuple[int, int]:
    if dataset not in IMAGE_SHAPES:
        raise ValueError(f"--run {path}: unknown data set {dataset!r}; known: {sorted(IMAGE_SHAPES)}")
    return IMAGE_SHAPES[dataset]


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """The trained model/guide pair of ``run_dir`` on ``device`` (``"auto"``: CUDA when present), in eval
    mode, with the weights of its best validation epoch (``best.pt``) or those its result names."""
    path = Path(run_dir)
    result = _read_result(path)
    name, sizes = _model_of(result)
    weights = path / result.get("weights_file", BEST_NAME)  # a run evaluated at its last epoch names its file
    if not weights.is_file():
        raise FileNotFoundError(f"--run {path}: no {weights.name} (the trained weights); the run's results "
                                f"page names the command that makes it")
    dataset = result["config"]["dataset"]
    shape = _image_shape(path, dataset)
    down = result["config"].get("data", {}).get("downsample", 1) if name == "gru-pixels" else 1
    shape = (shape[0] // down, shape[1] // down)  # a pixel-sequence run may read block means
    module = build_registered(name, sizes, shape[0] * shape[1])
    module.load_state_dict(load_checkpoint(weights)["module"])
    module.to(resolve_device(device)).eval()
    return Run(module, name, result["config"], dataset, shape, path)


def load_imputer(run_dir: str | Path, device: str = "cpu", data_dir: str | None = None) -> Run | TemplateRun:
    """What ``python -m experiments.impute`` applies: :func:`load_run`'s trained pair, or for an honest
    template-matching cell a :class:`TemplateRun` holding the training images of its data set on ``device``
    (read with :func:`experiments.data.load_dataset`; ``data_dir`` only matters for Fashion-MNIST).
    ``tm-oracular`` is a ``ValueError`` saying why (:data:`ORACULAR_REFUSAL`)."""
    path = Path(run_dir)
    result = _read_result(path)
    method = result.get("method")
    if method == "tm-oracular":
        raise ValueError(f"--run {path}: {ORACULAR_REFUSAL}")
    if method != "tm-honest":
        return load_run(path, device)
    dataset = result["config"]["dataset"]
    shape = _image_shape(path, dataset)
    templates = load_dataset(dataset, data_dir).train.to(resolve_device(device))
    return TemplateRun(templates, "tm-honest", result["config"], dataset, shape, path)


def vae_imputation(vae: VAE, x: torch.Tensor, mask: torch.Tensor, train_mean: torch.Tensor, num_steps: int,
                   num_runs: int) -> ImputationResult:
    """VAE imputation as the imputation experiment's ``vae-imp`` cell does it: reconstruct-and-clamp
    (:func:`ppl_models.vae.vae_impute`) with the hidden pixels started at ``train_mean``, the mean of the
    training images (D,), not at 0.5."""
    return vae_impute(vae, x, mask, num_steps=num_steps, num_runs=num_runs, fill=train_mean)
