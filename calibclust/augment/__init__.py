"""MoCo-v2 augmentations applied to a whole batch at once, on the batch's device.

The MoCo-v2 view generator (Chen et al., 2020b "Improved baselines with momentum contrastive
learning", used by SPICE §III-A / §IV-A and CDC appendix B.1) is, per image::

    RandomResizedCrop(scale=(0.2, 1)) -> ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8
    -> RandomGrayscale(p=0.2) -> GaussianBlur(sigma in [0.1, 2]) with p=0.5 -> HorizontalFlip(p=0.5)

CDC appendix B.1 drops the blur for 32x32 images ("except for CIFAR-10 and CIFAR-20 due to the
size of image"); ``blur="auto"`` does the same for images of 32 px or less.

Why batched: per-image PIL/torchvision pipelines cost more than the forward/backward pass of a
small network on CPU (measured ~5x on 2 cores). Here every step is one tensor op over the batch with
per-sample parameters: crop + resize + flip is a single ``affine_grid``/``grid_sample``, jitter
uses per-sample factors (and a per-sample random order of the four jitter ops, as torchvision),
blur is one grouped separable convolution.

All random parameters are drawn on the CPU from a caller-supplied ``torch.Generator``, so a
given generator state gives the same views on CPU and CUDA, and a training run can be resumed
bit-for-bit by re-creating the generator (see :mod:`calibclust.pretrain`).

The weak and strong views of CDC and SPICE (:mod:`calibclust.augment.views`) are built from the
same crop (:class:`MoCoAugment`) and colour blends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # annotations only
    import torch

from calibclust.config import Config

# torch is imported inside the functions: the CLI imports AugmentConfig (via calibclust.pretrain)
# and must start without loading torch.

# Same normalisation as calibclust.models.clustering.ClusteringModel's defaults, so a pretrained
# backbone sees the inputs it was trained on when the clustering model wraps it.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.25, 0.25, 0.25)
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_GRAY = (0.2989, 0.587, 0.114)


@dataclass
class AugmentConfig(Config):
    """MoCo-v2 augmentation set (Chen et al. 2020b; CDC appendix B.1). Defaults are MoCo-v2's."""

    TITLE: ClassVar[str] = "augmentation settings"

    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop(scale=(0.2, 1.)) in MoCo-v2
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision's default aspect range
    flip_p: float = 0.5
    jitter_p: float = 0.8  # RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2  # RandomGrayscale(p=0.2)
    blur: str = "auto"  # "auto": only for images > 32 px (CDC appendix B.1); "on" / "off"
    blur_p: float = 0.5  # RandomApply([GaussianBlur([.1, 2.])], p=0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    # Beyond MoCo-v2 (all off in its preset): invariance to nuisances it does not cover.
    # Geometry: RandomResizedCrop only ever zooms in; with probability zoom_out_p a view is also
    # shrunk to zoom_out_scale of the frame (the border pixels fill the rest), rotated by up to
    # ±rotation degrees and shifted by up to translate of the frame.
    zoom_out_p: float = 0.0
    zoom_out_scale: tuple[float, float] = (0.6, 1.0)
    rotation: float = 0.0
    translate: float = 0.0
    # Colour: per-view RGB channel permutation and inversion (ink/paper polarity), after jitter.
    channel_shuffle_p: float = 0.0
    invert_p: float = 0.0
    preset: str = "mocov2"  # the AUGMENT_PRESETS entry these values started from (recorded in runs)

    def _coerce(self) -> None:
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "mean", "std", "zoom_out_scale"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))

    def problems(self) -> list[str]:
        problems = []
        lo, hi = self.zoom_out_scale
        if not 0.0 < lo <= hi <= 1.0:
            problems.append(f"zoom_out_scale must satisfy 0 < lo <= hi <= 1, got {self.zoom_out_scale}")
        if (self.rotation > 0 or self.translate > 0) and self.zoom_out_p == 0:
            problems.append("rotation and translate apply with the geometric jitter's probability zoom_out_p; "
                            "set zoom_out_p > 0")
        if not 0.0 <= self.rotation <= 180.0 or not 0.0 <= self.translate <= 0.5:
            problems.append(f"rotation must be in [0, 180] degrees and translate in [0, 0.5], got "
                            f"{self.rotation} and {self.translate}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "zoom_out_p", "channel_shuffle_p", "invert_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                problems.append(f"{name} must be a probability in [0, 1], got {p}")
        if self.blur not in ("auto", "on", "off"):
            problems.append(f"blur must be 'auto', 'on' or 'off', got {self.blur!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            problems.append(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        if not 0.0 <= self.hue <= 0.5:
            problems.append(f"hue must be in [0, 0.5], got {self.hue}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean and std need 3 values each, std > 0")
        return problems

    def blur_enabled(self, image_size: int) -> bool:
        return self.blur == "on" or (self.blur == "auto" and image_size > 32)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "AugmentConfig":
        """The named preset (:data:`AUGMENT_PRESETS`), with ``overrides`` on top."""
        if name not in AUGMENT_PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r}; choose from {', '.join(AUGMENT_PRESETS)}")
        return cls(**{**AUGMENT_PRESETS[name], **overrides, "preset": name})

    @property
    def geometric(self) -> bool:
        return self.zoom_out_p > 0 and (self.zoom_out_scale[0] < 1 or self.rotation > 0 or self.translate > 0)


_GEOMETRY = {"zoom_out_p": 0.5, "zoom_out_scale": (0.6, 1.0), "rotation": 15.0, "translate": 0.1}
_COLOUR = {"channel_shuffle_p": 0.5, "invert_p": 0.5, "hue": 0.5, "brightness": 0.8, "contrast": 0.8,
           "saturation": 0.8}
# Named augmentation sets (``--augment``). "mocov2" is MoCo-v2 as published; "geometry" adds zoom-out,
# rotation and shift (digits drawn smaller or turned are the same digit); "colour" adds full hue
# rotation, channel permutation, inversion and twice the jitter (colour that varies per image,
# independently of the class, must not become the cluster); "robust" is both.
AUGMENT_PRESETS: dict[str, dict] = {
    "mocov2": {},
    "geometry": dict(_GEOMETRY),
    "colour": dict(_COLOUR),
    "robust": {**_GEOMETRY, **_COLOUR},
}


@dataclass
class AugmentParams:
    """Per-sample parameters of one batch of views (all CPU tensors, first dim = batch)."""

    crop: torch.Tensor  # (N, 4) float: top, left, height, width in input pixels
    flip: torch.Tensor  # (N,) bool
    jitter: torch.Tensor  # (N,) bool: colour jitter applied
    factors: torch.Tensor  # (N, 4) float: brightness, contrast, saturation, hue
    order: torch.Tensor  # (N, 4) int64: permutation of the four jitter ops
    gray: torch.Tensor  # (N,) bool
    blur_sigma: torch.Tensor | None = None  # (N,) float, 0 = no blur; None when blur is off
    extra: dict = field(default_factory=dict)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]; float NCHW input passes through."""
    import torch

    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div_(255.0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images (N, 3, H, W), got {tuple(images.shape)}")
    return images.float()


def normalize(x: torch.Tensor, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> torch.Tensor:
    """(x - mean) / std per channel on an (N, 3, H, W) float batch."""
    import torch

    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def preprocess(images: torch.Tensor, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> torch.Tensor:
    """The no-augmentation path (embedding, evaluation): uint8 NHWC -> normalised float NCHW."""
    return normalize(to_float(images), mean, std)


# --- colour ops on float (N, 3, H, W) in [0, 1], per-sample factors of shape (N,) -------------


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    import torch

    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio · a + (1 − ratio) · b per sample, clamped to [0, 1]."""
    r = ratio.view(-1, 1, 1, 1).to(a.dtype)
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1).to(x.dtype)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (in turns, [-0.5, 0.5]) per sample, as torchvision's ``adjust_hue``.

    Hue is computed as in torchvision's ``_rgb2hsv``. A hue rotation keeps value V = max and
    chroma C = max - min, so instead of a full HSV -> RGB round trip we use the closed form
    ``c_n = V - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 H) mod 6``, n = 5, 3, 1 for
    R, G, B: the same map in fewer full-batch ops.
    """
    import torch

    r, g, b = x.unbind(1)
    maxc = x.max(1).values
    minc = x.min(1).values
    chroma = maxc - minc
    div = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc = (maxc - r) / div
    gc = (maxc - g) / div
    bc = (maxc - b) / div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    h6 = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)  # 6 * hue (mod 6)
    h6 = h6 + 6.0 * shift.view(-1, 1, 1).to(x.dtype)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` (N,), reflect padding, one grouped conv.

    The kernel spans ±3σ_max (odd size, at most the image size), like torchvision's
    ``GaussianBlur`` with a kernel large enough for the largest σ.
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.device, x.dtype).clamp_min(1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, K)
    kernel = kernel.repeat_interleave(c, 0)  # (N*C, K): one kernel per (sample, channel) group
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def resized_crop(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, out_size: tuple[int, int],
                 geometry: torch.Tensor | None = None) -> torch.Tensor:
    """Crop boxes (top, left, height, width; input pixels) resized bilinearly to ``out_size``,
    mirrored where ``flip``, for the whole batch at once.

    ``geometry`` (N, 4): scale s, angle (radians), shift x, shift y (normalised output coordinates):
    the crop is shrunk to s of the frame, rotated and moved; outside it the image continues and
    beyond the image the border pixels repeat. Angles are in normalised coordinates (exact for
    square outputs).

    With ``align_corners=False`` the sampling grid follows the half-pixel convention of
    ``F.interpolate(..., mode="bilinear")`` (no antialiasing: crops are mostly enlarged), so a
    full-image box is an exact identity.
    """
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    top, left, ch, cw = crop.to(x.device, x.dtype).unbind(1)
    flip = flip.to(x.device)
    sx = cw / w
    sy = ch / h
    tx = (2.0 * left + cw) / w - 1.0
    ty = (2.0 * top + ch) / h - 1.0
    sx = torch.where(flip, -sx, sx)
    zeros = torch.zeros_like(sx)
    if geometry is None:
        theta = torch.stack((torch.stack((sx, zeros, tx), 1), torch.stack((zeros, sy, ty), 1)), 1)  # (N, 2, 3)
    else:
        # Output point u maps to crop point v = R(-angle) (u - shift) / s, then to the input as before.
        scale, angle, ox, oy = geometry.to(x.device, x.dtype).unbind(1)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        a00, a01, a10, a11 = sx * cos, sx * sin, -sy * sin, sy * cos
        theta = torch.stack((torch.stack((a00, a01, tx - a00 * ox - a01 * oy), 1),
                             torch.stack((a10, a11, ty - a10 * ox - a11 * oy), 1)), 1)
    grid = F.affine_grid(theta, (n, 3, out_size[0], out_size[1]), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class MoCoAugment:
    """Batched MoCo-v2 view generator. ``aug(images_uint8_nhwc, generator)`` -> normalised float NCHW.

    ``sample`` and ``apply`` are separate so that tests (and callers that want two views from the
    same crop, say) can fix the parameters.
    """

    def __init__(self, config: AugmentConfig | None = None, out_size: int | tuple[int, int] | None = None):
        self.config = config or AugmentConfig()
        self.out_size = (out_size, out_size) if isinstance(out_size, int) else out_size

    def sample(self, n: int, height: int, width: int, generator: torch.Generator) -> AugmentParams:
        import torch

        cfg = self.config
        g = generator
        # RandomResizedCrop.get_params, vectorised: 10 tries per image, first valid one wins,
        # else the central crop with the aspect ratio clamped into range (torchvision's fallback).
        tries = 10
        area = float(height * width)
        target = area * torch.empty(n, tries).uniform_(cfg.crop_scale[0], cfg.crop_scale[1], generator=g)
        log_r = torch.empty(n, tries).uniform_(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator=g)
        aspect = torch.exp(log_r)
        cw = torch.round(torch.sqrt(target * aspect))
        ch = torch.round(torch.sqrt(target / aspect))
        valid = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
        first = valid.float().argmax(1)
        cw = cw.gather(1, first[:, None]).squeeze(1)
        ch = ch.gather(1, first[:, None]).squeeze(1)
        any_valid = valid.any(1)
        if not bool(any_valid.all()):
            in_ratio = width / height
            if in_ratio < cfg.crop_ratio[0]:
                fw, fh = width, round(width / cfg.crop_ratio[0])
            elif in_ratio > cfg.crop_ratio[1]:
                fh, fw = height, round(height * cfg.crop_ratio[1])
            else:
                fw, fh = width, height
            cw = torch.where(any_valid, cw, torch.tensor(float(fw)))
            ch = torch.where(any_valid, ch, torch.tensor(float(fh)))
        u = torch.rand(n, 2, generator=g)
        top = torch.floor(u[:, 0] * (height - ch + 1))
        left = torch.floor(u[:, 1] * (width - cw + 1))
        centre_top, centre_left = torch.round((height - ch) / 2), torch.round((width - cw) / 2)
        top = torch.where(any_valid, top, centre_top)
        left = torch.where(any_valid, left, centre_left)
        crop = torch.stack((top, left, ch, cw), 1)

        flip = torch.rand(n, generator=g) < cfg.flip_p
        jitter = torch.rand(n, generator=g) < cfg.jitter_p
        lo_hi = [
            (max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
            (max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
            (max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
            (-cfg.hue, cfg.hue),
        ]
        u = torch.rand(n, 4, generator=g)
        factors = torch.stack([lo + (hi - lo) * u[:, i] for i, (lo, hi) in enumerate(lo_hi)], 1)
        order = torch.rand(n, 4, generator=g).argsort(1)  # per-sample random op order, as torchvision
        gray = torch.rand(n, generator=g) < cfg.grayscale_p
        blur_sigma = None
        out_h = self.out_size[0] if self.out_size else height
        if cfg.blur_enabled(out_h):
            apply = torch.rand(n, generator=g) < cfg.blur_p
            sig = torch.empty(n).uniform_(cfg.blur_sigma[0], cfg.blur_sigma[1], generator=g)
            blur_sigma = torch.where(apply, sig, torch.zeros_like(sig))
        extra = {}
        if cfg.geometric:
            on = torch.rand(n, generator=g) < cfg.zoom_out_p
            u = torch.rand(n, 4, generator=g)
            scale = cfg.zoom_out_scale[0] + (cfg.zoom_out_scale[1] - cfg.zoom_out_scale[0]) * u[:, 0]
            angle = math.radians(cfg.rotation) * (2 * u[:, 1] - 1)
            # Shift: anywhere the shrunk view still fits, plus up to `translate` of the frame.
            room = (1 - scale) + 2 * cfg.translate
            shift = room[:, None] * (2 * u[:, 2:] - 1)
            geometry = torch.stack((scale, angle, shift[:, 0], shift[:, 1]), 1)
            identity = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4)
            extra["geometry"] = torch.where(on[:, None], geometry, identity)
        if cfg.channel_shuffle_p > 0:
            shuffle = torch.rand(n, generator=g) < cfg.channel_shuffle_p
            perm = torch.rand(n, 3, generator=g).argsort(1)
            extra["channels"] = torch.where(shuffle[:, None], perm, torch.arange(3).expand(n, 3))
        if cfg.invert_p > 0:
            extra["invert"] = torch.rand(n, generator=g) < cfg.invert_p
        return AugmentParams(crop, flip, jitter, factors, order, gray, blur_sigma, extra)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        import torch

        cfg = self.config
        x = to_float(images)
        out_size = self.out_size or (x.shape[2], x.shape[3])
        x = resized_crop(x, params.crop, params.flip, out_size, params.extra.get("geometry"))
        dev = x.device
        jitter = params.jitter
        if bool(jitter.any()):
            # Ops whose factor is the identity for everyone are skipped (e.g. hue=0 in a config).
            active = [
                cfg.brightness > 0,
                cfg.contrast > 0,
                cfg.saturation > 0,
                cfg.hue > 0,
            ]
            for slot in range(4):
                for op_index, op in enumerate(_JITTER_OPS):
                    if not active[op_index]:
                        continue
                    sel = torch.nonzero(jitter & (params.order[:, slot] == op_index)).flatten()
                    if sel.numel() == 0:
                        continue
                    idx = sel.to(dev)
                    x[idx] = op(x[idx], params.factors[sel, op_index].to(dev))
        if "channels" in params.extra:
            x = x.gather(1, params.extra["channels"].to(dev)[:, :, None, None].expand_as(x))
        if "invert" in params.extra:
            x = torch.where(params.extra["invert"].to(dev).view(-1, 1, 1, 1), 1.0 - x, x)
        if bool(params.gray.any()):
            g = params.gray.to(dev).view(-1, 1, 1, 1)
            x = torch.where(g, grayscale(x).expand_as(x), x)
        if params.blur_sigma is not None and bool((params.blur_sigma > 0).any()):
            sel = torch.nonzero(params.blur_sigma > 0).flatten()
            idx = sel.to(dev)
            x[idx] = gaussian_blur(x[idx], params.blur_sigma[sel])
        return normalize(x, cfg.mean, cfg.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch

        if images.dtype == torch.uint8:
            n, h, w = images.shape[0], images.shape[1], images.shape[2]
        else:
            n, h, w = images.shape[0], images.shape[2], images.shape[3]
        return self.apply(images, self.sample(n, h, w, generator))
