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
