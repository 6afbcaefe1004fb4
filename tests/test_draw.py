"""The DRAW-style generators (Bachman & Precup 2015, Sec. 2.4-2.5): sites, the open-loop vs state-conditioned
prior, the two canvas updates, that the bound trains, guide fine-tuning, and the experiment end to end."""

from __future__ import annotations

import json

import pyro
import pyro.poutine as poutine
import pytest
import torch

from experiments import draw as draw_experiment
from experiments.data import fixed_binarize, load_dataset
from inference.finetune import finetune_guide, frozen_except
from inference.importance import importance_log_likelihood
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models.draw import DRAWGenerator
from ppl_models.policy_parts import lstm_step

D = 64
T = 3
VARIANTS = [("open-loop", "add"), ("extended", "add"), ("extended", "jump")]


def make(prior: str, update: str = "add", num_steps: int = T, **kw) -> DRAWGenerator:
    pyro.set_rng_seed(0)
    sizes = {"z_dim": 4, "z0_dim": 3, "lstm_dim": 12, "mix_hidden": 10, **kw}
    return DRAWGenerator(D, num_steps=num_steps, prior=prior, update=update, **sizes)


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, D, generator=g).bernoulli(generator=g)


def sample_sites(trace) -> dict[str, tuple]:
    return {name: (tuple(s["value"].shape), s["is_observed"])
            for name, s in trace.nodes.items() if s["type"] == "sample" and name != "data"}


def replayed_model_trace(gen: DRAWGenerator, x: torch.Tensor):
    guide_tr = poutine.trace(gen.guide).get_trace(x)
    return guide_tr, poutine.trace(poutine.replay(gen.model, trace=guide_tr)).get_trace(x)


@pytest.mark.parametrize("prior,update", VARIANTS)
def test_model_and_guide_have_the_same_latent_sites(prior, update):
    gen = make(prior, update)
    x = images()
    guide_tr, model_tr = replayed_model_trace(gen, x)
    g_sites, m_sites = sample_sites(guide_tr), sample_sites(model_tr)
    steps = [f"z_{t}" for t in range(0 if prior == "extended" else 1, T + 1)]
    assert list(g_sites) == steps
    assert m_sites.pop("x") == ((6, D), True)
    assert m_sites == g_sites
    for t in range(1, T + 1):
        assert g_sites[f"z_{t}"][0] == (6, 4)
    if prior == "extended":
        assert g_sites["z_0"][0] == (6, 3)


def _prior_params(trace, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = trace.nodes[f"z_{t}"]["fn"].base_dist
    return base.loc.expand(6, -1), base.scale.expand(6, -1)


def test_open_loop_prior_is_isotropic_and_independent_of_the_state():
    gen = make("open-loop")
    _, tr_a = replayed_model_trace(gen, images(seed=1))
    _, tr_b = replayed_model_trace(gen, images(seed=2))
    for t in range(1, T + 1):
        for tr in (tr_a, tr_b):
            loc, scale = _prior_params(tr, t)
            assert torch.equal(loc, torch.zeros_like(loc)) and torch.equal(scale, torch.ones_like(scale))
    # the states along the two paths differ, the priors do not
    assert not torch.equal(tr_a.nodes["z_2"]["value"], tr_b.nodes["z_2"]["value"])


def test_extended_prior_depends_on_the_state():
    gen = make("extended")
    _, tr_a = replayed_model_trace(gen, images(seed=1))
    _, tr_b = replayed_model_trace(gen, images(seed=2))
    for t in range(1, T + 1):
        loc_a, scale_a = _prior_params(tr_a, t)
        loc_b, scale_b = _prior_params(tr_b, t)
        # different rows (different paths) get different p(z_t | s_{t-1}), within and across traces
        assert not torch.allclose(loc_a, loc_b) and not torch.allclose(scale_a, scale_b)
        assert not torch.allclose(loc_a[0], loc_a[1])
    # p(z_1 | s_0) is a function of z_0 alone: rebuild it by hand from the replayed z_0
    z0 = tr_a.nodes["z_0"]["value"]
    writer, _ = gen.initial(z0)
    expected = gen.p_step(writer[0]).chunk(2, -1)[0]
    assert torch.allclose(_prior_params(tr_a, 1)[0], expected)


@pytest.mark.parametrize("prior", ["open-loop", "extended"])
def test_add_and_jump_canvases_given_the_same_steps(prior):
    add, jump = make(prior, "add"), make(prior, "jump")
    assert [n for n, _ in add.named_parameters()] == [n for n, _ in jump.named_parameters()]
    jump.load_state_dict(add.state_dict())
    x = images()
    guide_tr = poutine.trace(add.guide).get_trace(x)
    c_add = poutine.replay(add.model, trace=guide_tr)(x)
    c_jump = poutine.replay(jump.model, trace=guide_tr)(x)
    # rebuild the writer by hand along the same z
    if prior == "extended":
        state, _ = add.initial(guide_tr.nodes["z_0"]["value"])
    else:
        state = (add.s0[0].expand(6, -1), add.s0[1].expand(6, -1))
    canvas = add.c0.expand(6, -1)
    for t in range(1, T + 1):
        state = lstm_step(add.writer, guide_tr.nodes[f"z_{t}"]["value"], state)
        canvas = canvas + add.write(state[0])
        assert torch.allclose(c_add[t], canvas, atol=1e-5)
        assert torch.allclose(c_jump[t], add.write(state[1]), atol=1e-5)  # c_t = L(h_t), the LSTM memory


@pytest.mark.parametrize("prior,update", VARIANTS)
def test_sampling_runs_without_data(prior, update):
    gen = make(prior, update)
    tr = poutine.trace(gen.model).get_trace(None, num_samples=5)
    assert not tr.nodes["x"]["is_observed"] and tr.nodes["x"]["value"].shape == (5, D)
    steps = gen.sample_steps(7)
    assert steps.shape == (T + 1, 7, D) and ((steps > 0) & (steps < 1)).all()
    with pytest.raises(ValueError, match="num_samples"):
        gen.model(None)
    with pytest.raises(ValueError, match="target images"):
        gen.guide(None)


def test_guide_and_model_parameters_split_the_module():
    for prior in ("open-loop", "extended"):
        gen = make(prior)
        phi, theta = gen.guide_parameters(), gen.model_parameters()
        assert len(phi) + len(theta) == len(list(gen.parameters()))
        assert not {id(p) for p in phi} & {id(p) for p in theta}
        # p's log joint along a fixed path (the guide's draws, detached) does not touch φ
        x = images()
        with torch.no_grad():
            guide_tr = poutine.trace(gen.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(gen.model, trace=guide_tr)).get_trace(x)
        grads = torch.autograd.grad(model_tr.log_prob_sum(), phi + theta, allow_unused=True)
        assert all(g is None or not g.any() for g in grads[: len(phi)])
        assert any(g is not None and g.abs().sum() > 0 for g in grads[len(phi):])


@pytest.mark.parametrize("prior,update", VARIANTS)
def test_per_datum_bound_matches_the_loss_and_iwae_is_tighter(prior, update):
    gen = make(prior, update)
    x = images()
    elbo = PathwiseKL_ELBO()
    pyro.set_rng_seed(3)
    per = elbo.per_datum(gen.model, gen.guide, x)
    pyro.set_rng_seed(3)
    assert torch.allclose(-per.sum(), torch.tensor(elbo.loss(gen.model, gen.guide, x), dtype=per.dtype),
                          rtol=1e-5)
    with torch.no_grad():
        bound = sum(-elbo.per_datum(gen.model, gen.guide, x) for _ in range(50)) / 50
    est = importance_log_likelihood(gen.model, gen.guide, x, num_samples=300, batch_size=6, chunk_size=100,
                                    progress=False)
    assert (-est.log_likelihood <= bound + 0.05).all()


@pytest.mark.parametrize("prior,update", VARIANTS)
def test_bound_is_finite_and_decreases_over_a_short_training_run(prior, update):
    data = load_dataset("digits")
    x = fixed_binarize(data.train[:256])
    pyro.set_rng_seed(0)
    gen = DRAWGenerator(D, z_dim=8, z0_dim=4, lstm_dim=32, mix_hidden=32, num_steps=4, prior=prior,
                        update=update, init_mean=data.train.mean(0))
    elbo = PathwiseKL_ELBO()

    def bound() -> float:
        pyro.set_rng_seed(123)
        with torch.no_grad():
            return float(sum(-elbo.per_datum(gen.model, gen.guide, x).mean() for _ in range(5)) / 5)

    before = bound()
    assert torch.isfinite(torch.tensor(before))
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        loss = elbo.differentiable_loss(gen.model, gen.guide, x[torch.randint(0, 256, (64,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bound()
    assert torch.isfinite(torch.tensor(after)) and after < before - 1.0, (before, after)


@pytest.mark.parametrize("prior", ["open-loop", "extended"])
def test_finetuning_changes_only_the_guide_and_tightens_the_bound(prior, tmp_path):
    gen = make(prior, lstm_dim=16)
    x = images(n=40)
    elbo = PathwiseKL_ELBO()

    def bound() -> float:
        pyro.set_rng_seed(7)
        with torch.no_grad():
            return float(sum(-elbo.per_datum(gen.model, gen.guide, x).mean() for _ in range(20)) / 20)

    theta = {n: p.detach().clone() for n, p in gen.named_parameters()}
    phi_ids = {id(p) for p in gen.guide_parameters()}
    before = bound()
    metrics = finetune_guide(gen, gen.model, gen.guide, gen.guide_parameters(), elbo, x, epochs=30,
                             batch_size=20, lr=3e-3, seed=0, device="cpu", out_dir=tmp_path, progress=False)
    assert len(metrics) == 30
    for name, p in gen.named_parameters():
        if id(p) in phi_ids:
            assert not torch.equal(p, theta[name]), f"guide parameter {name} did not move"
        else:
            assert torch.equal(p, theta[name]), f"model parameter {name} changed"
        assert p.requires_grad  # restored after fine-tuning
    assert bound() < before - 0.5


def test_frozen_except_rejects_foreign_parameters_and_finetune_checks_input(tmp_path):
    gen = make("extended")
    stranger = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not parameters"):
        with frozen_except(gen, [stranger]):
            pass
    with pytest.raises(ValueError, match="empty"):
        finetune_guide(gen, gen.model, gen.guide, [], PathwiseKL_ELBO(), images(), 1, 2, 1e-3, 0, "cpu",
                       tmp_path)
    with pytest.raises(ValueError, match="lr"):
        finetune_guide(gen, gen.model, gen.guide, gen.guide_parameters(), PathwiseKL_ELBO(), images(), 1, 2,
                       0.0, 0, "cpu", tmp_path)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prior must be one of"):
        DRAWGenerator(D, prior="closed")
    with pytest.raises(ValueError, match="update must be one of"):
        DRAWGenerator(D, update="replace")
    with pytest.raises(ValueError, match=">= 1"):
        DRAWGenerator(D, num_steps=0)
    gen = make("open-loop")
    with pytest.raises(ValueError, match=r"shape \(N, 64\)"):
        gen.model(torch.zeros(3, 10))
    with pytest.raises(ValueError, match="disagrees"):
        gen.model(images(), num_samples=2)


def test_draw_experiment_runs_end_to_end(tmp_path):
    out = tmp_path / "draw"
    argv = ["--preset", "quick", "--variants", "extended-jump,open-loop", "--epochs", "1",
            "--eval-limit", "30", "--iw-samples", "20", "--finetune-epochs", "1", "--out", str(out),
            "--no-progress", "--resume"]  # --resume on an empty directory starts afresh
    assert draw_experiment.main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    # a finished variant is read back, not re-run; an interrupted one keeps its raw scores
    interrupted = json.loads((out / "open-loop" / "result.json").read_text())
    interrupted.pop("finetuned")
    interrupted["complete"] = False
    (out / "open-loop" / "result.json").write_text(json.dumps(interrupted))
    assert draw_experiment.main(argv) == 0
    again = json.loads((out / "table.json").read_text())
    assert again["results"][0] == table["results"][0]
    assert again["results"][1]["raw"] == table["results"][1]["raw"]
    assert again["results"][1]["finetuned"]["bound"]["num_images"] == 30
    assert [r["variant"] for r in table["results"]] == ["extended-jump", "open-loop"]
    for r in table["results"]:
        assert r["raw"]["bound"]["num_images"] == 30 and r["raw"]["iwae"]["K"] == 20
        assert 0 < r["raw"]["iwae"]["nll"] < D * 10 and r["finetuned"]["bound"]["nll"] > 0
        assert (out / r["variant"] / "steps.png").is_file()
    assert "IWAE-20" in (out / "table.md").read_text()
    with pytest.raises(SystemExit):
        draw_experiment.main(["--variants", "bogus", "--out", str(out)])


def test_vae_guide_parameters_are_the_encoder_and_finetune_leaves_the_decoder(tmp_path):
    from ppl_models.vae import VAE

    pyro.set_rng_seed(0)
    vae = VAE(x_dim=D, z_dim=3, hidden=(16,))
    decoder = {n: p.detach().clone() for n, p in vae.decoder.named_parameters()}
    encoder = {n: p.detach().clone() for n, p in vae.encoder.named_parameters()}
    finetune_guide(vae, vae.model, vae.guide, vae.guide_parameters(), PathwiseKL_ELBO(), images(n=20),
                   epochs=3, batch_size=10, lr=1e-2, seed=0, device="cpu", out_dir=tmp_path, progress=False)
    assert all(torch.equal(p, decoder[n]) for n, p in vae.decoder.named_parameters())
    assert all(not torch.equal(p, encoder[n]) for n, p in vae.encoder.named_parameters())


def test_draw_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        draw_experiment.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--variants", "--iw-samples", "--finetune-epochs", "--num-steps", "--eval-limit"):
        assert option in text
