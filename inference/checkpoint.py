r"""Checkpoint files: atomic writes and loading (the part of the training driver that touches disk).

A file is written atomically — a temporary file in the same directory, flushed and fsynced, then
:func:`os.replace`\ d onto the target — so a crash mid-write leaves the previous file intact. Used for
training checkpoints (:class:`inference.train.Trainer`), best-epoch weights and every result file the
experiments write.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from inference.distributed import is_writer

__all__ = [
    "BEST_NAME", "CHECKPOINT_NAME", "METRICS_NAME", "atomic_write", "load_checkpoint", "save_checkpoint",
    "save_figure", "write_text",
]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.jsonl"


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> None:
    """
    Write a file atomically: ``write(f)`` fills a temporary file in the same directory, which is
    flushed and fsynced, then :func:`os.replace`\\ d onto ``path``. If anything fails (or the process
    is killed) the previous file at ``path`` is left intact; on an exception the temporary file is
    removed.

    Inside a process group of several processes (``torchrun``) only rank 0 writes; on the others this
    does nothing (:mod:`inference.distributed`), so every file is written once.
    """
    if not is_writer():
        return
    path = Path(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Atomically write ``state`` with :func:`torch.save` (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(dict(state), f))


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure atomically (see :func:`atomic_write`), in the format its suffix names."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", **savefig_kwargs))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """
    Load a checkpoint written by :func:`save_checkpoint`. ``map_location`` defaults to CPU, which
    keeps RNG states loadable; module and optimiser ``load_state_dict`` move tensors to the right
    device. Uses ``weights_only=False``: only load files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint found at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def _open_temp(path: Path) -> tuple[int, Path]:
    # Same directory as `path`, so os.replace is an atomic rename. Unlike tempfile.mkstemp (mode 0600)
    # this creates the file with the usual umask-derived permissions.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) everywhere.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
