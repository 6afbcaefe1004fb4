"""The FD-classifier: small CNN classifiers, trained here, whose penultimate features are where our tables
measure the Fréchet distance between a model's samples and real images, and whose predicted classes give the
mode-coverage entropy.

**What it is.** The Fréchet distance of Heusel et al. 2017 ("GANs trained by a two time-scale update rule
converge to a local Nash equilibrium", Sec. 4, Eq. 6) between the Gaussians fitted to the features of two
image sets (:func:`inference.sample_quality.frechet_distance`), with the features taken from the 128-d
penultimate layer of a classifier trained on the same data set as the generators. :func:`fd_scores` gives
it against any reference splits (train, test, ...), :func:`mode_coverage` the entropy (nats) of the
histogram of predicted classes (log 10 when all ten classes are equally frequent, 0 when one class is
predicted for every sample) and :func:`save_mode_coverage_figure` draws those histograms.

**Why "FD-classifier" and not "FID".** FID is, by definition, this distance in the pool3 features of one
particular Inception-v3 network trained on ImageNet. Those weights are not here, and 28x28 or 8x8 grey-level
images are far from what Inception saw. Values computed with these classifiers are on another scale and
cannot be compared with any published FID, so our tables never use that name; they are comparable with each
other only for the same data set and the same committed weights (the sha256 below pins them).

**Architecture** (:class:`FDClassifier`), for flattened grey-level images in [0, 1] reshaped to (N, 1, H, W):
conv3x3(32)-ReLU-conv3x3(32)-ReLU-maxpool2 - conv3x3(64)-ReLU-maxpool2 (the second pool only when
min(H, W) >= 16, so 8x8 digits keep a 4x4 map) - flatten - Linear(128)-ReLU [the 128-d features] -
dropout(0.5) - Linear(10). Convolutions are padded ("same"). 430,890 parameters for 28x28 (a 1.7 MB
float32 file), 160,554 for 8x8 (0.65 MB).

**Data and measured accuracy.** Each classifier is trained by ``python -m experiments.train_fd_classifier
--dataset <name>`` on the train split only of :func:`experiments.data.load_dataset` (grey levels, not
binarised), Adam, the epoch chosen by validation accuracy; test accuracy is measured once, on the chosen
epoch. Fashion-MNIST: train = first 50,000 images of the official training file, valid = its last 10,000,
test = the official 10,000; 8 epochs (the 8th kept), valid accuracy 92.26 %, test accuracy 91.38 %.
scikit-learn digits: 1297 / 250 / 250 images; 40 epochs (the 33rd kept), valid accuracy 98.40 %, test
accuracy 100.00 % (250 images: one error would be 0.4 %). Reports (with the exact command and the per-epoch
accuracies): ``results/fd_classifier/<dataset>/report.md``.

**The hash check.** The weights are package data, ``inference/fd_weights/<dataset>.pt``. :data:`CLASSIFIERS`
records the sha256 of each file as written by the training run whose report is in
``results/fd_classifier/<dataset>/``. A file holds a dict (``format``, ``dataset``,
``image_shape``, ``num_classes`` and the float32 ``state_dict``), read with ``torch.load(weights_only=True)``.
:func:`load_fd_classifier` hashes the file before loading it and refuses (ValueError naming the file, the
expected and the found hash and the command that retrains it) any other bytes, so an FD-classifier value
always means the same network. Retraining on purpose means pasting the new sha256 (printed by the training
command) and accuracies into :data:`CLASSIFIERS`: every FD-classifier value computed before is then on
another scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.checkpoint import save_figure
from inference.sample_quality import class_entropy, frechet_distance, histogram_entropy

__all__ = [
    "CLASSIFIERS",
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FD_WEIGHTS_DIR",
    "FEATURE_DIM",
    "WEIGHTS_FORMAT",
    "ClassifierInfo",
    "FDClassifier",
    "classifier_features",
    "classifier_predictions",
    "fd_against_features",
    "fd_scores",
    "file_sha256",
    "load_fd_classifier",
    "mode_coverage",
    "save_mode_coverage_figure",
]

FEATURE_DIM = 128
NUM_CLASSES = 10
#: the ``format`` key of a weights file written by experiments.train_fd_classifier
WEIGHTS_FORMAT = "seqgen-fd-classifier-v1"
#: where the committed weights live (package data)
FD_WEIGHTS_DIR = Path(__file__).resolve().parent / "fd_weights"

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
DIGITS_CLASSES = tuple(str(i) for i in range(10))


@dataclasses.dataclass(frozen=True)
class ClassifierInfo:
    """One committed FD-classifier: its weights file (in :data:`FD_WEIGHTS_DIR`), the sha256 of that file,
    the image shape it takes, the accuracies measured by the training run, its name in tables, the class
    names and the command that retrains it."""

    file: str
    sha256: str
    image_shape: tuple[int, int]
    test_accuracy: float
    name: str
    valid_accuracy: float
    class_names: tuple[str, ...]
    train_command: str


CLASSIFIERS: dict[str, ClassifierInfo] = {
    "fashion-mnist": ClassifierInfo(
        file="fashion-mnist.pt",
        sha256="3d6ee4a07aba05f9c82037c5d73675bc64437468526da088d2d2ba8af4fd74f3",
        image_shape=(28, 28),
        test_accuracy=0.9138,
        name="FD-classifier: seqgen CNN, fashion-mnist",
        valid_accuracy=0.9226,
        class_names=FASHION_MNIST_CLASSES,
        train_command="python -m experiments.train_fd_classifier --dataset fashion-mnist --install",
    ),
    "digits": ClassifierInfo(
        file="digits.pt",
        sha256="fb1309059f4b15ed70d96c0a321e7d5db3603231ba40cfc3a502fe3995413519",
        image_shape=(8, 8),
        test_accuracy=1.0,
        name="FD-classifier: seqgen CNN, digits",
        valid_accuracy=0.984,
        class_names=DIGITS_CLASSES,
        train_command="python -m experiments.train_fd_classifier --dataset digits --install",
    ),
}


class FDClassifier(nn.Module):
    """A small CNN for flattened grey-level images (N, H*W) in [0, 1]; see the module docstring for the
    layers. :meth:`features` gives the 128-d penultimate features (after the ReLU, before dropout),
    :meth:`forward` the class logits, :meth:`predict` the predicted labels."""

    def __init__(self, image_shape: Sequence[int], num_classes: int = NUM_CLASSES,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if len(image_shape) != 2 or min(image_shape) < 4:
            raise ValueError(f"image_shape must be (H, W) with H, W >= 4, got {tuple(image_shape)}")
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.num_classes = int(num_classes)
        h, w = self.image_shape
        second_pool = min(h, w) >= 16
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            *([nn.MaxPool2d(2)] if second_pool else []),
        )
        h, w = h // 2, w // 2
        if second_pool:
            h, w = h // 2, w // 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * h * w, FEATURE_DIM), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, self.num_classes)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.image_shape
        if x.dim() != 2 or x.shape[1] != h * w:
            raise ValueError(f"expected flattened images (N, {h * w}) for image shape {self.image_shape}, "
                             f"got {tuple(x.shape)}")
        return x.reshape(-1, 1, h, w)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features (N, 128) of images (N, H*W)."""
        return self.fc(self.conv(self._images(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels (N,) (argmax of the logits; call ``eval()`` first for the deterministic net)."""
        return self.forward(x).argmax(-1)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_fd_classifier(dataset: str, device: str | torch.device = "cpu",
                       path: str | os.PathLike | None = None) -> FDClassifier:
    """The committed FD-classifier of ``dataset`` ("fashion-mnist" or "digits"), in eval mode on ``device``.

    The file (``path``, default ``inference/fd_weights/<dataset>.pt``) must have the sha256 recorded in
    :data:`CLASSIFIERS`, else ValueError naming the file, both hashes and the command that retrains it.
    An unknown data set is a ValueError listing the known ones; a missing file a FileNotFoundError."""
    key = dataset.strip().lower() if isinstance(dataset, str) else dataset
    if key not in CLASSIFIERS:
        raise ValueError(f"no FD-classifier for data set {dataset!r}; known: {', '.join(CLASSIFIERS)}")
    info = CLASSIFIERS[key]
    path = Path(path) if path is not None else FD_WEIGHTS_DIR / info.file
    retrain = (f"retrain with `{info.train_command}` and paste the sha256 it prints (and its accuracies) "
               f"into CLASSIFIERS in {Path(__file__).name}")
    if not path.is_file():
        raise FileNotFoundError(f"FD-classifier weights for {key!r} not found at {path}; {retrain}")
    found = file_sha256(path)
    if found != info.sha256:
        raise ValueError(
            f"FD-classifier weights {path} fail the hash check: expected sha256 {info.sha256}, "
            f"found {found}. "
            f"The file is not the committed one (corrupt, or retrained): restore it from git, or {retrain} "
            f"(FD-classifier values computed with other weights are then not comparable)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not an FD-classifier weights file (format {WEIGHTS_FORMAT!r})")
    if tuple(state["image_shape"]) != info.image_shape:
        raise ValueError(f"{path} is for images {tuple(state['image_shape'])}, {key} has {info.image_shape}")
    model = FDClassifier(info.image_shape, num_classes=int(state["num_classes"]))
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def _check_images(classifier: FDClassifier, images: torch.Tensor) -> None:
    h, w = classifier.image_shape
    if not isinstance(images, torch.Tensor) or images.dim() != 2 or images.shape[1] != h * w:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be flattened (N, {h * w}) for image shape {(h, w)}, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image")
    lo, hi = torch.aminmax(images)
    if not (float(lo) >= 0.0 and float(hi) <= 1.0):
        raise ValueError(f"images must hold grey levels in [0, 1], got values in [{float(lo)}, {float(hi)}]")


def _batched(classifier: FDClassifier, images: torch.Tensor, batch_size: int, fn: str) -> torch.Tensor:
    _check_images(classifier, images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            out = [getattr(classifier, fn)(images[i : i + batch_size].to(device, torch.float32)).cpu()
                   for i in range(0, images.shape[0], batch_size)]
    finally:
        classifier.train(was_training)
    return torch.cat(out)


def classifier_features(classifier: FDClassifier, images: torch.Tensor,
                        batch_size: int = 1000) -> torch.Tensor:
    """The penultimate features (N, 128) of images (N, H*W) in [0, 1], computed in eval mode without
    gradients in batches of ``batch_size`` on the classifier's device; float64 on the CPU."""
    return _batched(classifier, images, batch_size, "features").double()


def classifier_predictions(classifier: FDClassifier, images: torch.Tensor,
                           batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels (N,) of images (N, H*W) in [0, 1] (eval mode, batched), on the CPU."""
    return _batched(classifier, images, batch_size, "forward").argmax(-1)


def fd_scores(classifier: FDClassifier, samples: torch.Tensor, references: Mapping[str, torch.Tensor],
              batch_size: int = 1000) -> dict[str, float]:
    """The FD-classifier value of ``samples`` (N, H*W) against each reference image set, by name:
    ``{"train": ..., "test": ...}`` for ``references={"train": data.train, "test": data.test}``."""
    if not references:
        raise ValueError("references must name at least one reference image set")
    features = {name: classifier_features(classifier, ref, batch_size) for name, ref in references.items()}
    return fd_against_features(classifier, samples, features, batch_size)


def fd_against_features(classifier: FDClassifier, samples: torch.Tensor,
                        reference_features: Mapping[str, torch.Tensor],
                        batch_size: int = 1000) -> dict[str, float]:
    """:func:`fd_scores` with the references given as their features (:func:`classifier_features`), so that an
    experiment scoring many sample sets against the same splits computes those features once."""
    if not reference_features:
        raise ValueError("reference_features must name at least one reference set")
    f = classifier_features(classifier, samples, batch_size)
    return {name: frechet_distance(f, ref) for name, ref in reference_features.items()}


def mode_coverage(classifier: FDClassifier, samples: torch.Tensor, batch_size: int = 1000) -> dict[str, Any]:
    """Mode coverage of ``samples`` (N, H*W): ``entropy`` (nats) of the histogram of predicted classes,
    ``max_entropy`` = log(number of classes), ``histogram`` (fraction of samples per class) and
    ``num_samples``."""
    predicted = classifier_predictions(classifier, samples, batch_size)
    k = classifier.num_classes
    counts = torch.bincount(predicted, minlength=k).double()
    return {
        "entropy": class_entropy(predicted, k),
        "max_entropy": math.log(k),
        "histogram": (counts / counts.sum()).tolist(),
        "num_samples": int(predicted.numel()),
    }


def save_mode_coverage_figure(histograms: Mapping[str, Sequence[float]], path: str | os.PathLike,
                              title: str, class_names: Sequence[str] | None = None) -> None:
    """The mode-coverage figure: grouped bars of each model's predicted-class histogram (fractions, or
    counts: each is normalised), the entropy of each in its legend label, the uniform level dashed; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not histograms:
        raise ValueError("histograms must hold at least one model's histogram")
    k = len(next(iter(histograms.values())))
    if any(len(h) != k for h in histograms.values()):
        raise ValueError("all histograms must have the same number of classes")
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    width = 0.8 / len(histograms)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * k), 3.4))
    for i, (label, h) in enumerate(histograms.items()):
        p = torch.tensor(list(h), dtype=torch.float64)
        p = (p / p.sum()).tolist()
        xs = [c - 0.4 + width * (i + 0.5) for c in range(k)]
        ax.bar(xs, p, width=width, label=f"{label} (H = {histogram_entropy(h):.3f} nats)")
    ax.axhline(1 / k, color="grey", linestyle="--", linewidth=0.8,
               label=f"uniform (H = log {k} = {math.log(k):.3f})")
    ax.set_xticks(range(k))
    ax.set_xticklabels(names, rotation=30 if max(map(len, names)) > 3 else 0, fontsize=8)
    ax.set_ylabel("fraction of samples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
