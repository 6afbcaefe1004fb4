"""Ho et al.'s simplified diffusion loss L_simple: the ε-prediction error at one uniformly drawn step.

Ho et al. (2020), "Denoising diffusion probabilistic models", Eq. 14::

    L_simple(θ) = E_{t ~ U{1..T}, x_0, ε ~ N(0, I)} || ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t) ||²

It is the subsampled path-wise bound of :mod:`inference.diffusion_elbo` (Eq. 9 of Bachman & Precup (2015),
"Data generation as sequential decision making", with time reversed) with each step's KL reweighted by
2σ_t² α_t (1 − ᾱ_t) / β_t² and L_0 replaced by its ε-error: not a bound, but it trains samples of better
quality (Ho et al., Sec. 3.4 and Table 2). A model trained with it is scored with the bound separately
(``SubsampledDiffusionELBO(time_steps="all")``), and a report says which loss trained which row.

Symbols to code: the pair (:class:`ppl_models.gaussian_diffusion.GaussianDiffusion`) provides ``num_steps``
(T) and ``simple_loss(x, t)`` (the squared ε-error per data point, t one step per row).
"""

from __future__ import annotations

from typing import Any

import torch

from inference.diffusion_elbo import SubsampledDiffusionELBO


class SimpleDiffusionLoss(SubsampledDiffusionELBO):
    """L_simple summed over the batch (see the module docstring); used where an ELBO goes (``Trainer``,
    ``SVI``), reading the pair from the bound ``model`` method and ignoring the fixed noising ``guide``."""

    needed = ("num_steps", "simple_loss", "register_params")

    def __init__(self) -> None:
        super().__init__("sample")

    def per_datum(self, model: Any, guide: Any, x: torch.Tensor) -> torch.Tensor:
        """One draw of ||ε − ε_θ||² per data point, (N,), differentiable."""
        pair = self._pair(model)
        pair.register_params()
        t = torch.randint(1, pair.num_steps + 1, (x.shape[0],), device=x.device)
        return pair.simple_loss(x, t)
