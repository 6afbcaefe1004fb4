"""The diffusion experiment end to end on digits at toy sizes: what it reports, that a form's directory loads
with experiments.sample, and that bad input is a clear error."""

import json
import math

import pytest
import torch

SMALL = ["train_bernoulli.epochs=1", "train_gaussian.epochs=1", "gaussian.num_steps=20",
         "gaussian.channels=8", "gaussian.sample_steps=5", "bernoulli.num_steps=5", "eval.fd_samples=100",
         "eval.gaussian_images=20",
         "eval.trajectory_chains=2", "eval.inpaint_images=2"]


def _run(tmp_path, *extra):
    from experiments.diffusion import main

    sets = [arg for assignment in SMALL for arg in ("--set", assignment)]
    return main(["--preset", "quick", "--out", str(tmp_path), "--no-progress", *sets, *extra])


def test_the_experiment_runs_end_to_end_and_reports_what_it_measured(tmp_path, monkeypatch):
    import experiments.diffusion as diffusion
    from experiments.data import fixed_binarize, load_dataset

    scored = {}
    bound = diffusion.test_bound

    def recording(pair, test, *args):
        scored[type(pair).__name__] = test.clone()
        return bound(pair, test, *args)

    monkeypatch.setattr(diffusion, "test_bound", recording)
    assert _run(tmp_path) == 0
    # the Bernoulli form is scored on the test split binarised once with the fixed seed (the VAE's and DRAW's
    # protocol), the Gaussian form on the grey levels
    test = load_dataset("digits").test
    assert torch.equal(scored["BernoulliDiffusion"], fixed_binarize(test))
    assert torch.equal(scored["GaussianDiffusion"], test[:20])
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r["forms"]) == {"bernoulli", "gaussian"}
    for form, x in r["forms"].items():
        b = x["bound"]
        assert math.isfinite(b["nll"]) and b["nll"] > 0
        assert b["bits_per_dim"] == pytest.approx(b["nll"] / (64 * math.log(2)))
        assert b["time_step_draws_per_image"] == r["config"][form]["num_steps"]
        assert set(x["fd_classifier"]) == {"train", "test"} and math.isfinite(x["parzen"]["mean"])
        scores = {float(k): s for k, s in x["parzen"]["valid_scores"].items()}
        assert x["parzen"]["sigma"] == max(scores, key=scores.get)
        for name in (f"samples_{form}.png", f"trajectory_{form}.png", f"inpaint_{form}.png"):
            assert (tmp_path / name).stat().st_size > 1000
    assert r["forms"]["bernoulli"]["bound"]["num_images"] == 250  # 0 = every test image
    assert r["forms"]["gaussian"]["bound"]["num_images"] == 20
    assert r["forms"]["gaussian"]["samples"]["sampler_steps"] == 5
    page = (tmp_path / "results.md").read_text()
    assert "FD-classifier" in page and "FID" not in page and "L_simple" in page
    row = next(line for line in page.splitlines() if line.startswith("| gaussian |"))
    assert f"{r['forms']['gaussian']['bound']['nll']:.2f} ±" in row

    # each form's directory loads with experiments.sample (the registered model and its evaluated weights)
    from experiments.runs import load_run
    from experiments.sample import main as sample_main

    loaded = load_run(str(tmp_path / "gaussian"), "cpu")
    assert loaded.module.num_steps == 20 and loaded.module.levels == 17
    state = torch.load(tmp_path / "gaussian" / "final.pt", weights_only=False)["module"]
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in state.items())
    assert sample_main(["--run", str(tmp_path / "bernoulli"), "--n", "4", "--out",
                        str(tmp_path / "drawn")]) == 0


def test_bad_forms_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--set", "forms=[poisson]")
    assert "forms must be a non-empty list of distinct forms from ['bernoulli', 'gaussian']" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tmp_path / "b", "--set", "train_bernoulli.loss=simple")
    assert "train_bernoulli.loss must be 'bound'" in capsys.readouterr().err
