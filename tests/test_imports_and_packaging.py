"""Layering and packaging: the core, serve layer and CLI stay torch-free; the wheel ships every package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import calibclust

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "onnx", "tensorrt", "gradio")


def run_python(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, **kw)


def test_import_core_and_serve_leaves_torch_out():
    code = (
        "import sys, calibclust, calibclust.serve, calibclust.io, calibclust.metrics, calibclust.metadata, "
        "calibclust.io.predictions, calibclust.report, calibclust.evaluate, calibclust.datasets\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in %r)))" % (HEAVY,)
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"torch-free modules imported: {result.stdout.strip()}"


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output ('import time: self | cumulative | name')."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_cli_help_and_version_do_not_import_torch(flag):
    result = run_python("-X", "importtime", "-m", "calibclust", flag)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = _imported_modules(result.stderr)
    assert "calibclust.cli" in modules, "importtime output was parsed"
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"'calibclust {flag}' imported {heavy}"
    if flag == "--version":
        assert result.stdout.strip() == f"calibclust {calibclust.__version__}"
    else:
        assert "evaluate" in result.stdout, "subcommands from the entry-point group are listed"


def test_console_script_runs():
    script = Path(sys.executable).with_name("calibclust")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable} (install the package first)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and calibclust.__version__ in result.stdout


def test_evaluate_help_teaches_with_an_example():
    result = run_python("-m", "calibclust", "evaluate", "--help")
    assert result.returncode == 0, result.stderr
    assert "--truth" in result.stdout and "examples:" in result.stdout
    assert "calibclust evaluate " in result.stdout.split("examples:")[1]


def test_wheel_contains_export_and_serve(tmp_path):
    # Build from a copy so the build/ and *.egg-info directories never land in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("calibclust", "export", "serve"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp_path / "dist")],
        cwd=src, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheels = list((tmp_path / "dist").glob("calibclust-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for required in ("calibclust/__init__.py", "calibclust/export/__init__.py", "calibclust/serve/__init__.py",
                     "calibclust/io/images.py", "calibclust/evaluate.py", "calibclust/report.py"):
        assert required in names, f"{required} missing from {wheels[0].name}"
    assert not any(n.startswith(("export/", "serve/")) for n in names), "no top-level export/serve modules"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    # one console script; the subcommands are calibclust/cli.py's static table, not entry points
    assert "calibclust = calibclust.cli:main" in text and "calibclust.evaluate:register_cli" not in text


def test_errors_name_the_full_command():
    """`calibclust train cdc` errors say "calibclust train cdc:", not "calibclust train:"."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "calibclust", "train", "cdc", "/nonexistent-folder", "--clusters", "3",
                           "--out", "/nonexistent-folder/out"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("calibclust train cdc: error: "), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "calibclust", "bench", "zoo", "cifar"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("calibclust bench zoo: error: unknown zoo set"), proc.stderr


def test_no_extra_or_documented_install_mixes_cpu_and_gpu_onnxruntime():
    """onnxruntime and onnxruntime-gpu install the same module (one hides the other's CUDA provider):
    no extra, and no combination the README or the Dockerfile installs, may pull in both."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def requirements(names: set[str]) -> set[str]:
        found: set[str] = set()
        for name in names:
            for req in extras[name]:
                own = re.fullmatch(r"calibclust\[([^\]]+)\]", req)
                if own:
                    found |= requirements({n.strip() for n in own.group(1).split(",")})
                else:
                    found.add(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower())
        return found

    runtimes = {"onnxruntime", "onnxruntime-gpu"}
    for name in extras:
        assert len(requirements({name}) & runtimes) <= 1, f"extra [{name}] installs {requirements({name}) & runtimes}"
    documented = re.findall(r"calibclust\[([a-z0-9,\- ]+)\]", (root / "README.md").read_text()
                            + (root / "Dockerfile").read_text())
    assert any("serve-gpu" in d for d in documented) and any("serve" in d.split(",") for d in documented)
    for combo in documented:
        names = {n.strip() for n in combo.split(",")}
        assert names <= set(extras), f"README/Dockerfile name an extra that does not exist: [{combo}]"
        got = requirements(names) & runtimes
        assert len(got) == 1 or not ({"serve", "serve-gpu", "export", "export-gpu", "all"} & names), \
            f"calibclust[{combo}] installs {sorted(got) or 'no onnxruntime'}"
