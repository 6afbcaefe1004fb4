"""Variational auto-encoder with a Bernoulli decoder, and VAE imputation by reconstruct-and-clamp.

Kingma & Welling (2014); as a policy (Bachman & Precup 2015, "Data generation as sequential decision
making", Sec. 2.5) the VAE is the one-decision special case of the extended generator: the single
latent is the initial decision z_0, the decoder is the constructor ω turning it into canvas logits, and
there are no further steps. Site names follow the library's scheme: ``z_0`` for the latent, ``x`` for
the observation, inside ``pyro.plate("data")``.

    p:  z_0 ~ N(0, I),   x | z_0 ~ Bernoulli(σ(decoder(z_0)))
    q:  z_0 | x ~ N(μ(x), diag σ²(x))

Both sites are Normal(...).to_event(1), so :class:`inference.PathwiseKL_ELBO` uses the analytic KL.

VAE imputation (Sec. 9.2 of the same paper, the baseline of Table 1): start from the known pixels with
the unknown ones filled, then repeat ``x_s = m ⊙ x + (1 − m) ⊙ σ(decoder(z)), z ~ q(z | x_{s−1})`` —
reconstruct, then clamp the known pixels back — and score the imputations σ(decoder(z)) on the missing
pixels with the Bernoulli log-likelihood of the true values (grey levels allowed: a cross-entropy).
The paper reports the best step "found oracularly"; the honest score is the final step's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ppl_models.base import ModelGuidePair, register_model
from ppl_models.masks import validate_mask
from ppl_models.policy_parts import mlp


class VAE(ModelGuidePair):
    """Encoder (guide q) and decoder (model p) in one module; ``model`` and ``guide`` are Pyro programs.

    :param x_dim: data dimension (784 for 28x28 images).
    :param z_dim: latent dimension.
    :param hidden: hidden layer sizes of the encoder; the decoder mirrors them.
    """

    param_prefix = "vae"
    latent_sites = ("z_0",)

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden: tuple[int, ...] = (500, 500)) -> None:
        super().__init__()
        if x_dim < 1 or z_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"x_dim, z_dim and hidden sizes must be >= 1, got {x_dim}, {z_dim}, {hidden}")
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, tuple(hidden)
        self.encoder = mlp([x_dim, *hidden, 2 * z_dim])
        self.decoder = mlp([z_dim, *reversed(hidden), x_dim])

    def guide_parameters(self) -> list[nn.Parameter]:
        """φ, the encoder q(z | x): what guide fine-tuning (:mod:`inference.finetune`) trains."""
        return list(self.encoder.parameters())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z_0 | x)."""
        loc, pre_scale = self.encoder(x).chunk(2, dim=-1)
        return loc, F.softplus(pre_scale) + 1e-4

    def prior(self) -> dist.TorchDistribution:
        """p(z_0) = N(0, I), on the module's device and dtype."""
        ref = next(self.parameters())
        return dist.Normal(ref.new_zeros(self.z_dim), ref.new_ones(self.z_dim)).to_event(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x | z_0)."""
        return self.decoder(z)

    def model(self, x: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
        """p(z_0, x). With ``x=None`` it samples ``num_samples`` images (no data needed)."""
        self.register_params()
        if x is None and num_samples is None:
            raise ValueError("model needs data x or num_samples to sample unconditionally")
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z_0", self.prior())
            logits = self.decode(z)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)
        return logits

    def guide(self, x: torch.Tensor, num_samples: int | None = None) -> None:
        """q(z_0 | x)."""
        self.register_params()
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            pyro.sample("z_0", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Decoder means σ(decoder(z)), z ~ p(z), shape (num_samples, x_dim)."""
        z = torch.randn(num_samples, self.z_dim, device=next(self.parameters()).device)
        return torch.sigmoid(self.decode(z))


@dataclass
class ImputationResult:
    """Per-step imputations and scores of reconstruct-and-clamp."""

    nll: torch.Tensor  # (runs, steps, B): -log p(x_u | imputation), summed over each image's missing pixels
    imputations: torch.Tensor  # (steps, B, D) of the first run: the clamped images after each step
    num_missing: torch.Tensor  # (B,) missing pixels per image
    final_mean: torch.Tensor  # (B, D): the last step's clamped imputation averaged over runs

    @property
    def final_nll(self) -> torch.Tensor:
        """Honest score: the expected NLL of the last step's imputations over runs, per image (B,)."""
        return self.nll[:, -1].mean(0)

    @property
    def best_step_nll(self) -> tuple[torch.Tensor, int]:
        """The paper's oracular score: the step with the lowest mean NLL, chosen on the scored data."""
        per_step = self.nll.mean(dim=(0, 2))
        best = int(per_step.argmin())
        return self.nll[:, best].mean(0), best


def bernoulli_nll(
    x: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Σ_d weight_d · CE(x_d, probs_d) per row; grey-level x allowed (cross-entropy, as the paper's code)."""
    p = probs.clamp(eps, 1 - eps)
    return -(weight * (x * p.log() + (1 - x) * (1 - p).log())).sum(-1)


@torch.no_grad()
def vae_impute(
    vae: VAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    num_steps: int = 16,
    num_runs: int = 5,
    fill: float | torch.Tensor = 0.5,
    sample_latent: bool = True,
) -> ImputationResult:
    """VAE imputation by iterated reconstruct-and-clamp (Bachman & Precup 2015, Sec. 9.2).

    :param x: true images (B, D) in [0, 1]; only the known pixels (mask 1) are read by the procedure,
        the missing ones only to score it.
    :param mask: 1 = known, 0 = missing (``ppl_models.masks`` convention), (D,) or (B, D).
    :param fill: initial value of the unknown pixels (a number or a (D,) mean image).
    :param sample_latent: draw z ~ q (a stochastic chain; runs differ) or use q's mean.
    """
    if num_steps < 1 or num_runs < 1:
        raise ValueError(f"num_steps and num_runs must be >= 1, got {num_steps}, {num_runs}")
    mask = validate_mask(mask, x)
    missing = 1 - mask
    start = mask * x + missing * torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    nll = x.new_zeros(num_runs, num_steps, x.shape[0])
    first_run = []
    final_sum = torch.zeros_like(x)
    for r in range(num_runs):
        cur = start
        for s in range(num_steps):
            loc, scale = vae.encode(cur)
            z = loc + scale * torch.randn_like(loc) if sample_latent else loc
            probs = torch.sigmoid(vae.decode(z))
            nll[r, s] = bernoulli_nll(x, probs, missing)
            cur = mask * x + missing * probs
            if r == 0:
                first_run.append(cur)
        final_sum += cur
    return ImputationResult(nll, torch.stack(first_run), missing.sum(-1), final_sum / num_runs)


register_model("vae", VAE, kind="generator", about="Bernoulli VAE, one Gaussian z_0 (Kingma & Welling 2014)")
