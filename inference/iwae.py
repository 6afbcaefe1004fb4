"""Importance-weighted bound IWAE-K, vectorised over particles, per data point.

Burda, Grosse & Salakhutdinov (2016); Mohamed & Lakshminarayanan (2016, tutorial, importance sampling
and variational bounds). For each data point x_n and K samples z^(k) ~ q(z | x_n)::

    log w_k  = log p(x_n, z^(k)) - log q(z^(k) | x_n)
    L_K(x_n) = E[ log (1/K) Σ_k w_k ]  <=  log p(x_n)

L_1 is the ELBO, L_K does not decrease with K and tends to log p(x_n) as K -> inf. The loss is
-Σ_n L_K(x_n) (times the plate's scale when subsampling).

"Per data point" is defined by a plate: every sample site must sit inside ``pyro.plate(data_plate)``
(default ``"data"``), whose dimension indexes data points; all other batch dimensions are summed into
the log weight. A model with no such plate is one data point. The K particles live in an extra plate
(``"iw_particles"``) to the left of all the model's plates, so the model and guide must broadcast as
Pyro models do (the same requirement as ``vectorize_particles=True``).

Log weights are computed from unscaled log-densities with the masks applied; a ``poutine.scale``
factor (e.g. N/B under subsampling) multiplies the per-data-point bound *outside* the log-mean-exp,
where it belongs (it must be the same for every site).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan

PARTICLE_PLATE = "iw_particles"


def max_plate_nesting(model, guide, *args, **kwargs) -> int:
    """Number of plate dimensions used by a model/guide pair (one untraced run of each)."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def _data_dim(site: dict, data_plate: str) -> int | None:
    for frame in site["cond_indep_stack"]:
        if frame.name == data_plate:
            return frame.dim
    return None


def log_importance_weights(
    model,
    guide,
    *args,
    num_samples: int,
    data_plate: str = "data",
    plate_nesting: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """Log importance weights log p(x, z) - log q(z | x), shape (num_samples, N), and the plate scale.

    Differentiable when gradients are enabled (reparameterised guides). N is the size of
    ``data_plate`` (1 if the model has no such plate).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if plate_nesting is None:
        plate_nesting = max_plate_nesting(model, guide, *args, **kwargs)
    nesting = plate_nesting + 1
    particles = pyro.plate(PARTICLE_PLATE, num_samples, dim=-nesting)
    guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(particles(model), trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)

    terms: list[tuple[torch.Tensor, int | None, str]] = []
    scales = []
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or (trace is guide_trace and site["is_observed"]):
                continue
            lp = scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])
            if lp.dim() > nesting:
                raise ValueError(
                    f"site {name!r} has batch shape {tuple(lp.shape)} with more dims than its plates "
                    f"({nesting} incl. particles); declare every batch dim with pyro.plate or .to_event()"
                )
            lp = lp.reshape((1,) * (nesting - lp.dim()) + lp.shape)
            terms.append((sign * lp, _data_dim(site, data_plate), name))
            scales.append(site["scale"])

    has_plate = [d is not None for _, d, _ in terms]
    if any(has_plate) and not all(has_plate):
        outside = [name for _, d, name in terms if d is None]
        raise ValueError(
            f"importance weights per data point need every sample site inside pyro.plate({data_plate!r}); "
            f"these are not: {outside}"
        )
    scale = scales[0] if scales else 1.0
    for s in scales[1:]:
        if not (s is scale or (torch.is_tensor(s) and torch.equal(torch.as_tensor(scale), s)) or s == scale):
            raise ValueError("all sites must share one poutine.scale factor for per-data-point weights")

    log_w = None
    for lp, ddim, _ in terms:
        keep = [0] if ddim is None else [0, nesting + ddim]
        other = [i for i in range(nesting) if i not in keep]
        red = lp.sum(dim=other, keepdim=True) if other else lp
        red = red.reshape(red.shape[0], -1)  # (K or 1, N or 1)
        log_w = red if log_w is None else log_w + red
    log_w = log_w.expand(num_samples, log_w.shape[1])
    return log_w, scale


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) Σ_k exp(log_w_k) along ``dim``, stably."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def iter_log_weights(
    model,
    guide,
    data: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    num_samples: int,
    batch_size: int = 100,
    chunk_size: int = 500,
    data_plate: str = "data",
    progress: bool = False,
    desc: str = "importance weights",
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, log_w)`` over a data set: log_w of shape (num_samples, len(rows)), on the CPU.

    Memory is bounded by ``batch_size * chunk_size`` model evaluations at a time, plus the
    (num_samples, batch_size) log weights kept for one batch. No gradients are recorded.
    """
    from tqdm.auto import tqdm

    tensors = data if isinstance(data, tuple) else (data,)
    n = tensors[0].shape[0]
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    nesting = None
    with torch.no_grad():
        bar = tqdm(total=n, desc=desc, disable=not progress, unit="x")
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            batch = tuple(t[rows] for t in tensors)
            if nesting is None:
                nesting = max_plate_nesting(model, guide, *batch)
            chunks, done = [], 0
            while done < num_samples:
                k = min(chunk_size, num_samples - done)
                lw, _ = log_importance_weights(
                    model, guide, *batch, num_samples=k, data_plate=data_plate, plate_nesting=nesting
                )
                chunks.append(lw.cpu())
                done += k
            bar.update(rows.stop - rows.start)
            yield rows, torch.cat(chunks, 0)
        bar.close()


class IWAE_ELBO(ELBO):
    """Negative importance-weighted bound -Σ_n L_K(x_n), K = ``num_particles`` (vectorised).

    Usable with :class:`pyro.infer.SVI` and as ``differentiable_loss`` for a torch optimiser. Gradients
    need a fully reparameterised guide. ``num_particles=1`` is the ELBO with Monte Carlo KL.

    :param int num_particles: K, the number of importance samples per data point.
    :param str data_plate: the plate whose dimension indexes data points.
    """

    def __init__(
        self, num_particles: int = 5, data_plate: str = "data", max_plate_nesting: int | None = None
    ) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles (K) must be a positive int, got {num_particles!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=True)
        self.data_plate = data_plate
        self._plate_nesting = max_plate_nesting

    def _get_trace(self, model, guide, args, kwargs):  # required by ELBO; not used
        raise NotImplementedError

    def _bound(self, model, guide, args, kwargs) -> torch.Tensor:
        if self._plate_nesting is None:
            self._plate_nesting = max_plate_nesting(model, guide, *args, **kwargs)
        log_w, scale = log_importance_weights(
            model,
            guide,
            *args,
            num_samples=self.num_particles,
            data_plate=self.data_plate,
            plate_nesting=self._plate_nesting,
            **kwargs,
        )
        return (scale * log_mean_exp(log_w, 0)).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of -Σ_n L_K(x_n) (a float)."""
        with torch.no_grad():
            loss = -self._bound(model, guide, args, kwargs).item()
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-Σ_n L_K(x_n) as a differentiable tensor (path-wise gradients)."""
        self._check_reparameterised(guide, args, kwargs)
        loss = -self._bound(model, guide, args, kwargs)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()

    def _check_reparameterised(self, guide, args, kwargs) -> None:
        if getattr(self, "_checked", False):
            return
        with poutine.block(), torch.no_grad():
            trace = prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))
        bad = [
            name
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample
        ]
        if bad:
            raise ValueError(
                f"IWAE_ELBO gradients need a reparameterised guide; these sites have no rsample: {bad}. "
                "Use PathwiseKL_ELBO (score-function terms) for discrete latents."
            )
        self._checked = True
