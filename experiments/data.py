"""
Data sets for the experiments: real data, loaded from local files, with no silent fallback.

Two data sets are provided:

- ``"fashion-mnist"``: Fashion-MNIST (28x28 grey-level images), read from the four IDX files
  of the official release. The directory is the ``data_dir`` argument if given, else the
  environment variable :data:`FASHION_MNIST_ENV` (``SEQGEN_FASHION_MNIST_DIR``), else the
  directory where the Debian package ``dataset-fashion-mnist`` installs them
  (:data:`DEBIAN_FASHION_MNIST_DIR`). Split: train = the first 50,000 images of the official
  training file, valid = its last 10,000 images, test = the official 10,000-image t10k file.
- ``"digits"``: scikit-learn's ``load_digits`` (8x8 images, grey levels 0..16, ships inside
  scikit-learn so nothing is downloaded). Split: a fixed permutation of the 1797 images drawn
  with ``numpy.random.RandomState(0)``; its first 1297 entries are train, the next 250 valid
  and the last 250 test.

Beside them, a 2-D toy with a known density (:func:`ring_mixture`, :func:`ring_mixture_log_density`): a
mixture of Gaussians on a circle, drawn from a seed, for models whose learned density can be drawn.

Conventions:

- Images are flattened row-major into rows of a ``float32`` tensor of shape ``(N, H * W)``
  with values in ``[0, 1]`` (Fashion-MNIST: pixel / 255; digits: pixel / 16). Labels are
  ``int64`` tensors of shape ``(N,)``. :attr:`Dataset.image_shape` is ``(H, W)``.
- Binarisation (see :data:`BINARIZATION_PROTOCOL`): the grey levels are Bernoulli
  probabilities. Training batches are binarised afresh at every use
  (:func:`dynamic_binarize`); the valid and test sets are binarised once, with a private
  generator seeded with :data:`FIXED_BINARIZATION_SEED` (:func:`fixed_binarize`), so every
  evaluation sees the same binary images.
- Any missing, truncated or corrupt file raises :class:`DataError`, whose message names the
  file, what is wrong with it and how to fix it. Nothing is ever downloaded or substituted.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BINARIZATION_PROTOCOL",
    "DATASET_NAMES",
    "DEBIAN_FASHION_MNIST_DIR",
    "DIGITS_SPLIT_SEED",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_FILES",
    "FIXED_BINARIZATION_SEED",
    "DataError",
    "Dataset",
    "binarization_protocol",
    "dynamic_binarize",
    "fashion_mnist_dir",
    "fixed_binarize",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_ENV = "SEQGEN_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FIXED_BINARIZATION_SEED = 0
DIGITS_SPLIT_SEED = 0
DATASET_NAMES = ("fashion-mnist", "digits")
#: (H, W) of each data set, known before loading it (e.g. to check a mask setting on the command line)
IMAGE_SHAPES = {"fashion-mnist": (28, 28), "digits": (8, 8)}

BINARIZATION_PROTOCOL = (
    "dynamic Bernoulli binarisation of grey levels for training (a fresh draw every time a batch is "
    f"used); valid and test sets binarised once with a private generator seeded with "
    f"{FIXED_BINARIZATION_SEED}"
)

_FIX = (
    "install the Debian package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), "
    f"or pass --data-dir / set {FASHION_MNIST_ENV} to a directory holding the four Fashion-MNIST "
    "IDX .gz files"
)

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the number of dims.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_IDX_MAGICS = {_IDX_IMAGES_MAGIC: 3, _IDX_LABELS_MAGIC: 1}

_FASHION_SPLIT = (
    "train: first 50000 images of train-images-idx3-ubyte; valid: its last 10000 images; "
    "test: the 10000 images of t10k-images-idx3-ubyte"
)
_DIGITS_SPLIT = (
    f"numpy.random.RandomState({DIGITS_SPLIT_SEED}).permutation(1797): first 1297 train, "
    "next 250 valid, last 250 test"
)


class DataError(RuntimeError):
    """
    A data file is missing, truncated or corrupt. The message names the file (or directory),
    what is wrong, and how to obtain a good copy.
    """


def _data_error(path: str | os.PathLike, problem: str) -> DataError:
    return DataError(f"{os.fspath(path)}: {problem}. To fix: {_FIX}.")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """
    Reads an IDX file of unsigned bytes, gzipped (name ending in ``.gz``) or plain.

    Only the two layouts of the MNIST family are accepted: magic ``0x00000803`` (images, a 3-d
    array ``(N, H, W)``) and magic ``0x00000801`` (labels, a 1-d array ``(N,)``). The payload
    must hold exactly the number of bytes the header announces.

    :param path: the file to read.
    :returns: a writable ``uint8`` array shaped as the header says.
    :raises DataError: if the file is missing, unreadable, not valid gzip, has a wrong magic
        number, or its payload is shorter or longer than the header announces.
    """
    path = Path(path)
    if not path.is_file():
        problem = "does not exist" if not path.exists() else "is not a regular file"
        raise _data_error(path, f"IDX file {problem}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _data_error(path, f"cannot read IDX file ({e})") from e
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            # gzip raises BadGzipFile (an OSError) on garbage and EOFError on truncation.
            raise _data_error(path, f"not a valid gzip file, it is truncated or corrupt ({e})") from e

    if len(raw) < 4:
        raise _data_error(path, f"IDX file too short for a header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGICS:
        raise _data_error(
            path,
            f"wrong IDX magic number 0x{magic:08x}; expected 0x{_IDX_IMAGES_MAGIC:08x} "
            f"(uint8 images, 3-d) or 0x{_IDX_LABELS_MAGIC:08x} (uint8 labels, 1-d)",
        )
    ndim = _IDX_MAGICS[magic]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise _data_error(
            path, f"IDX header truncated: {len(raw)} bytes, a {ndim}-d header needs {header_size}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_size
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise _data_error(
            path, f"IDX payload {what}: header dims {dims} need {expected} bytes, file holds {payload}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """
    Resolves the Fashion-MNIST directory: ``data_dir`` if given, else the environment variable
    ``SEQGEN_FASHION_MNIST_DIR`` if set and non-empty, else ``/usr/share/datasets/fashion-mnist``
    (where the Debian package ``dataset-fashion-mnist`` installs the files). Does not check that
    the directory exists; :func:`load_fashion_mnist` does.
    """
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return Path(env)
    return DEBIAN_FASHION_MNIST_DIR


def _describe_dir_origin(data_dir: str | os.PathLike | None) -> str:
    if data_dir is not None:
        return "given as data_dir"
    if os.environ.get(FASHION_MNIST_ENV):
        return f"from ${FASHION_MNIST_ENV}"
    return "the Debian default"


def _find_file(directory: Path, gz_name: str) -> Path:
    # The .gz files are the official form; accept the uncompressed names too (e.g. after gunzip).
    gz_path = directory / gz_name
    plain_path = directory / gz_name[: -len(".gz")]
    for candidate in (gz_path, plain_path):
        if candidate.exists():
            return candidate
    raise _data_error(gz_path, f"Fashion-MNIST file missing (also looked for {plain_path})")


@dataclasses.dataclass
class Dataset:
    """
    A data set split into train / valid / test.

    ``train``, ``valid`` and ``test`` are ``float32`` tensors of flattened images, shape
    ``(N, H * W)``, values in ``[0, 1]``; the ``*_labels`` are ``int64`` tensors of shape
    ``(N,)``. ``source`` says where the data came from, ``split_protocol`` how it was split and
    ``scaling`` how grey levels were mapped to ``[0, 1]``, so that reports can state the protocol
    (see :meth:`describe`).
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    valid_labels: torch.Tensor
    test_labels: torch.Tensor
    image_shape: tuple[int, int]
    source: str = ""
    split_protocol: str = ""
    scaling: str = ""

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if len(self.image_shape) != 2 or min(self.image_shape) < 1:
            raise ValueError(
                f"Dataset {self.name!r}: image_shape must be two positive ints (H, W), got {self.image_shape}"
            )
        num_pixels = self.image_shape[0] * self.image_shape[1]
        for split in ("train", "valid", "test"):
            x, y = getattr(self, split), getattr(self, f"{split}_labels")
            if x.dim() != 2 or x.shape[1] != num_pixels:
                raise ValueError(
                    f"Dataset {self.name!r}: {split} must have shape (N, {num_pixels}) for image_shape "
                    f"{self.image_shape}, got {tuple(x.shape)}"
                )
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"Dataset {self.name!r}: {split}_labels must have shape ({x.shape[0]},), "
                    f"got {tuple(y.shape)}"
                )

    def describe(self) -> dict[str, Any]:
        """
        A JSON-serialisable summary for reports: name, image shape, split sizes, source, split
        protocol, pixel scaling and binarisation protocol (:data:`BINARIZATION_PROTOCOL`).
        """
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "splits": {
                "train": int(self.train.shape[0]),
                "valid": int(self.valid.shape[0]),
                "test": int(self.test.shape[0]),
            },
            "source": self.source,
            "split_protocol": self.split_protocol,
            "scaling": self.scaling,
            "binarization": BINARIZATION_PROTOCOL,
        }

    def to(self, device: torch.device | str) -> Dataset:
        """Returns a copy with every tensor on ``device``."""
        tensors = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **tensors)


def _images_to_tensor(images: np.ndarray, scale: float) -> torch.Tensor:
    return torch.from_numpy(images.reshape(images.shape[0], -1)).to(torch.float32).div_(scale)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """
    Loads Fashion-MNIST from the IDX files in :func:`fashion_mnist_dir` ``(data_dir)``.

    Split: train = the first 50,000 images of the official training file, valid = the last
    10,000 images of the official training file, test = the official t10k file (10,000 images).
    Pixels are divided by 255 and images flattened to 784-vectors.

    :raises DataError: if the directory or a file is missing, or a file is corrupt or does not
        have the Fashion-MNIST shapes.
    """
    directory = fashion_mnist_dir(data_dir)
    if not directory.is_dir():
        raise _data_error(
            directory, f"Fashion-MNIST directory ({_describe_dir_origin(data_dir)}) does not exist"
        )
    paths = {key: _find_file(directory, name) for key, name in FASHION_MNIST_FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}

    expected = {
        "train_images": (60000, 28, 28),
        "train_labels": (60000,),
        "test_images": (10000, 28, 28),
        "test_labels": (10000,),
    }
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise _data_error(
                paths[key], f"not a Fashion-MNIST file: shape {arrays[key].shape}, expected {shape}"
            )
    for key in ("train_labels", "test_labels"):
        if arrays[key].max() > 9:
            raise _data_error(
                paths[key], f"label {int(arrays[key].max())} outside the Fashion-MNIST range 0..9"
            )

    train_x = _images_to_tensor(arrays["train_images"], 255.0)
    train_y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    return Dataset(
        name="fashion-mnist",
        train=train_x[:50000],
        valid=train_x[50000:],
        test=_images_to_tensor(arrays["test_images"], 255.0),
        train_labels=train_y[:50000],
        valid_labels=train_y[50000:],
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        image_shape=IMAGE_SHAPES["fashion-mnist"],
        source=str(directory.resolve()),
        split_protocol=_FASHION_SPLIT,
        scaling="pixel / 255, images flattened row-major to 784-vectors",
    )


def load_digits() -> Dataset:
    """
    Loads scikit-learn's 8x8 digits (``sklearn.datasets.load_digits``, bundled with
    scikit-learn), pixels divided by 16 into ``[0, 1]``.

    Split: ``numpy.random.RandomState(0).permutation(1797)``; its first 1297 indices are train,
    the next 250 valid and the last 250 test. (The legacy ``RandomState`` stream is frozen by
    NumPy's compatibility policy, so the split is the same on every NumPy version.)
    """
    from sklearn.datasets import load_digits as _sklearn_load_digits

    bunch = _sklearn_load_digits()
    images = np.asarray(bunch.data, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.shape != (1797, 64):
        raise RuntimeError(f"sklearn.datasets.load_digits returned shape {images.shape}, expected (1797, 64)")
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(images.shape[0])
    parts = {"train": perm[:1297], "valid": perm[1297:1547], "test": perm[1547:]}
    x = {k: torch.from_numpy(images[idx] / np.float32(16.0)) for k, idx in parts.items()}
    y = {k: torch.from_numpy(labels[idx]) for k, idx in parts.items()}
    return Dataset(
        name="digits",
        train=x["train"],
        valid=x["valid"],
        test=x["test"],
        train_labels=y["train"],
        valid_labels=y["valid"],
        test_labels=y["test"],
        image_shape=IMAGE_SHAPES["digits"],
        source="scikit-learn load_digits",
        split_protocol=_DIGITS_SPLIT,
        scaling="pixel / 16, images flattened row-major to 64-vectors",
    )


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """
    Loads a data set by name: ``"fashion-mnist"`` or ``"digits"`` (case-insensitive).
    ``data_dir`` is only used by Fashion-MNIST (see :func:`fashion_mnist_dir`).
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if key == "digits":
        return load_digits()
    raise ValueError(f"unknown data set {name!r}; allowed names: {', '.join(DATASET_NAMES)}")


def binarization_protocol() -> dict[str, Any]:
    """The binarisation protocol as a dict, for reports."""
    fixed = f"fixed: Bernoulli(grey level) drawn once by a private generator, seed {FIXED_BINARIZATION_SEED}"
    return {
        "train": "dynamic: Bernoulli(grey level) drawn afresh every time a batch is used",
        "valid": fixed,
        "test": fixed,
        "seed": FIXED_BINARIZATION_SEED,
        "description": BINARIZATION_PROTOCOL,
    }


def _check_probabilities(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor of grey levels in [0, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{fn}: x must be a floating-point tensor of grey levels in [0, 1], got dtype {x.dtype}"
        )
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    # NaN fails both comparisons, so it is reported here as well.
    if not (lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"{fn}: x must hold grey levels in [0, 1], got values in [{lo}, {hi}]")


def _bernoulli(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Uniforms are drawn on the generator's device and then moved, so a CPU generator works with
    # CUDA data and a given generator state gives the same binary image on every device.
    device = x.device if generator is None else generator.device
    u_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    u = torch.rand(x.shape, generator=generator, device=device, dtype=u_dtype).to(x.device)
    # u is in [0, 1), so P(u < p) = p exactly, including p = 0 and p = 1.
    return (u < x.to(u_dtype)).to(x.dtype)


def dynamic_binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    Dynamic binarisation for training: a fresh ``Bernoulli(x)`` draw on every call.

    :param x: grey levels in ``[0, 1]``, any shape, floating dtype.
    :param generator: optional generator; ``None`` uses the global RNG of ``x``'s device. A
        generator on another device (e.g. a CPU generator with CUDA data) is allowed: the
        uniforms are drawn on the generator's device and moved to ``x``'s device.
    :returns: a tensor of exact 0/1 values with ``x``'s shape, dtype and device.
    """
    _check_probabilities(x, "dynamic_binarize")
    return _bernoulli(x, generator)


def fixed_binarize(x: torch.Tensor, seed: int = FIXED_BINARIZATION_SEED) -> torch.Tensor:
    """
    Fixed binarisation for valid/test: ``Bernoulli(x)`` drawn with a private CPU generator
    seeded with ``seed``, so the same tensor always gives the same binary tensor (on any device)
    and the global RNG state is left untouched.

    :returns: a tensor of exact 0/1 values with ``x``'s shape, dtype and device.
    """
    _check_probabilities(x, "fixed_binarize")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"fixed_binarize: seed must be an int, got {seed!r}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return _bernoulli(x, generator)


def downsample(x: torch.Tensor, image_shape: tuple[int, int], factor: int = 2) -> torch.Tensor:
    """Grey-level images (N, H·W) averaged over ``factor`` × ``factor`` blocks: (N, H/f · W/f), still in
    [0, 1] (binarise afterwards, as for full-size images). Fashion-MNIST's 28 x 28 become 14 x 14, the
    sequential pixel experiment's CPU size."""
    h, w = image_shape
    if factor < 1 or h % factor or w % factor or x.dim() != 2 or x.shape[1] != h * w:
        raise ValueError(f"downsample: need (N, {h}·{w}) images and a factor dividing {h} and {w}, got "
                         f"{tuple(x.shape)} and {factor}")
    blocks = x.reshape(-1, h // factor, factor, w // factor, factor)
    return blocks.mean((2, 4)).reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------------------ a 2-D toy


def _ring_centres(modes: int, radius: float) -> torch.Tensor:
    angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return radius * torch.stack([angle.cos(), angle.sin()], 1)


def ring_mixture(modes: int, radius: float, sd: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points (float32, (n, 2)) from ``modes`` equally weighted Gaussians of standard deviation ``sd``
    centred on a circle of ``radius``: a 2-D toy whose density :func:`ring_mixture_log_density` knows."""
    if modes < 1 or radius < 0 or sd <= 0 or n < 1:
        raise ValueError(f"need modes >= 1, radius >= 0, sd > 0 and n >= 1, got {modes}, {radius}, {sd}, {n}")
    which = torch.randint(0, modes, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (_ring_centres(modes, radius)[which] + sd * noise).float()


def ring_mixture_log_density(x: torch.Tensor, modes: int, radius: float, sd: float) -> torch.Tensor:
    """The exact log-density (nats) of :func:`ring_mixture`'s law at the rows of ``x`` (float64, (n,))."""
    d2 = (x.double()[:, None, :] - _ring_centres(modes, radius).to(x.device)[None]).pow(2).sum(-1)
    log_k = -0.5 * d2 / sd**2 - math.log(2 * math.pi * sd**2)
    return torch.logsumexp(log_k, 1) - math.log(modes)


# ---------------------------------------------------------------------------------------- text corpora

FORTUNES_DIR = Path("/usr/share/games/fortunes")
#: Fractions of a corpus' characters, by position: the first 90 % train, the next 5 % valid, the last 5 %
#: test.
TEXT_SPLIT = (0.9, 0.05, 0.05)


@dataclasses.dataclass
class TextCorpus:
    """A character-level corpus split by position (:data:`TEXT_SPLIT`): ``train``, ``valid`` and ``test`` are
    int64 tensors of character indices into ``alphabet`` (the sorted distinct characters of the whole
    corpus, so every split encodes); :meth:`encode` / :meth:`decode` map text to indices and back."""

    name: str
    alphabet: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    source: str

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.alphabet)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"characters {missing!r} are not in the corpus' alphabet of "
                             f"{len(self.alphabet)}")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, indices: torch.Tensor) -> str:
        return "".join(self.alphabet[int(i)] for i in indices)

    def sequences(self, split: str, length: int) -> torch.Tensor:
        """Non-overlapping sequences of ``length`` characters cut from the start of ``split`` (the remainder,
        shorter than ``length``, is dropped): int64 (N, length)."""
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        text = getattr(self, split)
        if not isinstance(length, int) or length < 2 or length > text.numel():
            raise ValueError(f"sequence length must be an integer in 2..{text.numel()} (the {split} split's "
                             f"characters), got {length!r}")
        n = text.numel() // length
        return text[: n * length].reshape(n, length)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "alphabet_size": len(self.alphabet),
                "characters": {s: int(getattr(self, s).numel()) for s in ("train", "valid", "test")},
                "split_protocol": "by position: the first 90 % of the characters train, the next 5 % valid, "
                                  "the last 5 % test"}


def _fortune_text(directory: Path) -> str:
    """The English fortune files of ``directory`` (regular files without an extension, sorted by name; the
    ``.dat`` indices and ``.u8`` links skipped), their ``%`` separator lines removed, joined by blank
    lines."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)
    parts = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        parts.append("\n".join(line for line in lines if line.strip() != "%"))
    return "\n\n".join(parts)


def load_text_corpus(path: str | os.PathLike | None = None) -> TextCorpus:
    """A character-level corpus: the plain-text file ``path`` (UTF-8), or without one the Debian package
    ``fortunes`` (English fortune cookies, about 2.5 MB, under :data:`FORTUNES_DIR`). A missing or empty
    corpus, or one too short to split, is a :class:`DataError` naming it; nothing is ever substituted."""
    if path is None:
        if not FORTUNES_DIR.is_dir():
            raise DataError(f"{FORTUNES_DIR}: the fortunes corpus is not installed; install the Debian "
                            "package (apt-get install fortunes, which ./setup.sh does where it can) or pass "
                            "a plain-text file with --text FILE")
        text, name = _fortune_text(FORTUNES_DIR), "fortunes"
        source = f"{FORTUNES_DIR} (Debian package fortunes)"
    else:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: no such text file (--text expects a plain-text UTF-8 file)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        name, source = p.name, str(p)
    if not text.strip():
        raise DataError(f"{source}: the corpus is empty")
    n = len(text)
    a, b = int(n * TEXT_SPLIT[0]), int(n * (TEXT_SPLIT[0] + TEXT_SPLIT[1]))
    if min(a, b - a, n - b) < 2:
        raise DataError(f"{source}: {n} characters are too few to split 90/5/5 with at least 2 in each part")
    alphabet = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(alphabet)}
    codes = torch.tensor([index[c] for c in text], dtype=torch.int64)
    return TextCorpus(name, alphabet, codes[:a], codes[a:b], codes[b:], source)
