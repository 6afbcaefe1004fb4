"""The VAE slice: model/guide agreement, sampling without data, reconstruct-and-clamp imputation, the CLI."""

from __future__ import annotations

import json

import pyro
import pyro.poutine as poutine
import pytest
import torch

from experiments import vae as vae_experiment
from experiments.data import fixed_binarize, load_digits
from inference.importance import importance_log_likelihood
from inference.pathwise_kl_elbo import PathwiseKL_ELBO
from ppl_models.masks import MAR
from ppl_models.vae import VAE, vae_impute


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def _sites(trace):
    return {n: s["value"].shape for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"}


def test_model_and_guide_sites_match_and_follow_naming_scheme():
    vae = VAE(x_dim=64, z_dim=4, hidden=(16,))
    x = fixed_binarize(load_digits().test[:5])
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    g, m = _sites(guide_trace), _sites(model_trace)
    assert set(g) == {"z_0"} and set(m) == {"z_0", "x"}
    assert g["z_0"] == m["z_0"] == (5, 4)
    assert model_trace.nodes["x"]["is_observed"]


def test_sampling_runs_without_data():
    vae = VAE(x_dim=64, z_dim=4, hidden=(16,))
    trace = poutine.trace(vae.model).get_trace(None, num_samples=7)
    assert trace.nodes["x"]["value"].shape == (7, 64)
    assert set(trace.nodes["x"]["value"].unique().tolist()) <= {0.0, 1.0}
    imgs = vae.sample(3)
    assert imgs.shape == (3, 64) and imgs.min() >= 0 and imgs.max() <= 1
    with pytest.raises(ValueError, match="num_samples"):
        vae.model(None)


def test_short_training_lowers_the_bound_and_iwae_is_tighter():
    data = load_digits()
    x = fixed_binarize(data.train[:256])
    vae = VAE(x_dim=64, z_dim=4, hidden=(32,))
    elbo = PathwiseKL_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    optim = pyro.optim.Adam({"lr": 1e-2})
    svi = pyro.infer.SVI(vae.model, vae.guide, optim, elbo)
    before = elbo.loss(vae.model, vae.guide, x) / 256
    for _ in range(60):
        svi.step(x)
    after = elbo.loss(vae.model, vae.guide, x) / 256
    assert torch.isfinite(torch.tensor(after)) and after < before - 5.0
    est = importance_log_likelihood(vae.model, vae.guide, x[:50], num_samples=200, chunk_size=100)
    many = PathwiseKL_ELBO(num_particles=20, vectorize_particles=True, max_plate_nesting=1)
    assert est.summary()["nll"] < many.loss(vae.model, vae.guide, x[:50]) / 50


def test_vae_impute_clamps_known_pixels_and_scores_missing_ones():
    torch.manual_seed(0)
    vae = VAE(x_dim=64, z_dim=4, hidden=(16,))
    x = load_digits().test[:6]
    mask = MAR(4, (8, 8)).sample(x, torch.Generator().manual_seed(1))
    res = vae_impute(vae, x, mask, num_steps=5, num_runs=3)
    assert res.nll.shape == (3, 5, 6) and torch.isfinite(res.nll).all() and (res.nll > 0).all()
    assert res.imputations.shape == (5, 6, 64)
    # Known pixels are the true values at every step; missing ones are the decoder's probabilities.
    assert torch.equal(res.imputations[:, mask.bool()], x[mask.bool()].expand(5, -1))
    assert torch.equal(res.num_missing, torch.full((6,), 16.0))
    best, step = res.best_step_nll
    assert (best <= res.final_nll + 1e-6).all() or step == 4
    assert res.final_nll.shape == (6,)
    # The procedure never reads the missing values: changing them changes only the score.
    x2 = x.clone()
    x2[~mask.bool()] = 1 - x2[~mask.bool()]
    torch.manual_seed(5)
    a = vae_impute(vae, x, mask, num_steps=3, num_runs=1).imputations
    torch.manual_seed(5)
    b = vae_impute(vae, x2, mask, num_steps=3, num_runs=1).imputations
    assert torch.equal(a[:, ~mask.bool()], b[:, ~mask.bool()])


def test_vae_impute_rejects_bad_mask():
    vae = VAE(x_dim=64, z_dim=4, hidden=(16,))
    x = load_digits().test[:2]
    with pytest.raises(ValueError):
        vae_impute(vae, x, torch.full((2, 64), 0.5))
    with pytest.raises(ValueError):
        vae_impute(vae, x, torch.ones(2, 10))


def test_cli_quick_preset_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "vae"
    code = vae_experiment.main(
        ["--preset", "quick", "--epochs", "2", "--iw-samples", "20", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["split_scored"] == "test"
    assert results["protocol"]["num_test_images"] == 250
    assert results["test"]["importance_sampling"]["num_samples"] == 20
    # An importance-sampled estimate is (in expectation) tighter than the bound it starts from.
    assert results["test"]["nll_iwae"] < results["test"]["nll_bound"] + 1.0
    for name in ("results.md", "samples.png", "curves.png", "metrics.jsonl", "checkpoint.pt", "best.pt"):
        assert (out / name).exists(), name
    assert len((out / "metrics.jsonl").read_text().strip().splitlines()) == 2
    assert "K=20" in (out / "results.md").read_text()
    # --resume continues from the checkpoint to more epochs.
    code = vae_experiment.main(
        ["--preset", "quick", "--epochs", "3", "--iw-samples", "20", "--out", str(out), "--no-progress",
         "--resume"]
    )
    assert code == 0
    assert len((out / "metrics.jsonl").read_text().strip().splitlines()) == 3


def test_cli_help_and_bad_preset(capsys):
    with pytest.raises(SystemExit) as e:
        vae_experiment.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--preset", "--data-dir", "--device", "--resume", "--iw-samples", "--z-dim"):
        assert opt in text
    with pytest.raises(SystemExit) as e:
        vae_experiment.main(["--preset", "nope"])
    assert e.value.code == 2
