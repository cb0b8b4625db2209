"""Checks a finished ``calibclust quickstart`` output (CI runs the quick start, then this file with
CALIBCLUST_QUICKSTART_OUT pointing at it; a full run takes minutes, too long for the unit suite)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

OUT = os.environ.get("CALIBCLUST_QUICKSTART_OUT")
pytestmark = pytest.mark.skipif(not OUT, reason="set CALIBCLUST_QUICKSTART_OUT to a quickstart output folder")


def test_summary_has_both_heads_and_ood_figures():
    summary = json.loads((Path(OUT) / "summary.json").read_text())
    for head in ("cdc_clu", "cdc_cal"):
        assert 0.0 <= summary[head]["ece"] <= 1.0 and 0.1 <= summary[head]["acc"] <= 1.0, summary
    label = summary["label"]
    assert label["ood_auroc"] is not None and label["coverage"] is not None, summary
    # The quick start OOD folder is letters, photo patches and noise: far from handwritten digits.
    assert label["ood_auroc"] > 0.9, f"OOD AUROC {label['ood_auroc']:.3f} on the quick start's OOD folder"


def test_report_embeds_reliability_diagram_and_thumbnails():
    html = (Path(OUT) / "report.html").read_text()
    assert 'alt="reliability diagram"' in html
    assert html.count('alt="cluster ') >= 10 * 5, "expected thumbnails for the clusters"
    assert "src=\"data:image/png;base64," in html and "http://" not in html.split("<body", 1)[-1]


@pytest.mark.browser
def test_report_screenshot_in_chromium(tmp_path):
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1100,2200", (Path(OUT) / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    # The reliability diagram's blue accuracy bars (matplotlib's default blue, #0072B2-ish) are on the page.
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 60) & (pixels[..., 1] < 140)
    assert blue.sum() > 2000, f"only {blue.sum()} blue pixels: no reliability diagram visible"
    # Thumbnails: many dark digit backgrounds below the diagram.
    lower = pixels[pixels.shape[0] // 2 :]
    assert (lower.max(axis=2) < 30).sum() > 10000, "no digit thumbnails visible in the lower half"
