"""Bounds against known answers, in float64 (cf. Pyro's tests/infer/test_gradient.py).

Known answers come from the linear-Gaussian chain (ppl_models/linear_gaussian.py): exact log p(x), the
exact sequential posterior, and the ELBO of any sequential linear-Gaussian guide in closed form (and
its exact gradient by autograd). Statistical tolerances are stated where they are used: each Monte
Carlo mean is compared with its target at 5 standard errors (a false alarm rate of ~6e-7 per check),
with the standard error measured from the same draws.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

from inference.diagnostics import (
    bound_ladder,
    check_ladder,
    degenerate_tails,
    effective_sample_size,
    khat_summary,
    psis_khat,
)
from inference.importance import importance_log_likelihood
from inference.iwae import IWAE_ELBO, log_importance_weights
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models.linear_gaussian import GuideParams, LinearGaussianChain

Z = 5.0  # standard errors allowed for every Monte Carlo comparison


pytestmark = pytest.mark.usefixtures("float64_and_seed")


def _perturbed(p: GuideParams, amount: float = 1.0) -> GuideParams:
    """A wrong but reasonable guide: shrunk regressions, shifted offsets, inflated scales."""
    return GuideParams(
        [f * (1 - 0.3 * amount) for f in p.F],
        [G * (1 - 0.2 * amount) for G in p.G],
        [h + 0.2 * amount for h in p.h],
        [L * (1 + 0.3 * amount) for L in p.L],
    )


def _mc_mean_and_se(samples: torch.Tensor) -> tuple[float, float]:
    return samples.mean().item(), (samples.std() / math.sqrt(samples.numel())).item()


def _elbo_samples(elbo_cls, model, guide, x, reps: int) -> torch.Tensor:
    """`reps` independent single-particle ELBO values of the whole batch x, drawn in one vectorised run.

    The batch is tiled `reps` times along the data plate, so every tile gets its own guide path.
    """
    xs = x.repeat(reps, 1)
    elbo = elbo_cls()
    if isinstance(elbo, PathwiseKL_ELBO):
        per = elbo.per_datum(model, guide, xs)
    else:
        model_trace, guide_trace = next(iter(elbo._get_traces(model, guide, (xs,), {})))
        per = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample":
                per = per + site["log_prob"]
                if not site["is_observed"]:
                    per = per - guide_trace.nodes[name]["log_prob"]
    return per.reshape(reps, x.shape[0]).sum(-1).detach()


@pytest.mark.parametrize("num_steps", [1, 3])
def test_exact_posterior_guide_gives_log_marginal(num_steps):
    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=num_steps)
    x = m.sample(6)
    exact = m.exact_log_marginal(x).sum().item()
    guide = functools.partial(m.guide, params=m.exact_guide_params())
    # Closed form and the Monte Carlo ELBO: log w is constant under the exact posterior.
    assert m.analytic_elbo(x, m.exact_guide_params()).sum().item() == pytest.approx(exact, abs=1e-9)
    assert -Trace_ELBO().loss(m.model, guide, x) == pytest.approx(exact, abs=1e-9)
    assert -IWAE_ELBO(7).loss(m.model, guide, x) == pytest.approx(exact, abs=1e-9)
    est = importance_log_likelihood(m.model, guide, x, num_samples=50, chunk_size=20, batch_size=4)
    assert est.log_likelihood.sum().item() == pytest.approx(exact, abs=1e-9)
    assert torch.allclose(est.ess, torch.full_like(est.ess, 50.0))
    # Path-wise KL: the value is random (conditional KLs along one path) but its mean is log p(x).
    samples = _elbo_samples(PathwiseKL_ELBO, m.model, guide, x, reps=4000)
    mean, se = _mc_mean_and_se(samples)
    assert abs(mean - exact) < Z * se + 1e-9


@pytest.mark.parametrize("elbo_cls", [PathwiseKL_ELBO, Trace_ELBO])
def test_elbo_matches_closed_form_and_is_below_log_marginal(elbo_cls):
    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=3, seed=1)
    x = m.sample(4, seed=1)
    params = _perturbed(m.exact_guide_params())
    exact = m.exact_log_marginal(x).sum().item()
    analytic = m.analytic_elbo(x, params).sum().item()
    assert analytic < exact - 0.1  # a wrong guide pays its KL to the posterior
    samples = _elbo_samples(elbo_cls, m.model, functools.partial(m.guide, params=params), x, reps=20000)
    mean, se = _mc_mean_and_se(samples)
    assert abs(mean - analytic) < Z * se
    assert mean + Z * se < exact


def test_iwae_increases_with_k_and_reaches_log_marginal():
    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=2, seed=2)
    x = m.sample(8, seed=2)
    exact = m.exact_log_marginal(x)
    guide = functools.partial(m.guide, params=_perturbed(m.exact_guide_params(), amount=0.7))
    reps = 400
    means, ses = {}, {}
    for k in (1, 4, 16, 64, 256):
        lw, _ = log_importance_weights(m.model, guide, x.repeat(reps, 1), num_samples=k)
        per_rep = (torch.logsumexp(lw, 0) - math.log(k)).reshape(reps, -1).sum(-1)
        means[k], ses[k] = _mc_mean_and_se(per_rep)
    ks = sorted(means)
    for a, b in zip(ks, ks[1:], strict=False):
        # L_a <= L_b: the difference must not be significantly negative.
        assert means[b] - means[a] > -Z * math.hypot(ses[a], ses[b])
    assert means[ks[-1]] - means[1] > 0.5  # and it does rise, clearly
    analytic = m.analytic_elbo(x, _perturbed(m.exact_guide_params(), 0.7)).sum().item()
    assert means[1] == pytest.approx(analytic, abs=Z * ses[1])
    # K = 5000 reaches log p(x): tolerance 0.05 nats per data point (the residual bias of IWAE-5000
    # with this guide is far smaller; the tolerance covers one draw's noise, checked by k-hat < 0.5).
    est = importance_log_likelihood(m.model, guide, x, num_samples=5000, chunk_size=1000)
    assert torch.all(torch.as_tensor(est.khat) < 0.5)
    assert torch.allclose(est.log_likelihood, exact, atol=0.05)
    assert est.log_likelihood.sum().item() <= exact.sum().item() + 0.05


def test_iwae_differentiable_loss_gradient_k1_matches_closed_form_elbo_gradient():
    m = LinearGaussianChain(latent_dim=2, obs_dim=2, num_steps=2, seed=3)
    x = m.sample(3, seed=3)
    g_iwae, target = _sequential_grads(IWAE_ELBO(1), m, x, _perturbed(m.exact_guide_params()), 40, 500)
    mean, se = g_iwae.mean(0), g_iwae.std(0) / math.sqrt(g_iwae.shape[0])
    assert torch.all((mean - target).abs() < Z * se + 1e-8), (mean, target, se)


def _sequential_grads(elbo, m, x, base: GuideParams, groups: int, tiles: int):
    """Gradients of the single-path loss w.r.t. the guide's leaves, one row per group of `tiles` paths.

    The batch is tiled along the data plate so each tile has its own path; a group's gradient is the
    mean over its tiles, and the groups are independent, so their spread gives the standard error.
    """
    leaves = [t.clone().requires_grad_() for t in base.tensors()]
    T = m.T
    params = GuideParams(leaves[:T], leaves[T : 2 * T], leaves[2 * T : 3 * T], leaves[3 * T :])
    guide = functools.partial(m.guide, params=params)
    xs = x.repeat(tiles, 1)
    per_group = []
    for _ in range(groups):
        loss = elbo.differentiable_loss(m.model, guide, xs) / tiles
        grads = torch.autograd.grad(-loss, leaves, allow_unused=True)
        per_group.append(torch.cat([g.reshape(-1) for g in grads if g is not None]))
    target = torch.autograd.grad(m.analytic_elbo(x, params).sum(), leaves, allow_unused=True)
    return torch.stack(per_group), torch.cat([t.reshape(-1) for t in target if t is not None])


def test_pathwise_equals_trace_elbo_in_value_and_gradient_on_sequential_prior():
    """Two steps, p(z_2 | z_1) depends on z_1 and q(z_2 | z_1, x) too: the mean-field shortcut is wrong,
    the path-wise KL is not. Values and gradients of both estimators agree with the closed form."""
    m = LinearGaussianChain(latent_dim=1, obs_dim=2, num_steps=2, seed=4)
    assert m.A.abs().item() > 0.05  # the prior really depends on z_1
    x = m.sample(2, seed=4)
    base = _perturbed(m.exact_guide_params())
    reps = 60  # groups of 100 paths each
    g_pw, target = _sequential_grads(PathwiseKL_ELBO(), m, x, base, reps, 100)
    g_tr, _ = _sequential_grads(Trace_ELBO(), m, x, base, reps, 100)
    for g in (g_pw, g_tr):
        mean, se = g.mean(0), g.std(0) / math.sqrt(reps)
        assert torch.all((mean - target).abs() < Z * se + 1e-8), (mean, target, se)
    # and with each other
    diff_se = torch.sqrt(g_pw.var(0) / reps + g_tr.var(0) / reps)
    assert torch.all((g_pw.mean(0) - g_tr.mean(0)).abs() < Z * diff_se + 1e-8)


def test_pathwise_vectorized_particles_and_scale():
    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=2, seed=5)
    x = m.sample(3, seed=5)
    params = _perturbed(m.exact_guide_params())
    guide = functools.partial(m.guide, params=params)
    analytic = m.analytic_elbo(x, params).sum().item()
    elbo = PathwiseKL_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1)
    # Tolerance: the single-particle sd here is < 3 nats, so 5 SE of a 20000-particle mean < 0.11.
    assert -elbo.loss(m.model, guide, x) == pytest.approx(analytic, abs=0.11)
    pyro.set_rng_seed(7)
    unscaled = PathwiseKL_ELBO().loss(m.model, guide, x)
    pyro.set_rng_seed(7)
    scaled = PathwiseKL_ELBO().loss(poutine.scale(m.model, scale=2.5), poutine.scale(guide, scale=2.5), x)
    assert scaled == pytest.approx(2.5 * unscaled, rel=1e-12)


def _masked_model(x, mask_latent, mask_obs):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z_1", dist.Normal(torch.zeros(x.shape[0]), 1.0).mask(mask_latent))
        z2 = pyro.sample("z_2", dist.Normal(0.5 * z1, 0.8))
        pyro.sample("x", dist.Normal(z2, 0.5).mask(mask_obs), obs=x)


def _masked_guide(x, mask_latent, mask_obs):
    # Does not read x: then the value of a masked observation can reach no term of the bound.
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z_1", dist.Normal(torch.linspace(-0.5, 0.5, x.shape[0]), 0.9))
        pyro.sample("z_2", dist.Normal(0.6 * z1, 0.6))


def test_masks_are_respected():
    """A masked observation contributes nothing; a masked latent's KL is dropped, as in Trace_ELBO."""
    x = torch.tensor([0.3, -1.2, 2.0])
    ml = torch.tensor([True, False, True])
    mo = torch.tensor([True, True, False])
    reps = 4000
    vals = {}
    for cls in (PathwiseKL_ELBO, Trace_ELBO):
        samples = torch.tensor([-cls().loss(_masked_model, _masked_guide, x, ml, mo) for _ in range(reps)])
        vals[cls] = _mc_mean_and_se(samples)
    (a, sa), (b, sb) = vals[PathwiseKL_ELBO], vals[Trace_ELBO]
    assert abs(a - b) < Z * math.hypot(sa, sb)
    # Flipping the masked observation's value changes nothing.
    x2 = x.clone()
    x2[2] = 100.0
    pyro.set_rng_seed(3)
    l1 = PathwiseKL_ELBO().loss(_masked_model, _masked_guide, x, ml, mo)
    pyro.set_rng_seed(3)
    l2 = PathwiseKL_ELBO().loss(_masked_model, _masked_guide, x2, ml, mo)
    assert l1 == pytest.approx(l2, abs=1e-12)


def _discrete_model(x, *_):
    with pyro.plate("data", x.shape[0]):
        b = pyro.sample("z_1", dist.Bernoulli(torch.full(x.shape, 0.3)))
        pyro.sample("x", dist.Normal(2.0 * b - 1.0, 1.0), obs=x)


def _discrete_guide(x, logit):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z_1", dist.Bernoulli(logits=logit * x))


def test_score_function_gradient_for_discrete_site():
    """Non-reparameterised site: the path-wise estimator's score-function gradient is unbiased."""
    x = torch.tensor([0.7, -0.4])

    def exact_elbo(logit):
        q = torch.sigmoid(logit * x)
        total = 0.0
        for b in (0.0, 1.0):
            qb = q if b else 1 - q
            lp = dist.Bernoulli(0.3).log_prob(torch.tensor(b)) + dist.Normal(2 * b - 1, 1.0).log_prob(x)
            total = total + qb * (lp - torch.log(qb))
        return total.sum()

    logit = torch.tensor(0.8, requires_grad=True)
    target = torch.autograd.grad(exact_elbo(logit), logit)[0].item()
    # 60 groups of 100 tiled copies of x (each copy its own path); SE from the group means.
    groups, tiles = 60, 100
    xs = x.repeat(tiles)
    grads, vals = [], []
    for _ in range(groups):
        loss = PathwiseKL_ELBO().differentiable_loss(_discrete_model, _discrete_guide, xs, logit) / tiles
        grads.append(torch.autograd.grad(-loss, logit)[0].item())
        vals.append(-loss.item())
    mean, se = _mc_mean_and_se(torch.tensor(grads))
    assert abs(mean - target) < Z * se
    # The value uses the analytic Bernoulli KL: its mean is the exact ELBO.
    vm, vs = _mc_mean_and_se(torch.tensor(vals))
    assert abs(vm - exact_elbo(logit).item()) < Z * vs


def test_bound_ladder_and_diagnostics():
    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=2, seed=6)
    x = m.sample(10, seed=6)
    guide = functools.partial(m.guide, params=_perturbed(m.exact_guide_params(), 0.5))
    ladder = bound_ladder(m.model, guide, x, ks=(1, 10, 100, 1000), batch_size=5, chunk_size=300)
    # Within-run ladder: 0.05 nats per data point of noise allowed between neighbouring rungs.
    assert check_ladder(ladder, tol=0.05) == []
    assert ladder["iwae"][1000] <= m.exact_log_marginal(x).mean().item() + 0.05
    assert ladder["khat"].shape == (10,) and ladder["ess"].shape == (10,)
    # A wrong Gaussian guide: continuous weights, every tail fitted.
    assert ladder["degenerate"].shape == (10,) and not ladder["degenerate"].any()
    assert ladder["elbo"] < ladder["iwae"][1000]


def test_psis_khat_and_ess_detect_bad_weights():
    g = torch.Generator().manual_seed(0)
    good = 0.1 * torch.randn(2000, 3, generator=g, dtype=torch.float64)
    heavy = torch.log(torch.distributions.Pareto(1.0, 0.8).sample((2000, 3)))  # infinite-mean weights
    assert (psis_khat(good, sample_axis=0) < 0.5).all()
    assert (psis_khat(heavy, sample_axis=0) > 0.7).all()
    assert not degenerate_tails(good, sample_axis=0).any()
    assert not degenerate_tails(heavy, sample_axis=0).any()
    ess_good, ess_heavy = effective_sample_size(good), effective_sample_size(heavy)
    assert (ess_good > 1900).all() and (ess_heavy < 500).all()
    assert torch.allclose(effective_sample_size(torch.zeros(50, 2)), torch.full((2,), 50.0))


def test_iwae_rejects_bad_settings():
    with pytest.raises(ValueError, match="positive int"):
        IWAE_ELBO(0)

    def model(x):
        z = pyro.sample("z_1", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z_1", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="inside pyro.plate"):
        IWAE_ELBO(3).loss(model, guide, torch.zeros(4))


def test_latent_samples_to_arviz():
    from inference.diagnostics import latent_samples_to_arviz

    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=2, seed=0)
    x = m.sample(4)
    guide = functools.partial(m.guide, params=m.exact_guide_params())
    data = latent_samples_to_arviz(guide, x, num_samples=300)
    z1 = data.posterior["z_1"].values
    assert z1.shape == (1, 300, 4, 2)
    # The draws are from the exact posterior: their mean matches its mean to 5 standard errors.
    mean, cov = m.guide_joint(x, m.exact_guide_params())
    se = torch.sqrt(torch.diagonal(cov)[:2] / 300)
    assert (torch.as_tensor(z1.mean(1)[0]) - mean[:, :2]).abs().lt(Z * se).all()
    with pytest.raises(ValueError, match="no latent sites"):
        latent_samples_to_arviz(guide, x, num_samples=2, sites=["nope"])


def test_khat_backends_agree_where_both_are_installed():
    """ArviZ 0.x and arviz-stats (ArviZ 1.x) give the same k-hat for the same log weights."""
    pytest.importorskip("arviz_stats", reason="arviz-stats (ArviZ 1.x backend) not installed")
    import numpy as np

    from inference.diagnostics import _khat_arviz0, _khat_arviz_stats

    rng = np.random.default_rng(1)
    heavy = np.log(rng.pareto(1.0, size=(4000, 3)) + 1.0)
    light = 0.1 * rng.normal(size=(4000, 3))
    for lw in (heavy, light):
        # Both fit the same generalised Pareto tail; their fitting details differ slightly. Samples last.
        assert np.allclose(_khat_arviz0(lw.T), _khat_arviz_stats(lw.T), atol=0.05)
        assert np.allclose(psis_khat(lw, sample_axis=0), _khat_arviz0(lw.T))


def test_psis_khat_takes_the_sample_axis_and_matches_arviz():
    """ArviZ 0.x's psislw has samples last, (N, K); psis_khat gives its k on any axis, unchanged."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    if not hasattr(arviz, "psislw"):
        pytest.skip("ArviZ 1.x: no arviz.psislw to compare with")
    rng = np.random.default_rng(2)
    arr = np.concatenate([0.3 * rng.normal(size=(3, 1000)), np.log(rng.pareto(0.9, size=(2, 1000)) + 1.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = arviz.psislw(arr)[1]  # (N,) = (5,)
    assert expected.shape == (5,) and (expected[:3] < 0.5).all() and (expected[3:] > 0.7).all()
    assert np.allclose(psis_khat(arr, sample_axis=-1), expected, rtol=0, atol=1e-12)
    assert np.allclose(psis_khat(arr.T, sample_axis=0), expected, rtol=0, atol=1e-12)
    assert np.allclose(psis_khat(torch.as_tensor(arr.T), sample_axis=0), expected, rtol=0, atol=1e-12)
    # A 3-D array along its middle axis: (2, K, 5) -> (2, 5).
    arr3 = np.stack([arr.T, arr[::-1].T])
    k3 = psis_khat(arr3, sample_axis=1)
    assert k3.shape == (2, 5) and np.allclose(k3, [expected, expected[::-1]], rtol=0, atol=1e-12)
    assert degenerate_tails(arr3, sample_axis=1).shape == (2, 5)
    # 1-D: one data point, a 0-d result.
    k1 = psis_khat(arr[0], sample_axis=0)
    assert k1.shape == () and float(k1) == pytest.approx(expected[0], abs=1e-12)
    assert degenerate_tails(arr[0], sample_axis=0).shape == ()
    with pytest.raises(ValueError, match="sample_axis"):
        psis_khat(arr, sample_axis=2)


@pytest.mark.parametrize("values", [[0.0], [0.0, -1.3], [0.0, -0.4, -2.0]], ids=["constant", "two", "three"])
def test_degenerate_weights_are_their_own_category(values):
    """Log weights with 1-3 distinct values (exact posterior guide; discrete latent): degenerate, not >0.7."""
    import numpy as np

    K, N = 1000, 4
    g = torch.Generator().manual_seed(3)
    lw = torch.tensor(values)[torch.randint(len(values), (K, N), generator=g)] - 12.0
    lw = lw + 1e-13 * torch.randn(K, N, generator=g)  # round-off, as from an exact posterior guide
    khat, deg = psis_khat(lw, sample_axis=0), degenerate_tails(lw, sample_axis=0)
    ess = effective_sample_size(lw)
    assert deg.all()
    s = khat_summary(khat, deg, ess)
    assert s["khat_frac_degenerate"] == 1.0
    assert s["khat_frac_gt_0.7"] == 0.0 and s["khat_frac_gt_0.5"] == 0.0
    assert math.isnan(s["khat_median"]) and math.isnan(s["khat_max"])
    assert s["ess_mean_degenerate"] == pytest.approx(float(ess.mean()), rel=1e-12)
    if len(values) == 1:
        assert s["ess_mean_degenerate"] == pytest.approx(K, rel=1e-9)
    # Beside continuous weights: heavy-tailed still counts as unreliable, light-tailed as good.
    heavy = torch.log(torch.distributions.Pareto(1.0, 0.8).sample((K, 1)))
    light = 0.1 * torch.randn(K, 1, generator=g, dtype=torch.float64)
    mixed = torch.cat([lw, heavy, light], 1)  # 6 points: 4 degenerate, 1 heavy, 1 light
    khat, deg = psis_khat(mixed, sample_axis=0), degenerate_tails(mixed, sample_axis=0)
    assert deg.tolist() == [True] * 4 + [False, False]
    assert khat[4] > 0.7 and khat[5] < 0.5
    s = khat_summary(khat, deg, effective_sample_size(mixed))
    assert s["khat_frac_degenerate"] == pytest.approx(4 / 6)
    assert s["khat_frac_gt_0.7"] == pytest.approx(1 / 6) and s["khat_frac_gt_0.5"] == pytest.approx(1 / 6)
    assert s["khat_max"] == pytest.approx(khat[4]) and s["khat_median"] == pytest.approx(np.median(khat[4:]))


def test_khat_summary_old_call_counts_non_finite_as_degenerate():
    import numpy as np

    s = khat_summary(np.array([0.2, 0.6, 0.9, np.inf, np.nan]))
    assert s["khat_frac_degenerate"] == pytest.approx(0.4)
    assert s["khat_frac_gt_0.7"] == pytest.approx(0.2) and s["khat_frac_gt_0.5"] == pytest.approx(0.4)
    assert s["khat_median"] == pytest.approx(0.6) and s["khat_max"] == pytest.approx(0.9)
    assert math.isnan(s["ess_mean_degenerate"])  # no ESS given
    # ESS given but no degenerate point: nan.
    s = khat_summary(np.array([0.3]), np.array([False]), np.array([7.0]))
    assert math.isnan(s["ess_mean_degenerate"]) and s["khat_frac_degenerate"] == 0.0


def test_exact_posterior_guide_is_degenerate_not_unreliable():
    """Constant log weights (up to round-off): every point degenerate, ESS = K, none counted as > 0.7."""
    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=3)
    x = m.sample(6)
    guide = functools.partial(m.guide, params=m.exact_guide_params())
    K = 200
    est = importance_log_likelihood(m.model, guide, x, num_samples=K, chunk_size=100, batch_size=4)
    assert est.degenerate.dtype == bool and est.degenerate.shape == (6,) and est.degenerate.all()
    s = est.summary()
    assert s["khat_frac_degenerate"] == 1.0 and s["khat_frac_gt_0.7"] == 0.0 and s["khat_frac_gt_0.5"] == 0.0
    assert s["ess_mean_degenerate"] == pytest.approx(K, rel=1e-9)
    off = importance_log_likelihood(m.model, guide, x, num_samples=K, chunk_size=100, diagnostics=False)
    assert not off.degenerate.any() and math.isnan(off.summary()["khat_frac_degenerate"])


def test_experiment_tables_show_the_degenerate_category_and_read_old_results():
    """draw's and imputation_table's markdown show "fraction (ESS)" of degenerate points, and "n/a" for
    results written before the category existed (the committed results/ files, read back by --resume)."""
    import copy
    import json
    from pathlib import Path

    from experiments import draw, imputation_table
    from experiments.report import degenerate_cell
    from experiments.vae import render_markdown

    root = Path(__file__).resolve().parents[1] / "results"
    old = [json.loads((root / "draw-cpu" / v / "result.json").read_text()) for v in ("open-loop", "vae")]
    for r in old:  # as written before the category existed
        for stage in ("raw", "finetuned"):
            for key in ("khat_frac_degenerate", "ess_mean_degenerate"):
                r.get(stage, {}).get("iwae", {}).pop(key, None)
    table = draw.render_table(old)
    assert "degenerate (ESS)" in table and "% / n/a" in table
    new = copy.deepcopy(old)
    new[0]["raw"]["iwae"].update({"khat_frac_degenerate": 0.25, "ess_mean_degenerate": 4987.6})
    assert "25 % (ESS 4988)" in draw.render_table(new)

    assert degenerate_cell({}) == "n/a" and degenerate_cell({"khat_frac_degenerate": "nan"}) == "n/a"
    assert degenerate_cell({"khat_frac_degenerate": 0.0, "ess_mean_degenerate": "nan"}) == "0.00"
    cell = {"iw_estimate": {"khat_median": 0.81, "khat_frac_gt_0.7": 0.6}}
    assert imputation_table.khat_cell(cell) == "0.81 / 0.60 / n/a"
    cell["iw_estimate"].update({"khat_frac_degenerate": 0.1, "ess_mean_degenerate": 12.0})
    assert imputation_table.khat_cell(cell) == "0.81 / 0.60 / 0.10 (ESS 12)"
    t = json.loads((root / "imputation-cpu" / "table.json").read_text())
    md = imputation_table.render(t["config"], t["cells"], t["masks"], t["methods"], [], root / "nowhere")
    assert "fraction degenerate (their mean ESS)" in md and " / n/a |" in md

    vae = json.loads((root / "vae-fashion" / "results.json").read_text())
    vae["test"]["importance_sampling"].pop("khat_frac_degenerate", None)
    assert "fraction degenerate: n/a (their ESS mean n/a)" in render_markdown(vae)


def test_per_step_curves_add_up_to_the_bound():
    from inference.diagnostics import per_step_curves

    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=3, seed=2)
    x = m.sample(5, seed=2)
    guide = functools.partial(m.guide, params=_perturbed(m.exact_guide_params()))
    pyro.set_rng_seed(11)
    curves = per_step_curves(m.model, guide, x)
    pyro.set_rng_seed(11)
    loss = PathwiseKL_ELBO().loss(m.model, guide, x)
    assert set(curves) == {"kl/z_1", "kl/z_2", "kl/z_3", "cost/x"}
    assert sum(curves.values()) * x.shape[0] == pytest.approx(loss, rel=1e-10)
    # z_1's KL does not depend on a sampled history: it is exact, the same on every call.
    assert per_step_curves(m.model, guide, x)["kl/z_1"] == pytest.approx(curves["kl/z_1"], rel=1e-12)
    assert all(v > 0 for k, v in curves.items() if k.startswith("kl/"))


def test_one_scorer_bound_and_estimate_against_the_exact_answer():
    """inference.scoring: under the exact posterior the IWAE estimate is -log p(x) exactly and the path-wise
    bound's mean over draws is -log p(x) within 5 standard errors; iw_limit keeps the first rows."""
    from inference.scoring import nll_summary, score_bound_and_iwae

    m = LinearGaussianChain(latent_dim=2, obs_dim=3, num_steps=2, seed=7)
    x = m.sample(6, seed=7)
    exact = -m.exact_log_marginal(x)
    guide = functools.partial(m.guide, params=m.exact_guide_params())
    s = score_bound_and_iwae(m.model, guide, x, bound_draws=1, iw_samples=20, iw_limit=4, batch_size=4)
    assert s.num_iw == 4 and torch.allclose(s.iwae, exact[:4], atol=1e-9)
    assert bool(s.estimate.degenerate.all())  # constant weights: a degenerate PSIS tail, not "unreliable"
    draws = torch.stack([score_bound_and_iwae(m.model, guide, x, bound_draws=1, iw_samples=1).bound
                         for _ in range(100)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(100)
    assert torch.all((mean - exact).abs() < Z * se + 1e-9)
    summary = nll_summary(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 2]))
    assert summary["nll"] == 2.0 and summary["nll_per_unit"] == 1.5 and summary["num"] == 3
    assert summary["stderr"] == pytest.approx(1 / math.sqrt(3))
    with pytest.raises(ValueError, match="bound_draws must be a positive int"):
        score_bound_and_iwae(m.model, guide, x, bound_draws=0)
    # K = 1: k-hat is inf (ArviZ's value for a tail this short) and the point is degenerate, no crash.
    assert np.isinf(psis_khat(np.zeros((1, 3)), sample_axis=0)).all()
