"""calibclust.serve runs end to end where ``import torch`` fails (and without the ``onnx`` package:
serving needs onnxruntime only; and without matplotlib, whose import alone cost the report more than
half a second: the report's charts are SVG). A meta-path blocker is installed through ``sitecustomize`` on
PYTHONPATH, so every process of the run — the CLI and its spawned decode workers — has it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_contract_model, run_label_cli, write_bad_images, write_good_images  # noqa: E402

BLOCKED = ("torch", "torchvision", "onnx", "onnxscript", "matplotlib")

SITECUSTOMIZE = f'''
import sys

BLOCKED = {BLOCKED!r}


class _Blocker:
    """Make the blocked packages unimportable, as on a serving box where they are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_serve_notorch)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
'''


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(site)}


def test_blocker_really_blocks(blocked_env):
    import os

    env = {**os.environ, **blocked_env}
    for name in ("torch", "onnx", "matplotlib"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env)
        assert proc.returncode == 1 and "blocked by test_serve_notorch" in proc.stderr, proc.stderr
    # Where torch is installed (the dev environment), the block is what keeps it out of the run.
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        assert subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def test_label_cli_end_to_end_without_torch(blocked_env, tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 40, seed=7, subdirs=2)
    write_bad_images(folder / "bad")
    model = make_contract_model(tmp_path / "model.onnx")  # built here, where onnx is importable
    out = tmp_path / "out"
    proc = run_label_cli(folder, "--model", model, "--out", out, "--max-pixels", 30_000, "--workers", 2,
                         "--target-accuracy", "0.6", "--top-k", 2, "--sort-into", tmp_path / "sorted",
                         "--no-progress", env=blocked_env)
    assert proc.returncode == 3, proc.stderr
    assert "blocked by test_serve_notorch" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == 45 and summary["counts"]["error"] == 5
    assert (out / "report.html").stat().st_size > 10_000
    assert summary["sort_into"]["created"] == 45
    # The process worker path also runs without torch (forked and spawned workers get the blocker too).
    proc = run_label_cli(folder, "--model", model, "--out", tmp_path / "out2", "--worker-type", "process",
                         "--format", "parquet", "--no-progress", "--no-report", env=blocked_env)
    assert proc.returncode == 3, proc.stderr


def test_serve_modules_import_without_torch(blocked_env):
    import os

    code = (
        "import sys\n"
        "import calibclust.serve, calibclust.serve.cli, calibclust.serve.labeler, calibclust.serve.pipeline,"
        " calibclust.serve.policy, calibclust.serve.report, calibclust.serve.sort, calibclust.serve.resume,"
        " calibclust.serve.backends, calibclust.serve.bench, calibclust.serve.ray_engine, calibclust.contract\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **blocked_env})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_python_api_load_labels_a_folder_without_torch(blocked_env, tmp_path):
    """``calibclust.load`` (the Python API's torch-free half): probabilities of arrays of any size and
    of paths, and a whole folder through the label pipeline, in a process where torch cannot load."""
    import os

    folder = tmp_path / "images"
    write_good_images(folder, 12, seed=3)
    model = make_contract_model(tmp_path / "model.onnx")
    code = (
        "import sys, numpy as np, calibclust\n"
        f"labeller = calibclust.load({str(model)!r})\n"
        "images = np.zeros((3, 40, 24, 3), np.uint8); images[1] = 255\n"
        "probs = labeller.predict_proba(images)\n"
        "assert probs.shape == (3, labeller.num_clusters) and np.allclose(probs.sum(1), 1, atol=1e-5), probs\n"
        f"paths = sorted(p for p in __import__('pathlib').Path({str(folder)!r}).rglob('*.png'))\n"
        "assert labeller.predict_proba(paths).shape == (12, labeller.num_clusters)\n"
        f"result = labeller.label_folder({str(folder)!r}, out={str(tmp_path / 'out')!r}, target_accuracy=0.6)\n"
        "assert result.exit_code == 0 and result.summary['files'] == 12, result.summary\n"
        "try:\n"
        f"    labeller.label({str(folder)!r})\n"
        "except calibclust.InputError as exc:\n"
        "    assert 'label_folder' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('a folder string was iterated as file names')\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **blocked_env})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
