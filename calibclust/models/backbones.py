"""Feature extractors f(θ; ·) for CDC and SPICE.

* ``resnet18`` / ``resnet34`` / ``resnet50`` – torchvision ResNets with either the **CIFAR stem**
  (3×3 conv, stride 1, no max-pool; CDC appendix B.1, SPICE §IV-B) for small images or the standard
  **ImageNet stem** (7×7 conv, stride 2, max-pool). ``stem="auto"`` picks CIFAR for inputs ≤ 64 px.
  The module *is* the torchvision ResNet (``fc`` replaced by identity), so torchvision and MoCo
  state dicts load without renaming beyond their prefixes.
* ``small`` – a ~0.3 M-parameter residual CNN with a stride-2 stem, the backbone that trains at a
  useful speed on 2 CPU cores (tests, quick start).

Every backbone maps a normalised float batch ``(N, 3, H, W)`` to features ``(N, feature_dim)``
and carries ``feature_dim`` and ``spec`` (the keyword arguments that rebuild it).
"""

from __future__ import annotations

import torch
from torch import nn

BACKBONES = ("small", "resnet18", "resnet34", "resnet50")
STEMS = ("auto", "cifar", "imagenet")


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stride-2 stem + three residual stages (widths ``w, 2w, 4w``) + global average pooling.

    At 32×32 and ``width=32`` this is ~0.3 M parameters and ~10 M multiply-adds per image: the
    stride-2 stem quarters the cost of every later layer, which is what makes CPU training usable.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.layer1 = _BasicBlock(width, width)
        self.layer2 = _BasicBlock(width, 2 * width, stride=2)
        self.layer3 = _BasicBlock(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 4w)
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return torch.flatten(self.pool(x), 1)


def resolve_stem(stem: str, input_size: int) -> str:
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if stem == "auto":
        return "cifar" if input_size <= 64 else "imagenet"
    return stem


def build_backbone(name: str, input_size: int = 32, stem: str = "auto", width: int = 32) -> nn.Module:
    """Build a randomly initialised backbone. Pretrained weights are loaded separately
    (:mod:`calibclust.models.weights`)."""
    if name == "small":
        model = SmallResNet(width=width)
        model.spec = {"name": name, "input_size": int(input_size), "stem": "stride2", "width": int(width)}
        return model
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    resolved = resolve_stem(stem, input_size)
    if resolved == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    model.spec = {"name": name, "input_size": int(input_size), "stem": resolved}
    return model


def backbone_from_spec(spec: dict) -> nn.Module:
    """Rebuild a backbone from its ``spec`` (as stored in checkpoint JSON)."""
    spec = dict(spec)
    name = spec.pop("name")
    stem = spec.pop("stem", "auto")
    if name == "small":
        stem = "auto"
    return build_backbone(name, stem=stem, **spec)


def backbone_spec(module: nn.Module) -> dict:
    return dict(module.spec)
