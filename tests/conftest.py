"""Shared test options and markers.

* ``slow``    – skipped unless ``--runslow`` is given.
* ``gpu``     – skipped when torch is missing or ``torch.cuda.is_available()`` is false
                (torch is imported only if such a test was collected).
* ``browser`` – skipped when no ``chromium`` / ``chromium-browser`` binary is on PATH.

Every skip carries its reason, so ``pytest -ra`` shows what did not run and why.
"""

from __future__ import annotations

import shutil

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _cuda_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "needs torch with CUDA; torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU; torch.cuda.is_available() is False"
    return None


def pytest_collection_modifyitems(config, items):
    runslow = config.getoption("--runslow")
    cuda_reason: str | None = None
    cuda_checked = False
    chromium = chromium_binary()
    for item in items:
        if "slow" in item.keywords and not runslow:
            item.add_marker(pytest.mark.skip(reason="slow test; run with --runslow"))
        if "gpu" in item.keywords:
            if not cuda_checked:
                cuda_reason, cuda_checked = _cuda_skip_reason(), True
            if cuda_reason:
                item.add_marker(pytest.mark.skip(reason=cuda_reason))
        if "browser" in item.keywords and chromium is None:
            item.add_marker(pytest.mark.skip(
                reason="needs headless chromium ('chromium' or 'chromium-browser' on PATH; "
                       "Debian: apt-get install chromium)"
            ))


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """200 real sklearn digits as 32x32 PNGs in ImageFolder layout (20 per class)."""
    from calibclust.datasets import make_digits_folder

    return make_digits_folder(tmp_path_factory.mktemp("digits") / "digits", limit=200, seed=0)


@pytest.fixture(scope="session")
def quickstart_out(tmp_path_factory):
    """A finished ``calibclust quickstart`` output folder: CALIBCLUST_QUICKSTART_OUT when set (CI
    points it at the README quick start's output), else one ``--fast`` run per test session (about
    2 minutes on 2 idle cores with native bf16, 4.5 on one fp32 thread), shared by every test that
    needs it. On one torch thread, so the machine's core count does not change the model (its bf16
    support still does): the 30-epoch model's calibration checks depend on the numerics (measured on
    a CPU without bf16: with 2 threads CDC-Cal ACC 0.725 / ECE 0.077 against CDC-Clu's 0.075,
    --target-accuracy 0.90 realised 0.83; with 1 thread 0.855 / 0.059 against 0.075)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if os.environ.get("CALIBCLUST_QUICKSTART_OUT"):
        return Path(os.environ["CALIBCLUST_QUICKSTART_OUT"])
    out = tmp_path_factory.mktemp("quickstart") / "out"
    proc = subprocess.run([sys.executable, "-m", "calibclust", "quickstart", "--fast", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def digits_moco_backbone(quickstart_out):
    """A small backbone pretrained with MoCo-v2 on the quick start's training digits (fit's pretrain
    stage on the 80 % it does not hold out: 30 epochs with --fast, fit's budget in the full run): the
    paper's setting for frozen-feature tests."""
    path = quickstart_out / "pretrain"
    assert (path / "backbone.safetensors").is_file(), f"no pretrained backbone in {path}"
    return path


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a module of small-tensor tests (OpenMP barriers on a shared 2-core
    machine cost more than a second thread gains); the previous count is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
