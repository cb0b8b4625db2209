"""Image discovery and decoding on every troublesome kind of file (issue 2, item 3)."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibclust.io.images import (
    ImageDecodeError,
    decode_image,
    discover_images,
    list_image_folder,
    load_images,
)

SIZE = 16  # good images are 16x16 = 256 px, far below MAX_PIXELS
MAX_PIXELS = 5_000  # the "bomb" is 100x100 = 10,000 px: above the limit without a big file
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _halves(mode, left, right, size=(SIZE, SIZE)) -> Image.Image:
    """Image with the left half one colour and the right half another (W x H = size)."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def make_good_files(folder: Path) -> dict[str, Path]:
    files: dict[str, bytes] = {}

    # EXIF orientation 6 = "rotate 90° clockwise to display": stored 20 wide x 10 high, left half
    # red, right half blue; displayed 10 wide x 20 high with red on top, blue at the bottom.
    stored = _halves("RGB", RED, BLUE, size=(20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif_rotated.jpg"] = _jpeg_bytes(stored, exif=exif.tobytes())

    files["grey_L.png"] = _png_bytes(Image.new("L", (SIZE, SIZE), 100))

    # LA: left half black and opaque, right half black and fully transparent -> white
    la = Image.new("LA", (SIZE, SIZE), (0, 255))
    la.paste(Image.new("LA", (SIZE // 2, SIZE), (0, 0)), (SIZE // 2, 0))
    files["grey_alpha_LA.png"] = _png_bytes(la)

    # P with a transparency key: index 0 (red) transparent, index 1 (green) opaque
    pal = Image.new("P", (SIZE, SIZE), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    pal.paste(1, (SIZE // 2, 0, SIZE, SIZE))
    files["palette_P_transparent.png"] = _png_bytes(pal, transparency=0)

    # RGBA: left half blue with alpha 0 -> white; right half red with alpha 128 -> pink
    rgba = _halves("RGBA", (0, 0, 255, 0), (255, 0, 0, 128))
    files["rgba.png"] = _png_bytes(rgba)

    files["cmyk.jpg"] = _jpeg_bytes(Image.new("CMYK", (SIZE, SIZE), (255, 0, 0, 0)))  # pure cyan

    # 16-bit grey: 4 vertical stripes 0, 1000, 32896 (=128*257), 65535 -> 0, 4, 128, 255 when scaled;
    # clipping to 8 bits would make the last three all 255.
    stripes = np.repeat(np.array([0, 1000, 32896, 65535], np.uint16), SIZE // 4)[None, :].repeat(SIZE, 0)
    i16 = Image.fromarray(stripes)
    assert i16.mode == "I;16"
    files["sixteen_bit_I16.png"] = _png_bytes(i16)

    one = Image.new("1", (SIZE, SIZE), 0)
    one.paste(1, (SIZE // 2, 0, SIZE, SIZE))
    files["one_bit.png"] = _png_bytes(one)

    files["plain_rgb.png"] = _png_bytes(_halves("RGB", GREEN, BLUE))
    return _write_shuffled(folder, files)


def make_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, word the error reason must contain)."""
    good_png = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    good_jpg = _jpeg_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)))
    files = {
        "bomb.png": _png_bytes(Image.new("RGB", (100, 100), RED)),
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "not_an_image.png": b"this is a text file with an image extension\n" * 10,
        "empty.jpg": b"",
    }
    expected = {
        "bomb.png": "exceeds",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "not_an_image.png": "not an image",
        "empty.jpg": "not an image",
    }
    paths = _write_shuffled(folder, files)
    return {name: (paths[name], expected[name]) for name in files}


def _write_shuffled(folder: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Write in a random order, so a sorted listing is not an accident of creation order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(files)
    random.Random(len(names)).shuffle(names)
    for name in names:
        (folder / name).write_bytes(files[name])
    return {name: folder / name for name in files}


@pytest.fixture(scope="module")
def troublesome(tmp_path_factory):
    folder = tmp_path_factory.mktemp("troublesome")
    good = make_good_files(folder)
    bad = make_bad_files(folder)
    # must be skipped by discovery: hidden files and folders, and non-image extensions
    (folder / ".hidden.png").write_bytes(_png_bytes(Image.new("RGB", (4, 4), RED)))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "thumb.png").write_bytes(_png_bytes(Image.new("RGB", (4, 4), RED)))
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return folder, good, bad


def test_discovery_skips_hidden_and_non_image_files(troublesome):
    folder, good, bad = troublesome
    found = list(discover_images(folder))
    assert sorted(p.name for p in found) == sorted(list(good) + list(bad))
    assert found == sorted(found, key=lambda p: p.name), "entries of one folder come in name order"
    assert list(discover_images(folder)) == found, "discovery order is deterministic"


def test_load_images_reports_each_bad_file_once_and_never_raises(troublesome):
    folder, good, bad = troublesome
    paths = list(discover_images(folder))
    batch, errors = load_images(paths, size=(SIZE, SIZE), max_pixels=MAX_PIXELS)

    assert batch.shape == (len(good), SIZE, SIZE, 3) and batch.dtype == np.uint8
    assert all(isinstance(e, ImageDecodeError) for e in errors)
    errors_by_path = {}
    for err in errors:
        assert err.path not in errors_by_path, f"two errors for {err.path}"
        errors_by_path[err.path] = err
    assert set(errors_by_path) == {str(p) for p, _ in bad.values()}
    for name, (path, word) in bad.items():
        err = errors_by_path[str(path)]
        assert word in err.reason.lower(), f"{name}: reason {err.reason!r} should mention {word!r}"
        assert name in str(err), f"the message names the file: {err}"

    # the batch holds the good files in input order: check the 'plain' one landed where expected
    good_in_order = [p for p in paths if str(p) not in errors_by_path]
    k = good_in_order.index(good["plain_rgb.png"])
    assert tuple(batch[k, SIZE // 2, 2]) == GREEN and tuple(batch[k, SIZE // 2, SIZE - 3]) == BLUE


def _close(pixel, colour, tol=12):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


def test_good_images_decode_to_correct_rgb(troublesome):
    _, good, _ = troublesome
    arrays = {name: decode_image(path, max_pixels=MAX_PIXELS) for name, path in good.items()}
    for name, arr in arrays.items():
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name

    rotated = arrays["exif_rotated.jpg"]
    assert rotated.shape == (20, 10, 3), "EXIF orientation 6 turns a 20x10 image into 10 wide x 20 high"
    assert _close(rotated[3, 5], RED, 30) and _close(rotated[16, 5], BLUE, 30), (
        f"top should be red, bottom blue after rotation; got {rotated[3, 5]} / {rotated[16, 5]}"
    )

    assert (arrays["grey_L.png"] == 100).all()

    la = arrays["grey_alpha_LA.png"]
    assert (la[:, : SIZE // 2] == 0).all() and (la[:, SIZE // 2 :] == 255).all(), "transparent LA -> white"

    pal = arrays["palette_P_transparent.png"]
    assert (pal[:, : SIZE // 2] == WHITE).all(), "transparent palette entry composited onto white"
    assert (pal[:, SIZE // 2 :] == GREEN).all()

    rgba = arrays["rgba.png"]
    assert (rgba[:, : SIZE // 2] == WHITE).all(), "alpha 0 -> white background"
    # red at alpha 128/255 over white: G = B = 255 * (1 - 128/255) = 127
    assert _close(rgba[0, SIZE - 1], (255, 127, 127), 1), rgba[0, SIZE - 1]

    assert _close(arrays["cmyk.jpg"][SIZE // 2, SIZE // 2], (0, 255, 255), 8), "CMYK cyan -> RGB cyan"

    i16 = arrays["sixteen_bit_I16.png"]
    assert [int(i16[0, s * SIZE // 4, 0]) for s in range(4)] == [0, 4, 128, 255], "I;16 scaled by 1/257, not clipped"

    one = arrays["one_bit.png"]
    assert (one[:, : SIZE // 2] == 0).all() and (one[:, SIZE // 2 :] == 255).all()


def test_resize_to_model_size_keeps_colours(troublesome):
    _, good, _ = troublesome
    small = decode_image(good["exif_rotated.jpg"], size=(8, 4))
    assert small.shape == (8, 4, 3)
    assert small[0, :, 0].min() > 200 and small[-1, :, 2].min() > 200, "rotation happens before the resize"


def test_decompression_bomb_guard_is_configurable(troublesome):
    folder, _, bad = troublesome
    bomb = bad["bomb.png"][0]
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 5000"):
        decode_image(bomb, max_pixels=MAX_PIXELS)
    assert decode_image(bomb, max_pixels=10_000).shape == (100, 100, 3), "a limit at the image size admits it"


def test_decode_accepts_bytes_and_streams():
    data = _png_bytes(_halves("RGB", RED, GREEN))
    assert (decode_image(data) == decode_image(io.BytesIO(data))).all()
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"GIF89a but not really")


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(tmp_path / "nope.png")
    batch, errors = load_images([tmp_path / "nope.png"], size=(4, 4))
    assert batch.shape == (0, 4, 4, 3) and len(errors) == 1


def _tiny_png() -> bytes:
    return _png_bytes(Image.new("RGB", (4, 4), BLUE))


def test_imagefolder_layout_gives_labels_in_deterministic_order(tmp_path):
    root = tmp_path / "classes"
    files = [("cat", "b.png"), ("dog", "a.png"), ("cat", "a.png"), ("cat/nested", "z.png"), ("ant", "x.jpg")]
    random.Random(0).shuffle(files)
    for sub, name in files:
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_bytes(_tiny_png())
    (root / ".git").mkdir()
    (root / ".git" / "objects.png").write_bytes(_tiny_png())
    (root / "dog" / ".DS_Store.png").write_bytes(b"junk")

    listing = list_image_folder(root)
    assert listing.has_labels
    assert listing.class_names == ["ant", "cat", "dog"]
    assert listing.relative_paths() == ["ant/x.jpg", "cat/a.png", "cat/b.png", "cat/nested/z.png", "dog/a.png"]
    assert listing.labels.tolist() == [0, 1, 1, 1, 2], "nested folders take the label of their top-level class"
    assert list_image_folder(root).relative_paths() == listing.relative_paths()


def test_flat_folder_has_no_labels(tmp_path):
    for name in ("b.png", "a.png", "c.png"):
        (tmp_path / name).write_bytes(_tiny_png())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(_tiny_png())
    listing = list_image_folder(tmp_path)
    assert not listing.has_labels and listing.labels is None and listing.class_names == []
    assert listing.relative_paths() == ["a.png", "b.png", "c.png", "sub/d.png"]


def test_empty_folder_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        list_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list(discover_images(tmp_path / "absent"))


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_class_folder_is_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.png").write_bytes(_tiny_png())
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(real, root / "linked")
    assert list_image_folder(root).relative_paths() == ["linked/a.png"]


# --- the fast JPEG path (simplejpeg) gives Pillow's pixels -------------------------------------------
def _jpeg_cases(tmp_path: Path) -> dict[str, Path]:
    import matplotlib.cbook as cbook

    from calibclust.datasets import digits_images

    rng = np.random.default_rng(0)
    with cbook.get_sample_data("grace_hopper.jpg") as fh:  # a real photo that ships with matplotlib
        photo = np.asarray(Image.open(fh).convert("RGB"))
    digit = digits_images(32)[0][7]
    cases = {
        "digit-32.jpg": (Image.fromarray(digit), {"quality": 90}),
        "noise-32.jpg": (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), {"quality": 75}),
        "photo-full.jpg": (Image.fromarray(photo), {"quality": 85}),
        "photo-wide.jpeg": (Image.fromarray(photo).resize((333, 97)), {"quality": 85}),
        "photo-444.jpg": (Image.fromarray(photo), {"quality": 95, "subsampling": 0}),
        "photo-progressive.jpg": (Image.fromarray(photo), {"quality": 80, "progressive": True}),
        "tiny-7.jpg": (Image.fromarray(photo[:7, :7]), {"quality": 90}),
        "noise-56.jpg": (Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)), {"quality": 90}),
        "photo-100x60.jpg": (Image.fromarray(photo).resize((100, 60)), {"quality": 90}),
        "grey.jpg": (Image.fromarray(photo).convert("L"), {"quality": 90}),
        "cmyk.jpg": (Image.fromarray(photo).convert("CMYK"), {"quality": 90}),
    }
    paths = {}
    for name, (img, kw) in cases.items():
        paths[name] = tmp_path / name
        img.save(paths[name], "JPEG", **kw)
    rotated = Image.fromarray(photo[:200, :120])
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    paths["exif-rotated.jpg"] = tmp_path / "exif-rotated.jpg"
    rotated.save(paths["exif-rotated.jpg"], "JPEG", exif=exif.tobytes(), quality=90)
    # EXIF behind > 64 KiB of ICC profile, and an orientation given only in XMP (Pillow reads both)
    paths["late-exif.jpg"] = tmp_path / "late-exif.jpg"
    rotated.save(paths["late-exif.jpg"], "JPEG", exif=exif.tobytes(), icc_profile=bytes(70_000), quality=90)
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    paths["xmp-rotated.jpg"] = tmp_path / "xmp-rotated.jpg"
    rotated.save(paths["xmp-rotated.jpg"], "JPEG", xmp=xmp, quality=90)
    return paths


@pytest.mark.parametrize("size", [None, (32, 32), (224, 224), (60, 40), (8, 8), (7, 7), (20, 30)])
def test_fast_jpeg_path_is_pixel_identical_to_pillow(tmp_path, monkeypatch, size):
    import calibclust.io.images as images

    if images._simplejpeg is None:
        pytest.skip("simplejpeg not installed (optional, extra 'serve')")
    paths = _jpeg_cases(tmp_path)
    real, used = images._simplejpeg, []

    class Spy:
        decode_jpeg_header = staticmethod(real.decode_jpeg_header)

        @staticmethod
        def decode_jpeg(data, **kw):
            used.append(kw)
            return real.decode_jpeg(data, **kw)

    monkeypatch.setattr(images, "_simplejpeg", Spy)
    fast = {name: decode_image(p, size=size) for name, p in paths.items()}
    # tiny, grey, CMYK, EXIF and XMP files go to Pillow; the 8 plain colour JPEGs take the fast path
    assert len(used) == 8, used
    if size == (32, 32):
        assert {"min_height": 75, "min_width": 64} in [{k: v for k, v in kw.items() if k != "colorspace"} for kw in used]
    fast_bytes = {name: decode_image(p.read_bytes(), size=size) for name, p in paths.items()}
    monkeypatch.setattr(images, "_simplejpeg", None)
    for name, p in paths.items():
        slow = decode_image(p, size=size)
        assert fast[name].shape == slow.shape and fast[name].dtype == np.uint8, (name, fast[name].shape, slow.shape)
        diff = int(np.abs(fast[name].astype(int) - slow).max())
        assert diff == 0, f"{name} at {size}: max pixel difference {diff} between the fast path and Pillow"
        assert np.array_equal(fast_bytes[name], slow), name
        assert fast[name].flags.writeable and fast[name].flags.c_contiguous, name


def test_fast_jpeg_path_leaves_bad_jpegs_to_pillow(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good, "JPEG")
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "not-a-jpeg.jpg").write_bytes(b"hello, I am text")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(tmp_path / "truncated.jpg", size=(32, 32))
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(tmp_path / "not-a-jpeg.jpg", size=(32, 32))
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(good, size=(32, 32), max_pixels=64 * 64 - 1)


def test_discovery_reports_unlistable_and_vanished_folders_and_goes_on(tmp_path, monkeypatch):
    """A folder that cannot be listed (no permission, removed mid-run) is reported, never fatal;
    root can list anything, so the refusal is simulated at os.scandir."""
    from calibclust.io import images as images_module

    for name in ("a", "locked", "z"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / "x.png")
    real = os.scandir

    def scandir(path):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(images_module.os, "scandir", scandir)
    skipped = []
    found = list(images_module.iter_image_files(tmp_path, on_skip=lambda p, r: skipped.append((os.path.basename(p), r))))
    assert [os.path.relpath(p, tmp_path) for p in found] == ["a/x.png", "z/x.png"]
    assert skipped == [("locked", "cannot list this folder (Permission denied)")]
    with pytest.warns(images_module.SkippedPathWarning, match="locked: cannot list"):
        assert len(list(images_module.discover_images(tmp_path))) == 2


def test_size_guard_comes_before_any_read(tmp_path):
    """A file over max_bytes, a FIFO and a device are refused from the open file's fstat, without
    blocking and without reading (the JPEG fast path used to read a link to /dev/zero whole:
    MemoryError; a FIFO blocked forever). The check is on the open file, so a file swapped for a
    FIFO between discovery and decoding is refused the same way."""
    from calibclust.io.images import ImageDecodeError, decode_image

    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big, quality=95)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # no writer: a blocking open or read would hang this test
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    with pytest.raises(ImageDecodeError, match=r"MiB, over the limit of 0.0009766 MiB \(--max-file-mb\)"):
        decode_image(big, max_bytes=2**20 // 1024)
    for path in (fifo, tmp_path / "zero.jpg"):
        with pytest.raises(ImageDecodeError, match="not a regular file"):
            decode_image(path)
    assert decode_image(big, max_bytes=1 << 20).shape == (64, 64, 3)
    assert decode_image(big, size=(16, 16)).shape == (16, 16, 3)


def test_discovery_walks_very_deep_trees_in_order(tmp_path, monkeypatch):
    """1,200 nested folders (recursion stopped at ~1,000 before): every image found, depth first,
    a folder's own files before its sub-folders'. Built with relative paths (chdir), as the
    absolute ones approach PATH_MAX."""
    from calibclust.io.images import iter_image_files

    monkeypatch.chdir(tmp_path)
    folder = "d"
    for depth in range(1, 1201):  # os.makedirs is itself recursive: one level at a time
        os.mkdir(folder)
        if depth in (1, 1200):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder + "/x.png")
        folder += "/d"
    (tmp_path / "a.png").write_bytes((tmp_path / "d" / "x.png").read_bytes())
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "y.png").write_bytes((tmp_path / "d" / "x.png").read_bytes())
    try:
        found = [p[2:] for p in iter_image_files(".")]  # "./a.png" -> "a.png"
        assert found[:2] == ["a.png", "d/x.png"] and found[-1] == "e/y.png" and len(found) == 4, [f[:20] for f in found]
        assert found[2].count("/") == 1200
    finally:
        remove_deep_tree("d")


def remove_deep_tree(folder: str) -> None:
    """Bottom-up removal: shutil.rmtree, and pytest's own cleanup of old tmp folders, recurse once
    per level and fail on a tree this deep, which would fail every later pytest run's exit."""
    deepest = folder
    while os.path.isdir(deepest + "/d"):
        deepest += "/d"
    while deepest:
        for name in os.listdir(deepest):
            if not os.path.isdir(os.path.join(deepest, name)):
                os.unlink(os.path.join(deepest, name))
        os.rmdir(deepest)
        deepest = deepest.rpartition("/")[0]


# --- resize policies -------------------------------------------------------------------------------
def _three_band_image(width: int = 90, height: int = 30) -> np.ndarray:
    """Left third red, middle green, right blue."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 3, 0] = 255
    img[:, width // 3 : 2 * width // 3, 1] = 255
    img[:, 2 * width // 3 :, 2] = 255
    return img


def test_center_crop_keeps_the_middle_of_a_wide_image():
    from calibclust.io.images import resize_image

    out = np.asarray(resize_image(_three_band_image(), (10, 10), "center-crop"))
    assert out.shape == (10, 10, 3)
    assert (out[:, 1:-1, 1] == 255).all() and out[:, 1:-1, [0, 2]].max() == 0, "only the green middle third remains"


def test_letterbox_keeps_the_whole_image_and_pads_black():
    from calibclust.io.images import resize_image

    wide = np.asarray(resize_image(_three_band_image(), (30, 30), "letterbox"))
    assert wide.shape == (30, 30, 3)
    assert wide[:10].max() == 0 and wide[20:].max() == 0, "a 3:1 image fills the middle 10 rows"
    row = wide[15]
    assert row[2, 0] == 255 and row[15, 1] == 255 and row[27, 2] == 255, "all three bands are kept"
    tall = np.asarray(resize_image(_three_band_image().transpose(1, 0, 2), (30, 30), "letterbox"))
    assert tall[:, :10].max() == 0 and tall[:, 20:].max() == 0


def test_squash_is_the_default_and_unknown_policies_are_refused():
    from calibclust.io.images import resize_image

    img = _three_band_image()
    assert np.array_equal(np.asarray(resize_image(img, (10, 10))), np.asarray(resize_image(img, (10, 10), "squash")))
    assert np.asarray(resize_image(img, (10, 10)))[:, 0, 0].min() == 255, "squash keeps the red left edge"
    with pytest.raises(ValueError, match="resize policy"):
        resize_image(img, (10, 10), "zoom")


@pytest.mark.parametrize("policy", ["squash", "center-crop", "letterbox"])
def test_decoder_applies_the_policy_on_both_jpeg_paths(tmp_path, policy):
    """A JPEG decoded by the fast path (when simplejpeg is present) and a PNG by Pillow end up resized
    by the same policy: same layout of colours."""
    from calibclust.io.images import decode_image, resize_image

    img = _three_band_image(240, 80)
    Image.fromarray(img).save(tmp_path / "x.png")
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=95)
    want = np.asarray(resize_image(img, (16, 16), policy)).astype(int)
    for name in ("x.png", "x.jpg"):
        got = decode_image(tmp_path / name, size=(16, 16), resize=policy).astype(int)
        assert np.abs(got - want).mean() < 8, (name, policy, np.abs(got - want).mean())


def test_image_batch_takes_arrays_of_any_size_paths_and_lists_of_arrays(tmp_path):
    from calibclust.errors import InputError
    from calibclust.io.images import image_batch

    Image.fromarray(_three_band_image()).save(tmp_path / "x.png")
    mixed = [_three_band_image(), np.zeros((5, 7, 3), np.uint8), tmp_path / "x.png"]
    batch = image_batch(mixed, (8, 8), resize="center-crop")
    assert batch.shape == (3, 8, 8, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[0], batch[2]), "an array and the same image as a file give the same pixels"
    with pytest.raises(InputError, match="not one path"):
        image_batch(tmp_path / "x.png", (8, 8))
    with pytest.raises(InputError, match="could not be read"):
        image_batch([tmp_path / "missing.png"], (8, 8))
    with pytest.raises(InputError, match="uint8"):
        image_batch([np.zeros((4, 4), np.float32)], (8, 8))
