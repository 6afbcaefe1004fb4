"""Guide fine-tuning: re-fit the guide policy q to the data being scored, with the model p frozen.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.5 and Sec. 9.1 ("the
variational posterior fine-tuning stage lasted 50k updates"). With θ fixed, every guide q_φ gives a valid
bound −log p_θ(x) ≤ E_q[−log p_θ(x, τ) + log q_φ(τ | x)], so minimising the bound over φ on the test images
themselves only tightens it towards −log p_θ(x); it changes nothing about the model being scored. This is
what amortised inference gives up (the "amortisation gap"), and what the paper reports beside the raw bound.

    φ* = argmin_φ  Σ_{x ∈ scored set}  [ KL(q_φ(τ|x) || p_θ(τ)) − E_{q_φ} log p_θ(x | τ) ]      θ fixed

Symbols to code: φ -> ``guide_params`` (e.g. :meth:`ppl_models.draw.DRAWGenerator.guide_parameters`), θ ->
every other parameter of ``module``, which is frozen (``requires_grad`` off, so no gradient reaches it and the
global-norm clip sees only φ's gradients) for the duration and restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from pyro.infer import ELBO
from torch import nn

from inference.train import Trainer


@contextlib.contextmanager
def frozen_except(module: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter of ``module`` not in ``trainable``; restore on exit."""
    keep = {id(p) for p in trainable}
    owned = {id(p) for p in module.parameters()}
    missing = [i for i, p in enumerate(trainable) if id(p) not in owned]
    if missing:
        raise ValueError(f"guide_params[{missing}] are not parameters of the module being fine-tuned")
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def finetune_guide(
    module: nn.Module,
    model: Callable[..., Any],
    guide: Callable[..., Any],
    guide_params: Sequence[nn.Parameter],
    loss: ELBO,
    data: torch.Tensor | Sequence[torch.Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | torch.device,
    out_dir: str | os.PathLike,
    clip_norm: float | None = None,
    evaluate: Callable[[int], dict[str, Any]] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Optimise ``guide_params`` (only) by Adam on ``loss`` over ``data`` for ``epochs`` passes, with the
    model's parameters frozen; checkpoints, resume and the NaN stop are :class:`inference.train.Trainer`'s
    (its files go to ``out_dir``). Returns the per-epoch metrics."""
    params = list(guide_params)
    if not params:
        raise ValueError("guide_params is empty: there is nothing to fine-tune")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    with frozen_except(module, params), warnings.catch_warnings():
        # pyro.module skips frozen parameters with a warning per tensor; skipping them is the point here.
        warnings.filterwarnings("ignore", message=".*was not registered in the param store")
        trainer = Trainer(
            model, guide, module, loss,
            # The factory ignores module.parameters(): only φ is handed to the optimiser.
            lambda _all: torch.optim.Adam(params, lr=lr),
            train_data=data, batch_size=batch_size, epochs=epochs, seed=seed, device=device,
            out_dir=out_dir, evaluate=evaluate, progress=progress, clip_norm=clip_norm,
        )
        return trainer.fit(resume=resume)
