"""A folder's images decoded once, at the input size, into one uint8 file on disk, read by index.

Training from memory holds N·H·W·3 bytes (100,000 images at 224 px: 15 GB). With the cache the
process holds only what a step reads: rows are written and read with ``os.pwrite`` / ``os.pread``
(not a memory map: pages a process maps count in its resident size until the kernel drops them,
while the page cache reads go through does not count), so the images add nothing to the resident
memory of training however many there are (``calibclust bench data`` measures it).

Layout of a cache directory::

    images-<digest>.u8  N rows of H·W·3 bytes (row i = the i-th listed file; unreadable files stay zero)
    cache.json          format, size, resize policy, the digest of the listing (relative paths, sizes
                        and mtimes: a changed folder builds a new file), rows decoded so far,
                        unreadable files (relative paths)
    .lock               held while a process builds (a second builder waits)

Building is resumable: ``cache.json`` records after every chunk how many rows are written (after
they are on disk), so an interrupted build continues where it stopped. A rebuild writes a new file
and removes the old one, so a view of the old cache fails loudly instead of reading other pixels.
Torch-free (numpy and the one decoder).
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

CACHE_FORMAT = "calibclust-image-cache/2"  # /2: file named by digest, unreadable files by relative path
INDEX_FILE, LOCK_FILE = "cache.json", ".lock"
MAX_IO_BYTES = 1 << 28  # one read/write call moves at most this (Linux caps a call at ~2 GiB)


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
        self.pixels_digest: str | None = None  # set by calibclust.train.features.images_digest

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
        return CachedImages(self.path, self.height, self.width, self.rows[_index(index)])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            return self._read(self.rows[[int(key)]])[0]
        if isinstance(key, slice):
            return self._read(self.rows[key])
        if isinstance(key, tuple) or np.ndim(key) == 0:
            raise TypeError("CachedImages takes one index (an int, a slice or an index array)")
        return self._read(self.rows[_index(key)])

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
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise InputError(f"{self.path} is gone: the cache was rebuilt or deleted since these images were "
                             "listed; read the folder again") from None
        try:
            # One read per run of consecutive rows (a slice is one read); a repeated row is read once
            # per occurrence (a run only ever steps by one).
            breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
            for run in np.split(np.arange(len(wanted)), breaks):
                flat[order[run]] = self._pread(fd, int(wanted[run[0]]), len(run))
        finally:
            os.close(fd)
        return out

    def _pread(self, fd: int, first: int, count: int) -> np.ndarray:
        size, offset = count * self._row_bytes, first * self._row_bytes
        block = bytearray(size)
        view, done = memoryview(block), 0
        while done < size:
            got = os.preadv(fd, [view[done : done + MAX_IO_BYTES]], offset + done)
            if got <= 0:
                raise InputError(f"{self.path} is shorter than its index says (a damaged cache; delete it to rebuild)")
            done += got
        return np.frombuffer(block, np.uint8).reshape(count, self._row_bytes)


def _index(key) -> np.ndarray:
    """An index array for numpy indexing; an empty list selects nothing (not a float array)."""
    key = np.asarray(key)
    return key.astype(np.int64) if key.size == 0 else key


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(data):  # a write may be short (a full disk: then it raises, never loops forever)
        done += os.pwrite(fd, view[done : done + MAX_IO_BYTES], offset + done)


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
    h = hashlib.sha256(f"{CACHE_FORMAT}|{list(size)}|{resize}".encode())
    for path in listing.paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise InputError(f"{path} disappeared while the folder was being read; run again") from None
        h.update(f"{path.relative_to(listing.root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build_image_cache(folder: str | os.PathLike, directory: str | os.PathLike, size: int | tuple[int, int],
                      resize: str = "squash", progress: bool = True, chunk: int = 512) -> CachedFolder:
    """Decode ``folder`` into the cache in ``directory`` (built once, reused while the folder's
    files, the size and the resize policy are unchanged; an interrupted build resumes; a second
    process building the same cache waits for the first)."""
    import fcntl

    from calibclust.io.images import list_image_folder

    try:
        listing = list_image_folder(folder)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    height, width = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        state, reused = _build_locked(listing, directory, (height, width), resize, progress, chunk)
    relative = listing.relative_paths()
    bad = {path for path, _ in state["unreadable"]}
    keep = np.array([i for i, p in enumerate(relative) if p not in bad], dtype=np.int64)
    if not len(keep):
        raise InputError(f"none of the {len(relative)} images under {folder} could be read")
    return CachedFolder(
        images=CachedImages(directory / state["file"], height, width, keep),
        paths=[relative[i] for i in keep],
        labels=listing.labels[keep] if listing.has_labels else None,
        class_names=list(listing.class_names),
        unreadable=[(str(listing.root / p), reason) for p, reason in state["unreadable"]],
        reused=reused,
    )


def _build_locked(listing, directory: Path, size: tuple[int, int], resize: str, progress: bool,
                  chunk: int) -> tuple[dict, bool]:
    from calibclust.io.images import iter_decoded_chunks

    index_path = directory / INDEX_FILE
    digest = _listing_digest(listing, size, resize)
    n, row_bytes = len(listing.paths), size[0] * size[1] * 3
    try:
        state = json.loads(index_path.read_text()) if index_path.is_file() else {}
    except (OSError, ValueError):  # a damaged index: build again
        state = {}
    data_path = directory / str(state.get("file", ""))
    if (state.get("format") != CACHE_FORMAT or state.get("digest") != digest or not data_path.is_file()
            or data_path.stat().st_size != n * row_bytes):
        # The index is replaced before any data is written, so it never describes rows it has not seen.
        state = {"format": CACHE_FORMAT, "digest": digest, "file": f"images-{digest[:16]}.u8",
                 "folder": str(Path(listing.root).resolve()), "n": n, "size": list(size), "resize": resize,
                 "rows_done": 0, "unreadable": []}
        write_json_atomic(index_path, state)
        for old in directory.glob("images*.u8"):  # views of an older cache fail loudly, never read other pixels
            old.unlink()
        data_path = directory / state["file"]
        with open(data_path, "wb") as f:  # a sparse file of the final size: rows are written in place
            f.truncate(n * row_bytes)
    reused = state["rows_done"] == n
    if reused:
        return state, True
    from tqdm.auto import tqdm

    relative = listing.relative_paths()
    bar = tqdm(total=n, initial=state["rows_done"], desc="decoding images into the cache", unit="img",
               disable=not progress)
    fd = os.open(data_path, os.O_WRONLY)
    try:
        for start, part, batch, failed in iter_decoded_chunks(listing.paths, size, resize=resize, start=state["rows_done"],
                                                             chunk=chunk):
            ok = [i for i in range(len(part)) if i not in failed]
            rows = np.zeros((len(part), row_bytes), np.uint8)  # unreadable files: black rows, never read
            rows[ok] = batch.reshape(len(ok), row_bytes)
            _write_all(fd, rows.tobytes(), start * row_bytes)
            os.fsync(fd)  # the rows are on disk before the index says so
            state["unreadable"] += [[relative[start + i], reason] for i, reason in failed.items()]
            state["rows_done"] = start + len(part)
            write_json_atomic(index_path, state)
            bar.update(len(part))
    finally:
        os.close(fd)
        bar.close()
    return state, False
