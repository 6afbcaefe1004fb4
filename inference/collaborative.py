"""Collaborative shaping: a guide function f that learns log D(x)/G(x), and the generator loss it gives.

Bachman & Precup (2015), "Variational generative stochastic networks with collaborative shaping", Sec. 5
(Eqs. 6-7, Theorem 3) and Sec. 6-7 (Fig. 2, the VCG loop). A generator g_θ emits samples with distribution
G; the guide function f is a binary classifier between data (D, positive) and generated samples (G,
negative), trained with the logistic loss (Eq. 6)::

    L_f = E_{x~D}[ b(f(x)) ] + E_{x~G}[ b(−f(x)) ],     b(f) = log(1 + exp(−f))

so that at its optimum f(x) = log D(x)/G(x). The generator moves the mass it puts where f(x) < 0
(over-dense regions) towards the zero-contours of f, leaving under-dense regions alone (Eq. 7)::

    L_g = E_{x~G}[ h(x) ],   h = |f(x)|·I[f(x) < 0]  (Eq. 7)   or, as Sec. 7 used, the half-rectified
    elastic net  h = a·[−f(x)]_+ + c·([−f(x)]_+)²,  linear and quadratic parts weighted equally.

L_g is zero wherever f(x) ≥ 0, and both losses are at their minimum together only when G = D (Theorem 3).

Here f is :class:`GuideFunction`, a maxout network (the paper's: two hidden layers of 1200 units in 300
groups of 4), with the original code's two safeguards as options: outputs bounded as ``bound·tanh(f/bound)``
(20) and a penalty ``f_penalty·mean(f²)`` (0.05) in L_f. :class:`CollaborativeShaping` trains it beside the
Pyro objective as an :class:`inference.train.ExtraTerm`: its ``generator_loss`` unrolls the chain from the
minibatch (:meth:`ppl_models.gsn_chain.GSNChain.unroll`, with BPTT) and returns ``lg_weight · Σ_{n,t}
h(x_{n,t})`` over the emitted x_1 … x_T, added to the free energy; its ``step`` then updates f alone, with its
own optimiser, on the minibatch (D) against those emitted points (G, detached). The unroll is a second path
of the chain, drawn after the free energy's: an unbiased estimate of the same expected L_g gradient.

Symbols to code: f -> ``GuideFunction``, D -> the minibatch, G -> the chain's emitted points, b -> softplus
of −f, h -> :func:`generator_hinge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from inference.train import ExtraTerm


class Maxout(nn.Module):
    """A linear layer with ``units · pieces`` outputs followed by the max over groups of ``pieces``."""

    def __init__(self, in_features: int, units: int, pieces: int) -> None:
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(in_features, units * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y.reshape(*y.shape[:-1], self.units, self.pieces).amax(-1)


class GuideFunction(nn.Module):
    """f: R^D -> R, a maxout network (hidden layers of ``hidden`` linear units in groups of ``pieces``),
    its output bounded as ``bound·tanh(f/bound)`` (no bound when ``bound`` is None)."""

    def __init__(self, x_dim: int, hidden: Sequence[int] = (1200, 1200), pieces: int = 4,
                 bound: float | None = 20.0) -> None:
        super().__init__()
        if pieces < 1 or any(h % pieces for h in hidden):
            raise ValueError(f"every hidden size must be a multiple of pieces={pieces}, got {list(hidden)}")
        layers: list[nn.Module] = []
        width = x_dim
        for h in hidden:
            layers.append(Maxout(width, h // pieces, pieces))
            width = h // pieces
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)
        self.bound = bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.out(self.body(x)).squeeze(-1)
        return f if self.bound is None else self.bound * torch.tanh(f / self.bound)


def guide_function_loss(f_data: torch.Tensor, f_generated: torch.Tensor) -> torch.Tensor:
    """Eq. 6: mean b(f) over data plus mean b(−f) over generated points, b(f) = log(1 + e^{−f})."""
    return F.softplus(-f_data).mean() + F.softplus(f_generated).mean()


def generator_hinge(f: torch.Tensor, linear: float = 0.5, quadratic: float = 0.5) -> torch.Tensor:
    """h of L_g per point: ``linear·[−f]_+ + quadratic·([−f]_+)²`` (Eq. 7 is linear=1, quadratic=0; Sec. 7's
    half-rectified elastic net weights the two parts equally). Zero wherever f ≥ 0."""
    excess = (-f).clamp(min=0)
    return linear * excess + quadratic * excess.pow(2)


class Unrollable(Protocol):
    """A generator whose chain can be unrolled differentiably: ``unroll(x) -> (T, B, D)`` emitted points."""

    def unroll(self, x: torch.Tensor) -> torch.Tensor: ...


class CollaborativeShaping(ExtraTerm):
    """The guide function f and the generator loss L_g of a chain, as a trainer hook (module docstring).

    :param chain: the generator: anything with ``unroll(x) -> (T, B, D)`` emitted points.
    :param lr: Adam learning rate of f.
    :param lg_weight: weight of Σ h(x) over emitted points in the generator's loss (0: f is trained but the
        generator gets no term).
    :param f_penalty: weight of mean(f²) in f's loss.
    """

    name = "guide_f"

    def __init__(self, chain: Unrollable, x_dim: int, hidden: Sequence[int] = (1200, 1200), pieces: int = 4,
                 bound: float | None = 20.0, lr: float = 1e-4, lg_weight: float = 1.0,
                 f_penalty: float = 0.05, linear: float = 0.5, quadratic: float = 0.5) -> None:
        form = (getattr(chain, "feed", None), getattr(chain, "likelihood", None))
        if lg_weight and form == ("sample", "bernoulli"):
            raise ValueError("L_g cannot reach a chain that feeds Bernoulli draws forward (a discrete draw "
                             "has no reparameterised gradient): use feed='mean' or a Gaussian likelihood, "
                             "or lg_weight=0")
        self.chain = chain
        self.module = GuideFunction(x_dim, hidden, pieces, bound)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)
        self.lg_weight, self.f_penalty, self.linear, self.quadratic = lg_weight, f_penalty, linear, quadratic
        self._generated: torch.Tensor | None = None
        self._lg = 0.0

    def generator_loss(self, batch: torch.Tensor) -> torch.Tensor | None:
        emitted = self.chain.unroll(batch)  # (T, B, D), differentiable through the chain
        self._generated = emitted.detach().reshape(-1, emitted.shape[-1])
        h = generator_hinge(self.module(emitted), self.linear, self.quadratic)
        self._lg = float(h.detach().mean())
        return self.lg_weight * h.sum() if self.lg_weight else None

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        if self._generated is None:  # no generator term ran this step
            with torch.no_grad():
                self._generated = self.chain.unroll(batch).reshape(-1, batch.shape[-1])
        f_data, f_gen = self.module(batch), self.module(self._generated)
        loss = guide_function_loss(f_data, f_gen)
        total = loss + self.f_penalty * torch.cat([f_data, f_gen]).pow(2).mean() if self.f_penalty else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self._generated = None
        with torch.no_grad():
            acc = 0.5 * ((f_data > 0).float().mean() + (f_gen < 0).float().mean())
        return {"loss": float(loss.detach()), "accuracy": float(acc), "f_data": float(f_data.detach().mean()),
                "f_generated": float(f_gen.detach().mean()), "L_g": self._lg}
