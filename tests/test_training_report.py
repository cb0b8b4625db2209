"""train cdc writes training.html: its per-epoch curves, drawn from log.jsonl."""

from __future__ import annotations

import base64
import json
import re


def test_cdc_writes_training_curves(digits_folder, tmp_path, torch_one_thread):
    from calibclust.cli import main

    out = tmp_path / "cdc"
    assert main(["train", "cdc", str(digits_folder), "--out", str(out), "--clusters", "10", "--epochs", "3",
                 "--freeze-backbone", "--views", "1", "--batch-size", "100", "--sub-batch-size", "50",
                 "--hidden-dim", "64", "--orth-steps", "10", "--no-flip", "--no-progress"]) == 0
    html = (out / "training.html").read_text()
    svgs = [base64.b64decode(b).decode() for b in re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", html)]
    assert len(svgs) == 3, "losses, selection/confidence and (labelled folder) ACC/ECE"
    assert "L_clu (Eq. 5)" in svgs[0] and "L_cal (Eq. 3, calibration)" in svgs[0]
    assert "selected share" in svgs[1] and "ACC, calibration head" in svgs[2]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # Epoch 0 (after initialisation) has no losses: three loss points per line, one polyline each.
    assert [r["epoch"] for r in log] == [0, 1, 2, 3] and log[0].get("loss_clu") is None
    losses = re.findall(r'<polyline points="([^"]+)"', svgs[0])
    assert len(losses) == 3 and all(len(p.split()) == 3 for p in losses)


def _svgs(html: str) -> list[str]:
    return [base64.b64decode(b).decode() for b in re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", html)]


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_flatten_nested_records_and_skip_what_is_not_a_number():
    from calibclust.tensorboard import scalars

    record = {"loss": 1.5, "heads": {"calibration": {"acc": 0.8, "ece": None}}, "mean_loss": [0.3, 0.2],
              "flag": True, "name": "x", "bad": float("nan")}
    assert scalars(record) == {"loss": 1.5, "heads/calibration/acc": 0.8, "mean_loss/0": 0.3, "mean_loss/1": 0.2}


def test_pretrain_writes_curves_and_tensorboard_events(digits_folder, tmp_path, torch_one_thread):
    import pytest

    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package ([tensorboard] extra)")
    from calibclust.cli import main

    out, board = tmp_path / "moco", tmp_path / "tb"
    assert main(["pretrain", str(digits_folder), "--out", str(out), "--epochs", "2", "--batch-size", "64",
                 "--proj-hidden-dim", "64", "--proj-dim", "32", "--queue-size", "128", "--no-progress",
                 "--tensorboard", str(board)]) == 0
    svgs = _svgs((out / "training.html").read_text())
    assert len(svgs) == 3 and "InfoNCE loss per epoch" in svgs[0] and "images/s" in svgs[2]
    history = json.loads((out / "checkpoint" / "state.json").read_text())["history"]
    got = _tensorboard_scalars(board)
    assert [s for s, _ in got["loss"]] == [1, 2]
    assert [round(v, 4) for _, v in got["loss"]] == [round(h["loss"], 4) for h in history], (got["loss"], history)
    assert {"lr", "images_per_s", "seconds"} <= set(got)


def test_cdc_and_spice_tensorboard_and_spice_curves(digits_folder, tmp_path, torch_one_thread):
    import pytest

    pytest.importorskip("tensorboard", reason="--tensorboard needs the tensorboard package ([tensorboard] extra)")
    from calibclust.cli import main

    board = tmp_path / "tb-cdc"
    assert main(["train", "cdc", str(digits_folder), "--out", str(tmp_path / "cdc"), "--clusters", "10", "--epochs", "2",
                 "--freeze-backbone", "--views", "1", "--batch-size", "100", "--sub-batch-size", "50",
                 "--hidden-dim", "64", "--orth-steps", "10", "--no-flip", "--no-progress", "--tensorboard", str(board)]) == 0
    got = _tensorboard_scalars(board)
    log = [json.loads(line) for line in (tmp_path / "cdc" / "log.jsonl").read_text().splitlines()]
    assert [s for s, _ in got["heads/calibration/acc"]] == [0, 1, 2]
    assert round(got["heads/calibration/acc"][-1][1], 5) == round(log[-1]["heads"]["calibration"]["acc"], 5)
    assert [s for s, _ in got["loss_cal"]] == [1, 2]  # epoch 0 (initialisation) has no loss

    out, board = tmp_path / "spice", tmp_path / "tb-spice"
    assert main(["train", "spice", str(digits_folder), "--out", str(out), "--clusters", "10", "--heads", "2",
                 "--head-epochs", "3", "--views", "1", "--batch-size", "100", "--neighbors", "5", "--joint-steps", "4",
                 "--labeled-batch", "8", "--unlabeled-ratio", "1", "--no-flip", "--no-progress",
                 "--tensorboard", str(board)]) == 0
    svgs = _svgs((out / "training.html").read_text())
    assert len(svgs) == 2 and "head 0" in svgs[0] and "head 1" in svgs[0] and "(kept: lowest loss)" in svgs[0]
    assert "Stage 3" in svgs[1] and "confident share" in svgs[1]
    got = _tensorboard_scalars(board)
    assert [s for s, _ in got["stage2/mean_loss/0"]] == [1, 2, 3] and "stage2/mean_loss/1" in got
    assert got["stage3/loss"][-1][0] == 4, got["stage3/loss"]  # the last joint step is always logged


def test_tensorboard_missing_is_said_before_training(digits_folder, tmp_path, monkeypatch, capsys):
    import sys

    from calibclust.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were absent
    rc = main(["train", "cdc", str(digits_folder), "--out", str(tmp_path / "o"), "--clusters", "10",
               "--tensorboard", str(tmp_path / "tb"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install "calibclust[tensorboard]"' in err and "decoding" not in err, err
