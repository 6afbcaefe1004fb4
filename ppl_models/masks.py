"""
Mask processes of the imputation MDP (Bachman & Precup 2015, "Data generation as sequential
decision making", Sec. 4 and 9.2).

In the imputation task part of an image is observed and the model fills in the rest. A mask
process draws, for a batch of images, which pixels are observed:

- :class:`MCAR` ("mcar-d"): missing completely at random; each pixel is independently missing
  with probability ``d / 100`` (as in the paper's public code). ``MCAR(100)`` hides everything,
  i.e. unconditional generation.
- :class:`MAR` ("mar-d"): a ``d x d`` square of missing pixels whose top-left corner is uniform
  over the positions that keep the square entirely inside the image.
- :class:`AllMissing` ("all-missing"): every pixel missing (unconditional generation).
- :class:`UserMask` ("user"): a fixed, user-given mask.

Conventions:

- Data ``x`` is a batch of flattened images, shape ``(B, H * W)`` (row-major), floating dtype.
- A mask is a tensor with ``x``'s shape, dtype and device, with **1 = known (observed) pixel
  and 0 = missing pixel** (to be imputed). The observed part of ``x`` is ``mask * x``.
- Sampling is vectorised over the batch. With a ``generator`` the random draws are made on the
  generator's device and moved to ``x``'s device, so the same generator state gives the same
  mask whatever the device of ``x``; with ``generator=None`` the global RNG of ``x``'s device
  is used.
- Bad settings raise :class:`ValueError` naming the offending value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
import re
from abc import ABC, abstractmethod

import torch

__all__ = [
    "MAR",
    "MCAR",
    "AllMissing",
    "MaskProcess",
    "UserMask",
    "make_mask_process",
    "validate_mask",
]


def _check_image_shape(image_shape: tuple[int, int]) -> tuple[int, int]:
    ok = (
        isinstance(image_shape, (tuple, list, torch.Size))
        and len(image_shape) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in image_shape)
    )
    if not ok:
        raise ValueError(f"image_shape must be a pair of positive ints (H, W), got {image_shape!r}")
    return int(image_shape[0]), int(image_shape[1])


def _check_data(x: torch.Tensor, num_pixels: int | None, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{who}: x must be a torch.Tensor of flattened images (B, H*W), got {type(x).__name__}"
        )
    if x.dim() != 2:
        raise ValueError(
            f"{who}: x must be a batch of flattened images of shape (B, H*W), got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{who}: x must have a floating dtype (the mask takes x's dtype), got {x.dtype}")
    if num_pixels is not None and x.shape[1] != num_pixels:
        raise ValueError(
            f"{who}: x has {x.shape[1]} pixels per row but the mask process expects H*W = {num_pixels}; "
            f"x must have shape (B, {num_pixels}), got {tuple(x.shape)}"
        )


def _draw_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    # Draw where the generator lives, so one generator state gives one mask on any device.
    return x.device if generator is None else generator.device


def _check_mask_values(mask: torch.Tensor, who: str, scan: bool = True) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{who}: mask must be a torch.Tensor of 0/1 values, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(
            f"{who}: mask must be real with values 0 (missing) or 1 (known), got dtype {mask.dtype}"
        )
    if not scan:
        return mask
    bad = (mask != 0) & (mask != 1)  # NaN is caught here too
    if bad.any():  # reads a value back: a host synchronisation on a GPU
        offending = torch.unique(mask[bad].detach().cpu())
        shown = ", ".join(f"{v:g}" for v in offending[:10].tolist())
        more = f" (and {offending.numel() - 10} more)" if offending.numel() > 10 else ""
        raise ValueError(
            f"{who}: mask values must be 0 (missing) or 1 (known); found {shown}{more} "
            f"at {int(bad.sum())} position(s)"
        )
    return mask


def validate_mask(mask: torch.Tensor, x: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """
    Checks a mask against a data batch and returns it in canonical form.

    :param mask: 0/1 values (1 = known, 0 = missing), a tensor (float, int or bool) of shape
        ``(D,)`` (one mask for every image) or ``(B, D)`` matching ``x``.
    :param x: the data batch, shape ``(B, D)``, floating dtype.
    :returns: the mask with ``x``'s shape, dtype and device (a new, contiguous tensor).
    :param check_values: scan the values (reads a result back to the host: a GPU waits for it). The models
        pass ``pyro.infer.util.is_validation_enabled()``, so the scan is argument validation there, as
        Pyro's: on by default, off in the Trainer's training step, where the masks come from a mask process.
    :raises ValueError: if the shape does not match ``x``, or (``check_values``) a value is not 0 or 1.
    """
    return _validate_mask(mask, x, "validate_mask", check_values)


def _validate_mask(mask: torch.Tensor, x: torch.Tensor, who: str, check_values: bool = True) -> torch.Tensor:
    _check_data(x, None, who)
    mask = _check_mask_values(mask, who, scan=check_values)
    batch, dim = x.shape
    if mask.shape not in ((dim,), (batch, dim)):
        raise ValueError(
            f"{who}: mask shape {tuple(mask.shape)} does not fit x of shape {tuple(x.shape)}; "
            f"expected ({dim},) or ({batch}, {dim})"
        )
    # Always a fresh tensor, so callers can never write into a stored mask.
    mask = mask.to(device=x.device, dtype=x.dtype).expand(batch, dim)
    return mask.clone(memory_format=torch.contiguous_format)


class MaskProcess(ABC):
    """
    Base class of mask processes. Subclasses implement :meth:`sample` and :attr:`name`.

    :param image_shape: ``(H, W)`` of the images, a pair of positive ints. (:class:`UserMask`
        has none: its mask fixes the number of pixels.)
    """

    image_shape: tuple[int, int] | None

    def __init__(self, image_shape: tuple[int, int]) -> None:
        self.image_shape = _check_image_shape(image_shape)

    @property
    def num_pixels(self) -> int | None:
        return None if self.image_shape is None else self.image_shape[0] * self.image_shape[1]

    @property
    @abstractmethod
    def name(self) -> str:
        """A short name such as ``"mcar-80"``, ``"mar-14"``, ``"all-missing"`` or ``"user"``."""
        raise NotImplementedError

    @abstractmethod
    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """
        Draws one mask per image of ``x``.

        :param x: flattened images, shape ``(B, H * W)``, floating dtype.
        :param generator: optional generator (same state -> same mask); ``None`` uses the global
            RNG of ``x``'s device.
        :returns: a 0/1 mask (1 = known, 0 = missing) with ``x``'s shape, dtype and device.
        """
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(x, generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, image_shape={self.image_shape})"


class MCAR(MaskProcess):
    """
    Missing completely at random: each pixel is independently missing with probability
    ``percent / 100``. ``MCAR(0, ...)`` observes everything, ``MCAR(100, ...)`` nothing.

    :param percent: a real number in ``[0, 100]``.
    :param image_shape: ``(H, W)``.
    """

    def __init__(self, percent: float, image_shape: tuple[int, int]) -> None:
        valid = (
            isinstance(percent, numbers.Real)
            and not isinstance(percent, bool)
            and math.isfinite(percent)
            and 0 <= percent <= 100
        )
        if not valid:
            raise ValueError(f"MCAR: percent must be a number in [0, 100] (percent missing), got {percent!r}")
        super().__init__(image_shape)
        self.percent = float(percent)

    @property
    def name(self) -> str:
        return f"mcar-{self.percent:g}"

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_data(x, self.num_pixels, f"MCAR({self.percent:g})")
        u = torch.rand(x.shape, generator=generator, device=_draw_device(x, generator))
        # u is in [0, 1): p = 0 keeps every pixel and p = 1 drops every pixel, exactly.
        return (u >= self.percent / 100).to(device=x.device, dtype=x.dtype)


class MAR(MaskProcess):
    """
    A ``size x size`` square of missing pixels per image. Its top-left corner ``(row, col)`` has
    ``row`` uniform on ``0..H-size`` and ``col`` uniform on ``0..W-size``, independently, so the
    square always lies inside the image.

    :param size: an int in ``1..min(H, W)``.
    :param image_shape: ``(H, W)``.
    """

    def __init__(self, size: int, image_shape: tuple[int, int]) -> None:
        image_shape = _check_image_shape(image_shape)
        max_size = min(image_shape)
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 1 <= size <= max_size:
            raise ValueError(
                f"MAR: size must be an int in 1..{max_size} (the square must fit in a "
                f"{image_shape[0]}x{image_shape[1]} image), got {size!r}"
            )
        super().__init__(image_shape)
        self.size = int(size)

    @property
    def name(self) -> str:
        return f"mar-{self.size}"

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_data(x, self.num_pixels, f"MAR({self.size})")
        height, width = self.image_shape
        batch = x.shape[0]
        device = _draw_device(x, generator)
        top = torch.randint(0, height - self.size + 1, (batch, 1), generator=generator, device=device)
        left = torch.randint(0, width - self.size + 1, (batch, 1), generator=generator, device=device)
        top, left = top.to(x.device), left.to(x.device)
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        in_rows = (rows >= top) & (rows < top + self.size)  # (B, H)
        in_cols = (cols >= left) & (cols < left + self.size)  # (B, W)
        missing = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
        return (~missing).reshape(batch, height * width).to(x.dtype)


class AllMissing(MaskProcess):
    """Every pixel missing: unconditional generation. The mask is all zeros."""

    def __init__(self, image_shape: tuple[int, int]) -> None:
        super().__init__(image_shape)

    @property
    def name(self) -> str:
        return "all-missing"

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_data(x, self.num_pixels, "AllMissing")
        return torch.zeros_like(x)


class UserMask(MaskProcess):
    """
    A fixed, user-given mask. Its values must be 0/1 (checked here); its shape, ``(D,)`` for one
    mask broadcast to the batch or ``(B, D)`` for one mask per image, is checked against ``x`` in
    :meth:`sample`.

    :param mask: a tensor of 0/1 values (float, int or bool), 1 = known, 0 = missing.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        mask = _check_mask_values(mask, "UserMask")
        if mask.dim() not in (1, 2):
            raise ValueError(f"UserMask: mask must have shape (D,) or (B, D), got {tuple(mask.shape)}")
        self.image_shape = None
        self.mask = mask.detach().clone()  # a private copy: later edits by the caller do not leak in

    @property
    def name(self) -> str:
        return "user"

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _validate_mask(self.mask, x, "UserMask")

    def __repr__(self) -> str:
        return f"UserMask(shape={tuple(self.mask.shape)})"


_SPEC_FORMS = (
    "'mcar-<percent>' (percent in [0, 100], e.g. 'mcar-80'), 'mar-<size>' (size in 1..min(H, W), "
    "e.g. 'mar-14'), 'all-missing' or 'unconditional' (case-insensitive)"
)
_MCAR_RE = re.compile(r"mcar-(\d+(?:\.\d*)?)")
_MAR_RE = re.compile(r"mar-(\d+)")


def make_mask_process(spec: str, image_shape: tuple[int, int]) -> MaskProcess:
    """
    Builds a mask process from a spec string: ``"mcar-80"``, ``"mar-14"``, ``"mcar-100"``,
    ``"all-missing"`` or ``"unconditional"`` (case-insensitive, surrounding spaces ignored).

    :raises ValueError: for an unknown spec (the message lists the accepted forms) or settings
        out of range for ``image_shape``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"mask spec must be a string, got {spec!r}; accepted forms: {_SPEC_FORMS}")
    key = spec.strip().lower()
    if key in ("all-missing", "unconditional"):
        return AllMissing(image_shape)
    match = _MCAR_RE.fullmatch(key)
    if match:
        return MCAR(float(match.group(1)), image_shape)
    match = _MAR_RE.fullmatch(key)
    if match:
        return MAR(int(match.group(1)), image_shape)
    raise ValueError(f"unknown mask spec {spec!r}; accepted forms: {_SPEC_FORMS}")
