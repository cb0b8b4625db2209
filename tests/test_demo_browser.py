"""The demo page in headless Chromium: it renders, shows the model's cluster count, opens with the
first example already predicted (with an exemplars sidecar), and its controls work when a browser
drives them (threshold slider → badge; naming tab → a new model file with the typed names).

Skipped (with the reason) where no ``chromium`` / ``chromium-browser`` is on PATH; Debian/Ubuntu:
``apt-get install chromium``. Set ``CALIBCLUST_SCREENSHOTS=DIR`` to keep the screenshot.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_contract_model, write_good_images  # noqa: E402
from test_demo import free_port  # noqa: E402

from calibclust.contract import read_model_metadata  # noqa: E402

pytestmark = pytest.mark.browser
pytest.importorskip("gradio", reason="the demo needs the 'demo' extra (gradio)")

WIDTH, HEIGHT = 1280, 1600


def chromium_binary() -> str:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str) -> subprocess.CompletedProcess:
    binary = chromium_binary()
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


# --------------------------------------------------------------------------- interactive
class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (stdlib only:
    chromium reads JSON messages ending in NUL from fd 3 and answers on fd 4). Unlike
    ``--virtual-time-budget`` it waits in real time, so the server's answers always arrive."""

    def __init__(self, width: int = WIDTH, height: int = HEIGHT):
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Move the child's ends above 3/4 so that dup2 onto 3 and 4 cannot clobber one another.
        child_r, child_w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def in_child():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen(
            [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-pipe", f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4, child_r, child_w), preexec_fn=in_child,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(child_r)
        os.close(child_w)
        self._out, self._in = to_browser_w, from_browser_r
        self._id, self._buffer = 0, b""
        self.session = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, timeout: float = 30, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {timeout} s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 20, action: str | None = None) -> bool:
        """Poll ``expression`` until truthy (running ``action`` before each poll, e.g. a click that
        the page may ignore until its scripts are ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if action:
                self.js(action)
            if self.js(expression):
                return True
            time.sleep(0.25)
        return False

    def type_into(self, selector_js: str, text: str) -> None:
        """Focus the element, select its content and type ``text`` as a user would."""
        self.js(f"(() => {{ const e = {selector_js}; e.focus(); e.select(); }})()")
        self.call("Input.insertText", text=text)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)


def text_box(label: str) -> str:
    return (f"[...document.querySelectorAll('label')].find(l => l.textContent.includes({label!r}))"
            ".querySelector('input, textarea')")


def test_browser_drives_slider_and_naming(page):
    running, root = page
    browser = DevTools()
    try:
        browser.call("Page.navigate", url=running.url)
        assert browser.wait_for("document.body.innerText.includes('3 clusters')"), "page did not render"
        badge = "document.querySelector('#cc-badge').innerText"
        assert browser.wait_for(f"{badge}.includes('Accepted')")
        # The example's confidence is ~0.87: raising the threshold to 0.95 rejects it, without the model.
        calls = []
        labeler = running.session.labeler
        original = labeler.predict
        labeler.predict = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            browser.type_into("document.querySelector('#cc-conf input[type=number]')", "0.95")
            browser.js("document.querySelector('#cc-conf input[type=number]').blur()")
            assert browser.wait_for(f"{badge}.includes('Rejected — low confidence')"), browser.js(badge)
        finally:
            labeler.predict = original
        assert calls == [], "the model ran again on a threshold change"

        # Naming tab: type names for clusters 0 and 1 (Next moves on), then save a new model.
        tab = "[...document.querySelectorAll('[role=tab]')].find(t => t.textContent.trim() == 'Clusters & naming').click()"
        assert browser.wait_for("document.body.innerText.includes('Cluster names')", action=tab)
        browser.type_into(text_box("Name for this cluster"), "reddish")
        # innerText holds no <input> values, so the name found there is the names table's cell
        assert browser.wait_for("document.body.innerText.includes('reddish')"), \
            "typing a name did not reach the names table"
        browser.js("[...document.querySelectorAll('button')].find(b => b.textContent.includes('Next')).click()")
        assert browser.wait_for(f"{text_box('Name for this cluster')}.value == 'greens'"), "Next did not open cluster 1"
        browser.type_into(text_box("Name for this cluster"), "greenish")
        assert browser.wait_for("document.body.innerText.includes('greenish')")
        browser.type_into(text_box("New model file"), "from-browser.onnx")
        browser.js("[...document.querySelectorAll('button')].find(b => b.textContent.includes('Save named model')).click()")
        assert browser.wait_for("document.querySelector('#cc-save-msg').innerText.includes('Saved')"), \
            browser.js("document.querySelector('#cc-save-msg').innerText")
    finally:
        browser.close()
    saved = running.session.save_dir / "from-browser.onnx"
    assert read_model_metadata(saved).cluster_names == ["reddish", "greenish", "blues"]
    assert read_model_metadata(running.session.model_path).cluster_names == ["reds", "greens", "blues"]
