"""The GC-RL experiment end to end at toy sizes on digits: Table 1's columns for both trained methods, the
bound rows, the figures, the saved runs that experiments.sample loads, and clear errors."""

import json
import math

import pytest

SMALL = ["agent.steps=3", "agent.actions=4", "agent.channels=4", "agent.groups=2", "agent.embed_dim=4",
         "agent.select_channels=4", "train.epochs=1", "train.max_train=64", "train.batch_size=32",
         "train.capacity=500", "train.trajectory_capacity=100", "train.valid_limit=20",
         "train.sigma2_images=40",
         "vae.z_dim=2", "vae.channels=[4,8]", "train_vae.epochs=1", "train_vae.valid_limit=20",
         "eval.batch_size=25", "eval.recon_images=30", "eval.fd_samples=30", "eval.fd_reference=50",
         "eval.bound_images=10", "eval.iw_samples=4", "eval.taus=[1.0]", "eval.trajectories=2"]


def _run(out, *extra):
    from experiments.gcrl import main

    sets = [arg for assignment in SMALL for arg in ("--set", assignment)]
    return main(["--preset", "quick", "--out", str(out), "--no-progress", *sets, *extra])


def test_the_experiment_reports_table_1_and_the_bound_and_saves_loadable_runs(tmp_path):
    assert _run(tmp_path / "out") == 0
    out = tmp_path / "out"
    r = json.loads((out / "results.json").read_text())
    assert set(r["methods"]) == {"gcrl", "vae"}  # the quick preset names no diffusion run
    for entry in r["methods"].values():
        assert 0 <= entry["mse"] <= 1 and math.isfinite(entry["fd_reconstructions"])
        assert set(entry["fd_samples"]) == {"train", "test"} and entry["num_samples"] == 30
    assert r["methods"]["gcrl"]["sampling_steps"] == 3 and r["methods"]["vae"]["sampling_steps"] == 1
    rows = {(b["method"], b["tau"]) for b in r["bounds"]}
    assert rows == {("gcrl", 0.0), ("gcrl", 1.0), ("vae", None)}
    greedy = next(b for b in r["bounds"] if b["tau"] == 0.0)
    assert greedy["iwae"] is None and math.isfinite(greedy["bound"]["nll"]) and greedy["bound"]["num"] == 10
    page = (out / "results.md").read_text()
    assert "FD-classifier" in page and "not Inception features" in page and "= bound (a Dirac guide)" in page
    figures = ("trajectories.png", "reconstructions.png", "samples_gcrl.png", "samples_vae.png", "curves.png")
    for name in figures:
        assert (out / name).stat().st_size > 1000, name
    logged = {"gcrl/q_loss", "gcrl/select_entropy", "gcrl/reconstruction_mse", "valid_bound", "sigma2"}
    assert logged <= set(json.loads((out / "agent" / "metrics.jsonl").read_text().splitlines()[0]))

    # A fresh run repeats exactly: the agent's initial weights are seeded (the global RNG has moved on).
    assert _run(tmp_path / "again") == 0

    def first_epoch(run):
        line = json.loads((run / "agent" / "metrics.jsonl").read_text().splitlines()[0])
        return {k: v for k, v in line.items() if k != "seconds"}

    assert first_epoch(tmp_path / "again") == first_epoch(out)

    from experiments.runs import load_run

    agent, vae = load_run(out / "agent"), load_run(out / "vae")
    assert (agent.model_name, vae.model_name) == ("gcrl", "conv-vae")
    assert agent.module.sample(3).shape == (3, 64) and vae.module.sample(3).shape == (3, 64)

    # A run stopped after the agent's training, before the VAE's, resumes: the VAE starts afresh.
    import shutil

    shutil.rmtree(out / "vae")
    (out / "results.json").unlink()
    assert _run(out, "--resume") == 0
    assert len((out / "vae" / "metrics.jsonl").read_text().splitlines()) == 1
    again = json.loads((out / "results.json").read_text())["methods"]["gcrl"]
    assert {k: v for k, v in again.items() if "seconds" not in k} == \
        {k: v for k, v in r["methods"]["gcrl"].items() if "seconds" not in k}


def test_a_diffusion_run_of_another_kind_is_a_clear_error(tmp_path, capsys):
    # a committed diffusion run, but of Fashion-MNIST
    assert _run(tmp_path / "a", "--set", "diffusion.run=results/diffusion-cpu-gaussian/gaussian") == 2
    err = capsys.readouterr().err
    assert "the baseline must be a diffusion-gaussian run on digits" in err
    with pytest.raises(SystemExit):
        _run(tmp_path / "b", "--set", "agent.actions=1")
    assert "agent.actions" in capsys.readouterr().err
