"""The Gradio demo: the app is started on a free loopback port and driven with gradio_client.

The model is the serve fixtures' nearest-colour contract model (3 clusters, 16×16 input, OOD score
= 1 − confidence, OOD threshold 0.6, confidence threshold 0.5), so every expected decision can be
worked out by hand: pure red is accepted, a grey image (uniform probabilities, OOD score 2/3) is out
of distribution, and a blue-green mix with confidence ≈ 0.46 is rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import socket
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import colour_image, expected_probs, make_contract_model, write_good_images  # noqa: E402

from calibclust.cli import main as cli_main  # noqa: E402
from calibclust.contract import read_model_metadata  # noqa: E402
from calibclust.errors import InputError  # noqa: E402
from calibclust.io.predictions import read_predictions  # noqa: E402
from calibclust.serve import demo as demo_mod  # noqa: E402
from calibclust.serve.demo import DemoConfig, DemoError, DemoSession, Prediction  # noqa: E402
from calibclust.serve.labeler import Labeler  # noqa: E402

pytest.importorskip("gradio", reason="the demo needs the 'demo' extra (gradio)")
gradio_client = pytest.importorskip("gradio_client", reason="driving the app needs gradio_client")

COLOURS = {  # file name -> (rgb, decision under the model's default thresholds)
    "red.png": ((1.0, 0.0, 0.0), "accepted"),
    "grey.png": ((0.5, 0.5, 0.5), "ood"),
    "teal.png": ((0.41, 0.73, 0.71), "rejected"),
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo_files")
    images = root / "images"
    images.mkdir()
    out = {}
    for name, (rgb, _) in COLOURS.items():
        Image.fromarray(colour_image(rgb)).save(images / name)
        out[name] = images / name
    corrupt = root / "corrupt.png"
    good = io.BytesIO()
    Image.fromarray(colour_image((0, 1, 0), (64, 64))).save(good, format="PNG")
    corrupt.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # truncated PNG
    out["corrupt.png"] = corrupt
    text = root / "notes.jpg"
    text.write_text("not an image at all\n")
    out["notes.jpg"] = text
    big = root / "big.png"  # 300×300 = 90,000 px: over the server's 50,000-pixel limit
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(big)
    out["big.png"] = big
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("demo_model") / "model.onnx")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """The app on a free loopback port, in this process (so tests can look at the session)."""
    config = DemoConfig(model=model, port=free_port(), max_pixels=50_000, max_upload_mb=1.0,
                        save_dir=tmp_path_factory.mktemp("saved"))
    running = demo_mod.launch(config, block=False, quiet=True)
    try:
        yield running
    finally:
        running.close()
    with pytest.raises(OSError):  # the port is free again: the server really stopped
        socket.create_connection(("127.0.0.1", config.port), timeout=1).close()


@pytest.fixture(scope="module")
def client(server):
    c = gradio_client.Client(server.url, verbose=False, download_files=False)
    yield c
    c.close()


def predict(client, path: Path, conf=0.5, ood=0.6):
    return client.predict(gradio_client.handle_file(str(path)), conf, ood, api_name="/predict")


# --------------------------------------------------------------------------- through the server
def test_binds_loopback_by_default(server):
    assert DemoConfig(model="m.onnx").host == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:"), server.url
    assert server.app.server_name == "127.0.0.1"


def test_single_image_decision_equals_calibclust_label(client, files, model, tmp_path):
    out = tmp_path / "label"
    folder = files["red.png"].parent
    rc = cli_main(["label", str(folder), "--model", str(model), "--out", str(out), "--no-report",
                   "--no-progress", "--workers", "0"])
    assert rc == 0
    table = read_predictions(out / "predictions.csv")
    by_name = {Path(p).name: i for i, p in enumerate(table["path"])}
    assert set(by_name) == set(COLOURS)
    for name, (rgb, expected) in COLOURS.items():
        badge, summary, probs, preview, details, = predict(client, files[name])
        i = by_name[name]
        assert details["decision"] == table["decision"][i] == expected, (name, details, table["decision"][i])
        assert details["cluster"] == table["cluster"][i]
        assert abs(details["confidence"] - table["confidence"][i]) < 1e-6
        assert abs(details["ood_score"] - table["ood_score"][i]) < 1e-6
        ref = expected_probs(colour_image(rgb)[None])[0]
        assert abs(details["confidence"] - ref.max()) < 1e-5, (name, details["confidence"], ref.max())
        assert f'data-decision="{expected}"' in badge
        # gr.Label carries the calibrated probabilities, best first
        conf = {c["label"]: c["confidence"] for c in probs["confidences"]}
        assert probs["label"] == f"cluster_{ref.argmax()}"
        np.testing.assert_allclose([conf[f"cluster_{k}"] for k in range(3)], ref, atol=1e-5)
        assert "threshold 0.6000" in summary and "confidence" in summary


def test_sliders_redecide_without_running_the_model(client, server, files, monkeypatch):
    _, _, _, _, details = predict(client, files["teal.png"])
    assert details["decision"] == "rejected", details
    confidence = details["confidence"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran again on a threshold change")

    monkeypatch.setattr(server.session.labeler, "predict", no_model)
    badge, summary, details = client.predict(confidence - 0.01, 0.6, api_name="/decide")
    assert details["decision"] == "accepted" and f"threshold {confidence - 0.01:.4f}" in summary, details
    assert "Accepted" in badge
    badge, _, details = client.predict(confidence - 0.01, details["ood_score"] - 0.01, api_name="/decide")
    assert details["decision"] == "ood" and "out of distribution" in badge, details
    _, _, details = client.predict(confidence + 0.01, 0.9, api_name="/decide")
    assert details["decision"] == "rejected", details


def test_upload_over_the_size_limit_is_refused_by_the_server(client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(np.random.default_rng(0).bytes(1_200_000))  # server limit: 1 MB
    with pytest.raises(Exception, match="exceeds the maximum file size"):
        predict(client, big)


@pytest.mark.parametrize("name, reason", [
    ("corrupt.png", "unreadable image"),
    ("notes.jpg", "not an image"),
    ("big.png", "exceeds the limit of 50000"),
])
def test_bad_upload_returns_a_message(client, files, name, reason):
    badge, summary, probs, preview, details = predict(client, files[name])
    assert details["decision"] == "error" and reason in details["error"], details
    assert reason in badge and 'data-decision="error"' in badge
    assert "Traceback" not in badge + summary and "File \"" not in summary
    assert preview is None and probs.get("confidences") in (None, [])


def test_naming_tab_writes_a_new_model_with_the_names(client, server, model, files):
    before = sha256(model)
    rows = {"headers": ["cluster", "name"], "data": [[0, "red things"], [1, " green  "], [2, "blue"]]}
    message, next_name = client.predict(rows, "colours.onnx", api_name="/save_names")
    saved = Path(server.session.save_dir) / "colours.onnx"
    assert saved.is_file(), message
    meta = read_model_metadata(saved)
    assert meta.cluster_names == ["red things", "green", "blue"]
    assert meta.weights_digest == read_model_metadata(model).weights_digest
    assert sha256(model) == before, "the original model file was modified"
    assert read_model_metadata(model).cluster_names == ["cluster_0", "cluster_1", "cluster_2"]
    assert str(saved) in message and next_name != "colours.onnx"
    # the named model serves the names
    assert Labeler(saved).label([files["red.png"]])[0]["cluster_name"] == ["red things"]
    # refusals are messages, never overwrites
    message, _ = client.predict(rows, "colours.onnx", api_name="/save_names")
    assert message.startswith("**Not saved:**") and "already exists" in message
    assert read_model_metadata(saved).cluster_names == ["red things", "green", "blue"]
    dup = {"headers": ["cluster", "name"], "data": [[0, "a"], [1, "a"], [2, "b"]]}
    message, _ = client.predict(dup, "dup.onnx", api_name="/save_names")
    assert "must be unique" in message and not (saved.parent / "dup.onnx").exists()
    message, _ = client.predict(rows, "../escape.onnx", api_name="/save_names")
    assert "no folders" in message and not (saved.parent.parent / "escape.onnx").exists()


def test_batch_tab_files_and_zip_give_the_labelers_table(client, server, files, model, tmp_path):
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(files["red.png"], "inner/red.png")
        zf.write(files["grey.png"], "../../evil.png")  # a zip-slip name: only displayed, never a path
        zf.writestr("readme.txt", "not an image")
    uploads = [files["teal.png"], files["corrupt.png"], archive]
    summary, table, csv_path = client.predict([gradio_client.handle_file(str(p)) for p in uploads], 0.5, 0.6,
                                              api_name="/label_batch")
    assert "4 images" in summary and "1 accepted" in summary and "1 unreadable" in summary, summary
    assert "skipped 1 member" in summary
    csv = read_predictions(csv_path["path"])  # download_files=False: the server's file (same machine)
    assert list(csv["path"]) == ["teal.png", "corrupt.png", "more.zip/inner/red.png", "more.zip/../../evil.png"]
    assert list(csv["decision"]) == ["rejected", "error", "accepted", "ood"]
    assert not (tmp_path.parent / "evil.png").exists()
    # Same numbers as the Labeler on the original files
    ref, _ = Labeler(model).label([files["teal.png"], files["corrupt.png"], files["red.png"], files["grey.png"]],
                                  top_k=3)
    np.testing.assert_allclose(csv["confidence"][[0, 2, 3]], np.asarray(ref["confidence"])[[0, 2, 3]], atol=1e-6)
    assert list(csv["cluster"]) == ref["cluster"] and list(csv["top1_cluster"]) == ref["top1_cluster"]
    assert "unreadable image" in csv["error"][1]
    assert table["headers"][:2] == ["path", "decision"] and len(table["data"]) == 4
    # The server's table lives in this browser session's folder, which goes when the page is closed
    # (Gradio's copy for the download is in its cache, cleared hourly: delete_cache).
    own = server.session.session_dir(client.session_hash)
    kept = list(own.rglob("predictions.csv"))
    assert len(kept) == 1 and read_predictions(kept[0])["path"].tolist() == list(csv["path"]), kept
    server.session.end_session(client.session_hash)
    assert not own.exists()
    assert any(str(dep.get("trigger", "")).startswith("unload") or "unload" in str(dep.get("targets", ""))
               for dep in server.app.config["dependencies"]), "end_session runs when a page is closed"


# --------------------------------------------------------------------------- the session, no server
def test_default_model_path_and_message(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        demo_mod.resolve_model_path(None)
    assert "calibclust quickstart" in str(err.value) and "--model" in str(err.value)
    target = tmp_path / demo_mod.DEFAULT_QUICKSTART_MODEL
    target.parent.mkdir(parents=True)
    target.write_bytes(model.read_bytes())
    assert demo_mod.resolve_model_path(None) == demo_mod.DEFAULT_QUICKSTART_MODEL
    assert cli_main(["demo", "--model", str(tmp_path / "nope.onnx")]) == 2


def test_demo_help_teaches(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--host", "--port", "--share", "--max-upload-mb", "--max-pixels", "examples:"):
        assert option in text


def test_session_limits_and_upload_size(model, files, tmp_path):
    session = DemoSession(DemoConfig(model=model, max_upload_mb=0.0002, work_dir=tmp_path / "w"))  # ~210 bytes
    try:
        pred, image = session.predict_file(files["red.png"])
        assert pred.error == "" and image.shape == (16, 16, 3)
        heavy = tmp_path / "heavy.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(heavy)
        pred, image = session.predict_file(heavy)
        assert image is None and "the limit is 0.0002 MB" in pred.error
        assert session.decide(pred) == "error"
        with pytest.raises(DemoError, match="no files given"):
            session.label_batch([])
        assert (tmp_path / "w").is_dir()
    finally:
        session.close()
    assert (tmp_path / "w").is_dir(), "a work folder the caller gave is the caller's to remove"


def test_names_validation(model, tmp_path):
    session = DemoSession(DemoConfig(model=model, work_dir=tmp_path / "w", save_dir=tmp_path))
    try:
        assert session.parse_names([[0, "a"], [1, ""], [2, None]]) == ["a", "cluster_1", "cluster_2"]
        for rows, msg in [([[5, "x"]], "does not exist"), ([["x", "y"]], "not a number"),
                          ([[0, "a" * 101]], "longer than"), ([[0, "a\tb\x01"]], "control characters"),
                          ([[0, "cluster_1"]], "must be unique")]:
            with pytest.raises(DemoError, match=msg):
                session.parse_names(rows)
        session.save_dir = model.parent
        with pytest.raises(DemoError, match="never modified"):
            session.save_names([[0, "a"]], model.name)
        session.save_dir = tmp_path
        path = session.save_names([[0, "zero"]], "")  # blank file name: the suggested one
        assert path.name == "model-named.onnx" and read_model_metadata(path).cluster_names[0] == "zero"
        assert session.suggested_filename() == "model-named-2.onnx"
    finally:
        session.close()


def test_examples_folder_is_copied_not_exposed(model, files, tmp_path):
    session = DemoSession(DemoConfig(model=model, examples=files["red.png"].parent, max_examples=2,
                                     work_dir=tmp_path / "w"))
    try:
        assert [Path(p).name for p in session.example_paths] == ["00_grey.png", "01_red.png"]
        assert all(Path(p).parent == tmp_path / "w" / "examples" for p in session.example_paths)
        assert Path(session.example_paths[1]).read_bytes() == files["red.png"].read_bytes()
    finally:
        session.close()
    with pytest.raises(InputError, match="not a folder"):
        DemoSession(DemoConfig(model=model, examples=tmp_path / "none", work_dir=tmp_path / "w2"))


def test_batch_redecide_rewrites_the_same_csv_and_limits(model, files, tmp_path, monkeypatch):
    session = DemoSession(DemoConfig(model=model, work_dir=tmp_path / "w"))
    try:
        table, _, _ = session.label_batch([files["red.png"], files["teal.png"], files["grey.png"]])
        assert table["decision"] == ["accepted", "rejected", "ood"]
        csv = session.write_csv(table)
        strict = session.redecide_table(table, 0.99, 0.9)
        assert strict["decision"] == ["rejected", "rejected", "rejected"] and table["decision"][0] == "accepted"
        assert session.write_csv(strict, csv) == csv
        assert list(read_predictions(csv)["decision"]) == strict["decision"]
        assert session.redecide_table(table, 0.0, math.inf)["decision"] == ["accepted"] * 3  # OOD check off
        monkeypatch.setattr("calibclust.serve.demo_uploads.MAX_BATCH_FILES", 2)  # where it is read
        with pytest.raises(DemoError, match="more than 2 images"):
            session.label_batch([files["red.png"], files["teal.png"], files["grey.png"]])
        assert not list((tmp_path / "w").glob("batch-*")), "extracted batch files left behind"
    finally:
        session.close()


def test_slider_grid_passes_through_the_model_thresholds():
    from calibclust.serve.demo import anchored_step

    for low, value, step in [(0.0, 0.87345, 0.001), (0.0, 0.04510725289583206, 0.002), (-3.0, -1.234567, 0.006)]:
        got = anchored_step(low, value, step)
        n = round((value - low) / got)
        assert abs(low + n * got - value) < 1e-12 and abs(got - step) <= step / 2, (low, value, got)
    assert anchored_step(0.0, 0.0, 0.001) == 0.001 and anchored_step(0.0, math.inf, 0.001) == 0.001
    assert anchored_step(0.0, 0.0002, 0.001) == 0.0002  # a threshold below one step is still on the grid


def test_prediction_state_round_trip():
    p = Prediction("x.png", 2, 0.75, 0.25, [0.1, 0.15, 0.75])
    assert Prediction.from_state(p.to_state()) == p
    assert Prediction.from_state(None) is None
    assert math.isnan(Prediction("y").confidence)


def test_exemplars_shown_when_the_model_points_to_them(model, tmp_path):
    from calibclust.exemplars import attach_exemplars, build_exemplars

    imgs = write_good_images(tmp_path / "imgs", 30, seed=3)
    table, _ = Labeler(model).label(imgs)
    ex, _ = build_exemplars(imgs, np.array(table["cluster"]), np.array(table["confidence"]), 3, (16, 16), per_cluster=4)
    new_model, _ = attach_exemplars(model, ex, tmp_path / "with_ex.onnx")
    with_ex = DemoSession(DemoConfig(model=new_model, work_dir=tmp_path / "w1"))
    without = DemoSession(DemoConfig(model=model, work_dir=tmp_path / "w2"))
    try:
        assert without.exemplars is None and "calibclust exemplars" in without.exemplars_note
        assert without.cluster_gallery(0) == [] and without.example_paths == []
        counts = ex.counts()
        for c in range(3):
            tiles = with_ex.cluster_gallery(c)
            assert len(tiles) == counts[c]
            if counts[c]:
                np.testing.assert_array_equal(tiles[0][0][::14, ::14], ex.for_cluster(c)[0][0])  # 14× nearest upscale
                assert tiles[0][1].startswith(f"{ex.for_cluster(c)[1][0]:.3f} · img_")
        assert len(with_ex.example_paths) == int((counts > 0).sum())
        assert "18 exemplar" not in with_ex.header_markdown() and "3 clusters" in with_ex.header_markdown()
    finally:
        with_ex.close()
        without.close()


def test_cli_serves_until_stopped_and_never_imports_torch(model, tmp_path):
    """``calibclust demo`` as a user (or ``docker stop``) runs it: serves the page on the port it was
    given, stops cleanly on SIGTERM (exit 0, port freed), and imports no torch (``-X importtime``
    lists every module the process imported)."""
    import json
    import signal
    import subprocess
    import time
    import urllib.request

    port = free_port()
    # Output to files, not pipes: -X importtime writes more than a pipe buffer holds.
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "calibclust", "demo", "--model", str(model),
             "--port", str(port), "--save-dir", str(tmp_path)],
            stdout=out_f, stderr=err_f,
        )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and "open http" not in out_path.read_text():
            time.sleep(0.2)
        assert proc.poll() is None, err_path.read_text()[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as response:
            config = json.loads(response.read())
        assert "3 clusters" in json.dumps(config)  # the header, as the page will render it
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, err[-2000:]
    assert f"open http://127.0.0.1:{port}/" in out and "stopped" in out, out
    imported = {line.split("|")[-1].strip().split(".")[0] for line in err.splitlines() if line.startswith("import time:")}
    assert {"gradio", "onnxruntime", "calibclust"} <= imported, "importtime listing missing"
    assert "torch" not in imported and "torchvision" not in imported
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --------------------------------------------------------------------------- exposed use
def test_exposed_server_needs_a_login_or_an_explicit_waiver(model, tmp_path, capsys):
    from calibclust.errors import InputError

    for config in (DemoConfig(model=model, host="0.0.0.0"), DemoConfig(model=model, share=True)):
        assert config.exposed
        with pytest.raises(InputError, match="with no login"):
            demo_mod.check_exposure(config)
    demo_mod.check_exposure(DemoConfig(model=model, host="0.0.0.0", insecure_no_auth=True))
    assert "WITHOUT A LOGIN" in capsys.readouterr().err
    demo_mod.check_exposure(DemoConfig(model=model, host="0.0.0.0", auth=("u", "p")))
    for local in ("127.0.0.2", "::1", "localhost"):
        assert not DemoConfig(model=model, host=local).exposed, local
    assert DemoConfig(model=model, host="127.example.org").exposed, "a host name is not loopback"
    secret = tmp_path / "auth"
    secret.write_text("ann:s3cret:with:colons\n")
    assert demo_mod.parse_auth(None, str(secret)) == ("ann", "s3cret:with:colons")
    assert demo_mod.parse_auth(None, None) is None
    for bad in ("nocolon", ":p", "u:"):
        with pytest.raises(InputError, match="USER:PASSWORD"):
            demo_mod.parse_auth(bad, None)


def test_login_is_enforced_by_gradio(model, tmp_path):
    config = DemoConfig(model=model, port=free_port(), auth=("ann", "s3cret"), save_dir=tmp_path)
    running = demo_mod.launch(config, block=False, quiet=True)
    try:
        with pytest.raises(Exception):  # gradio_client refuses to connect without credentials
            gradio_client.Client(running.url, verbose=False, download_files=False)
        with pytest.raises(Exception):
            gradio_client.Client(running.url, auth=("ann", "wrong"), verbose=False, download_files=False)
        client = gradio_client.Client(running.url, auth=("ann", "s3cret"), verbose=False, download_files=False)
        try:
            rows = {"headers": ["cluster", "name"], "data": [[0, "r"], [1, "g"], [2, "b"]]}
            message, _ = client.predict(rows, "logged-in.onnx", api_name="/save_names")
            assert (tmp_path / "logged-in.onnx").is_file(), message
        finally:
            client.close()
    finally:
        running.close()


@dataclasses.dataclass
class ExposedConfig(DemoConfig):
    """Behaves as a server reachable from other machines, while the test binds loopback only."""

    exposed = True


def test_exposed_server_through_gradio_client(model, files, tmp_path, monkeypatch):
    """Through the real server with a login: the batch pixel budget (summed from headers, no decode),
    the cap on saved models, and no server folder in any message."""
    monkeypatch.setattr("calibclust.serve.demo_session.MAX_SAVES", 2)  # where it is read
    config = ExposedConfig(model=model, port=free_port(), auth=("ann", "pw"), save_dir=tmp_path / "saved",
                           max_batch_pixels=100_000, work_dir=tmp_path / "work")
    (tmp_path / "saved").mkdir()
    running = demo_mod.launch(config, block=False, quiet=True)
    client = gradio_client.Client(running.url, auth=("ann", "pw"), verbose=False, download_files=False)
    messages = []
    try:
        archive = tmp_path / "many.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for i in range(5):  # 5 x 90,000 px from a few kB of zip
                zf.write(files["big.png"], f"big{i}.png")
        monkeypatch.setattr(running.session.labeler, "decode", lambda *a, **k: pytest.fail("decoded before the budget"))
        summary, table, _ = client.predict([gradio_client.handle_file(str(archive))], 0.5, 0.6, api_name="/label_batch")
        assert "more than 100,000 pixels (at many.zip/big1.png)" in summary and not table["data"], summary
        messages.append(summary)
        rows = {"headers": ["cluster", "name"], "data": [[0, "r"], [1, "g"], [2, "b"]]}
        for name in ("one.onnx", "one.onnx", "../up.onnx", "two.onnx", "three.onnx"):
            message, _ = client.predict(rows, name, api_name="/save_names")
            messages.append(message)
        assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["one.onnx", "two.onnx"]
        assert messages[1].startswith("Saved **one.onnx**") and "already exists" in messages[2], messages
        assert "no folders" in messages[3] and "saved 2 named models" in messages[5], messages
        leaked = [m for m in messages if str(tmp_path) in m or "/tmp/" in m]
        assert not leaked, leaked
    finally:
        client.close()
        running.close()


def test_login_from_the_environment_for_containers(monkeypatch):
    monkeypatch.setenv("CALIBCLUST_DEMO_AUTH", "ann:pw")
    assert demo_mod.parse_auth(None, None) == ("ann", "pw")
    assert demo_mod.parse_auth("bob:x", None) == ("bob", "x"), "a flag wins over the environment"


def test_api_names_and_the_readme_example(server, files, monkeypatch, capsys):
    """The HTTP API has named parameters and outputs (no param_0 / value_16), and the README's
    gradio_client example runs against the server as written (URL and file swapped)."""
    import re

    client = gradio_client.Client(server.url, verbose=False, download_files=False)
    try:
        api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        client.close()
    params = {name: [p["parameter_name"] for p in ep["parameters"]] for name, ep in api.items()}
    assert params["/predict"] == ["image", "confidence_threshold", "ood_threshold"]
    assert params["/label_batch"] == ["images", "confidence_threshold", "ood_threshold"]
    assert params["/save_names"] == ["cluster_names", "filename"]
    for name, ep in api.items():
        labels = [r["label"] for r in ep["returns"]]
        assert all(label and not re.fullmatch(r"value_\d+", label) for label in labels), (name, labels)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(# the demo's HTTP API.*?)```", readme, re.S).group(1)
    code = code.replace('"http://127.0.0.1:7860/"', repr(server.url)).replace('"photo.png"', repr(str(files["red.png"])))
    exec(code, {})  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()  # after gradio_client's "Loaded as API"
    assert printed[0] == "accepted" and float(printed[-2]) > 0.5, printed
