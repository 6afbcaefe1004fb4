"""The one preset schema and override path (experiments.config), the runner's command line and the report
writer: presets are validated on load, ``--set`` and the shorthands take one typed, range-checked path, and
every error names the key and what is allowed."""

import json

import pytest

from experiments import config as cfg
from experiments import draw as draw_experiment
from experiments import vae as vae_experiment
from experiments.common import config_changes, resolve_config
from experiments.report import reproduce_command, write_report


@pytest.mark.parametrize("experiment", sorted(cfg.SCHEMAS))
def test_every_committed_preset_fits_its_schema(experiment):
    for name in cfg.raw_presets(experiment):
        config = cfg.load_preset(experiment, name)
        schedules = [sec for sec in config.values() if isinstance(sec, dict) and "epochs" in sec]
        assert "dataset" in config and schedules and all(sec["epochs"] >= 1 for sec in schedules)


def test_a_choice_outside_its_list_is_an_error_naming_the_choices():
    with pytest.raises(cfg.ConfigError, match=r"model.likelihood = 'poisson' is not allowed: choose one of "
                                              r"\['bernoulli', 'gaussian'\]"):
        cfg.load_preset("gsn", "quick", [("--set", "model.likelihood=poisson")])


@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    """A presets directory holding a copy of vae.json that a test may spoil."""
    good = json.loads((cfg.PRESET_DIR / "vae.json").read_text())
    monkeypatch.setattr(cfg, "PRESET_DIR", tmp_path)

    def write(spoil):
        presets = json.loads(json.dumps(good))
        spoil(presets["quick"])
        (tmp_path / "vae.json").write_text(json.dumps(presets))

    return write


@pytest.mark.parametrize("spoil, message", [
    (lambda p: p["train"].update(epoch=3), "unknown key 'train.epoch'; valid keys of train: epochs, batch"),
    (lambda p: p.update(z_dim=3), "unknown key 'z_dim'; valid keys of the top level: about, seed"),
    (lambda p: p["model"].pop("z_dim"), "missing key 'model.z_dim'"),
    (lambda p: p["model"].update(z_dim="eight"), "model.z_dim: Value 'eight'"),
    (lambda p: p["train"].update(lr=0), "train.lr = 0.0 is out of range: must be > 0"),
    (lambda p: p["model"].update(hidden=[16, 0]), "model.hidden = [16, 0] is out of range: every element"),
])
def test_a_spoilt_preset_is_an_error_naming_the_key(preset_dir, spoil, message):
    preset_dir(spoil)
    with pytest.raises(cfg.ConfigError, match="vae.json, preset 'quick'") as e:
        cfg.load_preset("vae", "quick")
    assert message in str(e.value)


def test_set_is_typed_by_the_schema_and_applied_in_order():
    c = cfg.load_preset("vae", "quick", [("--set", "train.epochs=3"), ("--set", "train.lr=2e-4"),
                                         ("--set", "model.hidden=[32, 16]"),
                                         ("--set", "train.clip_norm=null")])
    assert c["train"]["epochs"] == 3 and isinstance(c["train"]["epochs"], int)
    assert c["train"]["lr"] == 2e-4 and c["model"]["hidden"] == [32, 16] and c["train"]["clip_norm"] is None
    c = cfg.load_preset("draw", "quick", [("--epochs", "train.epochs=3"), ("--set", "train.epochs=2")])
    assert c["train"]["epochs"] == 2  # --set comes after the shorthands
    c = cfg.load_preset("imputation", "quick", [("--set", "vae.checkpoint=some/best.pt")])
    assert c["vae"]["checkpoint"] == "some/best.pt"


@pytest.mark.parametrize("assignment, message", [
    ("train.epoch=3", "unknown key 'train.epoch'; valid keys of train: epochs"),
    ("trian.epochs=3", "unknown key 'trian'; valid keys of the top level"),
    ("train.epochs=2.5", "train.epochs: Value '2.5' of type 'float' could not be converted to Integer"),
    ("train.epochs=0", "train.epochs = 0 is out of range: must be >= 1"),
    ("train.lr=fast", "train.lr: Value 'fast'"),
    ("train.epochs", "expected KEY=VALUE"),
])
def test_a_bad_set_names_the_key_and_what_is_allowed(assignment, message):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load_preset("vae", "quick", [("--set", assignment)])
    assert message in str(e.value)


def test_shorthands_and_set_reach_the_same_nested_keys():
    parser = draw_experiment.DRAW_EXPERIMENT.build_parser()
    args = parser.parse_args(["--preset", "quick", "--epochs", "2", "--lr", "0.01", "--num-steps", "3",
                              "--set", "finetune.epochs=0", "--set", "eval.iw_limit=5"])
    c = resolve_config("draw", args)
    assert (c["train"]["epochs"], c["train"]["lr"], c["generator"]["num_steps"]) == (2, 0.01, 3)
    assert (c["finetune"]["epochs"], c["eval"]["iw_limit"], c["preset"]) == (0, 5, "quick")


def test_the_cli_reports_a_bad_set_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vae_experiment.main(["--set", "train.epoch=1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--set train.epoch=1: unknown key 'train.epoch'; valid keys of train" in err
    assert not (tmp_path / "x").exists()


def test_help_lists_the_keys_set_can_change(capsys):
    with pytest.raises(SystemExit):
        vae_experiment.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--set KEY=VALUE" in text and "train.clip_norm" in text and "model.hidden" in text


def test_a_key_added_to_the_schema_later_is_not_a_change(tmp_path):
    """Runs recorded before ``train.betas`` existed used (0.9, 0.98); optional keys absent then and null now
    are the same setting; anything else that differs is named."""
    now = cfg.load_preset("imputation", "quick")
    before = json.loads(json.dumps(now))
    del before["train"]["betas"]
    del before["table"]["sweep"]["eval"]
    (tmp_path / "config.json").write_text(json.dumps(before))
    assert config_changes(tmp_path, now) == []
    now["train"]["betas"] = [0.9, 0.999]
    assert config_changes(tmp_path, now) == ["train.betas: run [0.9, 0.98], now [0.9, 0.999]"]


def test_report_writer_states_the_configuration_and_the_command(tmp_path):
    command = reproduce_command("experiments.vae", ["--preset", "quick", "--resume", "--device", "auto",
                                                    "--set", "train.epochs=2", "--no-progress",
                                                    "--report-only"],
                                tmp_path / "run", "cpu")
    assert command == ("python -m experiments.vae --preset quick --set train.epochs=2 "
                       f"--out {tmp_path / 'run'} --device cpu")
    # The training step is pinned where given, once, in place of the one the command line had.
    pinned = reproduce_command("experiments.vae", ["--preset", "quick", "--step=fused", "--step", "fused"],
                               tmp_path / "run", "cpu", "svi")
    assert pinned == (f"python -m experiments.vae --preset quick --out {tmp_path / 'run'} --device cpu "
                      "--step svi")
    write_report(tmp_path, "results", {"value": float("inf")}, "# Title\n", config={"train": {"epochs": 2}},
                 command=command)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == {"value": "inf", "config": {"train": {"epochs": 2}}, "command": command}
    page = (tmp_path / "results.md").read_text()
    assert page.startswith("# Title\n\n## Configuration that ran") and f"Reproduce: `{command}`" in page
    assert '"epochs": 2' in page
