"""Imputation as a Markov decision process: the shared Pyro model/guide of the sequential imputers.

Bachman & Precup (2015), "Data generation as sequential decision making", Sec. 3, Eqs. 14-17. For an image
x = [x_u; x_k] and a mask m (1 = known), the primary policy p sees only the known values x_k and chooses
steps z_0..z_T (or z_1..z_T) that refine a canvas c_t of guesses; the cost of a trajectory τ is
−log p(x_u | c_T), the negative log-likelihood of the true missing values under the final guesses σ(c_T).
The guide policy q also sees x_u. Guided policy search minimises (Eq. 16/17)

    E_{x,m} [ E_{q(τ|x_u,x_k)}[ −log p(x_u | c_T) ] + KL(q(τ | x_u, x_k) || p(τ | x_k)) ] ≥ E −log p(x_u|x_k)

Subclasses (:class:`ppl_models.gpsi.GPSI`, :class:`ppl_models.lstm_imputer.LSTMImputer`) implement one
roll-out, ``_roll_out(x, mask, guide)``, which samples the step sites of p (``guide=False``) or of q and
returns the canvases; this class turns it into the Pyro programs: :meth:`model` adds the cost site ``x``
(Bernoulli on σ(c_T), masked with ``.mask()`` to the missing pixels) inside ``plate("data")``, and
:meth:`guide` runs q's roll-out in the same plate. The same site names in both give the path-wise KL of
:class:`inference.pathwise_kl_elbo.PathwiseKL_ELBO` one analytic term per step.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled

from ppl_models.base import ModelGuidePair
from ppl_models.masks import validate_mask
from ppl_models.policy_parts import stack_canvases


class ImputationPolicy(ModelGuidePair):
    """Base class: ``model(x, mask)`` is p with its cost, ``guide(x, mask)`` is q, ``impute`` rolls p out.

    :param name: the name the module's parameters get in Pyro's param store.
    """

    x_dim: int

    def __init__(self, name: str) -> None:
        super().__init__()
        self.param_prefix = name

    def _roll_out(self, x: torch.Tensor, mask: torch.Tensor, guide: bool) -> list[torch.Tensor]:
        raise NotImplementedError

    def _inputs(self, x: torch.Tensor | None, mask: torch.Tensor | None, num: int | None):
        if x is None:
            if num is None or mask is not None:
                raise ValueError("without data x give num_samples, and no mask: p is then unconditional")
            ref = next(self.parameters())
            x = ref.new_zeros(num, self.x_dim)
            return x, torch.zeros_like(x), None
        if num is not None and num != x.shape[0]:
            raise ValueError(f"num_samples={num} disagrees with the {x.shape[0]} rows of x")
        # The model and guide check as argument validation: off in the training step (see validate_mask).
        return x, validate_mask(mask, x, is_validation_enabled()).to(x.dtype), x

    def model(
        self, x: torch.Tensor | None, mask: torch.Tensor | None, num_samples: int | None = None
    ) -> torch.Tensor:
        """p(τ | x_k) p(x_u | c_T). Returns the canvases (logits) stacked, shape (steps + 1, B, D).

        ``model(None, None, num_samples=n)`` runs p with every pixel missing and nothing observed: n
        unconditional samples.
        """
        self.register_params()
        x, mask, obs = self._inputs(x, mask, num_samples)
        with pyro.plate("data", x.shape[0]):
            canvases = self._roll_out(x, mask, guide=False)
            cost = dist.Bernoulli(logits=canvases[-1], validate_args=False).mask(mask < 0.5).to_event(1)
            pyro.sample("x", cost, obs=obs)
        return stack_canvases(canvases)

    def guide(self, x: torch.Tensor, mask: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """q(τ | x_u, x_k). Returns the canvases stacked, shape (steps + 1, B, D)."""
        self.register_params()
        if x is None:
            raise ValueError("the guide policy needs the complete data x (it sees the missing values)")
        x, mask, _ = self._inputs(x, mask, None)
        with pyro.plate("data", x.shape[0]):
            return stack_canvases(self._roll_out(x, mask, guide=True))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """σ(c_T) of ``num_samples`` unconditional roll-outs of p (every pixel missing): (num_samples, D)."""
        with pyro.poutine.block():
            return torch.sigmoid(self.model(None, None, num_samples=num_samples)[-1])

    @torch.no_grad()
    def impute(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One roll-out of the primary policy: the images [x_k; σ(c_t)_u] for every step, shape
        (steps + 1, B, D). Only x_k is passed on, so the missing values cannot leak in."""
        mask = validate_mask(mask, x).to(x.dtype)
        with pyro.poutine.block():
            canvases = self.model(x * mask, mask)
        return mask * x + (1 - mask) * torch.sigmoid(canvases)
