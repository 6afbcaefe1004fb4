"""Training the goal-conditioned RL generator: Alg. 1 (sample trajectories) and Alg. 2 (update).

Vargas Vieyra & Ménard, "Learning generative models with goal-conditioned reinforcement learning",
Sec. 2 (inner and outer minimisations of Eq. 2), Sec. 3.2 (memory, update, exploration), Alg. 1-2.

How the RL training relates to maximising the bound. Eq. 2, per goal x̃, is
L_ub = E_q[ℓ_H] + KL(p^q ‖ p^π), ℓ_H = −log N(x̃; x_{H+1}, σ²), with q the GC-agent and π the S-agent:

* *inner minimisation over q* (Sec. 2, "goal-conditioned RL"): for fixed π it is a regularised RL problem
  with the loss ℓ at the last step; the GC-agent solves its unregularised part with Double DQN (Hasselt et
  al. 2016) — Q_ψ(x_h, h, x̃) predicts the final loss of a greedy continuation — and the exploration penalty
  κ log S-select in the argmin (Sec. 3.2) stands in for the KL term: a selection the S-agent finds unlikely
  costs KL, but the penalty *favours* it, so that every index is used by some goal (the paper's intent). The
  GC-agent is therefore not the minimiser of L_ub over q, and the bound we report is that of the agent
  trained this way;
* *outer minimisation over π* (Eq. 4): for fixed q, minimising L_ub over the S-agent is maximum likelihood
  of the GC-agent's trajectories: the selection network by cross-entropy on the selections (Alg. 2, lines
  5-8: exactly −E_q log S-select, the KL's π-dependent part for a Dirac guide) and the proposal network by
  the squared error of the unfolded network at the goal (lines 1-4: ℓ_H's θ-dependent part, for any σ²).
  Both use replayed, not fresh, trajectories, as the paper does.

So with a greedy GC-agent the S-agent's updates are stochastic gradient steps on Eq. 2 (up to the replay's
staleness), while the Q-learning targets only the reconstruction term.

Schedule (the paper's "if time to update" is open; our choice, in the presets): every training step
collects one trajectory per goal of the minibatch (Alg. 1) and then takes one gradient step of each network
on a replayed minibatch of the same size, followed by one soft target update ψ_target ← ρψ + (1 − ρ)ψ_target.
One update per network per collected minibatch keeps the data each network sees proportional and makes the
soft update's ρ a per-update rate, as in the paper's ρ = 0.06.

The RL loss is ℓ_H = ``loss_scale`` · ‖x_{H+1} − x̃‖² (Sec. 3.1: proportional to the squared error; 1
corresponds to σ² = 1/2 in ℓ = ‖·‖²/(2σ²)). Its scale matters only against κ. The density's σ² is set
apart from it, by :meth:`ppl_models.gcrl.GCRLGenerator.fit_sigma2`.

Symbols to code: R_GC-select, R_S-select, R_S-prop -> ``Replay.gc``, ``Replay.select``, ``Replay.prop``;
ρ -> ``rho``; the Trainer's main loss is :class:`SAgentUpdate` (Alg. 1 and Alg. 2 lines 1-8), its hook
:class:`GCAgentUpdate` (Alg. 2 lines 9-17).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pyro.infer import ELBO
from torch import nn

from inference import distributed
from inference.train import ExtraTerm
from ppl_models.gcrl import GCAgent, GCRLGenerator


class ReplayBuffer(nn.Module):
    """A bounded FIFO of rows (``capacity`` at most; the oldest are overwritten), sampled uniformly with
    replacement with the global torch RNG. Its storage is module buffers, so a checkpoint of the module holds
    it and resume replays exactly the same rows.

    :param fields: name -> (row shape, dtype) of each stored tensor.
    """

    def __init__(self, capacity: int, fields: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity, self.fields = capacity, tuple(fields)
        for name, (shape, dtype) in fields.items():
            self.register_buffer(f"data_{name}", torch.zeros(capacity, *shape, dtype=dtype))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # rows ever pushed

    def __len__(self) -> int:
        return min(int(self.count), self.capacity)

    def push(self, **rows: torch.Tensor) -> None:
        """Append rows (each field a tensor with the same first dimension)."""
        if set(rows) != set(self.fields):
            raise ValueError(f"push needs exactly the fields {list(self.fields)}, got {sorted(rows)}")
        n = {v.shape[0] for v in rows.values()}
        if len(n) != 1:
            raise ValueError(f"every field needs the same number of rows, got {sorted(n)}")
        count = n.pop()
        keep = min(count, self.capacity)  # more rows than room: only the newest fit
        idx = (int(self.count) + count - keep + torch.arange(keep, device=self.count.device)) % self.capacity
        for name, value in rows.items():
            getattr(self, f"data_{name}")[idx] = value[count - keep:].to(getattr(self, f"data_{name}").dtype)
        self.count += count

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """n rows drawn uniformly (with replacement) from the stored ones."""
        if len(self) == 0:
            raise ValueError("the replay buffer is empty: push before sampling")
        idx = torch.randint(len(self), (n,), device=self.count.device)
        return {name: getattr(self, f"data_{name}")[idx] for name in self.fields}


class Replay(nn.Module):
    """The three replay buffers of Sec. 3.2, filled by Alg. 1 (goals are stored as indices into the
    training set):

    * ``gc`` (R_GC-select): transitions (x_h, h, a_h, x_{h+1}, ℓ_h, x̃);
    * ``select`` (R_S-select): selections (x_h, h, a_h);
    * ``prop`` (R_S-prop): trajectories' selections and goal ({a_1..a_H}, x̃).
    """

    def __init__(self, x_dim: int, steps: int, capacity: int, trajectory_capacity: int) -> None:
        super().__init__()
        f, long = torch.float32, torch.long
        self.gc = ReplayBuffer(capacity, {"state": ((x_dim,), f), "step": ((), long), "selection": ((), long),
                                          "next_state": ((x_dim,), f), "loss": ((), f), "goal": ((), long)})
        self.select = ReplayBuffer(capacity, {"state": ((x_dim,), f), "step": ((), long),
                                              "selection": ((), long)})
        self.prop = ReplayBuffer(trajectory_capacity, {"selections": ((steps,), long), "goal": ((), long)})

    def record(self, rollout: Mapping[str, torch.Tensor], losses: torch.Tensor,
               goal_index: torch.Tensor) -> None:
        """Alg. 1 lines 8 and 10 for a batch of trajectories (states (H + 1, N, D), selections (H, N), losses
        (H, N))."""
        states, sel = rollout["states"], rollout["selections"]
        H, n = sel.shape
        steps = torch.arange(1, H + 1, device=sel.device).repeat_interleave(n)
        flat_states = states[:-1].reshape(H * n, -1)
        self.gc.push(state=flat_states, step=steps, selection=sel.reshape(-1),
                     next_state=states[1:].reshape(H * n, -1), loss=losses.reshape(-1),
                     goal=goal_index.repeat(H))
        self.select.push(state=flat_states, step=steps, selection=sel.reshape(-1))
        self.prop.push(selections=sel.T, goal=goal_index)


def step_losses(pair: GCRLGenerator, final: torch.Tensor, goal: torch.Tensor,
                loss_scale: float) -> torch.Tensor:
    """Eq. 3's losses ℓ_h for h = 1..H, (H, N): zero before the last step, ``loss_scale``·‖x_{H+1} − x̃‖² at
    it."""
    losses = final.new_zeros(pair.steps, final.shape[0])
    losses[-1] = loss_scale * (final - goal).pow(2).sum(-1)
    return losses


@torch.no_grad()
def double_dqn_target(agent: GCAgent, next_state: torch.Tensor, step: torch.Tensor, goal: torch.Tensor,
                      loss: torch.Tensor, steps: int) -> torch.Tensor:
    """Alg. 2 line 12 with Double DQN: ℓ + Q_ψtarget,b*(x', h + 1, x̃), b* = argmin_b Q_ψ,b(x', h + 1, x̃)
    (the online network picks, the target network values); ℓ alone after the last step (h = H). The pick
    leaves out the exploration penalty κ log S-select that the acting agent adds: Alg. 2's target is the
    greedy value of Q alone, so the penalty steers which transitions are collected, not what Q estimates."""
    terminal = step >= steps
    nxt = (step + 1).clamp(max=steps)  # terminal rows are masked below; any valid step will do
    best = agent.q(next_state, nxt, goal).argmin(-1, keepdim=True)
    value = agent.q(next_state, nxt, goal, target=True).gather(-1, best).squeeze(-1)
    return loss + torch.where(terminal, torch.zeros_like(value), value)


@torch.no_grad()
def soft_update(agent: GCAgent, rho: float) -> None:
    """ψ_target ← ρψ + (1 − ρ)ψ_target (Alg. 2 line 16)."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    online = dict(agent.qnet.named_parameters())
    for name, target in agent.target_weights().items():
        target.mul_(1 - rho).add_(online[name], alpha=rho)


class SAgentUpdate(ELBO):
    """The Trainer's main loss: Alg. 1 for the minibatch's goals (the trajectories go to the replay), then
    the S-agent's Alg. 2 steps on replayed minibatches of the same size: the summed squared error of the
    unfolded proposal network at the goals plus the summed cross-entropy of the selection network on the
    GC-agent's selections. ``differentiable_loss(model, guide, goals, goal_index)`` takes the pair's model
    and guide (which it does not trace: it calls the networks directly) and a minibatch of goals with their
    indices into ``train``; ``last`` holds the metrics of the latest collection."""

    def __init__(self, pair: GCRLGenerator, train: torch.Tensor, replay: Replay,
                 loss_scale: float = 1.0) -> None:
        super().__init__()
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale}")
        self.pair, self.train, self.replay, self.loss_scale = pair, train, replay, float(loss_scale)
        self.last: dict[str, float] = {}

    def collect(self, goals: torch.Tensor, goal_index: torch.Tensor) -> None:
        """Alg. 1 for each goal, recorded in the three buffers."""
        pair = self.pair
        rollout = pair.rollout(goals)
        final = rollout["states"][-1]
        self.replay.record(rollout, step_losses(pair, final, goals, self.loss_scale), goal_index)
        with torch.no_grad():
            # The S-agent's selection entropy at the visited states, and how evenly the GC-agent uses the A
            # indices (the entropy of their histogram): collapse onto few proposals shows in both.
            logp = torch.stack([F.log_softmax(pair.select_logits(s, h), -1)
                                for h, s in enumerate(rollout["states"][:-1], start=1)])
            usage = torch.bincount(rollout["selections"].reshape(-1), minlength=pair.actions).double()
            usage = usage / usage.sum()
            self.last = {"reconstruction_mse": float((final.clamp(0, 1) - goals).pow(2).mean()),
                         "select_entropy": float(-(logp.exp() * logp).sum(-1).mean()),
                         "usage_entropy": float(-(usage * usage.clamp_min(1e-30).log()).sum())}

    def differentiable_loss(self, model: Any, guide: Any, goals: torch.Tensor,
                            goal_index: torch.Tensor) -> torch.Tensor:
        self.collect(goals, goal_index)
        n = goals.shape[0]
        prop = self.replay.prop.sample(n)
        prop_loss = (self.pair.unfold(prop["selections"]) - self.train[prop["goal"]]).pow(2).sum()
        sel = self.replay.select.sample(n)
        select_loss = F.cross_entropy(self.pair.select_logits(sel["state"], sel["step"]), sel["selection"],
                                      reduction="sum")
        self.last.update({"prop_loss": float(prop_loss.detach()) / n,
                          "select_loss": float(select_loss.detach()) / n})
        return prop_loss + select_loss

    def _get_trace(self, model: Any, guide: Any, args: Any, kwargs: Any) -> Any:  # required by ELBO; unused
        raise NotImplementedError("SAgentUpdate traces nothing: it calls the networks directly")

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss)


class GCAgentUpdate(ExtraTerm):
    """The Trainer's hook for the GC-agent (Alg. 2 lines 9-17): after each S-agent step, one Double-DQN
    step of GC-select-Qnet_ψ (Adam at ``lr``) on a replayed minibatch of R_GC-select and one soft update of
    ψ_target by ``rho``. Its module holds the GC-agent and the replay, so both are checkpointed; its metrics
    include the S-agent loss's latest collection statistics."""

    name = "gcrl"

    def __init__(self, pair: GCRLGenerator, loss: SAgentUpdate, lr: float, rho: float,
                 batch_size: int) -> None:
        if not 0 < rho <= 1 or not lr > 0 or batch_size < 1:
            raise ValueError(f"rho in (0, 1], lr > 0 and batch_size >= 1 required, got {rho}, {lr}, "
                             f"{batch_size}")
        self.pair, self.s_loss, self.rho, self.batch_size = pair, loss, float(rho), int(batch_size)
        self.module = nn.ModuleDict({"agent": pair.gc_agent, "replay": loss.replay})
        self.optimizer = torch.optim.Adam(pair.gc_agent.qnet.parameters(), lr=lr)

    def step(self, batch: Any) -> dict[str, float]:
        agent, replay = self.pair.gc_agent, self.s_loss.replay
        t = replay.gc.sample(self.batch_size)
        goal = self.s_loss.train[t["goal"]]
        target = double_dqn_target(agent, t["next_state"], t["step"], goal, t["loss"], self.pair.steps)
        q = agent.q(t["state"], t["step"], goal).gather(-1, t["selection"][:, None]).squeeze(-1)
        q_loss = F.mse_loss(q, target)
        bad = not math.isfinite(float(q_loss.detach()))
        if distributed.is_distributed():  # every process stops, or none (the optimiser all-reduces)
            bad = distributed.all_reduce_sum([float(bad)], q_loss.device)[0] > 0
        if bad:
            raise FloatingPointError(f"the Q-network's loss is {float(q_loss.detach())}")
        q_loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        soft_update(agent, self.rho)
        return {"q_loss": float(q_loss.detach()), "q_mean": float(q.detach().mean()), **self.s_loss.last}
