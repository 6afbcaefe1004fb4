"""What every experiment shares: presets from JSON files, the common command-line options, and
result files (JSON for programs, a markdown table and PNG figures for people)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

from experiments.config import describe_schema, load_preset, raw_presets, schema_of
from experiments.data import Dataset
from experiments.report import jsonable, write_json
from inference.optim import ClippedAdam
from inference.train import ExtraTerm, Trainer, load_checkpoint
from inference.train import resolve_device as _resolve_device
from ppl_models.base import ModelGuidePair, build_model
from ppl_models.vae import VAE

#: Command-line options that are not configuration.
NOT_CONFIG = {"preset", "out", "data_dir", "device", "resume", "force", "no_progress", "variants", "masks",
              "methods", "no_sweep", "report_only", "method", "mask", "set", "redo_finetune", "text", "jobs",
              "validate", "compile", "step", "default_step"}

#: How the training step runs (``--step``; the environment variable ``SEQGEN_STEP`` carries it to
#: :func:`train_best`, in this process and in the processes of ``--jobs``).
STEPS = {
    "svi": "Pyro's SVI step with pyro.optim.ClippedAdam, one optimiser per parameter (the committed results "
           "ran with it; walkback's online objective needs it)",
    "fused": "the objective's differentiable_loss and one inference.optim.ClippedAdam over all parameters: "
             "the same update, bit for bit on a CPU where the loss is the objective alone (to float "
             "round-off where an experiment adds a term: GSN's guide function, professor forcing's "
             "discriminator); "
             "foreach kernels off the CPU, so a GPU step launches fewer kernels",
    "cuda-graph": "the fused step captured in CUDA graphs and replayed (inference.cuda_graph); CUDA only; "
                  "not for an online objective (walkback) or hooks (GSN's guide function, professor "
                  "forcing's discriminator), and a step that reads values back (Pyro's Trace_ELBO) is "
                  "refused by name before any capture",
}


def resolve_config(experiment: str, args: argparse.Namespace) -> dict[str, Any]:
    """The chosen preset, validated against the experiment's schema (:mod:`experiments.config`), with the
    shorthand options the user gave (not None) and then every ``--set KEY=VALUE`` applied, in that order,
    through one path. A shorthand sets the dotted key its schema's ``SHORTHANDS`` names."""
    schema = schema_of(experiment)
    overrides: list[tuple[str, str]] = []
    for key, value in vars(args).items():
        if value is None or key in NOT_CONFIG:
            continue
        flag = "--" + key.replace("_", "-")
        if key not in schema.SHORTHANDS:
            raise ValueError(f"{flag} sets no key of the {experiment} presets; use --set KEY=VALUE")
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        overrides.append((flag, f"{schema.SHORTHANDS[key]}={text}"))
    overrides += [("--set", assignment) for assignment in getattr(args, "set", None) or ()]
    config = load_preset(experiment, args.preset, overrides)
    config["preset"] = args.preset
    return config


class Parser(argparse.ArgumentParser):
    """The experiments' argument parser: a usage error is one line (``prog: error: ...``), exit status 2;
    ``--help`` shows the full usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, else a message naming the allowed range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be >= {minimum}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be a number > 0")
    return value


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def resolve_device(device: str) -> torch.device:
    """``--device``: ``"auto"`` (CUDA when present, else the CPU) or a device of this machine
    (:func:`inference.train.resolve_device`); an error names the flag."""
    try:
        return _resolve_device(device)
    except ValueError as e:
        raise ValueError(f"--device {device}: {e}") from None


def add_common_args(parser: argparse.ArgumentParser, experiment: str, default_out: str,
                    default_step: str = "fused") -> None:
    """Options every experiment has. Preset values are the defaults of the options left as None.
    ``default_step`` is the training step of a new run without ``--step`` (see :func:`resolve_step`)."""
    presets = raw_presets(experiment)
    parser.add_argument(
        "--preset", default="quick", choices=sorted(presets),
        help=f"configuration preset from experiments/presets/{experiment}.json (default quick): "
        + "; ".join(f"{k}: {v.get('about', '')}" for k, v in presets.items()),
    )
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help="set a preset key, dotted for nested sections (e.g. --set train.epochs=5 --set "
                        "model.hidden=[256,256]); typed and range-checked by the schema; may be repeated; "
                        "applied after the shorthand options. Keys: " + describe_schema(experiment))
    parser.add_argument("--out", default=None, help=f"output directory (default {default_out}/<preset>)")
    parser.add_argument(
        "--data-dir", default=None,
        help="directory with the Fashion-MNIST IDX .gz files (default: $SEQGEN_FASHION_MNIST_DIR, "
        "else /usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist)",
    )
    parser.add_argument("--validate", action="store_true",
                        help="Pyro's and torch.distributions' argument checks in the training step too (off "
                        "there by default: they change no number and cost time per step; always on in the "
                        "tests)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model's networks (MLPs, U-Nets) in the training step and "
                        "evaluation; the Pyro objective stays eager around them. Same numbers to float "
                        "round-off; for a GPU, where a step is bound by kernel launches (on a CPU it is no "
                        "faster). The first step pays the compile time. Recorded in the report")
    parser.add_argument("--step", default=None, choices=tuple(STEPS),
                        help=f"how each training step runs (default: {default_step} in a new --out; where "
                        "--out holds a run, as on --resume, the step that run recorded, svi for a run "
                        "recorded without one). "
                        + "; ".join(f"{k}: {v}" for k, v in STEPS.items())
                        + ". The update rule is the same; the "
                        "optimiser's state is not, so a resume keeps the run's. It applies to the stages "
                        "trained by the common rule (GC-RL's agent keeps its own Adam). Recorded as "
                        "train_step")
    parser.set_defaults(default_step=default_step)
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="random seed, >= 0 (seed; default: the preset's)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs, >= 1 (train.epochs; default: the preset's). On --resume, more "
                        "epochs than the run's are taken only with a constant learning rate (train.lr == "
                        "train.lr_final) by an experiment that retrains (the VAE): the extended run is then "
                        "the run made with the longer count from the start; with a decaying rate the decay "
                        "is spread over the planned updates, so a changed count is refused")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="Adam learning rate at the start, > 0 (train.lr; default: the preset's)")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, default=None,
                        help="training minibatch size, >= 1 (train.batch_size; default: the preset's)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint; refused if any setting differs")
    parser.add_argument("--force", action="store_true",
                        help="write into an --out that holds another run's results (they are overwritten)")
    parser.add_argument("--eval-limit", dest="eval_limit", type=non_negative_int, default=None,
                        help="score only the first N test images (0 = all), >= 0; for smoke runs (default: "
                        "the preset's)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


RUN_FILES = ("config.json", "result.json", "results.json", "table.json", "metrics.jsonl", "checkpoint.pt")
#: Keys that describe a run but do not change its numbers: a resume, and every stage's own check of a stored
#: configuration, may change them (``compiled_networks``, ``--compile``: the same numbers to float round-off).
_DESCRIPTIVE = ("about", "compiled_networks")


def previous_config(out: Path) -> tuple[dict[str, Any] | None, bool]:
    """The configuration of the run in ``out`` (flattened) and whether it is a legacy one: ``config.json``,
    else the ``config`` recorded in its result file (runs made before config.json existed)."""
    if (out / "config.json").is_file():
        return _flatten(json.loads((out / "config.json").read_text())), False
    for name in ("result.json", "results.json", "table.json"):
        path = out / name
        if path.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                return _flatten(json.loads(path.read_text())["config"]), True
    return None, False


def config_changes(out: Path, config: dict[str, Any], allowed: Sequence[str] = ()) -> list[str]:
    """The settings in which ``config`` differs from the run in ``out``, as "key: run X, now Y"; empty when
    they agree or ``out`` holds no run. ``allowed`` are key prefixes that may change. For a legacy run,
    keys the older code did not record are not compared."""
    before, legacy = previous_config(out)
    if before is None:
        return []
    return setting_differences(before, config, allowed, legacy)


def setting_differences(before: dict[str, Any], now: dict[str, Any], allowed: Sequence[str] = (),
                        legacy: bool = False) -> list[str]:
    """The settings in which configuration ``now`` differs from ``before`` (either may be nested or
    flattened), as "key: run X, now Y", except keys under the prefixes ``allowed``, the descriptive ones,
    and keys added to the schema later that hold the value the code used before (:data:`_ADDED_KEYS`).
    With ``legacy``, keys ``before`` lacks are not compared."""
    before = _flatten(json.loads(json.dumps(jsonable(before))))
    now = _flatten(json.loads(json.dumps(jsonable(now))))
    keys = set(before) if legacy else set(before) | set(now)

    def was(k: str) -> Any:  # a key added to the schema later had the value the code then used
        if k in before:
            return before[k]
        return _ADDED_KEYS.get(k, None if now.get(k, "<unset>") is None else "<unset>")

    return [f"{k}: run {was(k)!r}, now {now.get(k, '<unset>')!r}" for k in sorted(keys)
            if k not in _DESCRIPTIVE and not k.startswith(tuple(allowed)) and was(k) != now.get(k, "<unset>")]


#: Keys the schema gained after runs had been recorded without them, with the value the code used then
#: (an optional key absent from an older run and null now is the same setting too).
_ADDED_KEYS: dict[str, Any] = {"train.betas": [0.9, 0.98], "train_step": "svi"}


def out_path(args: argparse.Namespace, default_out: str) -> Path:
    """Where the run writes: ``--out``, else ``<default_out>/<preset>``."""
    return Path(args.out) if args.out else Path(default_out) / args.preset


def output_dir(args: argparse.Namespace, default_out: str, config: dict[str, Any] | None = None) -> Path:
    """The run's output directory, created and checked writable before any work. Without ``--resume`` or
    ``--force``, a directory holding another run's files is refused rather than overwritten; a run with
    the same configuration is the same run made again, and may. A lone config.json (a run that stopped
    before writing anything) holds no results."""
    out = out_path(args, default_out)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held == ["config.json"]:
        held = []
    same = config is not None and held and not config_changes(out, config)
    if held and not same and not (getattr(args, "resume", False) or getattr(args, "force", False)):
        raise ValueError(f"--out {out} holds another run's results ({', '.join(held)}); pass --resume to "
                         f"continue it, --force to overwrite it, or choose another --out")
    first_new = next((p for p in [*reversed(out.parents), out] if not p.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        if first_new is not None:
            _remove_empty_chain(out, first_new)
        raise ValueError(f"--out {out} is not writable: {e.strerror or e}") from None
    if first_new is not None:
        _CREATED[out.resolve()] = first_new.resolve()
    return out


_CREATED: dict[Path, Path] = {}  # an --out this process created -> the outermost directory it created


def _remove_empty_chain(out: Path, top: Path) -> None:
    """Remove ``out`` and its parents up to ``top``, as long as each is empty."""
    path = out.resolve()
    top = top.resolve()
    while True:
        try:
            path.rmdir()  # only succeeds for an empty directory
        except OSError:
            return
        if path == top or top not in path.parents:
            return
        path = path.parent


def abandon(out: Path) -> None:
    """After an error: remove ``out`` (and the parents created with it) if this process created it and wrote
    nothing in it but config.json and empty directories."""
    top = _CREATED.get(out.resolve())
    if top is None:
        return
    files = [p for p in out.rglob("*") if p.is_file()]
    if all(p == out / "config.json" for p in files):
        for p in files:
            p.unlink(missing_ok=True)
        for d in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _remove_empty_chain(d, d)
        _remove_empty_chain(out, top)


def resolve_step(args: argparse.Namespace, default_out: str) -> str:
    """The training step a run takes: ``--step`` where given; else, where ``--out`` already holds a run,
    the step that run recorded (``train_step``; svi for a run recorded before that key existed), because
    what continues there (``--resume``, a table's cells, which resume from their checkpoints, the same
    command made again) must keep the optimiser whose state it saved; else the experiment's default
    (``default_step``) for a new directory."""
    if getattr(args, "step", None) is not None:
        return args.step
    out = out_path(args, default_out)
    try:
        before, _ = previous_config(out)
    except (OSError, ValueError, AttributeError):
        before = None  # an unreadable record: the run's own checks say what is wrong with it
    if before is not None:
        recorded = before.get("train_step", _ADDED_KEYS["train_step"])
        if recorded in STEPS:
            return recorded
    return getattr(args, "default_step", "fused")


def run_experiment(args: argparse.Namespace, default_out: str, config: dict[str, Any],
                   work: Callable[[Path, str], Any], resumable: Sequence[str] = (),
                   more_epochs_retrain: bool = False) -> int:
    """The common tail of every experiment's ``main``: resolve ``--device``, check and create ``--out``,
    record (or, on ``--resume``, check) the configuration, then ``work(out, device)``. Errors a user can
    cause end with one line, exit status 2 and no directory left that this run created and did not use.

    ``resumable`` are key prefixes that ``--resume`` may change (e.g. ``finetune.`` for a stage that is
    redone); ``more_epochs_retrain`` says the experiment trains the extra epochs of a resumed run (see
    :func:`record_config`)."""
    from experiments.data import DataError
    from inference import distributed
    from inference.train import NonFiniteLossError

    out = None
    step = resolve_step(args, default_out)
    # Read by train_best and every Trainer of this run, in this process and in its --jobs cells.
    environment = {"SEQGEN_STEP": step,
                   "SEQGEN_VALIDATE": "1" if getattr(args, "validate", False) else None,
                   "SEQGEN_COMPILE": "1" if getattr(args, "compile", False) else None}
    before = {name: os.environ.get(name) for name in environment}
    os.environ.update({name: value for name, value in environment.items() if value is not None})
    try:
        config["train_step"] = step  # part of what ran, and of what a resume must match
        if getattr(args, "compile", False):
            config["compiled_networks"] = True  # part of what ran (the report states it); see _DESCRIPTIVE
        # Under torchrun: join the process group (this process's GPU is cuda:LOCAL_RANK).
        device = distributed.init_from_env(str(resolve_device(args.device)))
        if distributed.world_size() > 1:
            # Part of what ran (the report states it) and of what a resume must match.
            config["processes"] = distributed.world_size()
        # Rank 0 checks --out and records the configuration; the others take its verdict, so that all stop
        # alike on a refusal and none reads a config.json rank 0 has just written as another run's.
        verdict: tuple[str, str] | None = None
        if distributed.is_writer():
            try:
                out = output_dir(args, default_out, config)
                # --force starts afresh: the configuration is recorded without comparing it to the old run's.
                resume = args.resume and not getattr(args, "force", False)
                record_config(out, config, resume, resumable, more_epochs_retrain)
                verdict = ("ok", str(out))
            except ValueError as e:
                verdict = ("error", str(e))
        verdict = distributed.broadcast_object(verdict)
        if verdict[0] == "error":
            raise ValueError(verdict[1])
        out = Path(verdict[1])
        work(out, device)
    except (ValueError, FileNotFoundError, FileExistsError, DataError, NonFiniteLossError) as e:
        if out is not None:
            abandon(out)
        print(f"error: {e}", file=sys.stderr)
        distributed.shutdown(wait=False)
        return 2
    except BaseException:
        distributed.shutdown(wait=False)
        raise
    finally:
        for name, value in before.items():  # the run's settings end with it
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    distributed.shutdown()
    return 0


def run_concurrently(calls: Sequence[tuple[str, Callable[..., Any], dict[str, Any]]], jobs: int, device: str,
                     progress: bool = True) -> None:
    """Run independent calls ``(label, function, keyword arguments)`` ``jobs`` at a time, each in a fresh
    process (spawned: safe with CUDA). Each call also gets ``device=``: the given device, or on a machine
    with several GPUs and a CUDA device, the GPUs in turn (call i on GPU i mod count). The CPU threads are
    split between the processes. Every call runs to its end even when another fails; then a ``ValueError``
    names the failed calls and their errors. ``function`` must be importable (module level)."""
    import concurrent.futures as cf
    import multiprocessing

    import torch
    from tqdm.auto import tqdm

    if not calls:
        return
    devices = [device]
    if torch.device(device).type == "cuda" and torch.cuda.device_count() > 1:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failed = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(fn, **kwargs, device=devices[i % len(devices)]): label
                   for i, (label, fn, kwargs) in enumerate(calls)}
        for future in tqdm(cf.as_completed(futures), total=len(futures), desc=f"cells ({jobs} at a time)",
                           disable=not progress):
            try:
                future.result()
            except Exception as e:  # the others go on: each cell is resumable on its own
                failed.append(f"{futures[future]}: {type(e).__name__}: {e}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(calls)} cells failed (finished cells are kept; rerun to "
                         "resume the rest): " + "; ".join(failed))


def record_config(out: Path, config: dict[str, Any], resume: bool, resumable: Sequence[str] = (),
                  more_epochs_retrain: bool = False) -> None:
    """Write the configuration a run uses to ``out/config.json``; with ``resume``, refuse (naming every
    differing key) a configuration other than the one the run was started with (from config.json, or the
    result file of an older run). Reports are written from this configuration, so they state what ran.

    Changes allowed on resume: keys under the prefixes ``resumable``; and more epochs where the experiment
    retrains them (``more_epochs_retrain``) and the learning rate is constant (``lr == lr_final``), because
    then the extended run is exactly the run made with the longer count from the start. With a decaying
    rate the per-update decay is spread over the planned number of updates, so it is refused."""
    if resume:
        before, legacy = previous_config(out)
        now = _flatten(json.loads(json.dumps(jsonable(config))))
        extendable = ()
        if more_epochs_retrain and before is not None and _constant_lr(now) and _constant_lr(before):
            extendable = tuple(k for k in ("epochs", "train.epochs") if now.get(k, 0) > before.get(k, 0))
        changed = [] if before is None else setting_differences(before, config, (*resumable, *extendable),
                                                                legacy)
        if changed:
            raise ValueError(f"--resume refused: the run in {out} was made with other settings "
                             f"({'; '.join(changed)}). Resume with the same settings, or start a new run "
                             f"with another --out")
    write_json(out / "config.json", config)


def _constant_lr(flat: dict[str, Any]) -> bool:
    return any(f"{p}lr" in flat and flat.get(f"{p}lr") == flat.get(f"{p}lr_final") for p in ("", "train."))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def batched(fn: Callable[..., Any], *tensors: torch.Tensor, batch_size: int) -> list:
    """``fn`` applied to consecutive row blocks of ``tensors`` (indexed together); the list of its results."""
    return [fn(*(t[i : i + batch_size] for t in tensors)) for i in range(0, tensors[0].shape[0], batch_size)]


def train_best(module: torch.nn.Module, loss: Any, batch_nll: Callable[..., torch.Tensor],
               config: dict[str, Any], train_data: torch.Tensor, transform: Callable | None,
               valid: tuple[torch.Tensor, ...], out: Path, device: str, resume: bool,
               progress: bool, extras: Sequence[ExtraTerm] = (),
               evaluate_more: Callable[[int], dict[str, Any]] | None = None,
               use_best: bool = True) -> dict[str, Any]:
    """Train ``module``'s model/guide on ``loss`` (``transform`` makes each minibatch, e.g. dynamic
    binarisation and a fresh mask), score the validation tensors after every epoch with ``batch_nll(*rows)``
    (a block's summed NLL bound), and load the weights of the best epoch. ``config["train"]`` holds epochs,
    batch_size, lr, lr_final (per-step decay), clip_norm (global norm) and optional betas. Returns the epochs
    run, the evaluated epoch, its validation NLL bound per image, the number of updates and the per-epoch
    metrics (those of ``metrics.jsonl``, earlier epochs of a resumed run included). ``extras`` are
    :class:`inference.train.ExtraTerm` hooks (networks with their own optimisers, and optional generator
    terms), trained beside the model in this Pyro-optimiser mode as in any other. ``evaluate_more(epoch)``
    adds metrics of its own after each epoch (curves over training). With ``use_best=False`` the module keeps
    the last epoch's weights (a fixed number of updates, no model selection), and the evaluated epoch and its
    validation bound are the last epoch's.

    Gradient clipping, the one rule: the global L2 norm of the gradient of the batch-summed loss over all
    parameters the step updates is clipped to ``clip_norm`` (Trainer), never element-wise.

    The step runs as the experiment's ``--step`` says (:data:`STEPS`, carried by ``SEQGEN_STEP``; the
    experiments resolve it with :func:`resolve_step`): Pyro's SVI step with ``pyro.optim.ClippedAdam``
    (``svi``, what a direct call without ``SEQGEN_STEP`` takes), or the differentiable loss with one
    :class:`inference.optim.ClippedAdam` (``fused``), optionally captured in CUDA graphs (``cuda-graph``).
    The update rule is the same in all three."""
    t = config["train"]

    def evaluate(epoch: int) -> dict[str, float]:
        with torch.no_grad():
            total = sum(batched(batch_nll, *valid, batch_size=config["eval"]["batch_size"]))
        metrics = {"valid_bound": -float(total) / valid[0].shape[0]}  # maximised: minus the NLL bound
        if evaluate_more is not None:
            metrics.update(evaluate_more(epoch))
        return metrics

    steps = t["epochs"] * -(-train_data.shape[0] // t["batch_size"])
    lrd = (t["lr_final"] / t["lr"]) ** (1.0 / max(steps, 1))
    # Element-wise clamping off (ClippedAdam's clip_norm is a per-element clamp); the global norm of the
    # batch-summed loss's gradient is clipped by the Trainer instead.
    settings = {"lr": t["lr"], "lrd": lrd, "betas": tuple(t.get("betas", (0.9, 0.98))), "clip_norm": 1e12}
    step = os.environ.get("SEQGEN_STEP", "svi")
    if step not in STEPS:
        raise ValueError(f"SEQGEN_STEP={step!r} is no training step; choose one of {sorted(STEPS)}")
    if step != "svi" and callable(getattr(loss, "online_losses", None)):
        raise ValueError(f"--step {step}: {type(loss).__name__} updates online, one Pyro optimiser step per "
                         "term of a minibatch; it trains with --step svi only")
    optimizer = (pyro.optim.ClippedAdam(settings) if step == "svi"
                 else lambda params: ClippedAdam(params, **settings))
    trainer = Trainer(
        module.model, module.guide, module, loss, optimizer,
        train_data=train_data, batch_size=t["batch_size"], epochs=t["epochs"], seed=config["seed"],
        device=device, out_dir=out, transform=transform, evaluate=evaluate, progress=progress,
        clip_norm=t["clip_norm"], keep_best="valid_bound", extras=extras, cuda_graph=step == "cuda-graph",
    )
    metrics = trainer.fit(resume=resume)
    if use_best:
        best = trainer.load_best()
    else:  # the last epoch's weights, which the module holds
        best = {"epoch": len(metrics), "value": metrics[-1]["valid_bound"]}
    module.eval()
    return {"epochs": len(metrics), "evaluated_epoch": best["epoch"], "valid_nll": -best["value"],
            "updates": trainer.step, "metrics": metrics}

def write_form_run(out: Path, experiment: str, form: str, config: dict[str, Any], sizes: Mapping[str, Any],
                   module: torch.nn.Module, result: dict[str, Any], weights: str = "final.pt") -> None:
    """One form of a multi-form experiment (diffusion, walkback) in ``out``: its evaluated weights and a
    result.json that :func:`experiments.runs.load_run` reads (the registered model's sizes, the weights
    file)."""
    from inference.checkpoint import save_checkpoint

    save_checkpoint({"module": module.state_dict()}, out / weights)
    write_json(out / "result.json", {"experiment": experiment, "form": form, "config": config,
                                     "model_sizes": dict(sizes), "weights_file": weights, "results": result})

# ------------------------------------------------------------------------------------------- models


def build_registered(name: str, sizes: Mapping[str, Any], x_dim: int, **extra: Any) -> ModelGuidePair:
    """The model registered as ``name`` (:func:`ppl_models.base.build_model`), sized by a preset section
    (JSON lists become tuples), for data of dimension ``x_dim``; ``extra`` are further constructor
    arguments such as ``init_mean``."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()}
    return build_model(name, x_dim=x_dim, **kwargs, **extra)


def section_sizes(config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """A preset's model-size section, with a top-level ``num_steps`` (the Fig. 2(c) sweep sets one) in
    place of the section's."""
    sizes = dict(config[section])
    if config.get("num_steps"):
        sizes["num_steps"] = config["num_steps"]
    return sizes


def build_imputer(method: str, config: dict[str, Any], x_dim: int, init_mean: torch.Tensor) -> ModelGuidePair:
    """An imputation policy (``gpsi-add``, ``lstm-jump``, ...) sized by the preset's section of its family
    (``gpsi`` or ``lstm``, see :func:`section_sizes`)."""
    return build_registered(method, section_sizes(config, method.split("-")[0]), x_dim, init_mean=init_mean)


def load_vae(config: dict[str, Any], data: Dataset, out: Path, device: str, progress: bool,
             data_dir: str | None) -> VAE:
    """The VAE of experiments.vae: from ``vae.checkpoint`` (a best.pt) if it exists, else trained here with
    the VAE experiment's own code and preset ``vae.preset``."""
    vc = config["vae"]
    path = Path(vc.get("checkpoint") or "")
    if not path.is_file():
        from experiments import vae as vae_experiment

        vae_config = {**load_preset(vae_experiment.EXPERIMENT, vc["preset"]), "preset": vc["preset"]}
        (out / "vae").mkdir(parents=True, exist_ok=True)
        vae_experiment.train_and_score(vae_config, out / "vae", device, resume=False, progress=progress,
                                       data_dir=data_dir)
        path = out / "vae" / "best.pt"
    state = load_checkpoint(path)["module"]
    z_dim = state["decoder.0.weight"].shape[1]
    enc = [w for k, w in state.items() if k.startswith("encoder.") and k.endswith("weight")]
    hidden = tuple(w.shape[0] for w in enc[:-1])
    vae = VAE(data.train.shape[1], z_dim, hidden).to(device)
    vae.load_state_dict(state)
    vae.eval()
    return vae
