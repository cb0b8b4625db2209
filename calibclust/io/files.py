"""Writing result files so that an interruption never leaves half of one (torch-free)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename: readers see the old file or
    the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_default(value: Any):
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths. Non-finite numpy floats that
    are not Python floats (float32, float16) become null; Python floats and float64 never reach a
    ``default`` and follow ``json.dumps``'s ``allow_nan``."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | os.PathLike, data: Any, allow_nan: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=json_default, allow_nan=allow_nan) + "\n")


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` point at ``src`` by a relative symbolic link (a copy where links fail, e.g. on
    some Windows or network file systems); an existing ``dst`` is left as it is, so a second pass
    over an interrupted tree only adds what is missing."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        return
    try:
        os.symlink(os.path.relpath(src, dst.parent), dst)
    except OSError:
        shutil.copyfile(src, dst)
