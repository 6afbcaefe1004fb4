import math
import re

import pytest
import torch

from ppl_models.masks import (
    MAR,
    MCAR,
    AllMissing,
    MaskProcess,
    UserMask,
    make_mask_process,
    validate_mask,
)

SHAPE = (28, 28)
D = SHAPE[0] * SHAPE[1]

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _x(batch=64, shape=SHAPE, dtype=torch.float32, device="cpu"):
    return torch.rand(batch, shape[0] * shape[1], dtype=dtype, device=device)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _is_binary(mask):
    return bool(((mask == 0) | (mask == 1)).all())


# ----------------------------------------------------------------------------- MCAR


@pytest.mark.parametrize("percent", [10, 25, 50, 80, 90, 12.5])
def test_mcar_missing_fraction(percent):
    x = _x(batch=200)
    mask = MCAR(percent, SHAPE).sample(x, _gen(0))
    assert mask.shape == x.shape and _is_binary(mask)
    p = percent / 100
    n = mask.numel()
    # The missing count is Binomial(n, p): allow 5 standard deviations of the fraction.
    tol = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(float((mask == 0).float().mean()) - p) < tol


def test_mcar_extremes():
    x = _x()
    assert torch.equal(MCAR(0, SHAPE).sample(x), torch.ones_like(x))
    assert torch.equal(MCAR(100, SHAPE).sample(x), torch.zeros_like(x))
    assert MCAR(100, SHAPE).name == "mcar-100"
    assert MCAR(80, SHAPE).name == "mcar-80"
    assert MCAR(12.5, SHAPE).name == "mcar-12.5"


def test_mcar_pixels_independent_across_batch():
    # Not the same mask repeated over the batch.
    mask = MCAR(50, SHAPE).sample(_x(batch=8), _gen(1))
    assert not all(torch.equal(mask[0], mask[i]) for i in range(1, 8))


@pytest.mark.parametrize("percent", [150, -1, 100.0001, float("nan"), float("inf"), "80", None, True])
def test_mcar_bad_percent(percent):
    with pytest.raises(ValueError, match=r"percent must be a number in \[0, 100\]"):
        MCAR(percent, SHAPE)


# ----------------------------------------------------------------------------- MAR


def _square_corners(mask, shape, size):
    """Checks each row's missing pixels form one size x size square; returns the corners."""
    h, w = shape
    missing = (mask == 0).reshape(-1, h, w)
    assert bool((missing.sum((1, 2)) == size * size).all())
    corners = []
    for m in missing:
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        top, left = int(rows[0]), int(cols[0])
        # Bounding box of the missing pixels is size x size and entirely missing: a square.
        assert len(rows) == size and len(cols) == size
        assert int(rows[-1]) - top == size - 1 and int(cols[-1]) - left == size - 1
        assert bool(m[top : top + size, left : left + size].all())
        corners.append((top, left))
    return corners


@pytest.mark.parametrize("size", [1, 14, 28])
def test_mar_square_28x28(size):
    x = _x(batch=100)
    mask = MAR(size, SHAPE).sample(x, _gen(2))
    assert mask.shape == x.shape and _is_binary(mask)
    corners = _square_corners(mask, SHAPE, size)
    assert all(0 <= t <= 28 - size and 0 <= c <= 28 - size for t, c in corners)


def test_mar_corner_range_covered():
    # 8x6 image, 3x3 square: rows 0..5, cols 0..3. With 3000 draws each value is missed with
    # probability < 6 * (5/6)^3000, i.e. never in practice.
    shape, size = (8, 6), 3
    mask = MAR(size, shape).sample(_x(batch=3000, shape=shape), _gen(3))
    corners = _square_corners(mask, shape, size)
    assert {t for t, _ in corners} == set(range(0, 8 - size + 1))
    assert {c for _, c in corners} == set(range(0, 6 - size + 1))


def test_mar_name():
    assert MAR(14, SHAPE).name == "mar-14"


@pytest.mark.parametrize("size", [40, 29, 0, -3, 2.5, "14", True])
def test_mar_bad_size(size):
    with pytest.raises(ValueError, match=r"size must be an int in 1\.\.28"):
        MAR(size, SHAPE)


def test_mar_bad_size_uses_smaller_side():
    with pytest.raises(ValueError, match=r"size must be an int in 1\.\.6 .*8x6 image"):
        MAR(7, (8, 6))


# ----------------------------------------------------------------------------- seeds, devices


@pytest.mark.parametrize("process", [MCAR(50, SHAPE), MAR(10, SHAPE)], ids=lambda p: p.name)
def test_seed_behaviour(process):
    x = _x()
    a = process.sample(x, _gen(7))
    b = process.sample(x, _gen(7))
    c = process.sample(x, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Global RNG: seeding it gives the same mask too.
    torch.manual_seed(11)
    d = process.sample(x)
    torch.manual_seed(11)
    assert torch.equal(d, process.sample(x))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "process",
    [MCAR(30, SHAPE), MAR(5, SHAPE), AllMissing(SHAPE), UserMask(torch.ones(D))],
    ids=lambda p: p.name,
)
def test_mask_device_and_dtype(process, device, dtype):
    x = _x(batch=4, dtype=dtype, device=device)
    mask = process.sample(x)
    assert mask.shape == x.shape and mask.dtype == dtype and mask.device == x.device
    mask = process.sample(x, _gen(0))  # a CPU generator with data on any device
    assert mask.shape == x.shape and mask.dtype == dtype and mask.device == x.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("process", [MCAR(50, SHAPE), MAR(10, SHAPE)], ids=lambda p: p.name)
def test_cpu_generator_gives_same_mask_on_cuda(process):
    x = _x(batch=16)
    assert torch.equal(process.sample(x.cuda(), _gen(4)).cpu(), process.sample(x, _gen(4)))
    cuda_gen = torch.Generator(device="cuda").manual_seed(4)
    assert process.sample(x.cuda(), cuda_gen).device.type == "cuda"


# ----------------------------------------------------------------------------- AllMissing, UserMask


def test_all_missing():
    x = _x()
    process = AllMissing(SHAPE)
    assert process.name == "all-missing"
    assert torch.equal(process.sample(x), torch.zeros_like(x))
    assert isinstance(process, MaskProcess)


def test_user_mask_broadcast_and_per_image():
    x = _x(batch=3, shape=(2, 2))
    single = torch.tensor([1, 0, 1, 0])
    mask = UserMask(single).sample(x)
    assert mask.dtype == x.dtype and torch.equal(mask, single.float().expand(3, 4))
    per_image = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    process = UserMask(per_image)
    assert process.name == "user"
    out = process.sample(x)
    assert torch.equal(out, per_image.float())
    out.zero_()  # the returned mask is a fresh tensor
    assert torch.equal(process.sample(x), per_image.float())


def test_user_mask_wrong_shape():
    x = _x(batch=3)
    with pytest.raises(ValueError, match=re.escape("mask shape (5, 784) does not fit x of shape (3, 784)")):
        UserMask(torch.ones(5, D)).sample(x)
    with pytest.raises(ValueError, match=re.escape("expected (784,) or (3, 784)")):
        UserMask(torch.ones(100)).sample(x)
    with pytest.raises(ValueError, match=re.escape("shape (D,) or (B, D), got (1, 28, 28)")):
        UserMask(torch.ones(1, 28, 28))


def test_user_mask_bad_values():
    with pytest.raises(ValueError, match=r"values must be 0 \(missing\) or 1 \(known\); found 0\.5"):
        UserMask(torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"found -1, 2"):
        UserMask(torch.tensor([-1, 2, 1]))
    with pytest.raises(ValueError, match="found nan"):
        UserMask(torch.tensor([float("nan"), 1.0]))


def test_validate_mask():
    x = _x(batch=2, shape=(2, 2), dtype=torch.float64)
    out = validate_mask(torch.tensor([1.0, 0.0, 0.0, 1.0]), x)
    assert out.shape == (2, 4) and out.dtype == torch.float64
    with pytest.raises(ValueError, match=re.escape("mask shape (3,) does not fit x of shape (2, 4)")):
        validate_mask(torch.ones(3), x)
    with pytest.raises(ValueError, match="found 0.25"):
        validate_mask(torch.full((4,), 0.25), x)


# ----------------------------------------------------------------------------- shapes of x, image_shape


@pytest.mark.parametrize("image_shape", [(28,), (28, 0), (28.0, 28), "28x28", (28, 28, 1), None])
def test_bad_image_shape(image_shape):
    with pytest.raises(ValueError, match=r"image_shape must be a pair of positive ints"):
        MCAR(50, image_shape)


def test_x_must_match_image_shape():
    with pytest.raises(ValueError, match=re.escape("x must have shape (B, 784), got (4, 64)")):
        MCAR(50, SHAPE).sample(torch.rand(4, 64))
    with pytest.raises(ValueError, match=re.escape("shape (B, H*W), got (4, 28, 28)")):
        MAR(5, SHAPE).sample(torch.rand(4, 28, 28))
    with pytest.raises(ValueError, match="floating dtype"):
        AllMissing(SHAPE).sample(torch.ones(4, D, dtype=torch.uint8))


# ----------------------------------------------------------------------------- make_mask_process


@pytest.mark.parametrize(
    "spec, cls, name",
    [
        ("mcar-80", MCAR, "mcar-80"),
        ("MCAR-100", MCAR, "mcar-100"),
        (" mcar-0 ", MCAR, "mcar-0"),
        ("mcar-12.5", MCAR, "mcar-12.5"),
        ("mar-14", MAR, "mar-14"),
        ("MAR-28", MAR, "mar-28"),
        ("all-missing", AllMissing, "all-missing"),
        ("Unconditional", AllMissing, "all-missing"),
    ],
)
def test_make_mask_process(spec, cls, name):
    process = make_mask_process(spec, SHAPE)
    assert isinstance(process, cls) and process.name == name
    assert process.image_shape == SHAPE


@pytest.mark.parametrize("spec", ["mcar", "mcar-", "mar-14x", "mnar-10", "mcar_80", "", "random", 80])
def test_make_mask_process_unknown(spec):
    with pytest.raises(ValueError, match=r"accepted forms: 'mcar-<percent>'.*'mar-<size>'.*'all-missing'"):
        make_mask_process(spec, SHAPE)


def test_make_mask_process_out_of_range():
    with pytest.raises(ValueError, match=r"percent must be a number in \[0, 100\].*150"):
        make_mask_process("mcar-150", SHAPE)
    with pytest.raises(ValueError, match=r"size must be an int in 1\.\.28.*40"):
        make_mask_process("mar-40", SHAPE)


def test_the_value_scan_is_validation_in_the_models_and_always_in_validate_mask():
    """validate_mask scans the values whatever Pyro's validation says (a user's mask, or python -O); the
    imputers' model and guide scan them as argument validation, skipped in the Trainer's step (validation
    off there) where reading the result back would stall a GPU."""
    import pyro

    from ppl_models import GPSI

    x = torch.zeros(2, 4)
    bad = torch.full((2, 4), 0.5)
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match="must be 0 .missing. or 1 .known.; found 0.5"):
            validate_mask(bad, x)
        policy = GPSI(x_dim=4, z_dim=2, hidden=(3,), num_steps=1)
        policy.guide(x, bad)  # no scan, no error
    with pytest.raises(ValueError, match="found 0.5"):
        policy.guide(x, bad)
