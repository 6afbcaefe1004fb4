r"""Data-parallel training over processes started by ``torchrun``: one data shard per process, summed
gradients, files written once.

Start any experiment with ``torchrun`` instead of ``python``::

    torchrun --standalone --nproc_per_node 4 -m experiments.vae --preset paper --out runs/vae-4gpu
    # two machines, four GPUs each (run on both; the rendezvous endpoint is the first machine):
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint host0:29400 \
        --rdzv_id vae1 -m experiments.vae --preset paper --out /shared/runs/vae-8gpu

:func:`init_from_env` (called by every experiment through :func:`experiments.common.run_experiment`) joins
the process group that torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``...): NCCL on CUDA, with process ``LOCAL_RANK`` on GPU ``LOCAL_RANK``, gloo on the CPU.
Without torchrun (``WORLD_SIZE`` unset or 1) nothing changes: a run is the single-process run.

How a step is shared (:class:`inference.train.Trainer` does it; the symbols are the Trainer's):

- every process draws the *same* permutation of the data (the data generator is seeded alike), and the
  minibatch of ``batch_size`` indices is split into ``world_size`` contiguous shards (:func:`shard`), one
  per process: the global minibatch is the single-process one, so presets keep their meaning;
- each process computes the ELBO loss of its shard, *summed* over the shard as every loss in this library
  is, and back-propagates; the gradients are *summed* over processes, which is the gradient of the loss
  summed over the whole minibatch. Every process then clips and steps the same gradient from the same
  weights (rank 0's, broadcast at the start), so the weights stay identical without further communication.
  A step of N processes therefore equals a single-process step on the concatenated shards
  (``tests/test_distributed.py`` checks it with gloo), for models whose buffers do not depend on the
  minibatch. Batch-norm layers (the convolutional VAE, walkback's ``norm="batch"``) normalise with their
  own shard's statistics, as under ``DistributedDataParallel`` without ``SyncBatchNorm``; variational
  walkback's p* moments are computed over the whole minibatch;
- the summing is done by ``torch.nn.parallel.DistributedDataParallel`` (:func:`data_parallel`), as in
  Pyro's Lightning example: the Trainer wraps the step's loss as a module (``ELBO.differentiable_loss``
  plus the hooks' generator terms, whose ``forward`` returns it) and DDP all-reduces gradient buckets
  while the backward pass still runs, in both Trainer modes (in SVI mode the Pyro optimiser then steps the
  parameters the trace reached). Its comm hook sums instead of DDP's default average, because the losses
  are sums; ``find_unused_parameters`` is on, so a parameter no process reached keeps no gradient, as in
  a single-process step; buffers are not re-broadcast each step (each process keeps its own batch-norm
  running statistics; rank 0's module state is broadcast after each evaluation). The exceptions: a loss that
  steps online, several optimiser steps per minibatch (variational walkback's
  :class:`inference.walkback.OnlineWalkbackELBO`), since one forward cannot carry several backward passes
  through DDP; and a loss without ``differentiable_loss`` (Pyro's ``TraceGraph_ELBO``, ``RenyiELBO``), which
  back-propagates inside ``loss_and_grads``. There the Trainer sums the gradients itself
  (:func:`all_reduce_gradients`, the same collective on one flat bucket, after the backward pass);
- the networks of :class:`inference.train.ExtraTerm` hooks (the discriminator, the guide function f, the
  Q-network) are data-parallel too: each hook's optimiser all-reduces its gradients before it steps,
  *averaged*, because hook losses are means over their minibatch (a hook whose loss is a sum sets
  ``gradient_reduction = "sum"``);
- randomness: the global torch/numpy/python RNGs (the guide's draws) and the generator handed to
  ``transform`` (dynamic binarisation, masks) are seeded per process (:func:`rank_seed`; rank 0 keeps the
  run's seed), so shards do not share noise; checkpoints hold every process's RNG states. A ``transform``
  that also makes a choice for the whole minibatch (walkback's walk length) must take rank 0's
  (:func:`broadcast_object`), or the processes would run different numbers of steps;
- evaluation between epochs runs on every process (the same weights); rank 0's metrics decide the best
  epoch everywhere, and rank 0's module state is broadcast afterwards (an evaluation may fit a variance).
  The hooks' logged metrics are rank 0's shard's;
- control flow must agree: every decision that leads to a collective (a hook's gate, a non-finite stop) is
  taken on all-reduced quantities, so all processes step alike;
- files: only rank 0 writes (:func:`is_writer` gates :func:`inference.checkpoint.atomic_write`, through which
  every checkpoint, JSON, markdown page and figure is written); the others read what it wrote (resume, the
  best epoch) after a barrier. The output directory must therefore be on a file system every node sees;
- evaluation after training: the scorer :func:`inference.scoring.score_bound_and_iwae` shards its rows
  (:func:`shard_range`) and gathers every row's score to every process (:func:`all_gather_object`); the rest
  runs on every process (same weights) and only rank 0's report is kept.

Limits: ``--device cuda:N`` is replaced by ``cuda:LOCAL_RANK`` (torchrun chooses the GPUs); ``pyro.param``
sites outside the module are refused where the step runs through DDP, which reduces the module's gradients
only (none of this project's models has one); ``--jobs`` of the imputation table cannot be combined with
torchrun.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "all_gather_object", "all_reduce_gradients", "all_reduce_sum", "all_reduce_tensor", "barrier",
    "broadcast_module", "data_parallel", "gather_to_writer", "shard_range",
    "broadcast_object", "init_from_env", "is_distributed", "is_writer", "rank", "rank_seed", "shard",
    "shutdown", "world_size",
]


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes in the environment, if any, and return the device this
    process trains on: ``cuda:LOCAL_RANK`` when ``device`` is a CUDA device, else ``device``. Without
    ``WORLD_SIZE`` > 1 it does nothing and returns ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return _local_device(device) if is_distributed() else device
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world} asks for {world} processes, but this torch has no "
                         "torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return _local_device(device)


def shutdown(wait: bool = True) -> None:
    """Leave the process group, if this process is in one: after a barrier with ``wait`` (a run that ended
    well, so no process leaves while another still writes); at once without (after an error, where the
    others may never reach a barrier: torchrun stops them when this process exits with an error)."""
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def _local_device(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return rank() == 0


def rank_seed(seed: int, process: int | None = None) -> int:
    """The seed of process ``process`` (default: this one) in a run seeded ``seed``: ``seed`` itself on rank
    0, so a one-process run is the single-process run; far-apart values elsewhere, so that runs seeded 0 and
    1 do not share streams between their ranks."""
    r = rank() if process is None else process
    return seed + 1_000_003 * r


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This process's contiguous part of a minibatch's indices (all of them outside a process group)."""
    start, stop = shard_range(indices.shape[0])
    return indices[start:stop]


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """The sums over processes of a few scalars (one collective); the values themselves outside a group."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_gradients(params: Iterable[torch.Tensor], average: bool = False) -> None:
    """Sum (or average) the gradients of ``params`` over processes, in place, with one all-reduce of a
    flat buffer. Every process must pass the same parameters in the same order. A parameter without a
    gradient on some process counts as zero there; it gets a gradient if any process had one, and keeps
    ``None`` if none had (so an optimiser skips it everywhere alike)."""
    params = list(params)
    if not is_distributed() or not params:
        return
    ref = params[0]
    sizes = [p.numel() for p in params]
    parts = [p.grad.reshape(-1).to(ref.dtype) if p.grad is not None else ref.new_zeros(n)
             for p, n in zip(params, sizes, strict=True)]
    present = ref.new_tensor([float(p.grad is not None) for p in params])
    flat = torch.cat([*parts, present])
    dist.all_reduce(flat)
    if average:
        flat[: sum(sizes)] /= world_size()
    chunks = flat[: sum(sizes)].split(sizes)
    for p, g, seen in zip(params, chunks, flat[sum(sizes):].tolist(), strict=True):
        p.grad = g.view_as(p).to(p.dtype).clone() if seen > 0 else None


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, with gradients *summed*
    over processes (every loss here is a sum over its minibatch, so the sum of the shards' gradients is
    the minibatch's), unused parameters allowed (they keep ``None`` where no process reached them) and
    buffers left to each process after the initial broadcast. ``module`` itself outside a process group."""
    if not is_distributed():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers; accept either torch.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync = "forward_sync_buffers" if renamed else "broadcast_buffers"
    wrapped = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True, **{sync: False})
    wrapped.register_comm_hook(None, _sum_buckets)
    return wrapped


def _sum_buckets(state, bucket):  # unannotated: DDP refuses a bucket annotation other than dist.GradBucket
    """DDP comm hook: all-reduce a gradient bucket as a sum (DDP's default hook divides by the world size)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over processes (a new tensor; ``t`` itself outside a group)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def shard_range(n: int) -> tuple[int, int]:
    """This process's contiguous rows ``[start, stop)`` of ``n`` rows, as :func:`shard` splits them (all of
    them outside a group): concatenated in rank order, the processes' parts are the rows in order."""
    if not is_distributed():
        return 0, n
    size, extra = divmod(n, world_size())
    r = rank()
    start = r * size + min(r, extra)
    return start, start + size + (1 if r < extra else 0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order, on every process (``[obj]`` outside a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_writer(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` in rank order on rank 0 (``None`` elsewhere; ``[obj]`` outside a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_module(module: torch.nn.Module) -> None:
    """Overwrite every process's parameters and buffers with rank 0's (as ``DistributedDataParallel``
    does at construction)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every process (nothing outside a group)."""
    if is_distributed():
        dist.barrier()
