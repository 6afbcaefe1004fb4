"""Professor forcing's discriminator and losses, trained beside SVI as an :class:`inference.train.ExtraTerm`.

Goyal (2017), thesis, ch. 2, Eqs. 2.1-2.4 and Sec. 2.4.1. The discriminator D reads a **behaviour**
sequence B — the generator's hidden states and output logits at every step, from a teacher-forced run
(label 1) or a free-running run (label 0):

    C_d(θ_d | θ_g) = E_data[− log D(B_tf)] + E_{y ~ p_θg}[− log(1 − D(B_fr))]      (Eq. 2.1, D's loss)
    C_f(θ_g | θ_d) = E_{y ~ p_θg}[− log D(B_fr)]                                    (Eq. 2.3)
    C_t(θ_g | θ_d) = E_data[− log(1 − D(B_tf))]                                     (Eq. 2.4, optional)

The generator's loss is NLL (Eq. 2.2, the SVI term of the Pyro model) + C_f (+ C_t), here
:meth:`ProfessorForcing.generator_loss`; D's optimiser steps on C_d in :meth:`ProfessorForcing.step`. The
adversarial gradient reaches the generator through the hidden states and logits of the behaviour, never
through the discrete free-running samples (they carry no gradient).

Gates (Sec. 2.4.1), measured on the minibatch's behaviours before the updates: the generator gets the
adversarial terms only while D's accuracy is above ``generator_gate`` (75 %: a poor D's gradient would
mislead it), and D is not updated while its accuracy is above ``freeze_gate`` (99 %). Both are logged each
step (``professor/gate_generator``, ``professor/gate_discriminator``).

D (Sec. 2.4.1): a bidirectional GRU over the behaviour, its two states concatenated at each step and fed to
an MLP shared across time (three affine + ReLU layers, then an affine output); the per-step logits are
averaged over time into one logit per sequence, clipped to [−10, 10], and D = σ(logit).

Symbols to code: B -> :class:`ppl_models.gru_generator.Behaviour` (``hidden``, ``logits``), θ_d ->
:attr:`ProfessorForcing.module` (a :class:`BehaviourDiscriminator`), θ_g -> the generator's parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inference import distributed
from inference.train import ExtraTerm
from ppl_models.gru_generator import Behaviour, GRUGenerator

LOGIT_CLIP = 10.0


def behaviour_features(b: Behaviour) -> torch.Tensor:
    """What D reads at each step: the hidden state and the output logits, (N, L, H + V) (V = 1 for pixels)."""
    logits = b.logits if b.logits.dim() == 3 else b.logits.unsqueeze(-1)
    return torch.cat([b.hidden, logits], -1)


class BehaviourDiscriminator(nn.Module):
    """D of Sec. 2.4.1 (see the module docstring): ``forward(features)`` gives the clipped logit of
    "teacher-forced" per sequence, (N,)."""

    def __init__(self, features: int, hidden: int = 128, mlp: int = 128) -> None:
        super().__init__()
        if min(features, hidden, mlp) < 1:
            raise ValueError(f"features, hidden and mlp must be >= 1, got {features}, {hidden}, {mlp}")
        self.rnn = nn.GRU(features, hidden, batch_first=True, bidirectional=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, mlp), nn.ReLU(), nn.Linear(mlp, mlp), nn.ReLU(),
                                 nn.Linear(mlp, mlp), nn.ReLU(), nn.Linear(mlp, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(features)
        return self.mlp(states).squeeze(-1).mean(-1).clamp(-LOGIT_CLIP, LOGIT_CLIP)


def discriminator_accuracy(logit_tf: torch.Tensor, logit_fr: torch.Tensor) -> float:
    """The fraction of sequences D classifies right (teacher-forced: logit > 0; free-running: logit ≤ 0)."""
    right = (logit_tf > 0).sum() + (logit_fr <= 0).sum()
    return float(right) / (logit_tf.numel() + logit_fr.numel())


def gates(accuracy: float, generator_gate: float = 0.75, freeze_gate: float = 0.99) -> tuple[bool, bool]:
    """(the generator gets the adversarial terms, D is updated) at D's ``accuracy`` (Sec. 2.4.1)."""
    return accuracy > generator_gate, accuracy <= freeze_gate


def discriminator_loss(logit_tf: torch.Tensor, logit_fr: torch.Tensor) -> torch.Tensor:
    """C_d of Eq. 2.1, summed over the minibatch's sequences."""
    return (F.binary_cross_entropy_with_logits(logit_tf, torch.ones_like(logit_tf), reduction="sum")
            + F.binary_cross_entropy_with_logits(logit_fr, torch.zeros_like(logit_fr), reduction="sum"))


def generator_adversarial_loss(logit_tf: torch.Tensor, logit_fr: torch.Tensor,
                               teacher_term: bool) -> torch.Tensor:
    """C_f of Eq. 2.3 (+ C_t of Eq. 2.4 with ``teacher_term``), summed over the minibatch's sequences."""
    loss = F.binary_cross_entropy_with_logits(logit_fr, torch.ones_like(logit_fr), reduction="sum")
    if teacher_term:
        loss = loss + F.binary_cross_entropy_with_logits(logit_tf, torch.zeros_like(logit_tf),
                                                         reduction="sum")
    return loss


class ProfessorForcing(ExtraTerm):
    """D and its optimiser beside the generator's SVI (see the module docstring).

    :param generator: the :class:`GRUGenerator` (trained by the main loop, on NLL + these terms).
    :param hidden: D's GRU state size per direction; ``mlp`` its MLP width.
    :param lr: D's Adam learning rate.
    :param weight: the adversarial terms' weight in the generator's loss.
    :param teacher_term: add C_t (Eq. 2.4) to the generator's loss.
    :param generator_gate: D's accuracy above which the generator gets the adversarial terms (0.75).
    :param freeze_gate: D's accuracy above which D is not updated (0.99).
    """

    name = "professor"
    gradient_reduction = "sum"  # C_d is summed over the minibatch's sequences

    def __init__(self, generator: GRUGenerator, hidden: int = 128, mlp: int = 128, lr: float = 1e-3,
                 weight: float = 1.0, teacher_term: bool = False, generator_gate: float = 0.75,
                 freeze_gate: float = 0.99) -> None:
        if not 0 <= generator_gate <= 1 or not 0 <= freeze_gate <= 1 or weight < 0:
            raise ValueError(f"the gates must be accuracies in [0, 1] and the weight >= 0, got "
                             f"{generator_gate}, {freeze_gate}, {weight}")
        self.generator, self.weight, self.teacher_term = generator, weight, teacher_term
        self.generator_gate, self.freeze_gate = generator_gate, freeze_gate
        out = generator.vocab if generator.output == "categorical" else 1
        self.module = BehaviourDiscriminator(generator.hidden_size + out, hidden, mlp)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)
        self._last: dict[str, Any] = {}
        #: one row per step: D's accuracy and both gates (checkpointed with the hook, so resume keeps it)
        self.history: list[dict[str, float]] = []

    def behaviours(self, x: torch.Tensor) -> tuple[Behaviour, Behaviour]:
        """The generator's teacher-forced run on ``x`` and a free run of the same length and number."""
        return self.generator.teacher_forced(x), self.generator.free_running(x.shape[0], x.shape[1])

    def generator_loss(self, batch: torch.Tensor) -> torch.Tensor | None:
        tf, fr = self.behaviours(batch)
        f_tf, f_fr = behaviour_features(tf), behaviour_features(fr)
        with torch.no_grad():
            accuracy = discriminator_accuracy(self.module(f_tf), self.module(f_fr))
        # Under torchrun the gates are decided on the whole minibatch, alike on every process (each must
        # step D, or none).
        if distributed.is_distributed():
            hits, n = distributed.all_reduce_sum([accuracy * batch.shape[0], batch.shape[0]], batch.device)
            accuracy = hits / n
        adversarial, update_d = gates(accuracy, self.generator_gate, self.freeze_gate)
        self._last = {"tf": f_tf.detach(), "fr": f_fr.detach(), "accuracy": accuracy,
                      "gate_generator": float(adversarial), "gate_discriminator": float(update_d)}
        if not adversarial or self.weight == 0:
            return None
        # the generator's gradient flows through the behaviours into θ_g; D's own gradients from this term
        # are cleared by the trainer before D's step
        logit_tf, logit_fr = self.module(f_tf), self.module(f_fr)
        return self.weight * generator_adversarial_loss(logit_tf, logit_fr, self.teacher_term)

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        if not self._last:
            raise RuntimeError("ProfessorForcing.step needs the behaviours of generator_loss on this batch")
        last, self._last = self._last, {}
        loss = discriminator_loss(self.module(last["tf"]), self.module(last["fr"]))
        if last["gate_discriminator"]:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        row = {"accuracy": last["accuracy"], "gate_generator": last["gate_generator"],
               "gate_discriminator": last["gate_discriminator"], "discriminator_loss": float(loss.detach())}
        self.history.append({"step": len(self.history) + 1, **row})
        return row

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        self.history = list(state.get("history", []))
