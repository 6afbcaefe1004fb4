"""The guided-policy-search objective: path-wise KL with analytic one-step KLs.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.1-2.2 and 3, Eqs. 2, 5,
6, 16, 17. A guide policy q, which sees privileged information (the data x*, or the missing values x_u),
produces a trajectory z_1..z_T; the primary policy p is trained to imitate it by minimising (Eq. 17)::

    L(p, q) = E_q[ cost(τ) ] + KL( q(τ | x) || p(τ) )
            = E_q[ -log p(x | z_{1:T}) ]
              + Σ_t E_{q(z_{<t}|x)}[ KL( q_t(z_t | z_{<t}, x) || p_t(z_t | z_{<t}) ) ]

which is the negative ELBO. The path-wise KL is a sum of one-step KLs taken *along a sampled path*: the
history z_{<t} is one sample from the guide, and the one-step KL given that history is computed in closed
form wherever ``torch.distributions.kl_divergence`` knows the pair (partial Rao-Blackwellisation, paper
Sec. 9.1).

**When the one-step KL may be analytic (the validity condition).** Eq. 6 writes both policies in one
order, t = 0..T, so the history z_{<t} that q_t conditions on contains everything p_t conditions on. The
analytic term KL(q_t(· | h_t) || p_t(· | pa_p(z_t))), with h_t the guide's history when it samples z_t and
pa_p(z_t) the model's parents of z_t, equals the conditional expectation of the sampled log-ratio
log q_t(z_t | h_t) - log p_t(z_t | pa_p(z_t)) given h_t **if pa_p(z_t) ⊆ h_t**: every model parent of
z_t has been sampled by the guide *before* z_t. When a parent is sampled after z_t (and from it), the
KL is evaluated at a parent value that already depends on z_t and the estimate is biased: for the model
x ~ N(0, 1), y | x ~ N(x, 1), o | y ~ N(y, 1) (o observed) and the guide y ~ N(a, s²), x | y ~ N(b y + c,
t²), the bias is b s² nats. Guides that run in another order than their model (a heating guide against a
cooling model, a noising guide written in forward time against a denoising model) are exactly this case.

How it is checked, here: conservatively, by **order**. Every model latent that the model samples before
z_t counts as a possible parent of z_t (it may reach p_t through any computation), so z_t's KL is analytic
only if the guide samples all of those before z_t. The check needs no dependency tracking (which can lose
edges through ``.item()`` or Python control flow, and so could wrongly approve a site); its price is that a
guide that reorders latents the model treats as independent loses Rao-Blackwellisation at those sites. It
is computed once per model/guide structure (the sequences of site names of both traces) and cached, so a
training step only collects the two name sequences and looks them up (well under a millisecond, against
tens to hundreds of milliseconds for the networks of a step); it runs whether or not Pyro's validation is
enabled. A model latent that the guide does not sample is drawn by the model after the guide has run, from
its own model parents, so it depends on z_t only through parents that the check already covers: it never
counts as late. A site that
fails it falls back to the Monte Carlo log-ratio (always unbiased) and a warning names the site and the
parent, once per objective; ``strict=True`` raises instead. :meth:`PathwiseKL_ELBO.kl_report` says, per
site, which kind of term it gets and why.

Symbols to code: p -> ``model``, q -> ``guide``, z_t -> sample sites ``z_t``, h_t -> the guide's sites
before ``z_t`` in its trace, pa_p(z_t) -> the model's latent sites before ``z_t`` in its trace,
cost(τ) = -log p(x | ·) -> the observed site(s) of the model (``obs=``, masked with ``.mask()`` /
``poutine.mask`` to the missing values for imputation), T -> the number of latent sites.

Estimator, per particle::

    elbo = Σ_observed log p(x)                                  (scaled and masked)
         - Σ_latent  KL(q_t || p_t)         where the pair has a registered KL and the condition holds
         + Σ_latent  log p_t(z_t) - log q_t(z_t)   elsewhere (Monte Carlo)
         - Σ_guide-only log q(·)            auxiliary guide sites and guide-side ``pyro.factor``

Sites whose guide distribution has no ``rsample`` get a score-function term, whose cost is every term
that depends on the site's sample (Pyro's plate-aware downstream log-ratio, as in
:class:`pyro.infer.Trace_ELBO`, minus the site's own term where its KL is analytic, since that term no
longer depends on the sample).

**Which densities are computed.** Pyro's Trace_ELBO computes log p and log q at every site before it sums.
Here, with Pyro's validation off (the Trainer's training step), the traces are taken without densities and
each is computed where a term reads it (:func:`compute_densities`, Pyro's own code per site): an analytic
site whose guide distribution has no score function (``rsample`` at every level down to Pyro's default
``score_parts``, :func:`no_score_function`) enters through its KL alone, so neither its log p nor its log q
is computed, which in a sequential model is most of the sites; where any guide site has a score function,
every density is computed, since its cost reads them all. With validation on (Pyro's checks read every
density) it is Trace_ELBO's trace. Values and gradients are the same either way (float64 tests).

Everything else behaves as :class:`pyro.infer.Trace_ELBO` does: guide-only sites (``infer={"is_auxiliary":
True}``, ``pyro.factor`` with or without ``has_rsample``) enter with -log q and, without ``rsample``, a
score-function term; a model latent the guide does not sample is drawn from the model's own conditional and
contributes its log p (Trace_ELBO's value), with Pyro's warning "Found vars in model but not guide" —
``strict=True`` raises instead, since that value is not the ELBO of any guide.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
from pyro import poutine
from pyro.distributions import MaskedDistribution
from pyro.distributions.distribution import Distribution
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.trace_elbo import Trace_ELBO
from pyro.infer.util import MultiFrameTensor, get_plate_stacks, is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import warn_if_nan
from torch.distributions import Independent, kl_divergence

from ppl_models.policy_parts import guide_model_pair


class PathwiseKLValidityError(ValueError):
    """A site's analytic KL would be biased (or a model latent has no guide site) and ``strict=True``."""


@dataclass(frozen=True)
class SiteKind:
    """How one model latent enters :class:`PathwiseKL_ELBO`: ``kind`` is ``"analytic"`` (closed-form KL),
    ``"monte-carlo"`` (sampled log-ratio) or ``"model-only"`` (no guide site); ``reason`` says why."""

    kind: str
    reason: str
    late_parents: tuple[str, ...] = ()


def _dist_masks(fn) -> list:
    """The masks set with ``.mask()`` on a distribution, outermost first (through ``.to_event()``)."""
    masks = []
    while True:
        if isinstance(fn, MaskedDistribution):
            masks.append(fn._mask)
        elif not isinstance(fn, Independent):
            return masks
        fn = fn.base_dist


def same_factor(a, b) -> bool:
    """Whether two scale or mask values (numbers, bools, tensors, None) are the same factor."""
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def same_weighting(model_site: dict, guide_site: dict) -> bool:
    """Whether log p and log q of a site carry the same scale and masks (site- and distribution-level).

    Only then is E_q[s·m·(log q - log p)] the scaled, masked KL: with a mask or scale on one side only,
    Trace_ELBO's value keeps the other side's term (e.g. -log q where only the model is masked), which no
    KL gives, so such a site is Monte Carlo. A site mask of None and of True are the same (no mask).
    """
    if not same_factor(model_site["scale"], guide_site["scale"]):
        return False
    if not same_factor(_no_none(model_site["mask"]), _no_none(guide_site["mask"])):
        return False
    pm, qm = _dist_masks(model_site["fn"]), _dist_masks(guide_site["fn"])
    return len(pm) == len(qm) and all(same_factor(a, b) for a, b in zip(pm, qm, strict=True))


def _no_none(mask):
    return True if mask is None else mask


def analytic_kl(model_site: dict, guide_site: dict) -> torch.Tensor | None:
    """Scaled, masked one-step KL(q_t || p_t) with the site's batch shape, or None if not registered.

    This is only the closed form, with the guide site's scale and mask: whether it may replace the sampled
    log-ratio is the validity condition of the module docstring and :func:`same_weighting`, which
    :class:`PathwiseKL_ELBO` checks.
    """
    try:
        kl = kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    if not torch.is_tensor(kl):  # a constant KL (e.g. identical fixed distributions)
        kl = torch.full(guide_site["fn"].batch_shape, float(kl))
    return scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])


#: Pyro's ``score_parts`` implementations whose score function is identically 0 when ``has_rsample`` holds at
#: every level: the default one, and the mask and expand wrappers', which defer to their base distribution.
_DEFAULT_SCORE_PARTS = (
    Distribution.score_parts, MaskedDistribution.score_parts, ExpandedDistribution.score_parts)
_WRAPPERS = (MaskedDistribution, ExpandedDistribution, Independent)


def no_score_function(fn: Distribution) -> bool:
    """Whether Pyro's ``fn.score_parts`` has a score function that is identically 0, decided without
    computing it: ``rsample`` at every level of mask, expand and independent wrappers, down to a distribution
    with Pyro's default ``score_parts``. ``False`` where unsure (a partially reparameterised distribution with
    its own ``score_parts``, such as ``pyro.distributions.Rejector``), which only costs a density."""
    while fn.has_rsample and type(fn).score_parts in _DEFAULT_SCORE_PARTS:
        if not isinstance(fn, _WRAPPERS):
            return True
        fn = fn.base_dist
    return False


def compute_densities(model_trace: Trace, guide_trace: Trace, skip: frozenset[str] = frozenset()) -> None:
    """Pyro's densities of every sample site but those named in ``skip``: ``log_prob`` in the model trace,
    ``score_parts`` (hence ``log_prob``) in the guide trace, as ``pyro.infer.enum.get_importance_trace``
    computes them (with Pyro's own code, its error messages and NaN checks). Memoised per site, so a site
    computed already is left as it is and a later call without ``skip`` completes the traces."""
    model_trace.compute_log_prob(site_filter=lambda name, site: name not in skip)
    view = Trace(graph_type=guide_trace.graph_type)  # the guide's sites but the skipped (the same dicts)
    view.nodes.update((name, site) for name, site in guide_trace.nodes.items() if name not in skip)
    view.compute_score_parts()


def _sample_names(trace: Trace, latent_only: bool) -> tuple[str, ...]:
    return tuple(
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site_is_subsample(site)
        and not (latent_only and site["is_observed"])
    )


def late_parents(model_latents: tuple[str, ...], guide_sites: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The order check: for each model latent the guide samples, the possible model parents it samples later.

    ``model_latents`` are the model's latent sites in the model's order, ``guide_sites`` the guide's sample
    sites in the guide's order. A possible parent of z_t is any model latent sampled before z_t by the
    model; it is *late* if the guide samples it after z_t. A model latent that the guide does not sample is
    never late (the model draws it from its own parents, see the module docstring) and has no entry.
    """
    guide_pos = {name: i for i, name in enumerate(guide_sites)}
    out = {}
    for i, name in enumerate(model_latents):
        if name in guide_pos:
            at = guide_pos[name]
            out[name] = tuple(p for p in model_latents[:i] if guide_pos.get(p, -1) > at)
    return out


@lru_cache(maxsize=256)
def _structure_of(model_latents: tuple[str, ...], guide_sites: tuple[str, ...]):
    """(late parents per site, model latents missing from the guide) of one model/guide structure."""
    return late_parents(model_latents, guide_sites), frozenset(model_latents) - frozenset(guide_sites)

def _log_r(model_trace: Trace, guide_trace: Trace) -> MultiFrameTensor:
    """Trace_ELBO's plate-aware log p - log q per site (detached), for score-function costs; a model latent
    without a guide site contributes its log p alone (where Pyro's version raises a KeyError)."""
    log_r = MultiFrameTensor()
    stacks = get_plate_stacks(model_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample":
            term = site["log_prob"]
            if not site["is_observed"] and name in guide_trace.nodes:
                term = term - guide_trace.nodes[name]["log_prob"]
            log_r.add((stacks[name], term.detach()))
    return log_r


def _sum(x: torch.Tensor | float) -> torch.Tensor | float:
    return x.sum() if torch.is_tensor(x) else x


class PathwiseKL_ELBO(Trace_ELBO):
    """Negative ELBO with analytic one-step KLs along a sampled guide path (Bachman & Precup 2015, Eq. 17).

    Use it as any Pyro ELBO: ``SVI(model, guide, optim, PathwiseKL_ELBO())``, or
    ``PathwiseKL_ELBO().differentiable_loss(model, guide, *args)`` as a loss for a torch optimiser.
    ``num_particles`` and ``vectorize_particles`` work as in :class:`pyro.infer.Trace_ELBO` (with
    vectorised particles, give ``max_plate_nesting`` or let it be guessed once).

    A site's KL is analytic only where the validity condition of the module docstring holds (the guide
    samples every possible model parent of the site before it); elsewhere the site gets the Monte Carlo
    log-ratio and a warning, once per site. :meth:`kl_report` lists each site's kind.

    :param bool analytic: use registered KLs (default). ``False`` gives the plain Monte Carlo
        :class:`~pyro.infer.Trace_ELBO` value with this class's code path, useful for comparisons.
    :param bool strict: raise :class:`PathwiseKLValidityError` instead of warning, where a registered KL
        fails the validity condition or a model latent has no guide site.
    :param bool every_density: compute every site's density, as Trace_ELBO does, instead of only those the
        estimator reads (:meth:`_get_trace`). The value and gradients are the same; it costs time, and
        exists to measure that in a benchmark.
    """

    def __init__(self, *args, analytic: bool = True, strict: bool = False, every_density: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.analytic = analytic
        self.strict = strict
        self.every_density = every_density
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ the validity condition
    @staticmethod
    def _structure(model_trace: Trace, guide_trace: Trace):
        """(late parents per site, model latents missing from the guide), cached per structure."""
        return _structure_of(_sample_names(model_trace, latent_only=True),
                             _sample_names(guide_trace, latent_only=False))

    def _decide(self, model_site: dict, guide_site: dict, late: tuple[str, ...], check_late: bool):
        """(kind, analytic KL or None) of one model latent the guide samples. Kinds: "analytic", "off"
        (analytic=False), "weighting" (scale or masks differ), "unregistered" (no closed form), "late"
        (a registered KL that fails the order check), "unchecked" (late; registration not looked up)."""
        if not self.analytic:
            return "off", None
        if not same_weighting(model_site, guide_site):
            return "weighting", None
        if late:
            if not check_late:
                return "unchecked", None
            return ("late" if analytic_kl(model_site, guide_site) is not None else "unregistered"), None
        kl = analytic_kl(model_site, guide_site)
        return ("analytic", kl) if kl is not None else ("unregistered", None)

    def _flag(self, name: str, message: str) -> None:
        """Raise (strict) or warn once per site."""
        if self.strict:
            raise PathwiseKLValidityError(message)
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _late_message(self, name: str, parents: tuple[str, ...]) -> str:
        return (
            f"PathwiseKL_ELBO: the analytic KL of site {name!r} would be biased: its possible model "
            f"parent(s) {list(parents)} (sampled before {name!r} by the model) are sampled after it by the "
            f"guide, so KL(q || p) would be taken at parent values that depend on {name!r}. This site uses "
            f"the Monte Carlo log-ratio instead (unbiased, noisier). To keep it analytic, sample "
            f"{list(parents)} before {name!r} in the guide; pass strict=True to make this an error."
        )

    def _missing_message(self, name: str) -> str:
        return (
            f"Found vars in model but not guide: {{{name!r}}}. PathwiseKL_ELBO, like Trace_ELBO, lets the "
            f"model draw {name!r} from its own conditional and counts only log p({name}), which is not the "
            f"ELBO of any guide; sample {name!r} in the guide (or observe it in the model)."
        )

    def kl_report(self, model, guide, *args, **kwargs) -> dict[str, SiteKind]:
        """How each model latent enters the objective, from one trace of ``model`` and ``guide``.

        Returns ``{site: SiteKind(kind, reason, late_parents)}`` with kind ``"analytic"``, ``"monte-carlo"``
        or ``"model-only"``. Raises and warns nothing of its own (Pyro's validation may still warn); useful
        in tests ("no site falls back to Monte Carlo").
        """
        with torch.no_grad():
            model_trace, guide_trace = next(iter(self._get_traces(model, guide, args, kwargs)))
        late, missing = self._structure(model_trace, guide_trace)
        out: dict[str, SiteKind] = {}
        for name in _sample_names(model_trace, latent_only=True):
            if name in missing:
                out[name] = SiteKind("model-only", "no guide site: log p alone, Trace_ELBO's value")
                continue
            model_site, guide_site = model_trace.nodes[name], guide_trace.nodes[name]
            kind, _ = self._decide(model_site, guide_site, late[name], check_late=True)
            if kind == "analytic":
                out[name] = SiteKind("analytic", "registered KL; possible model parents sampled first")
            elif kind == "late":
                why = f"possible model parent(s) {list(late[name])} sampled after it by the guide"
                out[name] = SiteKind("monte-carlo", why, late[name])
            elif kind == "unregistered":
                pair = (type(guide_site["fn"]).__name__, type(model_site["fn"]).__name__)
                out[name] = SiteKind("monte-carlo", f"no registered KL for {pair}")
            elif kind == "weighting":
                out[name] = SiteKind("monte-carlo", "model and guide differ in scale or mask at this site")
            else:
                out[name] = SiteKind("monte-carlo", "analytic=False")
        return out

    # ------------------------------------------------------------------ the terms
    def _terms(self, model_trace: Trace, guide_trace: Trace):
        """Yield ``(key, value, surrogate, is_analytic)`` for every term of one particle's ELBO.

        ``key`` is ``"cost/<name>"`` (observed model sites), ``"kl/<name>"`` (model latents: the analytic
        KL with a minus sign, or the sampled log-ratio) or ``"guide/<name>"`` (guide-only sites, -log q).
        Values and surrogates keep the site's batch shape; a surrogate may be the number 0.
        """
        late, missing = self._structure(model_trace, guide_trace)
        decided = {  # (kind, analytic KL or None) of every model latent the guide samples
            # Only a site that would have been analytic is flagged (once; always when strict).
            name: self._decide(site, guide_trace.nodes[name], late[name],
                               check_late=self.strict or name not in self._warned)
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and name not in missing
        }
        # An analytic site's densities enter neither the value nor the gradient where its guide site has no
        # score function (no cost to multiply), so they are not computed.
        compute_densities(model_trace, guide_trace, frozenset(
            name for name, (_, kl) in decided.items()
            if kl is not None and no_score_function(guide_trace.nodes[name]["fn"])))
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                yield f"cost/{name}", model_site["log_prob"], model_site["log_prob"], False
                continue
            if name in missing:
                self._flag(name, self._missing_message(name))
                yield f"kl/{name}", model_site["log_prob"], model_site["log_prob"], False
                continue
            guide_site = guide_trace.nodes[name]
            kind, kl = decided[name]
            if kind == "late":
                self._flag(name, self._late_message(name, late[name]))
            if kl is not None:
                term = -self._analytic_term(name, kl, guide_site)
                yield f"kl/{name}", term, term, True
            else:
                # Value: the sampled log-ratio. Surrogate: as Trace_ELBO, the guide enters through its
                # entropy term (log q if reparameterised, 0 if the score function carries it).
                value = model_site["log_prob"] - guide_site["log_prob"]
                surrogate = model_site["log_prob"] - guide_site["score_parts"].entropy_term
                yield f"kl/{name}", value, surrogate, False
        for name, site in guide_trace.nodes.items():
            # Guide sites that are no model latent (auxiliary sites, guide factors): -log q, as Trace_ELBO.
            if site["type"] == "sample" and name not in late and not site_is_subsample(site):
                entropy = site["score_parts"].entropy_term
                surrogate = 0.0 if is_identically_zero(entropy) else -entropy
                yield f"guide/{name}", -site["log_prob"], surrogate, False

    def _analytic_term(self, name: str, kl: torch.Tensor, guide_site: dict) -> torch.Tensor:
        """The cost an analytic one-step KL enters the objective with: the KL itself. Variants of the
        objective that reshape the per-example KL (:class:`inference.ork_elbo.OverRegularisedKL_ELBO`)
        override this."""
        return kl

    def _differentiable_loss_particle(self, model_trace: Trace, guide_trace: Trace):
        # Trace_ELBO's contract: (the loss as a number, the surrogate loss). Used by loss_and_grads and loss.
        elbo, surrogate = self._particle(model_trace, guide_trace)
        loss = -torch_item(elbo) if not torch._C._get_tracing_state() else -elbo.detach()
        return loss, surrogate

    def _particle(self, model_trace: Trace, guide_trace: Trace):
        """(ELBO, surrogate loss) of one particle, both left where they were computed (tensors, or the
        number 0 for an empty trace)."""
        elbo = surrogate = 0.0
        analytic_sites = set()
        for key, value, surr, is_analytic in self._terms(model_trace, guide_trace):
            total = value.sum()
            elbo = elbo + total
            surrogate = surrogate + (total if surr is value else _sum(surr))
            if is_analytic:
                analytic_sites.add(key[3:])

        log_r = None
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if "score_parts" not in site:
                if no_score_function(site["fn"]):  # skipped by _terms: it has no score function
                    continue
                compute_densities(model_trace, guide_trace)  # not through _terms: compute them now
            score = site["score_parts"].score_function
            if is_identically_zero(score):
                continue
            if log_r is None:
                compute_densities(model_trace, guide_trace)  # the costs read every site's density
                log_r = _log_r(model_trace, guide_trace)
            cost = log_r.sum_to(site["cond_indep_stack"])
            if name in analytic_sites:
                # The analytic KL of this site does not depend on its own sample.
                own = model_trace.nodes[name]["log_prob"] - site["log_prob"]
                cost = cost - own.detach()
            surrogate = surrogate + (cost * score).sum()

        return elbo, -surrogate

    def _get_trace(self, model, guide, args, kwargs):
        """One guide run and the model's replay of it. The model takes p's writer path from the guide
        instead of computing it again (:class:`ppl_models.policy_parts.SharedPath`). The sites' densities
        are left to :meth:`_terms`, which computes those the estimator reads (:func:`compute_densities`);
        with Pyro's validation on (its checks read every density), a ``GuideMessenger`` guide or
        ``every_density=True``, this is Trace_ELBO's own trace, every density computed."""
        with guide_model_pair():
            if self.every_density or is_validation_enabled() or isinstance(poutine.unwrap(guide), Messenger):
                return super()._get_trace(model, guide, args, kwargs)
            guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace),
                                        graph_type="flat").get_trace(*args, **kwargs)
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative ELBO as a tensor whose gradient is the surrogate's, as
        :meth:`pyro.infer.Trace_ELBO.differentiable_loss` gives it, without reading the value back to the
        host: Trace_ELBO takes ``.item()`` of the surrogate and checks it for NaN every call, which on a GPU
        stalls the step until the device has caught up, and which a CUDA graph cannot capture. The NaN
        check runs while Pyro's validation is enabled; the Trainer checks the loss it steps on anyway."""
        loss = surrogate = 0.0
        n = self.num_particles
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo, surrogate_particle = self._particle(model_trace, guide_trace)
            # One particle: no division (each operation is a kernel launch in a launch-bound GPU step).
            loss = loss - (elbo if n == 1 else elbo / n)
            surrogate = surrogate + (surrogate_particle if n == 1 else surrogate_particle / n)
        if not torch.is_tensor(surrogate):  # nothing depends on a parameter
            surrogate = torch.as_tensor(surrogate)
        if is_validation_enabled():
            warn_if_nan(surrogate, "loss")
        # The value of the loss, the gradient of the surrogate (surrogate - surrogate.detach() is exactly 0).
        value = loss.detach() if torch.is_tensor(loss) else torch.as_tensor(loss, dtype=surrogate.dtype)
        return value + (surrogate - surrogate.detach())

    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of the negative ELBO (a float), averaged over ``num_particles``."""
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_particle, _ = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_particle / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def per_site(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """One sampled path's terms, for diagnostics (no gradients).

        Returns ``{"kl/z_t": KL or log-ratio term (positive = cost), "cost/x": -log p(x)}`` (and
        ``"guide/<name>"``: log q of guide-only sites), each summed over everything but the particle
        dimension and divided by the number of particles; they add up to the loss. With analytic KLs these
        are the per-step KL curves of the paper's figures.
        """
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                for key, value, _, _ in self._terms(model_trace, guide_trace):
                    out[key] = out.get(key, 0.0) - value.sum() / self.num_particles
        return out

    def per_datum(self, model, guide, *args, data_dim: int = 0, **kwargs) -> torch.Tensor:
        """One sampled path's ELBO for every data point, shape (N,), without gradients.

        Every site's term is summed over all dimensions but ``data_dim`` (the data plate's dimension,
        counted from the left of the site's batch shape, 0 for a model with one ``plate("data")``). This is
        the single-sample bound of the paper's test protocol, kept per data point so a table can give a
        standard error over data points; average several calls for a lower-variance bound.
        """
        if self.num_particles != 1:
            raise ValueError(f"per_datum evaluates one path; build the ELBO with num_particles=1, "
                             f"not {self.num_particles}")

        def fold(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[: data_dim + 1] + (-1,)).sum(-1) if t.dim() > data_dim + 1 else t

        with torch.no_grad():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                total = 0.0
                for _, value, _, _ in self._terms(model_trace, guide_trace):
                    total = total + fold(value)
                return total
        raise RuntimeError("no trace was produced")
