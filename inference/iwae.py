"""Importance-weighted bound IWAE-K, vectorised over particles, per data point.

Burda, Grosse & Salakhutdinov (2016); Mohamed & Lakshminarayanan (2016, tutorial, importance sampling
and variational bounds). For each data point x_n and K samples z^(k) ~ q(z | x_n)::

    log w_k  = log p(x_n, z^(k)) - log q(z^(k) | x_n)
    L_K(x_n) = E[ log (1/K) Σ_k w_k ]  <=  log p(x_n)

L_1 is the ELBO, L_K does not decrease with K and tends to log p(x_n) as K -> inf. The loss is
-Σ_n L_K(x_n) (times the plate's scale when subsampling).

"Per data point" is defined by a plate, ``data_plate``: its dimension indexes data points, and every
other batch dimension is summed into the log weight. By default (``data_plate="auto"``) it is inferred from
the trace: the outermost vectorised plate that all observed sites of the model share. ``data_plate=None``
treats the whole batch as one data point (one log weight per particle); a name must be a vectorised plate of
the model. No shared plate, a name that matches no plate, or shared plates nested differently at different
sites is an error that names the plates found and the argument to pass. Every sample site (latent or
observed, model or guide) must sit inside the data plate, or the weights do not split per data point. The
K particles live in an extra plate (``"iw_particles"``) to the left of all the model's plates, so the model
and guide must broadcast as Pyro models do (the requirement of ``vectorize_particles=True``); a model that
does not is reported as such. Every model latent needs a guide site (its proposal) and every guide latent
a model density: a model latent the guide does not sample, or an auxiliary guide latent, is an error, since
log p - log q is then no importance weight (with an auxiliary variable of C states, E[w] = C·p(x)). Guide
``pyro.factor`` terms enter with -log q, as in Trace_ELBO; ``pyro.deterministic`` records are skipped.

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
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import warn_if_nan

from inference.pathwise_kl_elbo import same_factor
from ppl_models.policy_parts import guide_model_pair

PARTICLE_PLATE = "iw_particles"


def max_plate_nesting(model, guide, *args, **kwargs) -> int:
    """Number of plate dimensions used by a model/guide pair (one untraced run of each)."""
    with poutine.block(), torch.no_grad(), guide_model_pair():
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


AUTO = "auto"  # data_plate: infer the plate that indexes data points from the trace


def _vectorised_frames(site: dict) -> list:
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE]


def _scored(site: dict) -> bool:
    """A sample site that enters the weights: not a plate's subsample site, not a ``pyro.deterministic``
    record (Pyro stores those as observed sites whose log-density is 0)."""
    return (site["type"] == "sample" and not site_is_subsample(site)
            and not site["infer"].get("_deterministic"))


def infer_data_plate(model_trace) -> str:
    """The outermost vectorised plate shared by every observed site of ``model_trace`` (see module doc)."""
    observed = {
        name: [f.name for f in _vectorised_frames(site)]
        for name, site in model_trace.nodes.items()
        if _scored(site) and site["is_observed"]
    }
    if not observed:
        raise ValueError("importance weights need an observed site in the model (obs=...); found none")
    plates = sorted({p for stack in observed.values() for p in stack})
    shared = [p for p in next(iter(observed.values())) if all(p in stack for stack in observed.values())]
    if not shared:
        where = ", ".join(f"{name!r} in {stack}" for name, stack in observed.items())
        sequential = sorted({f.name for site in model_trace.nodes.values() if site["type"] == "sample"
                             for f in site["cond_indep_stack"] if not f.vectorized})
        raise ValueError(
            f"cannot infer which plate indexes data points: no vectorised plate is shared by all observed "
            f"sites ({where}). Pass data_plate='<plate name>' (vectorised plates found: {plates}"
            + (f"; sequential plates {sequential} cannot index data points" if sequential else "")
            + "), or data_plate=None to treat the whole batch as one data point."
        )
    orders = {tuple(p for p in stack if p in shared) for stack in observed.values()}
    if len(orders) > 1:
        raise ValueError(
            f"cannot infer which plate indexes data points: the observed sites share plates {shared} but "
            f"nest them in different orders {sorted(orders)}. Pass data_plate='<plate name>' or None."
        )
    return shared[0]


def _check_data_plate(model_trace, data_plate: str) -> None:
    frames = {
        f.name: f.vectorized
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.name != PARTICLE_PLATE
    }
    if data_plate not in frames:
        raise ValueError(
            f"data_plate={data_plate!r} names no plate of the model; plates found: {sorted(frames)}. Pass "
            f"one of them, data_plate='auto' to infer it, or data_plate=None for one data point per batch."
        )
    if not frames[data_plate]:
        raise ValueError(
            f"data_plate={data_plate!r} is a sequential plate (`for i in pyro.plate(...)`); importance "
            f"weights per data point need a vectorised plate (`with pyro.plate(...)`)."
        )


def _data_dim(site: dict, data_plate: str | None) -> int | None:
    for frame in site["cond_indep_stack"]:
        if frame.name == data_plate:
            return frame.dim
    return None


def log_importance_weights(
    model,
    guide,
    *args,
    num_samples: int,
    data_plate: str | None = AUTO,
    plate_nesting: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """Log importance weights log p(x, z) - log q(z | x), shape (num_samples, N), and the plate scale.

    Differentiable when gradients are enabled (reparameterised guides). N is the size of the data plate
    (``"auto"``: inferred, see the module docstring; ``None``: N = 1, the whole batch is one data point).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if plate_nesting is None:
        plate_nesting = max_plate_nesting(model, guide, *args, **kwargs)
    nesting = plate_nesting + 1
    particles = pyro.plate(PARTICLE_PLATE, num_samples, dim=-nesting)
    try:
        with guide_model_pair():  # the model takes p's writer path from the guide (SharedPath)
            guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(particles(model), trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    except (RuntimeError, ValueError) as e:
        if not any(w in str(e).lower() for w in ("shape", "size", "broadcast", "dimension", PARTICLE_PLATE)):
            raise
        raise ValueError(
            f"the model/guide pair could not run with {num_samples} importance samples vectorised in an "
            f"extra plate at dim {-nesting} (left of its {plate_nesting} plate dim(s)): every batch dim "
            f"of a site must be declared with pyro.plate (or moved into the event with .to_event()) so that "
            f"sites broadcast over that plate, as for vectorize_particles=True. The error was: {e}"
        ) from e
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)

    model_latent = {n for n, s in model_trace.nodes.items() if _scored(s) and not s["is_observed"]}
    missing = [n for n in model_latent if n not in guide_trace.nodes]
    if missing:
        raise ValueError(
            f"model latent site(s) {missing} are not sampled by the guide: an importance weight needs a "
            f"proposal density for every latent. Sample them in the guide (or observe them in the model)."
        )
    auxiliary = [n for n, s in guide_trace.nodes.items()
                 if _scored(s) and not s["is_observed"] and n not in model_latent]
    if auxiliary:
        raise ValueError(
            f"guide site(s) {auxiliary} are not latents of the model (auxiliary guide variables): the model "
            f"has no density for them, so p/q is no importance weight of p(x) and IWAE-K would not bound "
            f"log p(x) (it grows without limit in K). Marginalise them out of the guide, or train with "
            f"PathwiseKL_ELBO / Trace_ELBO."
        )
    if data_plate == AUTO:
        data_plate = infer_data_plate(model_trace)
    elif data_plate is not None:
        _check_data_plate(model_trace, data_plate)

    terms: list[tuple[torch.Tensor, int | None, str]] = []
    scales = []
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for name, site in trace.nodes.items():
            # Every guide site enters with -log q (guide-side pyro.factor terms included), as in Trace_ELBO.
            if not _scored(site):
                continue
            lp = scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])
            if lp.dim() > nesting:
                raise ValueError(
                    f"site {name!r} has batch shape {tuple(lp.shape)} with more dims than its plates "
                    f"({nesting} incl. particles); declare every batch dim with pyro.plate or .to_event()"
                )
            lp = lp.reshape((1,) * (nesting - lp.dim()) + lp.shape)
            terms.append((sign * lp, _data_dim(site, data_plate), name))
            scales.append((name, site["scale"]))

    outside = list(dict.fromkeys(name for _, d, name in terms if d is None))
    if data_plate is not None and outside:
        raise ValueError(
            f"importance weights per data point need every sample site inside pyro.plate({data_plate!r}); "
            f"these are not: {outside}. Pass data_plate=None to treat the whole batch as one data point."
        )
    scale = scales[0][1] if scales else 1.0
    differ = [f"{name!r}: {s}" for name, s in scales if not same_factor(s, scale)]
    if differ:
        raise ValueError(
            f"importance weights need one poutine.scale factor shared by every site (it multiplies the "
            f"bound outside the log-mean-exp); {scales[0][0]!r} has {scale} but " + ", ".join(differ)
        )

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
    data_plate: str | None = AUTO,
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
            lw = torch.cat(chunks, 0)
            if lw.shape[1] != rows.stop - rows.start:
                raise ValueError(
                    f"a batch of {rows.stop - rows.start} rows of the data gave {lw.shape[1]} importance "
                    f"weights per sample: data sets are split along their first dimension, so the data plate "
                    f"(data_plate={data_plate!r}) must index dim 0 of the data, one data point a row. Pass "
                    f"data_plate='<the plate over rows>', or put the data points first."
                )
            bar.update(rows.stop - rows.start)
            yield rows, lw
        bar.close()


class IWAE_ELBO(ELBO):
    """Negative importance-weighted bound -Σ_n L_K(x_n), K = ``num_particles`` (vectorised).

    Usable with :class:`pyro.infer.SVI` and as ``differentiable_loss`` for a torch optimiser. Gradients
    need a fully reparameterised guide. ``num_particles=1`` is the ELBO with Monte Carlo KL.

    :param int num_particles: K, the number of importance samples per data point.
    :param data_plate: the plate whose dimension indexes data points: ``"auto"`` (default) infers it
        from the trace, ``None`` makes the whole batch one data point (see the module docstring).
    """

    def __init__(
        self, num_particles: int = 5, data_plate: str | None = AUTO, max_plate_nesting: int | None = None
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
        if is_validation_enabled():  # reads the value back: not in the training step (nor in a CUDA graph)
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
            if site["type"] == "sample" and not site["fn"].has_rsample
            # latents, and guide-side pyro.factor terms that came from non-reparameterised sampling
            and (not site["is_observed"] or site["infer"].get("is_auxiliary"))
        ]
        if bad:
            raise ValueError(
                f"IWAE_ELBO gradients need a reparameterised guide; these sites have no rsample: {bad}. "
                "Use PathwiseKL_ELBO (score-function terms) for discrete latents."
            )
        self._checked = True
