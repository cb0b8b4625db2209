"""``--tensorboard DIR``: a training command's per-epoch records as TensorBoard scalars.

Every trainer already keeps one record per epoch (or per step) for its log and ``training.html``;
:class:`ScalarWriter` writes the numbers in those records as they are made, so ``tensorboard
--logdir DIR`` follows a run live. Nested keys become TensorBoard tags (``heads/calibration/acc``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from calibclust.errors import InputError

INSTALL_HINT = 'pip install "calibclust[tensorboard]" (or pip install tensorboard)'


def add_tensorboard_arg(group) -> None:
    group.add_argument("--tensorboard", metavar="DIR",
                       help="also write the training curves as TensorBoard event files to DIR (view them with "
                            f"'tensorboard --logdir DIR'; needs {INSTALL_HINT})")


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) record, keyed by ``/``-joined names; lists are indexed."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value) if math.isfinite(v)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}") from None
    return SummaryWriter


def require_tensorboard(logdir: str | None) -> None:
    """Before the heavy work: with ``--tensorboard``, say now if the package is missing."""
    if logdir:
        _summary_writer_class()


class ScalarWriter:
    """Writes records to TensorBoard event files under ``logdir`` (created)."""

    def __init__(self, logdir: str):
        self._writer = _summary_writer_class()(log_dir=str(logdir))

    def write(self, record: Mapping[str, Any], step_key: str = "epoch", prefix: str = "") -> None:
        step = int(record[step_key])
        for tag, value in scalars({k: v for k, v in record.items() if k != step_key}).items():
            self._writer.add_scalar(prefix + tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_writer(logdir: str | None) -> ScalarWriter | None:
    """A writer for ``--tensorboard DIR``, or None without it (close it when the run ends)."""
    return ScalarWriter(logdir) if logdir else None
