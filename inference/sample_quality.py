"""Sample-quality metrics every generator is measured with (the variational-GSN issue's item 1), in float64.

* **Fréchet distance** between two sets of feature vectors (Heusel et al. 2017, "GANs trained by a two
  time-scale update rule converge to a local Nash equilibrium", Sec. 4, Eq. 6), the distance between the
  Gaussians fitted to them:

      FD = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}).

  The matrix square roots are taken by symmetric eigendecomposition (both matrices are symmetric positive
  semi-definite; negative round-off eigenvalues are set to 0), so the value is real and ≥ 0. Computed on
  the penultimate features of a classifier trained on the same data, it is what our tables call
  "FD-classifier" (never "FID": there are no Inception weights here).
* **Mode coverage**: the entropy (nats) of the histogram of a classifier's predicted classes over
  generated samples; log(number of classes) when every class is equally frequent.
* **Gaussian Parzen-window log-likelihood** (Breuleux et al. 2011, "Quickly generating representative
  samples from an RBM-derived process", Sec. 4; the protocol of Goodfellow et al. 2014, "Generative
  adversarial nets", Sec. 5): with kernel centres s_1..s_n (model samples) and bandwidth σ,

      log p̂(x) = logsumexp_i log N(x; s_i, σ² I) − log n,

  averaged over test points with its standard error, computed in chunks of test points × centres so that
  10k × 10k runs in bounded memory. σ is chosen on validation data (:func:`select_parzen_sigma`), never on
  test data. It is an estimate with a large bias in high dimension; tables say so.
* **Reconstruction MSE** on grey levels in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "class_entropy",
    "frechet_distance",
    "gaussian_frechet_distance",
    "histogram_entropy",
    "parzen_log_likelihood",
    "reconstruction_mse",
    "select_parzen_sigma",
]


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues < 0 from
    round-off set to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian_frechet_distance(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor,
                              cov_b: torch.Tensor) -> float:
    """The Fréchet (2-Wasserstein²) distance between N(mu_a, cov_a) and N(mu_b, cov_b), in float64."""
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    d = mu_a.shape[-1]
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"means must be (D,) and covariances (D, D) with one D; got {tuple(mu_a.shape)}, "
                         f"{tuple(cov_a.shape)}, {tuple(mu_b.shape)}, {tuple(cov_b.shape)}")
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(_symmetric(root_a @ cov_b @ root_a)).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(value.clamp(min=0))


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted (mean, unbiased covariance) to two sets of feature
    vectors, (N_a, D) and (N_b, D), each with at least 2 rows."""
    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) with N >= 2, got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError(f"{name} holds non-finite values")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape[1]} and {features_b.shape[1]}")
    a, b = features_a.double(), features_b.double()
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1), b.mean(0),
                                     torch.cov(b.T).reshape(b.shape[1], -1))


def class_entropy(predicted: torch.Tensor, num_classes: int) -> float:
    """Entropy (nats) of the histogram of predicted class labels (N,) over ``num_classes`` classes."""
    if predicted.dim() != 1 or predicted.numel() == 0:
        raise ValueError(f"predicted must be a non-empty (N,) tensor of labels, got {tuple(predicted.shape)}")
    if predicted.min() < 0 or predicted.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(predicted.min())}, "
                         f"{int(predicted.max())}]")
    return histogram_entropy(torch.bincount(predicted.long(), minlength=num_classes))


def histogram_entropy(histogram: Sequence[float] | torch.Tensor) -> float:
    """Entropy (nats) of a histogram of counts or fractions (normalised here); empty bins contribute 0."""
    p = torch.as_tensor(histogram, dtype=torch.float64)
    if p.dim() != 1 or p.numel() == 0 or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"histogram must be a non-empty 1-D set of counts >= 0 with a positive sum, got {p}")
    p = p / p.sum()
    p = p[p > 0]
    return max(0.0, float(-(p * p.log()).sum()))  # 0, not -0.0, for a single class


def parzen_log_likelihood(centres: torch.Tensor, points: torch.Tensor, sigma: float, *,
                          chunk_points: int = 500, chunk_centres: int = 2000) -> torch.Tensor:
    """log p̂(x) of each row of ``points`` (M, D) under the Gaussian Parzen window with kernel centres
    ``centres`` (N, D) and bandwidth ``sigma`` (see the module docstring); (M,) float64 on the CPU."""
    if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if centres.dim() != 2 or points.dim() != 2 or centres.shape[1] != points.shape[1] or not len(centres):
        raise ValueError(f"centres (N, D) and points (M, D) must share D, N >= 1; got "
                         f"{tuple(centres.shape)} and {tuple(points.shape)}")
    d, n = centres.shape[1], centres.shape[0]
    const = -0.5 * d * math.log(2 * math.pi * sigma**2) - math.log(n)
    out = []
    for i in range(0, points.shape[0], chunk_points):
        x = points[i : i + chunk_points].double()
        acc = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        for j in range(0, n, chunk_centres):
            c = centres[j : j + chunk_centres].to(x)
            sq = torch.cdist(x, c).pow(2)  # (m, n_chunk)
            acc = torch.logaddexp(acc, torch.logsumexp(-sq / (2 * sigma**2), dim=1))
        out.append((acc + const).cpu())
    return torch.cat(out)


def select_parzen_sigma(centres: torch.Tensor, valid: torch.Tensor, grid: Sequence[float] | None = None,
                        **chunks: int) -> tuple[float, dict[float, float]]:
    """The σ of ``grid`` (default: 20 log-spaced values from 0.01 to 1) with the highest mean Parzen
    log-likelihood of the validation points; returns it and the mean for every σ tried."""
    grid = list(grid) if grid is not None else torch.logspace(-2, 0, 20).tolist()
    scores = {float(s): float(parzen_log_likelihood(centres, valid, float(s), **chunks).mean()) for s in grid}
    return max(scores, key=scores.get), scores


def parzen_score(centres: torch.Tensor, valid: torch.Tensor, test: torch.Tensor,
                 grid: Sequence[float] | None = None) -> dict[str, object]:
    """The Parzen protocol in one call: σ chosen on ``valid`` (:func:`select_parzen_sigma`), then the mean
    log-likelihood of ``test`` with its standard error; returns ``mean``, ``stderr``, ``sigma``,
    ``valid_scores`` (every σ tried), ``num_centres`` and ``num_test_points``."""
    sigma, tried = select_parzen_sigma(centres, valid, grid)
    ll = parzen_log_likelihood(centres, test, sigma)
    return {"mean": float(ll.mean()), "stderr": float(ll.std() / math.sqrt(ll.numel())), "sigma": sigma,
            "valid_scores": tried, "num_centres": int(centres.shape[0]), "num_test_points": int(ll.numel())}


def reconstruction_mse(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error over all pixels of grey-level images in [0, 1] (same shapes)."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(reconstruction.shape)} and {tuple(target.shape)}")
    for name, t in (("reconstruction", reconstruction), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError(f"{name} must hold grey levels in [0, 1]")
    return float((reconstruction.double() - target.double()).pow(2).mean())
