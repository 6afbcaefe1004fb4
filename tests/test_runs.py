"""Trained runs a user can apply: experiments.runs.load_run and the sampling command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import sample as sample_cli
from experiments.runs import load_run
from inference.checkpoint import save_checkpoint
from ppl_models import build_model

ROOT = Path(__file__).resolve().parents[1]
VAE_RUN = str(ROOT / "results" / "vae-fashion")


@pytest.mark.parametrize("run_dir, name",
                         [("vae-fashion", "vae"), ("draw-cpu/extended-add", "draw-extended-add")])
def test_load_run_of_committed_runs(run_dir, name):
    run = load_run(ROOT / "results" / run_dir)
    assert run.model_name == name and run.image_shape == (28, 28) and not run.module.training
    x = run.module.sample(5)
    assert x.shape == (5, 784) and 0 <= x.min() and x.max() <= 1


def _fake_imputation_run(tmp_path, method: str, config: dict):
    torch.manual_seed(0)
    module = build_model(method, x_dim=64, **{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in config[method.split("-")[0]].items()})
    save_checkpoint({"module": module.state_dict()}, tmp_path / "best.pt")
    (tmp_path / "result.json").write_text(json.dumps({"method": method, "config": config}))
    return module


def test_load_run_of_an_imputation_cell_restores_its_weights(tmp_path):
    config = {"dataset": "digits", "num_steps": None, "gpsi": {"z_dim": 4, "hidden": [16], "num_steps": 2}}
    trained = _fake_imputation_run(tmp_path, "gpsi-jump", config)
    run = load_run(tmp_path)
    assert run.model_name == "gpsi-jump" and run.image_shape == (8, 8)
    for key, value in trained.state_dict().items():
        assert torch.equal(run.module.state_dict()[key], value)


def test_load_run_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no result.json or results.json"):
        load_run(tmp_path)
    config = {"dataset": "digits", "gpsi": {"z_dim": 4, "hidden": [16], "num_steps": 2}}
    (tmp_path / "result.json").write_text(json.dumps({"method": "gpsi-add", "config": config}))
    with pytest.raises(FileNotFoundError, match="no best.pt"):
        load_run(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"method": "tm-honest", "config": config}))
    with pytest.raises(ValueError, match="trains no model of its own"):
        load_run(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"variant": "vae", "config": config}))
    with pytest.raises(ValueError, match="load that run instead"):
        load_run(tmp_path)


def test_sample_command_writes_documented_files_without_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEQGEN_FASHION_MNIST_DIR", str(tmp_path / "no-data-here"))
    out = tmp_path / "samples"
    assert sample_cli.main(["--run", VAE_RUN, "--n", "6", "--out", str(out), "--device", "cpu"]) == 0
    array = np.load(out / "samples.npy")
    assert array.shape == (6, 28, 28) and array.dtype == np.float32 and 0 <= array.min() and array.max() <= 1
    assert (out / "samples.png").stat().st_size > 0
    assert json.loads((out / "samples.json").read_text())["model"] == "vae"
    # A second run does not overwrite without --force, and says so in one line.
    before = (out / "samples.npy").read_bytes()
    assert sample_cli.main(["--run", VAE_RUN, "--n", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert (out / "samples.npy").read_bytes() == before
    assert sample_cli.main(["--run", VAE_RUN, "--n", "2", "--out", str(out), "--force"]) == 0
    assert np.load(out / "samples.npy").shape == (2, 28, 28)
    # Any file the command would write counts, not only samples.npy.
    other = tmp_path / "other"
    other.mkdir()
    (other / "samples.png").write_bytes(b"not ours")
    assert sample_cli.main(["--run", VAE_RUN, "--n", "2", "--out", str(other)]) == 2
    assert (other / "samples.png").read_bytes() == b"not ours"


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "must be >= 1"),
    (["--n", "x"], "is not an integer"),
    (["--seed", "-1"], "must be >= 0"),
])
def test_sample_command_rejects_bad_numbers_in_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample_cli.main(["--run", VAE_RUN, "--out", str(tmp_path), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_sample_command_unavailable_device_and_missing_run_are_one_line(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert sample_cli.main(["--run", VAE_RUN, "--out", str(tmp_path), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert sample_cli.main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run") and err.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------------- impute
@pytest.fixture
def imputer_run(tmp_path):
    """A gpsi-add run on 8x8 digits (untrained weights: the command's contract, not its quality)."""
    run = tmp_path / "run"
    run.mkdir()
    config = {"dataset": "digits", "num_steps": None, "gpsi": {"z_dim": 4, "hidden": [16], "num_steps": 2}}
    _fake_imputation_run(run, "gpsi-add", config)
    return run


def _images(tmp_path, n=5, shape=(8, 8)):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64).numpy()
    np.save(tmp_path / "images.npy", x)
    return x


def test_impute_keeps_known_pixels_and_writes_documented_shapes(imputer_run, tmp_path):
    from experiments import impute as impute_cli

    x = _images(tmp_path)
    out = tmp_path / "out"
    argv = ["--run", str(imputer_run), "--images", str(tmp_path / "images.npy"), "--mask", "mar-4",
            "--samples", "3", "--out", str(out), "--iw-samples", "20", "--device", "cpu"]
    assert impute_cli.main(argv) == 0
    imps = np.load(out / "imputations.npy")
    mean, std = np.load(out / "mean.npy"), np.load(out / "std.npy")
    assert imps.shape == (5, 3, 8, 8) and mean.shape == std.shape == (5, 8, 8) and imps.dtype == np.float32
    # With a mask file, the known pixels of every imputation are exactly the input's.
    mask = np.ones((8, 8))
    mask[2:5, 3:7] = 0
    np.save(tmp_path / "mask.npy", mask)
    argv[5] = str(tmp_path / "mask.npy")
    assert impute_cli.main([*argv, "--force"]) == 0
    imps = np.load(out / "imputations.npy")
    known = mask.astype(bool)
    expected = np.broadcast_to(x[:, None, known].astype(np.float32), imps[:, :, known].shape)
    assert np.array_equal(imps[:, :, known], expected)
    assert (np.load(out / "std.npy")[:, known] == 0).all()
    assert 0 <= imps.min() and imps.max() <= 1
    report = json.loads((out / "scores.json").read_text())
    assert {"bound", "iwae", "binarisation"} <= set(report["scores"])
    assert (out / "imputations.png").stat().st_size > 0


@pytest.mark.parametrize("mask, match", [
    ("wrong-size", "shape"), ("nothing", "hides no pixel"), ("everything", "hides every pixel"),
    ("not-binary", "must be 0"),
])
def test_impute_rejects_bad_masks_in_one_line(imputer_run, tmp_path, capsys, mask, match):
    from experiments import impute as impute_cli

    _images(tmp_path)
    arrays = {"wrong-size": np.ones((7, 8)), "nothing": np.ones((8, 8)), "everything": np.zeros((8, 8)),
              "not-binary": np.full((8, 8), 0.5)}
    np.save(tmp_path / "mask.npy", arrays[mask])
    argv = ["--run", str(imputer_run), "--images", str(tmp_path / "images.npy"), "--mask",
            str(tmp_path / "mask.npy"), "--out", str(tmp_path / "out")]
    assert impute_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()  # nothing written, no empty directory left


def test_impute_rejects_wrong_image_size_and_range(imputer_run, tmp_path, capsys):
    from experiments import impute as impute_cli

    _images(tmp_path, shape=(28, 28))
    argv = ["--run", str(imputer_run), "--images", str(tmp_path / "images.npy"), "--mask", "mar-4",
            "--out", str(tmp_path / "out")]
    assert impute_cli.main(argv) == 2
    assert "the run's model takes N×8×8" in capsys.readouterr().err
    np.save(tmp_path / "images.npy", np.full((2, 8, 8), 255.0))
    assert impute_cli.main(argv) == 2
    assert "must lie in [0, 1]" in capsys.readouterr().err
