"""Variational walkback against exact answers: the temperature schedule of Alg. 1, the bound of Eq. 3.5 for a
linear-Gaussian operator against its closed form (below log p(x), the importance-sampled estimate converging
to it), K = 1 as a one-step VAE bound by hand, no gradient through the heating guide, the reversibility
measure on a reversible and an irreversible operator, and clamping."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from inference.importance import importance_log_likelihood
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models import build_model
from ppl_models.walkback import TransitionOperator, VariationalWalkback, reversibility, walk_temperatures

W, C, C_SIGMA, ALPHA = 0.6, 0.1, -0.3, 0.5


def _linear_pair(K=4, n=1, t_max=8.0):
    pair = VariationalWalkback(1, "gaussian", alpha=ALPHA, t_max=t_max, max_extra=3, net="linear",
                               init_mean=torch.tensor([0.2]), init_var=torch.tensor([1.5])).double()
    with torch.no_grad():
        pair.operator.w.fill_(W)
        pair.operator.c.copy_(torch.tensor([C, C_SIGMA], dtype=torch.float64))
    pair.set_walk(K, n)
    return pair


def _step_coefficients(T):
    """s' = a s + b + sd ε for the linear operator at temperature T."""
    a, b = (1 - ALPHA) + ALPHA * W, ALPHA * C
    sd = math.sqrt(T) * (math.log1p(math.exp(C_SIGMA))) + 1e-4
    return a, b, sd


def _exact_log_px(pair, x):
    """log p(x) of the cooling chain: a linear-Gaussian chain from p*, marginal propagated step by step."""
    m, v = float(pair.star_mean), float(pair.star_var)
    for T in reversed(pair.temperatures()):
        a, b, sd = _step_coefficients(T)
        m, v = a * m + b, a * a * v + sd**2
    return -0.5 * math.log(2 * math.pi * v) - 0.5 * (x - m) ** 2 / v


def _closed_form_elbo(pair, x):
    """Eq. 3.5 in expectation under the heating path, from the joint Gaussian of (s_0 = x, s_1, …, s_K)."""
    temps = pair.temperatures()
    K = len(temps)
    mean, L = torch.zeros(K + 1, dtype=torch.float64), torch.zeros(K + 1, K, dtype=torch.float64)
    mean[0] = x
    for t in range(1, K + 1):  # heating: s_t = a s_{t-1} + b + sd_t ε_t
        a, b, sd = _step_coefficients(temps[t - 1])
        mean[t], L[t] = a * mean[t - 1] + b, a * L[t - 1]
        L[t, t - 1] = sd
    cov = L @ L.T

    def e_log_normal(i, j, A, c, var):  # E log N(X_i; A X_j + c, var); j = None: a fixed mean c
        w = torch.zeros(K + 1, dtype=torch.float64)
        w[i] += 1
        if j is not None:
            w[j] -= A
        m = float(w @ mean) - c
        return -0.5 * (math.log(2 * math.pi * var) + (float(w @ cov @ w) + m * m) / var)

    total = e_log_normal(K, None, 0.0, float(pair.star_mean), float(pair.star_var))  # ln p*(s_K)
    for t in range(1, K + 1):  # + ln p_T(s_{t-1} | s_t) − ln q_T(s_t | s_{t-1})
        a, b, sd = _step_coefficients(temps[t - 1])
        total += e_log_normal(t - 1, t, a, b, sd**2) - e_log_normal(t, t - 1, a, b, sd**2)
    return total


def test_the_temperature_stays_one_for_n_steps_then_doubles():
    assert walk_temperatures(7, 2, 64.0) == [1, 1, 1, 2, 4, 8, 16]  # Alg. 1: T doubles after each step t > n
    assert walk_temperatures(6, 0, 8.0) == [1, 2, 4, 8, 8, 8]  # capped at T_max
    pair = VariationalWalkback(4, hidden=(8,), t_max=16.0, max_extra=3)
    K = pair.draw_walk(torch.Generator().manual_seed(0))
    assert K == 4 + pair.n and 0 <= pair.n <= 3  # K = ceil(log2 T_max) + n (Eq. 3.1)
    temps = pair.temperatures()
    assert temps[: pair.n + 1] == [1.0] * (pair.n + 1) and temps[-1] == 8.0
    with pytest.raises(ValueError, match="n >= 0"):
        walk_temperatures(3, -1, 4.0)


def test_the_bound_of_a_linear_operator_equals_its_closed_form_and_stays_below_log_px():
    pair = _linear_pair()
    x = 0.7
    exact_elbo, log_px = _closed_form_elbo(pair, x), _exact_log_px(pair, x)
    assert exact_elbo < log_px
    # the guide samples in the reverse of the model's order: every latent but s_K (z_0, whose model factor
    # p* has no parent) is a Monte Carlo term, as the validity check says
    report = PathwiseKL_ELBO().kl_report(pair.model, pair.guide, torch.tensor([[x]], dtype=torch.float64))
    assert report["z_0"].kind == "analytic"
    assert {report[f"z_{k}"].kind for k in range(1, 4)} == {"monte-carlo"}
    pyro.set_rng_seed(0)
    with torch.no_grad():
        draws = PathwiseKL_ELBO(analytic=False).per_datum(pair.model, pair.guide,
                                                          torch.full((100000, 1), x, dtype=torch.float64))
    se = float(draws.std()) / math.sqrt(draws.numel())
    assert abs(float(draws.mean()) - exact_elbo) < 4 * se
    # the importance-sampled estimate (Eq. 3.10) approaches log p(x) as the number of paths grows
    data = torch.tensor([[x]], dtype=torch.float64)
    gaps = []
    for k in (1, 100, 10000):
        pyro.set_rng_seed(1)
        est = importance_log_likelihood(pair.model, pair.guide, data, num_samples=k, chunk_size=2000,
                                        diagnostics=False)
        gaps.append(abs(float(est.log_likelihood[0]) - log_px))
    assert gaps[2] < gaps[0] and gaps[2] < 0.02


def test_one_step_is_a_vae_bound_computed_by_hand():
    # K = 1: E_q[ln p*(s_1) + ln p_1(x | s_1) − ln q_1(s_1 | x)], q_1 = p_1 = N(a · + b, sd²), in closed form.
    pair = _linear_pair(K=1, n=0)
    x = -0.4
    a, b, sd = _step_coefficients(1.0)
    m_q, m_star, v_star = a * x + b, float(pair.star_mean), float(pair.star_var)
    e_log_star = -0.5 * (math.log(2 * math.pi * v_star) + (sd**2 + (m_q - m_star) ** 2) / v_star)
    e_log_lik = -0.5 * (math.log(2 * math.pi * sd**2) + (a * a * sd**2 + (x - a * m_q - b) ** 2) / sd**2)
    entropy = 0.5 * math.log(2 * math.pi * math.e * sd**2)
    by_hand = e_log_star + e_log_lik + entropy
    pyro.set_rng_seed(2)
    with torch.no_grad():
        draws = PathwiseKL_ELBO(analytic=False).per_datum(pair.model, pair.guide,
                                                          torch.full((100000, 1), x, dtype=torch.float64))
    assert abs(float(draws.mean()) - by_hand) < 4 * float(draws.std()) / math.sqrt(draws.numel())


def test_no_gradient_flows_through_the_heating_guide():
    pair = build_model("walkback", x_dim=6, hidden=(8,), t_max=4.0, max_extra=1)
    pair.set_walk(3)
    x = torch.rand(5, 6)
    guide_trace = poutine.trace(pair.guide).get_trace(x)
    params = list(pair.operator.parameters())
    # neither the heated states nor their log-densities under q have any path to the parameters
    assert not guide_trace.log_prob_sum().requires_grad
    states = [site["value"] for site in guide_trace.nodes.values() if site["type"] == "sample"]
    assert states and not any(s.requires_grad for s in states)
    model_trace = poutine.trace(poutine.replay(pair.model, trace=guide_trace)).get_trace(x)
    grads = torch.autograd.grad(model_trace.log_prob_sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert pair.guide_parameters() == []


class _Rotation(nn.Module):
    """s' = r R_θ s + sd ε in 2-D: a rotation, not time-reversible."""

    form = "gaussian"

    def __init__(self, angle, r=0.9, sd=0.5):
        super().__init__()
        c, s = math.cos(angle), math.sin(angle)
        self.A, self.sd = r * torch.tensor([[c, -s], [s, c]], dtype=torch.float64), sd

    def forward(self, s, T):
        return dist.Normal(s @ self.A.T, self.sd).to_event(1)


def test_reversibility_is_zero_for_a_reversible_operator_and_positive_for_a_rotation():
    torch.manual_seed(0)
    # a 1-D Gaussian AR(1) started from its stationary law obeys detailed balance
    op = TransitionOperator(1, "gaussian", alpha=ALPHA, net="linear").double()
    with torch.no_grad():
        op.w.fill_(W)
        op.c.copy_(torch.tensor([C, C_SIGMA], dtype=torch.float64))
    a, b, sd = _step_coefficients(1.0)
    s0 = b / (1 - a) + sd / math.sqrt(1 - a * a) * torch.randn(2000, 1, dtype=torch.float64)
    rev = reversibility(op, s0, steps=200, burn_in=0)
    assert abs(rev["kl_per_step"]) < 4 * rev["kl_stderr"] + 1e-3 and rev["ratio"] is None
    start = torch.randn(2000, 2, dtype=torch.float64)
    irr = reversibility(_Rotation(angle=1.0), start, steps=200, burn_in=50)
    assert irr["kl_per_step"] > 0.1 and irr["kl_per_step"] > 10 * irr["kl_stderr"]
    assert _Rotation(angle=0.0).A.allclose(_Rotation(angle=0.0).A.T)  # angle 0 is symmetric: reversible
    zero = reversibility(_Rotation(angle=0.0), start, steps=200, burn_in=50)
    assert abs(zero["kl_per_step"]) < 4 * zero["kl_stderr"] + 1e-3


def test_clamped_pixels_stay_fixed_in_every_state_the_operator_sees(monkeypatch):
    from ppl_models.masks import MAR

    pair = build_model("walkback", x_dim=64, form="bernoulli", hidden=(8,), t_max=4.0, max_extra=1)
    pair.eval()
    x = torch.rand(3, 64).bernoulli()
    mask = MAR(3, (8, 8))(x, torch.Generator().manual_seed(0))
    seen = []
    forward = pair.operator.forward

    def recording(s, T):
        seen.append(s.clone())
        return forward(s, T)

    monkeypatch.setattr(pair.operator, "forward", recording)
    out = pair.run(torch.rand(3, 64).bernoulli(), 6, mask=mask, known=x)
    assert len(seen) == 6 and all(torch.equal(s[mask.bool()], x[mask.bool()]) for s in seen)
    assert torch.equal(out * mask, x * mask)


# ------------------------------------------------------------------------------------------------ training


def _trainer(pair, loss, x, out, epochs=1, extras=(), batch_size=8, lr=1e-2, validate=None):
    from inference.train import Trainer

    return Trainer(pair.model, pair.guide, pair, loss, pyro.optim.Adam({"lr": lr}), train_data=x,
                   batch_size=batch_size, epochs=epochs, seed=0, device="cpu", out_dir=out, progress=False,
                   transform=lambda b, g: (pair.draw_walk(g), b)[1], extras=extras, validate=validate)


def test_online_terms_sum_to_the_trace_elbo_of_the_same_path():
    from inference.walkback import OnlineWalkbackELBO

    pair = build_model("walkback", x_dim=5, hidden=(8,), t_max=8.0, max_extra=2).double()
    pair.set_walk(4, 1)
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.manual_seed(3)
    terms = list(OnlineWalkbackELBO(pair).online_losses(pair.model, pair.guide, x))
    end = pair.last_end.clone()
    assert len(terms) == 5 and [t.requires_grad for t in terms] == [True] * 4 + [False]
    torch.manual_seed(3)  # the same heated path: the guide draws s_1..s_K in the same order
    with torch.no_grad():
        elbo = PathwiseKL_ELBO(analytic=False).per_datum(pair.model, pair.guide, x)
    assert torch.equal(pair.last_end, end)
    assert float(sum(t.detach() for t in terms)) == pytest.approx(-float(elbo.sum()), rel=1e-10)


def test_the_online_update_takes_one_optimiser_step_per_walk_step(tmp_path):
    from inference.walkback import OnlineWalkbackELBO, PStarMoments

    pair = build_model("walkback", x_dim=4, hidden=(8,), t_max=4.0, max_extra=3)
    x = torch.randn(8, 4)  # one minibatch
    seen = []
    draw = pair.draw_walk
    pair.draw_walk = lambda g: seen.append(draw(g)) or seen[-1]
    trainer = _trainer(pair, OnlineWalkbackELBO(pair), x, tmp_path, extras=[PStarMoments(pair, 0.5)])
    trainer.fit()
    steps = {k: int(s["state"][0]["step"]) for k, s in trainer.pyro_optim.get_state().items()}
    # K = ceil(log2 4) + n Adam steps for the walk's K terms on the shared layers; on a temperature level's
    # normalisation, one per step at that temperature (T = 1 for the first n + 1 steps, then 2 = T_max / 2)
    K = seen[0]
    assert steps["walkback$$$operator.head.weight"] == K >= 2
    assert steps["walkback$$$operator.norms.0.0.weight"] == K - 1
    assert steps["walkback$$$operator.norms.1.0.weight"] == 1
    # the whole-walk update: one step per minibatch
    pair2 = build_model("walkback", x_dim=4, hidden=(8,), t_max=4.0, max_extra=3)
    trainer2 = _trainer(pair2, pyro.infer.Trace_ELBO(), x, tmp_path / "walk", extras=[PStarMoments(pair2)])
    trainer2.fit()
    assert int(trainer2.pyro_optim.get_state()["walkback$$$operator.head.weight"]["state"][0]["step"]) == 1


def test_p_star_moves_towards_the_heated_end_states_and_resume_is_exact(tmp_path):
    from inference.walkback import PStarMoments

    pair = build_model("walkback", x_dim=3, hidden=(8,), t_max=4.0, max_extra=2)
    before_mean, before_var = pair.star_mean.clone(), pair.star_var.clone()
    hook = PStarMoments(pair, momentum=0.25)
    pair.last_end = torch.randn(50, 3) * 2 + 1
    hook.step(None)
    assert torch.allclose(pair.star_mean, before_mean + 0.25 * (pair.last_end.mean(0) - before_mean))
    assert torch.allclose(pair.star_var, before_var + 0.25 * (pair.last_end.var(0) - before_var))
    with pytest.raises(ValueError, match="momentum"):
        PStarMoments(pair, momentum=0.0)

    def fit(out, epochs, online, resume=False):
        from inference.walkback import OnlineWalkbackELBO

        pyro.set_rng_seed(0)
        p = build_model("walkback", x_dim=3, hidden=(8,), t_max=4.0, max_extra=2)
        x = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
        loss = OnlineWalkbackELBO(p) if online else pyro.infer.Trace_ELBO()
        t = _trainer(p, loss, x, out, epochs=epochs, extras=[PStarMoments(p)])
        return t.fit(resume=resume), p, t.pyro_optim.get_state()

    for online in (False, True):
        out = tmp_path / str(online)
        straight, p1, adam1 = fit(out / "a", 3, online)
        fit(out / "b", 1, online)
        resumed, p2, adam2 = fit(out / "b", 3, online, resume=True)
        assert [m["train_loss"] for m in straight] == [m["train_loss"] for m in resumed]
        assert all(torch.equal(v, p2.state_dict()[k]) for k, v in p1.state_dict().items())  # star moments too
        assert not torch.equal(p1.star_mean, torch.zeros(3))
        assert set(adam1) == set(adam2)
        for name, state in adam1.items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(torch.as_tensor(state["state"][0][key]),
                                   torch.as_tensor(adam2[name]["state"][0][key]))


def test_a_non_finite_online_term_stops_training_with_a_clear_error(tmp_path):
    from inference.train import NonFiniteLossError
    from inference.walkback import OnlineWalkbackELBO

    pair = build_model("walkback", x_dim=4, t_max=4.0, max_extra=0, net="linear")
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")  # a NaN state: its heating draw and the first term are NaN
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    with pyro.validation_enabled(False), pytest.raises(NonFiniteLossError):  # NaN reaches the loss
        _trainer(pair, OnlineWalkbackELBO(pair), x, tmp_path, validate=False).fit()
    assert not (tmp_path / "checkpoint.pt").exists()
    assert all(torch.equal(v, pair.state_dict()[k]) for k, v in before.items())  # stopped before any update


def test_inpainting_keeps_the_known_pixels_through_the_cooling_walk():
    from ppl_models.masks import MAR

    pair = build_model("walkback", x_dim=64, form="gaussian", hidden=(8,), t_max=8.0, max_extra=2)
    pair.eval()
    pair.set_walk(5)
    x = torch.rand(4, 64)
    mask = MAR(3, (8, 8))(x, torch.Generator().manual_seed(0))
    frames = pair.cool(torch.randn(4, 64), mask, x, every_step=True)
    assert len(frames) == 5 and all(torch.equal(f[mask.bool()], x[mask.bool()]) for f in frames)
    filled = pair.inpaint(x, mask)
    assert torch.equal(filled[mask.bool()], x[mask.bool()]) and not torch.equal(filled, x)


def test_importance_samples_through_per_step_batch_norm_match_one_by_one():
    # the vectorised importance samples are rows of batch norm's input: in eval mode each row's density must
    # not depend on the others
    pair = build_model("walkback", x_dim=3, hidden=(8,), t_max=4.0, max_extra=0, norm="batch").double()
    pair.eval()
    s = torch.randn(7, 5, 3, dtype=torch.float64)
    together = pair.operator(s, 2.0).log_prob(s + 0.1)
    alone = torch.stack([pair.operator(s[i], 2.0).log_prob(s[i] + 0.1) for i in range(7)])
    assert torch.allclose(together, alone)


def test_each_online_heating_step_uses_the_parameters_the_previous_update_left():
    from inference.walkback import OnlineWalkbackELBO

    pair = build_model("walkback", x_dim=3, hidden=(8,), t_max=8.0, max_extra=0)
    pair.set_walk(3, 0)
    seen = []
    forward = pair.operator.forward

    def recording(s, T):
        seen.append(float(pair.operator.head.bias[0].detach()))
        return forward(s, T)

    pair.operator.forward = recording
    terms = OnlineWalkbackELBO(pair).online_losses(pair.model, pair.guide, torch.randn(4, 3))
    for step in range(3):
        next(terms)  # heats s_{t}, then scores ln p(s_{t-1} | s_t)
        with torch.no_grad():
            pair.operator.head.bias[0] = step + 1.0  # "the update" after term t
    # per step: the heating draw, then the scored reverse transition — both with the latest parameters
    assert seen[0] == seen[1] and seen[2:] == [1.0, 1.0, 2.0, 2.0]


def test_an_online_loss_refuses_hooks_that_add_a_generator_term(tmp_path):
    from inference.train import ExtraTerm
    from inference.walkback import OnlineWalkbackELBO

    class Adds(ExtraTerm):
        def __init__(self):
            self.module, self.optimizer = nn.Linear(1, 1), None

        def generator_loss(self, batch):
            return torch.zeros(())

    pair = build_model("walkback", x_dim=4, hidden=(8,), t_max=4.0, max_extra=0)
    with pytest.raises(ValueError, match="takes no hook's generator_loss"):
        _trainer(pair, OnlineWalkbackELBO(pair), torch.randn(8, 4), tmp_path, extras=[Adds()])
