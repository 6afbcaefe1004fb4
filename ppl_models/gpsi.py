"""GPSI: the direct sequential imputation policy (Guided Policy Search Imputer), -add and -jump.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 3.1, Eq. 17, Fig. 6
(ImpTrainLoop1), sizes from Sec. 9.1. An image x = [x_u; x_k] is split by a mask m (1 = known) into known
values x_k and missing values x_u. The policy refines a guess c_t of the missing values in T steps:

    p (model):  z_t ~ p_θ(z_t | c_{t-1}, x_k),  c_t = c_{t-1} + ω_θ(z_t)  (-add)  or  c_t = ω_θ(z_t)  (-jump)
                cost −log p(x_u | c_T) = −Σ_{d missing} log Bernoulli(x_d | σ(c_{T,d}))
    q (guide):  z_t ~ q_φ(z_t | c_{t-1}, x),    the same update, with the same ω_θ

    Eq. 17:     min  E_q[−log p(x_u | c_T)] + KL(q(z_{1:T} | x_u, x_k) || p(z_{1:T} | x_k))

trained with :class:`inference.pathwise_kl_elbo.PathwiseKL_ELBO` (analytic one-step KLs along the path).

Symbols to code: p -> :meth:`GPSI.model`, q -> :meth:`GPSI.guide`, ω_θ -> ``GPSI.omega``, p_θ's step
selector -> ``GPSI.p_net``, q_φ's -> ``GPSI.q_net``, c_t -> ``canvas`` (logits; the guess is σ(c_t)),
c_0 -> the trainable bias ``GPSI.c0`` (initialised at the logit of the mean training pixel, so the first
guess is the mean image, as in the paper's code), T -> ``num_steps``, z_t -> sites ``z_1..z_T``, the
observation -> site ``x``, masked to the missing pixels with ``.mask()``.

What each policy sees at step t: p gets the current image [x_k; σ(c_{t-1})_u] (known pixels clamped to
their values, missing ones the current guess) and the mask; q additionally gets the residual
x − σ(c_{t-1}) on every pixel (as the paper's code), which is where x_u enters. With an all-missing mask
(MCAR-100) p sees nothing of x and is an unconditional generator; ``model(None, None, num_samples=n)``
samples from it without data.
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from ppl_models.base import register_model
from ppl_models.imputation_policy import ImputationPolicy
from ppl_models.policy_parts import (
    SharedPath,
    cat_inputs,
    check_sizes,
    check_update,
    diag_normal,
    initial_canvas,
    mlp,
    update_canvas,
)


class GPSI(ImputationPolicy):
    """Primary policy p, guide policy q and the shared imputation constructor ω in one module.

    :param x_dim: pixels per image.
    :param z_dim: dimension of each step z_t (paper: 100 for MNIST).
    :param hidden: hidden ReLU layers of each of the three networks (paper: 1000, 1000 for MNIST; its
        code: 500, 500).
    :param num_steps: refinement steps T (paper: 6).
    :param update: ``"add"`` or ``"jump"``.
    :param init_mean: optional (x_dim,) mean training image; c_0 starts at its logit.
    """

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 100,
        hidden: tuple[int, ...] = (1000, 1000),
        num_steps: int = 6,
        update: str = "add",
        init_mean: torch.Tensor | None = None,
    ) -> None:
        super().__init__("gpsi")
        hidden_sizes = {f"hidden[{i}]": h for i, h in enumerate(hidden)}
        check_sizes(x_dim=x_dim, z_dim=z_dim, num_steps=num_steps, **hidden_sizes)
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, tuple(hidden)
        self.num_steps, self.update = num_steps, check_update(update)
        self.p_net = mlp([2 * x_dim, *hidden, 2 * z_dim])  # [current image, mask]
        self.q_net = mlp([3 * x_dim, *hidden, 2 * z_dim])  # [current image, mask, residual]
        self.omega = mlp([z_dim, *reversed(hidden), x_dim])
        self.c0 = initial_canvas(x_dim, init_mean)
        self._path = SharedPath()

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(f"z_{t}" for t in range(1, self.num_steps + 1))

    def guide_parameters(self) -> list[nn.Parameter]:
        """φ: q's network (ω and c_0 are shared with p)."""
        return list(self.q_net.parameters())

    def _write(self, canvas: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """c_t from c_{t-1} and z_t: the imputation constructor ω and the canvas update."""
        return update_canvas(canvas, self.omega(z), self.update)

    def _roll_out(self, x: torch.Tensor, mask: torch.Tensor, guide: bool) -> list[torch.Tensor]:
        """One trajectory of p (``guide=False``) or q; returns the canvases c_0..c_T."""
        canvas = self.c0.expand(x.shape[0], -1)
        canvases = [canvas]
        known = mask * x  # the only part of x the primary policy may read
        path = self._path.begin(record=guide)  # q's canvases, reused by the model's replay
        for t in pyro.markov(range(1, self.num_steps + 1)):
            guess = torch.sigmoid(canvas)
            current = known + (1 - mask) * guess
            if guide:
                params = self.q_net(cat_inputs([current, mask, x - guess]))
            else:
                params = self.p_net(cat_inputs([current, mask]))
            z = pyro.sample(f"z_{t}", diag_normal(params))
            canvas = path.step(z, self._write, canvas, z)
            canvases.append(canvas)
        return canvases


register_model("gpsi-add", GPSI, kind="imputer", update="add",
               about="GPSI-add, c_t = c_{t-1} + ω(z_t) (Bachman & Precup 2015, Sec. 3.1)")
register_model("gpsi-jump", GPSI, kind="imputer", update="jump",
               about="GPSI-jump, c_t = ω(z_t) (Bachman & Precup 2015, Sec. 3.1)")
