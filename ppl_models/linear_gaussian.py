"""Linear-Gaussian chain: a sequential latent model with an exact answer.

Reference model for checking bounds and estimators (Mohamed & Lakshminarayanan 2016, tutorial Sec. on
variational bounds: log p(x) = ELBO(q) + KL(q(z|x) || p(z|x)), so every bound has a known target here).

Generative process (the primary policy p, ``T`` steps)::

    z_1 ~ N(0, I_d)
    z_t | z_{t-1} ~ N(A z_{t-1}, Q)          t = 2..T     (the prior depends on the previous sample)
    x | z_T ~ N(C z_T + b, R)

The joint of (z_1..z_T, x) is Gaussian, hence

* ``exact_log_marginal(x)`` = log N(x; b, C Σ_T Cᵀ + R), with Σ_1 = I, Σ_t = A Σ_{t-1} Aᵀ + Q;
* the exact posterior factorises as p(z_1 | x) Π_t p(z_t | z_{t-1}, x) (Markov chain given x), each
  factor Gaussian and linear in (z_{t-1}, x); ``exact_guide_params`` returns it in the form of
  :meth:`LinearGaussianChain.guide`, so the guide can *be* the exact posterior;
* for any guide of that form the ELBO is analytic (``analytic_elbo``), differentiable in the guide's
  parameters, which gives exact gradients to test estimators against.

Guide (the guide policy q, sees x)::

    q(z_1 | x)          = N(G_1 x + h_1, L_1 L_1ᵀ)
    q(z_t | z_{t-1}, x) = N(F_t z_{t-1} + G_t x + h_t, L_t L_tᵀ)

Site names follow the library's scheme: ``z_1 .. z_T`` for steps, ``x`` for the observation, all inside
``pyro.plate("data")`` at dim -1. Everything is float64 by default: it exists to compare numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import MultivariateNormal, kl_divergence


@dataclass
class GuideParams:
    """Parameters of the sequential linear-Gaussian guide; index t-1 holds step t."""

    F: list[torch.Tensor]  # (d, d); F[0] is unused (no z_0)
    G: list[torch.Tensor]  # (d, D)
    h: list[torch.Tensor]  # (d,)
    L: list[torch.Tensor]  # (d, d) lower-triangular, positive diagonal

    def tensors(self) -> list[torch.Tensor]:
        return [*self.F, *self.G, *self.h, *self.L]


class LinearGaussianChain:
    """A T-step linear-Gaussian chain with exact marginal likelihood and exact sequential posterior."""

    def __init__(
        self,
        latent_dim: int = 2,
        obs_dim: int = 3,
        num_steps: int = 2,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if latent_dim < 1 or obs_dim < 1 or num_steps < 1:
            raise ValueError(
                f"latent_dim, obs_dim and num_steps must be >= 1, got {latent_dim}, {obs_dim}, {num_steps}"
            )
        g = torch.Generator().manual_seed(seed)
        d, D = latent_dim, obs_dim
        self.d, self.D, self.T, self.dtype = d, D, num_steps, dtype
        # A contraction with a rotation keeps the chain's variance bounded and the prior truly sequential.
        self.A = (0.8 * torch.randn(d, d, generator=g, dtype=dtype) / d**0.5).contiguous()
        self.Q = torch.diag(0.3 + 0.4 * torch.rand(d, generator=g, dtype=dtype))
        self.C = torch.randn(D, d, generator=g, dtype=dtype)
        self.b = 0.5 * torch.randn(D, generator=g, dtype=dtype)
        self.R = torch.diag(0.2 + 0.3 * torch.rand(D, generator=g, dtype=dtype))

    # ------------------------------------------------------------------ the Pyro model and guide
    def model(self, x: torch.Tensor) -> None:
        """p(z_1..z_T, x); ``x`` has shape (N, D)."""
        zeros = torch.zeros(self.d, dtype=self.dtype, device=x.device)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z_1", dist.MultivariateNormal(zeros, torch.eye(self.d, dtype=self.dtype)))
            for t in pyro.markov(range(2, self.T + 1)):
                z = pyro.sample(f"z_{t}", dist.MultivariateNormal(z @ self.A.T, self.Q))
            pyro.sample("x", dist.MultivariateNormal(z @ self.C.T + self.b, self.R), obs=x)

    def guide(self, x: torch.Tensor, params: GuideParams) -> None:
        """q(z_1..z_T | x) with the given (possibly trainable) parameters."""
        with pyro.plate("data", x.shape[0], dim=-1):
            z = None
            for t in pyro.markov(range(1, self.T + 1)):
                i = t - 1
                loc = x @ params.G[i].T + params.h[i]
                if z is not None:
                    loc = loc + z @ params.F[i].T
                z = pyro.sample(f"z_{t}", dist.MultivariateNormal(loc, scale_tril=params.L[i]))

    def sample(self, num: int, seed: int = 0) -> torch.Tensor:
        """Draw ``num`` observations x from the model (ancestral sampling, private generator)."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num, self.d, generator=g, dtype=self.dtype)
        for _ in range(2, self.T + 1):
            z = z @ self.A.T + torch.randn(num, self.d, generator=g, dtype=self.dtype) @ self.Q.sqrt()
        return z @ self.C.T + self.b + torch.randn(num, self.D, generator=g, dtype=self.dtype) @ self.R.sqrt()

    # ------------------------------------------------------------------ exact answers
    def _prior_joint(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the stacked latents (z_1..z_T), dimension T*d."""
        d, T = self.d, self.T
        # z = M ε with z_t = A z_{t-1} + Q^{1/2} ε_t: block lower-triangular M.
        M = torch.zeros(T * d, T * d, dtype=self.dtype)
        sq = [torch.eye(d, dtype=self.dtype)] + [self.Q.sqrt()] * (T - 1)
        for t in range(T):
            for s in range(t + 1):
                block = torch.linalg.matrix_power(self.A, t - s) @ sq[s]
                M[t * d : (t + 1) * d, s * d : (s + 1) * d] = block
        return torch.zeros(T * d, dtype=self.dtype), M @ M.T

    def _full_joint(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of (z_1..z_T, x), dimension T*d + D."""
        mu_z, S_z = self._prior_joint()
        d, T = self.d, self.T
        sel = torch.zeros(self.D, T * d, dtype=self.dtype)
        sel[:, (T - 1) * d :] = self.C  # x depends on z_T only
        mu = torch.cat([mu_z, sel @ mu_z + self.b])
        S_zx = S_z @ sel.T
        S_xx = sel @ S_z @ sel.T + self.R
        S = torch.cat([torch.cat([S_z, S_zx], 1), torch.cat([S_zx.T, S_xx], 1)], 0)
        return mu, S

    def exact_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for each row of ``x``; shape (N,)."""
        mu, S = self._full_joint()
        n = self.T * self.d
        return MultivariateNormal(mu[n:], S[n:, n:]).log_prob(x)

    def exact_guide_params(self) -> GuideParams:
        """The exact posterior p(z_1|x) Π p(z_t|z_{t-1},x) written in the guide's parameterisation."""
        mu, S = self._full_joint()
        d, n = self.d, self.T * self.d
        x_idx = torch.arange(n, n + self.D)
        F, G, h, L = [], [], [], []
        for t in range(self.T):
            zt = torch.arange(t * d, (t + 1) * d)
            cond = x_idx if t == 0 else torch.cat([torch.arange((t - 1) * d, t * d), x_idx])
            S_cc = S[cond][:, cond]
            K = S[zt][:, cond] @ torch.linalg.inv(S_cc)  # regression of z_t on (z_{t-1}, x)
            cov = S[zt][:, zt] - K @ S[cond][:, zt]
            off = mu[zt] - K @ mu[cond]
            if t == 0:
                F.append(torch.zeros(d, d, dtype=self.dtype))
                G.append(K)
            else:
                F.append(K[:, :d])
                G.append(K[:, d:])
            h.append(off)
            L.append(torch.linalg.cholesky(0.5 * (cov + cov.T)))
        return GuideParams(F, G, h, L)

    def guide_joint(self, x: torch.Tensor, params: GuideParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (N, T*d) and covariance (T*d, T*d) of q(z_1..z_T | x) for the sequential guide."""
        d, T = self.d, self.T
        # z_t = F_t z_{t-1} + (G_t x + h_t) + L_t ε_t: propagate the affine map of (ε, x).
        means, maps = [], []  # maps[t]: (d, T*d) coefficient of the stacked ε
        for t in range(T):
            off = x @ params.G[t].T + params.h[t]
            coef = torch.zeros(d, T * d, dtype=self.dtype)
            coef[:, t * d : (t + 1) * d] = params.L[t]
            if t > 0:
                off = off + means[-1] @ params.F[t].T
                coef = coef + params.F[t] @ maps[-1]
            means.append(off)
            maps.append(coef)
        M = torch.cat(maps, 0)
        return torch.cat(means, -1), M @ M.T

    def analytic_elbo(self, x: torch.Tensor, params: GuideParams) -> torch.Tensor:
        """The ELBO E_q[log p(x, z) - log q(z | x)] in closed form, per row of x; differentiable."""
        d, T = self.d, self.T
        m, S = self.guide_joint(x, params)
        mu_p, S_p = self._prior_joint()
        kl = kl_divergence(MultivariateNormal(m, S), MultivariateNormal(mu_p.expand_as(m), S_p))
        # E_q log N(x; C z_T + b, R) = log N(x; C m_T + b, R) - 1/2 tr(R^{-1} C S_T Cᵀ)
        m_T, S_T = m[:, (T - 1) * d :], S[(T - 1) * d :, (T - 1) * d :]
        loglik = MultivariateNormal(m_T @ self.C.T + self.b, self.R).log_prob(x)
        loglik = loglik - 0.5 * torch.trace(torch.linalg.solve(self.R, self.C @ S_T @ self.C.T))
        return loglik - kl
