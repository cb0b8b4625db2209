"""Image discovery and decoding: the one decoder every layer uses.

Design choices (documented because training, export calibration and serving must agree):

* **Order** – files are yielded depth-first with each directory's entries sorted by name, so the
  same folder always gives the same order without listing it all first (streams millions of files).
* **Hidden** – names starting with ``.`` (files and directories) are skipped.
* **Colour** – every Pillow mode becomes 8-bit RGB. Transparent images (RGBA, LA, P with a
  transparency key) are alpha-composited onto a white background; 16-bit/32-bit integer and float
  greyscale are rescaled to 0–255 rather than clipped; CMYK goes through Pillow's conversion.
* **Orientation** – the EXIF orientation tag is applied before anything else.
* **Resize** – to the model's H×W with Pillow's bilinear filter, which antialiases when shrinking,
  by the policy the model metadata names (:data:`RESIZE_POLICIES`): ``squash`` (the whole image,
  aspect ratio not kept; the default and what models before the policy used), ``center-crop`` or
  ``letterbox``. JPEGs are first decoded at a reduced
  scale (``Image.draft``) when much larger than the target, which is what makes 224-px serving fast.
* **Fast JPEG path** – when the optional ``simplejpeg`` (libjpeg-turbo) is installed, plain YCbCr
  JPEGs of at least 16 px without an APP1 segment (EXIF/XMP, which may carry an orientation) are
  decoded by it instead of Pillow: the same library underneath and the same
  DCT-domain scale as ``Image.draft``, so the pixels are identical (tests/test_images.py), at about a
  quarter of the cost on small files (Pillow parses JPEG headers in Python). Anything else, and any
  file it cannot decode, takes the Pillow path, which names the error.
* **Failures** – a file that is not an image, is truncated, or exceeds the pixel limit raises
  :class:`ImageDecodeError` carrying the path and a short reason; batch helpers turn it into a
  per-file error record so a run never ends on one bad file.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from calibclust.metadata import RESIZE_POLICIES

try:  # optional accelerator (extra "serve"); see "Fast JPEG path" above
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Same order of magnitude as Pillow's own guard (~89 Mpx); a 10k x 10k photo is 100 Mpx.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 512 << 20  # a file is checked against this before a byte of it is read
BACKGROUND_RGB = (255, 255, 255)

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]


class ImageDecodeError(Exception):
    """One file could not be turned into an RGB array. ``reason`` is short and user-readable."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


class SkippedPathWarning(UserWarning):
    """discover_images passed over a path (not a regular file, a folder it cannot list, a loop)."""


def _not_regular(path: str) -> str:
    """Why an image-named entry that is not a regular file is not read."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"broken symbolic link ({exc.strerror or exc})" if os.path.islink(path) else f"cannot stat ({exc})"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a file: reading it could block forever"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file (e.g. a link to /dev/zero)"
    return "not a regular file"


def iter_image_files(
    root: str | os.PathLike,
    recursive: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    on_skip=None,
    ordered: bool = True,
) -> Iterator[str]:
    """Paths (``str``) of the regular image files under ``root``: each once, in a deterministic order
    (``ordered``: entries sorted by name, folder by folder).

    Files are matched by extension (case-insensitive); hidden files and folders are skipped.
    Symlinked folders are followed once each (by device and inode), so a link back up the tree is
    a loop reported once, not an endless walk. FIFOs, sockets, devices and broken links with an
    image name are not opened (a FIFO would block the reader forever), and a folder that cannot be
    listed (no permission, vanished mid-run) is passed over: each is reported as
    ``on_skip(path, reason)`` (default: a :class:`SkippedPathWarning`), never raised.
    """
    exts = {e.lower() for e in extensions}
    if on_skip is None:
        def on_skip(path, reason):
            warnings.warn(f"skipped {path}: {reason}", SkippedPathWarning, stacklevel=3)
    visited: set[tuple[int, int]] = set()

    # Depth first with an explicit stack (a folder's files, then its sub-folders in name order):
    # recursion would end in RecursionError on a tree ~1,000 folders deep.
    stack = [os.fspath(root)]
    while stack:
        directory = stack.pop()
        try:
            info = os.stat(directory)
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError as exc:
            on_skip(directory, f"cannot list this folder ({exc.strerror or exc})")
            continue
        key = (info.st_dev, info.st_ino)
        if key in visited:
            on_skip(directory, "folder already walked (a symbolic link loop, or a second link to it)")
            continue
        visited.add(key)
        if ordered:
            entries.sort(key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    subdirs.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in exts:
                    if entry.is_file(follow_symlinks=True):
                        yield entry.path
                    else:
                        on_skip(entry.path, _not_regular(entry.path))
            except OSError as exc:  # e.g. a link loop on the entry itself
                on_skip(entry.path, f"cannot stat ({exc.strerror or exc})")
        if recursive:
            stack.extend(reversed(subdirs))


def discover_images(
    root: str | os.PathLike, recursive: bool = True, extensions: Iterable[str] = IMAGE_EXTENSIONS, on_skip=None
) -> Iterator[Path]:
    """Yield image files under ``root`` in a deterministic order, streaming (:func:`iter_image_files`
    as ``Path`` objects)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    for path in iter_image_files(root, recursive, extensions, on_skip):
        yield Path(path)


@dataclass(frozen=True)
class ImageFolderListing:
    """Images of a folder, with labels when it has the ImageFolder layout ``root/<class>/<file>``."""

    root: Path
    paths: list[Path]
    labels: np.ndarray | None  # int64 (N,), index into class_names; None for an unlabeled folder
    class_names: list[str]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def relative_paths(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.paths]


def list_image_folder(root: str | os.PathLike) -> ImageFolderListing:
    """List a training folder. It is labeled when ``root`` holds no images itself, only class
    sub-folders (torchvision's ImageFolder convention); labels are used for reporting only."""
    root = Path(root)
    paths = list(discover_images(root))
    if not paths:
        raise FileNotFoundError(f"no images found under {root}")
    top_level_images = [p for p in paths if p.parent == root]
    if top_level_images:
        return ImageFolderListing(root, paths, None, [])
    class_names = sorted({p.relative_to(root).parts[0] for p in paths})
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[p.relative_to(root).parts[0]] for p in paths], dtype=np.int64)
    return ImageFolderListing(root, paths, labels, class_names)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # Palette images may carry transparency in info; RGBA keeps it for compositing.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and (arr.max() > 255 or arr.min() < 0):
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        elif mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _open(source: ImageSource) -> tuple[Image.Image, str]:
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source)), "<bytes>"
    if hasattr(source, "read"):
        return Image.open(source), getattr(source, "name", "<stream>")
    return Image.open(os.fspath(source)), os.fspath(source)


def _draft_scale(width: int, height: int, size: tuple[int, int]) -> int:
    """The DCT scale denominator Pillow's ``JpegImageFile.draft`` picks for a (H, W) target."""
    ratio = min(width // size[1], height // size[0])
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def _has_app1_segment(data: bytes) -> bool:
    """True when the JPEG header holds an APP1 segment (EXIF or XMP: either may carry the orientation
    Pillow's path applies) before the image data, or cannot be walked; then Pillow decodes it."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return True  # not a marker where one must be: let Pillow judge the file
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return False
        if marker == 0xE1:
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return True


def _decode_jpeg_fast(
    source: ImageSource, size: tuple[int, int] | None, max_pixels: int, resize: str = "squash"
) -> tuple[np.ndarray | None, bytes | None]:
    """(the fast path's array, or None when the file is not one it handles exactly like Pillow;
    the bytes it read from a path, or None) — Pillow then decodes those bytes, not the file again."""
    data = read = None
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)) and os.path.splitext(os.fspath(source))[1].lower() in JPEG_EXTENSIONS:
        try:
            with open(source, "rb") as f:
                data = read = f.read()
        except OSError:
            return None, None
    if data is None or data[:2] != b"\xff\xd8" or _has_app1_segment(data):
        return None, read
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
        # Tiny images: several libjpeg scales give the same output size there; Pillow decides.
        if colorspace != "YCbCr" or width * height > max_pixels or min(width, height) < 16:
            return None, read
        scale = 1 if size is None else _draft_scale(width, height, size)
        if scale == 1:
            arr = _simplejpeg.decode_jpeg(data, colorspace="RGB")
        else:
            # The smallest libjpeg scale giving at least ceil(W/s) x ceil(H/s) is exactly 1/s here.
            want = (-(-height // scale), -(-width // scale))
            arr = _simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=want[0], min_width=want[1])
            if arr.shape[:2] != want:
                return None, read
    except Exception:  # truncated, corrupt, unsupported: Pillow decides and names the reason
        return None, read
    if size is not None and arr.shape[:2] != tuple(size):
        # libjpeg's draft keeps both sides >= the target's, which every policy's region needs.
        arr = np.array(resize_image(arr, size, resize), dtype=np.uint8)
    return np.ascontiguousarray(arr), read


def _read_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, checked on the open file itself (so a
    file swapped for a FIFO or a bigger one after discovery cannot slip past): a FIFO is opened
    without blocking and refused, a device refused, and never more than ``max_bytes + 1`` bytes read."""
    import stat

    name = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(name, f"cannot open ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(name, "not a regular file (a FIFO, socket or device is never read)")
        if info.st_size > max_bytes:
            raise ImageDecodeError(name, f"file is {info.st_size / 2**20:,.4g} MiB, over the limit of "
                                         f"{max_bytes / 2**20:,.4g} MiB (--max-file-mb)")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew since fstat
                raise ImageDecodeError(name, f"file is over the limit of {max_bytes / 2**20:,.4g} MiB (--max-file-mb)")
        return b"".join(chunks)
    except OSError as exc:
        raise ImageDecodeError(name, f"unreadable file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def decode_image(
    source: ImageSource,
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    resize: str = "squash",
) -> np.ndarray:
    """Decode one image to an ``(H, W, 3)`` uint8 RGB array, optionally resized to ``size=(H, W)``
    by the ``resize`` policy (:func:`resize_image`).

    Raises :class:`ImageDecodeError` for anything that is not a readable image within ``max_pixels``,
    and, for a path, for anything but a regular file of at most ``max_bytes`` (checked before reading).
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    read = None
    if isinstance(source, (str, os.PathLike)):
        # Read once, checked on the open file; both decoders below work on these bytes.
        read = _read_file(source, max_bytes)
    if _simplejpeg is not None:
        fast, _ = _decode_jpeg_fast(read if read is not None else source, size, max_pixels, resize)
        if fast is not None:
            return fast
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # Pillow refuses images above 2x its own limit before we can look; a caller that asks
        # for a larger limit gets it (monotone, so concurrent callers never lower each other's).
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if read is None:
                img, name = _open(source)
            else:  # the bytes read once above; errors still name the path
                img = Image.open(io.BytesIO(read))
            with img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                    )
                if size is not None and img.format == "JPEG":
                    img.draft("RGB", (size[1], size[0]))
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                if size is not None:
                    img = resize_image(img, size, resize)
                return np.asarray(img, dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, f"decompression bomb guard: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image ({reason})"
        raise ImageDecodeError(name, f"unreadable image: {reason}") from None


def resize_image(img: Image.Image | np.ndarray, size: tuple[int, int], policy: str = "squash") -> Image.Image:
    """Resize to ``size=(H, W)`` with Pillow's bilinear filter (antialiased when shrinking), by
    ``policy``: ``squash`` stretches the whole image to the size; ``center-crop`` keeps the largest
    central region of the target's aspect ratio; ``letterbox`` fits the whole image inside and pads
    the rest with black. The model metadata names the policy, so training, export's parity check
    and serving all resize the same way."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    height, width = size
    if img.size == (width, height):
        return img
    if policy == "squash":
        return img.resize((width, height), Image.BILINEAR)
    w, h = img.size
    if policy == "center-crop":
        if w * height > h * width:  # wider than the target: crop the sides
            crop_w = h * width / height
            box = ((w - crop_w) / 2, 0, (w + crop_w) / 2, h)
        else:
            crop_h = w * height / width
            box = (0, (h - crop_h) / 2, w, (h + crop_h) / 2)
        return img.resize((width, height), Image.BILINEAR, box=box)
    if policy == "letterbox":
        scale = min(width / w, height / h)
        inner = (max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale))))
        canvas = Image.new("RGB", (width, height))
        canvas.paste(img.convert("RGB").resize(inner, Image.BILINEAR), ((width - inner[0]) // 2, (height - inner[1]) // 2))
        return canvas
    raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")


def image_batch(images, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS, resize: str = "squash") -> np.ndarray:
    """What the Python API accepts as images → uint8 (N, H, W, 3) at ``size``: an array of any image
    size (each resized by ``resize``), or a sequence of paths (decoded; unreadable ones raise one
    ``InputError`` that counts them and names the first) and/or uint8 (H, W, 3) arrays."""
    from calibclust.errors import InputError

    size = tuple(size)
    if isinstance(images, (str, os.PathLike)):
        raise InputError("expected a list of paths or an image array, not one path; for a whole folder use "
                         "label_folder(folder, out)")
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
        if images.shape[1:3] == size or len(images) == 0:
            return images
        return np.stack([np.asarray(resize_image(img, size, resize)) for img in images])
    arrays, failed = [], []
    for item in images:
        if isinstance(item, np.ndarray):  # a list of arrays of different sizes (a notebook's usual input)
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
                raise InputError(f"each image array must be uint8 (H, W, 3); got {item.dtype} {item.shape}")
            arrays.append(np.asarray(resize_image(item, size, resize)))
            continue
        try:
            arrays.append(decode_image(item, size=size, max_pixels=max_pixels, resize=resize))
        except ImageDecodeError as err:
            failed.append(f"{os.fspath(item)}: {err.reason}")
    if failed:
        raise InputError(f"{len(failed)} image(s) could not be read, e.g. {failed[0]}")
    return np.stack(arrays) if arrays else np.zeros((0, *size, 3), np.uint8)


def load_image(path: ImageSource, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
               resize: str = "squash") -> np.ndarray:
    """Decode and resize one file to ``(H, W, 3)`` uint8 (see :func:`decode_image`)."""
    return decode_image(path, size=size, max_pixels=max_pixels, resize=resize)


def load_images(
    paths: Sequence[str | os.PathLike],
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize: str = "squash",
) -> tuple[np.ndarray, list[ImageDecodeError]]:
    """Decode many files into one ``(N_ok, H, W, 3)`` uint8 batch.

    Returns the batch of the readable files (in input order) and one error per unreadable file;
    ``ok_mask`` can be rebuilt from the errors' paths. Never raises for a bad file.
    """
    arrays, errors = [], []
    for path in paths:
        try:
            arrays.append(decode_image(path, size=size, max_pixels=max_pixels, resize=resize))
        except ImageDecodeError as err:
            errors.append(err)
    height, width = size
    batch = np.stack(arrays) if arrays else np.zeros((0, height, width, 3), np.uint8)
    return batch, errors


def iter_decoded_chunks(
    paths: Sequence[str | os.PathLike], size: tuple[int, int], resize: str = "squash", start: int = 0, chunk: int = 512
) -> Iterator[tuple[int, Sequence, np.ndarray, dict[int, str]]]:
    """Decode ``paths[start:]`` ``chunk`` files at a time (bounded memory however many there are):
    yields ``(offset, part, batch, failed)`` with the readable images of ``part`` in order and
    ``failed`` mapping each unreadable file's index in ``part`` to its reason."""
    for offset in range(start, len(paths), chunk):
        part = paths[offset : offset + chunk]
        batch, errors = load_images(part, size, resize=resize)
        reasons = {e.path: e.reason for e in errors}
        yield offset, part, batch, {i: reasons[str(p)] for i, p in enumerate(part) if str(p) in reasons}
