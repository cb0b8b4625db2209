"""The run journal that makes ``calibclust label`` resumable and loss-free.

A run writes its raw predictions as *parts* under ``OUT/.calibclust-label/parts/``:
``part-<start>-<end>.npz`` holds rows ``start .. end-1`` of the discovery order (paths, cluster,
confidence, ood score, error reason, optionally the probabilities). Each part is written to a
temporary name and renamed into place, so a part either exists whole or not at all, whatever
moment the process is killed (SIGINT or SIGKILL). Parts always hold whole batches, so a resumed
run re-creates exactly the batches an uninterrupted run would have made, and therefore the same
numbers.

``job.json`` beside the parts holds the run's fingerprint (model file hash and every option that
changes the table); ``--resume`` with a different fingerprint is refused. The final outputs are
assembled from the parts only when every file has been predicted, then the journal is removed.

Parts are fsync'ed before their commit rename, so neither a killed process nor a power loss leaves
a committed part name over torn bytes; at worst the last part is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from calibclust.errors import CalibclustError
from calibclust.io.files import atomic_write_text

JOURNAL_DIR = ".calibclust-label"
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.npz$")
COLUMNS = ("path", "cluster", "confidence", "ood_score", "error")


class ResumeError(CalibclustError):
    exit_code = 2


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


class RunLock:
    """One ``label`` run per output folder: an exclusive ``flock`` on the folder itself, held for the
    run and released by the OS even if the process is killed. Nothing is created for it, so nothing
    is left behind or unlinked (a lock *file* that is unlinked at the end lets two later runs lock
    two different inodes). Where locks are unavailable (Windows, some network file systems, a
    folder that cannot be opened) the run goes on without one, with a warning."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self._fd = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:
            return self
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.out_dir, os.O_RDONLY)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise ResumeError(
                f"{self.out_dir} is in use by another 'calibclust label' run; wait for it or choose another --out"
            ) from None
        except OSError as exc:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            print(f"calibclust label: warning: cannot lock {self.out_dir} ({exc.strerror or exc}); "
                  f"make sure no other run writes there", file=sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


class Journal:
    def __init__(self, out_dir: str | os.PathLike):
        self.root = Path(out_dir) / JOURNAL_DIR
        self.parts_dir = self.root / "parts"
        self.job_file = self.root / "job.json"

    def exists(self) -> bool:
        return self.job_file.is_file()

    def create(self, fingerprint: dict[str, Any]) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        self.parts_dir.mkdir(parents=True)
        atomic_write_text(self.job_file, json.dumps({"fingerprint": fingerprint}, indent=2, sort_keys=True))

    def fingerprint(self) -> dict[str, Any]:
        try:
            return json.loads(self.job_file.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError) as exc:
            raise ResumeError(f"{self.job_file} is unreadable ({exc}); start over with --overwrite") from None

    def check_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        """Refuse to resume with another model or options that change the table."""
        old = self.fingerprint()
        keys = sorted(set(old) | set(fingerprint))
        diff = [k for k in keys if old.get(k) != fingerprint.get(k)]
        if diff:
            details = "; ".join(f"{k}: was {old.get(k)!r}, now {fingerprint.get(k)!r}" for k in diff)
            raise ResumeError(
                f"cannot resume: the interrupted run in {self.root.parent} used a different model or "
                f"options ({details}). Rerun with the original options, or start over with --overwrite."
            )

    def parts(self) -> list[tuple[int, int, Path]]:
        """Complete parts, contiguous from row 0. Leftover temporary files are removed."""
        found = []
        for entry in os.scandir(self.parts_dir):
            m = _PART.match(entry.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), Path(entry.path)))
            elif entry.name.startswith("."):
                os.unlink(entry.path)  # a part that was being written when the process died
        found.sort()
        contiguous, expected = [], 0
        for start, end, path in found:
            if start != expected:  # cannot happen with in-order commits; never trust a gap
                for _, _, later in found[len(contiguous):]:
                    later.unlink()
                break
            contiguous.append((start, end, path))
            expected = end
        return contiguous

    def rows_done(self) -> int:
        parts = self.parts()
        return parts[-1][1] if parts else 0

    def write_part(self, start: int, columns: dict[str, np.ndarray]) -> Path:
        n = len(columns["path"])
        path = self.parts_dir / f"part-{start:012d}-{start + n:012d}.npz"
        tmp = self.parts_dir / f".{path.name}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **columns)
            fh.flush()
            os.fsync(fh.fileno())  # a power loss must not leave a committed name over torn bytes
        os.replace(tmp, path)
        return path

    def iter_parts(self, columns: tuple[str, ...] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Parts in row order; ``columns`` limits what is read (npz members load lazily)."""
        for _, _, path in self.parts():
            with np.load(path, allow_pickle=False) as data:
                yield {k: data[k] for k in data.files if columns is None or k in columns}

    def iter_paths(self) -> Iterator[str]:
        for _, _, path in self.parts():
            with np.load(path, allow_pickle=False) as data:
                yield from data["path"].tolist()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class PartBuffer:
    """Collects finished batches (in order) and commits them as one part every ``max_rows`` rows or
    ``max_seconds`` seconds, whichever comes first, bounding the work a SIGKILL can lose."""

    def __init__(self, journal: Journal, start: int, max_rows: int = 4096, max_seconds: float = 5.0):
        import time

        self._time = time.monotonic
        self.journal = journal
        self.start = start
        self.max_rows, self.max_seconds = max_rows, max_seconds
        self._chunks: list[dict[str, np.ndarray]] = []
        self._rows = 0
        self._since = self._time()

    def add(self, columns: dict[str, np.ndarray]) -> None:
        self._chunks.append(columns)
        self._rows += len(columns["path"])
        if self._rows >= self.max_rows or self._time() - self._since >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._chunks:
            return
        merged = {k: np.concatenate([c[k] for c in self._chunks]) for k in self._chunks[0]}
        self.journal.write_part(self.start, merged)
        self.start += self._rows
        self._chunks, self._rows, self._since = [], 0, self._time()
