"""Importance-sampled log-likelihood estimate for evaluation (e.g. IWAE-5000 on a test set).

Mohamed & Lakshminarayanan (2016, tutorial, importance sampling); Burda et al. (2016)::

    log p̂(x_n) = log (1/K) Σ_k p(x_n, z^(k)) / q(z^(k) | x_n),   z^(k) ~ q(z | x_n)

This is the IWAE-K bound evaluated with one draw of K samples: a stochastic lower bound in expectation
(E log p̂ ≤ log p(x) by Jensen) that converges to log p(x) as K grows; tables call it an *estimate* and
state K. The test set is processed in batches of data points and chunks of samples, so memory stays
bounded for K = 5000 on 10,000 images; the K log weights of one batch are kept only long enough to
compute PSIS k-hat, the degenerate-tail flag and the ESS for each data point (categories:
:mod:`inference.diagnostics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from inference.diagnostics import degenerate_tails, effective_sample_size, khat_summary, psis_khat
from inference.iwae import iter_log_weights, log_mean_exp


@dataclass
class ImportanceEstimate:
    """Per-data-point importance-sampled log-likelihood with its health diagnostics.

    ``degenerate`` marks the points whose PSIS tail has fewer than 5 distinct values (a guide equal to
    the posterior, a discrete latent), where k-hat is meaningless (:func:`inference.diagnostics.
    degenerate_tails`); all False when it was not computed (``diagnostics=False``, then ``khat`` is nan).
    """

    log_likelihood: torch.Tensor  # (N,) nats, log p̂(x_n)
    khat: np.ndarray  # (N,) PSIS k-hat
    ess: torch.Tensor  # (N,) effective sample size of the K weights
    num_samples: int
    degenerate: np.ndarray | None = None  # (N,) bool; None (from older callers) means all False

    def __post_init__(self) -> None:
        if self.degenerate is None:
            self.degenerate = np.zeros(np.shape(self.khat), dtype=bool)

    def summary(self) -> dict[str, float]:
        """Mean NLL (nats per data point), its standard error over data points, and diagnostics.

        The k-hat keys are those of :func:`inference.diagnostics.khat_summary` (degenerate points are
        their own category, ``khat_frac_degenerate``, with their mean ESS ``ess_mean_degenerate``); all
        nan when k-hat was not computed.
        """
        ll = self.log_likelihood.double()
        n = ll.numel()
        khat = khat_summary(self.khat, self.degenerate, self.ess)
        if np.isnan(self.khat).all() and not np.any(self.degenerate):  # diagnostics=False
            khat = dict.fromkeys(khat, math.nan)
        return {
            "nll": float(-ll.mean()),
            "nll_stderr": float(ll.std(unbiased=True) / n**0.5) if n > 1 else float("nan"),
            "num_data": n,
            "num_samples": self.num_samples,
            "ess_mean": float(self.ess.double().mean()),
            "ess_min": float(self.ess.min()),
            **khat,
        }


def importance_log_likelihood(
    model,
    guide,
    data: torch.Tensor | tuple[torch.Tensor, ...],
    num_samples: int = 5000,
    *,
    batch_size: int = 100,
    chunk_size: int = 500,
    data_plate: str | None = "auto",
    diagnostics: bool = True,
    progress: bool = False,
) -> ImportanceEstimate:
    """Estimate log p(x_n) for every row of ``data`` with K = ``num_samples`` guide samples.

    ``model(*batch)`` and ``guide(*batch)`` are called on batches of rows (a tuple ``data`` is split
    along dim 0 together). ``batch_size * chunk_size`` bounds how many model evaluations are in memory
    at once. With ``diagnostics=False`` PSIS k-hat and the degenerate-tail check are skipped (they cost a
    sort per data point).
    """
    lls, khats, degens, esss = [], [], [], []
    for _, lw in iter_log_weights(
        model, guide, data, num_samples=num_samples, batch_size=batch_size, chunk_size=chunk_size,
        data_plate=data_plate, progress=progress, desc=f"IWAE-{num_samples}",
    ):
        lw = lw.double()
        lls.append(log_mean_exp(lw, 0))
        esss.append(effective_sample_size(lw))
        khats.append(psis_khat(lw, sample_axis=0) if diagnostics else np.full(lw.shape[1], np.nan))
        degens.append(degenerate_tails(lw, sample_axis=0) if diagnostics else np.zeros(lw.shape[1], bool))
    return ImportanceEstimate(torch.cat(lls), np.concatenate(khats), torch.cat(esss), num_samples,
                              np.concatenate(degens))
