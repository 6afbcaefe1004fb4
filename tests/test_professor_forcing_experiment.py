"""The professor-forcing experiment end to end at toy sizes, on a text file of our own and on digit pixels:
what it reports, and that bad input is a clear error."""

import json
import math

import pytest

SMALL = ["train.epochs=1", "data.seq_len=12", "data.max_train=40", "data.max_eval=20", "model.hidden=8",
         "model.embed=4", "professor.hidden=4", "professor.mlp=4", "eval.state_sequences=4",
         "eval.tsne_points=20", "eval.num_samples=2", "eval.sample_factor=3", "train.batch_size=8"]


def _run(out, *extra):
    from experiments.professor_forcing import main

    sets = [arg for assignment in SMALL for arg in ("--set", assignment)]
    return main(["--preset", "quick", "--out", str(out), "--no-progress", *sets, *extra])


def test_the_experiment_runs_on_a_text_file_and_reports_what_it_measured(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 60, encoding="utf-8")
    assert _run(tmp_path / "out", "--text", str(text)) == 0
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["config"]["data"]["text_file"] == str(text)
    assert set(r["variants"]) == {"teacher", "professor"}
    for name, v in r["variants"].items():
        assert v["unit"] == "bits per character" and math.isfinite(v["test_nll"])
        assert v["test_sequences"] == 153 // 12  # the last 5 % of the 3,060 characters
        assert v["states"]["centroid_distance"] > 0 and v["states"]["mean_nearest_distance"] > 0
        samples = (tmp_path / "out" / f"samples_{name}.txt").read_text(encoding="utf-8")
        assert len(samples.split("\n\n----\n\n")[0]) == 3 * 12  # free runs 3 x the training length
        assert (tmp_path / "out" / f"states_{name}.png").stat().st_size > 1000
    lines = (tmp_path / "out" / "professor" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    logged = {"professor/accuracy", "professor/gate_generator", "professor/gate_discriminator"}
    assert logged <= set(metrics[0])
    gates = (tmp_path / "out" / "professor" / "gates.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in gates]
    assert [row["step"] for row in steps] == list(range(1, metrics[-1]["step"] + 1))  # one row per step
    assert all(row["gate_generator"] == float(row["accuracy"] > 0.75) for row in steps)
    mean = sum(row["gate_generator"] for row in steps) / len(steps)
    assert mean == pytest.approx(metrics[0]["professor/gate_generator"])
    page = (tmp_path / "out" / "results.md").read_text()
    assert "bits per character" in page and "not t-SNE space" in page
    d, v = r["paired_difference"], r["variants"]
    assert d["nll"] == pytest.approx(v["professor"]["test_nll"] - v["teacher"]["test_nll"], abs=1e-9)
    assert 0 <= d["fraction_professor_lower"] <= 1 and "Paired over the same test sequences" in page
    for x in v.values():  # free runs of 3 × 12 characters in three segments of 12
        assert [s["segment"] for s in x["long_run"]] == [1, 2, 3]
        assert all(s["mean_nearest_distance"] >= 0 and 0 <= s["entropy_bits"] <= math.log2(40)
                   for s in x["long_run"])
    assert "Free runs 3 × the training length" in page
    from experiments.runs import load_run

    with pytest.raises(ValueError, match="character model"):
        load_run(tmp_path / "out" / "teacher")


def test_the_experiment_runs_on_pixels(tmp_path):
    assert _run(tmp_path, "--set", "data.kind=pixels", "--set", "data.downsample=2",
                "--set", "data.seq_len=16", "--set", "variants=[teacher]") == 0
    v = json.loads((tmp_path / "results.json").read_text())["variants"]["teacher"]
    assert v["unit"] == "nats per image" and v["samples"]["length"] == 16  # 8 x 8 digits at 4 x 4
    assert (tmp_path / "samples_teacher.png").stat().st_size > 1000
    from experiments.runs import load_run

    run = load_run(tmp_path / "teacher")  # what experiments.sample loads: the 4 x 4 block means
    assert run.model_name == "gru-pixels" and run.image_shape == (4, 4)
    assert run.module.sample(3).shape == (3, 16)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path / "a", "--set", "variants=[amateur]")
    assert "variants must be a non-empty list" in capsys.readouterr().err
    assert _run(tmp_path / "b", "--text", str(tmp_path / "missing.txt")) == 2
    assert "no such text file" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("x" * 100, encoding="utf-8")  # 5 valid characters: no sequence of 12
    assert _run(tmp_path / "c", "--text", str(tmp_path / "short.txt")) == 2
    assert "sequence length must be an integer" in capsys.readouterr().err
    assert _run(tmp_path / "d", "--set", "data.kind=pixels", "--set", "data.downsample=2") == 2  # 12 != 16
    assert "data.seq_len is 12, but pixel sequences are whole 4 x 4 images" in capsys.readouterr().err
