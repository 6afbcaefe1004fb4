"""The over-regularised KL (ORK): the free energy with the KL term reshaped per example.

Bachman & Precup (2015), "Variational generative stochastic networks with collaborative shaping", Sec. 4,
Eq. 5. To keep the corruptor q(z | x) well dispersed, and dispersed to a similar degree for every x, the KL
term of the free energy (Eq. 2-3) is replaced, per example n and per latent site z_t, by::

    λ · KL_n + β · ([KL_n − K̄]_+)²,     KL_n = KL(q(z_t | x_n) || p(z_t)),   K̄ = mean_n KL_n over the batch

so that the loss of one particle is

    L = Σ_n [ −log p(x_n | z) + Σ_t ( λ·KL_{n,t} + β·([KL_{n,t} − K̄_t]_+)² ) ].

Sec. 7's ORK model used λ = 4, β = 0.1; λ = 1, β = 0 is the plain path-wise KL ELBO ("VAR"), exactly. K̄ is
the batch mean taken as a constant (no gradient flows through it): the penalty then pushes the examples
above the mean down without pushing any KL up, which is the paper's intent ("avoiding any pressure to
increase KL"). This is a training objective, not a bound; the variational bound of Eq. 2 is still the
plain ELBO, which the experiments report (scored with :class:`inference.PathwiseKL_ELBO`).

The reshaping needs each example's closed-form KL, so every latent site must be analytic under the
validity condition of :class:`inference.PathwiseKL_ELBO`; a site that would fall back to the Monte Carlo
log-ratio is an error (a squared, rectified single-sample log-ratio is not the penalty of Eq. 5), and so is
a site with a scale or a mask. K̄ is the mean over the dimension of the plate named ``"data"`` (with
vectorised particles, one K̄ per particle).

Symbols to code: λ -> ``kl_weight``, β -> ``penalty``, K̄ -> the detached mean over the data plate.
"""

from __future__ import annotations

import torch

from inference.pathwise_kl_elbo import PathwiseKL_ELBO, _dist_masks

#: the plate over examples, as in every model of this library; K̄ is the mean over its dimension
DATA_PLATE = "data"


class OverRegularisedKL_ELBO(PathwiseKL_ELBO):
    """:class:`PathwiseKL_ELBO` with every analytic KL reshaped by Eq. 5 (see the module docstring).

    :param kl_weight: λ ≥ 0, the weight of the KL (4 in the paper's ORK).
    :param penalty: β ≥ 0, the weight of the squared excess over the batch-mean KL (0.1 in the paper).
    """

    def __init__(self, *args, kl_weight: float = 4.0, penalty: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name, value in (("kl_weight", kl_weight), ("penalty", penalty)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.kl_weight, self.penalty = float(kl_weight), float(penalty)

    def _analytic_term(self, name: str, kl: torch.Tensor, guide_site: dict) -> torch.Tensor:
        # Eq. 5 is per example: a scale or mask on the site would enter the square (and masked examples would
        # pull K̄ down), so such sites are refused rather than given a penalty the paper does not define.
        mask, scale = guide_site["mask"], guide_site["scale"]
        weighted = torch.is_tensor(scale) or scale != 1.0 or (mask is not None and mask is not True)
        if weighted or _dist_masks(guide_site["fn"]):
            raise ValueError(f"OverRegularisedKL_ELBO: site {name!r} carries a scale or a mask; Eq. 5 is "
                             f"defined per unweighted example, so give the site neither")
        frames = [f for f in guide_site["cond_indep_stack"] if f.name == DATA_PLATE]
        if not frames:
            raise ValueError(f"OverRegularisedKL_ELBO: site {name!r} is not inside a plate named "
                             f"{DATA_PLATE!r}, over which K̄ (the batch-mean KL of Eq. 5) is taken")
        term = self.kl_weight * kl
        if self.penalty:
            excess = (kl - kl.detach().mean(frames[0].dim, keepdim=True)).clamp(min=0)
            term = term + self.penalty * excess.pow(2)
        return term

    def _terms(self, model_trace, guide_trace):
        for key, value, surrogate, is_analytic in super()._terms(model_trace, guide_trace):
            if key.startswith("kl/") and not is_analytic:
                raise ValueError(
                    f"OverRegularisedKL_ELBO needs the closed-form KL of every model latent, but site "
                    f"{key[3:]!r} gets none here (no guide site, no registered KL, or one that fails the "
                    f"validity check; see PathwiseKL_ELBO.kl_report): Eq. 5 reshapes each example's KL, "
                    f"which a single-sample log-ratio is not")
            yield key, value, surrogate, is_analytic
