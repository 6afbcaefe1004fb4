"""Diffusion as a model/guide pair — what every form shares (:class:`DiffusionPair`) — and Bernoulli
(bit-flip) diffusion: a fixed noising guide and a learned denoising model. The Gaussian form (Ho et al.
2020) is :mod:`ppl_models.gaussian_diffusion`, on the same base.

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

Steps run as Python ints, or as a LongTensor with one step per row (the subsampled bound draws one t per
image and evaluates them in one network call).

Symbols to code: q -> :meth:`guide` (no parameters), p -> :meth:`model`, x_t -> the sample site
``z_{T−t}`` (the library's scheme numbers sites in the model's order: ``z_0`` is x_T, ``z_{T−1}`` is x_1),
x_0 -> the observation ``x``, T -> ``num_steps``, f_θ -> ``denoiser`` (an MLP on [x_t, an embedding of t]).
"""

from __future__ import annotations

from abc import abstractmethod

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.distributions import kl_divergence

from ppl_models.base import ModelGuidePair, register_model
from ppl_models.masks import validate_mask
from ppl_models.policy_parts import mlp
from ppl_models.unet import step_embedding

#: A time step: one int for every row, or a LongTensor with one step per row.
Step = int | torch.Tensor


def bitflip_schedule(num_steps: int) -> torch.Tensor:
    """β_1 … β_T with β_t = 1 / (T − t + 1), float64 (β_T = 1: x_T is uniform whatever x_0)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    t = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return 1.0 / (num_steps - t + 1)


class DiffusionPair(ModelGuidePair):
    """What every diffusion form shares: the Pyro model (p(x_T), then p(x_{t-1} | x_t) down to the observation
    p(x_0 | x_1)) and the guide in the model's order (q(x_T | x_0), then q(x_{t-1} | x_t, x_0)), the terms
    :mod:`inference.diffusion_elbo` needs, the strides of the fast sampler, and sampling / inpainting along
    them. A form supplies the five distributions (:meth:`prior`, :meth:`q_t`, :meth:`q_posterior`,
    :meth:`p_step`, :meth:`p_obs`; each over one flat image, ``to_event(1)``), :meth:`_jump` (x_t -> x_s
    under the model) and :meth:`_final` (the image shown for x_1). Steps ``t`` may be ints or one per row.
    """

    param_prefix = "diffusion"
    x_dim: int
    num_steps: int

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(f"z_{k}" for k in range(self.num_steps))

    def guide_parameters(self) -> list[nn.Parameter]:
        """The guide is the fixed noising process: it has no parameters."""
        return []

    @staticmethod
    def _at(buf: torch.Tensor, t: Step) -> torch.Tensor:
        """``buf[t − 1]``, shaped to broadcast against flat images (a column for one step per row)."""
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return buf[t - 1].unsqueeze(-1)
        return buf[int(t) - 1]

    @abstractmethod
    def prior(self, n: int) -> dist.TorchDistribution:
        """p(x_T) for ``n`` images."""

    @abstractmethod
    def q_t(self, x0: torch.Tensor, t: Step) -> dist.TorchDistribution:
        """q(x_t | x_0), closed form."""

    @abstractmethod
    def q_posterior(self, xt: torch.Tensor, x0: torch.Tensor, t: Step) -> dist.TorchDistribution:
        """q(x_{t-1} | x_t, x_0), closed form, t ≥ 2."""

    @abstractmethod
    def p_step(self, xt: torch.Tensor, t: Step) -> dist.TorchDistribution:
        """p(x_{t-1} | x_t), t ≥ 2."""

    @abstractmethod
    def p_obs(self, x1: torch.Tensor) -> dist.TorchDistribution:
        """p(x_0 | x_1), over the data as the model observes it (:meth:`observed`)."""

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """The data as the observation site sees it (identity unless a form rescales)."""
        return x

    # ------------------------------------------------- per-step terms (inference.diffusion_elbo uses them)
    def q_sample(self, x: torch.Tensor, t: Step) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) for data ``x``."""
        return self.q_t(self.observed(x), t).sample()

    def step_kl(self, xt: torch.Tensor, x: torch.Tensor, t: Step) -> torch.Tensor:
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) per data point, t ≥ 2 (the term PathwiseKL_ELBO takes
        at site ``z_{T−t+1}``)."""
        return kl_divergence(self.q_posterior(xt, self.observed(x), t), self.p_step(xt, t))

    def prior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || p(x_T)) per data point."""
        return kl_divergence(self.q_t(self.observed(x), self.num_steps), self.prior(x.shape[0]))

    def decoder_nll(self, x1: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """−log p(x_0 | x_1) per data point."""
        return -self.p_obs(x1).log_prob(self.observed(x))

    # -------------------------------------------------------------------------------- Pyro programs
    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
        """p: x_T ~ p(x_T), then the denoising steps down to the observation ``x`` = x_0; returns the
        observation distribution's mean."""
        self.register_params()
        if x is None and num_samples is None:
            raise ValueError("model needs data x or num_samples to sample unconditionally")
        n = x.shape[0] if x is not None else num_samples
        T = self.num_steps
        with pyro.plate("data", n):
            xt = pyro.sample("z_0", self.prior(n))
            for k in pyro.markov(range(1, T)):  # site z_k is x_{T-k}, drawn from p(x_{T-k} | x_{T-k+1})
                xt = pyro.sample(f"z_{k}", self.p_step(xt, T - k + 1))
            obs = self.p_obs(xt)
            pyro.sample("x", obs, obs=None if x is None else self.observed(x))
        return obs.mean

    def guide(self, x: torch.Tensor, num_samples: int | None = None) -> None:
        """q in the model's order: x_T ~ q(x_T | x_0), then x_{t-1} ~ q(x_{t-1} | x_t, x_0)."""
        T = self.num_steps
        x0 = self.observed(x)
        with pyro.plate("data", x.shape[0]):
            xt = pyro.sample("z_0", self.q_t(x0, T))
            for k in pyro.markov(range(1, T)):
                xt = pyro.sample(f"z_{k}", self.q_posterior(xt, x0, T - k + 1))

    # ----------------------------------------------------------------------------------- sampling
    def strides(self, steps: int | None = None) -> list[int]:
        """The decreasing time steps a sampler visits: all of T … 1, or ``steps`` of them evenly spaced
        (always T and 1): the strided, DDIM-style fast sampler jumps x_t -> x_s in one move."""
        T = self.num_steps
        if steps is None or steps >= T:
            return list(range(T, 0, -1))
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (T and 1) or None, got {steps}")
        return sorted({round(T - i * (T - 1) / (steps - 1)) for i in range(steps)}, reverse=True)

    @abstractmethod
    def _jump(self, xt: torch.Tensor, t: int, s: int) -> torch.Tensor:
        """One draw of x_s given x_t under the model (s = t − 1: p(x_{t-1} | x_t))."""

    @abstractmethod
    def _final(self, x1: torch.Tensor) -> torch.Tensor:
        """The image returned for x_1: the observation's mean, in the data's [0, 1] scale."""

    def show(self, xt: torch.Tensor) -> torch.Tensor:
        """A state x_t as an image in [0, 1] (for trajectory figures)."""
        return xt.clamp(0, 1)

    @torch.no_grad()
    def _denoise(self, xt: torch.Tensor, steps: int | None,
                 clamp: tuple[torch.Tensor, torch.Tensor] | None = None,
                 record: list[torch.Tensor] | None = None, record_at: set[int] = frozenset()) -> torch.Tensor:
        """Run p from x_T = ``xt`` along :meth:`strides`; with ``clamp = (x, mask)`` the known pixels are
        re-drawn from q(x_s | x_0) at every visited step; states at the steps in ``record_at`` are appended
        to ``record`` as images. Returns :meth:`_final` of x_1."""
        ts = self.strides(steps)
        if record is not None and ts[0] in record_at:
            record.append(self.show(xt))
        for t, s in zip(ts[:-1], ts[1:], strict=True):
            xt = self._jump(xt, t, s)
            if clamp is not None:
                x, mask = clamp
                xt = mask * self.q_sample(x, s) + (1 - mask) * xt
            if record is not None and s in record_at:
                record.append(self.show(xt))
        return self._final(xt)

    @torch.no_grad()
    def sample(self, num_samples: int, steps: int | None = None) -> torch.Tensor:
        """Samples without data: ancestral sampling with all T steps (``steps=None``) or ``steps`` strided
        ones; returns :meth:`_final` of x_1, (num_samples, x_dim), in [0, 1]."""
        return self._denoise(self.prior(num_samples).sample(), steps)

    @torch.no_grad()
    def trajectory(self, num_samples: int, steps: int | None = None, frames: int = 10) -> torch.Tensor:
        """The denoising trajectory: the states at ``frames + 1`` evenly spaced visited steps (x_T first, x_1
        last; every T/``frames`` steps with all T), then the final image; (frames + 2, num_samples, x_dim) in
        [0, 1] (a step visited twice when there are fewer visited steps than frames is shown once)."""
        ts = self.strides(steps)
        at = {ts[round(i * (len(ts) - 1) / frames)] for i in range(frames + 1)}
        record: list[torch.Tensor] = []
        final = self._denoise(self.prior(num_samples).sample(), steps, record=record, record_at=at)
        return torch.stack([*record, final])

    @torch.no_grad()
    def inpaint(self, x: torch.Tensor, mask: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Impute the pixels where ``mask`` is 0 (``ppl_models.masks`` convention: 1 = known) by denoising
        with the known pixels clamped to draws of q(x_s | x_0) on the way and to their values at the end;
        returns the known pixels and the imputed means."""
        mask = validate_mask(mask, x)
        out = self._denoise(self.prior(x.shape[0]).sample(), steps, clamp=(x, mask))
        return mask * x + (1 - mask) * out


class BernoulliDiffusion(DiffusionPair):
    """Bit-flip diffusion on binary images (see the module docstring).

    :param x_dim: pixels per image.
    :param num_steps: T.
    :param hidden: hidden sizes of the denoiser MLP.
    :param embed_dim: size of the sinusoidal step embedding fed to the denoiser.
    """

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

    # ------------------------------------------------------------------------------- closed forms
    def q_t_given_0(self, x0: torch.Tensor, t: Step) -> torch.Tensor:
        """P(x_t = 1 | x_0) per pixel (t = 0 returns x_0)."""
        if not isinstance(t, torch.Tensor) and t == 0:
            return x0
        a = self._at(self.alpha_bar, t)
        return x0 * a + (1 - a) / 2

    def posterior(self, xt: torch.Tensor, p0: torch.Tensor, t: Step, s: Step | None = None) -> torch.Tensor:
        """P(x_s = 1 | x_t, x_0) for 1 ≤ s < t (default s = t − 1), with x_0 given as P(x_0 = 1) = ``p0`` (0/1
        data, or the denoiser's guess, which mixes the two posteriors). The kernel from s to t is
        q(x_t | x_s) = Bernoulli(x_s r + (1 − r)/2) with r = ᾱ_t / ᾱ_s (one step: r = 1 − β_t)."""
        s = t - 1 if s is None else s
        # An argument check that reads the steps back: while Pyro's validation is on (off in the training
        # step, whose steps are drawn in range, and where a CUDA graph forbids the read).
        if is_validation_enabled() and not bool(torch.all(
                (1 <= torch.as_tensor(s)) & (torch.as_tensor(s) < torch.as_tensor(t))
                & (torch.as_tensor(t) <= self.num_steps))):
            raise ValueError(f"need 1 <= s < t <= T = {self.num_steps}, got s={s}, t={t}")
        r = self._at(self.alpha_bar, t) / self._at(self.alpha_bar, s)
        k1, k0 = (1 + r) / 2, (1 - r) / 2  # q(x_t = 1 | x_s = 1), q(x_t = 1 | x_s = 0)
        like1 = xt * k1 + (1 - xt) * (1 - k1)
        like0 = xt * k0 + (1 - xt) * (1 - k0)
        out = 0.0
        for x0_value, weight in ((1.0, p0), (0.0, 1 - p0)):
            prior1 = self.q_t_given_0(torch.full_like(xt, x0_value), s)
            num = like1 * prior1
            out = out + weight * num / (num + like0 * (1 - prior1))
        return out

    def predict_x0(self, xt: torch.Tensor, t: Step) -> torch.Tensor:
        """p̂(x_0 = 1 | x_t, t) = σ(f_θ(x_t, t))."""
        emb = step_embedding(t, self.embed_dim, xt.shape[0], xt)
        return torch.sigmoid(self.denoiser(torch.cat([xt, emb], -1)))

    def _step_probs(self, xt: torch.Tensor, t: Step, s: Step | None = None) -> torch.Tensor:
        """P(x_s = 1 | x_t) under the model (s < t, default t − 1; a strided jump when s < t − 1), or
        p̂(x_0 = 1 | x_1) at t = 1."""
        p0 = self.predict_x0(xt, t)
        return p0 if not isinstance(t, torch.Tensor) and t == 1 else self.posterior(xt, p0, t, s)

    @staticmethod
    def _bern(probs: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(probs=probs.clamp(1e-6, 1 - 1e-6), validate_args=False).to_event(1)

    # ------------------------------------------------------------------------ the five distributions
    def prior(self, n: int) -> dist.TorchDistribution:
        """p(x_T) = Bernoulli(1/2) per pixel."""
        return self._bern(self.beta.new_full((n, self.x_dim), 0.5))

    def q_t(self, x0: torch.Tensor, t: Step) -> dist.TorchDistribution:
        return self._bern(self.q_t_given_0(x0, t))

    def q_posterior(self, xt: torch.Tensor, x0: torch.Tensor, t: Step) -> dist.TorchDistribution:
        return self._bern(self.posterior(xt, x0, t))

    def p_step(self, xt: torch.Tensor, t: Step) -> dist.TorchDistribution:
        return self._bern(self._step_probs(xt, t))

    def p_obs(self, x1: torch.Tensor) -> dist.TorchDistribution:
        return self._bern(self._step_probs(x1, 1))

    def _jump(self, xt: torch.Tensor, t: int, s: int) -> torch.Tensor:
        return torch.bernoulli(self._step_probs(xt, t, s))

    def _final(self, x1: torch.Tensor) -> torch.Tensor:
        return self._step_probs(x1, 1)


register_model("diffusion-bernoulli", BernoulliDiffusion, kind="generator",
               about="bit-flip diffusion, a fixed noising guide and a learned denoising model "
                     "(Sohl-Dickstein et al. 2015; Bachman & Precup 2015, Sec. 2.3, Eq. 9)")
