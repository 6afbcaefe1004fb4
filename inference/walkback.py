"""Training variational walkback: Alg. 1's online update and the moments of p*.

Goyal (2017), thesis, ch. 3, Alg. 1 and Sec. 3.15. The bound of Eq. 3.5 is the Trace_ELBO of
:class:`ppl_models.walkback.VariationalWalkback`'s model/guide pair; two ways to follow its gradient:

- **whole-walk** (:class:`pyro.infer.Trace_ELBO` in the :class:`inference.train.Trainer`): one heated path per
  data point, then one optimiser step on the gradient of Σ_t ln p_{T_t}(s_{t−1} | s_t) (the guide's terms
  carry no gradient: its parameters are detached);
- **online** (:class:`OnlineWalkbackELBO`, Alg. 1 as written, which Sec. 3.15 finds better): for t = 1 … K,
  draw s_t ~ p_{T_t}(· | s_{t−1}) with the parameters as they are *now*, and take an optimiser step on
  −Σ_n ln p_{T_t}(s_{t−1} | s_t) at once (the term reported also holds the detached ln q of the step, so
  the terms of one walk add up to the negative bound) — K steps per minibatch, each heating step using the
  operator the previous step left (θ_q ← θ_p). The ln p*(s_K) term has no trainable parameter and is only
  reported.

After each minibatch, :class:`PStarMoments` moves p*'s moments towards those of the heated end states s_K
("update mean and variance of p* to match the accumulated 1st and 2nd moment statistics of the samples of
s_K"), an exponential moving average with the preset's momentum.

Symbols to code: θ -> the operator's parameters (``pair.operator``), L -> the reported loss (−L per batch),
s_K -> ``pair.last_end``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from inference import distributed
from inference.train import ExtraTerm
from ppl_models.walkback import VariationalWalkback


class OnlineWalkbackELBO(Trace_ELBO):
    """Alg. 1's online update of variational walkback (see the module docstring).

    As a Pyro loss (``loss``, ``loss_and_grads``, ``differentiable_loss``) it is the Trace_ELBO of the pair
    (Eq. 3.5), for evaluation; :meth:`online_losses` yields the per-step terms that
    :class:`inference.train.Trainer` steps on one by one. Their sum on one path equals the negative Trace_ELBO
    of that path when the parameters do not move (tested).

    :param pair: the walkback pair whose operator is trained.
    """

    def __init__(self, pair: VariationalWalkback) -> None:
        super().__init__()
        self.pair = pair

    def online_losses(self, model, guide, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Σ_n [ln q_{T_t}(s_t | s_{t−1}) − ln p_{T_t}(s_{t−1} | s_t)] for t = 1 … K (the gradient only
        through p: q's term is detached, as in the whole-walk bound), then −Σ_n ln p*(s_K) (no gradient), on
        one heated path per row of ``x``: together the negative bound of Eq. 3.5. ``model`` and ``guide``
        are the pair's; the terms are computed from its operator directly, one heating step after the
        previous term's update."""
        pair = self.pair
        K, temps, s = pair.walk_steps, pair.temperatures(), x
        for t in range(1, K + 1):
            pyro.module(pair.param_prefix, pair)  # registers θ in each term's param capture
            with torch.no_grad():  # q: the operator as the previous update left it, no gradient
                q = pair.operator(s, temps[t - 1])
                nxt = q.sample()
                log_q = q.log_prob(nxt).sum()
            yield log_q - pair.operator(nxt, temps[t - 1]).log_prob(s).sum()
            s = nxt
        pair.last_end = s
        with torch.no_grad():
            yield -pair.p_star(x.shape[0]).log_prob(s).sum()


class PStarMoments(ExtraTerm):
    """After each training step, p*'s moments move towards those of the step's heated end states s_K
    (:meth:`ppl_models.walkback.VariationalWalkback.update_star`). The moments are buffers of the pair, so the
    trainer checkpoints them with it; this hook trains no network (``optimizer`` is None).

    :param pair: the walkback pair.
    :param momentum: the moving average's step, in (0, 1].
    """

    name = "p_star"

    def __init__(self, pair: VariationalWalkback, momentum: float = 0.1) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.pair, self.momentum = pair, momentum
        self.module, self.optimizer = nn.Module(), None

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        if self.pair.last_end is None:
            raise RuntimeError("p* is updated from the guide's end states: run the guide (a training step) "
                               "first")
        end = self.pair.last_end
        if distributed.is_distributed():
            # the moments of the whole minibatch's end states, every process's shard counted
            count, total, squares = (distributed.all_reduce_tensor(t) for t in (
                end.new_tensor(float(end.shape[0])), end.sum(0), end.pow(2).sum(0)))
            mean = total / count
            var = (squares - count * mean.pow(2)) / (count - 1).clamp(min=1)
            self.pair.update_star_moments(mean, var, int(count), self.momentum)
        else:
            self.pair.update_star(end, self.momentum)
        out = {"mean": float(self.pair.star_mean.mean())}
        if self.pair.form == "gaussian":  # a Bernoulli p* has no variance of its own
            out["sd"] = float(self.pair.star_var.sqrt().mean())
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
