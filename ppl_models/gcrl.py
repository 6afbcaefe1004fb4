"""The goal-conditioned RL generator: an S-agent (the model, the sampler) and a GC-agent (the guide).

Vargas Vieyra & Ménard, "Learning generative models with goal-conditioned reinforcement learning":
Sec. 2 (the bound, Eqs. 1-2), Sec. 3.1 (the MDP, Eq. 5, and the mixture-of-Diracs agents), Sec. 3.2 (the
exploration penalty), Alg. 3 (sampling) and App. B (the networks).

The MDP (Eq. 5): from the initial state x_1 (zero, as the paper's experiments), for h = 1..H::

    a_h ~ policy(· | x_h, h)                       the selection: one of A proposals
    y_h = S-prop-net_θ(x_h, h, a_h)                the action: the selected proposal
    x_{h+1} = x_h + α_h y_h,   α_h = 1/h           deterministic for h < H
    x̃ ~ N(x_H + α_H y_H, σ² I)                     the final, Gaussian step: the observation

so from x_1 = 0 the mean of the final step is Σ_h y_h / h (with α_h = 1/h). As a Pyro pair:

* ``model`` (p, the S-agent, Alg. 3): a_h ~ Categorical(S-select-net_φ(x_h, h)) at site ``z_{h−1}``, the
  observation at site ``x``. Its only randomness is the selections, so it has at most A^H outcomes.
* ``guide`` (q, the GC-agent, which sees the goal x̃): a_h picks argmin_a Q_ψ,a(x_h, h, x̃) + κ log
  S-select-net_φ,a(x_h, h) (Sec. 3.2's penalty), a Dirac per step — the greedy agent of Alg. 1, a one-hot
  Categorical, whose one-step KL to the S-agent's Categorical is −log S-select_φ(a_h | x_h, h). With
  ``tau`` > 0 the guide is the Boltzmann policy Categorical(logits = −(Q + κ log S-select)/τ) instead
  (τ → 0 recovers the greedy agent); it is what makes IWAE-K tighter than the bound.

The negative ELBO of this pair is Eq. 2's L_ub for one goal: E_q[−log N(x̃; x_{H+1}, σ²)] + KL(p^q ‖ p^π),
the trajectory KL a sum of one-step KLs along the path (the chain rule of Sec. 2), which
:class:`inference.pathwise_kl_elbo.PathwiseKL_ELBO` computes with the analytic Categorical KL per step (the
guide samples the selections in the model's order, so the analytic terms are valid).

The proposals are shared by both agents (Sec. 3.1: otherwise the Diracs' KL would be infinite), so both
call the one S-prop-net in :class:`SAgent`; the GC-agent (:class:`GCAgent`) holds only its Q-network and the
target copy of its weights (buffers, moved by the soft update of :mod:`inference.gcrl`).

Symbols to code: H -> ``steps``, A -> ``actions``, α_h -> ``rates[h − 1]``, x_1 -> ``initial`` (zeros),
S-prop-net_θ -> :class:`ProposalNet` (the project's U-Net, :class:`ppl_models.unet.UNet`, with App. B.1's
Eq. 6 embedding Emb(A·h + a) as a second input channel), S-select-net_φ -> ``SAgent.select``,
GC-select-Qnet_ψ -> ``GCAgent.qnet`` (App. B.3: the selection network with a dueling head), ψ_target ->
``GCAgent.target``, κ -> ``kappa``, σ² -> the buffer ``SAgent.log_sigma2`` (set by
:meth:`GCRLGenerator.fit_sigma2`: the paper leaves it open), S-prop-net_θ,U -> :meth:`GCRLGenerator.unfold`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ppl_models.base import ModelGuidePair, register_model
from ppl_models.unet import UNet


def _square(x_dim: int, image_shape: Sequence[int] | None) -> tuple[int, int]:
    if image_shape is None:
        side = math.isqrt(x_dim)
        if side * side != x_dim:
            raise ValueError(f"x_dim={x_dim} is not a square image; give image_shape")
        return side, side
    if len(image_shape) != 2 or image_shape[0] * image_shape[1] != x_dim:
        raise ValueError(f"image_shape must be (H, W) with H·W = x_dim = {x_dim}, got {image_shape}")
    return int(image_shape[0]), int(image_shape[1])


def _steps(h: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """The step(s) h (1-based) as a LongTensor of n rows."""
    return torch.as_tensor(h, device=device, dtype=torch.long).reshape(-1).expand(n)


class ProposalNet(nn.Module):
    """S-prop-net_θ(x, h, a) (App. B.1, Eq. 6): a U-Net on the state with the embedding Emb(A·(h − 1) + a),
    the size of an image, concatenated as a second channel (so it can hold at most H·A distinct proposals);
    the U-Net's own step embedding sees h too."""

    def __init__(self, image_shape: tuple[int, int], steps: int, actions: int, channels: int,
                 mult: tuple[int, ...], groups: int, embed_dim: int) -> None:
        super().__init__()
        self.actions = actions
        self.code = nn.Embedding(steps * actions, image_shape[0] * image_shape[1])
        self.unet = UNet(image_shape, channels, mult, groups, embed_dim, extra_channels=1)

    def forward(self, x: torch.Tensor, h: int | torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        steps = _steps(h, x.shape[0], x.device)
        return self.unet(x, steps, extra=self.code(self.actions * (steps - 1) + a.long()))


class SelectNet(nn.Module):
    """App. B.2-B.3: three blocks of convolution, group norm and ReLU on the state with the step's
    embedding as an extra image channel (and the goal as another, for the GC-agent), then a linear layer to
    A scores; with ``dueling`` the Q-values are V + (Adv − mean_a Adv) (Wang et al. 2016)."""

    def __init__(self, image_shape: tuple[int, int], steps: int, actions: int, channels: int, groups: int,
                 goal: bool = False, dueling: bool = False) -> None:
        super().__init__()
        H, W = image_shape
        self.image_shape, self.goal, self.dueling = image_shape, goal, dueling
        self.step_map = nn.Embedding(steps, H * W)
        layers: list[nn.Module] = []
        c = 3 if goal else 2
        for i, w in enumerate((channels, 2 * channels, 2 * channels)):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(min(groups, w), w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers, nn.Flatten())
        # the side after two stride-2 convolutions
        features = c * (((H + 1) // 2 + 1) // 2) * (((W + 1) // 2 + 1) // 2)
        self.head = nn.Linear(features, actions)
        self.value = nn.Linear(features, 1) if dueling else None

    def advantages(self, x: torch.Tensor, h: int | torch.Tensor,
                   goal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's raw scores and, with ``dueling``, the state value."""
        n = x.shape[0]
        H, W = self.image_shape
        maps = [x.reshape(n, 1, H, W), self.step_map(_steps(h, n, x.device) - 1).reshape(n, 1, H, W)]
        if self.goal:
            if goal is None:
                raise ValueError("this network is goal-conditioned: give the goal")
            maps.append(goal.reshape(n, 1, H, W))
        f = self.body(torch.cat(maps, 1))
        return self.head(f), None if self.value is None else self.value(f)

    def forward(self, x: torch.Tensor, h: int | torch.Tensor,
                goal: torch.Tensor | None = None) -> torch.Tensor:
        adv, value = self.advantages(x, h, goal)
        if value is None:
            return adv
        return value + adv - adv.mean(-1, keepdim=True)


class SAgent(nn.Module):
    """The S-agent's networks (θ, φ) and the final step's variance; the model of the pair."""

    def __init__(self, prop: ProposalNet, select: SelectNet, sigma2: float) -> None:
        super().__init__()
        self.prop, self.select = prop, select
        self.register_buffer("log_sigma2", torch.tensor(math.log(sigma2)))


class GCAgent(nn.Module):
    """The GC-agent: GC-select-Qnet_ψ and its target weights ψ_target, kept as buffers (a copy that no
    optimiser sees; :func:`inference.gcrl.soft_update` moves them)."""

    def __init__(self, qnet: SelectNet) -> None:
        super().__init__()
        self.qnet = qnet
        self.target = nn.Module()
        for name, p in qnet.named_parameters():
            self.target.register_buffer(name.replace(".", "__"), p.detach().clone())

    def target_weights(self) -> dict[str, torch.Tensor]:
        return {name.replace("__", "."): b for name, b in self.target.named_buffers()}

    def q(self, x: torch.Tensor, h: int | torch.Tensor, goal: torch.Tensor,
          target: bool = False) -> torch.Tensor:
        """Q_ψ(x, h, x̃) for every selection, (N, A); ``target``: with ψ_target."""
        if not target:
            return self.qnet(x, h, goal)
        return functional_call(self.qnet, self.target_weights(), (x, h, goal))


class GCRLGenerator(ModelGuidePair):
    """The variational agent of Sec. 2-3: the S-agent as the model, the GC-agent as the guide.

    :param x_dim: pixels per image (grey levels in [0, 1]).
    :param steps: H. :param actions: A. :param rates: α_1..α_H (default 1/h).
    :param channels, mult, groups, embed_dim: the proposal U-Net's sizes.
    :param select_channels: the selection and Q-networks' width.
    :param kappa: κ, the exploration penalty's weight. :param tau: the guide's temperature (0: greedy).
    :param sigma2: σ² of the final Gaussian step (until :meth:`fit_sigma2` sets it).
    """

    param_prefix = "gcrl"

    def __init__(self, x_dim: int = 784, steps: int = 16, actions: int = 16,
                 rates: Sequence[float] | None = None, channels: int = 32, mult: Sequence[int] = (1, 2, 2, 2),
                 groups: int = 8, embed_dim: int = 64,
                 select_channels: int = 32, kappa: float = 0.05, tau: float = 0.0, sigma2: float = 0.01,
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if steps < 1 or actions < 2:
            raise ValueError(f"steps >= 1 and actions >= 2 required, got steps={steps}, actions={actions}")
        rates = [1.0 / h for h in range(1, steps + 1)] if rates is None else [float(r) for r in rates]
        if len(rates) != steps or any(not r > 0 for r in rates):
            raise ValueError(f"rates must be {steps} positive numbers (one per step), got {rates}")
        if kappa < 0 or tau < 0 or not sigma2 > 0:
            raise ValueError(f"kappa >= 0, tau >= 0 and sigma2 > 0 required, got {kappa}, {tau}, {sigma2}")
        shape = _square(x_dim, image_shape)
        self.x_dim, self.steps, self.actions, self.image_shape = x_dim, steps, actions, shape
        self.kappa, self.tau = float(kappa), float(tau)
        self.register_buffer("rates", torch.tensor(rates))
        self.register_buffer("initial", torch.zeros(x_dim))
        self.s_agent = SAgent(ProposalNet(shape, steps, actions, channels, tuple(mult), groups, embed_dim),
                              SelectNet(shape, steps, actions, select_channels, groups), sigma2)
        self.gc_agent = GCAgent(SelectNet(shape, steps, actions, select_channels, groups, goal=True,
                                          dueling=True))

    # --------------------------------------------------------------------- the MDP and the agents

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(f"z_{h}" for h in range(self.steps))

    @property
    def sigma2(self) -> float:
        return float(self.s_agent.log_sigma2.exp())

    def guide_parameters(self) -> list[nn.Parameter]:
        return list(self.gc_agent.parameters())

    def start(self, n: int) -> torch.Tensor:
        """x_1 for n trajectories."""
        return self.initial.expand(n, self.x_dim)

    def transition(self, x: torch.Tensor, h: int | torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Eq. 5: x_{h+1} = x_h + α_h · S-prop-net_θ(x_h, h, a_h) (the mean of the final step at h = H).
        States (..., D) and selections (...) broadcast (importance samples add a leading dim)."""
        lead = torch.broadcast_shapes(x.shape[:-1], a.shape)
        flat = x.expand(*lead, self.x_dim).reshape(-1, self.x_dim)
        y = self.s_agent.prop(flat, h, a.expand(lead).reshape(-1)).reshape(*lead, self.x_dim)
        return x + self.rates[torch.as_tensor(h, device=x.device) - 1].unsqueeze(-1) * y

    def select_logits(self, x: torch.Tensor, h: int | torch.Tensor) -> torch.Tensor:
        """The S-agent's selection logits at (x_h, h), (..., A)."""
        return self.s_agent.select(x.reshape(-1, self.x_dim), h).reshape(*x.shape[:-1], self.actions)

    def gc_scores(self, x: torch.Tensor, h: int, goal: torch.Tensor) -> torch.Tensor:
        """Q_ψ,a(x_h, h, x̃) + κ log S-select_φ,a(x_h, h): the GC-agent picks the argmin (Sec. 3.2)."""
        lead = torch.broadcast_shapes(x.shape[:-1], goal.shape[:-1])
        x = x.expand(*lead, self.x_dim)
        goal = goal.expand(*lead, self.x_dim)
        q = self.gc_agent.q(x.reshape(-1, self.x_dim), h, goal.reshape(-1, self.x_dim))
        return q.reshape(*lead, self.actions) + self.kappa * F.log_softmax(self.select_logits(x, h), -1)

    def gc_policy(self, x: torch.Tensor, h: int, goal: torch.Tensor,
                  tau: float | None = None) -> dist.Categorical:
        """The GC-agent's selection distribution: one-hot at the argmin of :meth:`gc_scores` (τ = 0), else
        Boltzmann over −scores/τ."""
        tau = self.tau if tau is None else tau
        scores = self.gc_scores(x, h, goal)
        if tau == 0:
            return dist.Categorical(probs=F.one_hot(scores.argmin(-1), self.actions).to(scores.dtype))
        return dist.Categorical(logits=-scores / tau)

    @torch.no_grad()
    def _path(self, n: int, choose: Callable[[torch.Tensor, int], torch.Tensor]) -> dict[str, torch.Tensor]:
        """n trajectories from x_1 with selections ``choose(x_h, h)``: states (H + 1, N, D) — x_1..x_H and the
        final mean — and selections (H, N)."""
        x = self.start(n)
        states, selections = [x], []
        for h in range(1, self.steps + 1):
            a = choose(x, h)
            x = self.transition(x, h, a)
            states.append(x)
            selections.append(a)
        return {"states": torch.stack(states), "selections": torch.stack(selections)}

    def rollout(self, goal: torch.Tensor) -> dict[str, torch.Tensor]:
        """Alg. 1's trajectory with the greedy GC-agent for each goal (see :meth:`_path` for the shapes)."""
        return self._path(goal.shape[0], lambda x, h: self.gc_scores(x, h, goal).argmin(-1))

    def unfold(self, selections: torch.Tensor) -> torch.Tensor:
        """S-prop-net_θ,U(a_1..a_H): the final mean for selections (N, H), differentiable in θ."""
        if selections.dim() != 2 or selections.shape[1] != self.steps:
            raise ValueError(f"selections must be (N, H = {self.steps}), got {tuple(selections.shape)}")
        x = self.start(selections.shape[0])
        for h in range(1, self.steps + 1):
            x = self.transition(x, h, selections[:, h - 1])
        return x

    @torch.no_grad()
    def fit_sigma2(self, goals: torch.Tensor, batch_size: int = 500) -> float:
        """Set σ² of the final step to its maximum-likelihood value given the greedy GC-agent's trajectories
        to ``goals`` (training images): the mean squared error per pixel. The RL losses do not depend on
        it (only on its own fixed scale), so it is a closed-form M-step for the density."""
        sq, count = 0.0, 0
        for i in range(0, goals.shape[0], batch_size):
            g = goals[i:i + batch_size]
            sq += float((self.rollout(g)["states"][-1] - g).pow(2).sum())
            count += g.numel()
        value = max(sq / count, 1e-6)
        self.s_agent.log_sigma2.fill_(math.log(value))
        return value

    # --------------------------------------------------------------------- the Pyro pair

    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
        """p: the S-agent's trajectory (Alg. 3) and the final Gaussian step scoring x."""
        self.register_params()
        n = x.shape[0] if x is not None else num_samples
        if n is None:
            raise ValueError("give data x or num_samples")
        s = self.start(n)
        with pyro.plate("data", n):
            for h in pyro.markov(range(1, self.steps + 1)):
                a = pyro.sample(f"z_{h - 1}", dist.Categorical(logits=self.select_logits(s, h)))
                s = self.transition(s, h, a)
            scale = (0.5 * self.s_agent.log_sigma2).exp().expand_as(s)
            pyro.sample("x", dist.Normal(s, scale).to_event(1), obs=x)
        return s

    def guide(self, x: torch.Tensor, num_samples: int | None = None) -> None:
        """q: the GC-agent's trajectory towards the goal x (greedy, or Boltzmann with ``tau`` > 0)."""
        self.register_params()
        s = self.start(x.shape[0])
        with pyro.plate("data", x.shape[0]):
            for h in pyro.markov(range(1, self.steps + 1)):
                a = pyro.sample(f"z_{h - 1}", self.gc_policy(s, h, x))
                s = self.transition(s, h, a)

    def sample_path(self, num_samples: int) -> dict[str, torch.Tensor]:
        """Alg. 3: the S-agent's trajectories from x_1, with no goal and no GC-agent (see :meth:`_path`)."""
        return self._path(num_samples,
                          lambda x, h: dist.Categorical(logits=self.select_logits(x, h)).sample())

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Alg. 3's final states: the final step's means clipped to the data's range [0, 1] (the paper returns
        the final state; the Gaussian step's noise is not added)."""
        return self.sample_path(num_samples)["states"][-1].clamp(0, 1)


register_model("gcrl", GCRLGenerator, kind="generator",
               about="goal-conditioned RL generator: S-agent model, GC-agent guide (Vargas Vieyra & Ménard)")
