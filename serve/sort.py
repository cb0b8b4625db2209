"""``--sort-into DIR``: a browsable view of a labelled folder, never touching a user's file.

Layout: ``DIR/<cluster name>/`` for accepted images, ``DIR/_rejected/``, ``DIR/_ood/`` and
``DIR/_errors/``; inside each, the image keeps its path relative to the labelled folder (so two
``0001.png`` from different sub-folders never collide). Entries are symlinks to the originals
(absolute targets) or, with ``copy=True``, copies.

Nothing is ever overwritten: an entry is created with an operation that fails if the name exists
(``os.symlink`` / ``os.link`` of a finished temporary copy). An existing entry that is already the
same link (or an identical copy, e.g. from an interrupted run being resumed) is accepted as done;
anything else at that name is left alone and counted as a conflict.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

SPECIAL = {"rejected": "_rejected", "ood": "_ood", "error": "_errors"}


def safe_dir_name(name: str) -> str:
    """A cluster name as one directory name: no separators, not hidden, not '.'/'..'."""
    cleaned = re.sub(r"[/\\\x00]", "_", name).strip()
    cleaned = cleaned.lstrip(".") or "_"
    if cleaned.startswith("_") and cleaned in SPECIAL.values():
        cleaned = "cluster" + cleaned  # a cluster literally named "_ood" must not merge with the flags
    return cleaned


def check_destination(dest: str | os.PathLike, source_root: str | os.PathLike) -> None:
    """Refuse a sort folder inside the labelled folder (its links would be labelled next time);
    checked before any inference."""
    dest, root = Path(dest).resolve(), Path(source_root).resolve()
    if dest == root or root in dest.parents:
        from calibclust.errors import InputError

        raise InputError(f"--sort-into {dest} is inside the labelled folder; choose a folder outside it")


def bucket_names(cluster_names: Sequence[str]) -> list[str]:
    """One folder name per cluster, unique even where names differ only in characters a folder name
    cannot hold or in case (``a/b`` and ``a_b``, ``A`` and ``a``, ``_ood`` and ``cluster_ood``): the
    first keeps the plain name, a later one gets ``_<cluster id>`` appended."""
    taken = {name.casefold() for name in SPECIAL.values()}
    buckets = []
    for c, name in enumerate(cluster_names):
        base = candidate = safe_dir_name(name)
        suffix = 0
        while candidate.casefold() in taken:
            suffix += 1
            candidate = f"{base}_{c}" if suffix == 1 else f"{base}_{c}_{suffix}"
        taken.add(candidate.casefold())
        buckets.append(candidate)
    return buckets


class FolderSorter:
    def __init__(self, dest: str | os.PathLike, source_root: str | os.PathLike, cluster_names: Sequence[str],
                 copy: bool = False):
        check_destination(dest, source_root)
        self.dest = Path(dest)
        self.source_root = Path(source_root).resolve()
        self.copy = copy
        self.buckets = bucket_names(cluster_names)
        self.renamed = {name: bucket for name, bucket in zip(cluster_names, self.buckets) if bucket != safe_dir_name(name)}
        self.created = self.existing = 0
        self.conflicts: list[str] = []

    def add(self, rel_paths: Iterable[str], decisions: Iterable[str], clusters: Iterable[int]) -> None:
        for rel, decision, cluster in zip(rel_paths, decisions, clusters):
            bucket = SPECIAL.get(decision) or self.buckets[int(cluster)]
            self._place(self.source_root / rel, self.dest / bucket / rel)

    def _place(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.copy:
                tmp = dst.with_name(f".{dst.name}.calibclust-tmp-{os.getpid()}")
                shutil.copy2(src, tmp)
                try:
                    os.link(tmp, dst)  # fails if dst exists: no overwrite, even in a race
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                os.symlink(src, dst)
            self.created += 1
        except FileExistsError:
            if self._same(src, dst):
                self.existing += 1
            else:
                self.conflicts.append(str(dst))
        except OSError as exc:  # e.g. source vanished, no permission: report, don't stop the run
            self.conflicts.append(f"{dst} ({exc.strerror or exc})")

    def _same(self, src: Path, dst: Path) -> bool:
        if dst.is_symlink():
            return not self.copy and Path(os.readlink(dst)) == src
        return self.copy and dst.is_file() and filecmp.cmp(src, dst, shallow=False)

    def summary(self) -> dict:
        return {
            "dir": str(self.dest.resolve()),
            "mode": "copy" if self.copy else "symlink",
            "created": self.created,
            "already_present": self.existing,
            "conflicts_left_untouched": len(self.conflicts),
            "conflicts_first_20": self.conflicts[:20],
            "cluster_folders": self.buckets,
        }
