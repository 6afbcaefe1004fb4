"""Gaussian diffusion on grey levels as a model/guide pair: Ho et al.'s DDPM in guided-policy-search form.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.3 and 7.2, Eq. 9: a fixed
guide policy q (the noising process) and a learned primary policy p (the denoising chain) trained with the
path-wise KL — here in the form of Ho et al. (2020), "Denoising diffusion probabilistic models" (Sec. 2-3,
Eq. 4-12, the linear β schedule of Sec. 4, the discretised decoder of Eq. 13), which is also the diffusion
baseline of Vargas Vieyra & Ménard, "Generative models as goal-conditioned reinforcement learning", Sec. 4.1.
**Time runs the other way from Eq. 9**: there the Gaussian end is p_0 and the data sits at the end; here x_0
is the data, x_T ≈ N(0, I) and the model's first decision is x_T. The pair's shared machinery (the Pyro
model and guide, the guide in the model's order so that every per-step KL is analytic, the per-step terms,
sampling and inpainting) is :class:`ppl_models.diffusion.DiffusionPair`.

Data in [0, 1] on ``levels`` grey levels are observed as x_0 = 2x − 1 ∈ [−1, 1]; the noising process, with
β_t linear from 1e-4 to 0.02 at T = 1000 (scaled by 1000/T for other T, as Nichol & Dhariwal 2021)::

    q(x_t | x_{t-1}) = N(√(1 − β_t) x_{t-1}, β_t I),      q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),
    μ̃_t = √ᾱ_{t-1} β_t / (1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t) x_t

and the model, with the ε-prediction parameterisation (Ho Eq. 11)::

    p(x_T) = N(0, I),   p(x_{t-1} | x_t) = N((x_t − β_t / √(1 − ᾱ_t) ε_θ(x_t, t)) / √α_t, σ_t² I),
    σ_t² = β_t ("beta", Ho's main choice) or β̃_t ("beta_tilde"); at t = 1 always σ_1² = β_1,
    p(x_0 | x_1) = Π_i ∫ over the grey-level bin of x_0^i of N(x; μ_θ^i(x_1, 1), σ_1²) dx   (Eq. 13),

a discrete likelihood (the outer bins reach ±∞), so the bound is on the probability of the 8-bit image
itself: no dequantisation, and bits/dim is nats / (784 ln 2). Ho's simplified loss L_simple (Eq. 14), which
trains for sample quality, is :meth:`GaussianDiffusion.simple_loss`
(:class:`inference.diffusion_simple.SimpleDiffusionLoss`); the bound is evaluated separately.

Symbols to code: q -> :meth:`guide` (no parameters), p -> :meth:`model`, x_t -> site ``z_{T−t}`` (``z_0``
is x_T), x_0 -> the observation ``x`` (observed as 2x − 1), T -> ``num_steps``, β_t / ᾱ_t -> ``beta`` /
``alpha_bar``, ε_θ -> ``eps_net`` (a :class:`ppl_models.unet.UNet`, or a per-step linear map for exact
tests), σ_t² -> ``variance``, the strided sampler's η -> ``eta`` (DDIM, Song et al. 2021: η = 0
deterministic, η = 1 the ancestral noise level).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.special import log_ndtr

from ppl_models.base import register_model
from ppl_models.diffusion import DiffusionPair, Step
from ppl_models.unet import UNet

VARIANCES = ("beta", "beta_tilde")
DENOISERS = ("unet", "linear")
_EDGE = 1e4
_NO_SHAPE = torch.Size()


def linear_schedule(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s β_1 … β_T, linear from ``beta_start`` to ``beta_end`` at T = 1000 and scaled by 1000/T
    for other T (capped at 0.999), float64."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    scale = 1000.0 / num_steps
    beta = torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)
    return beta.clamp(max=0.999)


class DiscretizedGaussian(dist.TorchDistribution):
    """Ho et al.'s discretised Gaussian (Eq. 13) per pixel on ``levels`` values evenly spaced in [−1, 1]:
    the mass of N(loc, scale²) over the value's bin, the outer bins extended to ±∞."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.interval(-1.0, 1.0)

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, levels: int,
                 validate_args: bool = False) -> None:
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.levels = levels
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):  # noqa: ANN001, ANN201 (torch's signature)
        shape = torch.Size(batch_shape)
        return DiscretizedGaussian(self.loc.expand(shape), self.scale.expand(shape), self.levels)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.clamp(-1, 1)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            x = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(shape, device=self.loc.device,
                                                                               dtype=self.loc.dtype)
            k = ((x.clamp(-1, 1) + 1) * (self.levels - 1) / 2).round()
            return 2 * k / (self.levels - 1) - 1

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        half = 1.0 / (self.levels - 1)
        # The outer bins reach ±∞; a finite stand-in (Φ(−1e4) is 0 in any float) keeps gradients finite.
        lo = torch.where(value <= -1 + half / 2, -_EDGE, (value - half - self.loc) / self.scale)
        hi = torch.where(value >= 1 - half / 2, _EDGE, (value + half - self.loc) / self.scale)
        # Φ(hi) − Φ(lo) in logs, on the side of zero where the normal CDF has its precision
        upper = lo + hi > 0
        a, b = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
        log_b = log_ndtr(b)
        diff = (log_ndtr(a) - log_b).clamp(max=-1e-12)
        return log_b + torch.log(-torch.expm1(diff))


class LinearEps(nn.Module):
    """ε̂ = a_t x_t + b_t elementwise, one (a_t, b_t) per step: makes p(x_{t-1} | x_t) linear-Gaussian, for
    tests against closed forms."""

    def __init__(self, num_steps: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(num_steps))
        self.b = nn.Parameter(torch.zeros(num_steps))

    def forward(self, x: torch.Tensor, t: Step) -> torch.Tensor:
        return DiffusionPair._at(self.a, t) * x + DiffusionPair._at(self.b, t)


class GaussianDiffusion(DiffusionPair):
    """DDPM on grey-level images (see the module docstring).

    :param x_dim: pixels per image (a square image unless ``image_shape`` is given).
    :param num_steps: T.
    :param channels: U-Net base width; ``mult`` its per-level multipliers (four levels: 28 is padded to 32).
    :param groups: group-norm groups.
    :param embed_dim: size of the sinusoidal step embedding.
    :param levels: grey levels of the data (256 for 8-bit images; None: a continuous Gaussian decoder).
    :param variance: σ_t² of the model's steps, "beta" or "beta_tilde".
    :param eta: η of the strided (DDIM) sampler.
    :param denoiser: "unet", or "linear" (per-step linear ε̂, for exact tests).
    """

    def __init__(self, x_dim: int = 784, num_steps: int = 1000, channels: int = 32,
                 mult: tuple[int, ...] = (1, 2, 2, 2), groups: int = 8, embed_dim: int = 64,
                 levels: int | None = 256, variance: str = "beta", eta: float = 1.0, denoiser: str = "unet",
                 beta_start: float = 1e-4, beta_end: float = 0.02,
                 image_shape: tuple[int, int] | None = None) -> None:
        super().__init__()
        if variance not in VARIANCES or denoiser not in DENOISERS:
            raise ValueError(f"variance must be one of {VARIANCES} and denoiser one of {DENOISERS}, got "
                             f"{variance!r}, {denoiser!r}")
        if levels is not None and levels < 2:
            raise ValueError(f"levels must be >= 2 or None (continuous decoder), got {levels}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        side = math.isqrt(x_dim)
        if image_shape is None and denoiser == "unet":
            if side * side != x_dim:
                raise ValueError(f"x_dim={x_dim} is not a square image; give image_shape")
            image_shape = (side, side)
        self.x_dim, self.num_steps, self.levels = x_dim, num_steps, levels
        self.variance, self.eta = variance, eta
        beta = linear_schedule(num_steps, beta_start, beta_end)
        alpha_bar = torch.cumprod(1 - beta, 0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
        sigma2 = beta if variance == "beta" else torch.cat([beta[:1], beta_tilde[1:]])
        for name, v in (("beta", beta), ("alpha_bar", alpha_bar), ("alpha_bar_prev", alpha_bar_prev),
                        ("beta_tilde", beta_tilde), ("sigma2", sigma2)):
            self.register_buffer(name, v.float())
        # The coefficients the formulas use, computed in float64 before the cast (1 − ᾱ_t from a float32 ᾱ_t
        # near 1 loses digits); derived, so not saved in checkpoints.
        for name, v in (("sqrt_ab", alpha_bar.sqrt()), ("sqrt_1m_ab", (1 - alpha_bar).sqrt()),
                        ("eps_coef", beta / (1 - alpha_bar).sqrt()), ("inv_sqrt_alpha", (1 - beta).rsqrt()),
                        ("post_c0", alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)),
                        ("post_ct", (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)),
                        ("post_std", beta_tilde.sqrt()), ("sigma", sigma2.sqrt())):
            self.register_buffer(name, v.float(), persistent=False)
        self.eps_net = (UNet(image_shape, channels, tuple(mult), groups, embed_dim) if denoiser == "unet"
                        else LinearEps(num_steps))

    def _c(self, name: str, t: Step) -> torch.Tensor:
        return self._at(getattr(self, name), t)

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x - 1

    def eps(self, xt: torch.Tensor, t: Step) -> torch.Tensor:
        """ε_θ(x_t, t)."""
        return self.eps_net(xt, t)

    def mean(self, xt: torch.Tensor, t: Step, eps: torch.Tensor | None = None) -> torch.Tensor:
        """μ_θ(x_t, t) = (x_t − β_t / √(1 − ᾱ_t) ε_θ) / √(1 − β_t)."""
        eps = self.eps(xt, t) if eps is None else eps
        return (xt - self._c("eps_coef", t) * eps) * self._c("inv_sqrt_alpha", t)

    def predict_x0(self, xt: torch.Tensor, t: Step, eps: torch.Tensor | None = None) -> torch.Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t, unclipped."""
        eps = self.eps(xt, t) if eps is None else eps
        return (xt - self._c("sqrt_1m_ab", t) * eps) / self._c("sqrt_ab", t)

    # ------------------------------------------------------------------------ the five distributions
    def prior(self, n: int) -> dist.TorchDistribution:
        return dist.Normal(self.beta.new_zeros(n, self.x_dim), self.beta.new_ones(n, self.x_dim)).to_event(1)

    def q_t(self, x0: torch.Tensor, t: Step) -> dist.TorchDistribution:
        return dist.Normal(self._c("sqrt_ab", t) * x0, self._c("sqrt_1m_ab", t).expand_as(x0)).to_event(1)

    def q_posterior(self, xt: torch.Tensor, x0: torch.Tensor, t: Step) -> dist.TorchDistribution:
        loc = self._c("post_c0", t) * x0 + self._c("post_ct", t) * xt
        return dist.Normal(loc, self._c("post_std", t).expand_as(loc)).to_event(1)

    def p_step(self, xt: torch.Tensor, t: Step) -> dist.TorchDistribution:
        loc = self.mean(xt, t)
        return dist.Normal(loc, self._c("sigma", t).expand_as(loc)).to_event(1)

    def p_obs(self, x1: torch.Tensor) -> dist.TorchDistribution:
        loc = self.mean(x1, 1)
        scale = self.sigma[0].expand_as(loc)  # σ_1² = β_1 under either variance choice
        if self.levels is None:
            return dist.Normal(loc, scale).to_event(1)
        return DiscretizedGaussian(loc, scale, self.levels).to_event(1)

    # ---------------------------------------------------------------------------- training, sampling
    def simple_loss(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Ho's L_simple (Eq. 14) per data point: ||ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)||², t one per row."""
        x0 = self.observed(x)
        noise = torch.randn_like(x0)
        xt = self._c("sqrt_ab", t) * x0 + self._c("sqrt_1m_ab", t) * noise
        return (noise - self.eps(xt, t)).pow(2).sum(-1)

    def _jump(self, xt: torch.Tensor, t: int, s: int) -> torch.Tensor:
        if s == t - 1 and self.eta == 1.0:  # the model's own step p(x_{t-1} | x_t), what the bound scores
            return self.p_step(xt, t).sample()
        return self.ddim(xt, t, s, self.eta)

    def ddim(self, xt: torch.Tensor, t: int, s: int, eta: float, clip: bool = True) -> torch.Tensor:
        """One DDIM move x_t -> x_s (Song et al. 2021, Eq. 12) with noise level η (0: deterministic; 1 with
        s = t − 1: the posterior q(x_{t-1} | x_t, x̂_0), variance β̃_t); x̂_0 clipped to [−1, 1] with
        ``clip``."""
        ab_t, ab_s = self.alpha_bar[t - 1], self.alpha_bar[s - 1]
        x0 = self.predict_x0(xt, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (xt - self.sqrt_ab[t - 1] * x0) / self.sqrt_1m_ab[t - 1]
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).clamp(min=0).sqrt()
        direction = (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps
        return ab_s.sqrt() * x0 + direction + sigma * torch.randn_like(xt)

    def _final(self, x1: torch.Tensor) -> torch.Tensor:
        return (self.mean(x1, 1).clamp(-1, 1) + 1) / 2

    def show(self, xt: torch.Tensor) -> torch.Tensor:
        return ((xt + 1) / 2).clamp(0, 1)


register_model("diffusion-gaussian", GaussianDiffusion, kind="generator",
               about="Gaussian diffusion (DDPM) on grey levels with a U-Net, a fixed noising guide and a "
                     "learned denoising model (Ho et al. 2020; Bachman & Precup 2015, Sec. 2.3, Eq. 9)")
