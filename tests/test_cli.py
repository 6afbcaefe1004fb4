"""The experiments' command lines never misreport: each promise of the README is a test that can fail."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from experiments import draw as draw_experiment
from experiments import imputation as imputation_experiment
from experiments import vae as vae_experiment
from experiments.common import record_config

SMALL_VAE = ["--preset", "quick", "--epochs", "1", "--iw-samples", "5", "--eval-limit", "10",
             "--no-progress", "--device", "cpu"]


def _epochs_trained(out) -> int:
    return len((out / "metrics.jsonl").read_text().strip().splitlines())


def test_epochs_override_takes_effect_in_a_nested_preset(tmp_path):
    """--epochs sets train.epochs of the imputation preset (it used to be ignored: 20 epochs were trained)."""
    out = tmp_path / "cell"
    code = imputation_experiment.main(["--preset", "quick", "--method", "gpsi-add", "--mask", "mar-4",
                                       "--epochs", "1", "--eval-limit", "8", "--out", str(out),
                                       "--no-progress", "--device", "cpu"])
    assert code == 0
    assert _epochs_trained(out) == 1
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["train"]["epochs"] == 1
    assert json.loads((out / "result.json").read_text())["config"]["train"]["epochs"] == 1


def test_num_steps_override_takes_effect(tmp_path):
    """--num-steps reaches the model (it used to be dropped for both experiments)."""
    from experiments.common import resolve_config

    parser = draw_experiment.DRAW_EXPERIMENT.build_parser()
    args = parser.parse_args(["--preset", "quick", "--num-steps", "2"])
    assert resolve_config("draw", args)["generator"]["num_steps"] == 2
    parser = imputation_experiment.IMPUTATION_EXPERIMENT.build_parser()
    args = parser.parse_args(["--method", "gpsi-add", "--mask", "mar-4", "--num-steps", "3"])
    assert resolve_config("imputation", args)["num_steps"] == 3


def test_resume_with_a_changed_learning_rate_is_refused_and_named(tmp_path, capsys):
    out = tmp_path / "vae"
    assert vae_experiment.main([*SMALL_VAE, "--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert vae_experiment.main([*SMALL_VAE, "--out", str(out), "--resume", "--lr", "0.002"]) == 2
    err = capsys.readouterr().err
    assert "--resume refused" in err and "lr: run 0.001, now 0.002" in err and err.count("\n") == 1
    assert (out / "results.json").read_text() == before  # the report still states what ran


def test_more_epochs_on_resume_only_with_a_constant_learning_rate(tmp_path):
    constant = {"lr": 1e-3, "lr_final": 1e-3, "epochs": 2}
    record_config(tmp_path, constant, resume=False)
    # Only an experiment that trains the extra epochs may extend (the same run as 4 epochs from the start).
    with pytest.raises(ValueError, match="epochs: run 2, now 4"):
        record_config(tmp_path, {**constant, "epochs": 4}, resume=True)
    record_config(tmp_path, {**constant, "epochs": 4}, resume=True, more_epochs_retrain=True)
    decaying = tmp_path / "decaying"
    decaying.mkdir()
    record_config(decaying, {"train": {"lr": 1e-3, "lr_final": 1e-4, "epochs": 2}}, resume=False)
    with pytest.raises(ValueError, match=r"train.epochs: run 2, now 4"):
        record_config(decaying, {"train": {"lr": 1e-3, "lr_final": 1e-4, "epochs": 4}}, resume=True,
                      more_epochs_retrain=True)


def test_a_foreign_results_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "vae"
    assert vae_experiment.main([*SMALL_VAE, "--out", str(out)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert vae_experiment.main([*SMALL_VAE, "--out", str(out), "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "holds another run's results" in err and "--force" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert vae_experiment.main([*SMALL_VAE, "--out", str(out), "--seed", "5", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 5
    # The same command again is the same run made again (the README's first command can be rerun).
    assert vae_experiment.main([*SMALL_VAE, "--out", str(out), "--seed", "5"]) == 0


@pytest.mark.parametrize("module, argv, message", [
    (vae_experiment, ["--batch-size", "0"], "--batch-size: 0 is out of range: must be >= 1"),
    (vae_experiment, ["--lr", "-1"], "--lr: -1.0 is out of range: must be a number > 0"),
    (vae_experiment, ["--lr", "nan"], "--lr: nan is out of range"),
    (vae_experiment, ["--epochs", "0"], "--epochs: 0 is out of range: must be >= 1"),
    (vae_experiment, ["--iw-samples", "0"], "--iw-samples: 0 is out of range: must be >= 1"),
    (vae_experiment, ["--seed", "-1"], "--seed: -1 is out of range: must be >= 0"),
    (vae_experiment, ["--eval-limit", "-4"], "--eval-limit: -4 is out of range: must be >= 0"),
    (draw_experiment, ["--iw-samples", "0"], "--iw-samples: 0 is out of range: must be >= 1"),
    (draw_experiment, ["--num-steps", "0"], "--num-steps: 0 is out of range: must be >= 1"),
    (imputation_experiment, ["--method", "gpsi-add", "--mask", "mcar-0"], "hides no pixel"),
    (imputation_experiment, ["--method", "gpsi-add", "--mask", "mcar-120"], "--mask"),
])
def test_bad_numbers_exit_2_with_one_line(module, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_line_and_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "never"
    assert vae_experiment.main(["--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: CUDA is not available; available devices: ['cpu'")
    assert err.count("\n") == 1
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_read_only_output_directory_fails_before_any_work(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert vae_experiment.main([*SMALL_VAE, "--out", str(parent / "run")]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        parent.chmod(0o700)


def test_an_early_error_leaves_no_empty_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = vae_experiment.main(["--preset", "fashion", "--data-dir", str(tmp_path / "no-data"),
                                "--out", str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_help_shows_each_default_once(capsys):
    for module in (vae_experiment, draw_experiment):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: False)" not in text
        assert text.count("(default auto)") == 1


def test_another_method_or_mask_is_another_run(tmp_path, capsys):
    """The imputation method and mask are part of the recorded configuration."""
    out = tmp_path / "cell"
    base = ["--preset", "quick", "--epochs", "1", "--eval-limit", "8", "--out", str(out), "--no-progress",
            "--device", "cpu"]
    assert imputation_experiment.main(["--method", "tm-honest", "--mask", "mar-4", *base]) == 0
    capsys.readouterr()
    assert imputation_experiment.main(["--method", "tm-honest", "--mask", "mar-6", *base]) == 2
    assert "holds another run's results" in capsys.readouterr().err
    assert imputation_experiment.main(["--method", "gpsi-add", "--mask", "mar-4", *base, "--resume"]) == 2
    assert "method: run 'tm-honest', now 'gpsi-add'" in capsys.readouterr().err


def test_a_run_from_before_config_json_is_checked_against_its_result_file(tmp_path, capsys):
    """Committed runs have no config.json: their result file's config is what --resume compares."""
    out = tmp_path / "draw-cpu"
    out.mkdir()
    committed = Path(__file__).resolve().parents[1] / "results" / "draw-cpu" / "table.json"
    table = json.loads(committed.read_text())
    (out / "table.json").write_text(json.dumps({"config": table["config"]}))
    code = draw_experiment.main(["--preset", "quick", "--resume", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume refused" in err and "preset: run 'cpu', now 'quick'" in err
    assert not (out / "config.json").exists()


def test_an_early_error_removes_the_parents_it_created(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    code = vae_experiment.main(["--preset", "fashion", "--data-dir", str(tmp_path / "no-data"),
                                "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 2 and not (tmp_path / "a").exists()


@pytest.mark.parametrize("argv, message", [(["--batch-size", "0"], "--batch-size: 0 is out of range"),
                                           (["--threads", "0"], "--threads: 0 is out of range"),
                                           (["--repeats", "0"], "--repeats: 0 is out of range")])
def test_benchmark_rejects_bad_numbers_in_one_line(argv, message, capsys):
    from experiments import benchmark_gpsi

    with pytest.raises(SystemExit) as e:
        benchmark_gpsi.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_table_jobs_run_cells_concurrently_with_the_serial_numbers(tmp_path):
    """--jobs 2 runs the table's cells in two processes; each cell is the run the serial table makes."""
    from experiments import imputation_table

    base = ["--preset", "quick", "--epochs", "1", "--eval-limit", "8", "--masks", "mar-4", "--methods",
            "gpsi-add", "tm-honest", "--no-sweep", "--no-progress", "--device", "cpu"]
    assert imputation_table.main([*base, "--jobs", "2", "--out", str(tmp_path / "jobs")]) == 0
    assert imputation_table.main([*base, "--out", str(tmp_path / "serial")]) == 0
    jobs, serial = (json.loads((tmp_path / d / "table.json").read_text())["cells"]["mar-4"]
                    for d in ("jobs", "serial"))
    assert set(jobs) == {"gpsi-add", "tm-honest"}
    for method in jobs:
        # the same run; a child process may have another thread count, hence float round-off at most
        assert jobs[method]["mse"] == pytest.approx(serial[method]["mse"], rel=1e-5)


def test_compile_flag_compiles_the_networks_and_is_recorded(tmp_path, monkeypatch):
    """``--compile`` trains with the networks compiled (Dynamo traced new graphs), records it in config.json,
    and a resume without it is allowed (the same numbers to round-off). SEQGEN_COMPILE, which the flag sets
    for the run, is the caller's again after it."""
    from torch._dynamo.utils import counters

    out = tmp_path / "vae"
    args = ["--preset", "quick", "--set", "train.epochs=1", "--set", "eval.iw_samples=20", "--set",
            "eval.bound_draws=2", "--out", str(out), "--no-progress"]
    monkeypatch.setenv("SEQGEN_COMPILE", "0")
    graphs = counters["stats"]["unique_graphs"]
    assert vae_experiment.main([*args, "--compile"]) == 0
    assert os.environ["SEQGEN_COMPILE"] == "0"  # the flag's setting ends with the run
    assert counters["stats"]["unique_graphs"] > graphs
    assert json.loads((out / "config.json").read_text())["compiled_networks"] is True
    monkeypatch.setenv("SEQGEN_COMPILE", "0")
    graphs = counters["stats"]["unique_graphs"]
    assert vae_experiment.main([*args, "--resume"]) == 0
    assert counters["stats"]["unique_graphs"] == graphs  # eager this time
    assert "compiled_networks" not in json.loads((out / "config.json").read_text())


def test_step_flag_trains_the_same_update_and_a_resume_keeps_the_step(tmp_path, capsys):
    """``--step fused`` trains with one inference.optim.ClippedAdam (a torch optimiser state in the
    checkpoint) to the numbers of the SVI step up to float round-off, is recorded as train_step, and a
    resume with another step is refused by name; ``--step cuda-graph`` on a CPU says what it needs."""
    from inference.train import load_checkpoint

    runs = {}
    for step in ("svi", "fused"):
        out = tmp_path / step
        assert vae_experiment.main([*SMALL_VAE, "--out", str(out), "--step", step]) == 0
        assert json.loads((out / "config.json").read_text())["train_step"] == step
        runs[step] = json.loads((out / "results.json").read_text())["train"]
        optimiser = load_checkpoint(out / "checkpoint.pt")["optimizer"]
        assert ("param_groups" in optimiser) == (step == "fused")  # torch's state_dict vs Pyro's get_state
    assert os.environ.get("SEQGEN_STEP") is None  # the flag's setting ends with the run
    assert runs["fused"]["final_train_loss"] == pytest.approx(runs["svi"]["final_train_loss"], rel=1e-5)
    capsys.readouterr()
    resume_svi = [*SMALL_VAE, "--out", str(tmp_path / "fused"), "--resume", "--step", "svi"]
    assert vae_experiment.main(resume_svi) == 2
    assert "train_step: run 'fused', now 'svi'" in capsys.readouterr().err
    assert vae_experiment.main([*SMALL_VAE, "--out", str(tmp_path / "graph"), "--step", "cuda-graph"]) == 2
    assert "cuda_graph=True needs a CUDA device (this run's is cpu)" in capsys.readouterr().err


def test_a_new_run_takes_the_fused_step_and_a_recorded_run_its_own(tmp_path, capsys):
    """Without ``--step``: a new run trains with ``fused`` (walkback, whose online update needs Pyro's
    optimiser, with ``svi``); where ``--out`` holds a run, the step that run recorded, so that a resume, a
    forced resume, the same command made again and a table's cells (which resume from their checkpoints)
    all keep the optimiser whose state was saved; a run recorded before ``train_step`` existed trained
    with svi. Its report's command pins the step it trained with."""
    from experiments.common import resolve_step
    from experiments.walkback import WALKBACK_EXPERIMENT

    def recorded(out) -> str:
        return json.loads((out / "config.json").read_text())["train_step"]

    new = tmp_path / "new"
    assert vae_experiment.main([*SMALL_VAE, "--out", str(new)]) == 0
    assert recorded(new) == "fused"
    assert "--step fused" in json.loads((new / "results.json").read_text())["command"]
    old = tmp_path / "old"
    assert vae_experiment.main([*SMALL_VAE, "--out", str(old), "--step", "svi"]) == 0
    for again in ([], ["--resume"], ["--resume", "--force"]):  # none refused, none switches the optimiser
        assert vae_experiment.main([*SMALL_VAE, "--out", str(old), *again]) == 0, capsys.readouterr().err
        assert recorded(old) == "svi" and _epochs_trained(old) == 1
    assert "--step svi" in json.loads((old / "results.json").read_text())["command"]
    # An explicit other step on a resume is refused by name.
    assert vae_experiment.main([*SMALL_VAE, "--out", str(old), "--resume", "--step", "fused"]) == 2
    assert "train_step: run 'svi', now 'fused'" in capsys.readouterr().err
    # A run recorded without the key: its config.json as it was written then.
    config = json.loads((old / "config.json").read_text())
    del config["train_step"]
    (old / "config.json").write_text(json.dumps(config))
    parser = vae_experiment.VAE_EXPERIMENT.build_parser()
    assert resolve_step(parser.parse_args([*SMALL_VAE, "--out", str(old), "--resume"]), "runs/vae") == "svi"
    assert resolve_step(parser.parse_args([*SMALL_VAE, "--out", str(old)]), "runs/vae") == "svi"
    empty = parser.parse_args([*SMALL_VAE, "--out", str(tmp_path / "empty")])
    assert resolve_step(empty, "runs/vae") == "fused"
    walkback = WALKBACK_EXPERIMENT.build_parser().parse_args(["--preset", "quick", "--out",
                                                              str(tmp_path / "w")])
    assert resolve_step(walkback, "runs/walkback") == "svi"
