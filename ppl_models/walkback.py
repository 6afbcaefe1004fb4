"""Variational walkback: a learned transition operator, heated by its guide and cooled by its model.

Goyal (2017), thesis, chapter 3 ("Variational walkback"): Alg. 1, Eqs. 3.1-3.5 and 3.10, Sec. 3.4.3 (the
operators), Sec. 3.14 (reversibility) and Sec. 3.15 (per-step normalisation). One transition operator
p_T(s' | s) with a temperature T serves both directions:

- the **guide** q heats: from the data s_0 = x it draws s_t ~ p_{T_t}(s_t | s_{t-1}) for t = 1 … K with the
  temperatures of Alg. 1 (T = 1, and after each step t > n, T ← 2T, capped at T_max), the operator's
  parameters tied to the model's but **not trained through the guide** (they enter detached:
  stop-gradient, as the thesis' θ_q ← θ_p after each update);
- the **model** p cools: s_K ~ p*(s_K), then s_{t-1} ~ p_{T_t}(s_{t-1} | s_t) for t = K … 1, the same
  temperatures in reverse, and the observation x = s_0 at T_1 = 1.

The walk length is K = ceil(log2 T_max) + n, n ~ U{0..N1} (Eq. 3.1), drawn per minibatch
(:meth:`VariationalWalkback.draw_walk`) or fixed for evaluation (:attr:`walk_steps`). The temperatures follow
Alg. 1 as written — step t is taken at the current T, and T doubles after each step t > n — so the first
n + 1 steps are at T = 1 and the last of the K steps at T_max / 2 (a paraphrase "T = 1 for the first n
steps, then doubling up to T_max" is one step off at both ends). A walk longer than that, or one given
fewer T = 1 steps with :meth:`VariationalWalkback.set_walk`, reaches T_max and stays there.

The bound of Eq. 3.5,

    L(s_0) = Σ_{t=1}^{K} [ln p_{T_t}(s_{t-1} | s_t) − ln q_{T_t}(s_t | s_{t-1})] + ln p*(s_K),

is exactly the Trace_ELBO of this model/guide pair: one heated path, the model's log-density of it minus
the guide's. The guide samples in the **reverse** of the model's order (heating s_1 first, the model's last
latent), so the validity check of :class:`inference.PathwiseKL_ELBO` sends every latent site but s_K to the
Monte Carlo term (the analytic KL of a site would need its model parent, the later state, drawn first); s_K's
factor p* has no parent, so its KL may be analytic. ``PathwiseKL_ELBO()`` therefore estimates Eq. 3.5 with
one analytic term and warns about the rest, ``PathwiseKL_ELBO(analytic=False)`` (or ``Trace_ELBO``) with
Monte Carlo terms throughout; a test checks the value against the closed form of a linear-Gaussian
operator.

Operators (Sec. 3.4.3), F an MLP with one normalisation per temperature level (Sec. 3.15 found separate
batch-normalisation parameters per walk step better; with walks of random length, step t is at T = 1 in one
walk and heated in another, so the levels here are the temperatures 1, 2, 4, …, T_max / 2 that Alg. 1's
walks visit (a longer walk's steps at T_max share the hottest), the T = 1 steps sharing one), α =
``alpha``. ``norm="layer"`` (the default) normalises each example by its own statistics;
``norm="batch"`` is the thesis' batch normalisation, whose batch statistics make the operator another
function in the heating call (on s_{t−1}) than in the cooling call (on s_t) and another in evaluation
(running averages) than in training — on digits it did worse than layer norm (the walkback experiment's
``*-batchnorm`` ablations), which is why it is not the default:

- Bernoulli, binary states: ρ = σ(((1 − α) s + α F(s)) / T) per pixel;
- Gaussian, real states: μ = (1 − α) s + α F(s), standard deviation √T · softplus(F_σ(s)) — the noise
  **variance** grows linearly with T, as Alg. 1 says ("injects noise of variance Tσ²"); Sec. 3.4.3 writes a
  standard deviation ∝ T instead. With variance ∝ T, T_max = σ²_max / σ² (Alg. 1), σ²_max the data's
  variance.

Symbols to code: p_T -> :class:`TransitionOperator` (``forward(s, T)`` gives the distribution of the
next state), q -> :meth:`VariationalWalkback.guide`, p -> :meth:`VariationalWalkback.model`, p* -> ``p_star``
(moments ``star_mean`` / ``star_var``, updated from heated end states by :meth:`update_star`), s_0 -> the
observation ``x``, s_t -> site ``z_{K−t}`` (``z_0`` is s_K, the model's first draw; ``z_{K−1}`` is s_1), K ->
``walk_steps``, n / N1 -> ``n`` / ``max_extra``, T_t -> :meth:`temperatures`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ppl_models.base import ModelGuidePair, register_model
from ppl_models.masks import validate_mask

FORMS = ("bernoulli", "gaussian")
NORMS = ("layer", "batch")


def walk_temperatures(num_steps: int, n: int, t_max: float) -> list[float]:
    """T_1 … T_K of Alg. 1: every step t is taken at the current T, and after each step t > n the
    temperature doubles (T ← 2T), capped at ``t_max``."""
    if num_steps < 1 or n < 0 or t_max < 1:
        raise ValueError(f"need num_steps >= 1, n >= 0 and t_max >= 1, got {num_steps}, {n}, {t_max}")
    temps, T = [], 1.0
    for t in range(1, num_steps + 1):
        temps.append(T)
        if t > n:
            T = min(2 * T, t_max)
    return temps


class TransitionOperator(nn.Module):
    """p_T(s' | s) (see the module docstring): ``net="mlp"`` (hidden layers, each followed by a normalisation
    of its own for every temperature level, ``levels`` of them) or ``net="linear"`` (F(s) = w ⊙ s + c and a
    constant F_σ, for exact tests). The Bernoulli MLP adds a learned per-pixel gain to F, g ⊙ (2s − 1),
    started at ``skip``: with g = 0 an untrained operator forgets its input (ρ = σ(0.5 s) ≈ ½), and both the
    heating guide and the cooling model then settle on the pixels' marginals (a fixed point of Alg. 1's
    stop-gradient updates, seen on digits); a positive start keeps the data at T = 1 instead. ``norm``:
    "layer" (per-example statistics: the same function in training
    and evaluation, in the heating and the cooling direction) or "batch" (the thesis' batch normalisation:
    batch statistics in training, running averages in evaluation)."""

    def __init__(self, x_dim: int, form: str = "gaussian", hidden: tuple[int, ...] = (500, 500),
                 alpha: float = 0.5, levels: int = 8, net: str = "mlp", norm: str = "layer",
                 skip: float = 0.0) -> None:
        super().__init__()
        if form not in FORMS or net not in ("mlp", "linear") or norm not in NORMS:
            raise ValueError(f"form must be one of {FORMS}, net 'mlp' or 'linear' and norm one of {NORMS}, "
                             f"got {form!r}, {net!r}, {norm!r}")
        if not 0 < alpha <= 1 or x_dim < 1 or levels < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"need 0 < alpha <= 1, x_dim >= 1, levels >= 1 and hidden sizes >= 1, got "
                             f"{alpha}, {x_dim}, {levels}, {hidden}")
        self.form, self.alpha, self.net, self.levels, self.norm = form, alpha, net, levels, norm
        out = x_dim * (2 if form == "gaussian" else 1)
        if net == "linear":
            self.w = nn.Parameter(torch.zeros(x_dim))
            self.c = nn.Parameter(torch.zeros(out))
        else:
            sizes = [x_dim, *hidden]
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
            kind = nn.LayerNorm if norm == "layer" else nn.BatchNorm1d
            # per-level normalisation (Sec. 3.15): norms[k][l] normalises layer l at temperature 2^k
            self.norms = nn.ModuleList(nn.ModuleList(kind(h) for h in hidden) for _ in range(levels))
            self.head = nn.Linear(sizes[-1], out)
            if form == "bernoulli":  # F(s) = MLP(s) + g ⊙ (2s − 1), the gain g learned from ``skip``
                self.gain = nn.Parameter(torch.full((x_dim,), float(skip)))

    def level(self, T: float) -> int:
        """The normalisation level of temperature T: round(log2 T), the last level for anything hotter."""
        if T < 1:
            raise ValueError(f"temperature must be >= 1, got {T}")
        return min(round(math.log2(T)), self.levels - 1)

    def features(self, s: torch.Tensor, T: float) -> torch.Tensor:
        """F(s) (and F_σ(s) for the Gaussian form, concatenated) with temperature T's normalisation."""
        if self.net == "linear":
            lin = self.w * s
            return self.c + (torch.cat([lin, torch.zeros_like(lin)], -1) if self.form == "gaussian" else lin)
        h = s.reshape(-1, s.shape[-1])  # batch norm wants (rows, features): importance samples are rows too
        for layer, norm in zip(self.layers, self.norms[self.level(T)], strict=True):
            h = F.relu(norm(layer(h)))
        f = self.head(h).reshape(*s.shape[:-1], -1)
        return f + self.gain * (2 * s - 1) if self.form == "bernoulli" else f

    def forward(self, s: torch.Tensor, T: float) -> dist.TorchDistribution:
        """p_T(· | s), one event per row."""
        f = self.features(s, T)
        if self.form == "bernoulli":
            logits = ((1 - self.alpha) * s + self.alpha * f) / T
            return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)
        f_mu, f_sigma = f.chunk(2, -1)
        loc = (1 - self.alpha) * s + self.alpha * f_mu
        return dist.Normal(loc, math.sqrt(T) * F.softplus(f_sigma) + 1e-4).to_event(1)


class VariationalWalkback(ModelGuidePair):
    """The heating guide and cooling model of one :class:`TransitionOperator` (see the module docstring).

    :param x_dim: state dimension.
    :param form: "bernoulli" (binary data) or "gaussian" (real data).
    :param hidden: hidden sizes of F.
    :param alpha: α of the operator.
    :param t_max: T_max (Alg. 1: σ²_max / σ²).
    :param max_extra: N1, the largest number of extra temperature-1 steps.
    :param init_mean: the data's mean per dimension (p*'s first mean); zeros if None.
    :param init_var: the data's variance per dimension (p*'s first variance, Gaussian form); ones if None.
    :param net: "mlp", or "linear" for exact tests.
    :param norm: "layer" or "batch" normalisation, one per temperature level (:class:`TransitionOperator`).
    :param skip: the Bernoulli operator's starting gain on (2s − 1) (:class:`TransitionOperator`).
    """

    param_prefix = "walkback"

    def __init__(self, x_dim: int, form: str = "gaussian", hidden: tuple[int, ...] = (500, 500),
                 alpha: float = 0.5, t_max: float = 256.0, max_extra: int = 5,
                 init_mean: torch.Tensor | None = None, init_var: torch.Tensor | None = None,
                 net: str = "mlp", norm: str = "layer", skip: float = 0.0) -> None:
        super().__init__()
        if t_max < 1 or max_extra < 0:
            raise ValueError(f"need t_max >= 1 and max_extra >= 0, got {t_max}, {max_extra}")
        self.x_dim, self.form, self.t_max, self.max_extra = x_dim, form, float(t_max), max_extra
        self.heating_steps = math.ceil(math.log2(self.t_max))
        # one normalisation per temperature level Alg. 1's walks visit: 1, 2, 4, …, T_max / 2
        self.operator = TransitionOperator(x_dim, form, hidden, alpha, max(1, self.heating_steps), net, norm,
                                           skip)
        mean = torch.zeros(x_dim) if init_mean is None else init_mean.detach().float().reshape(x_dim).cpu()
        var = torch.ones(x_dim) if init_var is None else init_var.detach().float().reshape(x_dim).cpu()
        self.register_buffer("star_mean", mean.clone())
        self.register_buffer("star_var", var.clone().clamp(min=1e-4))
        self.walk_steps = self.heating_steps  # K; draw_walk() sets it per minibatch
        self.n = 0
        self.last_end: torch.Tensor | None = None  # the guide's last end states s_K, for update_star

    # --------------------------------------------------------------------------------------- the walk
    def draw_walk(self, generator: torch.Generator | None = None) -> int:
        """n ~ U{0..N1} and K = ceil(log2 T_max) + n (Eq. 3.1), for the next model/guide call; returns K."""
        device = None if generator is None else generator.device  # the trainer's generator is on its device
        self.n = int(torch.randint(0, self.max_extra + 1, (1,), generator=generator, device=device))
        self.walk_steps = max(1, self.heating_steps + self.n)
        return self.walk_steps

    def set_walk(self, num_steps: int, n: int | None = None) -> None:
        """A fixed walk of ``num_steps`` steps (evaluation), its first ``n`` at T = 1 (default: as many as
        Eq. 3.1 leaves after the heating steps, at least 0)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.walk_steps = num_steps
        self.n = max(0, num_steps - self.heating_steps) if n is None else n

    def temperatures(self) -> list[float]:
        """T_1 … T_K of the current walk."""
        return walk_temperatures(self.walk_steps, self.n, self.t_max)

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(f"z_{k}" for k in range(self.walk_steps))

    def guide_parameters(self) -> list[nn.Parameter]:
        """The guide runs the model's operator with detached parameters: it has none of its own."""
        return []

    def p_star(self, n: int) -> dist.TorchDistribution:
        """p*(s_K): a Gaussian with the tracked moments (Gaussian form), or Bernoulli(mean) (Bernoulli)."""
        if self.form == "bernoulli":
            return dist.Bernoulli(probs=self.star_mean.clamp(1e-4, 1 - 1e-4).expand(n, self.x_dim),
                                  validate_args=False).to_event(1)
        return dist.Normal(self.star_mean.expand(n, self.x_dim), self.star_var.sqrt().expand(n, self.x_dim)
                           ).to_event(1)

    @torch.no_grad()
    def update_star(self, end_states: torch.Tensor, momentum: float = 0.1) -> None:
        """Move p*'s moments towards those of heated end states s_K (Alg. 1, after each walk)."""
        n = end_states.shape[0]
        # The variance only where update_star_moments uses it (a Gaussian p*, more than one state).
        var = end_states.var(0) if self.form == "gaussian" and n > 1 else self.star_var
        self.update_star_moments(end_states.mean(0), var, n, momentum)

    @torch.no_grad()
    def update_star_moments(self, mean: torch.Tensor, var: torch.Tensor, count: int,
                            momentum: float = 0.1) -> None:
        """Move p*'s moments towards the end states' mean and (unbiased) variance over ``count`` states:
        :meth:`update_star`'s update, from moments that data-parallel training computes across processes."""
        self.star_mean.lerp_(mean, momentum)
        if self.form == "gaussian" and count > 1:
            self.star_var.lerp_(var.clamp(min=1e-4), momentum)

    def _detached_operator(self, s: torch.Tensor, T: float) -> dist.TorchDistribution:
        params = {k: v.detach() for k, v in self.operator.named_parameters()}
        buffers = dict(self.operator.named_buffers())
        return functional_call(self.operator, {**params, **buffers}, (s, T))

    # -------------------------------------------------------------------------------- Pyro programs
    def guide(self, x: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """q heats: s_t ~ p_{T_t}(s_t | s_{t-1}) from s_0 = x, with stop-gradient parameters; returns s_K."""
        K, temps = self.walk_steps, self.temperatures()
        s = x
        with pyro.plate("data", x.shape[0]):
            for t in pyro.markov(range(1, K + 1)):
                s = pyro.sample(f"z_{K - t}", self._detached_operator(s, temps[t - 1]))
        self.last_end = s.detach()
        return s

    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
        """p cools: s_K ~ p*, then s_{t-1} ~ p_{T_t}(s_{t-1} | s_t) for t = K … 1; x = s_0 observed."""
        self.register_params()
        if x is None and num_samples is None:
            raise ValueError("model needs data x or num_samples to sample unconditionally")
        n = x.shape[0] if x is not None else num_samples
        K, temps = self.walk_steps, self.temperatures()
        with pyro.plate("data", n):
            s = pyro.sample("z_0", self.p_star(n))
            for k in pyro.markov(range(1, K)):  # site z_k is s_{K-k}, drawn at step t = K - k + 1
                t = K - k + 1
                s = pyro.sample(f"z_{k}", self.operator(s, temps[t - 1]))
            obs = self.operator(s, temps[0])
            pyro.sample("x", obs, obs=x)
        return obs.mean

    # ------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def run(self, s: torch.Tensor, steps: int, T: float = 1.0,
            mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
            every: int | None = None, mean: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Iterate the operator ``steps`` times at temperature ``T`` from ``s``, the pixels where ``mask``
        is 1 clamped to ``known`` (from the start); returns the last step's mean (``mean=False``: its drawn
        state), or every ``every``-th step's."""
        if mask is not None:
            mask = validate_mask(mask, known)
            s = mask * known + (1 - mask) * s
        frames = []
        for i in range(1, steps + 1):
            d = self.operator(s, T)
            s = d.sample()
            out = d.mean if mean else s
            if mask is not None:
                s = mask * known + (1 - mask) * s
                out = mask * known + (1 - mask) * out
            if every is not None and i % every == 0:
                frames.append(out)
        return frames if every is not None else out

    @torch.no_grad()
    def cool(self, s: torch.Tensor, mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
             every_step: bool = False, mean: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """The model's cooling walk from states ``s`` (s_K) down to s_0, pixels where ``mask`` is 1 clamped to
        ``known`` at every step; returns the mean of the last (T = 1) step (``mean=False``: a draw of s_0), or
        with ``every_step`` the mean of every step (K of them, the last one s_0's)."""
        K, temps = self.walk_steps, self.temperatures()
        if mask is not None:
            mask = validate_mask(mask, known)
            s = mask * known + (1 - mask) * s
        frames = []
        for t in range(K, 0, -1):
            d = self.operator(s, temps[t - 1])
            s = d.sample() if t > 1 or not mean else d.mean
            if mask is not None:
                s = mask * known + (1 - mask) * s
            shown = d.mean if mean or t > 1 else s
            frames.append(mask * known + (1 - mask) * shown if mask is not None else shown)
        return frames if every_step else frames[-1]

    @torch.no_grad()
    def heat(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The guide's heating walk from ``x``: the states s_1 … s_K."""
        K, temps, s, states = self.walk_steps, self.temperatures(), x, []
        for t in range(1, K + 1):
            s = self.operator(s, temps[t - 1]).sample()
            states.append(s)
        return states

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True, clamp: bool = True) -> torch.Tensor:
        """Cool from p* along the current walk; returns the mean of the last (T = 1) step (``mean=False``: a
        draw of s_0), clamped to the images' [0, 1] unless ``clamp`` is False (data that are not images)."""
        s = self.cool(self.p_star(num_samples).sample(), mean=mean)
        return s.clamp(0, 1) if clamp else s

    @torch.no_grad()
    def inpaint(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fill the pixels where ``mask`` is 0: a cooling walk from p* with the known pixels of ``x`` clamped
        at every step."""
        return self.cool(self.p_star(x.shape[0]).sample(), mask, x)


@torch.no_grad()
def reversibility(operator: TransitionOperator, s0: torch.Tensor, steps: int, burn_in: int = 50,
                  T: float = 1.0) -> dict[str, float]:
    """Sec. 3.14: run p_T for ``burn_in`` + ``steps`` steps from ``s0`` (one chain per row) and estimate, per
    step after burn-in, KL(p_T(s'|s) π(s) || p_T(s|s') π(s')) by the mean of ln p_T(s_{t+1}|s_t) −
    ln p_T(s_t|s_{t+1}) (nats per step), and the per-step entropy by the mean of −ln p_T(s_{t+1}|s_t). The
    ratio (the thesis' 3.6 %) is reported only where that entropy is a discrete, positive one (Bernoulli)."""
    s = s0
    for _ in range(burn_in):
        s = operator(s, T).sample()
    forward, backward = [], []
    for _ in range(steps):
        d = operator(s, T)
        nxt = d.sample()
        forward.append(d.log_prob(nxt))
        backward.append(operator(nxt, T).log_prob(s))
        s = nxt
    fwd, bwd = torch.stack(forward), torch.stack(backward)  # (steps, chains)
    per_chain = (fwd - bwd).mean(0)
    kl = float(per_chain.mean())
    out = {"kl_per_step": kl, "kl_stderr": float(per_chain.std() / math.sqrt(per_chain.numel()))
           if per_chain.numel() > 1 else float("nan"),
           "entropy_per_step": float(-fwd.mean()), "steps": steps, "burn_in": burn_in,
           "chains": int(s0.shape[0])}
    discrete = getattr(operator, "form", None) == "bernoulli"
    out["ratio"] = kl / out["entropy_per_step"] if discrete and out["entropy_per_step"] > 0 else None
    return out


register_model("walkback", VariationalWalkback, kind="generator",
               about="variational walkback: one transition operator, heated by its guide and cooled by its "
                     "model (Goyal 2017, ch. 3, Alg. 1, Eq. 3.5)")
