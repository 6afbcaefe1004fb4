"""Train the FD-classifier of a data set: the small CNN (:class:`inference.fd_classifier.FDClassifier`) whose
penultimate features our tables measure the Fréchet distance in ("FD-classifier", never "FID"; see
:mod:`inference.fd_classifier`) and whose predictions give the mode-coverage entropy.

    python -m experiments.train_fd_classifier --dataset digits           # seconds; into runs/fd_classifier/
    python -m experiments.train_fd_classifier --dataset fashion-mnist    # about 15 minutes on 2 CPU cores
    python -m experiments.train_fd_classifier --dataset digits --install # replace the committed weights

Protocol: grey-level images in [0, 1] (not binarised); trained on the train split only with Adam
(cross-entropy, dropout 0.5, minibatches reshuffled every epoch); the kept epoch is the one with the highest
validation accuracy (the earliest on a tie); test accuracy is measured once, on that epoch. Deterministic
given the seed and the number of threads.

By default the weights and the report go to ``runs/fd_classifier/<dataset>/`` (``--out DIR``: to DIR), so
that a trial never touches the committed classifier. ``--install`` writes them where the library reads
them: the weights to ``inference/fd_weights/<dataset>.pt`` (the committed file that
:func:`inference.fd_classifier.load_fd_classifier` checks against its recorded sha256) and the report to
``results/fd_classifier/<dataset>/report.{json,md}``. The sha256 of the weights file is printed and written
in the report: after ``--install``, paste it, with the accuracies, into ``CLASSIFIERS`` in
``inference/fd_classifier.py`` (until then loading refuses the new file); every FD-classifier value computed
before is then on another scale.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experiments.common import Parser, non_negative_int, positive_float, positive_int, resolve_device
from experiments.data import DATASET_NAMES, DataError, Dataset, load_dataset
from experiments.report import markdown_table, write_report
from inference.checkpoint import atomic_write
from inference.fd_classifier import (
    CLASSIFIERS,
    FD_WEIGHTS_DIR,
    WEIGHTS_FORMAT,
    FDClassifier,
    classifier_predictions,
    file_sha256,
)

MODULE = "experiments.train_fd_classifier"
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results" / "fd_classifier"
#: epochs when --epochs is not given (Fashion-MNIST: the validation accuracy was still rising slowly at 8,
#: 92.3 %; the committed classifier is the 8th epoch)
DEFAULT_EPOCHS = {"fashion-mnist": 8, "digits": 40}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=f"python -m {MODULE}",
        description="Train the FD-classifier (a small CNN whose 128-d penultimate features are used for the "
        "Fréchet distance between image sets, and whose predicted classes give the mode-coverage entropy) on "
        "the train split of a data set; keep the epoch with the best validation accuracy; report valid and "
        "test accuracy and the sha256 of the weights file.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES,
                        help="data set to train on: fashion-mnist (28x28) or digits (scikit-learn, 8x8)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="passes over the train split, >= 1 (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()) + ")")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="random seed for the initial weights, minibatch order and dropout, >= 0 "
                        "(default 0)")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, default=128,
                        help="training minibatch size, >= 1 (default 128)")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help="Adam learning rate, > 0 (default 0.001)")
    parser.add_argument("--out", default=None,
                        help="directory for the weights (<dataset>.pt) and the report (report.json, "
                        "report.md); default runs/fd_classifier/<dataset>/")
    parser.add_argument("--install", action="store_true",
                        help="replace the committed classifier: the weights to inference/fd_weights/"
                        "<dataset>.pt (atomically) and the report to results/fd_classifier/<dataset>/; then "
                        "paste the printed sha256 into inference/fd_classifier.CLASSIFIERS")
    parser.add_argument("--data-dir", dest="data_dir", default=None,
                        help="directory with the Fashion-MNIST IDX .gz files (default: "
                        "$SEQGEN_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist from the Debian "
                        "package dataset-fashion-mnist)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:N or auto (CUDA when present); default cpu. The committed "
                        "weights were trained on the CPU; another device gives other (equally good) weights")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (torch.set_num_threads), >= 1 (default: torch's current "
                        "count, i.e. $OMP_NUM_THREADS or the number of cores); recorded, since the float "
                        "summation order and so the exact weights may depend on it")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no tqdm progress bar")
    return parser


def _accuracy(model: FDClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((classifier_predictions(model, images) == labels.cpu()).double().mean())


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (for reports), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def train(data: Dataset, epochs: int, seed: int, batch_size: int, lr: float, device: str,
          progress: bool) -> tuple[FDClassifier, list[dict[str, Any]], int]:
    """Train an FDClassifier on ``data.train``; returns the model at the epoch with the best validation
    accuracy (in eval mode, on the CPU), the per-epoch history and that epoch (1-based)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = FDClassifier(data.image_shape).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    x, y = data.train, data.train_labels
    n = x.shape[0]
    history: list[dict[str, Any]] = []
    best_state, best_epoch, best_valid = None, 0, -1.0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=order)
        loss_sum, correct = 0.0, 0
        bar = tqdm(range(0, n, batch_size), desc=f"{data.name} epoch {epoch}/{epochs}", unit="batch",
                   disable=not progress, leave=False)
        start = time.perf_counter()
        for i in bar:
            idx = perm[i : i + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            value = loss.item()
            loss_sum += value * len(idx)
            correct += int((logits.argmax(-1) == yb).sum())
            bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        valid_acc = _accuracy(model, data.valid, data.valid_labels)
        row = {"epoch": epoch, "train_loss": loss_sum / n, "train_accuracy": correct / n,
               "valid_accuracy": valid_acc, "seconds": time.perf_counter() - start}
        history.append(row)
        print(f"epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f}, train accuracy "
              f"{row['train_accuracy']:.4f} (dropout on), valid accuracy {valid_acc:.4f}, "
              f"{row['seconds']:.1f} s", flush=True)
        if valid_acc > best_valid:
            best_state, best_epoch, best_valid = copy.deepcopy(model.state_dict()), epoch, valid_acc
    model.load_state_dict(best_state)
    return model.cpu().eval(), history, best_epoch


def _command(args: argparse.Namespace, epochs: int, device: str) -> str:
    parts = ["python", "-m", MODULE, "--dataset", args.dataset, "--epochs", str(epochs), "--seed",
             str(args.seed), "--batch-size", str(args.batch_size), "--lr", repr(args.lr), "--threads",
             str(torch.get_num_threads()), "--device", device]
    if args.out is not None:
        parts += ["--out", args.out]
    if args.install:
        parts += ["--install"]
    if args.data_dir is not None:
        parts += ["--data-dir", args.data_dir]
    return " ".join(map(shlex.quote, parts))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, write the weights and the report; returns the report's results."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.dataset]
    if args.install and args.out is not None:
        raise ValueError("--install writes to the committed locations; it cannot be combined with --out")
    if args.install:
        weights_path, report_dir = FD_WEIGHTS_DIR / CLASSIFIERS[args.dataset].file, RESULTS_DIR / args.dataset
    else:
        report_dir = Path(args.out) if args.out is not None else Path("runs") / "fd_classifier" / args.dataset
        weights_path = report_dir / f"{args.dataset}.pt"
    data = load_dataset(args.dataset, args.data_dir)
    command = _command(args, epochs, device)
    print(f"training the FD-classifier of {data.name} on {data.train.shape[0]} train images "
          f"({epochs} epochs, seed {args.seed}, {torch.get_num_threads()} threads, {device})", flush=True)

    start = time.perf_counter()
    model, history, best_epoch = train(data, epochs, args.seed, args.batch_size, args.lr, device,
                                       args.progress)
    train_seconds = time.perf_counter() - start
    valid_acc = _accuracy(model, data.valid, data.valid_labels)
    test_acc = _accuracy(model, data.test, data.test_labels)

    state = {"format": WEIGHTS_FORMAT, "dataset": data.name, "image_shape": tuple(data.image_shape),
             "num_classes": model.num_classes,
             "state_dict": {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(weights_path, lambda f: torch.save(state, f))
    sha = file_sha256(weights_path)
    size = weights_path.stat().st_size
    n_params = sum(p.numel() for p in model.parameters())

    results = {
        "classifier": f"FD-classifier: seqgen CNN, {data.name}",
        "dataset": data.name,
        "source": data.source,
        "split": data.split_protocol,
        "sizes": {"train": data.train.shape[0], "valid": data.valid.shape[0], "test": data.test.shape[0]},
        "trained_on": "train split only (grey levels in [0, 1], not binarised)",
        "epochs": epochs,
        "best_epoch": best_epoch,
        "selection": "epoch with the highest validation accuracy (earliest on a tie)",
        "valid_accuracy": valid_acc,
        "test_accuracy": test_acc,
        "weights": _display(weights_path),
        "weights_sha256": sha,
        "weights_bytes": size,
        "parameters": n_params,
        "architecture": repr(model),
        "train_seconds": train_seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "history": history,
    }
    config = {"dataset": data.name, "epochs": epochs, "seed": args.seed, "batch_size": args.batch_size,
              "lr": args.lr, "optimiser": "Adam", "dropout": 0.5, "device": device,
              "threads": torch.get_num_threads()}
    rows = [[h["epoch"], f"{h['train_loss']:.4f}", f"{h['train_accuracy']:.4f}", f"{h['valid_accuracy']:.4f}",
             f"{h['seconds']:.1f}"] for h in history]
    markdown = (
        f"# FD-classifier: seqgen CNN, {data.name}\n\n"
        "The classifier whose 128-d penultimate features the FD-classifier values of our tables are computed "
        "in (a Fréchet distance, Heusel et al. 2017; not FID: no Inception weights) and whose predictions "
        "give the mode-coverage entropy. See `inference/fd_classifier.py`.\n\n"
        f"- Data: {data.name} ({data.source}); split: {data.split_protocol}\n"
        f"- Trained on the train split only ({data.train.shape[0]} images, grey levels in [0, 1]), "
        f"{epochs} epochs, Adam lr {args.lr}, batch {args.batch_size}, dropout 0.5, seed {args.seed}, "
        f"{torch.get_num_threads()} threads on {device}\n"
        f"- Kept epoch (best validation accuracy): **{best_epoch}**\n"
        f"- Validation accuracy: **{100 * valid_acc:.2f} %** ({data.valid.shape[0]} images)\n"
        f"- Test accuracy: **{100 * test_acc:.2f} %** ({data.test.shape[0]} images, measured once, on the "
        "kept epoch)\n"
        f"- Weights: `{_display(weights_path)}`, {size} bytes, {n_params} parameters (float32)\n"
        f"- sha256: `{sha}`\n"
        f"- Training time: {train_seconds:.1f} s\n\n"
        "## Per epoch\n\n"
        + markdown_table(["epoch", "train loss", "train accuracy (dropout on)", "valid accuracy", "seconds"],
                         rows)
        + "\n"
    )
    write_report(report_dir, "report", results, markdown, config=config, command=command)
    print(f"kept epoch {best_epoch}: valid accuracy {valid_acc:.4f}, test accuracy {test_acc:.4f}")
    print(f"weights: {_display(weights_path)} ({size} bytes)")
    print(f"report: {_display(report_dir / 'report.md')}")
    print(f"sha256: {sha}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
