"""A folder's images decoded once, at the input size, into one uint8 file on disk, read by index.

Training from memory holds N·H·W·3 bytes (100,000 images at 224 px: 15 GB). With the cache the
process holds only what a step reads: rows are written and read with ``os.pwrite`` / ``os.pread``
(not a memory map: pages a process maps count in its resident size until the kernel drops them,
while the page cache reads go through does not count), so the resident memory of training does not
grow with the number of images.

Layout of a cache directory::

    images.u8    N rows of H·W·3 bytes (row i = the i-th listed file; unreadable files stay zero)
    cache.json   format, size, resize policy, the listing (relative paths, sizes and mtimes: a
                 changed folder builds a new cache), rows decoded so far, unreadable files

Building is resumable: ``cache.json`` records after every chunk how many rows are written, so an
interrupted build continues where it stopped. Torch-free (numpy and the one decoder).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibclust.errors import InputError
from calibclust.io.files import write_json_atomic

CACHE_FORMAT = "calibclust-image-cache/1"
IMAGES_FILE, INDEX_FILE = "images.u8", "cache.json"


class CachedImages:
    """Rows of an image cache as a read-only uint8 ``(N, H, W, 3)`` array-like.

    Indexing reads from disk and returns numpy arrays, with numpy's meaning: ``x[i]`` one image,
    ``x[a:b]``, ``x[int_array]`` (any order, repeats allowed) and ``x[bool_mask]`` a batch.
    :meth:`subset` is a view on other rows that reads nothing; ``np.asarray(x)`` reads every row
    (only for small sets)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: str | os.PathLike, height: int, width: int, rows: np.ndarray):
        self.path = Path(path)
        self.height, self.width = int(height), int(width)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._row_bytes = self.height * self.width * 3

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.height, self.width, 3)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self._row_bytes

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"CachedImages({str(self.path)!r}, shape={self.shape})"

    def subset(self, index) -> "CachedImages":
        """The rows ``index`` (ints or a boolean mask) as another view; nothing is read."""
        return CachedImages(self.path, self.height, self.width, self.rows[np.asarray(index)])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self.rows[[int(key)]])[0]
        if isinstance(key, slice):
            return self._read(self.rows[key])
        if isinstance(key, tuple):
            raise TypeError("CachedImages takes one index (an int, a slice or an index array), not a tuple")
        return self._read(self.rows[np.asarray(key)])

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _read(self, file_rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(file_rows), self.height, self.width, 3), np.uint8)
        if not len(file_rows):
            return out
        order = np.argsort(file_rows, kind="stable")
        wanted = file_rows[order]
        flat = out.reshape(len(file_rows), -1)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            # One read per run of consecutive rows (a slice is one read).
            breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
            for run in np.split(np.arange(len(wanted)), breaks):
                first, count = int(wanted[run[0]]), len(run)
                if count > 1 and wanted[run[-1]] - first != count - 1:  # repeats: read one by one
                    for j in run:
                        flat[order[j]] = self._pread(fd, int(wanted[j]), 1)[0]
                    continue
                block = self._pread(fd, first, count)
                flat[order[run]] = block
        finally:
            os.close(fd)
        return out

    def _pread(self, fd: int, first: int, count: int) -> np.ndarray:
        size = count * self._row_bytes
        data = os.pread(fd, size, first * self._row_bytes)
        if len(data) != size:
            raise InputError(f"{self.path} is shorter than its index says (a damaged cache; delete it to rebuild)")
        return np.frombuffer(data, np.uint8).reshape(count, self._row_bytes)


@dataclass
class CachedFolder:
    """What :func:`build_image_cache` returns: the readable images and what describes them."""

    images: CachedImages
    paths: list[str]  # relative paths of the readable files, one per row of ``images``
    labels: np.ndarray | None  # class sub-folder index per row (reporting only), or None
    class_names: list[str]
    unreadable: list[tuple[str, str]]  # (path, reason)
    reused: bool  # True when a finished cache was found and nothing was decoded


def _listing_digest(listing, size: tuple[int, int], resize: str) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}|{size}|{resize}".encode())
    for path in listing.paths:
        st = path.stat()
        h.update(f"{path.relative_to(listing.root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build_image_cache(folder: str | os.PathLike, directory: str | os.PathLike, size: int | tuple[int, int],
                      resize: str = "squash", progress: bool = True, chunk: int = 512) -> CachedFolder:
    """Decode ``folder`` into the cache in ``directory`` (built once, reused while the folder's
    files, the size and the resize policy are unchanged; an interrupted build resumes)."""
    from calibclust.io.images import list_image_folder, load_images

    try:
        listing = list_image_folder(folder)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    height, width = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index_path, images_path = directory / INDEX_FILE, directory / IMAGES_FILE
    digest = _listing_digest(listing, (height, width), resize)
    n, row_bytes = len(listing.paths), height * width * 3
    state = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if (state.get("format") != CACHE_FORMAT or state.get("digest") != digest or not images_path.is_file()
            or images_path.stat().st_size != n * row_bytes):
        state = {"format": CACHE_FORMAT, "digest": digest, "folder": str(Path(folder).resolve()), "n": n,
                 "size": [height, width], "resize": resize, "rows_done": 0, "unreadable": []}
        with open(images_path, "wb") as f:  # a sparse file of the final size: rows are written in place
            f.truncate(n * row_bytes)
        write_json_atomic(index_path, state)
    reused = state["rows_done"] == n
    if not reused:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=state["rows_done"], desc="decoding images into the cache", unit="img",
                   disable=not progress)
        fd = os.open(images_path, os.O_WRONLY)
        try:
            for start in range(state["rows_done"], n, chunk):
                part = listing.paths[start : start + chunk]
                batch, errors = load_images(part, (height, width), resize=resize)
                bad = {e.path for e in errors}
                ok = [i for i, p in enumerate(part) if str(p) not in bad]
                rows = np.zeros((len(part), row_bytes), np.uint8)
                rows[ok] = batch.reshape(len(ok), row_bytes)
                os.pwrite(fd, rows.tobytes(), start * row_bytes)
                os.fsync(fd)  # the rows are on disk before the index says so
                state["unreadable"] += [[e.path, e.reason] for e in errors]
                state["rows_done"] = start + len(part)
                write_json_atomic(index_path, state)
                bar.update(len(part))
        finally:
            os.close(fd)
            bar.close()
    bad = {path for path, _ in state["unreadable"]}
    keep = np.array([i for i, p in enumerate(listing.paths) if str(p) not in bad], dtype=np.int64)
    if not len(keep):
        raise InputError(f"none of the {n} images under {folder} could be read")
    relative = listing.relative_paths()
    return CachedFolder(
        images=CachedImages(images_path, height, width, keep),
        paths=[relative[i] for i in keep],
        labels=listing.labels[keep] if listing.has_labels else None,
        class_names=list(listing.class_names),
        unreadable=[(p, r) for p, r in state["unreadable"]],
        reused=reused,
    )
