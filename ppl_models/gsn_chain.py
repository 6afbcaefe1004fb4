"""The self-looped VAE chain of a variational simple GSN, unrolled as a Pyro model/guide pair.

Bachman & Precup (2015), "Variational generative stochastic networks with collaborative shaping", Sec. 3-4
and 6, Fig. 1(c) and Fig. 2. A VAE — corruptor q(z | x), reconstructor p(x | z), prior p*(z) = N(0, I) —
is looped on itself: x_0 ~ D, z_t ~ q(z | x_t), x_{t+1} ~ p(x | z_t). Trained unrolled for T steps from a
data point, the objective is the sum of the per-step free energies (Eq. 2) on the pairs (x_t, z_t) that the
unrolling generates, with gradients through the unrolled graph (BPTT, ``bptt=True``, as the paper)::

    L(x_0) = Σ_{t=0}^{T-1} E[ −log p(x_t | z_t) + KL(q(z_t | x_t) || p*(z_t)) ],
             z_t ~ q(z | x_t),   x_{t+1} = feed(p(x | z_t))

The gradient of the later steps' free energies through the chain points (``bptt=True``) rewards a chain
that emits points easy to reconstruct — with a learned Gaussian variance, a constant image is the easiest —
and can collapse the chain (it did on digits, with either likelihood and any weight of L_g; the repository's
``results/gsn-digits-study``); ``bptt=False`` treats the generated pairs as data for the free energies and
leaves the back-propagation through the chain to the guide function's loss L_g (:meth:`unroll`). The
experiment's presets use ``bptt=False``.

``num_steps=1`` is the plain VAE (the pre-training of Fig. 1(c), and the one-step bound F(x) every table
reports). Walkback (Alg. 1, Eq. 4 with x̃ ~ W) is the alternative, ``walkback=True``: the same walk, but
every step reconstructs the *data* x_0 from z_t, −log p(x_0 | z_t), and no gradient flows through the walk
(it only produces the training pairs (x_0, z_t), as Alg. 1 returns P_xz).

Symbols to code: q -> :meth:`encode` (``encoder``), p_θ(x | z) -> :meth:`emission` (``decoder``, and the
shared ``log_var`` of the Gaussian form), p*(z) -> the N(0, I) prior of every ``z_t`` site, x_t -> the chain
point at step t (the data ``x`` for t = 0), T -> ``num_steps``, x̂ (Alg. 1) -> the sampled chain points
``xhat_t`` when ``feed="sample"``.

Pyro sites (the library's scheme): ``z_0 … z_{T-1}`` are the step latents; ``x`` observes the data under
p(x | z_0); ``x_1 … x_{T-1}`` observe the later chain points under p(x | z_t) (the data again with
walkback). With ``feed="mean"`` (the original code's choice and the presets') the next chain point is the
decoder mean, a deterministic function of z_t that model and guide both compute; with ``feed="sample"`` it
is a draw x̂_t ~ p(x | z_{t-1}), the latent site ``xhat_t`` sampled from the same distribution in both (its
KL is 0; a Bernoulli draw has no reparameterisation, so its gradient is a score-function term). The guide
samples every site in the model's order, so :class:`inference.PathwiseKL_ELBO` takes every KL analytically.

Reconstruction distributions: ``"bernoulli"`` (logits; grey levels in [0, 1] are scored with the
cross-entropy, as the paper's MNIST model) and ``"gaussian"``, mean σ(decoder(z)) with one learned
log-variance shared by all pixels and all z (Sec. 7's ORK/VAR model). The sigmoid keeps the mean on the
grey-level range; the paper's mean was linear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_models.base import register_model
from ppl_models.masks import validate_mask
from ppl_models.vae import VAE

LIKELIHOODS = ("bernoulli", "gaussian")
FEEDS = ("mean", "sample")


class GSNChain(VAE):
    """A VAE looped on itself (see the module docstring). Encoder and decoder are the :class:`VAE`'s.

    :param likelihood: ``"bernoulli"`` or ``"gaussian"`` (shared learned log-variance).
    :param feed: what the chain passes on: the decoder ``"mean"`` or a ``"sample"``.
    :param num_steps: T, the unrolled steps of ``model``/``guide`` (1: the plain VAE).
    :param walkback: reconstruct the data x_0 at every step, no gradient through the walk (Alg. 1).
    :param bptt: let the free energies of later steps back-propagate into the chain points (and so into the
        earlier steps); ``False`` trains p and q on the generated pairs as data, and only the guide
        function's L_g (:meth:`unroll`) is back-propagated through the chain.
    :param init_log_var: initial shared log-variance of the Gaussian form.
    """

    param_prefix = "gsn"

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden: tuple[int, ...] = (500, 500),
                 likelihood: str = "gaussian", feed: str = "mean", num_steps: int = 6, walkback: bool = False,
                 init_log_var: float = math.log(0.1), bptt: bool = True) -> None:
        super().__init__(x_dim, z_dim, hidden)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if feed not in FEEDS:
            raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        self.likelihood, self.feed, self.num_steps, self.walkback = likelihood, feed, num_steps, walkback
        self.bptt = bptt
        self.log_var = nn.Parameter(torch.tensor(float(init_log_var))) if likelihood == "gaussian" else None

    @property
    def latent_sites(self) -> tuple[str, ...]:
        sites = []
        for t in range(self.num_steps):
            if t and self.feed == "sample":
                sites.append(f"xhat_{t}")
            sites.append(f"z_{t}")
        return tuple(sites)

    def emission(self, z: torch.Tensor, detach: bool = False) -> dist.TorchDistribution:
        """p(x | z) as an event of the image's pixels (with ``detach``, built from detached parameters: a draw
        from it carries no gradient, not even a score-function one)."""
        out = self.decode(z)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out.detach() if detach else out, validate_args=False).to_event(1)
        log_var = self.log_var.detach() if detach else self.log_var
        loc = torch.sigmoid(out.detach() if detach else out)
        return dist.Normal(loc, (0.5 * log_var).exp().expand_as(out), validate_args=False).to_event(1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder mean σ(decoder(z)) of either form: what the chain shows and (``feed="mean"``) feeds."""
        return torch.sigmoid(self.decode(z))

    def _steps(self, num_steps: int | None) -> int:
        steps = self.num_steps if num_steps is None else num_steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {steps!r}")
        return steps

    def _next(self, z: torch.Tensor, em: dist.TorchDistribution, t: int) -> torch.Tensor:
        """The chain point x_t emitted by step t − 1 from z = z_{t−1} and em = p(x | z) (site ``xhat_t`` when
        sampled); detached for walkback and without ``bptt``, a sampled point then drawn from detached
        parameters so that no score-function gradient reaches p through it either."""
        cut = self.walkback or not self.bptt
        if self.feed == "mean":
            return em.mean.detach() if cut else em.mean
        return pyro.sample(f"xhat_{t}", self.emission(z, detach=True) if cut else em)

    def _transition(self, cur: torch.Tensor) -> tuple[torch.Tensor, dist.TorchDistribution]:
        """One step of the chain outside Pyro: z ~ q(z | cur) (reparameterised) and p(x | z)."""
        loc, scale = self.encode(cur)
        z = loc + scale * torch.randn_like(loc)
        return z, self.emission(z)

    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None,
              num_steps: int | None = None) -> torch.Tensor:
        """p: the T per-step reconstructions of the unrolled chain (see the module docstring). With
        ``x=None`` it draws ``num_samples`` images from the one-step generative model p*(z) p(x | z)."""
        self.register_params()
        if x is None:
            if num_samples is None:
                raise ValueError("model needs data x or num_samples to sample unconditionally")
            with pyro.plate("data", num_samples):
                z = pyro.sample("z_0", self.prior())
                return pyro.sample("x", self.emission(z))
        steps = self._steps(num_steps)
        cur = x
        with pyro.plate("data", x.shape[0]):
            for t in pyro.markov(range(steps)):
                z = pyro.sample(f"z_{t}", self.prior())
                em = self.emission(z)
                pyro.sample("x" if t == 0 else f"x_{t}", em, obs=x if (t == 0 or self.walkback) else cur)
                if t + 1 < steps:
                    cur = self._next(z, em, t + 1)
        return cur

    def guide(self, x: torch.Tensor, num_samples: int | None = None, num_steps: int | None = None) -> None:
        """q: the chain run from the data, z_t ~ q(z | x_t), x_{t+1} = feed(p(x | z_t))."""
        self.register_params()
        steps = self._steps(num_steps)
        cur = x
        with pyro.plate("data", x.shape[0]):
            for t in pyro.markov(range(steps)):
                loc, scale = self.encode(cur)
                z = pyro.sample(f"z_{t}", dist.Normal(loc, scale).to_event(1))
                if t + 1 < steps:
                    cur = self._next(z, self.emission(z), t + 1)

    def unroll(self, x: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """The chain points x_1 … x_T emitted by T steps from ``x`` (T, B, D), differentiable (reparameterised
        z; a Bernoulli ``feed="sample"`` draw carries no gradient): what the guide function judges (Eq. 7)."""
        steps, cur, out = self._steps(num_steps), x, []
        for _ in range(steps):
            _, em = self._transition(cur)
            cur = em.mean if self.feed == "mean" else em.rsample() if em.has_rsample else em.sample()
            out.append(cur)
        return torch.stack(out)

    @torch.no_grad()
    def run_chain(self, x0: torch.Tensor, num_steps: int, mask: torch.Tensor | None = None,
                  fill: float | torch.Tensor = 0.5, every: int = 1,
                  at: Sequence[int] | None = None) -> torch.Tensor:
        """Run the chain ``num_steps`` steps from ``x0`` (B, D) and return the decoder means of the steps
        ``every``, 2·``every``, … (frames, B, D), or of the steps listed in ``at`` (1-based) if given.

        Partial control (Fig. 4a right): with ``mask`` (1 = clamped, ``ppl_models.masks`` convention, (D,) or
        (B, D)), the clamped pixels keep their values in ``x0`` at every step, the others start at ``fill``
        and are painted in by the chain; the frames show the clamped pixels too."""
        if num_steps < 1 or every < 1:
            raise ValueError(f"num_steps and every must be >= 1, got {num_steps}, {every}")
        wanted = set(at or ())
        if at is not None and (not wanted or min(wanted) < 1 or max(wanted) > num_steps):
            raise ValueError(f"at must list steps in 1..{num_steps}, got {list(at)}")
        keep = validate_mask(mask, x0) if mask is not None else None
        cur = x0 if keep is None else keep * x0 + (1 - keep) * torch.as_tensor(fill, dtype=x0.dtype,
                                                                                device=x0.device)
        frames = []
        for s in range(1, num_steps + 1):
            _, em = self._transition(cur)
            shown = em.mean
            cur = shown if self.feed == "mean" else em.sample()
            if keep is not None:
                cur, shown = keep * x0 + (1 - keep) * cur, keep * x0 + (1 - keep) * shown
            if (s in wanted) if at is not None else (s % every == 0):
                frames.append(shown)
        return torch.stack(frames)

    @torch.no_grad()
    def reconstruction_and_kl(self, x: torch.Tensor, passes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, averaged over ``passes`` draws z ~ q(z | x): −log p(x | z) and KL(q(z | x) || p*(z))
        (the two terms of Eq. 2; the axes of Fig. 4(c))."""
        loc, scale = self.encode(x)
        q = dist.Normal(loc, scale).to_event(1)
        kl = torch.distributions.kl_divergence(q, self.prior())
        rec = torch.stack([-self.emission(q.rsample()).log_prob(x) for _ in range(passes)]).mean(0)
        return rec, kl

    def guide_parameters(self) -> list[nn.Parameter]:
        """φ: the encoder q(z | x) (the chain's guide also runs the decoder, which is θ)."""
        return list(self.encoder.parameters())


register_model("gsn-chain", GSNChain, kind="generator",
               about="self-looped VAE chain of a variational simple GSN (Bachman & Precup 2015, Sec. 3-6)")
