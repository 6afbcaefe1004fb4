"""LSTM-add and LSTM-jump: the sequential imputation policy with reader, writer and guide LSTMs.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 3.2, Eq. 17, Fig. 7
(ImpTrainLoop2), sizes from Sec. 9.1. The primary policy p is spread over a reader LSTM (state s^r) and a
writer LSTM (s^w); the guide policy q has its own guide LSTM (s^q) and shares the writer and the write
operation with p. Every state s = (h, cell).

    z_0 ~ p(z_0 | c_0, x_k)        [q: q(z_0 | c_0, x)]         infinite-mixture initial step
    s^r_0, s^w_0, s^q_0 = f_θ(z_0)
    for t = 1..T:
        p: s^r_t = f^r_θ(s^r_{t-1}, ω^r(c_{t-1}, s^w_{t-1}, x_k)),  z_t ~ p_θ(z_t | h^r_t)
        q: s^q_t = f^q_φ(s^q_{t-1}, ω^q(c_{t-1}, s^w_{t-1}, x)),    z_t ~ q_φ(z_t | h^q_t)
        s^w_t = f^w_θ(s^w_{t-1}, z_t)
        c_t = c_{t-1} + ω^w_θ(h^w_t)   (-add)     or    c_t = ω^w_θ(cell^w_t)   (-jump; the paper's code
                                                          wrote from the writer's cell state)
    cost −log p(x_u | c_T)

Symbols to code: p -> :meth:`LSTMImputer.model`, q -> :meth:`LSTMImputer.guide` (both from
:class:`ppl_models.imputation_policy.ImputationPolicy`), f^r, f^q, f^w -> ``reader``, ``guide_lstm``,
``writer``; ω^w -> ``write``; f_θ(z_0) -> ``initial`` (:class:`ppl_models.policy_parts.InitialStates`);
z_0, z_t -> sites ``z_0``, ``z_1..z_T``; T -> ``num_steps``; c_t -> ``canvas``.

The read operations: p reads [x_k; σ(c_{t-1})_u] (the current image, known pixels clamped), the mask and
h^w_{t-1}; q reads the same plus the residual x − σ(c_{t-1}), which carries x_u (paper Sec. 9.1: the
reader has "precisely the same structure as the guide LSTM" but sees no target values).
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from ppl_models.base import register_model
from ppl_models.imputation_policy import ImputationPolicy
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
    writer_step,
)


class LSTMImputer(ImputationPolicy):
    """Reader, writer and guide LSTMs, the initial-state network and the write operation in one module.

    :param x_dim: pixels per image.
    :param z_dim: dimension of z_1..z_T (paper: 100).
    :param z0_dim: dimension of the initial step z_0 (paper: 20).
    :param lstm_dim: hidden size of every LSTM (paper: 250).
    :param mix_hidden: tanh units of the networks for z_0 and for the initial states (paper: 250).
    :param num_steps: T (paper: 16).
    :param update: ``"add"`` or ``"jump"``.
    :param init_mean: optional (x_dim,) mean training image; c_0 starts at its logit.
    """

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 100,
        z0_dim: int = 20,
        lstm_dim: int = 250,
        mix_hidden: int = 250,
        num_steps: int = 16,
        update: str = "add",
        init_mean: torch.Tensor | None = None,
    ) -> None:
        super().__init__("lstm_imputer")
        check_sizes(x_dim=x_dim, z_dim=z_dim, z0_dim=z0_dim, lstm_dim=lstm_dim, mix_hidden=mix_hidden,
                    num_steps=num_steps)
        self.x_dim, self.z_dim, self.z0_dim, self.lstm_dim = x_dim, z_dim, z0_dim, lstm_dim
        self.num_steps, self.update = num_steps, check_update(update)
        self.p_z0 = mlp([2 * x_dim, mix_hidden, 2 * z0_dim], nn.Tanh)
        self.q_z0 = mlp([3 * x_dim, mix_hidden, 2 * z0_dim], nn.Tanh)
        self.initial = InitialStates(z0_dim, mix_hidden, lstm_dim, num_lstms=3)  # reader, writer, guide
        self.reader = lstm_cell(2 * x_dim + lstm_dim, lstm_dim)
        self.guide_lstm = lstm_cell(3 * x_dim + lstm_dim, lstm_dim)
        self.writer = lstm_cell(z_dim, lstm_dim)
        self.p_step = nn.Linear(lstm_dim, 2 * z_dim)
        self.q_step = nn.Linear(lstm_dim, 2 * z_dim)
        self.write = nn.Linear(lstm_dim, x_dim)
        self.c0 = initial_canvas(x_dim, init_mean)
        self._path = SharedPath()

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(f"z_{t}" for t in range(self.num_steps + 1))

    def guide_parameters(self) -> list[nn.Parameter]:
        """φ: q(z_0 | x), the guide LSTM and its step head (the initial-state network is shared with p)."""
        return [p for m in (self.q_z0, self.guide_lstm, self.q_step) for p in m.parameters()]

    def _roll_out(self, x: torch.Tensor, mask: torch.Tensor, guide: bool) -> list[torch.Tensor]:
        """One trajectory of p (``guide=False``) or q; returns the canvases c_0..c_T."""
        canvas = self.c0.expand(x.shape[0], -1)
        canvases = [canvas]
        known = mask * x  # the only part of x the primary policy may read

        def read(canvas: torch.Tensor) -> list[torch.Tensor]:
            guess = torch.sigmoid(canvas)
            return [known + (1 - mask) * guess, mask] + ([x - guess] if guide else [])

        path = self._path.begin(record=guide)  # q's writer path, reused by the model's replay
        z0_net = self.q_z0 if guide else self.p_z0
        z0 = pyro.sample("z_0", diag_normal(z0_net(cat_inputs(read(canvas)))))
        reader, writer, guide_state = path.step(z0, self.initial, z0)
        state = guide_state if guide else reader  # q runs its guide LSTM, p its reader
        lstm, head = (self.guide_lstm, self.q_step) if guide else (self.reader, self.p_step)
        for t in pyro.markov(range(1, self.num_steps + 1)):
            state = lstm_step(lstm, cat_inputs([*read(canvas), writer[0]]), state)
            z = pyro.sample(f"z_{t}", diag_normal(head(state[0])))
            writer, canvas = path.step(z, writer_step, self.writer, self.write, z, writer, canvas,
                                       self.update)
            canvases.append(canvas)
        return canvases


register_model("lstm-add", LSTMImputer, kind="imputer", update="add",
               about="LSTM-add imputer with reader, writer and guide LSTMs (Bachman & Precup 2015, Sec. 3.2)")
register_model("lstm-jump", LSTMImputer, kind="imputer", update="jump",
               about="LSTM-jump imputer, c_t = L(h_t) (Bachman & Precup 2015, Sec. 3.2)")
