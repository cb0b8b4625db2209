"""The evaluate report opens in headless Chromium and its screenshot shows the reliability diagram.

Skipped (with the reason) where no ``chromium`` / ``chromium-browser`` is on PATH; Debian/Ubuntu:
``apt-get install chromium``.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibclust.io.images import list_image_folder
from calibclust.io.predictions import write_predictions

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 1200, 2400


def _example_predictions(folder: Path, out: Path) -> Path:
    """Roughly calibrated synthetic predictions: correct with probability equal to the confidence."""
    listing = list_image_folder(folder)
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1.0, len(listing.paths))
    right = rng.random(conf.size) < conf
    cluster = np.where(right, (listing.labels + 3) % 10, rng.integers(0, 10, conf.size))
    return write_predictions(out, {"path": listing.relative_paths(), "cluster": cluster, "confidence": conf})


def _non_blank(png: Image.Image) -> tuple[int, float]:
    grey = np.asarray(png.convert("L"), dtype=np.float64)
    return len(np.unique(grey)), float(grey.std())


def test_report_renders_with_the_reliability_diagram(digits_folder, tmp_path):
    pred = _example_predictions(digits_folder, tmp_path / "pred.csv")
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "calibclust", "evaluate", str(pred), "--truth", str(digits_folder), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    html = (out / "report.html").read_text()

    match = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="reliability diagram"', html)
    assert match, "report.html embeds the reliability diagram as a PNG <img alt='reliability diagram'>"
    diagram = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    colours, spread = _non_blank(diagram)
    assert diagram.size[0] > 300 and colours > 20 and spread > 10, (diagram.size, colours, spread)

    shot = tmp_path / "report.png"
    browser = subprocess.run(
        [shutil.which("chromium") or shutil.which("chromium-browser"), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", (out / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert shot.exists(), f"chromium wrote no screenshot (exit {browser.returncode}): {browser.stderr[-1500:]}"
    png = Image.open(shot)
    assert png.format == "PNG" and png.size == (WIDTH, HEIGHT), (png.format, png.size)
    colours, spread = _non_blank(png)
    assert colours > 50 and spread > 10, f"screenshot looks blank: {colours} grey levels, std {spread:.1f}"
    # The reliability diagram's accuracy bars are solid blocks of the report's blue (#0072B2): many
    # screen rows crossed by >= 100 such pixels. Histograms are translucent (a lighter blue) and curves
    # are thin, so only the diagram's bars produce this block; it sits in the upper part of the page.
    rgb = np.asarray(png.convert("RGB")).astype(int)
    blue = np.abs(rgb - np.array([0, 114, 178])).sum(axis=2) < 20
    bar_rows = np.flatnonzero(blue.sum(axis=1) >= 100)
    assert bar_rows.size >= 100 and bar_rows.max() < 0.6 * HEIGHT, (
        f"no reliability-diagram bars visible in the screenshot: {bar_rows.size} rows with bar pixels"
        + (f" between y={bar_rows.min()} and y={bar_rows.max()}" if bar_rows.size else "")
    )
    # keep the screenshot next to the report for a human to look at (pytest's tmp_path is kept)
    print(f"screenshot: {shot}")
