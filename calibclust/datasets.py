"""Small real image folders built from data that ships with our dependencies (no downloads).

* :func:`make_digits_folder` – scikit-learn's ``load_digits`` (1,797 real 8×8 handwritten digits)
  rendered as 32×32 RGB PNGs in ImageFolder layout (``root/<digit>/<index>.png``). The class
  folder names are the ground truth used for evaluation only; training never reads them.
* :func:`make_ood_folder` – out-of-distribution images for the same input size:
  ``letters`` (Latin letters drawn with the DejaVu fonts matplotlib ships: near-OOD, same
  white-on-black stroke style as the digits), ``photos`` (patches of matplotlib's sample
  photographs: far-OOD) and ``noise`` (uniform and Gaussian noise).

Torch-free, deterministic under ``seed``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OOD_KINDS = ("letters", "photos", "noise")


def digits_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(N, size, size, 3)`` uint8 (white strokes on black) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values are 0..16
    out = np.empty((len(small), size, size, 3), np.uint8)
    for i, img in enumerate(small):
        big = Image.fromarray(img, "L").resize((size, size), Image.BICUBIC)
        out[i] = np.repeat(np.asarray(big)[..., None], 3, axis=2)
    return out, digits.target.astype(np.int64)


def make_digits_folder(
    root: str | os.PathLike, size: int = 32, limit: int | None = None, seed: int = 0
) -> Path:
    """Write the digits as PNGs under ``root/<digit>/<index:04d>.png``; returns ``root``.

    ``limit`` keeps a class-stratified random subset of that many images (for fast tests).
    Existing files are left as they are, so calling it twice is cheap.
    """
    root = Path(root)
    images, labels = digits_images(size)
    index = np.arange(len(images))
    if limit is not None and limit < len(images):
        rng = np.random.default_rng(seed)
        per_class = max(1, limit // 10)
        index = np.sort(
            np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
        )
    for i in index:
        path = root / str(labels[i]) / f"{i:04d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    return root


def make_mixed_size_folder(root: str | os.PathLike, classes: int = 10, per_class: int | None = None, seed: int = 0,
                           bad_files: int = 3) -> Path:
    """The digits as a user's folder looks: JPEGs of different sizes and aspect ratios (a digit drawn
    at 60–100 % of the canvas's short side, placed at random on a dark canvas 28–160 px wide),
    nested ``root/<digit>/<batch>/<index>.jpg``, plus ``bad_files`` unreadable files (a truncated
    JPEG, text named .png, an empty .jpg). ``per_class`` None = every digit of a class."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    images, labels = digits_images(64)
    for c in range(classes):
        index = np.flatnonzero(labels == c)
        if per_class is not None:
            index = rng.permutation(index)[:per_class]
        for i in index:
            width = int(rng.integers(28, 161))
            height = int(np.clip(width / rng.uniform(0.6, 1.6), 28, 200))
            side = max(8, int(min(width, height) * rng.uniform(0.6, 1.0)))
            canvas = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 40, 3)))
            digit = Image.fromarray(images[i]).resize((side, side), Image.BILINEAR)
            canvas.paste(digit, (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))))
            path = root / str(c) / f"batch{i % 3}" / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            canvas.save(path, quality=90)
    bad = [("truncated.jpg", None), ("notes.png", b"not an image\n"), ("empty.jpg", b"")]
    for name, content in bad[:bad_files]:
        path = root / "0" / name
        if content is None:
            first = next(iter(sorted((root / "0").rglob("*.jpg"))))
            content = first.read_bytes()[:200]
        path.write_bytes(content)
    return root


def dejavu_font_files() -> list[str]:
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = sorted(str(p) for p in ttf.glob("DejaVu*.ttf"))
    if not fonts:  # pragma: no cover - matplotlib always ships DejaVu
        raise FileNotFoundError(f"no DejaVu fonts under {ttf}")
    return fonts


def letters_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fonts = dejavu_font_files()
    letters = string.ascii_letters.replace("l", "").replace("I", "").replace("O", "").replace("o", "")
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(size * rng.uniform(0.6, 0.85)))
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        ch = letters[rng.integers(len(letters))]
        left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
        x = (size - (right - left)) / 2 - left + rng.uniform(-2, 2)
        y = (size - (bottom - top)) / 2 - top + rng.uniform(-2, 2)
        draw.text((x, y), ch, fill=int(rng.uniform(200, 255)), font=font)
        out[i] = np.repeat(np.asarray(canvas)[..., None], 3, axis=2)
    return out


def photo_patches(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    import matplotlib.cbook as cbook

    rng = np.random.default_rng(seed)
    sources = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        with cbook.get_sample_data(name) as fh:
            sources.append(np.asarray(Image.open(fh).convert("RGB")))
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        src = sources[i % len(sources)]
        crop = int(rng.integers(size, min(src.shape[:2]) // 2))
        y = rng.integers(0, src.shape[0] - crop + 1)
        x = rng.integers(0, src.shape[1] - crop + 1)
        patch = Image.fromarray(src[y : y + crop, x : x + crop]).resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(patch)
    return out


def noise_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    uniform = rng.integers(0, 256, (n // 2, size, size, 3))
    gaussian = np.clip(rng.normal(128, 50, (n - n // 2, size, size, 3)), 0, 255)
    return np.concatenate([uniform, gaussian]).astype(np.uint8)


def ood_images(kind: str, n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    makers = {"letters": letters_images, "photos": photo_patches, "noise": noise_images}
    if kind not in makers:
        raise ValueError(f"unknown OOD kind {kind!r}; choose from {OOD_KINDS}")
    return makers[kind](n, size, seed)


def make_ood_folder(
    root: str | os.PathLike, kinds=OOD_KINDS, n_per_kind: int = 200, size: int = 32, seed: int = 0
) -> Path:
    """Write ``root/<kind>/<index:04d>.png`` for each OOD kind; returns ``root``."""
    root = Path(root)
    for k, kind in enumerate(kinds):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(ood_images(kind, n_per_kind, size, seed + k)):
            path = folder / f"{i:04d}.png"
            if not path.exists():
                Image.fromarray(img).save(path)
    return root
