"""Batched weak and strong views for self-labelling, as tensor ops over a whole batch.

CDC uses the weak/strong augmentations of SCAN ("Towards Calibrated Deep Clustering Network" §3, "Notation"; appendix B.1,
"Augmentation Strategy"): the calibration head's confidence on the **weak** view picks the pseudo
labels, the clustering head learns them on the **strong** view (Eq. 5), and the calibration loss
sees the un-augmented image.

* weak   = random horizontal flip + a random crop, ``ViewConfig.crop``:
  ``"shift"`` (SCAN/SPICE's ``RandomCrop(32, padding=4)``: zero padding of ``size / 8``, then a
  crop of the original size) or ``"resized"`` (the CDC authors' code: ``RandomResizedCrop(32)``
  with torchvision's default scale (0.08, 1) and ratio (3/4, 4/3), drawn and applied by
  :class:`calibclust.augment.MoCoAugment`, the one batched crop);
* strong = the same flip + crop, then ``num_ops`` (4) operations drawn with replacement from SCAN's
  RandAugment pool (14 ops, magnitude uniform in the op's range), then Cutout (one square hole of
  random side up to half the image, SCAN's ``n_holes=1, length=16, random=True`` at 32 px).

Remaining difference from the CDC authors' public code (its ``get_standard_transformations`` /
``get_strong_transformations``): they flip *before* the resized
crop in the strong view and after it in the weak one; both orders give the same distribution of
views, so both views here crop, then flip.

Everything runs on uint8 ``(N, H, W, 3)`` batches (the layout :meth:`ClusteringModel.preprocess`
takes) and returns uint8, on the batch's device. Per-sample randomness is drawn from one
``torch.Generator``, so a view is a pure function of (images, generator state). Per-image Python
loops over PIL images are ~10× slower on 2 CPU cores; here each op is applied once to the subset
of the batch that drew it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calibclust.augment import adjust_brightness, adjust_contrast, adjust_saturation, blend
# Defined without torch (the command line builds its options from its fields); imported from here too.
from calibclust.augment.view_config import ViewConfig

# SCAN's RandAugment pool (Van Gansbeke et al. 2020, data/augment.py) with its magnitude ranges;
# a magnitude is drawn uniformly in [lo, hi] per sample and op.
RANDAUGMENT_OPS: dict[str, tuple[float, float]] = {
    "autocontrast": (0.0, 1.0),
    "brightness": (0.05, 0.95),
    "color": (0.05, 0.95),
    "contrast": (0.05, 0.95),
    "equalize": (0.0, 1.0),
    "identity": (0.0, 1.0),
    "posterize": (4.0, 8.0),  # bits kept
    "rotate": (-30.0, 30.0),  # degrees
    "sharpness": (0.05, 0.95),
    "shear_x": (-0.3, 0.3),
    "shear_y": (-0.3, 0.3),
    "solarize": (0.0, 256.0),  # threshold
    "translate_x": (-0.3, 0.3),  # fraction of the width
    "translate_y": (-0.3, 0.3),
}
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _check(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def flip_and_crop(images: torch.Tensor, g: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    """The crop of ``cfg.crop`` with a random horizontal flip, uint8 in and out."""
    if cfg.crop == "shift":
        return flip_and_shift(images, g, cfg)
    from calibclust.augment import AugmentConfig, MoCoAugment

    n, h, w, _ = images.shape
    if n == 0:
        return images
    crop_only = AugmentConfig(crop_scale=cfg.crop_scale, flip_p=cfg.flip_p, jitter_p=0.0, grayscale_p=0.0,
                              blur="off", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x = MoCoAugment(crop_only, (h, w))(images, g)  # float (N, 3, H, W) in [0, 1]
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def flip_and_shift(images: torch.Tensor, g: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    """Random horizontal flip, then a random crop of the zero-padded image (same size)."""
    n, h, w, _ = images.shape
    flip = (torch.rand(n, generator=g) < cfg.flip_p).to(images.device)
    out = torch.where(flip[:, None, None, None], images.flip(2), images)
    pad = int(round(cfg.pad_fraction * min(h, w)))
    if pad <= 0 or n == 0:
        return out
    padded = F.pad(out.permute(0, 3, 1, 2), (pad, pad, pad, pad), value=cfg.fill)  # (N, 3, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(images.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(images.device)
    rows = (oy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (N, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (N, 1, W)
    idx = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows, cols]  # (N, H, W, 3)


def weak_view(images: torch.Tensor, g: torch.Generator, cfg: ViewConfig | None = None) -> torch.Tensor:
    """𝒲(x): flip + crop (CDC §3 "Notation"; ``cfg.crop`` picks SCAN's shift or CDC's resized crop)."""
    _check(images)
    return flip_and_crop(images, g, cfg or ViewConfig())


def strong_view(images: torch.Tensor, g: torch.Generator, cfg: ViewConfig | None = None) -> torch.Tensor:
    """𝒜(x): flip + crop + RandAugment(``num_ops``) + Cutout (SCAN's strong augmentation)."""
    cfg = cfg or ViewConfig()
    _check(images)
    x = flip_and_crop(images, g, cfg).permute(0, 3, 1, 2).float()  # (N, 3, H, W) in 0..255
    names = list(RANDAUGMENT_OPS)
    n = x.shape[0]
    for _ in range(cfg.num_ops):
        choice = torch.randint(0, len(names), (n,), generator=g)
        # Magnitudes for every sample are drawn for every op so the generator advances the same
        # way whatever the choices were (keeps views reproducible under a seed).
        mags = {name: torch.rand(n, generator=g) for name in names}
        geo_theta = None
        for k, name in enumerate(names):
            sel = torch.nonzero(choice == k).flatten()
            if sel.numel() == 0 or name == "identity":
                continue
            lo, hi = RANDAUGMENT_OPS[name]
            m = (mags[name][sel] * (hi - lo) + lo).to(x.device)
            sel_d = sel.to(x.device)
            if name in _GEOMETRIC:
                if geo_theta is None:
                    geo_theta = torch.eye(2, 3, device=x.device).repeat(n, 1, 1)
                geo_theta[sel_d] = _affine(name, m, x.shape[2], x.shape[3])
                continue
            x[sel_d] = _COLOUR_OPS[name](x[sel_d], m)
        if geo_theta is not None:
            x = _warp(x, geo_theta, cfg.fill)
    if cfg.cutout:
        x = _cutout(x, g, cfg)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# --- colour ops on float (n, 3, H, W) in 0..255 with per-sample magnitudes m (n,) -----------------
# PIL.ImageEnhance's blends (out = degenerate + m · (x − degenerate)) are the pretraining jitter's
# (calibclust.augment), run on x / 255.


def _autocontrast(x, m):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) * 255.0 / span.clamp_min(1e-6), x)


def _brightness(x, m):
    return adjust_brightness(x / 255.0, m) * 255.0


def _color(x, m):
    return adjust_saturation(x / 255.0, m) * 255.0


def _contrast(x, m):
    return adjust_contrast(x / 255.0, m) * 255.0


def _sharpness(x, m):
    # PIL's SMOOTH kernel; border pixels keep their value.
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    smooth = F.conv2d(x, k.expand(3, 1, 3, 3), padding=1, groups=3)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth[:, :, 1:-1, 1:-1]
    return blend(x / 255.0, degenerate / 255.0, m) * 255.0


def _posterize(x, m):
    shift = (8 - m.floor().clamp(1, 8)).view(-1, 1, 1, 1)
    step = torch.pow(2.0, shift)
    return torch.floor(x.round() / step) * step


def _solarize(x, m):
    thr = m.view(-1, 1, 1, 1)
    return torch.where(x.round() >= thr, 255.0 - x, x)


def _equalize(x, m):
    """PIL ImageOps.equalize per channel, vectorised over samples × channels."""
    n, c, h, w = x.shape
    v = x.round().clamp(0, 255).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float32))
    last = 255 - torch.argmax((hist.flip(1) > 0).float(), dim=1)  # last non-empty bin
    step = torch.div(hist.sum(1) - hist.gather(1, last[:, None]).squeeze(1), 255, rounding_mode="floor")
    excl = torch.cumsum(hist, 1) - hist
    lut = torch.div(excl + torch.div(step, 2, rounding_mode="floor")[:, None], step.clamp_min(1)[:, None], rounding_mode="floor").clamp(0, 255)
    lut = torch.where(step[:, None] > 0, lut, torch.arange(256, device=x.device, dtype=torch.float32).expand_as(lut))
    return lut.gather(1, v).view(n, c, h, w)


_COLOUR_OPS = {
    "autocontrast": _autocontrast,
    "brightness": _brightness,
    "color": _color,
    "contrast": _contrast,
    "equalize": _equalize,
    "posterize": _posterize,
    "sharpness": _sharpness,
    "solarize": _solarize,
}


# --- geometric ops: one affine warp per round for all samples that drew one -----------------------
def _affine(name: str, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """2×3 matrices (in ``affine_grid``'s normalised coordinates) mapping output to input."""
    k = m.shape[0]
    theta = torch.eye(2, 3, device=m.device).repeat(k, 1, 1)
    if name == "rotate":
        a = m * math.pi / 180.0
        cos, sin = torch.cos(a), torch.sin(a)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    elif name == "shear_x":
        theta[:, 0, 1] = m * h / w
    elif name == "shear_y":
        theta[:, 1, 0] = m * w / h
    elif name == "translate_x":
        theta[:, 0, 2] = 2.0 * m
    elif name == "translate_y":
        theta[:, 1, 2] = 2.0 * m
    return theta


def _warp(x: torch.Tensor, theta: torch.Tensor, fill: int) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Warp (x - fill) with zero padding so uncovered pixels come out as ``fill``.
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _cutout(x: torch.Tensor, g: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    n, _, h, w = x.shape
    max_len = max(1, int(round(cfg.cutout_fraction * min(h, w))))
    length = torch.randint(1, max_len + 1, (n,), generator=g).to(x.device)
    cy = torch.randint(0, h, (n,), generator=g).to(x.device)
    cx = torch.randint(0, w, (n,), generator=g).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    half = torch.div(length, 2, rounding_mode="floor")[:, None]
    in_y = (ys >= cy[:, None] - half) & (ys < cy[:, None] - half + length[:, None])  # (N, H)
    in_x = (xs >= cx[:, None] - half) & (xs < cx[:, None] - half + length[:, None])  # (N, W)
    hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (N, 1, H, W)
    return torch.where(hole, torch.full_like(x, float(cfg.cutout_fill)), x)


def make_views(
    images: torch.Tensor, g: torch.Generator, cfg: ViewConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weak, strong) views of one uint8 batch."""
    cfg = cfg or ViewConfig()
    return weak_view(images, g, cfg), strong_view(images, g, cfg)
