"""Kill-and-resume: SIGKILL (and SIGINT) a labelling subprocess at a random point, resume, and get a
table byte-identical to an uninterrupted run's; changed model/options/folder are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import (  # noqa: E402
    interrupt_at,
    make_contract_model,
    rows_done,
    run_label_cli,
    write_bad_images,
    write_good_images,
)

from calibclust.io.predictions import read_predictions  # noqa: E402
from calibclust.serve.labeler import Labeler  # noqa: E402
from calibclust.serve.pipeline import LabelOptions, _run_local, fingerprint, label_folder  # noqa: E402
from calibclust.serve.resume import Journal, ResumeError  # noqa: E402

N_GOOD = 2400
COMMON = ("--batch-size", "16", "--workers", "1", "--checkpoint-every-images", "32", "--top-k", "2",
          "--max-pixels", "30000", "--coverage", "0.7", "--no-progress")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    folder = root / "images"
    write_good_images(folder, N_GOOD, seed=3, subdirs=6)
    write_bad_images(folder / "zz_bad")
    model = make_contract_model(root / "model.onnx")
    ref_out = root / "reference"
    proc = run_label_cli(folder, "--model", model, "--out", ref_out, *COMMON)
    assert proc.returncode == 3, proc.stderr
    return folder, model, ref_out / "predictions.csv", root


def _start(folder, model, out, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "calibclust", "label", str(folder), "--model", str(model), "--out", str(out),
         *COMMON, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A test runner started in the background (`cmd &` without job control) ignores SIGINT, the
        # child inherits that and Python then installs no KeyboardInterrupt handler: restore it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_sigkill_at_random_points_then_resume_is_identical(setup, tmp_path):
    folder, model, reference, _ = setup
    rng = np.random.default_rng(int(time.time()))
    out = tmp_path / "out"
    total = N_GOOD + 5
    killed_at = []
    # First kill at a random point of the first run, a second one during the resumed run.
    for round_ in range(2):
        target = int(rng.integers(0 if round_ == 0 else rows_done(out), total - 200))
        proc = _start(folder, model, out, *(("--resume",) if round_ else ()))
        if not interrupt_at(proc, out, target, signal.SIGKILL):
            pytest.fail(f"run finished before the kill at {target} rows; make the folder bigger")
        assert proc.returncode == -signal.SIGKILL
        killed_at.append((target, rows_done(out)))
        assert not (out / "predictions.csv").exists()
    proc = run_label_cli(folder, "--model", model, "--out", out, *COMMON, "--resume")
    assert proc.returncode == 3, proc.stderr
    assert (out / "predictions.csv").read_bytes() == reference.read_bytes(), f"killed at {killed_at}"
    assert not (out / ".calibclust-label").exists()
    assert len(reference.read_text().splitlines()) == total + 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_keeps_work_and_resume_is_identical(setup, tmp_path, sig):
    folder, model, reference, _ = setup
    out = tmp_path / "out"
    proc = _start(folder, model, out)
    assert interrupt_at(proc, out, 300, sig)
    assert proc.returncode == 130, proc.stderr.read()
    assert "--resume" in proc.stderr.read()
    done = rows_done(out)
    assert done >= 300
    # Without --resume the unfinished run is not silently replaced.
    again = run_label_cli(folder, "--model", model, "--out", out, *COMMON)
    assert again.returncode == 2 and "--resume" in again.stderr
    proc = run_label_cli(folder, "--model", model, "--out", out, *COMMON, "--resume")
    assert proc.returncode == 3, proc.stderr
    assert (out / "predictions.csv").read_bytes() == reference.read_bytes()


def _partial_run(folder, model, out, stop_after: int | None = None, **kw) -> LabelOptions:
    """Leave a journal as a killed run would: parts written, no outputs."""
    opts = LabelOptions(folder=str(folder), model=str(model), out_dir=str(out), batch_size=16, workers=0,
                        top_k=2, max_pixels=30_000, progress=False, checkpoint_every=32, **kw)
    from calibclust.serve.policy import Policy

    opts.policy = Policy("coverage", 0.7)
    labeler = Labeler(model, max_pixels=30_000)
    journal = Journal(out)
    journal.create(fingerprint(opts, labeler, 16))
    _run_local(opts, labeler, journal, 16)
    if stop_after is not None:
        for start, end, path in journal.parts():
            if start >= stop_after:
                path.unlink()
    return opts


def test_killed_during_finalisation_resumes(setup, tmp_path):
    folder, model, reference, _ = setup
    out = tmp_path / "out"
    opts = _partial_run(folder, model, out)  # every part done, outputs not yet written
    (out / ".predictions.csv.partial-4242").write_text("half a table from a killed writer")
    opts.resume = True
    result = label_folder(opts)
    assert result.exit_code == 3
    assert (out / "predictions.csv").read_bytes() == reference.read_bytes()
    assert not list(out.glob(".predictions.csv.partial-*"))


def test_resume_refuses_other_options_and_model(setup, tmp_path):
    folder, model, _, root = setup
    out = tmp_path / "out"
    _partial_run(folder, model, out, stop_after=320)
    other = [a if a != "0.7" else "0.5" for a in COMMON]
    proc = run_label_cli(folder, "--model", model, "--out", out, *other, "--resume")
    assert proc.returncode == 2 and "different model or options" in proc.stderr and "policy" in proc.stderr, proc.stderr
    other_model = make_contract_model(root / "other.onnx", temperature=4.0)
    proc = run_label_cli(folder, "--model", other_model, "--out", out, *COMMON, "--resume")
    assert proc.returncode == 2 and "model_sha256" in proc.stderr, proc.stderr
    proc = run_label_cli(folder, "--model", model, "--out", out, *COMMON[:-1], "--batch-size", "32", "--resume")
    assert proc.returncode == 2 and "batch_size" in proc.stderr, proc.stderr


def test_resume_refuses_a_changed_folder(setup, tmp_path):
    _, model, _, _ = setup
    folder = tmp_path / "imgs"
    write_good_images(folder, 200, seed=5, subdirs=2)
    out = tmp_path / "out"
    opts = _partial_run(folder, model, out, stop_after=96)
    # A new file that sorts before the already-labelled ones.
    (folder / "d0" / "img_00000.png").rename(folder / "d0" / "aaa_renamed.png")
    opts.resume = True
    with pytest.raises(ResumeError, match="folder changed"):
        label_folder(opts)


def test_two_runs_cannot_share_one_out_folder(tmp_path):
    """While one run holds OUT, a second is refused naming the holder; the lock goes with the run."""
    from calibclust.serve.resume import ResumeError, RunLock

    with RunLock(tmp_path / "out"):
        with pytest.raises(ResumeError, match="in use by another 'calibclust label' run"):
            with RunLock(tmp_path / "out"):
                pass
    with RunLock(tmp_path / "out"):  # released: the next run goes ahead
        pass
    assert list((tmp_path / "out").iterdir()) == [], "nothing is created for the lock"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_non_utf8_names_survive_every_format_and_a_killed_run(setup, tmp_path, fmt):
    """File names that are not UTF-8 (Latin-1 bytes): every image was inferred, then writing the CSV
    or Parquet table raised UnicodeEncodeError, and --resume repeated it. Now each format keeps the
    name losslessly, read_predictions returns the same str os.listdir gives, and a run killed
    mid-way and resumed writes the same table."""
    _, model, _, _ = setup
    folder = tmp_path / "latin1"
    paths = write_good_images(folder, 400, seed=5, subdirs=2)
    for i, path in enumerate(paths[::40]):  # every 40th file gets a Latin-1 name, some with "\x41" in it
        raw = os.fsencode(path.parent) + b"/caf\xe9" + (b"\\x41" if i % 2 else b"") + str(i).encode() + b".png"
        os.rename(os.fsencode(path), raw)
    names = sorted(os.path.join(d, f) for d in os.listdir(folder) for f in os.listdir(folder / d))
    assert any("\udce9" in n for n in names)
    ref = tmp_path / "ref"
    proc = run_label_cli(folder, "--model", model, "--out", ref, "--format", fmt, "--no-progress", "--workers", "1",
                         "--batch-size", "16")  # the same batches as below: floats may differ in the last bit otherwise
    assert proc.returncode == 0, proc.stderr
    table = ref / f"predictions.{fmt}"
    assert sorted(read_predictions(table)["path"].tolist()) == names
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "calibclust", "label", str(folder), "--model", str(model), "--out", str(out), "--format",
         fmt, "--no-progress", "--workers", "1", "--batch-size", "16", "--checkpoint-every-images", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_at = int(np.random.default_rng(int(time.time())).integers(0, 300))
    assert interrupt_at(proc, out, kill_at, signal.SIGKILL), f"the run ended before the kill at {kill_at} rows"
    assert proc.returncode == -signal.SIGKILL
    resumed = run_label_cli(folder, "--model", model, "--out", out, "--format", fmt, "--no-progress", "--workers", "1",
                            "--batch-size", "16", "--checkpoint-every-images", "16", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got, want = read_predictions(out / f"predictions.{fmt}"), read_predictions(table)
    assert got.keys() == want.keys() and got["path"].tolist() == want["path"].tolist(), f"killed at {kill_at}"
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name}, killed at {kill_at}")
    if fmt != "parquet":  # Parquet's row groups follow the journal's parts; the values are compared above
        assert (out / f"predictions.{fmt}").read_bytes() == table.read_bytes(), f"killed at {kill_at}"
    if fmt == "csv":
        assert b"caf\xe9" in (out / "predictions.csv").read_bytes(), "the CSV cell holds the name's own bytes"
