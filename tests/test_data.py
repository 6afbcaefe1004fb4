import gzip
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.data import (
    BINARIZATION_PROTOCOL,
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    FASHION_MNIST_FILES,
    FIXED_BINARIZATION_SEED,
    DataError,
    Dataset,
    binarization_protocol,
    dynamic_binarize,
    fashion_mnist_dir,
    fixed_binarize,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    read_idx,
)

_REAL_FASHION_DIR = Path(os.environ.get(FASHION_MNIST_ENV) or DEBIAN_FASHION_MNIST_DIR)
_HAVE_FASHION = all((_REAL_FASHION_DIR / name).exists() for name in FASHION_MNIST_FILES.values())
requires_fashion = pytest.mark.skipif(
    not _HAVE_FASHION,
    reason=f"Fashion-MNIST IDX .gz files not found in {_REAL_FASHION_DIR} "
    "(apt-get install dataset-fashion-mnist, or set SEQGEN_FASHION_MNIST_DIR)",
)


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = {3: 0x00000803, 1: 0x00000801}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fake_fashion(directory: Path, n_train: int = 60000, n_test: int = 10000) -> None:
    # All-zero images of the right shapes: cheap to write, valid IDX.
    arrays = {
        "train_images": np.zeros((n_train, 28, 28), np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": np.zeros((n_test, 28, 28), np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for key, name in FASHION_MNIST_FILES.items():
        (directory / name).write_bytes(gzip.compress(_idx_bytes(arrays[key]), compresslevel=1))


def _check_dataset(data: Dataset, sizes, num_pixels, num_classes):
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        x, y = getattr(data, split), getattr(data, f"{split}_labels")
        assert x.shape == (n, num_pixels)
        assert x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert y.shape == (n,)
        assert y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
    info = data.describe()
    assert info["splits"] == dict(zip(("train", "valid", "test"), sizes, strict=True))
    assert info["name"] == data.name
    assert info["source"]


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_range():
    data = load_digits()
    assert data.name == "digits"
    assert data.image_shape == (8, 8)
    _check_dataset(data, (1297, 250, 250), 64, 10)
    # Grey levels 0..16 scaled by 1/16: both ends are reached.
    assert float(data.train.max()) == 1.0 and float(data.train.min()) == 0.0
    assert data.describe()["source"] == "scikit-learn load_digits"
    assert data.describe()["image_shape"] == [8, 8]


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    from sklearn.datasets import load_digits as sk_load_digits

    raw = torch.from_numpy(sk_load_digits().data).float() / 16
    perm = torch.from_numpy(np.random.RandomState(0).permutation(1797))
    assert torch.equal(a.train, raw[perm[:1297]])
    assert torch.equal(a.valid, raw[perm[1297:1547]])
    assert torch.equal(a.test, raw[perm[1547:]])


def test_load_dataset_names():
    assert load_dataset("digits").name == "digits"
    assert load_dataset(" Digits ").name == "digits"
    with pytest.raises(ValueError, match=r"unknown data set 'mnist'.*fashion-mnist, digits"):
        load_dataset("mnist")


def test_dataset_to_device_returns_copy():
    data = load_digits()
    moved = data.to("cpu")
    assert moved is not data
    assert moved.train.device.type == "cpu"
    assert moved.image_shape == data.image_shape and moved.describe() == data.describe()


# ----------------------------------------------------------------------------- Fashion-MNIST


@requires_fashion
def test_fashion_mnist_real_files():
    data = load_fashion_mnist(_REAL_FASHION_DIR)
    assert data.name == "fashion-mnist"
    assert data.image_shape == (28, 28)
    _check_dataset(data, (50000, 10000, 10000), 784, 10)
    assert float(data.train.max()) == 1.0
    # valid is the tail of the official training file, test the t10k file.
    train_images = read_idx(_REAL_FASHION_DIR / FASHION_MNIST_FILES["train_images"])
    tail = torch.from_numpy(train_images[50000:].reshape(10000, 784)).float() / 255
    assert torch.equal(data.valid, tail)
    assert str(_REAL_FASHION_DIR.resolve()) in data.describe()["source"]


def test_fashion_mnist_dir_resolution_order(monkeypatch, tmp_path):
    env_dir = tmp_path / "from-env"
    arg_dir = tmp_path / "from-arg"
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    assert fashion_mnist_dir() == DEBIAN_FASHION_MNIST_DIR
    assert DEBIAN_FASHION_MNIST_DIR == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setenv(FASHION_MNIST_ENV, "")  # empty means unset
    assert fashion_mnist_dir() == DEBIAN_FASHION_MNIST_DIR
    monkeypatch.setenv(FASHION_MNIST_ENV, str(env_dir))
    assert fashion_mnist_dir() == env_dir
    assert fashion_mnist_dir(arg_dir) == arg_dir
    assert fashion_mnist_dir(str(arg_dir)) == arg_dir


def test_missing_directory_names_the_fix(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(FASHION_MNIST_ENV, str(missing))
    for call in (lambda: load_fashion_mnist(), lambda: load_dataset("fashion-mnist", missing)):
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert str(missing) in message
        assert "does not exist" in message
        assert "apt-get install dataset-fashion-mnist" in message
        assert FASHION_MNIST_ENV in message and "--data-dir" in message
    assert issubclass(DataError, RuntimeError)


def test_missing_file_is_named(tmp_path):
    _write_fake_fashion(tmp_path, n_train=60000, n_test=10000)
    (tmp_path / FASHION_MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / FASHION_MNIST_FILES["test_labels"]))):
        load_fashion_mnist(tmp_path)


def test_fake_files_load_and_uncompressed_names_accepted(tmp_path):
    _write_fake_fashion(tmp_path)
    # Replace one .gz by its uncompressed form: it must still load.
    gz = tmp_path / FASHION_MNIST_FILES["test_labels"]
    gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    data = load_fashion_mnist(tmp_path)
    _check_dataset(data, (50000, 10000, 10000), 784, 10)
    assert torch.equal(data.test_labels, torch.arange(10000) % 10)
    assert torch.equal(data.valid_labels, torch.arange(50000, 60000) % 10)


@pytest.mark.parametrize(
    "corruption, problem",
    [
        ("truncated-gzip", "not a valid gzip"),
        ("garbage-gzip", "not a valid gzip"),
        ("wrong-magic", "wrong IDX magic number 0x00000804"),
        ("short-payload", "IDX payload truncated"),
        ("wrong-shape", "not a Fashion-MNIST file"),
    ],
)
def test_corrupt_file_raises_data_error_naming_file(tmp_path, corruption, problem):
    _write_fake_fashion(tmp_path)
    bad = tmp_path / FASHION_MNIST_FILES["train_labels"]
    good_idx = gzip.decompress(bad.read_bytes())
    if corruption == "truncated-gzip":
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    elif corruption == "garbage-gzip":
        bad.write_bytes(b"this is not gzip data at all" * 10)
    elif corruption == "wrong-magic":
        bad.write_bytes(gzip.compress((0x00000804).to_bytes(4, "big") + good_idx[4:]))
    elif corruption == "short-payload":
        bad.write_bytes(gzip.compress(good_idx[:-100]))
    elif corruption == "wrong-shape":
        bad.write_bytes(gzip.compress(_idx_bytes(np.zeros(59999, np.uint8))))
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert str(bad) in message
    assert problem in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_read_idx_plain_and_gz_roundtrip(tmp_path):
    images = np.random.RandomState(1).randint(0, 256, size=(3, 4, 5)).astype(np.uint8)
    (tmp_path / "x.idx").write_bytes(_idx_bytes(images))
    (tmp_path / "x.idx.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    for name in ("x.idx", "x.idx.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.flags.writeable
        np.testing.assert_array_equal(out, images)
    (tmp_path / "long.idx").write_bytes(_idx_bytes(images) + b"\0")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(tmp_path / "long.idx")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "absent.idx")


# ----------------------------------------------------------------------------- binarisation


def _probabilities(n=20000, d=64, seed=3):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


def test_fixed_binarize_deterministic_and_leaves_global_rng():
    x = _probabilities()
    state = torch.get_rng_state()
    a = fixed_binarize(x)
    b = fixed_binarize(x, seed=FIXED_BINARIZATION_SEED)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, fixed_binarize(x, seed=1))
    assert a.dtype == x.dtype and a.shape == x.shape and a.device == x.device
    assert set(torch.unique(a).tolist()) == {0.0, 1.0}


def test_dynamic_binarize_fresh_draws_and_mean():
    x = _probabilities()
    a, b = dynamic_binarize(x), dynamic_binarize(x)
    assert not torch.equal(a, b)
    assert set(torch.unique(a).tolist()) == {0.0, 1.0}
    # Mean of n Bernoulli(p_i) draws: sd <= 0.5 / sqrt(n); allow 5 sd.
    tol = 5 * 0.5 / math.sqrt(x.numel())
    assert abs(float(a.mean()) - float(x.mean())) < tol
    # Per-pixel frequencies follow x: Bernoulli(0) is always 0, Bernoulli(1) always 1.
    edge = torch.tensor([[0.0, 1.0]] * 100)
    out = dynamic_binarize(edge)
    assert torch.equal(out, edge)


def test_dynamic_binarize_generator_and_dtypes():
    x = _probabilities(100, 10).double()
    a = dynamic_binarize(x, generator=torch.Generator().manual_seed(5))
    b = dynamic_binarize(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.float64
    assert dynamic_binarize(x.half()).dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_binarize_cuda():
    x = _probabilities(100, 10)
    out = fixed_binarize(x.cuda())
    assert out.device.type == "cuda"
    # The fixed protocol draws on a CPU generator: the same binary images on every device.
    assert torch.equal(out.cpu(), fixed_binarize(x))
    out = dynamic_binarize(x.cuda(), generator=torch.Generator().manual_seed(0))
    assert out.device.type == "cuda"


@pytest.mark.parametrize("fn", [dynamic_binarize, fixed_binarize])
def test_binarize_bad_input(fn):
    with pytest.raises(ValueError, match=r"grey levels in \[0, 1\], got values in \[0.0, 2.0\]"):
        fn(torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="floating-point"):
        fn(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="grey levels"):
        fn(torch.tensor([0.5, float("nan")]))


def test_binarization_protocol_description():
    proto = binarization_protocol()
    assert proto["seed"] == FIXED_BINARIZATION_SEED == 0
    assert "dynamic" in proto["train"] and "fixed" in proto["test"] and "fixed" in proto["valid"]
    assert proto["description"] == BINARIZATION_PROTOCOL
    assert load_digits().describe()["binarization"] == BINARIZATION_PROTOCOL
