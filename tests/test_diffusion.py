"""The bit-flip diffusion pair against exact answers: its path-wise bound against enumeration of every path,
the validity check, the closed-form posterior, the noising process's end state, and sampling without data."""

import itertools
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models import build_model
from ppl_models.diffusion import BernoulliDiffusion, bitflip_schedule


def _pair(T=3, D=2):
    torch.manual_seed(0)
    return BernoulliDiffusion(x_dim=D, num_steps=T, hidden=(8,), embed_dim=4).double()


def _log_joint(fn, x, values):
    trace = poutine.trace(poutine.condition(fn, data=values)).get_trace(x)
    return trace.log_prob_sum()


def test_every_per_step_kl_is_analytic_in_the_models_order():
    pair, x = _pair(T=5, D=4), torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    report = PathwiseKL_ELBO(strict=True).kl_report(pair.model, pair.guide, x)
    assert list(report) == [f"z_{k}" for k in range(5)]
    assert {k.kind for k in report.values()} == {"analytic"}


def test_the_bound_equals_its_value_by_enumerating_every_path():
    # D = 2 pixels, T = 3 steps: 2^6 paths. The exact ELBO and log p(x) by enumeration; the path-wise KL
    # estimator's mean over draws must match the ELBO within 4 standard errors, and stay below log p(x).
    pair, x = _pair(), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    elbo, log_px_terms = 0.0, []
    for bits in itertools.product([0.0, 1.0], repeat=6):
        values = {f"z_{k}": torch.tensor([bits[2 * k : 2 * k + 2]], dtype=torch.float64) for k in range(3)}
        with torch.no_grad():
            log_q = _log_joint(pair.guide, x, values)
            log_p = _log_joint(pair.model, x, values)
        elbo += float(log_q.exp() * (log_p - log_q)) if log_q > -math.inf else 0.0
        log_px_terms.append(float(log_p))
    log_px = float(torch.logsumexp(torch.tensor(log_px_terms), 0))
    pyro.set_rng_seed(0)
    many = x.expand(20000, 2)  # one independent path per row
    for estimator in (PathwiseKL_ELBO(), PathwiseKL_ELBO(analytic=False)):  # analytic KLs, then Monte Carlo
        draws = estimator.per_datum(pair.model, pair.guide, many)
        se = float(draws.std() / math.sqrt(draws.numel()))
        assert abs(float(draws.mean()) - elbo) < 4 * se + 1e-9
    assert elbo <= log_px + 1e-9


def test_the_posterior_is_bayes_rule_on_the_forward_kernels():
    pair = _pair(T=6, D=1)
    for t in range(2, 7):
        b = float(pair.beta[t - 1])
        for x0, xt in itertools.product([0.0, 1.0], repeat=2):
            prior1 = float(pair.q_t_given_0(torch.tensor([x0]), t - 1))
            like = {a: (a * (1 - b) + b / 2) if xt == 1 else 1 - (a * (1 - b) + b / 2) for a in (0.0, 1.0)}
            expected = like[1.0] * prior1 / (like[1.0] * prior1 + like[0.0] * (1 - prior1))
            got = float(pair.posterior(torch.tensor([xt]), torch.tensor([x0]), t))
            assert got == pytest.approx(expected, abs=1e-6)


def test_the_noising_process_ends_at_the_prior():
    # β_T = 1: q(x_T | x_0) is Bernoulli(1/2) for every x_0, so KL(q(x_T | x_0) || p(x_T)) = 0 at every T.
    for T in (1, 5, 50):
        beta = bitflip_schedule(T)
        assert float(beta[-1]) == 1.0
        pair = BernoulliDiffusion(x_dim=3, num_steps=T, hidden=(4,))
        end = pair.q_t_given_0(torch.tensor([0.0, 1.0, 1.0]), T)
        torch.testing.assert_close(end, torch.full((3,), 0.5))
    # The marginal of the one-step kernels composed is the closed form q(x_t | x_0).
    pair = _pair(T=6, D=1)
    p = torch.tensor([1.0], dtype=torch.float64)
    for t in range(1, 7):
        b = pair.beta[t - 1]
        p = p * (1 - b) + b / 2
        torch.testing.assert_close(p, pair.q_t_given_0(torch.tensor([1.0], dtype=torch.float64), t))
    with pytest.raises(ValueError, match="num_steps"):
        bitflip_schedule(0)


def test_sampling_runs_without_data_and_the_model_is_registered():
    pair = build_model("diffusion-bernoulli", x_dim=6, num_steps=4, hidden=(8,))
    s = pair.sample(5)
    assert s.shape == (5, 6) and ((s >= 0) & (s <= 1)).all()
    assert pair.model(None, num_samples=3).shape == (3, 6)
    assert pair.guide_parameters() == []


def test_the_subsampled_estimator_is_unbiased_for_the_full_path_bound():
    # T = 6 steps, 3 pixels, one image: the mean of the one-step-per-draw estimator matches the full-path
    # path-wise KL bound (each with its standard error; 4 SE of the difference) and is differentiable.
    from inference.diffusion_elbo import SubsampledDiffusionELBO

    pair = _pair(T=6, D=3)
    x = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    many = x.expand(40000, 3)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        full = -PathwiseKL_ELBO().per_datum(pair.model, pair.guide, many)
        sub = SubsampledDiffusionELBO().per_datum(pair.model, pair.guide, many)
    se = math.sqrt(float(full.var()) / full.numel() + float(sub.var()) / sub.numel())
    assert abs(float(full.mean()) - float(sub.mean())) < 4 * se
    assert float(sub.std()) > 0  # it is an estimate, not the same number every time
    loss = SubsampledDiffusionELBO().differentiable_loss(pair.model, pair.guide, x)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.parameters())
    with pytest.raises(TypeError, match="needs the bound model method of a diffusion pair"):
        SubsampledDiffusionELBO().loss(lambda x: None, None, x)


def test_each_analytic_step_kl_agrees_with_a_monte_carlo_estimate():
    pair = _pair(T=5, D=4)
    torch.manual_seed(3)
    x0 = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    for t in (2, 3, 5):
        xt = torch.bernoulli(pair.q_t_given_0(x0, t))
        q = pair._bern(pair.posterior(xt, x0, t))
        p = pair._bern(pair._step_probs(xt, t))
        with torch.no_grad():
            draws = q.sample((20000,))
            ratio = q.log_prob(draws) - p.log_prob(draws)
            se = float(ratio.std() / math.sqrt(ratio.numel()))
            assert abs(float(ratio.mean()) - float(pair.step_kl(xt, x0, t))) < 4 * se + 1e-9


def test_a_strided_jump_is_bayes_rule_on_the_composed_kernels():
    pair = _pair(T=8, D=1)

    def kernel(t):  # 2x2 one-step kernel q(x_t = j | x_{t-1} = i)
        b = float(pair.beta[t - 1])
        return torch.tensor([[1 - b / 2, b / 2], [b / 2, 1 - b / 2]], dtype=torch.float64)

    for s, t in ((1, 4), (2, 8), (5, 6)):
        composed = torch.eye(2, dtype=torch.float64)
        for u in range(s + 1, t + 1):
            composed = composed @ kernel(u)
        for x0, xt in itertools.product([0.0, 1.0], repeat=2):
            prior1 = float(pair.q_t_given_0(torch.tensor([x0], dtype=torch.float64), s))
            num1 = composed[1, int(xt)] * prior1
            expected = float(num1 / (num1 + composed[0, int(xt)] * (1 - prior1)))
            got = float(pair.posterior(torch.tensor([xt]), torch.tensor([x0]), t, s))
            assert got == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="need 1 <= s < t <= T"):
        pair.posterior(torch.tensor([1.0]), torch.tensor([1.0]), 3, 3)


def test_strided_sampling_keeps_what_it_promises():
    pair = build_model("diffusion-bernoulli", x_dim=16, num_steps=20, hidden=(8,))
    assert pair.strides() == list(range(20, 0, -1))
    assert pair.strides(5) == [20, 15, 10, 6, 1] and pair.strides(2) == [20, 1]
    assert pair.sample(3, steps=5).shape == (3, 16)
    # (inpainting, shared with the Gaussian form: tests/test_gaussian_diffusion.py)
