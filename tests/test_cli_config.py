"""--config FILE / --print-config (calibclust.cli_config) on the training commands."""

from __future__ import annotations

import json

import pytest

from calibclust.cli import main

CDC = ["train", "cdc", "IMAGES", "--out", "OUT"]


def _printed(capsys, argv) -> dict:
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("command", [
    [*CDC, "--clusters", "7", "--epochs", "3", "--view-crop", "resized", "--no-flip", "--k-range", "3..9",
     "--minicluster-norm", "l1"],
    ["train", "spice", "IMAGES", "--out", "OUT", "--clusters", "auto", "--lr-heads", "0.01", "--no-joint",
     "--mstep-batch-size", "all"],  # a word that must not come back as null (= the default, 128)
    ["train", "compare", "IMAGES", "--out", "OUT", "--clusters", "4", "--cdc-epochs", "5"],
    ["train", "cdc-ablation", "IMAGES", "--out", "OUT", "--clusters", "3", "--variants", "cdc,no-init"],
    ["pretrain", "IMAGES", "--out", "OUT", "--epochs", "12", "--augment", "geometry", "--no-amp"],
])
def test_print_config_round_trips_through_config(command, tmp_path, capsys):
    """--print-config > c.json, then --config c.json (no other settings) resolves to the same settings,
    also from YAML; the folder and --out are not settings."""
    printed = _printed(capsys, command)
    assert "folder" not in printed and "out" not in printed and "func" not in printed
    path = tmp_path / "c.json"
    path.write_text(json.dumps(printed))
    assert _printed(capsys, [*command[:command.index("--out") + 2], "--config", str(path)]) == printed
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(printed))
    assert _printed(capsys, [*command[:command.index("--out") + 2], "--config", str(path)]) == printed


def test_command_line_overrides_the_file_in_any_order(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"clusters": 5, "epochs": 30, "view_crop": "resized"}))
    before = _printed(capsys, [*CDC, "--epochs", "4", "--config", str(path)])
    after = _printed(capsys, [*CDC, "--config", str(path), "--epochs", "4"])
    assert before == after and before["epochs"] == 4 and before["clusters"] == 5 and before["view_crop"] == "resized"


@pytest.mark.parametrize("content, message", [
    ({"epochs": 3, "batchsize": 9}, "unknown setting(s) batchsize"),
    ({"out": "x"}, "out: give on the command line"),
    ({"view_crop": "zoom"}, "must be one of resized, shift"),
    ({"no_flip": "yes"}, "must be true or false"),
    ({"epochs": "many"}, "epochs (--epochs)"),
    ({"clusters": 1}, "--clusters must be at least 2"),
    ([1, 2], "expected a mapping"),
])
def test_bad_config_files_are_clear_errors(content, message, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    assert main([*CDC, "--clusters", "3", "--config", str(path), "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_config_files(tmp_path, capsys):
    assert main([*CDC, "--clusters", "3", "--config", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("{epochs: 3")
    assert main([*CDC, "--clusters", "3", "--config", str(tmp_path / "c.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_a_run_from_its_saved_settings_trains_with_the_same_config(digits_folder, tmp_path, torch_one_thread):
    """A CDC run writes OUT/settings.json; a second run given only that file (plus folder and --out)
    resolves to the same CDC configuration in run.json."""
    flags = ["--clusters", "10", "--epochs", "1", "--freeze-backbone", "--views", "1", "--batch-size", "100",
             "--sub-batch-size", "50", "--hidden-dim", "64", "--orth-steps", "10", "--no-flip", "--seed", "3"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["train", "cdc", str(digits_folder), "--out", str(first), *flags, "--no-progress"]) == 0
    saved = json.loads((first / "settings.json").read_text())
    assert saved["epochs"] == 1 and saved["seed"] == 3 and saved["hidden_dim"] == 64
    assert main(["train", "cdc", str(digits_folder), "--out", str(second), "--config", str(first / "settings.json"),
                 "--no-progress"]) == 0
    config = [json.loads((d / "run.json").read_text())["config"] for d in (first, second)]
    assert config[0] == config[1]
    assert json.loads((second / "settings.json").read_text()) == saved


def test_abbreviated_config_null_and_yaml_words(tmp_path, capsys):
    """--conf is refused (the early read needs the full spelling); null keeps a default but cannot
    give a required option; YAML's unquoted no/off come back as the words the option expects."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 7}))
    assert main([*CDC, "--clusters", "3", "--conf", str(path), "--print-config"]) == 2
    assert "write --config in full" in capsys.readouterr().err
    path.write_text(json.dumps({"clusters": None}))
    assert main([*CDC, "--config", str(path), "--print-config"]) == 2
    assert "is required; null does not give it" in capsys.readouterr().err
    path.write_text(json.dumps({"image_size": None, "epochs": None}))
    assert _printed(capsys, [*CDC, "--clusters", "3", "--config", str(path)])["epochs"] == 100
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("recalibrate_bn: no\nbackbone_weights: 7\n")
    assert yaml.safe_load(path.read_text())["recalibrate_bn"] is False
    printed = _printed(capsys, [*CDC, "--clusters", "3", "--config", str(path)])
    assert printed["recalibrate_bn"] == "no" and printed["backbone_weights"] == "7"
