"""A convolutional VAE on grey levels: the baseline of the goal-conditioned RL generator's Table 1.

Vargas Vieyra & Ménard, "Learning generative models with goal-conditioned reinforcement learning", Sec. 4.1:
"a convolutional VAE architecture with the state-of-the-art hyperparameters as Subramanian (2020)"
(PyTorch-VAE's VanillaVAE: stride-2 3 × 3 convolutions with batch norm and leaky ReLU down, a linear map to
the latent's mean and log-variance, transposed convolutions back up). Sized for 28 × 28 (or 8 × 8) images:
``channels`` per level (28 -> 14 -> 7 -> 4 with three levels), the decoder mirrors the encoder and crops.

The likelihood is a Gaussian on the grey levels in [0, 1] with the decoder's sigmoid mean and one learned
variance σ² (PyTorch-VAE's MSE loss with a fixed KL weight is this ELBO at one fixed σ²; learning σ² makes
the ELBO a bound on a density in nats, comparable with the GC-RL generator's bound, which is a Gaussian on
the same grey levels).

Kingma & Welling (2014), "Auto-encoding variational Bayes": p(z_0) = N(0, I), p(x | z_0) = N(dec(z_0), σ²I),
q(z_0 | x) = N(μ(x), diag s(x)²). Sites: ``z_0`` and ``x``, inside ``pyro.plate("data")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_models.base import ModelGuidePair, register_model


def _side(n: int, levels: int) -> int:
    for _ in range(levels):
        n = (n + 1) // 2  # a stride-2, padding-1, 3 × 3 convolution
    return n


class ConvVAE(ModelGuidePair):
    """Convolutional Gaussian VAE on flat images (N, H·W) of grey levels in [0, 1].

    :param z_dim: latent size. :param channels: channels per resolution level (each halves the side).
    :param sigma2: the initial σ² of the likelihood (learned).
    """

    param_prefix = "conv_vae"

    def __init__(self, x_dim: int = 784, z_dim: int = 32, channels: Sequence[int] = (32, 64, 128),
                 sigma2: float = 0.05, image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if z_dim < 1 or not channels or any(c < 1 for c in channels) or not sigma2 > 0:
            raise ValueError(f"z_dim >= 1, non-empty positive channels and sigma2 > 0 required, got {z_dim}, "
                             f"{channels}, {sigma2}")
        if image_shape is None:
            side = math.isqrt(x_dim)
            if side * side != x_dim:
                raise ValueError(f"x_dim={x_dim} is not a square image; give image_shape")
            image_shape = (side, side)
        self.x_dim, self.z_dim, self.image_shape = x_dim, z_dim, tuple(image_shape)
        H, W = self.image_shape
        self.bottom = (channels[-1], _side(H, len(channels)), _side(W, len(channels)))
        down: list[nn.Module] = []
        c = 1
        for w in channels:
            down += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.LeakyReLU()]
            c = w
        self.encoder = nn.Sequential(*down, nn.Flatten())
        flat = math.prod(self.bottom)
        self.loc, self.log_var = nn.Linear(flat, z_dim), nn.Linear(flat, z_dim)
        self.project = nn.Linear(z_dim, flat)
        up: list[nn.Module] = []
        widths = list(reversed(channels))
        for w_in, w_out in zip(widths, [*widths[1:], widths[-1]], strict=True):
            up += [nn.ConvTranspose2d(w_in, w_out, 3, stride=2, padding=1, output_padding=1),
                   nn.BatchNorm2d(w_out), nn.LeakyReLU()]
        self.decoder = nn.Sequential(*up, nn.Conv2d(widths[-1], 1, 3, padding=1))
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(sigma2)))

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return ("z_0",)

    def guide_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.loc.parameters(), *self.log_var.parameters()]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_0 | x)'s mean and standard deviation."""
        f = self.encoder(x.reshape(-1, 1, *self.image_shape))
        return self.loc(f), (0.5 * self.log_var(f)).exp()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean, in (0, 1), (..., H·W) for z (..., z_dim)."""
        lead = z.shape[:-1]
        h = self.project(z.reshape(-1, self.z_dim)).reshape(-1, *self.bottom)
        H, W = self.image_shape
        out = self.decoder(h)[:, 0, :H, :W]
        return torch.sigmoid(out).reshape(*lead, self.x_dim)

    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
        self.register_params()
        n = x.shape[0] if x is not None else num_samples
        if n is None:
            raise ValueError("give data x or num_samples")
        zeros = torch.zeros(n, self.z_dim, device=self.log_sigma2.device)
        with pyro.plate("data", n):
            z = pyro.sample("z_0", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            mean = self.decode(z)
            pyro.sample("x", dist.Normal(mean, (0.5 * self.log_sigma2).exp().expand_as(mean)).to_event(1),
                        obs=x)
        return mean

    def guide(self, x: torch.Tensor, num_samples: int | None = None) -> None:
        self.register_params()
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z_0", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's mean at the encoder's mean: the VAE's reconstruction of x."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Decoder means of z_0 ~ N(0, I), in [0, 1]."""
        z = torch.randn(num_samples, self.z_dim, device=self.log_sigma2.device)
        return self.decode(z)


register_model("conv-vae", ConvVAE, kind="generator",
               about="convolutional Gaussian VAE on grey levels (the GC-RL paper's baseline, after "
                     "Subramanian 2020)")
