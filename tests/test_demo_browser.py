"""The demo page in headless Chromium: it renders, shows the model's cluster count, and (with an
exemplars sidecar) opens with the first example already predicted.

Skipped (with the reason) where no ``chromium`` / ``chromium-browser`` is on PATH; Debian/Ubuntu:
``apt-get install chromium``. Set ``CALIBCLUST_SCREENSHOTS=DIR`` to keep the screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_contract_model, write_good_images  # noqa: E402
from test_demo import free_port  # noqa: E402

pytestmark = pytest.mark.browser
pytest.importorskip("gradio", reason="the demo needs the 'demo' extra (gradio)")

WIDTH, HEIGHT = 1280, 1600


def chromium(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=15000", *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from calibclust.exemplars import attach_exemplars, build_exemplars
    from calibclust.serve.demo import DemoConfig, launch
    from calibclust.serve.labeler import Labeler

    root = tmp_path_factory.mktemp("demo_browser")
    model = make_contract_model(root / "model.onnx", metadata={"cluster_names": ["reds", "greens", "blues"]})
    images = write_good_images(root / "train", 40, seed=1)
    table, _ = Labeler(model).label(images)
    exemplars, _ = build_exemplars(images, np.array(table["cluster"]), np.array(table["confidence"]),
                                   3, (16, 16), per_cluster=6)
    with_exemplars, _ = attach_exemplars(model, exemplars)
    running = launch(DemoConfig(model=with_exemplars, port=free_port()), block=False, quiet=True)
    try:
        yield running, root
    finally:
        running.close()


def test_page_shows_cluster_count_and_a_prediction(page):
    running, root = page
    result = chromium("--dump-dom", running.url)
    dom = unescape(re.sub(r"<[^>]+>", " ", result.stdout))
    text = " ".join(dom.split())
    assert "3 clusters" in text, f"header with the cluster count not rendered (exit {result.returncode}): {text[:600]}"
    assert "calibclust demo" in text and "Clusters & naming" in text and "Batch" in text
    # The first example (the most typical "reds" image) is predicted on page load.
    assert "Accepted" in text and "reds" in text, text[:2000]


def test_screenshot(page):
    running, root = page
    shot = root / "demo.png"
    result = chromium(f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", running.url)
    assert shot.exists(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-1500:]}"
    png = Image.open(shot)
    assert png.size == (WIDTH, HEIGHT)
    rgb = np.asarray(png.convert("RGB")).astype(int)
    grey = rgb.mean(axis=2)
    assert len(np.unique(grey)) > 50 and grey.std() > 10, "screenshot looks blank"
    # The accepted badge is a solid block of its green (#1a7f37) in the upper half of the page.
    green = np.abs(rgb - np.array([0x1A, 0x7F, 0x37])).sum(axis=2) < 30
    rows = np.flatnonzero(green.sum(axis=1) > 200)
    assert rows.size >= 20 and rows.max() < HEIGHT / 2, f"no decision badge in the screenshot ({rows.size} rows)"
    keep = os.environ.get("CALIBCLUST_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "demo.png")
