"""DRAW-style sequential generators: the open-loop LSTM generator and the extended (infinite-mixture,
closed-loop prior) generator, as Pyro model/guide pairs.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.4 (Eqs. 10-12,
GenTrainLoop1 of Fig. 4), Sec. 2.5 (Eq. 13, GenTrainLoop2 of Fig. 5), sizes from Sec. 9.1. The primary
policy p writes an image onto a canvas in T steps; the guide policy q sees the target image x* and steers
p's steps towards it. Both are trained by minimising KL(q(τ|x*) || p(τ)) − E_q log p(x*|c_T), an upper
bound on −log p(x*) (Eq. 12/13), with :class:`inference.pathwise_kl_elbo.PathwiseKL_ELBO` (one analytic KL
per step: the paper's "partial Rao-Blackwellisation", Sec. 9.1).

    open-loop (Sec. 2.4)                          extended (Sec. 2.5)
    s_0, s̃_0, c_0 trainable constants             z_0 ~ p(z_0) = N(0, I)        [q: q(z_0 | x*) = g_φ(x*)]
                                                  s_0, s̃_0 = f_θ(z_0)           (infinite mixture)
    for t = 1..T:                                 for t = 1..T:
      p: z_t ~ p(z_t) = N(0, I)                     p: z_t ~ p(z_t | s_{t-1}) = L_θ(v_{t-1})
      q: s̃_t = f_φ(s̃_{t-1}, g_φ(s_{t-1}, c_{t-1}, x*)),  z_t ~ q(z_t | s̃_t)  (both models)
      s_t = f_θ(s_{t-1}, z_t)
      c_t = c_{t-1} + ω_θ(v_t)   ("add")   or   c_t = L_θ(h_t)   ("jump": the canvas is read off the LSTM's
                                                                   memory, the paper's c_T = L_θ(h_T) variant)
    x ~ Bernoulli(σ(c_T))

Symbols to code: p -> :meth:`DRAWGenerator.model`, q -> :meth:`DRAWGenerator.guide`; f_θ -> ``writer``
(an LSTM cell; its state s_t = [h_t; v_t] is torch's (cell, h) pair: the paper's visible v_t is torch's
output ``h``, its hidden h_t the cell state); f_φ -> ``guide_lstm``; g_φ, the read, -> the input
[x*, x* − σ(c_{t-1}), v_{t-1}] of the guide LSTM (DRAW's error image); q(z_t | s̃_t) -> ``q_step``;
p(z_t | s_{t-1}) -> ``p_step`` (extended only); ω_θ / L_θ -> ``write``; f_θ(z_0) -> ``initial``
(:class:`ppl_models.policy_parts.InitialStates`); q(z_0 | x*) -> ``q_z0`` (one tanh layer, Sec. 9.1);
c_t -> the canvases returned by model and guide; T -> ``num_steps``. Sample sites: ``z_0`` (extended only),
``z_1..z_T``, and ``x``.

The guide's parameters φ (:meth:`DRAWGenerator.guide_parameters`) are what guide fine-tuning (Sec. 2.5;
:func:`inference.finetune.finetune_guide`) trains with θ frozen. f_θ(z_0) also sets s̃_0 (Fig. 5, line 2)
and belongs to θ.

Deviations from the paper's code, all deliberate and shared with the imputation policies
(:mod:`ppl_models.policy_parts`): no peephole connections, no noise on LSTM states, no 15·tanh(c/15) clip of
the canvas logits (the Bernoulli is evaluated from logits, which is stable without it).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_models.base import ModelGuidePair, register_model
from ppl_models.policy_parts import (
    InitialStates,
    SharedPath,
    cat_inputs,
    check_sizes,
    check_update,
    diag_normal,
    initial_canvas,
    lstm_cell,
    lstm_step,
    mlp,
    stack_canvases,
    writer_step,
)

PRIORS = ("open-loop", "extended")


class DRAWGenerator(ModelGuidePair):
    """The writer, the guide LSTM, the step heads, the write operation and (extended) the z_0 networks in one
    module, used by both :meth:`model` and :meth:`guide`.

    :param x_dim: pixels per image.
    :param z_dim: dimension of z_1..z_T (paper: 100).
    :param z0_dim: dimension of z_0 (paper: 20; extended only).
    :param lstm_dim: hidden size of the writer and guide LSTMs (paper: 250).
    :param mix_hidden: tanh units of q(z_0 | x*) and of f_θ(z_0) (paper: 250; extended only).
    :param num_steps: T (paper: 16).
    :param prior: ``"open-loop"`` (Sec. 2.4: isotropic p(z_t), constant s_0) or ``"extended"`` (Sec. 2.5:
        p(z_t | s_{t-1}) and s_0 = f_θ(z_0)).
    :param update: ``"add"`` (c_t = c_{t-1} + ω(v_t)) or ``"jump"`` (c_t = L(h_t)).
    :param init_mean: optional (x_dim,) mean training image; c_0 starts at its logit.
    """

    param_prefix = "draw"

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 100,
        z0_dim: int = 20,
        lstm_dim: int = 250,
        mix_hidden: int = 250,
        num_steps: int = 16,
        prior: str = "extended",
        update: str = "add",
        init_mean: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_sizes(x_dim=x_dim, z_dim=z_dim, z0_dim=z0_dim, lstm_dim=lstm_dim, mix_hidden=mix_hidden,
                    num_steps=num_steps)
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        self.x_dim, self.z_dim, self.z0_dim, self.lstm_dim = x_dim, z_dim, z0_dim, lstm_dim
        self.num_steps, self.prior, self.update = num_steps, prior, check_update(update)
        self.writer = lstm_cell(z_dim, lstm_dim)
        self.guide_lstm = lstm_cell(2 * x_dim + lstm_dim, lstm_dim)
        self.q_step = nn.Linear(lstm_dim, 2 * z_dim)
        self.write = nn.Linear(lstm_dim, x_dim)
        self.c0 = initial_canvas(x_dim, init_mean)
        if prior == "extended":
            self.q_z0 = mlp([x_dim, mix_hidden, 2 * z0_dim], nn.Tanh)
            self.initial = InitialStates(z0_dim, mix_hidden, lstm_dim, num_lstms=2)  # writer, guide LSTM
            self.p_step = nn.Linear(lstm_dim, 2 * z_dim)
        else:
            # (h, cell) of s_0 (θ) and of s̃_0 (φ): trainable constants.
            self.s0 = nn.Parameter(torch.zeros(2, lstm_dim))
            self.s0_guide = nn.Parameter(torch.zeros(2, lstm_dim))
        self._path = SharedPath()

    # ------------------------------------------------------------------------------------- parameters

    def guide_parameters(self) -> list[nn.Parameter]:
        """φ: the parameters only the guide policy q uses (what guide fine-tuning trains)."""
        parts: list[nn.Module] = [self.guide_lstm, self.q_step]
        params = [p for m in parts for p in m.parameters()]
        if self.prior == "extended":
            params += list(self.q_z0.parameters())
        else:
            params.append(self.s0_guide)
        if self.update == "jump":
            # c_t = L(h_t) never reads c_{t-1}: the initial canvas c_0 reaches only q's first read.
            params.append(self.c0)
        return params

    @property
    def latent_sites(self) -> tuple[str, ...]:
        first = 0 if self.prior == "extended" else 1
        return tuple(f"z_{t}" for t in range(first, self.num_steps + 1))

    # -------------------------------------------------------------------------------------- roll-out

    def _constant_state(self, which: nn.Parameter, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return which[0].expand(n, -1), which[1].expand(n, -1)

    def _roll_out(self, x: torch.Tensor | None, n: int) -> list[torch.Tensor]:
        """One trajectory of q (``x`` given) or of p (``x=None``); returns the canvases c_0..c_T. The
        writer's path along the draws is q's, reused by the model's replay (:class:`SharedPath`)."""
        guide = x is not None
        ref = self.c0
        path = self._path.begin(record=guide)
        if self.prior == "extended":
            if guide:
                z0_dist = diag_normal(self.q_z0(x))
            else:
                z0_dist = dist.Normal(ref.new_zeros(self.z0_dim), ref.new_ones(self.z0_dim)).to_event(1)
            z0 = pyro.sample("z_0", z0_dist)
            writer, guide_state = path.step(z0, self.initial, z0)
        else:
            writer, guide_state = self._constant_state(self.s0, n), self._constant_state(self.s0_guide, n)
        canvas = self.c0.expand(n, -1)
        canvases = [canvas]
        for t in pyro.markov(range(1, self.num_steps + 1)):
            if guide:
                read = cat_inputs([x, x - torch.sigmoid(canvas), writer[0]])
                guide_state = lstm_step(self.guide_lstm, read, guide_state)
                step = diag_normal(self.q_step(guide_state[0]))
            elif self.prior == "extended":
                step = diag_normal(self.p_step(writer[0]))  # p(z_t | s_{t-1}): closed loop
            else:
                # p(z_t): open loop (a tensor scale: a number would be copied from the host every step)
                step = dist.Normal(ref.new_zeros(self.z_dim), ref.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample(f"z_{t}", step)
            writer, canvas = path.step(z, writer_step, self.writer, self.write, z, writer, canvas,
                                       self.update)
            canvases.append(canvas)
        return canvases

    # ---------------------------------------------------------------------------------- Pyro programs

    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
        """p(τ) p(x | c_T). Returns the canvases (logits) stacked, shape (T + 1, N, x_dim).

        ``model(None, num_samples=n)`` samples n images' trajectories without any data.
        """
        self.register_params()
        n = self._num_rows(x, num_samples)
        with pyro.plate("data", n):
            canvases = self._roll_out(None, n)
            pyro.sample("x", dist.Bernoulli(logits=canvases[-1], validate_args=False).to_event(1), obs=x)
        return stack_canvases(canvases)

    def guide(self, x: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """q(τ | x*). Returns the canvases of p along q's trajectory, shape (T + 1, N, x_dim)."""
        self.register_params()
        if x is None:
            raise ValueError("the guide policy q needs the target images x (shape (N, x_dim))")
        n = self._num_rows(x, num_samples)
        with pyro.plate("data", n):
            return stack_canvases(self._roll_out(x, n))

    def _num_rows(self, x: torch.Tensor | None, num_samples: int | None) -> int:
        if x is None:
            if num_samples is None or num_samples < 1:
                raise ValueError(f"without data x give num_samples >= 1, got {num_samples!r}")
            return num_samples
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(f"x must have shape (N, {self.x_dim}), got {tuple(x.shape)}")
        if num_samples is not None and num_samples != x.shape[0]:
            raise ValueError(f"num_samples={num_samples} disagrees with the {x.shape[0]} rows of x")
        return x.shape[0]

    @torch.no_grad()
    def sample_steps(self, num_samples: int) -> torch.Tensor:
        """σ(c_t) for t = 0..T of ``num_samples`` trajectories of p, shape (T + 1, N, x_dim) (Fig. 1)."""
        with pyro.poutine.block():
            return torch.sigmoid(self.model(None, num_samples=num_samples))

    def sample(self, num_samples: int) -> torch.Tensor:
        """σ(c_T) of ``num_samples`` trajectories of p, shape (N, x_dim)."""
        return self.sample_steps(num_samples)[-1]


register_model("draw-open-loop", DRAWGenerator, kind="generator", prior="open-loop", update="add",
               about="open-loop LSTM generator, isotropic p(z_t) (Bachman & Precup 2015, Sec. 2.4)")
register_model("draw-extended-add", DRAWGenerator, kind="generator", prior="extended", update="add",
               about="extended generator, p(z_t | s_{t-1}), c_t += ω(v_t) (Bachman & Precup 2015, Sec. 2.5)")
register_model("draw-extended-jump", DRAWGenerator, kind="generator", prior="extended", update="jump",
               about="extended generator, c_T = L(h_T) (Bachman & Precup 2015, Sec. 2.5)")
