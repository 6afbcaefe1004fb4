"""The walkback experiment end to end on digits and the 2-D toy at toy sizes: what it reports, that an image
form's directory loads with experiments.sample, the toy's exact density, and that bad input is a clear
error."""

import json
import math

import pytest
import torch

SMALL = ["train_bernoulli.epochs=1", "train_gaussian.epochs=1", "train_toy.epochs=1", "bernoulli.hidden=[16]",
         "gaussian.hidden=[16]", "toy.hidden=[16]", "bernoulli.t_max=8", "gaussian.t_max=8", "toy.t_max=8",
         "bernoulli.max_extra=3", "gaussian.max_extra=3", "toy.max_extra=3", "eval.walk_steps=[3,6]",
         "eval.is_walk_steps=[6]", "eval.is_images=10", "eval.is_samples=8", "eval.is_chunk=4",
         "eval.fd_samples=50", "eval.reversibility_chains=4", "eval.reversibility_steps=20",
         "eval.reversibility_burn_in=5", "eval.walk_chains=2", "eval.inpaint_images=2", "eval.toy_grid=8",
         "eval.toy_is_samples=4", "toy_data.train=200", "toy_data.valid=50", "toy_data.test=100"]


def _run(tmp_path, *extra):
    from experiments.walkback import main

    sets = [arg for assignment in SMALL for arg in ("--set", assignment)]
    return main(["--preset", "quick", "--out", str(tmp_path), "--no-progress", *sets, *extra])


def test_the_experiment_runs_end_to_end_and_reports_what_it_measured(tmp_path):
    assert _run(tmp_path) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r["forms"]) == {"bernoulli", "gaussian", "toy"}
    for form, x in r["forms"].items():
        assert [w["walk_steps"] for w in x["walks"]] == [3, 6]
        assert x["walks"][0]["temperatures"] == [1, 2, 4]  # ceil(log2 8) = 3 heating steps, n = 0
        assert x["walks"][1]["temperatures"] == [1, 1, 1, 1, 2, 4]  # 3 steps at T = 1 first
        long = x["walks"][1]
        assert "test_is" in long and "test_is" not in x["walks"][0]
        assert math.isfinite(long["test_bound"]["ll"]) and long["test_is"]["samples"] == 8
        assert long["test_is"]["num"] == 10 and math.isfinite(long["test_is"]["ll"])
        assert math.isfinite(x["reversibility"]["kl_per_step"])
        assert (x["reversibility"]["ratio"] is None) == (form != "bernoulli")  # a ratio only where discrete
        assert x["samples"]["long_run_steps"] == 10 * 6
    assert r["forms"]["bernoulli"]["walks"][0]["test_bound"]["num"] == 250  # bound_images 0: every test image
    toy = r["forms"]["toy"]
    assert toy["exact_test_ll"]["num"] == 100 and math.isfinite(toy["exact_test_ll"]["ll"])
    for name in ("walks_bernoulli.png", "samples_gaussian.png", "long_run_bernoulli.png",
                 "inpaint_gaussian.png", "density_toy.png", "curves_toy.png"):
        assert (tmp_path / name).stat().st_size > 1000
    page = (tmp_path / "results.md").read_text()
    assert "FD-classifier" in page and "FID" not in page and "VW (6 steps, IS estimate, 8 paths)" in page
    assert "exact log p(x) of the toy" in page and "% of the per-step entropy" in page

    from experiments.runs import load_run
    from experiments.sample import main as sample_main

    loaded = load_run(str(tmp_path / "bernoulli"), "cpu")
    state = torch.load(tmp_path / "bernoulli" / "final.pt", weights_only=False)["module"]
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in state.items())
    drawn = str(tmp_path / "drawn")
    assert sample_main(["--run", str(tmp_path / "gaussian"), "--n", "4", "--out", drawn]) == 0
    with pytest.raises(ValueError, match="2-D toy"):
        load_run(str(tmp_path / "toy"), "cpu")


def test_the_gaussian_form_scores_dequantised_grey_levels():
    from experiments.walkback import dequantize

    x = torch.tensor([[0.0, 8 / 16, 1.0]])
    d = dequantize(x, 17, torch.Generator().manual_seed(0))
    k = torch.tensor([[0.0, 8.0, 16.0]])
    assert torch.all(d >= k / 17) and torch.all(d < (k + 1) / 17)  # inside the grey level's own bin


def test_the_toy_density_is_normalised_and_matches_its_samples():
    from experiments.data import ring_mixture, ring_mixture_log_density

    g = torch.linspace(-4, 4, 401)
    grid = torch.cartesian_prod(g, g)
    mass = ring_mixture_log_density(grid, 8, 2.0, 0.3).exp().sum() * (g[1] - g[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)
    x = ring_mixture(8, 2.0, 0.3, 20000, torch.Generator().manual_seed(0))
    assert float(x.norm(dim=1).mean()) == pytest.approx(2.0, abs=0.05)
    # minus the mean log-density of its own samples estimates the entropy, for modes this far apart that of
    # the uniform choice of a mode plus one mode's
    ll = ring_mixture_log_density(x, 8, 2.0, 0.3)
    entropy = math.log(8) + math.log(2 * math.pi * math.e * 0.3**2)
    assert float(-ll.mean()) == pytest.approx(entropy, abs=0.05)


def test_bad_settings_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--set", "forms=[poisson]")
    assert "forms must be a non-empty list of distinct forms from ['bernoulli', 'gaussian', 'toy']" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tmp_path / "b", "--set", "eval.walk_steps=[3,9]", "--set", "eval.is_walk_steps=[3]")
    err = capsys.readouterr().err
    assert "walk lengths [9] outside the walk lengths form 'bernoulli' trains on" in err
    with pytest.raises(SystemExit):
        _run(tmp_path / "c", "--set", "eval.is_walk_steps=[4]")
    err = capsys.readouterr().err
    assert "the importance-sampled walk lengths [4] of form 'bernoulli' must be among" in err
    with pytest.raises(SystemExit):
        _run(tmp_path / "d", "--set", "bernoulli.update=sometimes")
    assert "update" in capsys.readouterr().err


def test_the_online_update_refuses_a_decaying_learning_rate(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--set", "bernoulli.update=online", "--set", "train_bernoulli.lr_final=0.0001")
    assert "takes one optimiser step per walk step" in capsys.readouterr().err


def test_the_discrete_bits_per_dim_of_a_dequantised_density():
    from experiments.walkback import discrete_bits_per_dim

    # the uniform density on [0, 1]^D (log p = 0) puts probability 1 / L^D on every L-level image
    assert discrete_bits_per_dim(0.0, 64, 17) == pytest.approx(math.log2(17))
    # a density twice as high everywhere it has mass (half the cube) halves each image's probability bound
    assert discrete_bits_per_dim(64 * math.log(2), 64, 256) == pytest.approx(7.0)
