"""The settings of CDC's and SPICE's weak and strong views (:mod:`calibclust.augment.views` draws them).

Torch-free, so that the training commands build their options from its fields without loading
torch (``calibclust --help``); ``calibclust.augment.views.ViewConfig`` is the same class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from calibclust.config import Config


@dataclass
class ViewConfig(Config):
    """Augmentation settings (SCAN/SPICE defaults for 32 px images; scale with the image)."""

    TITLE: ClassVar[str] = "view settings"

    flip_p: float = 0.5
    crop: str = "shift"  # "shift": RandomCrop(32, padding=4) (SCAN/SPICE); "resized": RandomResizedCrop (CDC code)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # "resized": torchvision's default (the CDC configs set none)
    pad_fraction: float = 0.125  # RandomCrop(32, padding=4) → 4/32
    num_ops: int = 4  # strong view: RandAugment ops per image (SCAN num_strong_augs=4)
    cutout: bool = True
    cutout_fraction: float = 0.5  # max hole side / image side (SCAN length=16 at 32 px)
    cutout_fill: int = 127  # SCAN cuts after normalisation (fills the mean); mid-grey here
    fill: int = 0  # fill of pixels uncovered by shifts/rotations (PIL's default, black)

    def _coerce(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)

    def problems(self) -> list[str]:
        problems = []
        if not 0.0 <= self.flip_p <= 1.0:
            problems.append(f"flip_p must be in [0, 1], got {self.flip_p}")
        if self.num_ops < 0:
            problems.append(f"num_ops must be >= 0, got {self.num_ops}")
        if self.crop not in ("shift", "resized"):
            problems.append(f"crop must be 'shift' or 'resized', got {self.crop!r}")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            problems.append(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        return problems
