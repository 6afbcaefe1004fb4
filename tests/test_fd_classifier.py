"""The FD-classifier (inference.fd_classifier) and its training command: the committed weights pass their
hash check and nothing else does, they classify real data, and the distance and mode coverage computed in
their features behave as they must on known cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments import train_fd_classifier
from experiments.data import DataError, load_dataset
from inference import fd_classifier as fdc

RESULTS = train_fd_classifier.RESULTS_DIR


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_classifier():
    return fdc.load_fd_classifier("digits")


@pytest.mark.parametrize("dataset", sorted(fdc.CLASSIFIERS))
def test_the_committed_classifiers_pass_their_hash_check_and_agree_with_their_reports(dataset):
    info = fdc.CLASSIFIERS[dataset]
    model = fdc.load_fd_classifier(dataset)
    assert isinstance(model, fdc.FDClassifier) and not model.training
    assert model.image_shape == info.image_shape and model.num_classes == 10
    path = fdc.FD_WEIGHTS_DIR / info.file
    assert path.stat().st_size < 5 * 2**20
    assert fdc.file_sha256(path) == info.sha256
    # The registry states what the committed training run measured.
    report = json.loads((RESULTS / dataset / "report.json").read_text())
    assert report["weights_sha256"] == info.sha256
    assert report["test_accuracy"] == pytest.approx(info.test_accuracy, abs=1e-12)
    assert report["valid_accuracy"] == pytest.approx(info.valid_accuracy, abs=1e-12)
    assert "train split only" in report["trained_on"]


def test_a_corrupted_copy_fails_the_hash_check_naming_file_hashes_and_fix(tmp_path):
    good = fdc.FD_WEIGHTS_DIR / fdc.CLASSIFIERS["digits"].file
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "digits.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="fail the hash check") as err:
        fdc.load_fd_classifier("digits", path=bad)
    message = str(err.value)
    assert str(bad) in message and fdc.CLASSIFIERS["digits"].sha256 in message
    assert fdc.file_sha256(bad) in message
    assert "python -m experiments.train_fd_classifier --dataset digits" in message


def test_unknown_data_set_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="known: fashion-mnist, digits"):
        fdc.load_fd_classifier("cifar10")
    with pytest.raises(FileNotFoundError, match="not found at .*train_fd_classifier --dataset digits"):
        fdc.load_fd_classifier("digits", path=tmp_path / "absent.pt")


def test_features_shape_and_digits_test_accuracy(digits, digits_classifier):
    f = fdc.classifier_features(digits_classifier, digits.test, batch_size=64)
    assert f.shape == (250, fdc.FEATURE_DIM) and f.dtype == torch.float64 and torch.isfinite(f).all()
    # Batching does not change the features (eval mode: no dropout).
    assert torch.allclose(f, fdc.classifier_features(digits_classifier, digits.test), atol=1e-5)
    predicted = fdc.classifier_predictions(digits_classifier, digits.test)
    accuracy = float((predicted == digits.test_labels).double().mean())
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(fdc.CLASSIFIERS["digits"].test_accuracy, abs=1e-12)


def test_inputs_are_checked(digits_classifier):
    with pytest.raises(ValueError, match=r"flattened \(N, 64\)"):
        fdc.classifier_features(digits_classifier, torch.zeros(3, 784))
    with pytest.raises(ValueError, match=r"grey levels in \[0, 1\]"):
        fdc.classifier_features(digits_classifier, torch.full((3, 64), 2.0))


def test_fd_classifier_of_known_cases(digits, digits_classifier):
    scores = fdc.fd_scores(digits_classifier, digits.test, {"test": digits.test, "train": digits.train})
    assert set(scores) == {"test", "train"}
    assert scores["test"] == pytest.approx(0.0, abs=1e-6)
    noise = torch.rand(250, 64, generator=torch.Generator().manual_seed(0))
    to_noise = fdc.fd_scores(digits_classifier, noise, {"test": digits.test})["test"]
    assert scores["train"] > 0
    assert to_noise > 10 * scores["train"]


def test_mode_coverage(digits, digits_classifier):
    cover = fdc.mode_coverage(digits_classifier, digits.test)
    assert cover["max_entropy"] == pytest.approx(math.log(10))
    assert cover["entropy"] == pytest.approx(math.log(10), abs=0.05)
    assert len(cover["histogram"]) == 10 and sum(cover["histogram"]) == pytest.approx(1.0)
    assert cover["num_samples"] == 250
    one = fdc.mode_coverage(digits_classifier, digits.test[:1].repeat(40, 1))
    assert one["entropy"] == 0.0 and sorted(one["histogram"])[-1] == 1.0


def test_mode_coverage_figure(tmp_path, digits, digits_classifier):
    histograms = {"test images": fdc.mode_coverage(digits_classifier, digits.test)["histogram"],
                  "one class": [0.0] * 9 + [1.0]}
    path = tmp_path / "mode_coverage.png"
    fdc.save_mode_coverage_figure(histograms, path, "digits", class_names=fdc.DIGITS_CLASSES)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fashion_classifier_features_of_real_test_images():
    try:
        data = load_dataset("fashion-mnist")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST files missing: {e}")
    model = fdc.load_fd_classifier("fashion-mnist")
    f = fdc.classifier_features(model, data.test[:100])
    assert f.shape == (100, fdc.FEATURE_DIM) and torch.isfinite(f).all()
    accuracy = float((fdc.classifier_predictions(model, data.test[:100]) == data.test_labels[:100]).double()
                     .mean())
    assert accuracy >= 0.8


@pytest.mark.slow
def test_fashion_classifier_test_accuracy_is_the_recorded_one():
    try:
        data = load_dataset("fashion-mnist")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST files missing: {e}")
    model = fdc.load_fd_classifier("fashion-mnist")
    accuracy = float((fdc.classifier_predictions(model, data.test) == data.test_labels).double().mean())
    assert accuracy == pytest.approx(fdc.CLASSIFIERS["fashion-mnist"].test_accuracy, abs=1e-12)


def test_training_command_writes_weights_and_report_and_is_deterministic(tmp_path, capsys):
    shas = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert train_fd_classifier.main(["--dataset", "digits", "--epochs", "1", "--out", str(out),
                                         "--no-progress"]) == 0
        weights = out / "digits.pt"
        report = json.loads((out / "report.json").read_text())
        assert report["weights_sha256"] == fdc.file_sha256(weights)
        assert report["epochs"] == 1 and report["best_epoch"] == 1 and 0 <= report["test_accuracy"] <= 1
        assert "--epochs 1" in report["command"] and f"--out {out}" in report["command"]
        assert report["weights_sha256"] in (out / "report.md").read_text()
        assert f"sha256: {report['weights_sha256']}" in capsys.readouterr().out
        shas.append(report["weights_sha256"])
        state = torch.load(weights, weights_only=True)
        assert state["format"] == fdc.WEIGHTS_FORMAT and tuple(state["image_shape"]) == (8, 8)
    assert shas[0] == shas[1]
    # Not the committed weights, so the loader refuses them.
    with pytest.raises(ValueError, match="fail the hash check"):
        fdc.load_fd_classifier("digits", path=tmp_path / "a" / "digits.pt")


def test_training_command_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_fd_classifier.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--dataset", "--epochs", "--seed", "--out", "--data-dir", "--no-progress", "--device",
                   "--threads", "--batch-size", "--lr", "--install"):
        assert option in text


def test_training_never_touches_the_committed_classifier_without_install(tmp_path, monkeypatch, capsys):
    committed = fdc.FD_WEIGHTS_DIR / fdc.CLASSIFIERS["digits"].file
    before = fdc.file_sha256(committed)
    monkeypatch.chdir(tmp_path)
    assert train_fd_classifier.main(["--dataset", "digits", "--epochs", "1", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "fd_classifier" / "digits" / "digits.pt").is_file()
    assert fdc.file_sha256(committed) == before
    assert train_fd_classifier.main(["--dataset", "digits", "--install", "--out", str(tmp_path / "x")]) == 2
    assert "--install writes to the committed locations" in capsys.readouterr().err
