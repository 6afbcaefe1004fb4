"""Calibration of predicted Bernoulli probabilities: reliability diagram and expected calibration error (ECE).

Guo et al. (2017), "On calibration of modern neural networks" (ICML), Sec. 2. A predictor is *calibrated*
when, among all the cases to which it gives probability p, the event happens a fraction p of the time. The
*reliability diagram* shows this in bins: the predicted probabilities are grouped into M equal-width bins
I_b = (b/M, (b + 1)/M] of [0, 1] (b = 0..M−1; a probability of exactly 0 goes into the first bin), and for
each bin B_b (the cases whose prediction falls in I_b, n_b of them out of N) it plots the observed frequency
against the mean prediction::

    conf_b = (1/n_b) Σ_{i ∈ B_b} p_i          (mean predicted probability)
    acc_b  = (1/n_b) Σ_{i ∈ B_b} y_i          (observed frequency of y = 1)

A calibrated predictor lies on the diagonal acc = conf. The *expected calibration error* is the
bin-weighted mean distance from it, and the *maximum calibration error* (also Sec. 2) its worst bin::

    ECE = Σ_b (n_b / N) |acc_b − conf_b|      MCE = max_{b: n_b > 0} |acc_b − conf_b|

Guo et al. bin the confidence of the predicted class of a multi-class classifier. Here the events are
binary (a pixel is 1 or 0) and what is binned is the predicted probability of a 1 itself, over the whole
of [0, 1]: acc_b is the frequency of 1s, not of correct predictions. This is the reliability diagram of a
binary probability forecast (as in Niculescu-Mizil & Caruana 2005); it sees over- and under-prediction of
1s separately, which the top-label confidence would fold together.

Reading the numbers: ECE is 0 for a calibrated predictor only in the limit; on finite data each bin's
frequency has sampling noise of about sqrt(acc_b (1 − acc_b) / n_b), so the estimate is biased upwards by
roughly that much per bin. ECE also says nothing about sharpness: predicting the base rate everywhere is
perfectly calibrated. Read it beside a proper score such as the NLL.

Bins are fixed by ``torch.linspace(0, 1, M + 1)`` in float64 and a probability p goes into the bin b with
edges[b] < p <= edges[b + 1]; every sum is in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Reliability", "reliability"]


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram and its expected calibration error (float64 tensors on the CPU).

    Empty bins have ``count`` 0 and NaN ``mean_prob`` and ``freq`` (``None`` in :meth:`to_dict`).
    """

    edges: torch.Tensor  # (M + 1,) bin edges, 0 .. 1
    count: torch.Tensor  # (M,) int64: n_b, the predictions in each bin
    mean_prob: torch.Tensor  # (M,) conf_b, the mean predicted probability of the bin
    freq: torch.Tensor  # (M,) acc_b, the observed frequency of 1s in the bin
    ece: float  # Σ_b (n_b / N) |acc_b − conf_b|
    mce: float  # max over non-empty bins of |acc_b − conf_b|
    num: int  # N, the predictions scored

    @property
    def num_bins(self) -> int:
        return int(self.count.numel())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain floats and ints, ``None`` for the mean and frequency of an empty bin."""

        def values(t: torch.Tensor) -> list[float | None]:
            return [None if math.isnan(v) else v for v in t.tolist()]

        return {
            "ece": self.ece,
            "mce": self.mce,
            "num_pixels": self.num,
            "num_bins": self.num_bins,
            "binning": "equal-width bins (edges[b], edges[b+1]] of [0, 1] on the predicted probability of "
            "a 1 (0 in the first bin)",
            "bin_edges": self.edges.tolist(),
            "bin_count": self.count.tolist(),
            "bin_mean_prob": values(self.mean_prob),
            "bin_freq": values(self.freq),
        }


def _as_float64(name: str, value: Any) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dtype == torch.bool:
        t = t.to(torch.float64)
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                   torch.uint8)):
        raise ValueError(f"{name} must be a real tensor, got dtype {t.dtype}")
    return t.detach().to(torch.float64)


@torch.no_grad()
def reliability(prob: Any, target: Any, mask: Any = None, num_bins: int = 10) -> Reliability:
    """Reliability diagram and ECE of predicted probabilities ``prob`` of binary outcomes ``target``.

    :param prob: predicted probabilities P(y = 1), any shape, values in [0, 1] (a tensor or an array).
    :param target: the outcomes, the same shape, each 0 or 1.
    :param mask: optional selection of the same shape: the entries with mask 1 (True) are scored, the others
        are ignored (their values are not read). For imputation pass the *missing* pixels, 1 − m, not the
        ``ppl_models.masks`` mask m (1 = known).
    :param num_bins: M, the number of equal-width bins of [0, 1], >= 1.
    :raises ValueError: shapes that differ, num_bins < 1, no entry selected, a selected probability outside
        [0, 1] (or NaN), a selected target other than 0 or 1, a mask with values other than 0 and 1.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    p, y = _as_float64("prob", prob), _as_float64("target", target)
    if p.shape != y.shape:
        raise ValueError(f"prob and target must have the same shape, got {tuple(p.shape)} and "
                         f"{tuple(y.shape)}")
    if mask is not None:
        m = _as_float64("mask", mask)
        if m.shape != p.shape:
            raise ValueError(f"mask must have prob's shape {tuple(p.shape)}, got {tuple(m.shape)}")
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (or False and True): 1 = scored")
        keep = m.bool()
        p, y = p[keep], y[keep]
    else:
        p, y = p.reshape(-1), y.reshape(-1)
    n = p.numel()
    if n == 0:
        raise ValueError("no predictions to score: prob is empty or the mask selects nothing")
    # NaN fails both comparisons, so it is reported here as well.
    if not (float(p.min()) >= 0.0 and float(p.max()) <= 1.0):
        raise ValueError(f"prob must hold probabilities in [0, 1], got values in [{float(p.min())}, "
                         f"{float(p.max())}]" + (" (NaN present)" if bool(p.isnan().any()) else ""))
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("target must hold binary outcomes, 0 or 1 (binarise grey levels first)")

    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64, device=p.device)
    # bucketize(right=False) gives i with edges[i-1] < p <= edges[i] among the inner edges: bin (·, ·].
    index = torch.bucketize(p, edges[1:-1], right=False)
    counts = torch.bincount(index, minlength=num_bins)
    count = counts.to(torch.float64)
    sum_p = torch.zeros_like(count).index_add_(0, index, p)
    sum_y = torch.zeros_like(count).index_add_(0, index, y)
    filled = count > 0
    safe = count.clamp_min(1)
    nan = torch.full_like(count, math.nan)
    mean_prob = torch.where(filled, sum_p / safe, nan)
    freq = torch.where(filled, sum_y / safe, nan)
    gap = torch.where(filled, (freq - mean_prob).abs(), torch.zeros_like(count))
    ece = float((count / n * gap).sum())
    mce = float(gap.max())
    return Reliability(edges=edges.cpu(), count=counts.cpu(), mean_prob=mean_prob.cpu(),
                       freq=freq.cpu(), ece=ece, mce=mce, num=n)
