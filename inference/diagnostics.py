"""Bound diagnostics: the bound ladder, importance-sampling health (PSIS k-hat, ESS), per-step curves.

* Bound ladder (Burda et al. 2016; Mohamed & Lakshminarayanan 2016): ELBO ≈ IWAE-1 ≤ IWAE-k ≤ … ≤ IWAE-K
  ≤ log p(x). IWAE-k for k < K is estimated from the same K samples split into K/k groups, which is
  unbiased for L_k and cheaper than fresh draws. The gap IWAE-K − ELBO bounds KL(q || posterior) from
  below.
* PSIS k-hat (Vehtari et al. 2024, "Pareto smoothed importance sampling", via ArviZ): the shape of the
  generalised Pareto tail fitted to the largest importance weights of one data point. k < 0.5: the
  estimate is reliable; 0.5–0.7: usable with care; > 0.7: the importance estimate of log p(x) for that
  point cannot be trusted (the guide misses mass of the posterior).
* Effective sample size of normalised importance weights: ESS = (Σ w)² / Σ w², between 1 and K.

ArviZ's API differs between 0.x (``arviz.psislw(log_weights)``, samples on the last axis, log ratios in)
and 1.x (``arviz_stats.base.array_stats.psislw``); :func:`psis_khat` hides the difference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from inference.iwae import iter_log_weights, log_mean_exp


def _khat_arviz0(log_w: np.ndarray) -> np.ndarray:
    """ArviZ 0.x: ``arviz.psislw`` takes log importance ratios with samples on the last axis."""
    import arviz

    _, k = arviz.psislw(np.ascontiguousarray(log_w.T))
    return np.asarray(k, dtype=float)


def _khat_arviz_stats(log_w: np.ndarray) -> np.ndarray:
    """ArviZ >= 1.0 (arviz-stats): samples on ``axis``. arviz-stats 0.8 expects the log-likelihood
    convention (it negates), which may change again, so the sign is fixed once by calibration."""
    from arviz_stats.base import array_stats

    _, k = array_stats.psislw(np.ascontiguousarray(log_w.T) * _arviz_stats_sign(), r_eff=1.0, axis=-1)
    return np.asarray(k, dtype=float)


@lru_cache(maxsize=1)
def _arviz_stats_sign() -> float:
    from arviz_stats.base import array_stats

    rng = np.random.default_rng(0)
    heavy = np.log(rng.pareto(1.2, size=4000) + 1.0)  # log weights with a heavy right tail (k ~ 0.8)
    _, k = array_stats.psislw(heavy, r_eff=1.0, axis=-1)
    return 1.0 if float(k) > 0.5 else -1.0


@lru_cache(maxsize=1)
def _khat_backend():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    if int(arviz.__version__.split(".")[0]) < 1 and hasattr(arviz, "psislw"):
        return _khat_arviz0
    return _khat_arviz_stats


def psis_khat(log_weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """PSIS k-hat per data point from log importance weights of shape (K, N) (samples first)."""
    lw = log_weights.detach().cpu().double().numpy() if torch.is_tensor(log_weights) else log_weights
    lw = np.asarray(lw, dtype=float)
    if lw.ndim == 1:
        lw = lw[:, None]
    if lw.ndim != 2:
        raise ValueError(f"log_weights must have shape (K, N), got {lw.shape}")
    with warnings.catch_warnings():
        # ArviZ warns once per call about k > 0.7; the caller reports those fractions itself.
        warnings.simplefilter("ignore")
        return _khat_backend()(lw)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = (Σ_k w_k)² / Σ_k w_k² per data point, from log weights of shape (K, N)."""
    return torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))


def iwae_ladder_from_weights(log_weights: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """IWAE-k estimates per data point for each k in ``ks`` from (K, N) log weights (K/k groups each)."""
    K = log_weights.shape[0]
    out = {}
    for k in ks:
        if k < 1 or k > K:
            raise ValueError(f"IWAE-k needs 1 <= k <= K={K}, got k={k}")
        groups = K // k
        lw = log_weights[: groups * k].reshape(groups, k, -1)
        out[k] = log_mean_exp(lw, 1).mean(0)
    return out


def bound_ladder(
    model,
    guide,
    data: torch.Tensor | tuple[torch.Tensor, ...],
    ks: Sequence[int] = (1, 10, 100, 1000),
    *,
    elbo=None,
    batch_size: int = 100,
    chunk_size: int = 500,
    data_plate: str = "data",
    progress: bool = False,
) -> dict:
    """The bound ladder on a data set, in nats per data point (means over the data points).

    Returns a dict with ``"elbo"`` (from ``elbo``, by default :class:`PathwiseKL_ELBO` with analytic
    KLs, one particle per data point), ``"iwae"`` {k: mean L_k}, ``"khat"`` (per data point, from the
    K = max(ks) weights), ``"ess"`` (per data point), ``"num_samples"`` = K and ``"num_data"``.
    All are bounds on (or, for the largest K, estimates of) log p(x); higher is tighter.
    """
    from inference.pathwise_kl_elbo import PathwiseKL_ELBO

    elbo = elbo or PathwiseKL_ELBO()
    tensors = data if isinstance(data, tuple) else (data,)
    n = tensors[0].shape[0]
    K = max(ks)
    sums = {k: 0.0 for k in ks}
    khat, ess = [], []
    for _, lw in iter_log_weights(
        model, guide, tensors, num_samples=K, batch_size=batch_size, chunk_size=chunk_size,
        data_plate=data_plate, progress=progress, desc="bound ladder",
    ):
        for k, v in iwae_ladder_from_weights(lw.double(), ks).items():
            sums[k] += v.sum().item()
        khat.append(psis_khat(lw))
        ess.append(effective_sample_size(lw.double()))
    elbo_sum = 0.0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = tuple(t[start : start + batch_size] for t in tensors)
            elbo_sum += -elbo.loss(model, guide, *batch)
    return {
        "elbo": elbo_sum / n,
        "iwae": {k: sums[k] / n for k in ks},
        "khat": np.concatenate(khat),
        "ess": torch.cat(ess).numpy(),
        "num_samples": K,
        "num_data": n,
    }


def check_ladder(ladder: dict, tol: float = 0.0) -> list[str]:
    """Ways in which a ladder breaks ELBO ≲ IWAE-k ≤ IWAE-k' (k < k'); empty when it holds within ``tol``."""
    problems = []
    ks = sorted(ladder["iwae"])
    for a, b in zip(ks, ks[1:], strict=False):
        if ladder["iwae"][a] > ladder["iwae"][b] + tol:
            problems.append(f"IWAE-{a} = {ladder['iwae'][a]:.4f} > IWAE-{b} = {ladder['iwae'][b]:.4f}")
    if ladder["elbo"] > ladder["iwae"][ks[-1]] + tol:
        problems.append(f"ELBO = {ladder['elbo']:.4f} > IWAE-{ks[-1]} = {ladder['iwae'][ks[-1]]:.4f}")
    return problems


def khat_summary(khat: np.ndarray) -> dict[str, float]:
    """Fractions of data points in the PSIS reliability bands, and the median k-hat."""
    khat = np.asarray(khat, dtype=float)
    finite = khat[np.isfinite(khat)]
    return {
        "khat_median": float(np.median(finite)) if finite.size else math.nan,
        "khat_frac_gt_0.5": float(np.mean(khat > 0.5)),
        "khat_frac_gt_0.7": float(np.mean(khat > 0.7)),
        "khat_max": float(np.max(finite)) if finite.size else math.nan,
    }


def per_step_curves(
    model, guide, data: torch.Tensor | tuple[torch.Tensor, ...], num_particles: int = 1
) -> dict:
    """Per-step KL(q_t || p_t) and cost terms in nats per data point (analytic where registered)."""
    from inference.pathwise_kl_elbo import PathwiseKL_ELBO

    tensors = data if isinstance(data, tuple) else (data,)
    terms = PathwiseKL_ELBO(num_particles=num_particles).per_site(model, guide, *tensors)
    n = tensors[0].shape[0]
    return {name: float(v) / n for name, v in terms.items()}


def latent_samples_to_arviz(
    guide, *args, num_samples: int = 100, sites: Sequence[str] | None = None, **kwargs
):
    """Samples of the guide's latent sites as ArviZ data (group ``posterior``, one chain).

    Each site becomes a variable with dims (chain, draw, *site shape); ``sites`` picks a subset (default:
    every non-observed sample site). Useful with ``arviz.summary`` / ``arviz.plot_*`` on q(z | x).
    """
    import pyro
    import pyro.poutine as poutine
    from pyro.poutine.util import prune_subsample_sites

    from inference.iwae import PARTICLE_PLATE, max_plate_nesting

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    # All draws in one vectorised run: the same outermost particle plate as the importance weights.
    nesting = max_plate_nesting(guide, lambda *a, **k: None, *args, **kwargs)
    particles = pyro.plate(PARTICLE_PLATE, num_samples, dim=-(nesting + 1))
    with torch.no_grad(), poutine.block():
        trace = prune_subsample_sites(poutine.trace(particles(guide)).get_trace(*args, **kwargs))
    draws = {
        name: site["value"].detach().cpu().numpy()[None]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and (sites is None or name in sites)
    }
    missing = sorted(set(sites or ()) - set(draws))
    if missing:
        raise ValueError(f"guide has no latent sites {missing}; it has {sorted(draws)}")
    return arviz.from_dict(posterior=draws)
