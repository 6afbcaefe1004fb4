"""Pyro's ClippedAdam update as one torch optimiser over all parameters, capturable in a CUDA graph.

``pyro.optim.ClippedAdam({...})`` (the optimiser of every experiment's SVI step) builds one
``pyro.optim.clipped_adam.ClippedAdam`` per parameter the first time the parameter is seen and steps them
one after another in Python, and its step counters and decayed learning rates are Python numbers, so the
update cannot be captured in a CUDA graph. :class:`ClippedAdam` here is the same update (Adam, Kingma & Ba
2015, Algorithm 1, with ε added to √v as Pyro adds it, the element-wise gradient clamp, the per-step
learning-rate decay and the optional centred variance) as one torch optimiser, which the Trainer's
differentiable-loss mode takes (``--step fused``), in one of two ways:

- *capturable* (the default off the CPU; ``capturable=True``): ``torch._foreach_*`` kernels over the
  parameters of each device and dtype, a few launches per step, and the step counters and the decayed rate
  (``lr · lrd^t``) computed on the device, so nothing is read back to the host and the step can be captured
  by :mod:`inference.cuda_graph`;
- otherwise (the default on the CPU) Pyro's own sequence of in-place operations per parameter, with the
  rate computed on the host: on a CPU the foreach kernels are loops over the same memory and only add passes
  (the optimiser's step over the VAE's parameters took twice as long that way, one thread).

The step counters are tensors on the parameters' device either way (float64 where the device has it), so a
checkpoint moves between the two. Pyro reaches the decayed rate by multiplying ``lr`` by ``lrd`` once per
step; here it is ``lr · lrd^t``, equal to float round-off. A parameter's step counter and rate advance only
on the steps where it has a gradient, as its own Pyro optimiser's do when it is called only for the
parameters with a gradient, which is what the Trainer's SVI step does (``tests/test_optim.py`` checks both
ways in float64 against Pyro's, over steps that skip a parameter too).

Symbols to code: α -> ``lr`` (decayed: α_t = ``lr · lrd^t``), β₁, β₂ -> ``betas``, ε -> ``eps``, m, v ->
state ``exp_avg``, ``exp_avg_sq``, t -> state ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["ClippedAdam"]


class ClippedAdam(torch.optim.Optimizer):
    """The update of :class:`pyro.optim.clipped_adam.ClippedAdam`, for all parameters in one optimiser.

    ``θ ← θ - α_t · √(1-β₂^t) / (1-β₁^t) · m_t / (√v_t + ε)`` with ``g`` clamped element-wise to
    ``[-clip_norm, clip_norm]`` (in place, as Pyro does), ``α_t = lr · lrd^t``, weight decay added to ``g``
    and, with ``centered_variance``, ``v`` the moving average of ``(g - m_t)²``.

    :param params: parameters or parameter groups, as any torch optimiser.
    :param lr: the learning rate at step 0, > 0.
    :param betas: (β₁, β₂), each in [0, 1).
    :param eps: ε, >= 0.
    :param weight_decay: L2 penalty added to the gradient, >= 0.
    :param clip_norm: bound of the element-wise gradient clamp, > 0 (not a norm, despite Pyro's name).
    :param lrd: learning-rate decay per step, > 0.
    :param centered_variance: use the centred second moment.
    :param capturable: keep the whole step on the device (foreach kernels, no host read), as CUDA graphs
        need; ``None`` (default): on for parameters off the CPU.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, clip_norm: float = 10.0, lrd: float = 1.0,
                 centered_variance: bool = False, capturable: bool | None = None):
        checks = {"lr": lr > 0, "eps": eps >= 0, "weight_decay": weight_decay >= 0,
                  "clip_norm": clip_norm > 0, "lrd": lrd > 0,
                  "betas": len(betas) == 2 and all(0 <= b < 1 for b in betas)}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"ClippedAdam: invalid {', '.join(bad)} (lr, clip_norm and lrd must be > 0, eps "
                             f"and weight_decay >= 0, both betas in [0, 1)); got lr={lr}, betas={betas}, "
                             f"eps={eps}, weight_decay={weight_decay}, clip_norm={clip_norm}, lrd={lrd}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, clip_norm=clip_norm,
                        lrd=lrd, centered_variance=centered_variance, capturable=capturable)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One update of every parameter that has a gradient; ``closure`` re-evaluates the loss, as in
        torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for params in _by_device_and_dtype(p for p in group["params"] if p.grad is not None):
                capturable = group["capturable"]
                if capturable is None:
                    capturable = params[0].device.type != "cpu"
                (self._update_on_device if capturable else self._update_each)(group, params)
        return loss

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=_scalar_dtype(p.device), device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update_each(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # Pyro's operations, parameter by parameter; the step counter is read back (free on a CPU).
        beta1, beta2 = group["betas"]
        for p in params:
            state = self._state(p)
            grad = p.grad
            grad.clamp_(-group["clip_norm"], group["clip_norm"])
            state["step"] += 1
            t = state["step"].item()
            if group["weight_decay"] != 0:
                grad = grad.add(p, alpha=group["weight_decay"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            spread = grad - exp_avg if group["centered_variance"] else grad
            exp_avg_sq.mul_(beta2).addcmul_(spread, spread, value=1 - beta2)
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            rate = group["lr"] * group["lrd"] ** t * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            p.addcdiv_(exp_avg, denom, value=-rate)

    def _update_on_device(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self._state(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        torch._foreach_add_(steps, 1)
        torch._foreach_clamp_min_(grads, -group["clip_norm"])
        torch._foreach_clamp_max_(grads, group["clip_norm"])
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        spread = torch._foreach_sub(grads, exp_avgs) if group["centered_variance"] else grads
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, spread, spread, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, group["eps"])
        # -α_t √(1-β₂^t) / (1-β₁^t), per parameter, from its step counter on the device.
        rate = torch._foreach_pow(group["lrd"], steps)
        torch._foreach_mul_(rate, -group["lr"])
        correction2 = torch._foreach_pow(beta2, steps)
        torch._foreach_neg_(correction2)
        torch._foreach_add_(correction2, 1)
        torch._foreach_sqrt_(correction2)
        correction1 = torch._foreach_pow(beta1, steps)
        torch._foreach_neg_(correction1)
        torch._foreach_add_(correction1, 1)
        torch._foreach_mul_(rate, correction2)
        torch._foreach_div_(rate, correction1)
        # θ + m / (denom / rate): the rate folded into the denominator, one pass fewer (as torch's Adam). The
        # rates in the parameters' dtype first (two kernels), as the division would take them anyway: a
        # foreach over lists of two dtypes falls back to a kernel per parameter.
        if rate[0].dtype != params[0].dtype:
            rate = list(torch.stack(rate).to(params[0].dtype).unbind(0))
        torch._foreach_div_(denom, rate)
        torch._foreach_addcdiv_(params, exp_avgs, denom)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, with every step counter put back on its parameter's device, and each group's
        ``capturable`` kept: how this optimiser runs is its own setting, not the checkpoint's."""
        capturable = [group["capturable"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, setting in zip(self.param_groups, capturable, strict=True):
            group["capturable"] = setting
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    step = torch.as_tensor(state["step"])
                    state["step"] = step.to(device=p.device, dtype=_scalar_dtype(p.device))


def _scalar_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps lr·lrd^t and the bias corrections as exact as Pyro's Python floats; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _by_device_and_dtype(params: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return list(groups.values())
