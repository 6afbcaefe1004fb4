"""The Gaussian diffusion pair against exact answers: the bound of a linear-Gaussian denoiser on 1-D Gaussian
data against its closed form (three estimators), the discretised decoder's normalisation, the noising
process's end state, each analytic step KL against Monte Carlo, L_simple as a reweighted KL, and sampling
and inpainting."""

import math

import pyro
import pytest
import torch

from inference.diffusion_elbo import SubsampledDiffusionELBO
from inference.diffusion_simple import SimpleDiffusionLoss
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models import build_model
from ppl_models.gaussian_diffusion import DiscretizedGaussian, GaussianDiffusion, linear_schedule


def _linear_pair(T=4, variance="beta"):
    torch.manual_seed(0)
    pair = GaussianDiffusion(x_dim=1, num_steps=T, levels=None, variance=variance, denoiser="linear",
                             beta_start=1e-3, beta_end=2e-3).double()
    with torch.no_grad():
        pair.eps_net.a.copy_(torch.tensor([0.9, 0.6, 0.3, 0.5][:T], dtype=torch.float64))
        pair.eps_net.b.copy_(torch.tensor([0.1, -0.2, 0.05, 0.0][:T], dtype=torch.float64))
    return pair


def _closed_form_elbo(pair, x0):
    """E_q[log p(x_{0:T}) − log q(x_{1:T} | x_0)] from the joint Gaussians, without the pair's KL formulas:
    q(x_{1:T} | x_0) by the forward recursion x_t = √(1 − β_t) x_{t-1} + √β_t ε_t, and each factor of p
    as log N(x_{t-1}; A_t x_t + c_t, s_t²) with A_t, c_t read off the linear ε̂ = a_t x_t + b_t."""
    T = pair.num_steps
    beta, ab = pair.beta.double(), pair.alpha_bar.double()
    a, b = pair.eps_net.a.detach(), pair.eps_net.b.detach()
    # X = (x_0, x_1, ..., x_T) = mean + L ε, ε ~ N(0, I_T)
    mean = torch.zeros(T + 1, dtype=torch.float64)
    L = torch.zeros(T + 1, T, dtype=torch.float64)
    mean[0] = x0
    for t in range(1, T + 1):
        mean[t] = (1 - beta[t - 1]).sqrt() * mean[t - 1]
        L[t] = (1 - beta[t - 1]).sqrt() * L[t - 1]
        L[t, t - 1] = beta[t - 1].sqrt()
    cov = L @ L.T

    def expected_log_normal(i, j, A, c, var):  # E_q log N(X_i; A X_j + c, var)
        w = torch.zeros(T + 1, dtype=torch.float64)
        w[i] += 1
        w[j] -= A
        m = float(w @ mean) - c
        return -0.5 * (math.log(2 * math.pi * var) + (float(w @ cov @ w) + m * m) / var)

    e_log_p = -0.5 * (math.log(2 * math.pi) + float(cov[T, T] + mean[T] ** 2))  # p(x_T) = N(0, 1)
    for t in range(1, T + 1):
        scale = beta[t - 1] / (1 - ab[t - 1]).sqrt()
        A = float((1 - scale * a[t - 1]) / (1 - beta[t - 1]).sqrt())
        c = float(-scale * b[t - 1] / (1 - beta[t - 1]).sqrt())
        e_log_p += expected_log_normal(t - 1, t, A, c, float(pair.sigma2.double()[t - 1]))
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov[1:, 1:]))
    return e_log_p + entropy


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_the_bound_of_a_linear_gaussian_denoiser_equals_its_closed_form(variance):
    # 1-D Gaussian data x ~ N(0.3, 0.5²) (on the model's [−1, 1] scale), T = 4, continuous decoder. Each
    # estimator's mean over 40000 draws per point must match the closed form within 4 standard errors.
    pair = _linear_pair(variance=variance)
    g = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.5 * torch.randn(5, generator=g, dtype=torch.float64)
    exact = torch.tensor([_closed_form_elbo(pair, float(v)) for v in x0], dtype=torch.float64)
    data = ((x0 + 1) / 2).repeat_interleave(40000).unsqueeze(-1)  # the pair observes 2x − 1
    pyro.set_rng_seed(0)
    # (PathwiseKL_ELBO.per_datum is the ELBO; the diffusion estimators return −ELBO, as losses)
    every, one = SubsampledDiffusionELBO("all"), SubsampledDiffusionELBO()
    estimators = {"path-wise KL": lambda: PathwiseKL_ELBO().per_datum(pair.model, pair.guide, data),
                  "all steps": lambda: -every.per_datum(pair.model, pair.guide, data),
                  "one step": lambda: -one.per_datum(pair.model, pair.guide, data)}
    for name, estimate in estimators.items():
        with torch.no_grad():
            draws = estimate().reshape(5, 40000)
        se = draws.std(1) / math.sqrt(40000)
        assert ((draws.mean(1) - exact).abs() < 4 * se + 1e-9).all(), (name, draws.mean(1), exact, se)
    # and a mutation fails it: the model's step variance off by 10 % moves the bound beyond the tolerance
    wrong = _linear_pair(variance=variance)
    wrong.sigma.mul_(math.sqrt(1.1))
    with torch.no_grad():
        draws = -SubsampledDiffusionELBO("all").per_datum(wrong.model, wrong.guide, data).reshape(5, 40000)
    assert ((draws.mean(1) - exact).abs() > 4 * draws.std(1) / math.sqrt(40000)).any()


def test_every_per_step_kl_is_analytic_and_agrees_with_monte_carlo():
    pair = build_model("diffusion-gaussian", x_dim=64, num_steps=6, channels=8, groups=4,
                       embed_dim=8).double()
    x = torch.rand(3, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = PathwiseKL_ELBO(strict=True).kl_report(pair.model, pair.guide, x)
    assert list(report) == [f"z_{k}" for k in range(6)] and {k.kind for k in report.values()} == {"analytic"}
    torch.manual_seed(1)
    x0 = pair.observed(x)
    for t in (2, 4, 6):
        xt = pair.q_sample(x, t)
        q, p = pair.q_posterior(xt, x0, t), pair.p_step(xt, t)
        with torch.no_grad():
            draws = q.sample((20000,))
            ratio = q.log_prob(draws) - p.log_prob(draws)
            se = ratio.std(0) / math.sqrt(20000)
            assert ((ratio.mean(0) - pair.step_kl(xt, x, t)).abs() < 4 * se).all()


def test_the_discretised_decoder_is_a_distribution_over_the_grey_levels():
    for levels in (17, 256):
        grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
        loc = torch.tensor([-1.4, -0.3, 0.0, 0.7, 1.0, 2.5], dtype=torch.float64, requires_grad=True)
        scale = torch.tensor([0.01, 0.3, 1e-3, 0.05, 2.0, 0.01], dtype=torch.float64)
        lp = DiscretizedGaussian(loc, scale, levels).log_prob(grid[:, None].expand(levels, 6))
        torch.testing.assert_close(lp.exp().sum(0), torch.ones(6, dtype=torch.float64), atol=1e-9, rtol=0)
        lp.sum().backward()
        assert torch.isfinite(loc.grad).all()
    # an inner bin's mass is Φ(b) − Φ(a) (checked against erf), and samples land on the grid
    d = DiscretizedGaussian(torch.tensor(0.1), torch.tensor(0.2), 256)
    v = torch.tensor(2 * 140 / 255 - 1)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected = phi((float(v) + 1 / 255 - 0.1) / 0.2) - phi((float(v) - 1 / 255 - 0.1) / 0.2)
    assert float(d.log_prob(v).exp()) == pytest.approx(expected, rel=1e-4)
    s = d.sample((1000,))
    k = (s + 1) * 255 / 2
    assert torch.allclose(k, k.round(), atol=1e-4) and s.min() >= -1 and s.max() <= 1


def test_the_noising_process_tends_to_the_prior_as_t_grows():
    # KL(q(x_T | x_0) || N(0, I)) for the extreme image (every pixel at 1). With Ho's β range (1e-4 to 0.02)
    # over T steps it shrinks as T grows and is below 0.02 nats per 784-pixel image at T = 1000; the default
    # schedule scales that range by 1000/T, which keeps the end that close to the prior at smaller T too.
    x = torch.ones(1, 784)

    def prior_kl(T, ho_range):
        scale = T / 1000 if ho_range else 1.0  # cancels the schedule's 1000/T scaling
        pair = GaussianDiffusion(num_steps=T, denoiser="linear", x_dim=784, beta_start=1e-4 * scale,
                                 beta_end=0.02 * scale)
        return float(pair.prior_kl(x))

    kls = [prior_kl(T, ho_range=True) for T in (250, 500, 1000)]
    assert kls[0] > kls[1] > kls[2] and kls[2] < 0.02 and kls[0] > 1.0
    assert prior_kl(100, ho_range=False) < 0.02
    beta = linear_schedule(1000)
    assert float(beta[0]) == pytest.approx(1e-4) and float(beta[-1]) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="beta_start"):
        linear_schedule(10, 0.5, 0.1)


def test_l_simple_is_the_step_kl_reweighted():
    # With x_t = √ᾱ x_0 + √(1 − ᾱ) ε and σ_t² = β̃_t (the variance terms vanish), the KL of step t is
    # β_t² / (2 σ_t² α_t (1 − ᾱ_t)) ||ε − ε̂||² (Ho et al., Eq. 12).
    pair = GaussianDiffusion(x_dim=64, num_steps=50, channels=8, groups=4, embed_dim=8,
                             variance="beta_tilde").double()
    torch.manual_seed(0)
    x = torch.rand(4, 64, dtype=torch.float64)
    for t in (2, 17, 50):
        eps = torch.randn(4, 64, dtype=torch.float64)
        ab, beta = pair.alpha_bar.double()[t - 1], pair.beta.double()[t - 1]
        xt = ab.sqrt() * pair.observed(x) + (1 - ab).sqrt() * eps
        weight = beta**2 / (2 * pair.sigma2.double()[t - 1] * (1 - beta) * (1 - ab))
        with torch.no_grad():
            expected = weight * (eps - pair.eps(xt, t)).pow(2).sum(-1)
            # (rtol 1e-5: the schedule's buffers are float32, so ᾱ_t = ᾱ_{t-1}(1 − β_t) holds to rounding)
            torch.testing.assert_close(pair.step_kl(xt, x, t), expected, rtol=1e-5, atol=1e-8)
    loss = SimpleDiffusionLoss().differentiable_loss(pair.model, pair.guide, x)
    loss.backward()
    assert all(p.grad is not None for p in pair.eps_net.parameters())
    with pytest.raises(TypeError, match="SimpleDiffusionLoss needs .*simple_loss"):
        bernoulli = build_model("diffusion-bernoulli", x_dim=4, num_steps=2, hidden=(4,))
        SimpleDiffusionLoss().loss(bernoulli.model, None, x)


def test_sampling_strides_and_inpainting():

    pair = GaussianDiffusion(x_dim=64, num_steps=40, channels=8, groups=4, embed_dim=8, eta=0.0)
    assert pair.sample(3).shape == (3, 64)  # all 40 ancestral steps, no data
    torch.manual_seed(0)
    xT = pair.prior(2).sample()
    a, b = pair._denoise(xT, 8), pair._denoise(xT, 8)
    torch.testing.assert_close(a, b)  # η = 0: the strided sampler is deterministic given x_T
    assert a.min() >= 0 and a.max() <= 1
    traj = pair.trajectory(2, steps=None, frames=10)
    assert traj.shape == (12, 2, 64) and traj.min() >= 0 and traj.max() <= 1
    with pytest.raises(ValueError, match="variance must be one of"):
        GaussianDiffusion(x_dim=64, variance="learned")
    with pytest.raises(ValueError, match="not a square image"):
        GaussianDiffusion(x_dim=60)


@pytest.mark.parametrize("form", ["gaussian", "bernoulli"])
def test_inpainting_clamps_the_known_pixels_at_every_visited_step(form, monkeypatch):
    # q_sample is replaced by a marker, so every recorded state must show the marker on the known pixels
    # (the clamp inside the loop), and the result the known values themselves (the clamp at the end).
    from ppl_models.masks import MAR

    sizes = {"num_steps": 12} | ({"channels": 8, "groups": 4, "embed_dim": 8} if form == "gaussian" else
                                 {"hidden": (8,)})
    pair = build_model(f"diffusion-{form}", x_dim=64, **sizes)
    x = torch.rand(3, 64).bernoulli()
    mask = MAR(3, (8, 8))(x, torch.Generator().manual_seed(0))
    monkeypatch.setattr(pair, "q_sample", lambda data, s: torch.full_like(data, 0.25))
    states = []
    monkeypatch.setattr(pair, "show", lambda xt: xt.clone())
    out = pair._denoise(pair.prior(3).sample(), 6, clamp=(x, mask), record=states,
                        record_at=set(pair.strides(6)[1:]))
    assert len(states) == 5 and all(torch.equal(s_[mask.bool()], torch.full_like(s_[mask.bool()], 0.25))
                                    for s_ in states)
    assert not torch.equal(states[0][~mask.bool()], torch.full_like(states[0][~mask.bool()], 0.25))
    monkeypatch.undo()
    out = pair.inpaint(x, mask, steps=6)
    assert torch.equal(out * mask, x * mask) and not torch.equal(out * (1 - mask), x * (1 - mask))
    assert ((out >= 0) & (out <= 1)).all()


def test_ddim_at_full_noise_and_one_step_is_the_posterior_at_the_predicted_x0():
    # η = 1, s = t − 1: x_s ~ N(μ̃_t(x_t, x̂_0), β̃_t) with x̂_0 unclipped (Song et al. 2021, Sec. 4.1).
    pair = GaussianDiffusion(x_dim=4, num_steps=20, denoiser="linear").double()
    with torch.no_grad():
        pair.eps_net.a.fill_(0.3)
        pair.eps_net.b.fill_(-0.1)
    xt = torch.tensor([[0.3, -0.5, 0.05, 1.2]], dtype=torch.float64)
    for t in (2, 9, 20):
        x0 = pair.predict_x0(xt, t).detach()
        post = pair.q_posterior(xt, x0, t)
        torch.manual_seed(t)
        draws = pair.ddim(xt.expand(40000, 4), t, t - 1, eta=1.0, clip=False).detach()
        se = draws.std(0) / math.sqrt(40000)
        assert ((draws.mean(0) - post.mean[0]).abs() < 4 * se).all()
        torch.testing.assert_close(draws.std(0), post.base_dist.scale[0], rtol=0.02, atol=0)
        # and at η = 0 the move is the posterior mean's deterministic counterpart: no noise at all
        det = pair.ddim(xt.expand(3, 4), t, t - 1, eta=0.0, clip=False)
        assert torch.equal(det[0], det[1])


def test_l_simple_has_the_value_of_its_formula():
    pair = GaussianDiffusion(x_dim=4, num_steps=10, denoiser="linear").double()
    with torch.no_grad():
        pair.eps_net.a.copy_(torch.linspace(-0.5, 0.5, 10, dtype=torch.float64))
        pair.eps_net.b.fill_(0.2)
    x = torch.tensor([[0.0, 0.25, 1.0, 0.5], [1.0, 1.0, 0.0, 0.75]], dtype=torch.float64)
    t = torch.tensor([3, 10])
    torch.manual_seed(0)
    got = pair.simple_loss(x, t)
    torch.manual_seed(0)
    noise = torch.randn(2, 4, dtype=torch.float64)
    ab = torch.cumprod(1 - linear_schedule(10), 0)[t - 1].unsqueeze(-1)
    xt = ab.sqrt() * (2 * x - 1) + (1 - ab).sqrt() * noise
    a, b = pair.eps_net.a.detach()[t - 1].unsqueeze(-1), 0.2
    torch.testing.assert_close(got.detach(), (noise - (a * xt + b)).pow(2).sum(-1), rtol=1e-6, atol=0)
