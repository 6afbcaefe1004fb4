"""The guided-policy-search objective: path-wise KL with analytic one-step KLs.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 2.1-2.2 and 3, Eqs. 2, 5,
16, 17. A guide policy q, which sees privileged information (the data x*, or the missing values x_u),
produces a trajectory z_1..z_T; the primary policy p is trained to imitate it by minimising::

    L(p, q) = E_q[ cost(τ) ] + KL( q(τ | x) || p(τ) )
            = E_q[ -log p(x | z_{1:T}) ]
              + Σ_t E_{q(z_{<t}|x)}[ KL( q_t(z_t | z_{<t}, x) || p_t(z_t | z_{<t}) ) ]

which is the negative ELBO. The path-wise KL is a sum of one-step KLs taken *along a sampled path*: the
history z_{<t} is one sample from the guide, and the one-step KL given that history is computed in closed
form wherever ``torch.distributions.kl_divergence`` knows the pair (partial Rao-Blackwellisation, paper
Sec. 9.1). This is unbiased for the ELBO and its gradient even when the prior p(z_t | z_{<t}) depends on
earlier samples, because each one-step KL is the exact conditional expectation of
log q_t(z_t) - log p_t(z_t) given the sampled history.

Symbols to code: p -> ``model``, q -> ``guide``, z_t -> sample sites ``z_t``, cost(τ) = -log p(x | ·) ->
the observed site(s) of the model (``obs=``, masked with ``.mask()`` / ``poutine.mask`` to the missing
values for imputation), T -> the number of latent sites.

Estimator, per particle::

    elbo = Σ_observed log p(x)                                  (scaled and masked)
         - Σ_latent  KL(q_t || p_t)         where the pair has a registered KL
         + Σ_latent  log p_t(z_t) - log q_t(z_t)   elsewhere (Monte Carlo)

Sites whose guide distribution has no ``rsample`` get a score-function term, whose cost is every term
that depends on the site's sample (Pyro's plate-aware downstream log-ratio, as in
:class:`pyro.infer.Trace_ELBO`, minus the site's own term where its KL is analytic, since that term no
longer depends on the sample).
"""

from __future__ import annotations

import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.trace_elbo import Trace_ELBO, _compute_log_r
from pyro.infer.util import torch_item
from pyro.poutine.trace_struct import Trace
from pyro.util import warn_if_nan
from torch.distributions import kl_divergence


def _combined_mask(model_site: dict, guide_site: dict) -> torch.Tensor | bool | None:
    """A latent term counts where both the model's and the guide's masks let it through."""
    m, g = model_site["mask"], guide_site["mask"]
    if m is None:
        return g
    if g is None:
        return m
    return m & g


def analytic_kl(model_site: dict, guide_site: dict) -> torch.Tensor | None:
    """Scaled, masked one-step KL(q_t || p_t) with the site's batch shape, or None if not registered."""
    try:
        kl = kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    if not torch.is_tensor(kl):  # a constant KL (e.g. identical fixed distributions)
        kl = torch.full(guide_site["fn"].batch_shape, float(kl))
    return scale_and_mask(kl, scale=guide_site["scale"], mask=_combined_mask(model_site, guide_site))


class PathwiseKL_ELBO(Trace_ELBO):
    """Negative ELBO with analytic one-step KLs along a sampled guide path (Bachman & Precup 2015, Eq. 17).

    Use it as any Pyro ELBO: ``SVI(model, guide, optim, PathwiseKL_ELBO())``, or
    ``PathwiseKL_ELBO().differentiable_loss(model, guide, *args)`` as a loss for a torch optimiser.
    ``num_particles`` and ``vectorize_particles`` work as in :class:`pyro.infer.Trace_ELBO` (with
    vectorised particles, give ``max_plate_nesting`` or let it be guessed once).

    :param bool analytic: use registered KLs (default). ``False`` gives the plain Monte Carlo
        :class:`~pyro.infer.Trace_ELBO` value with this class's code path, useful for comparisons.
    """

    def __init__(self, *args, analytic: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.analytic = analytic

    def _latent_terms(self, model_trace: Trace, guide_trace: Trace):
        """Yield (name, value, surrogate, is_analytic) per latent site, each with the site's batch shape."""
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample" or model_site["is_observed"]:
                continue
            guide_site = guide_trace.nodes[name]
            kl = analytic_kl(model_site, guide_site) if self.analytic else None
            if kl is not None:
                yield name, -kl, -kl, True
            else:
                # Value: the sampled log-ratio. Surrogate: as Trace_ELBO, the guide enters through its
                # entropy term (log q if reparameterised, 0 if the score function carries it).
                value = model_site["log_prob"] - guide_site["log_prob"]
                surrogate = model_site["log_prob"] - guide_site["score_parts"].entropy_term
                yield name, value, surrogate, False

    def _differentiable_loss_particle(self, model_trace: Trace, guide_trace: Trace):
        elbo = surrogate = 0.0
        analytic_sites = set()
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and site["is_observed"]:
                elbo = elbo + site["log_prob_sum"]
                surrogate = surrogate + site["log_prob_sum"]
        for name, value, surr, is_analytic in self._latent_terms(model_trace, guide_trace):
            elbo = elbo + value.sum()
            surrogate = surrogate + surr.sum()
            if is_analytic:
                analytic_sites.add(name)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and name not in model_trace.nodes:  # auxiliary guide site
                elbo = elbo - site["log_prob_sum"]
                surrogate = surrogate - site["score_parts"].entropy_term.sum()

        log_r = None
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            score = site["score_parts"].score_function
            if is_identically_zero(score):
                continue
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            cost = log_r.sum_to(site["cond_indep_stack"])
            if name in analytic_sites:
                # The analytic KL of this site does not depend on its own sample.
                own = model_trace.nodes[name]["log_prob"] - site["log_prob"]
                cost = cost - own.detach()
            surrogate = surrogate + (cost * score).sum()

        loss = -torch_item(elbo) if not torch._C._get_tracing_state() else -elbo.detach()
        return loss, -surrogate

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

        Returns ``{"kl/z_t": KL or log-ratio term (positive = cost), "cost/x": -log p(x)}``, each summed
        over everything but the particle dimension and divided by the number of particles; with analytic
        KLs these are the per-step KL curves of the paper's figures.
        """
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                for name, value, _, _ in self._latent_terms(model_trace, guide_trace):
                    out[f"kl/{name}"] = out.get(f"kl/{name}", 0.0) - value.sum() / self.num_particles
                for name, site in model_trace.nodes.items():
                    if site["type"] == "sample" and site["is_observed"]:
                        val = -site["log_prob_sum"] / self.num_particles
                        out[f"cost/{name}"] = out.get(f"cost/{name}", 0.0) + val
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
                for site in model_trace.nodes.values():
                    if site["type"] == "sample" and site["is_observed"]:
                        total = total + fold(site["log_prob"])
                for _, value, _, _ in self._latent_terms(model_trace, guide_trace):
                    total = total + fold(value)
                return total
        raise RuntimeError("no trace was produced")

