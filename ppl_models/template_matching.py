"""Honest and oracular template matching, the nearest-neighbour baselines of the imputation experiment.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 4 (the baselines of
Table 1): "Honest template matching guessed the missing values based on the training image which best
matched the test image's known values. Oracular template matching was like honest template matching,
but matched directly on the missing values."

Every training image t_n (grey levels, a row of ``train``) is read as a vector of Bernoulli means,
clamped to [eps, 1 − eps] (eps = 1e-6, as the paper's code did). For a test image x with mask m
(1 = known, 0 = missing; ``ppl_models.masks`` convention) and the pixel cross-entropy
CE(x_d, t_d) = −x_d log t_d − (1 − x_d) log(1 − t_d) (x binary or grey)::

    honest:     n* = argmin_n Σ_d m_d       CE(x_d, t_nd)     (match on the known pixels)
    oracular:   n* = argmin_n Σ_d (1 − m_d) CE(x_d, t_nd)     (match on the missing pixels: cheats)
    score:      nll = Σ_d (1 − m_d) CE(x_d, t_n*d)            (exact −log p(x_u | template), nats)

Ties go to the lowest training index. The oracular score is by construction the lowest NLL any single
training image achieves, a floor for template matching rather than an honest method.

Code names: ``train`` = {t_n} (N, D), ``x`` (B, D), ``mask`` = m, ``weight`` = m (honest) or 1 − m
(oracular), ``index`` = n*, ``nll`` = the score. The matching scores of a block of rows against a block
of templates are two matrix products,
``−(w ⊙ x) @ log(t)ᵀ − (w ⊙ (1 − x)) @ log(1 − t)ᵀ``; the training and test sets are walked in blocks
of ``chunk_size`` with a running argmin, so memory is O(chunk_size² + chunk_size · D) whatever N and B.

Precision: the matching scores are accumulated in ``dtype`` (float64 by default), so near-ties among
thousands of templates are resolved by the data and not by float32 rounding (the sums are hundreds of
nats; float32 would leave ~1e-4 of noise). This doubles the cost of the matrix products on the CPU,
which is still minutes at most for the paper's 10k × 50k × 784; pass ``dtype=torch.float32`` on GPUs
with slow float64. The reported NLL is recomputed for the chosen template in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppl_models.masks import validate_mask

__all__ = ["MODES", "TemplateMatchResult", "template_match"]

MODES = ("honest", "oracular")


@dataclass
class TemplateMatchResult:
    """Template-matching imputations and their scores."""

    nll: torch.Tensor  # (B,) −log p(x_u | chosen template), summed over each image's missing pixels
    index: torch.Tensor  # (B,) long: row of ``train`` chosen for each test image
    imputation: torch.Tensor  # (B, D): m ⊙ x + (1 − m) ⊙ train[index]


def _template_logs(t: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    t = t.clamp(eps, 1 - eps)
    return t.log(), torch.log1p(-t)


@torch.no_grad()
def template_match(
    train: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "honest",
    chunk_size: int = 4096,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> TemplateMatchResult:
    """Impute each test image with the training image that best matches it (Bachman & Precup 2015, Sec. 4).

    :param train: training images (N, D), grey levels in [0, 1], used as Bernoulli means; any device
        (blocks are moved to ``x``'s device).
    :param x: test images (B, D) in [0, 1], binary or grey; in honest mode the missing pixels are read
        only to score the result.
    :param mask: 1 = known, 0 = missing, (D,) or (B, D).
    :param mode: ``"honest"`` (match on the known pixels) or ``"oracular"`` (match on the missing ones).
    :param chunk_size: block size over both training and test rows.
    :param eps: the templates are clamped to [eps, 1 − eps] before taking logs.
    :param dtype: accumulation dtype of the matching scores (see the module docstring).
    :returns: :class:`TemplateMatchResult` with ``nll`` and the imputations in ``x``'s dtype.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    mask = validate_mask(mask, x)
    if not isinstance(train, torch.Tensor) or train.dim() != 2 or not train.is_floating_point():
        got = tuple(train.shape) if isinstance(train, torch.Tensor) else type(train).__name__
        raise ValueError(f"train must be a floating tensor of training images (N, D), got {got}")
    if train.shape[1] != x.shape[1]:
        raise ValueError(
            f"train has {train.shape[1]} pixels per row but x has {x.shape[1]}; both must be (·, D)"
        )
    if train.shape[0] == 0:
        raise ValueError("train is empty")
    for name, t in (("x", x), ("train", train)):
        # NaN fails both comparisons, so it is reported here as well.
        if t.numel() and not (float(t.min()) >= 0.0 and float(t.max()) <= 1.0):
            raise ValueError(f"{name} must hold grey levels in [0, 1], got values in [{t.min()}, {t.max()}]")

    device = x.device
    num_test = x.shape[0]
    xd, md = x.to(dtype), mask.to(dtype)
    weight = md if mode == "honest" else 1 - md
    w_one, w_zero = weight * xd, weight * (1 - xd)  # weights of log t and of log(1 − t)
    best = torch.full((num_test,), torch.inf, dtype=dtype, device=device)
    index = torch.zeros(num_test, dtype=torch.long, device=device)

    for start in range(0, train.shape[0], chunk_size):
        log_t, log_1mt = _template_logs(train[start : start + chunk_size].to(device=device, dtype=dtype), eps)
        for row in range(0, num_test, chunk_size):
            rows = slice(row, row + chunk_size)
            scores = -(w_one[rows] @ log_t.T) - w_zero[rows] @ log_1mt.T  # (rows, templates)
            # torch.min returns the first minimum within the block; strict < keeps earlier blocks on ties.
            value, arg = scores.min(dim=1)
            better = value < best[rows]
            best[rows] = torch.where(better, value, best[rows])
            index[rows] = torch.where(better, arg + start, index[rows])

    template = train[index.to(train.device)].to(device=device)
    log_t, log_1mt = _template_logs(template.to(torch.float64), eps)
    x64, missing = x.to(torch.float64), 1 - mask.to(torch.float64)
    nll = -(missing * (x64 * log_t + (1 - x64) * log_1mt)).sum(-1)
    imputation = torch.where(mask.bool(), x, template.to(x.dtype))
    return TemplateMatchResult(nll=nll.to(x.dtype), index=index, imputation=imputation)
