"""The folder pipeline end to end: bad inputs, worker kinds, formats, policies, outputs, sort-into."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import (  # noqa: E402
    interrupt_at,
    expected_probs,
    make_contract_model,
    run_label_cli,
    write_bad_images,
    write_good_images,
)

from calibclust.errors import InputError  # noqa: E402
from calibclust.io.images import decode_image, discover_images  # noqa: E402
from calibclust.io.predictions import read_predictions  # noqa: E402
from calibclust.serve.pipeline import LabelOptions, label_folder  # noqa: E402
from calibclust.serve.policy import Policy  # noqa: E402
from calibclust.serve.resume import ResumeError  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_contract_model(tmp_path_factory.mktemp("model") / "model.onnx",
                               metadata={"cluster_names": ["red", "green", "blue"]})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("mixed")
    write_good_images(root / "a", 30, seed=1, subdirs=3)
    write_good_images(root / "b", 12, seed=2, fmt="jpg")
    bad = write_bad_images(root / "bad")
    (root / ".hidden.png").write_bytes(b"ignored: hidden")
    (root / "notes.txt").write_text("not an image extension: not discovered")
    return root, bad


def test_bad_inputs_folder_cli(model, mixed, tmp_path):
    """Acceptance: run completes, exit code 3, one error row per bad file with its reason,
    rows == files found."""
    root, bad = mixed
    out = tmp_path / "out"
    proc = run_label_cli(root, "--model", model, "--out", out, "--max-pixels", 30_000, "--workers", 2,
                         "--batch-size", 8, "--top-k", 2, "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "5 file(s) could not be read" in proc.stderr
    found = [p.relative_to(root).as_posix() for p in discover_images(root)]
    table = read_predictions(out / "predictions.csv")
    assert table["path"].tolist() == found and len(found) == 30 + 12 + 5
    errors = {p: e for p, d, e in zip(table["path"], table["decision"], table["error"]) if d == "error"}
    assert sorted(errors) == sorted(f"bad/{name}" for name in bad)
    for name, keyword in bad.items():
        assert keyword in errors[f"bad/{name}"], (name, errors[f"bad/{name}"])
    good = table["decision"] != "error"
    assert (table["error"][good] == "").all() and (table["cluster"][~good] == -1).all()
    # Every readable row carries the model's prediction on THE decoder's output.
    decoded = np.stack([decode_image(root / p, size=(16, 16)) for p in table["path"][good]])
    ref = expected_probs(decoded)
    np.testing.assert_array_equal(table["cluster"][good], ref.argmax(1))
    np.testing.assert_allclose(table["confidence"][good], ref.max(1), atol=1e-5)
    np.testing.assert_allclose(table["top2_prob"][good], np.sort(ref, 1)[:, -2], atol=1e-5)
    assert set(table["cluster_name"][good]) <= {"red", "green", "blue"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == len(found) and summary["exit_code"] == 3
    assert sum(summary["counts"].values()) == len(found) and summary["counts"]["error"] == 5
    assert sum(c["total"] for c in summary["clusters"]) == len(found) - 5
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") > 10 and "Estimated accuracy vs coverage" in html
    assert "most confident" in html and "bad/truncated.png" in html
    assert not (out / ".calibclust-label").exists(), "journal is removed after a finished run"


def _run(model, folder, out, **kw) -> Path:
    kw.setdefault("progress", False)
    kw.setdefault("max_pixels", 30_000)
    result = label_folder(LabelOptions(folder=str(folder), model=str(model), out_dir=str(out), **kw))
    return result.table


def test_worker_kinds_and_batches_agree(model, mixed, tmp_path):
    root, _ = mixed
    ref = _run(model, root, tmp_path / "proc", workers=2, worker_type="process", batch_size=8, report=False)
    for name, kw in {"thread": dict(workers=2, worker_type="thread"), "inline": dict(workers=0)}.items():
        other = _run(model, root, tmp_path / name, batch_size=8, report=False, **kw)
        assert other.read_bytes() == ref.read_bytes(), name
    # Another batch size gives the same decisions and clusters (floats may differ in the last bit).
    a, b = read_predictions(ref), read_predictions(_run(model, root, tmp_path / "bs5", batch_size=5, workers=1, report=False))
    assert (a["decision"] == b["decision"]).all() and (a["cluster"] == b["cluster"]).all()
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-6)


def test_formats_hold_the_same_rows(model, mixed, tmp_path):
    root, _ = mixed
    tables = {fmt: read_predictions(_run(model, root, tmp_path / fmt, table_format=fmt, write_probs=True,
                                         report=False, workers=1))
              for fmt in ("csv", "parquet", "jsonl")}
    for fmt in ("parquet", "jsonl"):
        assert set(tables[fmt]) == set(tables["csv"])
        for col, values in tables["csv"].items():
            if values.dtype.kind == "f":
                np.testing.assert_allclose(tables[fmt][col], values, rtol=1e-7, equal_nan=True, err_msg=col)
            else:
                assert tables[fmt][col].tolist() == values.tolist(), (fmt, col)
    probs = np.stack([tables["csv"][f"prob_{c}"] for c in range(3)], 1)
    ok = tables["csv"]["cluster"] >= 0
    np.testing.assert_allclose(probs[ok].sum(1), 1.0, atol=1e-5)


def test_coverage_and_target_accuracy_policies(model, mixed, tmp_path):
    root, _ = mixed
    t = read_predictions(_run(model, root, tmp_path / "cov", policy=Policy("coverage", 0.5), report=False, workers=1))
    s = json.loads((tmp_path / "cov" / "summary.json").read_text())["thresholds"]
    in_dist = (t["decision"] == "accepted") | (t["decision"] == "rejected")
    assert s["n_in_distribution"] == in_dist.sum()
    assert (t["decision"] == "accepted").sum() == np.ceil(0.5 * in_dist.sum())
    t2 = read_predictions(_run(model, root, tmp_path / "acc", policy=Policy("target_accuracy", 0.6), report=False, workers=1))
    s2 = json.loads((tmp_path / "acc" / "summary.json").read_text())["thresholds"]
    acc = t2["decision"] == "accepted"
    assert t2["confidence"][acc].mean() == pytest.approx(s2["estimated_accuracy"]) and s2["estimated_accuracy"] >= 0.6
    assert s2["coverage"] == pytest.approx(acc.sum() / (t2["decision"] != "error").sum())


def test_uncalibrated_model_warns_on_target_accuracy(mixed, tmp_path):
    root, _ = mixed
    model = make_contract_model(tmp_path / "uncal.onnx", calibrated=False)
    proc = run_label_cli(root / "a", "--model", model, "--out", tmp_path / "o", "--target-accuracy", "0.6",
                         "--no-progress", "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert "not calibrated" in proc.stderr
    assert "estimated accuracy of accepted" in proc.stdout


def test_existing_results_are_not_clobbered(model, mixed, tmp_path):
    root, _ = mixed
    out = tmp_path / "o"
    _run(model, root / "a", out, report=False)
    before = (out / "predictions.csv").read_bytes()
    with pytest.raises(ResumeError, match="already holds results"):
        _run(model, root / "a", out, report=False)
    proc = run_label_cli(root / "a", "--model", model, "--out", out, "--no-progress")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "predictions.csv").read_bytes() == before
    _run(model, root / "a", out, report=False, overwrite=True, policy=Policy("min_confidence", 0.0, float("inf")))
    assert set(read_predictions(out / "predictions.csv")["decision"]) == {"accepted"}
    # Overwriting in another format leaves one table, not two from different runs.
    _run(model, root / "a", out, report=True, overwrite=True, table_format="jsonl")
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "report.html", "summary.json"]


def test_sort_into_never_overwrites(model, mixed, tmp_path):
    root, bad = mixed
    dest = tmp_path / "sorted"
    # A file of the user's already sits where one link would go.
    table = read_predictions(_run(model, root, tmp_path / "probe", report=False, workers=1))
    first = next(i for i, d in enumerate(table["decision"]) if d == "accepted")
    victim = dest / table["cluster_name"][first] / table["path"][first]
    victim.parent.mkdir(parents=True)
    victim.write_text("user data")
    _run(model, root, tmp_path / "out", sort_into=str(dest), report=False, workers=1)
    assert victim.read_text() == "user data"
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["sort_into"]
    assert s["created"] == len(table["path"]) - 1 and s["conflicts_left_untouched"] == 1
    for p, d, name in zip(table["path"], table["decision"], table["cluster_name"]):
        bucket = {"rejected": "_rejected", "ood": "_ood", "error": "_errors"}.get(d, name)
        link = dest / bucket / p
        if link == victim:
            continue
        assert link.is_symlink() and Path(os.readlink(link)) == (root / p).resolve(), link
    assert sorted(x.name for x in (dest / "_errors" / "bad").iterdir()) == sorted(bad)
    # Running again over the same sort folder: existing links are recognised, nothing duplicated.
    _run(model, root, tmp_path / "out", sort_into=str(dest), report=False, overwrite=True, workers=1)
    s2 = json.loads((tmp_path / "out" / "summary.json").read_text())["sort_into"]
    assert s2["created"] == 0 and s2["already_present"] == len(table["path"]) - 1
    # --copy makes real files.
    _run(model, root / "a", tmp_path / "copy", sort_into=str(tmp_path / "copies"), copy=True, report=False)
    copies = [p for p in (tmp_path / "copies").rglob("*.png")]
    assert len(copies) == 30 and not any(p.is_symlink() for p in copies)
    with pytest.raises(InputError, match="inside the labelled folder"):
        _run(model, root, tmp_path / "x", sort_into=str(root / "sorted"), report=False)
    assert not (tmp_path / "x").exists(), "refused before any inference: no output, no journal"


def test_sort_into_gives_every_cluster_its_own_folder(tmp_path):
    from calibclust.serve.sort import bucket_names

    assert bucket_names(["a/b", "a_b", "_ood", "cluster_ood", "A", "a", ".x"]) == [
        "a_b", "a_b_1", "cluster_ood", "cluster_ood_3", "A", "a_5", "x"]
    names = ["a/b", "a_b", "_ood"]
    model = make_contract_model(tmp_path / "m.onnx", metadata={"cluster_names": names, "confidence_threshold": 0.0})
    write_good_images(tmp_path / "in", 60, seed=3)
    _run(model, tmp_path / "in", tmp_path / "out", sort_into=str(tmp_path / "sorted"), report=False,
         policy=Policy(ood_threshold=float("inf")))
    table = read_predictions(tmp_path / "out" / "predictions.csv")
    expected = {n: b for n, b in zip(names, ["a_b", "a_b_1", "cluster_ood"])}
    for path, name in zip(table["path"], table["cluster_name"]):
        assert (tmp_path / "sorted" / expected[name] / path).is_symlink(), (path, name)
    assert len(set(table["cluster_name"])) >= 2, "the test needs images in at least two clusters"


def test_empty_folder_and_usage_errors(model, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_label_cli(tmp_path / "empty", "--model", model, "--out", tmp_path / "o", "--no-progress")
    assert proc.returncode == 2 and "no images found" in proc.stderr
    proc = run_label_cli(tmp_path / "empty", "--model", model, "--out", tmp_path / "o", "--coverage", "1.5")
    assert proc.returncode == 2 and "expected a number in [0, 1]" in proc.stderr
    proc = run_label_cli(tmp_path / "empty", "--model", model, "--out", tmp_path / "o", "--coverage", "0.5",
                         "--target-accuracy", "0.9")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = run_label_cli(tmp_path / "nope", "--model", model, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "not a folder" in proc.stderr


def test_label_command_is_registered_and_teaches():
    from calibclust.cli import COMMANDS

    assert dict(COMMANDS)["label"] == "calibclust.serve.cli:register_cli"
    from calibclust.serve.cli import register_cli

    parser = argparse.ArgumentParser(prog="calibclust")
    register_cli(parser.add_subparsers(dest="command"))
    text = parser._subparsers._group_actions[0].choices["label"].format_help()
    for needle in ("--target-accuracy", "--coverage", "--resume", "--sort-into", "--engine", "examples:",
                   "Exit codes", "accepted", "ood"):
        assert needle in text, needle


def test_relative_folder_spellings_give_the_same_table(model, mixed, tmp_path):
    root, _ = mixed
    ref = run_label_cli(root, "--model", model, "--out", tmp_path / "abs", "--no-progress", "--no-report",
                        "--max-pixels", 30_000)
    import subprocess

    for i, folder in enumerate((".", "./", "..", "../../" + root.name)):
        cwd = root if not folder.startswith("..") else root / "a"
        proc = subprocess.run([sys.executable, "-m", "calibclust", "label", folder, "--model", str(model), "--out",
                               str(tmp_path / f"rel{i}"), "--no-progress", "--no-report", "--max-pixels", "30000"],
                              capture_output=True, text=True, cwd=cwd)
        assert proc.returncode == ref.returncode == 3, proc.stderr
        assert (tmp_path / f"rel{i}" / "predictions.csv").read_bytes() == (tmp_path / "abs" / "predictions.csv").read_bytes(), folder


def hostile_folder(root: Path) -> Path:
    """Five images plus what ordinary folders contain: a link back up the tree, a second link to a
    folder, a FIFO and a link to /dev/zero with image names, a broken link, an unlistable folder."""
    write_good_images(root / "sub", 5)
    os.symlink("..", root / "sub" / "loop")
    os.symlink("sub", root / "zz-again")
    os.mkfifo(root / "pipe.png")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.symlink("missing.png", root / "dangling.png")
    write_good_images(root / "locked", 1)
    (root / "locked").chmod(0)
    return root


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_hostile_folder_is_labelled_without_hang_loss_or_traceback(model, tmp_path):
    """Discovery yields each regular file once and reports the rest (issue: a link loop crashed the
    walk after ~40 duplicate rows, a FIFO hung the run, /dev/zero was read whole)."""
    root = hostile_folder(tmp_path / "hostile")
    try:
        out = tmp_path / "out"
        proc = run_label_cli(root, "--model", model, "--out", out, "--no-progress", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        table = read_predictions(out / "predictions.csv")
        listable = ["locked/img_00000.png"] if os.geteuid() == 0 else []  # root lists any folder
        assert table["path"].tolist() == listable + [f"sub/img_{i:05d}.png" for i in range(5)], table["path"]
        assert (table["decision"] != "error").all()
        skipped = json.loads((out / "summary.json").read_text())["skipped"]
        reasons = {Path(s["path"]).name: s["reason"] for s in skipped["first_100"]}
        assert "FIFO" in reasons["pipe.png"] and "device" in reasons["zero.jpg"], reasons
        assert "broken symbolic link" in reasons["dangling.png"] and "already walked" in reasons["loop"], reasons
        assert "already walked" in reasons["zz-again"], reasons
        if not listable:
            assert "cannot list" in reasons["locked"], reasons
        assert skipped["count"] == len(reasons) and f"skipped {root}" in proc.stderr
    finally:
        (root / "locked").chmod(0o755)


def test_max_file_mb_refuses_large_files_with_an_error_row(model, tmp_path):
    from PIL import Image

    write_good_images(tmp_path / "in", 3)
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "in" / "zz_big.png")  # ~200 kB of incompressible pixels
    proc = run_label_cli(tmp_path / "in", "--model", model, "--out", tmp_path / "out", "--no-progress",
                         "--max-file-mb", "0.05")
    assert proc.returncode == 3, proc.stderr
    table = read_predictions(tmp_path / "out" / "predictions.csv")
    assert table["decision"][-1] == "error" and (table["decision"][:3] != "error").all(), table["decision"]
    assert "over the limit of 0.05 MiB (--max-file-mb)" in table["error"][-1], table["error"][-1]


def test_prefetch_is_bounded_by_bytes_not_only_by_workers():
    from calibclust.serve.pipeline import PREFETCH_BYTES, prefetch_batches

    assert prefetch_batches(2, 256, (32, 32)) == 4  # small inputs: two batches per worker
    big = prefetch_batches(128, 512, (224, 224))  # 77 MB a batch: 256 batches would be 20 GB
    assert big == PREFETCH_BYTES // (512 * 224 * 224 * 3) == 13
    assert prefetch_batches(64, 4096, (1024, 1024)) == 2


def mutated_corpus(root: Path, per_format: int = 80, seed: int = 0) -> int:
    """Byte-mutated copies of valid JPEG, PNG, WebP and TIFF files: flipped bytes, truncations,
    inserted garbage, swapped headers. Returns how many files were written."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    base[10:30, 10:30] = (200, 40, 40)
    written = 0
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")):
        buf = io.BytesIO()
        Image.fromarray(base).save(buf, format=fmt)
        good = bytearray(buf.getvalue())
        (root / fmt.lower()).mkdir(parents=True, exist_ok=True)
        for i in range(per_format):
            data = bytearray(good)
            kind = i % 4
            if kind == 0:  # flip a few random bytes
                for j in rng.integers(0, len(data), int(rng.integers(1, 20))):
                    data[j] = int(rng.integers(0, 256))
            elif kind == 1:  # truncate
                data = data[: int(rng.integers(1, len(data)))]
            elif kind == 2:  # insert garbage
                at = int(rng.integers(0, len(data)))
                data[at:at] = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
            else:  # corrupt the header region
                for j in range(min(32, len(data))):
                    if rng.random() < 0.3:
                        data[j] = int(rng.integers(0, 256))
            (root / fmt.lower() / f"m{i:03d}.{ext}").write_bytes(bytes(data))
            written += 1
    return written


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_hostile_corpus_one_row_per_regular_file_no_traceback(model, tmp_path):
    """Every hostile case together, plus 320 byte-mutated JPEG / PNG / WebP / TIFF files and a
    non-UTF-8 name: the run finishes (timeout), exits 3, one row per regular file, no traceback."""
    root = hostile_folder(tmp_path / "corpus")
    try:
        n_mutated = mutated_corpus(root / "mutated")
        write_bad_images(root / "bad")
        with open(os.fsencode(root) + b"/caf\xe9.png", "wb") as fh:  # a name that is not UTF-8
            fh.write((root / "sub" / "img_00000.png").read_bytes())
        proc = run_label_cli(root, "--model", model, "--out", tmp_path / "out", "--no-progress", "--max-pixels", 30_000,
                             "--workers", 2, timeout=300)
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        table = read_predictions(tmp_path / "out" / "predictions.csv")
        listable = 1 if os.geteuid() == 0 else 0
        expected = n_mutated + 5 + 5 + 1 + listable  # mutated, bad, sub/, the Latin-1 copy, locked/
        paths = table["path"].tolist()
        assert len(paths) == expected and len(set(paths)) == expected, (len(paths), len(set(paths)), expected)
        errors = table["error"][table["decision"] == "error"]
        assert all(e for e in errors), "every error row says why"
        print(f"{len(paths)} rows: {int((table['decision'] == 'error').sum())} errors, "
              f"{int((table['decision'] != 'error').sum())} labelled")
    finally:
        (root / "locked").chmod(0o755)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_hostile_corpus_kill_and_resume_gives_the_same_table(model, tmp_path, fmt):
    """The hostile corpus (with a Latin-1 name and a spreadsheet-formula name) killed with SIGKILL at
    a random point and resumed: the same table as an uninterrupted run, in every format."""
    import signal
    import subprocess
    import time

    root = hostile_folder(tmp_path / "corpus")
    try:
        mutated_corpus(root / "mutated", per_format=40)
        write_good_images(root / "many", 300, seed=7, subdirs=3)
        for raw in (b"/caf\xe9.png", b"/=cmd()+1.png"):
            with open(os.fsencode(root) + raw, "wb") as fh:
                fh.write((root / "sub" / "img_00000.png").read_bytes())
        common = ["--model", str(model), "--format", fmt, "--no-progress", "--workers", "1", "--batch-size", "8",
                  "--checkpoint-every-images", "8", "--max-pixels", "30000"]
        ref = run_label_cli(root, "--out", tmp_path / "ref", *common, timeout=300)
        assert ref.returncode == 3 and "Traceback" not in ref.stderr, ref.stderr[-2000:]
        out = tmp_path / "out"
        proc = subprocess.Popen([sys.executable, "-m", "calibclust", "label", str(root), "--out", str(out), *common],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_at = int(np.random.default_rng(int(time.time())).integers(8, 300))
        assert interrupt_at(proc, out, kill_at, signal.SIGKILL), f"the run ended before the kill at {kill_at} rows"
        assert proc.returncode == -signal.SIGKILL
        resumed = run_label_cli(root, "--out", out, *common, "--resume", timeout=300)
        assert resumed.returncode == 3 and "Traceback" not in resumed.stderr, resumed.stderr[-2000:]
        got, want = read_predictions(out / f"predictions.{fmt}"), read_predictions(tmp_path / "ref" / f"predictions.{fmt}")
        assert got["path"].tolist() == want["path"].tolist(), f"killed at {kill_at}"
        assert "=cmd()+1.png" in want["path"].tolist() and any("\udce9" in p for p in want["path"].tolist())
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name}, killed at {kill_at}")
        if fmt == "csv":
            assert b"'=cmd()+1.png" in (out / "predictions.csv").read_bytes(), "formula names are escaped"
    finally:
        (root / "locked").chmod(0o755)


def test_embeddings_file_is_aligned_with_the_table_across_parts(model, mixed, tmp_path):
    """--embeddings: embeddings.npy row i is the table's row i (several journal parts, NaN rows for
    unreadable files), equal to the model's own embedding output; a later run without it removes it."""
    from calibclust.serve.labeler import Labeler

    root, _ = mixed
    out = tmp_path / "emb"
    table = read_predictions(_run(model, root, out, write_embeddings=True, report=False, workers=1, batch_size=8,
                                  checkpoint_every=8, table_format="parquet"))
    emb = np.load(out / "embeddings.npy", mmap_mode="r")
    labeler = Labeler(str(model), "cpu", max_pixels=30_000)
    assert emb.dtype == np.float32 and emb.shape == (len(table["path"]), labeler.embedding_dim())
    ok = table["cluster"] >= 0
    assert ok.sum() >= 42 and (~ok).sum() >= 5, "the fixture mixes readable and unreadable files"
    assert np.isnan(emb[~ok]).all() and np.isfinite(emb[ok]).all()
    images = np.stack([decode_image(root / p, size=labeler.input_size) for p in table["path"][ok]])
    np.testing.assert_allclose(emb[ok], labeler.predict(images, ("embedding",))["embedding"], rtol=1e-5, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embeddings"]["shape"] == list(emb.shape)
    del emb
    _run(model, root, out, report=False, workers=1, overwrite=True)
    assert not (out / "embeddings.npy").exists()
    assert json.loads((out / "summary.json").read_text())["embeddings"] is None


def test_readme_curation_recipe_runs(model, mixed, tmp_path, monkeypatch):
    """The README's pandas recipe for the table + embeddings, run as written (pandas is optional)."""
    pytest.importorskip("pandas")
    import re

    root, _ = mixed
    _run(model, root, tmp_path / "labels", write_embeddings=True, write_probs=True, table_format="parquet", report=False)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipe = re.search(r"```python\n(# table \+ embeddings.*?)```", readme, re.S)
    assert recipe, "README: the curation recipe block is missing"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(recipe.group(1), namespace)  # noqa: S102 - the README's own code
    df, emb = namespace["df"], namespace["emb"]
    assert len(df) == len(emb) and "embedding" in df.columns and df["decision"].notna().all()
