"""What the demo accepts from a visitor: each upload's size limit, and a batch request's uploads
(loose images and zips) turned into files to label, within its budgets.

Uploads are hostile input on an exposed server, so every limit is counted from what is really
there, before anything is decoded: an upload's size on disk (:func:`check_upload`), a zip member's
real bytes as it is extracted (headers can lie; :func:`_copy_limited`), the request's pixels summed
from image headers (a small zip can hold huge images; :func:`_count_pixels`), and the number of
images (:data:`MAX_BATCH_FILES`). A zip member's own name is only displayed, never used as a path.
A spent budget is a :class:`~calibclust.serve.demo_config.DemoError`, shown in the page.

:class:`~calibclust.serve.demo_session.DemoSession` calls these with its config. Module level
imports only the standard library; Pillow and the image extensions are imported on use.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from calibclust.serve.demo_config import DemoError

if TYPE_CHECKING:
    from calibclust.serve.demo_config import DemoConfig

MAX_BATCH_FILES = 2_000  # images per batch request (loose files plus zip members)
ZIP_EXPANSION = 4  # a zip may unpack to at most this many times the upload limit


def check_upload(config: DemoConfig, path: str | os.PathLike) -> None:
    """A DemoError when the file at ``path`` is over the upload limit."""
    size = os.path.getsize(path)
    if size > config.max_upload_bytes:
        raise DemoError(
            f"{Path(path).name} is {size / 2**20:.1f} MB; the limit is {config.max_upload_mb:g} MB"
        )


def gather_batch(config: DemoConfig, files: Sequence[str | os.PathLike],
                 dest: Path) -> tuple[list[str], list[str], list[str]]:
    """Turn uploads (images, other files, zips) into (paths to label, display names, notes).

    Zip members are written under ``dest`` with generated names (a member's own name is only
    displayed, never used as a path: no zip-slip), within the member-count and size budget.
    """
    from calibclust.io.images import IMAGE_EXTENSIONS

    paths, shown, notes = [], [], []
    budget = config.max_upload_bytes * ZIP_EXPANSION
    pixels = 0  # decoding cost of the request, from image headers: a small zip can hold huge images
    for f in files:
        f = Path(f)
        try:
            check_upload(config, f)
        except DemoError as exc:
            notes.append(str(exc))
            continue
        if not zipfile.is_zipfile(f):
            if len(paths) >= MAX_BATCH_FILES:
                raise DemoError(f"more than {MAX_BATCH_FILES} images in one batch; use 'calibclust label' for folders")
            pixels = _count_pixels(config, f, f.name, pixels)
            paths.append(str(f))
            shown.append(f.name)
            continue
        try:
            with zipfile.ZipFile(f) as zf:
                skipped = 0
                for info in zf.infolist():
                    inner = info.filename
                    base = inner.rstrip("/").rsplit("/", 1)[-1]
                    if info.is_dir() or base.startswith(".") or "__MACOSX" in inner.split("/"):
                        continue
                    ext = os.path.splitext(base)[1].lower()
                    if ext not in IMAGE_EXTENSIONS:
                        skipped += 1
                        continue
                    if len(paths) >= MAX_BATCH_FILES:
                        raise DemoError(f"more than {MAX_BATCH_FILES} images in one batch; use 'calibclust label' for folders")
                    target = dest / f"z{len(paths):05d}{ext}"
                    budget -= _copy_limited(zf, info, target, budget)
                    pixels = _count_pixels(config, target, f"{f.name}/{inner}", pixels)
                    paths.append(str(target))
                    shown.append(f"{f.name}/{inner}")
                if skipped:
                    notes.append(f"{f.name}: skipped {skipped} member(s) that are not images by their extension")
        except zipfile.BadZipFile as exc:
            notes.append(f"{f.name}: not a readable zip ({exc})")
    return paths, shown, notes


def _count_pixels(config: DemoConfig, path: Path, shown: str, total: int) -> int:
    """Add one image's pixel count, read from its header (no decoding), to the request's total;
    a DemoError once the request's budget is spent. Unreadable headers count 0 (they fail later)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception:
        return total
    total += width * height
    if total > config.max_batch_pixels:
        raise DemoError(f"this batch holds more than {config.max_batch_pixels:,} pixels (at {shown}); "
                        f"send fewer or smaller images, or use 'calibclust label' for folders")
    return total


def _copy_limited(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Extract one member to ``target`` counting real bytes (headers can lie): stop at ``budget``."""
    written = 0
    with zf.open(info) as src, open(target, "wb") as dst:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            written += len(chunk)
            if written > budget:
                raise DemoError(f"the zip unpacks to more than {ZIP_EXPANSION}× the upload limit; "
                                "use 'calibclust label' on a folder for large batches")
            dst.write(chunk)
    return written
