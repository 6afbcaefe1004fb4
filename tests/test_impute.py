"""python -m experiments.impute for MIWAE and honest template-matching cells, VAE runs, and its refusals.

The runs are tiny and untrained (8x8 digits): these tests check the command's contract, not imputation
quality. The gpsi-* cells and the shared mask/image errors are tested in tests/test_runs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from experiments import impute as impute_cli
from experiments import runs
from experiments.data import fixed_binarize, load_dataset
from inference.checkpoint import save_checkpoint
from ppl_models import build_model, miwae_impute, template_match


def _cell(directory: Path, method: str, config: dict, module=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if module is not None:
        save_checkpoint({"module": module.state_dict()}, directory / "best.pt")
    (directory / "result.json").write_text(json.dumps({"method": method, "config": config}))
    return directory


@pytest.fixture
def miwae_run(tmp_path):
    torch.manual_seed(0)
    module = build_model("miwae", x_dim=64, z_dim=4, hidden=(16,))
    config = {"dataset": "digits", "miwae": {"z_dim": 4, "hidden": [16], "train_particles": 2},
              "eval": {"miwae_samples": 30}}
    return _cell(tmp_path / "miwae", "miwae", config, module), module


@pytest.fixture
def tm_run(tmp_path):
    return _cell(tmp_path / "tm", "tm-honest", {"dataset": "digits"})


def _mask(tmp_path) -> np.ndarray:
    mask = np.ones((8, 8))
    mask[2:6, 1:5] = 0
    np.save(tmp_path / "mask.npy", mask)
    return mask


def _argv(run, tmp_path, out, *extra):
    return ["--run", str(run), "--images", str(tmp_path / "images.npy"), "--mask", str(tmp_path / "mask.npy"),
            "--samples", "3", "--out", str(out), "--device", "cpu", *extra]


def _check_outputs(out: Path, x: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    imps = np.load(out / "imputations.npy")
    mean, std = np.load(out / "mean.npy"), np.load(out / "std.npy")
    n = x.shape[0]
    assert imps.shape == (n, k, 8, 8) and imps.dtype == np.float32
    assert mean.shape == std.shape == (n, 8, 8) and mean.dtype == std.dtype == np.float32
    known = mask.astype(bool)
    expected = np.broadcast_to(x[:, None, known].astype(np.float32), imps[:, :, known].shape)
    assert np.array_equal(imps[:, :, known], expected)  # the known pixels, exactly
    assert (std[:, known] == 0).all() and np.array_equal(mean[:, known], x[:, known].astype(np.float32))
    assert 0 <= imps.min() and imps.max() <= 1
    assert (out / "imputations.png").stat().st_size > 0
    return imps


# -------------------------------------------------------------------------------------------------- MIWAE
def test_miwae_impute_keeps_known_pixels_and_scores_complete_images(miwae_run, tmp_path):
    run, module = miwae_run
    x = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
    np.save(tmp_path / "images.npy", x)
    mask = _mask(tmp_path)
    out = tmp_path / "out"
    assert impute_cli.main(_argv(run, tmp_path, out)) == 0
    imps = _check_outputs(out, x, mask, 3)
    assert imps[:, :, ~mask.astype(bool)].std() > 0  # resampled latents: the imputations differ
    report = json.loads((out / "scores.json").read_text())
    about = report["imputations"]
    assert about["values"] == "probabilities" and "importance resampling" in about["method"]
    assert about["importance_samples"] == 30
    assert about["importance_samples_from"] == "the run's eval.miwae_samples"
    assert 1 <= about["ess_mean"] <= 30
    # The score: MIWAE's self-normalised estimate on the binarised image (seed 0), known and hidden pixels of
    # the same draw, with the run's L; the command seeds the RNG with --seed before scoring.
    s = report["scores"]["is_estimate"]
    assert "self-normalised" in s["kind"] and "not a bound" in s["kind"]
    xb = fixed_binarize(torch.as_tensor(x, dtype=torch.float32).reshape(4, 64))
    m = torch.as_tensor(mask, dtype=torch.float32).reshape(1, 64).expand(4, 64)
    pyro.set_rng_seed(0)
    expected = -miwae_impute(module, xb, m, num_samples=30).log_lik
    assert s["nll_per_image"] == pytest.approx(float(expected.double().mean()), rel=1e-5)
    # A stated L is used and recorded.
    assert impute_cli.main([*_argv(run, tmp_path, out, "--importance-samples", "7"), "--force"]) == 0
    about = json.loads((out / "scores.json").read_text())["imputations"]
    assert about["importance_samples"] == 7 and about["importance_samples_from"] == "--importance-samples"


def test_miwae_resampling_draws_latents_in_proportion_to_their_importance_weights():
    torch.manual_seed(0)
    module = build_model("miwae", x_dim=64, z_dim=4, hidden=(16,))
    with torch.no_grad():  # a sharper decoder, so that the weights are far from uniform
        for p in module.decoder.parameters():
            p.mul_(3)
    x = (torch.rand(3, 64, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    mask = torch.ones(3, 64)
    mask[:, 10:30] = 0
    num_importance, k = 5, 20000
    # The L latents the function draws first, and their weights, computed independently of it.
    with torch.no_grad():
        loc, scale = module.encode(x, mask)
        torch.manual_seed(7)
        z = torch.distributions.Normal(loc, scale).sample((num_importance,))  # (L, B, Z)
        logits = module.decode(z)
        log_lik = (torch.distributions.Bernoulli(logits=logits).log_prob(x) * mask).sum(-1)
        log_w = (log_lik + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
                 - torch.distributions.Normal(loc, scale).log_prob(z).sum(-1))
        w = torch.softmax(log_w.double(), 0)  # (L, B)
        candidates = torch.sigmoid(logits)  # (L, B, D)
    assert w.max() > 0.4  # the check below can tell weighted from uniform resampling
    torch.manual_seed(7)
    probs, ess = impute_cli.miwae_resample(module, x, mask, k, num_importance, chunk_size=num_importance)
    assert probs.shape == (3, k, 64)
    assert torch.allclose(ess, 1 / (w**2).sum(0))
    for b in range(3):
        # every imputation is the decoder output of one of the L latents
        dist = (probs[b][:, None, :] - candidates[:, b][None]).abs().amax(-1)  # (K, L)
        assert (dist.min(1).values < 1e-5).all()
        freq = torch.bincount(dist.argmin(1), minlength=num_importance).double() / k
        assert torch.allclose(freq, w[:, b], atol=0.02), (freq, w[:, b])
    # one latent: all K imputations are the same
    probs, _ = impute_cli.miwae_resample(module, x, mask, 4, 1)
    assert torch.equal(probs, probs[:, :1].expand_as(probs))


# ---------------------------------------------------------------------------------- template matching
def test_tm_honest_imputes_with_the_best_matching_training_image_and_scores_it_exactly(tm_run, tmp_path):
    train = load_dataset("digits").train
    x = train[[3, 50, 700]].double().reshape(3, 8, 8).numpy()  # training images match themselves
    np.save(tmp_path / "images.npy", x)
    mask = _mask(tmp_path)
    out = tmp_path / "out"
    assert impute_cli.main(_argv(tm_run, tmp_path, out)) == 0
    imps = _check_outputs(out, x, mask, 3)
    hidden = ~mask.astype(bool)
    assert np.allclose(imps[:, :, hidden], x[:, None, hidden], atol=1e-6)  # the matched template
    assert np.array_equal(imps, np.broadcast_to(imps[:, :1], imps.shape))  # one predictive: K equal copies
    report = json.loads((out / "scores.json").read_text())
    assert report["imputations"]["values"] == "probabilities" and report["imputations"]["template_index"] == \
        [3, 50, 700]
    s = report["scores"]["exact"]
    xb = fixed_binarize(torch.as_tensor(x, dtype=torch.float32).reshape(3, 64))
    m = torch.as_tensor(mask, dtype=torch.float32).reshape(1, 64).expand(3, 64)
    expected = template_match(train, xb, m, mode="honest").nll
    assert s["kind"].startswith("exact")
    assert s["nll_per_image"] == pytest.approx(float(expected.double().mean()))
    # --draws: K Bernoulli draws from the template at the hidden pixels, the known ones still exact.
    assert impute_cli.main([*_argv(tm_run, tmp_path, out, "--draws", "--samples", "6"), "--force"]) == 0
    imps = _check_outputs(out, x, mask, 6)
    assert set(np.unique(imps[:, :, hidden])) <= {0.0, 1.0}
    assert json.loads((out / "scores.json").read_text())["imputations"]["values"] == "draws"


def test_tm_oracular_is_refused_in_one_line(tmp_path, capsys):
    run = _cell(tmp_path / "orac", "tm-oracular", {"dataset": "digits"})
    np.save(tmp_path / "images.npy", np.full((2, 8, 8), 0.5))
    _mask(tmp_path)
    out = tmp_path / "out"
    assert impute_cli.main(_argv(run, tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run") and err.strip().count("\n") == 0
    assert "tm-oracular" in err and "true values" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- errors
def test_wrong_size_and_wrong_range_masks_name_the_flag(tm_run, tmp_path, capsys):
    np.save(tmp_path / "images.npy", np.full((2, 8, 8), 0.5))
    argv = _argv(tm_run, tmp_path, tmp_path / "out")
    for array, expected in [(np.ones((28, 28)), "8×8"), (np.full((8, 8), 255.0), "divide an 8-bit mask"),
                            (np.full((8, 8), -1.0), "must be 0 (hidden) or 1 (known)")]:
        np.save(tmp_path / "mask.npy", array)
        assert impute_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --mask") and expected in err and err.strip().count("\n") == 0
    argv[argv.index("--mask") + 1] = "mar-99"
    assert impute_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mask mar-99") and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- VAE
def test_vae_impute_starts_at_the_training_mean_and_scores_on_one_binarisation(tmp_path, monkeypatch):
    torch.manual_seed(0)
    run = tmp_path / "vae"
    run.mkdir()
    vae = build_model("vae", x_dim=64, z_dim=4, hidden=(16,))
    save_checkpoint({"module": vae.state_dict()}, run / "best.pt")
    sizes = {"z_dim": 4, "hidden": [16]}  # both layouts of a VAE run's configuration: top level and "model"
    (run / "results.json").write_text(json.dumps({"experiment": "vae",
                                                  "config": {"dataset": "digits", **sizes, "model": sizes}}))
    calls = []
    original = runs.vae_impute

    def spy(vae, x, mask, **kwargs):
        calls.append((x.clone(), kwargs["fill"]))
        return original(vae, x, mask, **kwargs)

    monkeypatch.setattr(runs, "vae_impute", spy)
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64).numpy()
    np.save(tmp_path / "images.npy", x)
    mask = _mask(tmp_path)
    out = tmp_path / "out"
    assert impute_cli.main(_argv(run, tmp_path, out, "--samples", "2")) == 0
    _check_outputs(out, x, mask, 2)
    train_mean = load_dataset("digits").train.mean(0)
    assert len(calls) == 3  # K = 2 chains for the imputations, one call of 2 chains for the score
    for _, fill in calls:
        assert torch.allclose(fill.cpu(), train_mean)  # not 0.5: the imputation experiment's start
    # The score conditions on the binarised known pixels of the same draw it scores the hidden ones on.
    xb = fixed_binarize(torch.as_tensor(x, dtype=torch.float32).reshape(3, 64))
    assert torch.equal(calls[-1][0].cpu(), xb)
    report = json.loads((out / "scores.json").read_text())
    assert "not a bound" in report["scores"]["final_step"]["kind"]
    assert report["imputations"]["values"] == "probabilities"
