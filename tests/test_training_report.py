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
