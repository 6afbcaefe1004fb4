"""The sequential imputation policies (GPSI-add/-jump, LSTM-add/-jump; Bachman & Precup 2015, Sec. 3):
sites, what each policy may see, the two updates, and that the Eq. 17 bound trains."""

from __future__ import annotations

import json

import pyro
import pyro.poutine as poutine
import pytest
import torch

from experiments import imputation
from experiments.data import fixed_binarize, load_dataset
from inference.importance import importance_log_likelihood
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models.gpsi import GPSI
from ppl_models.lstm_imputer import LSTMImputer
from ppl_models.masks import make_mask_process
from ppl_models.policy_parts import lstm_step

SHAPE = (8, 8)
D = 64


def make(kind: str, update: str, num_steps: int = 3) -> torch.nn.Module:
    pyro.set_rng_seed(0)
    if kind == "gpsi":
        return GPSI(D, z_dim=4, hidden=(16, 16), num_steps=num_steps, update=update)
    return LSTMImputer(D, z_dim=4, z0_dim=3, lstm_dim=12, mix_hidden=10, num_steps=num_steps, update=update)


POLICIES = [(k, u) for k in ("gpsi", "lstm") for u in ("add", "jump")]
MASKS = ["mcar-50", "mar-4", "all-missing", "user"]


def data_and_mask(spec: str, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, D, generator=g).bernoulli(generator=g)
    if spec == "user":
        mask = torch.ones(n, D)
        mask[:, :20] = 0
        return x, mask
    return x, make_mask_process(spec, SHAPE).sample(x, generator=g)


def sample_sites(trace) -> dict[str, tuple]:
    return {
        name: (tuple(s["value"].shape), s["is_observed"])
        for name, s in trace.nodes.items()
        if s["type"] == "sample" and not name == "data"
    }


@pytest.mark.parametrize("kind,update", POLICIES)
@pytest.mark.parametrize("spec", MASKS)
def test_model_and_guide_have_the_same_step_sites(kind, update, spec):
    policy = make(kind, update)
    x, mask = data_and_mask(spec)
    guide_tr = poutine.trace(policy.guide).get_trace(x, mask)
    model_tr = poutine.trace(poutine.replay(policy.model, trace=guide_tr)).get_trace(x, mask)
    g, m = sample_sites(guide_tr), sample_sites(model_tr)
    first = 0 if kind == "lstm" else 1  # the LSTM policies have the infinite-mixture step z_0
    steps = {f"z_{t}" for t in range(first, policy.num_steps + 1)}
    assert set(g) == steps and set(m) == steps | {"x"}
    for name in steps:
        assert g[name] == m[name] and g[name][0] == (6, 4 if name != "z_0" else 3)
        gd, md = guide_tr.nodes[name]["fn"], model_tr.nodes[name]["fn"]
        assert gd.batch_shape == md.batch_shape == (6,) and gd.event_shape == md.event_shape
    assert m["x"] == ((6, D), True)
    # The cost is scored on the missing pixels only: a fully known image costs nothing.
    full = torch.ones_like(mask)
    tr = poutine.trace(policy.model).get_trace(x, full)
    assert torch.equal(tr.nodes["x"]["fn"].log_prob(x), torch.zeros(6))


def step_params(trace) -> dict[str, torch.Tensor]:
    return {
        name: torch.cat([s["fn"].base_dist.loc, s["fn"].base_dist.scale], -1)
        for name, s in trace.nodes.items()
        if name.startswith("z_")
    }


@pytest.mark.parametrize("kind,update", POLICIES)
def test_guide_sees_missing_values_and_model_does_not(kind, update):
    policy = make(kind, update)
    x, mask = data_and_mask("mar-4")
    x2 = torch.where(mask > 0, x, 1 - x)  # the same known values, every missing value flipped
    guide_tr = poutine.trace(policy.guide).get_trace(x, mask)
    # Along one fixed path, every step distribution of p is the same whatever x_u is ...
    p1 = step_params(poutine.trace(poutine.replay(policy.model, trace=guide_tr)).get_trace(x, mask))
    p2 = step_params(poutine.trace(poutine.replay(policy.model, trace=guide_tr)).get_trace(x2, mask))
    for name in p1:
        assert torch.equal(p1[name], p2[name]), name
    # ... and so are its roll-outs.
    pyro.set_rng_seed(3)
    r1 = policy.impute(x, mask)
    pyro.set_rng_seed(3)
    r2 = policy.impute(x2, mask)
    assert (r1 * mask == x * mask).all() and torch.equal(r1 * (1 - mask), r2 * (1 - mask))
    # The guide's step distributions do change with x_u.
    q2 = step_params(poutine.trace(poutine.replay(policy.guide, trace=guide_tr)).get_trace(x2, mask))
    q1 = step_params(guide_tr)
    assert any(not torch.allclose(q1[n], q2[n]) for n in q1)


@pytest.mark.parametrize("kind,update", POLICIES)
def test_all_missing_mask_gives_an_unconditional_generator(kind, update):
    policy = make(kind, update)
    x, mask = data_and_mask("mcar-100")
    assert mask.sum() == 0
    guide_tr = poutine.trace(policy.guide).get_trace(x, mask)
    other = 1 - x
    p1 = step_params(poutine.trace(poutine.replay(policy.model, trace=guide_tr)).get_trace(x, mask))
    p2 = step_params(poutine.trace(poutine.replay(policy.model, trace=guide_tr)).get_trace(other, mask))
    for name in p1:
        assert torch.equal(p1[name], p2[name])
    # Sampling needs no data at all.
    samples = policy.model(None, None, num_samples=5)
    assert samples.shape == (policy.num_steps + 1, 5, D) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="num_samples"):
        policy.model(None, None)


def add_and_jump_on_one_path(kind: str, spec: str):
    """An -add and a -jump policy with the same weights, both run as p along one path of the -add guide.
    Returns the -add policy, the path's steps z, and the model traces of -add and of -jump."""
    add, jump = make(kind, "add"), make(kind, "jump")
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (add, jump)]
    assert shapes[0] == shapes[1]
    jump.load_state_dict(add.state_dict())
    x, mask = data_and_mask(spec)
    guide_tr = poutine.trace(add.guide).get_trace(x, mask)
    z = {n: s["value"] for n, s in guide_tr.nodes.items() if n.startswith("z_")}
    traces = [poutine.trace(poutine.condition(m.model, data=z)).get_trace(x, mask) for m in (add, jump)]
    return add, z, *traces


def canvases(trace) -> torch.Tensor:
    return trace.nodes["_RETURN"]["value"]


@pytest.mark.parametrize("kind", ["gpsi", "lstm"])
def test_add_and_jump_differ_only_in_the_update(kind):
    add, z, tr_a, tr_j = add_and_jump_on_one_path(kind, "mcar-50")
    c_add, c_jump = canvases(tr_a), canvases(tr_j)
    assert torch.equal(c_add[0], c_jump[0])  # the same c_0
    for t in range(1, add.num_steps + 1):
        if kind == "gpsi":
            write = add.omega(z[f"z_{t}"])
            torch.testing.assert_close(c_add[t], c_add[t - 1] + write)
            torch.testing.assert_close(c_jump[t], write)
        else:
            assert not torch.allclose(c_jump[t], c_add[t])
    # The first step is chosen from the same state by both.
    first = "z_1" if kind == "gpsi" else "z_0"
    torch.testing.assert_close(step_params(tr_a)[first], step_params(tr_j)[first])


def test_lstm_updates_write_from_the_writer_state():
    add, z, tr_a, tr_j = add_and_jump_on_one_path("lstm", "mar-4")
    c_add, c_jump = canvases(tr_a), canvases(tr_j)
    # Rebuild the writer's states by hand along the path: the writer is shared, so both models see them.
    _, writer, _ = add.initial(z["z_0"])
    for t in range(1, add.num_steps + 1):
        writer = lstm_step(add.writer, z[f"z_{t}"], writer)
        torch.testing.assert_close(c_add[t], c_add[t - 1] + add.write(writer[0]))
        torch.testing.assert_close(c_jump[t], add.write(writer[1]))


@pytest.mark.parametrize("kind,update", POLICIES)
def test_per_datum_bound_matches_the_loss(kind, update):
    policy = make(kind, update)
    x, mask = data_and_mask("mcar-50")
    elbo = PathwiseKL_ELBO()
    pyro.set_rng_seed(5)
    per = elbo.per_datum(policy.model, policy.guide, x, mask)
    pyro.set_rng_seed(5)
    loss = elbo.loss(policy.model, policy.guide, x, mask)
    assert per.shape == (6,)
    assert abs(-per.sum().item() - loss) < 1e-4 * max(1.0, abs(loss))


@pytest.mark.parametrize("kind", ["gpsi", "lstm"])
def test_importance_estimate_runs_vectorised_and_is_tighter_than_the_bound(kind):
    policy = make(kind, "add")
    x, mask = data_and_mask("mar-4", n=8)
    elbo = PathwiseKL_ELBO()
    pyro.set_rng_seed(0)
    bound = torch.stack([-elbo.per_datum(policy.model, policy.guide, x, mask) for _ in range(200)]).mean(0)
    est = importance_log_likelihood(policy.model, policy.guide, (x, mask), num_samples=500, batch_size=4,
                                    chunk_size=100, diagnostics=False)
    # IWAE-500 is a tighter bound than the ELBO: -log p̂ below the mean bound, for every image.
    assert (-est.log_likelihood < bound + 1e-3).all()


@pytest.mark.parametrize("kind", ["gpsi", "lstm"])
def test_bound_is_finite_and_decreases_over_a_short_training_run(kind):
    data = load_dataset("digits")
    pyro.set_rng_seed(0)
    x = fixed_binarize(data.train[:256])
    process = make_mask_process("mar-4", SHAPE)
    mask = process.sample(x, generator=torch.Generator().manual_seed(0))
    if kind == "gpsi":
        policy = GPSI(D, z_dim=8, hidden=(64, 64), num_steps=4, init_mean=data.train.mean(0))
    else:
        policy = LSTMImputer(D, z_dim=8, z0_dim=4, lstm_dim=32, mix_hidden=32, num_steps=4,
                             init_mean=data.train.mean(0))
    elbo = PathwiseKL_ELBO()

    def bound() -> float:
        pyro.set_rng_seed(123)
        with torch.no_grad():
            draws = [-elbo.per_datum(policy.model, policy.guide, x, mask).mean() for _ in range(5)]
            return float(sum(draws) / 5)

    before = bound()
    assert torch.isfinite(torch.tensor(before))
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        idx = torch.randint(0, 256, (64,), generator=g)
        batch_mask = process.sample(x[idx], generator=g)
        loss = elbo.differentiable_loss(policy.model, policy.guide, x[idx], batch_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bound()
    assert after < before - 1.0, (before, after)


def test_bad_update_and_sizes_raise():
    with pytest.raises(ValueError, match="add"):
        GPSI(D, update="replace")
    with pytest.raises(ValueError, match=">= 1"):
        LSTMImputer(D, lstm_dim=0)
    policy = make("gpsi", "add")
    x, _ = data_and_mask("mcar-50")
    with pytest.raises(ValueError):
        policy.model(x, torch.ones(3, D))


@pytest.mark.parametrize("method", ["gpsi-add", "tm-honest"])
def test_imputation_experiment_cell_runs(tmp_path, method):
    out = tmp_path / method
    assert imputation.main(["--preset", "quick", "--method", method, "--mask", "mar-4", "--epochs", "1",
                            "--eval-limit", "40", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == method and result["protocol"]["num_test_images"] == 40
    main, _ = imputation.headline(result)
    assert 0 < main["nll_per_image"] < 64 * 14 and 0 <= result["mse"] <= 1
    if method == "gpsi-add":
        assert result["bound"]["nll_per_image"] >= main["nll_per_image"] - 5.0
        assert (out / "rollouts.png").is_file() and (out / "best.pt").is_file()
