"""The diffusion bound with the time step subsampled: one KL term per data point and update instead of T.

Sohl-Dickstein et al. (2015), "Deep unsupervised learning using nonequilibrium thermodynamics", and Ho et al.
(2020), "Denoising diffusion probabilistic models", Eq. 5; in the terms of Bachman & Precup (2015), "Data
generation as sequential decision making", Eq. 9 and 17, this is the path-wise KL of a fixed noising guide
against a learned denoising model (:mod:`ppl_models.diffusion`), with time running the other way from Eq. 9.
The full-path bound of a data point x_0 is::

    −ELBO(x_0) = L_T + Σ_{t=2}^{T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || p(x_T)),
    L_{t-1} = E_{q(x_t | x_0)} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),
    L_0     = E_{q(x_1 | x_0)} [−log p(x_0 | x_1)].

:class:`inference.PathwiseKL_ELBO` on the model/guide pair evaluates it along one whole sampled path (T
sites, the exact full-path estimator, for evaluation). Because q(x_t | x_0) is closed form, each L_{t-1} can
be estimated on its own: :class:`SubsampledDiffusionELBO` draws t ~ U{2..T} per data point,
x_t ~ q(x_t | x_0), and returns

    L_T + (T − 1) · KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) + (−log p(x_0 | x_1)),  x_1 ~ q(x_1 | x_0),

whose expectation over t and the draws is exactly the full-path bound (so it is an unbiased estimate of it,
noisier per draw), at the cost of two network evaluations instead of T. (Ho et al. fold L_0 into the draw of
t ~ U{1..T}; keeping it apart, as here, gives the same expectation.)

With ``time_steps="all"`` the estimator visits every t = 2..T instead (one draw of x_t ~ q(x_t | x_0) each,
independent across t): the exact full-path bound in expectation with the expectation over t taken exactly —
the evaluation estimator (T network calls per image).

Symbols to code: the model/guide pair (:class:`ppl_models.diffusion.DiffusionPair`: Bernoulli or Gaussian)
must provide ``num_steps`` (T), ``q_sample(x_0, t)`` (a draw of x_t), ``step_kl(x_t, x_0, t)`` (the
analytic KL of step t per data point, t an int or one step per row), ``prior_kl(x_0)`` (L_T) and
``decoder_nll(x_1, x_0)`` (−log p(x_0 | x_1)).
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.infer import ELBO


class SubsampledDiffusionELBO(ELBO):
    """Negative ELBO of a diffusion pair with one time step per data point (see the module docstring).

    Use it where an ELBO goes (:class:`inference.Trainer`, ``SVI``): it reads the pair from the bound
    ``model`` method (``model.__self__``) and ignores ``guide``, which is the fixed noising process. Summed
    over the batch, as every loss of this library.
    """

    def __init__(self, time_steps: str = "sample") -> None:
        super().__init__(num_particles=1)
        if time_steps not in ("sample", "all"):
            raise ValueError(f"time_steps must be 'sample' (t ~ U{{2..T}}, training) or 'all' (every t, "
                             f"evaluation), got {time_steps!r}")
        self.time_steps = time_steps

    def _get_trace(self, model: Any, guide: Any, args: Any, kwargs: Any):
        raise NotImplementedError("SubsampledDiffusionELBO computes its terms in closed form, without traces")

    #: what the pair must provide
    needed: tuple[str, ...] = ("num_steps", "q_sample", "step_kl", "prior_kl", "decoder_nll",
                               "register_params")

    def _pair(self, model: Any) -> Any:
        pair = getattr(model, "__self__", None)
        if pair is None or not all(hasattr(pair, n) for n in self.needed):
            raise TypeError(f"{type(self).__name__} needs the bound model method of a diffusion pair "
                            f"providing {list(self.needed)} (e.g. BernoulliDiffusion(...).model)")
        return pair

    def per_datum(self, model: Any, guide: Any, x: torch.Tensor) -> torch.Tensor:
        """One draw of the estimator's −ELBO per data point, (N,), differentiable."""
        pair = self._pair(model)
        pair.register_params()
        T = pair.num_steps
        total = pair.prior_kl(x) + pair.decoder_nll(pair.q_sample(x, 1), x)
        if T < 2:
            return total
        if self.time_steps == "all":
            for t in range(2, T + 1):
                total = total + pair.step_kl(pair.q_sample(x, t), x, t)
            return total
        t = torch.randint(2, T + 1, (x.shape[0],), device=x.device)  # one step per data point
        return total + (T - 1) * pair.step_kl(pair.q_sample(x, t), x, t)

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.per_datum(model, guide, *args).sum()

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args))

    def loss_and_grads(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args)
        loss.backward()
        return float(loss.detach())
