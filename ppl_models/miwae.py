"""MIWAE: an importance-weighted VAE trained on the observed pixels only, imputing by importance sampling.

Mattei & Frellsen (2019), "MIWAE: Deep generative modelling and imputation of incomplete data sets"
(ICML). A baseline for the imputation experiment of Bachman & Precup (2015), "Data generation as
sequential decision making", Sec. 4. With x = (x_k, x_u) split by the mask m (1 = known, 0 = missing;
``ppl_models.masks`` convention) into known and missing pixels:

    p:  z_0 ~ N(0, I),   x_d | z_0 ~ Bernoulli(σ(decoder(z_0))_d)   independently over pixels d
    q:  z_0 | x_k, m ~ N(μ(x ⊙ m, m), diag σ²(x ⊙ m, m))

Because p factorises over pixels given z_0, p(x_k | z_0) = Π_{d: m_d = 1} p(x_d | z_0) simply leaves
the missing pixels out, so the model scores only the known ones (``.mask(mask)`` on the Bernoulli).
Training maximises the MIWAE bound (their Eq. 4), the IWAE bound of p(x_k) with K particles,

    L_K = E[ log (1/K) Σ_k w_k ],   w_k = p(x_k | z_k) p(z_k) / q(z_k | x_k),   z_k ~ q(z | x_k),

which is the library's :class:`inference.iwae.IWAE_ELBO` applied to ``model(x, mask)`` /
``guide(x, mask)``. Imputation is self-normalised importance sampling with the same proposal (their
Sec. 3.2, Eq. 9-10), with w̄_k = w_k / Σ_j w_j::

    E[x_u | x_k] ≈ Σ_k w̄_k σ(decoder(z_k))_u                                   (``imputation``)
    log p(x_u | x_k) ≈ log Σ_k w_k p(x_u | z_k) − log Σ_k w_k                    (``log_lik``)

``log_lik`` is a ratio of two importance sums, each an unbiased estimate of p(x_k, x_u) resp. p(x_k):
a consistent estimate (it converges as K → ∞, with O(1/K) bias of either sign), not a bound.

Encoder input: Mattei & Frellsen feed the encoder only the zero-imputed data x ⊙ m. Here it gets
[x ⊙ m, m]: with binary data a zero-imputed pixel is ambiguous (0 may be a known black pixel or a
missing one), so the mask is concatenated to tell them apart.

Site names follow the library's scheme: ``z_0`` (latent) and ``x`` (observation) inside
``pyro.plate("data")``. Code names: ``mask`` = m, ``num_samples`` = K, ``log_w`` = log w_k.
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

__all__ = ["MIWAE", "MIWAEImputation", "miwae_impute"]


def _check_pair(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Cheap check for the training loop (validate_mask's value scan would sync a GPU at every call).
    if not (isinstance(x, torch.Tensor) and isinstance(mask, torch.Tensor)) or x.dim() != 2:
        raise ValueError("MIWAE model/guide need x of shape (B, D) and a mask tensor of the same shape")
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal x's shape {tuple(x.shape)}")
    return mask.bool()


class MIWAE(ModelGuidePair):
    """Encoder q(z_0 | x ⊙ m, m) and Bernoulli decoder p(x | z_0); ``model`` and ``guide`` are Pyro programs.

    Both programs take ``(x, mask)``. Missing entries of ``x`` (mask 0) are never read: they may hold
    anything, the true values or NaN.

    :param x_dim: data dimension (784 for 28x28 images).
    :param z_dim: latent dimension.
    :param hidden: hidden layer sizes of the encoder; the decoder mirrors them.
    """

    param_prefix = "miwae"
    latent_sites = ("z_0",)

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden: tuple[int, ...] = (500, 500)) -> None:
        super().__init__()
        if x_dim < 1 or z_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"x_dim, z_dim and hidden sizes must be >= 1, got {x_dim}, {z_dim}, {hidden}")
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, tuple(hidden)
        self.encoder = mlp([2 * x_dim, *hidden, 2 * z_dim])
        self.decoder = mlp([z_dim, *reversed(hidden), x_dim])

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z_0 | x ⊙ m, m)."""
        known = mask.bool()
        # where, not x * mask: a NaN in a missing pixel must not leak in.
        inp = torch.cat([torch.where(known, x, 0), known.to(x.dtype)], dim=-1)
        loc, pre_scale = self.encoder(inp).chunk(2, dim=-1)
        return loc, F.softplus(pre_scale) + 1e-4

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x | z_0)."""
        return self.decoder(z)

    def guide_parameters(self) -> list[nn.Parameter]:
        """φ, the encoder q(z_0 | x ⊙ m, m)."""
        return list(self.encoder.parameters())

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Decoder means σ(decoder(z)), z ~ p(z), shape (num_samples, x_dim)."""
        z = torch.randn(num_samples, self.z_dim, device=next(self.parameters()).device)
        return torch.sigmoid(self.decode(z))

    def model(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """p(z_0, x_k): the observation site scores only the known pixels."""
        self.register_params()
        known = _check_pair(x, mask)
        ref = next(self.parameters())
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(ref.new_zeros(self.z_dim), ref.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z_0", prior)
            logits = self.decode(z)
            # Missing values are replaced by 0 before scoring: masked out anyway, but a NaN there would
            # turn the gradient through the masked log-prob into NaN (0 * NaN).
            obs = torch.where(known, x, 0)
            likelihood = dist.Bernoulli(logits=logits, validate_args=False).mask(known).to_event(1)
            pyro.sample("x", likelihood, obs=obs)
        return logits

    def guide(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """q(z_0 | x ⊙ m, m)."""
        self.register_params()
        _check_pair(x, mask)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x, mask)
            pyro.sample("z_0", dist.Normal(loc, scale).to_event(1))


@dataclass
class MIWAEImputation:
    """Importance-sampling imputations of MIWAE and the estimated log-likelihood of the missing pixels."""

    log_lik: torch.Tensor  # (B,) estimate of log p(x_u | x_k), nats (0 where nothing is missing)
    imputation: torch.Tensor  # (B, D): m ⊙ x + (1 − m) ⊙ Σ_k w̄_k σ(decoder(z_k))
    num_samples: int  # K


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@torch.no_grad()
def miwae_impute(
    miwae: MIWAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    num_samples: int = 1000,
    chunk_size: int = 50,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
) -> MIWAEImputation:
    """Self-normalised importance-sampling imputation (Mattei & Frellsen 2019, Sec. 3.2).

    For each image, K = ``num_samples`` draws z_k ~ q(z | x_k) give log w_k = log p(x_k | z_k) +
    log p(z_k) − log q(z_k | x_k); then ``log_lik`` = logsumexp_k(log w_k + log p(x_u | z_k)) −
    logsumexp_k(log w_k), a consistent (not a bound) estimate of log p(x_u | x_k), and the missing pixels
    are imputed with the weighted mean Σ_k w̄_k σ(decoder(z_k)). The samples are drawn ``chunk_size`` at a
    time for ``batch_size`` images at a time, with running logsumexp accumulators, so memory is
    O(chunk_size · batch_size · D) whatever K and B.

    :param x: true images (B, D) in [0, 1], binary or grey (grey levels are scored by cross-entropy);
        the missing pixels are read only to compute ``log_lik``.
    :param mask: 1 = known, 0 = missing, (D,) or (B, D).
    :param generator: optional generator for the draws (made on its device, moved to the model's).
    """
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        _check_positive_int(name, value)
    mask = validate_mask(mask, x)
    log_lik, imputation = [], []
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        ll, imp = _impute_batch(miwae, x[rows], mask[rows], num_samples, chunk_size, generator)
        log_lik.append(ll)
        imputation.append(imp)
    return MIWAEImputation(torch.cat(log_lik), torch.cat(imputation), num_samples)


def miwae_proposal(miwae: MIWAE, x: torch.Tensor, mask: torch.Tensor) -> dist.Normal:
    """q(z | x_k, m), the encoder's Gaussian over the latent of each image (B, Z); reads only known pixels."""
    loc, scale = miwae.encode(x, mask)
    return dist.Normal(loc, scale)


def miwae_importance_draws(
    miwae: MIWAE,
    q: dist.Normal,
    x: torch.Tensor,
    mask: torch.Tensor,
    num: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num`` draws z_l ~ q (from :func:`miwae_proposal`) per image with their decoder logits and log
    importance weights log w_l = log p(x_k | z_l) + log p(z_l) − log q(z_l | x_k): (num, B, Z), (num, B, D),
    (num, B). Only the known pixels of ``x`` are read."""
    known = mask.bool()
    loc, scale = q.loc, q.scale
    device = loc.device if generator is None else generator.device
    eps = torch.randn((num, *loc.shape), generator=generator, device=device, dtype=loc.dtype)
    z = loc + scale * eps.to(loc.device)
    logits = miwae.decode(z)
    x_safe = torch.where(known, x.to(loc.dtype), 0)  # the hidden values are never read
    log_px = -F.binary_cross_entropy_with_logits(logits, x_safe.expand_as(logits), reduction="none")
    prior = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc))
    log_w = torch.where(known, log_px, 0).sum(-1) + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    return z, logits, log_w


def _impute_batch(
    miwae: MIWAE,
    x: torch.Tensor,
    mask: torch.Tensor,
    num_samples: int,
    chunk_size: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    known = mask.bool()
    q = miwae_proposal(miwae, x, mask)
    loc = q.loc
    x_true = x.to(loc.dtype)
    batch = x.shape[0]
    # Accumulators: log Σ w_k p(x_u | z_k), and Σ exp(log w_k − run_max) (times σ_k) with a running max.
    log_num = torch.full((batch,), -torch.inf, dtype=loc.dtype, device=loc.device)
    run_max = torch.full((batch,), -torch.inf, dtype=loc.dtype, device=loc.device)
    den = torch.zeros(batch, dtype=loc.dtype, device=loc.device)
    mean = torch.zeros(x.shape, dtype=loc.dtype, device=loc.device)
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        z, logits, log_w = miwae_importance_draws(miwae, q, x, mask, k, generator)
        log_px_u = -F.binary_cross_entropy_with_logits(
            logits, x_true.expand_as(logits), weight=(~known).to(logits.dtype), reduction="none"
        ).sum(-1)
        log_num = torch.logaddexp(log_num, torch.logsumexp(log_w + log_px_u, dim=0))
        new_max = torch.maximum(run_max, log_w.max(dim=0).values)
        rescale = torch.exp(run_max - new_max)  # 0 on the first chunk (run_max = −inf)
        weights = torch.exp(log_w - new_max)  # (k, B), the largest is 1
        den = den * rescale + weights.sum(0)
        mean = mean * rescale[:, None] + torch.einsum("kb,kbd->bd", weights, torch.sigmoid(logits))
        run_max = new_max
        done += k
    # No missing pixel: log p(x_u | x_k) = log 1, exactly (the two sums round differently otherwise).
    log_lik = torch.where((~known).any(-1), log_num - (run_max + den.log()), 0)
    imputation = torch.where(known, x, (mean / den[:, None]).to(x.dtype))
    return log_lik.to(x.dtype), imputation


register_model("miwae", MIWAE, kind="imputer",
               about="MIWAE, importance-weighted VAE on the known pixels (Mattei & Frellsen 2019)")
