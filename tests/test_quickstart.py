"""The quick start's own logic, without training: its held-out folders follow fit's split, and a
rerun continues only a quick start with the same settings (the finished run is checked in
test_quickstart_report.py)."""

import json

import pytest

from calibclust.app import quickstart
from calibclust.errors import InputError
from calibclust.train.profiles import heldout_by_path_hash


def test_heldout_folders_hold_exactly_fits_heldout_digits_plus_ood(tmp_path):
    from calibclust.datasets import make_digits_folder, make_ood_folder
    from calibclust.io.images import discover_images

    digits = make_digits_folder(tmp_path / "data" / "digits", limit=60, seed=0)
    ood = make_ood_folder(tmp_path / "data" / "ood", n_per_kind=3, seed=0)
    folders = quickstart.heldout_folders({"digits": digits, "ood": ood}, 0.2)
    rel = [p.relative_to(digits).as_posix() for p in discover_images(digits)]
    expected = {r for r, held in zip(rel, heldout_by_path_hash(rel, 0.2)) if held}
    got = {p.relative_to(folders["heldout"]).as_posix() for p in discover_images(folders["heldout"])}
    assert got == expected and 3 <= len(got) <= 25, (len(got), sorted(got)[:5])
    label_me = {p.relative_to(folders["label-me"]).as_posix() for p in discover_images(folders["label-me"])}
    n_ood = len(list(discover_images(ood)))
    assert label_me == expected | {f"_ood/{p.relative_to(ood).as_posix()}" for p in discover_images(ood)}
    assert len(label_me) == len(expected) + n_ood
    # Idempotent: a rerun (continuing a quick start) finds the links in place.
    assert quickstart.heldout_folders({"digits": digits, "ood": ood}, 0.2) == folders


def test_rerun_continues_same_settings_and_refuses_others(tmp_path):
    wanted = {"pretrain_epochs": 15, "n_ood_per_kind": 60, "seed": 0, "heldout_fraction": 0.2}
    assert quickstart._check_settings(tmp_path / "new", wanted) is False
    (tmp_path / quickstart.SETTINGS_FILE).write_text(json.dumps(wanted))
    assert quickstart._check_settings(tmp_path, wanted) is False, "stopped before fit began: start fit afresh"
    (tmp_path / "run.json").write_text("{}")
    assert quickstart._check_settings(tmp_path, wanted) is True
    with pytest.raises(InputError, match="other settings"):
        quickstart._check_settings(tmp_path, {**wanted, "pretrain_epochs": None})


def test_a_plain_fit_run_is_not_taken_for_a_quick_start(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(InputError, match="not a quick start"):
        quickstart._check_settings(tmp_path, {"seed": 0})
