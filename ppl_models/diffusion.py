"""Bernoulli (bit-flip) diffusion as a model/guide pair: a fixed noising guide and a learned denoising model.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.3 and 7.2, Eq. 9: the
diffusion model of Sohl-Dickstein et al. (2015, "Deep unsupervised learning using nonequilibrium
thermodynamics", binomial diffusion) seen as guided policy search — a fixed guide policy q that destroys the
data step by step, and a learned primary policy p that runs the other way and is trained with the path-wise
KL. **Time runs the other way from Eq. 9**: there the Gaussian (here: uniform) end is p_0 and the data sits
at the end of the trajectory; here, as in Sohl-Dickstein et al. and Ho et al. (2020), x_0 is the data and
x_T the noise, and the model's first decision is x_T.

Forward (noising) process, per pixel, with β_t = 1 / (T − t + 1) so that β_T = 1 and x_T is exactly uniform::

    q(x_t | x_{t-1}) = Bernoulli(x_{t-1} (1 − β_t) + β_t / 2)
    q(x_t | x_0)     = Bernoulli(x_0 ᾱ_t + (1 − ᾱ_t) / 2),          ᾱ_t = Π_{s ≤ t} (1 − β_s)
    q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0)        (closed form, a Bernoulli)

The guide runs it from the data **in the model's order** — x_T ~ q(x_T | x_0), then x_{t-1} ~ q(x_{t-1} |
x_t, x_0) — so every model parent of a site is sampled before it and :class:`inference.PathwiseKL_ELBO`
takes every per-step KL analytically (its validity check agrees; a test asserts it). The model::

    p(x_T) = Bernoulli(1/2),   p(x_{t-1} | x_t) = Σ_{x_0} p̂(x_0 | x_t, t) q(x_{t-1} | x_t, x_0)

with p̂(x_0 = 1 | x_t, t) = σ(f_θ(x_t, t)) the network's guess of the data (the "x_0-prediction"
parameterisation; a mixture of Bernoullis over one binary pixel is a Bernoulli), and at t = 1 the
observation p(x_0 | x_1) = Bernoulli(p̂(x_0 | x_1, 1)). The negative ELBO is then Eq. 17 of the paper for
this pair: L_T + Σ_{t ≥ 2} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) − log p(x_0 | x_1), with L_T =
KL(q(x_T | x_0) || p(x_T)) = 0 for this schedule.

Symbols to code: q -> :meth:`guide` (no parameters), p -> :meth:`model`, x_t -> the sample site
``z_{T−t}`` (the library's scheme numbers sites in the model's order: ``z_0`` is x_T, ``z_{T−1}`` is x_1),
x_0 -> the observation ``x``, T -> ``num_steps``, f_θ -> ``denoiser`` (an MLP on [x_t, an embedding of t]).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import kl_divergence

from ppl_models.base import ModelGuidePair, register_model
from ppl_models.masks import validate_mask
from ppl_models.policy_parts import mlp


def bitflip_schedule(num_steps: int) -> torch.Tensor:
    """β_1 … β_T with β_t = 1 / (T − t + 1), float64 (β_T = 1: x_T is uniform whatever x_0)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    t = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return 1.0 / (num_steps - t + 1)


class BernoulliDiffusion(ModelGuidePair):
    """Bit-flip diffusion on binary images (see the module docstring).

    :param x_dim: pixels per image.
    :param num_steps: T.
    :param hidden: hidden sizes of the denoiser MLP.
    :param embed_dim: size of the sinusoidal step embedding fed to the denoiser.
    """

    param_prefix = "diffusion"

    def __init__(self, x_dim: int = 784, num_steps: int = 20, hidden: tuple[int, ...] = (500, 500),
                 embed_dim: int = 32) -> None:
        super().__init__()
        if x_dim < 1 or embed_dim < 2 or any(h < 1 for h in hidden):
            raise ValueError(f"x_dim >= 1, embed_dim >= 2 and hidden sizes >= 1 required, got {x_dim}, "
                             f"{embed_dim}, {hidden}")
        self.x_dim, self.num_steps, self.embed_dim = x_dim, num_steps, embed_dim
        beta = bitflip_schedule(num_steps)
        self.register_buffer("beta", beta.float())
        self.register_buffer("alpha_bar", torch.cumprod(1 - beta, 0).float())
        self.denoiser = mlp([x_dim + embed_dim, *hidden, x_dim])

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(f"z_{k}" for k in range(self.num_steps))

    def guide_parameters(self) -> list[nn.Parameter]:
        """The guide is the fixed noising process: it has no parameters."""
        return []

    # ------------------------------------------------------------------------------- closed forms
    def q_t_given_0(self, x0: torch.Tensor, t: int) -> torch.Tensor:
        """P(x_t = 1 | x_0) per pixel (t = 0 returns x_0)."""
        a = self.alpha_bar[t - 1] if t > 0 else x0.new_tensor(1.0)
        return x0 * a + (1 - a) / 2

    def posterior(self, xt: torch.Tensor, p0: torch.Tensor, t: int, s: int | None = None) -> torch.Tensor:
        """P(x_s = 1 | x_t, x_0) for 1 ≤ s < t (default s = t − 1), with x_0 given as P(x_0 = 1) = ``p0`` (0/1
        data, or the denoiser's guess, which mixes the two posteriors). The kernel from s to t is
        q(x_t | x_s) = Bernoulli(x_s r + (1 − r)/2) with r = ᾱ_t / ᾱ_s (one step: r = 1 − β_t)."""
        s = t - 1 if s is None else s
        if not 1 <= s < t <= self.num_steps:
            raise ValueError(f"need 1 <= s < t <= T = {self.num_steps}, got s={s}, t={t}")
        r = self.alpha_bar[t - 1] / self.alpha_bar[s - 1]
        k1, k0 = (1 + r) / 2, (1 - r) / 2  # q(x_t = 1 | x_s = 1), q(x_t = 1 | x_s = 0)
        like1 = xt * k1 + (1 - xt) * (1 - k1)
        like0 = xt * k0 + (1 - xt) * (1 - k0)
        out = 0.0
        for x0_value, weight in ((1.0, p0), (0.0, 1 - p0)):
            prior1 = self.q_t_given_0(torch.full_like(xt, x0_value), s)
            num = like1 * prior1
            out = out + weight * num / (num + like0 * (1 - prior1))
        return out

    def embed(self, t: int, batch_shape: torch.Size) -> torch.Tensor:
        """Sinusoidal embedding of the step t (Vaswani et al. 2017), expanded to ``batch_shape``."""
        half = self.embed_dim // 2
        ref = self.beta
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=ref.device, dtype=ref.dtype) / half)
        e = torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)])
        e = torch.nn.functional.pad(e, (0, self.embed_dim - e.numel()))
        return e.expand(*batch_shape, self.embed_dim)

    def predict_x0(self, xt: torch.Tensor, t: int) -> torch.Tensor:
        """p̂(x_0 = 1 | x_t, t) = σ(f_θ(x_t, t))."""
        return torch.sigmoid(self.denoiser(torch.cat([xt, self.embed(t, xt.shape[:-1])], -1)))

    def _step_probs(self, xt: torch.Tensor, t: int, s: int | None = None) -> torch.Tensor:
        """P(x_s = 1 | x_t) under the model (s < t, default t − 1; a strided jump when s < t − 1), or
        p̂(x_0 = 1 | x_1) at t = 1."""
        p0 = self.predict_x0(xt, t)
        return p0 if t == 1 else self.posterior(xt, p0, t, s)

    @staticmethod
    def _bern(probs: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(probs=probs.clamp(1e-6, 1 - 1e-6), validate_args=False).to_event(1)

    # ------------------------------------------------- per-step terms (inference.diffusion_elbo uses them)
    def step_kl(self, xt: torch.Tensor, x0: torch.Tensor, t: int) -> torch.Tensor:
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) per data point, for t ≥ 2 (the term
        PathwiseKL_ELBO takes at site ``z_{T−t+1}``)."""
        return kl_divergence(self._bern(self.posterior(xt, x0, t)), self._bern(self._step_probs(xt, t)))

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || p(x_T)) per data point (0 for this schedule, whose x_T is uniform)."""
        q = self._bern(self.q_t_given_0(x0, self.num_steps))
        return kl_divergence(q, self._bern(torch.full_like(x0, 0.5)))

    def decoder_nll(self, x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """−log p(x_0 | x_1) per data point."""
        return -self._bern(self._step_probs(x1, 1)).log_prob(x0)

    # -------------------------------------------------------------------------------- Pyro programs
    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
        """p: x_T ~ Bernoulli(1/2), then the denoising steps down to the observation ``x`` = x_0."""
        pyro.module(self.param_prefix, self)
        if x is None and num_samples is None:
            raise ValueError("model needs data x or num_samples to sample unconditionally")
        n = x.shape[0] if x is not None else num_samples
        T = self.num_steps
        with pyro.plate("data", n):
            xt = pyro.sample("z_0", self._bern(self.beta.new_full((n, self.x_dim), 0.5)))
            for k in pyro.markov(range(1, T)):  # site z_k is x_{T-k}, drawn from p(x_{T-k} | x_{T-k+1})
                xt = pyro.sample(f"z_{k}", self._bern(self._step_probs(xt, T - k + 1)))
            probs = self._step_probs(xt, 1)
            pyro.sample("x", self._bern(probs), obs=x)
        return probs

    def guide(self, x: torch.Tensor, num_samples: int | None = None) -> None:
        """q in the model's order: x_T ~ q(x_T | x_0), then x_{t-1} ~ q(x_{t-1} | x_t, x_0)."""
        T = self.num_steps
        with pyro.plate("data", x.shape[0]):
            xt = pyro.sample("z_0", self._bern(self.q_t_given_0(x, T)))
            for k in pyro.markov(range(1, T)):
                xt = pyro.sample(f"z_{k}", self._bern(self.posterior(xt, x, T - k + 1)))

    def strides(self, steps: int | None = None) -> list[int]:
        """The decreasing time steps a sampler visits: all of T … 1, or ``steps`` of them evenly spaced
        (always T and 1): the strided, DDIM-style fast sampler jumps x_t -> x_s with the closed-form posterior
        q(x_s | x_t, x̂_0)."""
        T = self.num_steps
        if steps is None or steps >= T:
            return list(range(T, 0, -1))
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (T and 1) or None, got {steps}")
        return sorted({round(T - i * (T - 1) / (steps - 1)) for i in range(steps)}, reverse=True)

    @torch.no_grad()
    def _denoise(self, xt: torch.Tensor, steps: int | None,
                 clamp: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Run p from x_T = ``xt`` along :meth:`strides`; with ``clamp = (x, mask)`` the known pixels are
        re-drawn from q(x_s | x_0) at every visited step. Returns p̂(x_0 = 1 | x_1)."""
        ts = self.strides(steps)
        for t, s in zip(ts[:-1], ts[1:], strict=True):
            xt = torch.bernoulli(self._step_probs(xt, t, s))
            if clamp is not None:
                x, mask = clamp
                xt = mask * torch.bernoulli(self.q_t_given_0(x, s)) + (1 - mask) * xt
        return self._step_probs(xt, 1)

    @torch.no_grad()
    def sample(self, num_samples: int, steps: int | None = None) -> torch.Tensor:
        """Ancestral sampling, with all T steps (``steps=None``) or ``steps`` strided ones; returns
        p̂(x_0 = 1 | x_1), the final step's Bernoulli means (num_samples, x_dim)."""
        return self._denoise(torch.bernoulli(self.beta.new_full((num_samples, self.x_dim), 0.5)), steps)

    @torch.no_grad()
    def inpaint(self, x: torch.Tensor, mask: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Impute the pixels where ``mask`` is 0 (``ppl_models.masks`` convention: 1 = known) by denoising
        with the known pixels clamped to draws of q(x_s | x_0) on the way and to their values at the end;
        returns the known pixels and the imputed Bernoulli means."""
        mask = validate_mask(mask, x)
        probs = self._denoise(torch.bernoulli(torch.full_like(x, 0.5)), steps, clamp=(x, mask))
        return mask * x + (1 - mask) * probs


register_model("diffusion-bernoulli", BernoulliDiffusion, kind="generator",
               about="bit-flip diffusion, a fixed noising guide and a learned denoising model "
                     "(Sohl-Dickstein et al. 2015; Bachman & Precup 2015, Sec. 2.3, Eq. 9)")
