"""One scorer for every experiment: the path-wise bound and the IWAE-K estimate per data point.

For a trained model/guide pair and a scored data set, in nats per data point (lower is better):

* the **bound**: the mean of ``bound_draws`` single-path values of −ELBO (:meth:`PathwiseKL_ELBO.per_datum`,
  Bachman & Precup 2015, "Data generation as sequential decision making", Eq. 17: analytic one-step KLs
  where valid), an upper bound on −log p(x) in expectation, for every data point;
* the **estimate**: −log p̂(x) of :func:`inference.importance.importance_log_likelihood` with K =
  ``iw_samples`` guide samples (IWAE-K, Burda et al. 2016), on the first ``iw_limit`` data points, with PSIS
  k-hat, the degenerate-tail flag and the ESS of each point's weights;

both chunked (bounded memory), and summarised by :func:`nll_summary` with standard errors over data points.
``data`` is one tensor or a tuple of tensors split along dim 0 together (e.g. images and masks), passed to
``model`` and ``guide`` as positional arguments.

Under ``torchrun`` (:mod:`inference.distributed`) every process scores its contiguous share of the rows
(of the bound's rows and, apart, of the IWAE rows) with its own noise, and every process gets all rows'
scores back in order: the test-set evaluation uses every device. Every process must call it alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from inference import distributed
from inference.importance import ImportanceEstimate, importance_log_likelihood
from inference.pathwise_kl_elbo import PathwiseKL_ELBO


@dataclass
class Scores:
    """Per-data-point NLLs: the bound on every point and the importance estimate on the first ``num_iw``."""

    bound: torch.Tensor  # (N,) float64, mean of bound_draws single-path bounds
    estimate: ImportanceEstimate  # on the first num_iw points (its log_likelihood is log p̂)
    bound_draws: int

    @property
    def iwae(self) -> torch.Tensor:
        """(num_iw,) float64: −log p̂(x_n), the IWAE-K estimate of each point's NLL."""
        return -self.estimate.log_likelihood.double().cpu()

    @property
    def num_iw(self) -> int:
        return self.estimate.log_likelihood.numel()


def score_bound_and_iwae(
    model,
    guide,
    data: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    bound_draws: int = 10,
    iw_samples: int = 5000,
    iw_limit: int | None = None,
    batch_size: int = 100,
    iw_batch: int = 100,
    iw_chunk: int = 500,
    progress: bool = False,
) -> Scores:
    """The bound on every row of ``data`` and the IWAE-``iw_samples`` estimate on the first ``iw_limit``
    rows (all rows for None or 0); see the module docstring."""
    tensors = data if isinstance(data, tuple) else (data,)
    n = tensors[0].shape[0]
    for name, value in (("bound_draws", bound_draws), ("iw_samples", iw_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if iw_limit is not None and (not isinstance(iw_limit, int) or iw_limit < 0):
        raise ValueError(f"iw_limit must be None or an int >= 0 (0: all rows), got {iw_limit!r}")
    n_iw = min(iw_limit or n, n)
    lo, hi = distributed.shard_range(n)
    iw_lo, iw_hi = distributed.shard_range(n_iw)
    elbo = PathwiseKL_ELBO()
    total = torch.zeros(hi - lo, dtype=torch.float64)
    if hi > lo:
        with torch.no_grad():
            for _ in range(bound_draws):  # draws outside, batches inside: one path per row per draw
                total += torch.cat([
                    -elbo.per_datum(model, guide, *(t[i : min(i + batch_size, hi)] for t in tensors))
                    for i in range(lo, hi, batch_size)
                ]).double().cpu()
    est = None
    if iw_hi > iw_lo:
        est = importance_log_likelihood(model, guide, tuple(t[iw_lo:iw_hi] for t in tensors),
                                        num_samples=iw_samples, batch_size=iw_batch, chunk_size=iw_chunk,
                                        progress=progress and distributed.is_writer())
        # On the CPU: under torchrun they are gathered as pickles, and CUDA tensors would unpickle onto
        # the sending process's GPU.
        est.log_likelihood, est.ess = est.log_likelihood.cpu(), est.ess.cpu()
    # estimate is None on a process with no IWAE rows; _concatenated skips it.
    local = Scores(bound=total / bound_draws, estimate=est, bound_draws=bound_draws)
    if not distributed.is_distributed():
        return local
    return _concatenated(distributed.all_gather_object(local), iw_samples)


def _concatenated(parts: list[Scores], iw_samples: int) -> Scores:
    """The processes' scores of their contiguous rows, in rank order, as one :class:`Scores`."""
    ests = [p.estimate for p in parts if p.estimate is not None]
    est = ImportanceEstimate(
        torch.cat([e.log_likelihood for e in ests]), np.concatenate([e.khat for e in ests]),
        torch.cat([e.ess for e in ests]), iw_samples,
        np.concatenate([np.asarray(e.degenerate) for e in ests]))
    return Scores(bound=torch.cat([p.bound for p in parts]), estimate=est, bound_draws=parts[0].bound_draws)


def nll_summary(nll: torch.Tensor, counts: torch.Tensor | None = None) -> dict[str, float]:
    """Mean NLL per data point, its standard error over data points, the number of points and, with
    ``counts`` (units per point, e.g. missing pixels), the NLL per unit (total NLL / total units)."""
    nll = nll.double().cpu()
    n = nll.numel()
    out = {"nll": float(nll.mean()), "stderr": float(nll.std() / math.sqrt(n)) if n > 1 else float("nan"),
           "num": n}
    if counts is not None:
        out["nll_per_unit"] = float(nll.sum() / counts.double().cpu().sum())
    return out
