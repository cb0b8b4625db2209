"""The quick start's own logic, without training: its held-out folders follow fit's split, and a
rerun continues only a quick start with the same settings (the finished run is checked in
test_quickstart_report.py)."""


import pytest

from calibclust.app import quickstart
from calibclust.app.runs import continue_or_refuse, record_settings, truth_folder
from calibclust.errors import InputError
from calibclust.train.profiles import heldout_by_path_hash


def test_heldout_folders_hold_exactly_fits_heldout_digits_plus_ood(tmp_path):
    from calibclust.datasets import make_digits_folder, make_ood_folder
    from calibclust.io.images import discover_images

    digits = make_digits_folder(tmp_path / "data" / "digits", limit=60, seed=0)
    ood = make_ood_folder(tmp_path / "data" / "ood", n_per_kind=3, seed=0)
    rel = [p.relative_to(digits).as_posix() for p in discover_images(digits)]
    expected = {r for r, held in zip(rel, heldout_by_path_hash(rel, 0.2)) if held}
    with pytest.raises(InputError, match="the rule picks"):  # fit skipped a file the rule counts
        quickstart.heldout_folders({"digits": digits, "ood": ood}, 0.2, len(expected) - 1)
    folders = quickstart.heldout_folders({"digits": digits, "ood": ood}, 0.2, len(expected))
    got = {p.relative_to(folders["heldout"]).as_posix() for p in discover_images(folders["heldout"])}
    assert got == expected and 3 <= len(got) <= 25, (len(got), sorted(got)[:5])
    label_me = {p.relative_to(folders["label-me"]).as_posix() for p in discover_images(folders["label-me"])}
    n_ood = len(list(discover_images(ood)))
    assert label_me == expected | {f"_ood/{p.relative_to(ood).as_posix()}" for p in discover_images(ood)}
    assert len(label_me) == len(expected) + n_ood
    # Idempotent: a rerun (continuing a quick start) finds the links in place.
    assert quickstart.heldout_folders({"digits": digits, "ood": ood}, 0.2, len(expected)) == folders


def test_rerun_continues_same_settings_and_refuses_others(tmp_path):
    wanted = {"pretrain_epochs": 15, "n_ood_per_kind": 60, "seed": 0, "heldout_fraction": 0.2}
    file = quickstart.SETTINGS_FILE
    assert continue_or_refuse(tmp_path / "new", file, wanted, tmp_path / "new", "quick start") is False
    record_settings(tmp_path, file, wanted)
    assert continue_or_refuse(tmp_path, file, wanted, tmp_path, "quick start") is False, "fit had not begun"
    (tmp_path / "run.json").write_text("{}")
    assert continue_or_refuse(tmp_path, file, wanted, tmp_path, "quick start") is True
    with pytest.raises(InputError, match="other settings"):
        continue_or_refuse(tmp_path, file, {**wanted, "pretrain_epochs": None}, tmp_path, "quick start")


def test_a_folder_without_the_settings_file_is_refused_unless_empty(tmp_path):
    """An older quick start (model/model.onnx, pretrain/ state, no settings file) or any other
    folder: fit would stumble on its training state, so the run refuses it by name."""
    (tmp_path / "empty").mkdir()
    assert continue_or_refuse(tmp_path / "empty", "quickstart.json", {}, tmp_path / "empty", "quick start") is False
    (tmp_path / "old" / "pretrain").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no quick start .*older version"):
        continue_or_refuse(tmp_path / "old", "quickstart.json", {}, tmp_path / "old", "quick start")


def test_truth_folder_puts_ood_images_under_ood_by_name(tmp_path):
    from calibclust.io.images import discover_images

    inside, near = tmp_path / "held" / "a", tmp_path / "near"
    for folder, name in ((inside, "1.png"), (near, "9.png")):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x")
    root = truth_folder(tmp_path / "label-me", tmp_path / "held", {"near": near, "": near})
    got = sorted(p.relative_to(root).as_posix() for p in discover_images(root, extensions=(".png",)))
    assert got == ["_ood/9.png", "_ood/near/9.png", "a/1.png"], got
