"""Batched weak/strong views (calibclust.augment.views) against PIL and by construction."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from calibclust.augment import views as V
from calibclust.augment.views import ViewConfig, flip_and_shift, strong_view, weak_view


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    imgs[:, 8:24, 8:24] = 255  # some structure so shifts are identifiable
    return torch.from_numpy(imgs)


def _nchw(x):
    return x.permute(0, 3, 1, 2).float()


def _nhwc_u8(x):
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_views_keep_shape_dtype_and_are_reproducible(batch):
    for fn in (weak_view, strong_view):
        a = fn(batch, torch.Generator().manual_seed(3))
        b = fn(batch, torch.Generator().manual_seed(3))
        c = fn(batch, torch.Generator().manual_seed(4))
        assert a.dtype == torch.uint8 and a.shape == batch.shape
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_weak_view_is_a_flip_plus_shift_of_each_image(batch):
    cfg = ViewConfig()
    out = weak_view(batch, torch.Generator().manual_seed(0), cfg)
    pad = 4
    flips = 0
    for img, view in zip(batch.numpy(), out.numpy()):
        found = None
        for flip in (False, True):
            src = img[:, ::-1] if flip else img
            padded = np.pad(src, ((pad, pad), (pad, pad), (0, 0)))
            for dy in range(2 * pad + 1):
                for dx in range(2 * pad + 1):
                    if np.array_equal(padded[dy : dy + 32, dx : dx + 32], view):
                        found = (flip, dy, dx)
                        break
                if found:
                    break
            if found:
                break
        assert found is not None, "weak view is not a flipped/shifted copy"
        flips += found[0]
    assert 0 < flips < len(batch)  # both flipped and unflipped samples in a batch of 16


def test_no_flip_no_pad_is_identity(batch):
    cfg = ViewConfig(flip_p=0.0, pad_fraction=0.0)
    assert torch.equal(flip_and_shift(batch, torch.Generator().manual_seed(0), cfg), batch)


def test_strong_view_with_no_ops_and_no_cutout_equals_weak(batch):
    cfg = ViewConfig(num_ops=0, cutout=False)
    w = weak_view(batch, torch.Generator().manual_seed(5), cfg)
    s = strong_view(batch, torch.Generator().manual_seed(5), cfg)
    assert torch.equal(w, s)


def test_cutout_fills_one_square_with_grey():
    x = torch.zeros(64, 32, 32, 3, dtype=torch.uint8)
    cfg = ViewConfig(flip_p=0.0, pad_fraction=0.0, num_ops=0, cutout=True)
    out = strong_view(x, torch.Generator().manual_seed(0), cfg).numpy()
    for img in out:
        mask = (img == cfg.cutout_fill).all(-1)
        ys, xs = np.nonzero(mask)
        assert mask.any()
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert mask.sum() == h * w  # a rectangle (a square clipped at the border)
        assert max(h, w) <= 16


# --- colour ops against PIL ------------------------------------------------------------------------
def _pil_batch(batch, fn):
    return np.stack([np.asarray(fn(Image.fromarray(im))) for im in batch.numpy()])


def test_equalize_matches_pil(batch):
    ours = _nhwc_u8(V._equalize(_nchw(batch), None))
    assert np.array_equal(ours, _pil_batch(batch, ImageOps.equalize))


def test_autocontrast_matches_pil():
    rng = np.random.default_rng(1)
    imgs = torch.from_numpy(rng.integers(40, 200, (6, 16, 16, 3)).astype(np.uint8))
    ours = _nhwc_u8(V._autocontrast(_nchw(imgs), None))
    ref = _pil_batch(imgs, ImageOps.autocontrast)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_posterize_matches_pil(batch, bits):
    ours = _nhwc_u8(V._posterize(_nchw(batch), torch.full((len(batch),), float(bits))))
    assert np.array_equal(ours, _pil_batch(batch, lambda im: ImageOps.posterize(im, bits)))


@pytest.mark.parametrize("thr", [0, 100, 200, 255])
def test_solarize_matches_pil(batch, thr):
    ours = _nhwc_u8(V._solarize(_nchw(batch), torch.full((len(batch),), float(thr))))
    assert np.array_equal(ours, _pil_batch(batch, lambda im: ImageOps.solarize(im, thr)))


@pytest.mark.parametrize(
    "name, enhancer", [("brightness", ImageEnhance.Brightness), ("color", ImageEnhance.Color), ("contrast", ImageEnhance.Contrast), ("sharpness", ImageEnhance.Sharpness)]
)
def test_enhance_ops_match_pil(batch, name, enhancer):
    f = 0.3
    ours = _nhwc_u8(V._COLOUR_OPS[name](_nchw(batch), torch.full((len(batch),), f)))
    ref = _pil_batch(batch, lambda im: enhancer(im).enhance(f))
    # PIL rounds its intermediate grey image / mean to integers; we keep floats.
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


def test_translate_moves_content_by_the_magnitude():
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 10:20, 10:20] = 255
    theta = V._affine("translate_x", torch.tensor([0.25]), 32, 32)  # shift by 8 px
    out = V._warp(x, theta, fill=0)
    cols = torch.nonzero(out[0, 0].amax(0) > 127).flatten()
    # output(x) = input(x + 8): content moves 8 px to the left
    assert cols.min().item() == 2 and cols.max().item() == 11


def test_rotate_by_zero_and_identity_leave_image_unchanged(batch):
    x = _nchw(batch)
    out = V._warp(x, V._affine("rotate", torch.zeros(len(batch)), 32, 32), fill=0)
    assert torch.allclose(out, x, atol=1e-3)


def test_resized_crop_views_follow_the_cdc_code():
    """crop="resized": RandomResizedCrop (CDC authors' code); a full-frame scale without flips is the
    identity, the default scale (0.08, 1) zooms in, and views are reproducible under a seed."""
    imgs = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    same = ViewConfig(flip_p=0.0, crop="resized", crop_scale=(1.0, 1.0), num_ops=0, cutout=False)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(weak_view(imgs, g, same), imgs)
    cfg = ViewConfig(crop="resized")
    a = weak_view(imgs, torch.Generator().manual_seed(2), cfg)
    b = weak_view(imgs, torch.Generator().manual_seed(2), cfg)
    assert a.dtype == torch.uint8 and a.shape == imgs.shape and torch.equal(a, b)
    assert not torch.equal(a, imgs)
    strong = strong_view(imgs, torch.Generator().manual_seed(3), cfg)
    assert strong.shape == imgs.shape and strong.dtype == torch.uint8
    with pytest.raises(ValueError, match="crop must be"):
        ViewConfig(crop="zoom")
