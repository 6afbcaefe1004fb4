"""The variational-GSN pieces: the self-looped chain as a model/guide pair, the ORK objective (Eq. 5), the
guide function and L_g (Eqs. 6-7) as a trainer hook, and partial-control chains."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.distributions import Normal
from pyro.poutine.util import prune_subsample_sites

from inference.collaborative import CollaborativeShaping, GuideFunction, generator_hinge, guide_function_loss
from inference.ork_elbo import OverRegularisedKL_ELBO
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from inference.train import Trainer
from ppl_models import VAE, build_model
from ppl_models.gsn_chain import GSNChain
from ppl_models.masks import MAR


def _chain(**kw) -> GSNChain:
    torch.manual_seed(0)
    return GSNChain(**{"x_dim": 16, "z_dim": 3, "hidden": (12,), "num_steps": 3, **kw}).double()


def _data(n=7, d=16):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("feed", ["mean", "sample"])
@pytest.mark.parametrize("walkback", [False, True])
def test_every_kl_of_the_chain_is_analytic(likelihood, feed, walkback):
    chain = _chain(likelihood=likelihood, feed=feed, walkback=walkback)
    report = PathwiseKL_ELBO(strict=True).kl_report(chain.model, chain.guide, _data())
    assert set(report) == set(chain.latent_sites)
    assert {k.kind for k in report.values()} == {"analytic"}


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_unrolled_loss_is_the_sum_of_per_step_free_energies(likelihood):
    # The known answer, written out: z_t ~ q(z | x_t), x_{t+1} = decoder mean, Σ_t −log p(x_t | z_t) + KL.
    chain, x = _chain(likelihood=likelihood), _data()
    guide_trace = prune_subsample_sites(poutine.trace(chain.guide).get_trace(x))
    replayed = poutine.replay(chain.model, trace=guide_trace)
    model_trace = prune_subsample_sites(poutine.trace(replayed).get_trace(x))
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    elbo = PathwiseKL_ELBO()
    value = sum(t.sum() for _, t, _, _ in elbo._terms(model_trace, guide_trace))
    expected, cur = 0.0, x
    prior = Normal(torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)).to_event(1)
    for t in range(3):
        z = guide_trace.nodes[f"z_{t}"]["value"]
        loc, scale = chain.encode(cur)
        kl = torch.distributions.kl_divergence(Normal(loc, scale).to_event(1), prior)
        out = chain.decode(z)
        if likelihood == "bernoulli":
            logp = -F.binary_cross_entropy_with_logits(out, cur, reduction="none").sum(-1)
        else:
            logp = Normal(torch.sigmoid(out), (0.5 * chain.log_var).exp()).log_prob(cur).sum(-1)
        expected = expected + (logp - kl).sum()
        cur = torch.sigmoid(out)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)


def test_one_step_chain_is_the_vae_bound():
    chain = _chain(likelihood="bernoulli", num_steps=1)
    vae = VAE(16, 3, (12,)).double()
    vae.load_state_dict({k: v for k, v in chain.state_dict().items() if k != "log_var"})
    x = _data()
    pyro.set_rng_seed(3)
    a = PathwiseKL_ELBO().per_datum(chain.model, chain.guide, x)
    pyro.set_rng_seed(3)
    b = PathwiseKL_ELBO().per_datum(vae.model, vae.guide, x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)


def test_walkback_reconstructs_the_data_and_stops_gradients_through_the_walk():
    chain, x = _chain(walkback=True), _data()
    guide_trace = poutine.trace(chain.guide).get_trace(x)
    trace = poutine.trace(poutine.replay(chain.model, trace=guide_trace)).get_trace(x)
    for name in ("x", "x_1", "x_2"):
        assert torch.equal(trace.nodes[name]["value"], x)
    unrolled = _chain()
    trace = poutine.trace(poutine.replay(unrolled.model,
                                         trace=poutine.trace(unrolled.guide).get_trace(x))).get_trace(x)
    assert not torch.equal(trace.nodes["x_1"]["value"], x) and trace.nodes["x_1"]["value"].requires_grad


def test_ork_reduces_to_the_plain_kl_and_matches_eq5_by_hand():
    chain, x = _chain(), _data()
    for seed in range(3):
        pyro.set_rng_seed(seed)
        plain = PathwiseKL_ELBO().differentiable_loss(chain.model, chain.guide, x)
        pyro.set_rng_seed(seed)
        ork = OverRegularisedKL_ELBO(kl_weight=1.0, penalty=0.0)
        same = ork.differentiable_loss(chain.model, chain.guide, x)
        assert float(same.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
    # λ = 4, β = 0.1 by hand on one step: λ KL_n + β ([KL_n − mean KL]_+)² per example.
    one = _chain(num_steps=1)
    pyro.set_rng_seed(5)
    ork = OverRegularisedKL_ELBO(kl_weight=4.0, penalty=0.1).differentiable_loss(one.model, one.guide, x)
    pyro.set_rng_seed(5)
    plain = PathwiseKL_ELBO().differentiable_loss(one.model, one.guide, x)
    loc, scale = one.encode(x)
    prior = Normal(torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)).to_event(1)
    kl = torch.distributions.kl_divergence(Normal(loc, scale).to_event(1), prior)
    extra = (3.0 * kl + 0.1 * (kl - kl.mean()).clamp(min=0).pow(2)).sum()
    assert float(ork.detach()) == pytest.approx(float((plain + extra).detach()), rel=1e-10)
    with pytest.raises(ValueError, match="kl_weight"):
        OverRegularisedKL_ELBO(kl_weight=-1.0)


def _guide_site(x):
    return poutine.trace(_chain(num_steps=1).guide).get_trace(x).nodes["z_0"]


def test_ork_penalty_never_pushes_a_kl_up():
    # K̄ is a constant: the penalty's gradient w.r.t. each example's KL is ≥ 0 (it only pulls KLs down).
    kl = torch.tensor([1.0, 2.0, 5.0], requires_grad=True)
    site = _guide_site(_data(3))
    OverRegularisedKL_ELBO(kl_weight=0.0, penalty=1.0)._analytic_term("z_0", kl, site).sum().backward()
    assert (kl.grad >= 0).all() and kl.grad[0] == 0 and kl.grad[2] > 0


def test_ork_takes_the_batch_mean_per_particle_with_vectorised_particles():
    # One step: KL(q(z_0 | x) || p) depends on x only, so it is the same in every particle; K̄ must be the mean
    # over the data plate (not over particles), and the loss the per-particle average of Eq. 5.
    one, x = _chain(num_steps=1), _data()
    kw = {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1}
    pyro.set_rng_seed(7)
    ork = OverRegularisedKL_ELBO(kl_weight=4.0, penalty=0.1, **kw)
    ork = ork.differentiable_loss(one.model, one.guide, x)
    pyro.set_rng_seed(7)
    plain = PathwiseKL_ELBO(**kw).differentiable_loss(one.model, one.guide, x)
    loc, scale = one.encode(x)
    prior = Normal(torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)).to_event(1)
    kl = torch.distributions.kl_divergence(Normal(loc, scale).to_event(1), prior)
    extra = (3.0 * kl + 0.1 * (kl - kl.mean()).clamp(min=0).pow(2)).sum()
    assert float((ork - plain).detach()) == pytest.approx(float(extra.detach()), rel=1e-10)


def test_ork_refuses_scaled_or_masked_sites_and_sites_outside_the_data_plate():
    x = _data(4)
    site = _guide_site(x)
    kl = torch.ones(4, dtype=x.dtype)
    ork = OverRegularisedKL_ELBO()
    with pytest.raises(ValueError, match="carries a scale or a mask"):
        ork._analytic_term("z_0", kl, {**site, "scale": 0.5})
    with pytest.raises(ValueError, match="carries a scale or a mask"):
        ork._analytic_term("z_0", kl, {**site, "mask": torch.tensor([True, False, True, True])})
    with pytest.raises(ValueError, match="not inside a plate named 'data'"):
        ork._analytic_term("z_0", kl, {**site, "cond_indep_stack": ()})


def test_guide_function_loss_is_the_logistic_loss_on_a_hand_made_batch():
    f_data, f_gen = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0, 0.0])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2 \
        + (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-3.0)) + math.log(2.0)) / 3
    assert float(guide_function_loss(f_data, f_gen)) == pytest.approx(expected, rel=1e-6)


def test_generator_loss_is_zero_where_f_is_not_negative():
    f = torch.tensor([0.0, 0.3, 5.0, -0.5, -2.0])
    h = generator_hinge(f)
    assert torch.equal(h[:3], torch.zeros(3))
    torch.testing.assert_close(h[3:], torch.tensor([0.5 * 0.5 + 0.5 * 0.25, 0.5 * 2 + 0.5 * 4]))
    torch.testing.assert_close(generator_hinge(f, linear=1.0, quadratic=0.0), (-f).clamp(min=0))  # Eq. 7


def test_guide_function_is_a_bounded_maxout_net():
    f = GuideFunction(16, hidden=(24, 24), pieces=4, bound=2.0)
    assert f.body[0].units == 6 and f(torch.randn(5, 16) * 1e3).abs().max() <= 2.0
    with pytest.raises(ValueError, match="multiple of pieces"):
        GuideFunction(16, hidden=(10,), pieces=4)


def test_partial_control_never_changes_the_clamped_pixels():
    chain = _chain(feed="sample", likelihood="gaussian").float()
    x0 = torch.rand(4, 16)
    mask = MAR(2, (4, 4))(x0, torch.Generator().manual_seed(0))
    frames = chain.run_chain(x0, 9, mask=mask, every=1)
    assert frames.shape == (9, 4, 16)
    assert torch.equal(frames * mask, (x0 * mask).expand_as(frames))
    assert not torch.equal(frames[-1] * (1 - mask), (x0 * (1 - mask)))  # the rest is painted in
    at = chain.run_chain(x0, 20, at=[1, 20])
    assert at.shape == (2, 4, 16)
    with pytest.raises(ValueError, match="at must list steps"):
        chain.run_chain(x0, 5, at=[6])


def _trainer(chain, x, tmp_path, extras=(), epochs=1):
    return Trainer(chain.model, chain.guide, chain, PathwiseKL_ELBO(), pyro.optim.Adam({"lr": 3e-3}),
                   train_data=x, batch_size=25, epochs=epochs, seed=0, device="cpu", out_dir=tmp_path,
                   extras=extras, progress=False)


@pytest.mark.parametrize("bptt", [True, False])
def test_the_unrolled_bound_is_finite_and_falls_over_a_short_run(tmp_path, bptt):
    torch.manual_seed(0)
    x = (torch.rand(200, 16) < torch.linspace(0.1, 0.9, 16)).float()
    chain = GSNChain(16, 3, (32,), likelihood="bernoulli", num_steps=4, bptt=bptt)
    metrics = _trainer(chain, x, tmp_path, epochs=8).fit()
    losses = [m["train_loss"] for m in metrics]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0


def test_f_and_the_generator_each_update_only_their_own_parameters(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(50, 16)
    chain = GSNChain(16, 3, (12,), likelihood="gaussian", num_steps=3)
    hook = CollaborativeShaping(chain, 16, hidden=(8, 8), pieces=4, lr=1e-2, lg_weight=10.0)
    with torch.no_grad():
        hook.module.out.bias.fill_(-3.0)  # f < 0 on the chain's points: L_g is active
    f_before = [p.detach().clone() for p in hook.module.parameters()]
    # f's optimiser holds f's parameters only.
    f_ids = {id(p) for p in hook.module.parameters()}
    assert all(id(p) in f_ids for g in hook.optimizer.param_groups for p in g["params"])
    # The generator's loss reaches the chain, not f (the trainer clears f's gradients before f's step).
    term = hook.generator_loss(x)
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in chain.parameters())
    hook.optimizer.zero_grad(set_to_none=True)
    chain_grads = [None if p.grad is None else p.grad.clone() for p in chain.parameters()]
    chain_before = [p.detach().clone() for p in chain.parameters()]
    # f's step: Eq. 6 with the data as the positive class, on the minibatch against the emitted points.
    with torch.no_grad():
        expected = float(guide_function_loss(hook.module(x), hook.module(hook._generated)))
    metrics = hook.step(x)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(chain_before, chain.parameters(), strict=True))
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad)
               for a, p in zip(chain_grads, chain.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(f_before, hook.module.parameters(), strict=True))
    assert set(metrics) >= {"loss", "accuracy", "L_g"}


def test_through_the_trainer_f_steps_on_its_own_loss_only(tmp_path):
    # L_g back-propagates into f's parameters too; the trainer must clear those gradients before f's step,
    # so that f's optimiser sees only Eq. 6 (and f's parameters never get the generator's gradient).
    class Checked(CollaborativeShaping):
        seen: list = []

        def step(self, batch):
            self.seen.append([p.grad for p in self.module.parameters()])
            return super().step(batch)

    torch.manual_seed(0)
    x = torch.rand(50, 16)
    chain = GSNChain(16, 3, (12,), likelihood="gaussian", num_steps=3)
    hook = Checked(chain, 16, hidden=(8, 8), pieces=4, lr=1e-2, lg_weight=10.0)
    with torch.no_grad():
        hook.module.out.bias.fill_(-3.0)
    _trainer(chain, x, tmp_path, extras=[hook]).fit()
    assert hook.seen and all(g is None for grads in hook.seen for g in grads)


def test_gsn_chain_is_registered_and_validates_its_arguments():
    chain = build_model("gsn-chain", x_dim=16, z_dim=3, hidden=(8,), num_steps=2)
    assert chain.latent_sites == ("z_0", "z_1")
    assert chain.sample(5).shape == (5, 16)
    with pytest.raises(ValueError, match="likelihood"):
        GSNChain(16, likelihood="poisson")
    with pytest.raises(ValueError, match="feed"):
        GSNChain(16, feed="mode")
    with pytest.raises(ValueError, match="num_steps"):
        GSNChain(16, num_steps=0)


def _run(tmp_path, *extra):
    from experiments.gsn import main

    small = ["pretrain.epochs=1", "unroll.epochs=1", "unroll.steps=2", "eval.chain_steps=[1,3]",
             "eval.iw_samples=5", "eval.parzen_samples=200", "eval.fd_samples=200", "eval.chain_starts=50",
             "eval.figure_frames=3", "eval.figure_chains=2", "eval.curve_parzen_samples=100",
             "guide_f.hidden=[16,16]"]
    sets = [arg for assignment in small for arg in ("--set", assignment)]
    return main(["--preset", "quick", "--out", str(tmp_path), "--no-progress", *sets, *extra])


def test_the_experiment_runs_end_to_end_and_reports_what_it_measured(tmp_path, capsys, monkeypatch):
    import json

    import experiments.gsn as gsn
    from experiments.data import load_dataset

    chosen_on = []

    def recording(centres, points, grid=None, **kw):
        chosen_on.append(points.clone())
        return select(centres, points, grid, **kw)

    import inference.sample_quality as sample_quality

    select = gsn.select_parzen_sigma
    monkeypatch.setattr(gsn, "select_parzen_sigma", recording)  # the curves
    monkeypatch.setattr(sample_quality, "select_parzen_sigma", recording)  # the evaluation (parzen_score)
    assert _run(tmp_path, "--set", "variants=[ork-guided,ork-walkback]") == 0
    # σ is only ever chosen on validation images (the evaluation's and the curves' halves), never on test.
    valid, test = load_dataset("digits").valid, load_dataset("digits").test
    allowed = (valid[:250], valid[:125])
    assert chosen_on and all(any(torch.equal(p, a) for a in allowed) for p in chosen_on)
    assert not any(p.shape == test.shape and torch.equal(p, test) for p in chosen_on)
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r["variants"]) == {"ork-guided", "ork-walkback"}
    for v in r["variants"].values():
        assert math.isfinite(v["bound"]["nll"]) and math.isfinite(v["parzen"]["mean"])
        assert set(v["fd_classifier"]) == {"train", "test"}
        assert [e["step"] for e in v["chain_drift"]] == [1, 3]
        # σ is the grid value with the best validation score (the test split is never consulted for it).
        scores = {float(k): s for k, s in v["parzen"]["valid_scores"].items()}
        assert v["parzen"]["sigma"] == max(scores, key=scores.get)
        assert set(scores) == set(r["config"]["eval"]["parzen_grid"])
    page = (tmp_path / "results.md").read_text()
    assert "FD-classifier" in page and "FID" not in page and "MNIST" in page
    # The table shows F(x), the upper bound on -log p(x), under its own name.
    row = next(line for line in page.splitlines() if line.startswith("| ork-guided |"))
    assert "test F(x) ↓ (nats, bound)" in page
    assert f"{r['variants']['ork-guided']['bound']['nll']:.2f} ±" in row
    for name in ("curves.png", "mode_coverage.png", "chains_ork-guided.png", "partial_ork-walkback.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # The guide function was trained beside the guided fork, and its metrics were logged.
    lines = [json.loads(x) for x in (tmp_path / "ork-guided" / "metrics.jsonl").read_text().splitlines()]
    assert "guide_f/loss" in lines[-1] and "valid_parzen" in lines[-1]


def test_a_bad_variant_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--set", "variants=[var-twostep]")
    assert e.value.code == 2
    assert "unknown variant 'var-twostep'; allowed:" in capsys.readouterr().err


def test_a_variant_directory_loads_as_a_trained_model(tmp_path):
    from experiments.runs import load_run
    from experiments.sample import main as sample_main

    assert _run(tmp_path, "--set", "variants=[var-guided]") == 0
    run = load_run(tmp_path / "var-guided")
    assert isinstance(run.module, GSNChain) and run.module.num_steps == 2
    assert run.module.sample(3).shape == (3, 64)
    assert sample_main(["--run", str(tmp_path / "var-guided"), "--n", "4", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.png").is_file()


@pytest.mark.parametrize("kw", [{"walkback": True}, {"bptt": False}])
def test_a_cut_walk_passes_no_gradient_through_its_draws(kw):
    # With walkback or without bptt, a sampled chain point is drawn from detached parameters: no pathwise and
    # no score-function gradient reaches p or q through the walk.
    chain, x = _chain(likelihood="bernoulli", feed="sample", **kw), _data()
    trace = poutine.trace(chain.guide).get_trace(x)
    assert not trace.nodes["xhat_1"]["fn"].base_dist.logits.requires_grad
    assert not trace.nodes["xhat_1"]["value"].requires_grad
    unrolled = _chain(likelihood="bernoulli", feed="sample")
    assert poutine.trace(unrolled.guide).get_trace(x).nodes["xhat_1"]["fn"].base_dist.logits.requires_grad


def test_l_g_refuses_a_chain_it_cannot_reach():
    chain = _chain(likelihood="bernoulli", feed="sample")
    with pytest.raises(ValueError, match="cannot reach a chain that feeds Bernoulli draws"):
        CollaborativeShaping(chain, 16, hidden=(8, 8), pieces=4)
    CollaborativeShaping(chain, 16, hidden=(8, 8), pieces=4, lg_weight=0.0)  # f alone is fine
