"""Bound diagnostics: the bound ladder, importance-sampling health (PSIS k-hat, ESS), per-step curves.

* Bound ladder (Burda et al. 2016; Mohamed & Lakshminarayanan 2016): ELBO ≈ IWAE-1 ≤ IWAE-k ≤ … ≤ IWAE-K
  ≤ log p(x). IWAE-k for k < K is estimated from the same K samples split into K/k groups, which is
  unbiased for L_k and cheaper than fresh draws. The gap IWAE-K − ELBO bounds KL(q || posterior) from
  below.
* PSIS k-hat (Vehtari et al. 2024, "Pareto smoothed importance sampling", via ArviZ): the shape of the
  generalised Pareto tail fitted to the largest importance weights of one data point. Categories, per
  data point: *good* k ≤ 0.5 (the estimate is reliable); *ok* 0.5 < k ≤ 0.7 (usable with care);
  *unreliable* k > 0.7 (the importance estimate of log p(x) for that point cannot be trusted: the guide
  misses mass of the posterior); *degenerate* (:func:`degenerate_tails`): the fitted tail has fewer than
  5 distinct values, or k is not finite. The generalised Pareto fit needs a continuous tail (Vehtari et
  al.); weights taking one or a few values (a guide equal to the posterior, a discrete latent)
  give k = inf or an arbitrary k fitted to round-off, which says nothing about reliability. Such points
  are reported as their own category with their ESS, never as unreliable.
* Effective sample size of normalised importance weights: ESS = (Σ w)² / Σ w², between 1 and K.

Layout: importance weights in this package are (K, N), samples first (as :func:`iter_log_weights` yields
them); ArviZ wants samples last, (N, K). :func:`psis_khat` and :func:`degenerate_tails` therefore take the
sample axis as a required keyword, ``sample_axis=0`` for (K, N) arrays.

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

#: k-hat thresholds of the categories good (≤ 0.5), ok (0.5–0.7) and unreliable (> 0.7).
KHAT_GOOD = 0.5
KHAT_UNRELIABLE = 0.7
#: A PSIS tail with fewer distinct values than this is degenerate (ArviZ itself returns k = inf for a
#: tail of at most 4 weights).
MIN_TAIL_DISTINCT = 5


def _khat_arviz0(log_w: np.ndarray) -> np.ndarray:
    """ArviZ 0.x: ``arviz.psislw`` takes log importance ratios (..., K), samples on the last axis."""
    import arviz

    _, k = arviz.psislw(np.ascontiguousarray(log_w))
    return np.asarray(k, dtype=float)


def _khat_arviz_stats(log_w: np.ndarray) -> np.ndarray:
    """ArviZ >= 1.0 (arviz-stats), log ratios (..., K), samples on the last axis. arviz-stats 0.8 expects
    the log-likelihood convention (it negates), which may change again, so the sign is fixed once by
    calibration."""
    from arviz_stats.base import array_stats

    _, k = array_stats.psislw(np.ascontiguousarray(log_w) * _arviz_stats_sign(), r_eff=1.0, axis=-1)
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


def _samples_last(log_weights: torch.Tensor | np.ndarray, sample_axis: int) -> tuple[np.ndarray, tuple]:
    """Float64 log weights as (P, K), samples last, and the shape (without the sample axis) of the result."""
    lw = log_weights.detach().cpu().double().numpy() if torch.is_tensor(log_weights) else log_weights
    lw = np.asarray(lw, dtype=float)
    if lw.ndim < 1:
        raise ValueError("log_weights must have at least one (sample) axis, got a scalar")
    if not isinstance(sample_axis, (int, np.integer)) or not -lw.ndim <= sample_axis < lw.ndim:
        raise ValueError(f"sample_axis={sample_axis!r} is not an axis of log weights of shape {lw.shape}")
    lw = np.moveaxis(lw, sample_axis, -1)
    return lw.reshape(-1, lw.shape[-1]), lw.shape[:-1]


def psis_tail_length(num_samples: int) -> int:
    """M, the number of largest weights the PSIS tail fit uses out of K = ``num_samples``.

    M = ceil(min(0.2 K, 3 sqrt(K))), as ``arviz.psislw`` (ArviZ 0.23, ``arviz/stats/stats.py``) computes it
    with ``reff=1``: ``cutoff_ind = -ceil(min(K / 5, 3 * sqrt(K / reff))) - 1``; ArviZ fits the weights
    strictly above the (M+1)-th largest, and returns k = inf when at most 4 are.
    """
    return int(math.ceil(min(num_samples / 5.0, 3.0 * math.sqrt(num_samples))))


def psis_khat(log_weights: torch.Tensor | np.ndarray, *, sample_axis: int) -> np.ndarray:
    """PSIS k-hat of log importance weights, with the samples on ``sample_axis``.

    ``log_weights`` may have any number of axes ≥ 1; k-hat is computed along ``sample_axis`` for every
    index of the other axes, and the result has the input's shape without that axis (shape () for a 1-D
    input). ``sample_axis=0`` for this package's (K, N) weights; ``sample_axis=-1`` for ArviZ's (N, K)
    layout (then the result equals ``arviz.psislw(log_weights)[1]``). k-hat is ArviZ's value, unchanged:
    ≤ 0.5 good, 0.5–0.7 ok, > 0.7 unreliable; it is meaningless where :func:`degenerate_tails` is True
    (ArviZ gives inf there when the tail has ≤ 4 values above its cut-off, otherwise a fit to round-off).
    """
    lw, shape = _samples_last(log_weights, sample_axis)
    if lw.shape[-1] < 2:
        # ArviZ fails on a single sample (an index error); its value for any tail this short is inf.
        return np.full(shape, np.inf)
    with warnings.catch_warnings():
        # ArviZ warns once per call about k > 0.7; the caller reports those fractions itself.
        warnings.simplefilter("ignore")
        return np.asarray(_khat_backend()(lw), dtype=float).reshape(shape)


def degenerate_tails(
    log_weights: torch.Tensor | np.ndarray, *, sample_axis: int, rtol: float = 1e-6
) -> np.ndarray:
    """True where PSIS k-hat is meaningless: the tail PSIS fits has fewer than 5 distinct values.

    The tail is the M = ceil(min(0.2 K, 3 sqrt(K))) largest of the K weights along ``sample_axis``
    (:func:`psis_tail_length`, ArviZ's formula with r_eff = 1). The generalised Pareto fit of PSIS
    (Vehtari et al. 2024, "Pareto smoothed importance sampling") models a continuous tail; when the log
    weights take one or a few values (a guide equal to the posterior: constant log weights; a discrete
    latent: one value per state) the fit is undefined (ArviZ: k = inf) or a fit to floating-point
    round-off (any k), though the estimate is fine and its ESS is ≈ K for constant weights.

    Log weights are compared on a grid of width ``rtol * max(1, |largest log weight|)`` so that round-off
    does not count as distinct values (1e-6 is a few float32 ulps; weights that close are equal for
    every practical purpose). A non-finite value in the tail counts as one more value; a point whose
    largest log weight is not finite is degenerate. Shapes as :func:`psis_khat`: the input's shape
    without ``sample_axis``; a bool array.
    """
    lw, shape = _samples_last(log_weights, sample_axis)
    K = lw.shape[-1]
    M = min(psis_tail_length(K), K)
    if M < MIN_TAIL_DISTINCT:
        return np.ones(shape, dtype=bool)
    tail = np.partition(lw, K - M, axis=-1)[:, K - M :]  # (P, M), the M largest, unordered
    top = np.max(tail, axis=-1, keepdims=True)
    finite = np.isfinite(tail)
    with np.errstate(invalid="ignore"):
        width = rtol * np.maximum(1.0, np.abs(top))
        bins = np.where(finite, np.floor((top - tail) / width), -1.0)
    bins = np.sort(bins, axis=-1)
    distinct = 1 + np.count_nonzero(np.diff(bins, axis=-1), axis=-1)
    out = (distinct < MIN_TAIL_DISTINCT) | ~np.isfinite(top[:, 0])
    return out.reshape(shape)


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
    data_plate: str | None = "auto",
    progress: bool = False,
) -> dict:
    """The bound ladder on a data set, in nats per data point (means over the data points).

    Returns a dict with ``"elbo"`` (from ``elbo``, by default :class:`PathwiseKL_ELBO` with analytic
    KLs, one particle per data point), ``"iwae"`` {k: mean L_k}, ``"khat"`` (per data point, from the
    K = max(ks) weights), ``"degenerate"`` (per data point, bool: k-hat meaningless, see
    :func:`degenerate_tails`), ``"ess"`` (per data point), ``"num_samples"`` = K and ``"num_data"``.
    ``khat_summary(ladder["khat"], ladder["degenerate"], ladder["ess"])`` summarises them.
    All are bounds on (or, for the largest K, estimates of) log p(x); higher is tighter.
    """
    from inference.pathwise_kl_elbo import PathwiseKL_ELBO

    elbo = elbo or PathwiseKL_ELBO()
    tensors = data if isinstance(data, tuple) else (data,)
    n = tensors[0].shape[0]
    K = max(ks)
    sums = {k: 0.0 for k in ks}
    khat, degenerate, ess = [], [], []
    for _, lw in iter_log_weights(
        model, guide, tensors, num_samples=K, batch_size=batch_size, chunk_size=chunk_size,
        data_plate=data_plate, progress=progress, desc="bound ladder",
    ):
        for k, v in iwae_ladder_from_weights(lw.double(), ks).items():
            sums[k] += v.sum().item()
        khat.append(psis_khat(lw, sample_axis=0))
        degenerate.append(degenerate_tails(lw, sample_axis=0))
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
        "degenerate": np.concatenate(degenerate),
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


def khat_summary(
    khat: np.ndarray,
    degenerate: np.ndarray | None = None,
    ess: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """The PSIS k-hat categories over data points (one k-hat, flag and ESS per point).

    A point is *degenerate* where ``degenerate`` is True (:func:`degenerate_tails`) or its k-hat is not
    finite (inf, nan); it is never counted as unreliable. Keys: ``khat_median`` and ``khat_max`` over the
    non-degenerate points; ``khat_frac_gt_0.5`` / ``khat_frac_gt_0.7``: fractions of *all* points that are
    non-degenerate with k-hat above 0.5 (ok or unreliable) / 0.7 (unreliable); ``khat_frac_degenerate``:
    fraction of all points that are degenerate; ``ess_mean_degenerate``: mean ESS over the degenerate
    points (nan when there are none or ``ess`` is not given). Medians and maxima are nan when no point is
    left; fractions are nan for no points at all.
    """
    khat = np.asarray(khat, dtype=float).ravel()
    bad = ~np.isfinite(khat)
    if degenerate is not None:
        bad |= np.asarray(degenerate, dtype=bool).ravel()
    fitted = khat[~bad]
    n = khat.size
    if ess is not None:
        ess = ess.detach().cpu().double().numpy() if torch.is_tensor(ess) else np.asarray(ess, dtype=float)
        ess = ess.ravel()
    return {
        "khat_median": float(np.median(fitted)) if fitted.size else math.nan,
        "khat_frac_gt_0.5": float(np.sum(fitted > KHAT_GOOD) / n) if n else math.nan,
        "khat_frac_gt_0.7": float(np.sum(fitted > KHAT_UNRELIABLE) / n) if n else math.nan,
        "khat_max": float(np.max(fitted)) if fitted.size else math.nan,
        "khat_frac_degenerate": float(np.mean(bad)) if n else math.nan,
        "ess_mean_degenerate": float(np.mean(ess[bad])) if ess is not None and bad.any() else math.nan,
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
