"""Feature extractors f(θ; ·) for CDC and SPICE.

* ``resnet18`` / ``resnet34`` / ``resnet50`` – torchvision ResNets with either the **CIFAR stem**
  (3×3 conv, stride 1, no max-pool; CDC appendix B.1, SPICE §IV-B) for small images or the standard
  **ImageNet stem** (7×7 conv, stride 2, max-pool). ``stem="auto"`` picks CIFAR for inputs ≤ 64 px.
  The module *is* the torchvision ResNet (``fc`` replaced by identity), so torchvision and MoCo
  state dicts load without renaming beyond their prefixes.
* ``small`` – a ~0.3 M-parameter residual CNN with a stride-2 stem, the backbone that trains at a
  useful speed on 2 CPU cores (tests, quick start).
* ``timm:NAME`` – any timm model (``pip install 'calibclust[timm]'``), built with
  ``num_classes=0`` so that it returns globally pooled features. ``stem`` does not apply. Models
  with a fixed input size (ViTs, Swin, ...) are built for ``input_size`` (``img_size``; pretrained
  position embeddings are resampled by timm); all others take any size.

Every backbone maps a normalised float batch ``(N, 3, H, W)`` to features ``(N, feature_dim)``
and carries ``feature_dim`` and ``spec`` (the keyword arguments that rebuild it).
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

from calibclust.errors import InputError, MissingDependencyError
from calibclust.models.names import BACKBONES, INPUT_FILTERS, TIMM_PREFIX, is_timm, timm_model_name

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
    (:mod:`calibclust.models.weights`). ``stem`` and ``width`` do not apply to ``timm:NAME``."""
    if is_timm(name):
        return build_timm_backbone(name, input_size)
    if name == "small":
        model = SmallResNet(width=width)
        model.spec = {"name": name, "input_size": int(input_size), "stem": "stride2", "width": int(width)}
        return model
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)} or {TIMM_PREFIX}NAME")
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


def import_timm():
    """The ``timm`` module, or :class:`MissingDependencyError` naming the ``timm`` extra."""
    try:
        import timm
    except ImportError:
        raise MissingDependencyError("timm", "timm", f"{TIMM_PREFIX}NAME backbones") from None
    return timm


def check_timm_name(model_name: str) -> None:
    """:class:`InputError` unless timm knows ``model_name`` (``ARCH`` or ``ARCH.TAG``), naming
    close matches; a known architecture with an unknown pretrained tag lists its tags."""
    timm = import_timm()
    arch, _, tag = model_name.partition(".")
    if not timm.is_model(arch):
        known = timm.list_models()
        close = _close_matches(arch, timm.list_models(f"*{arch}*"), known)
        hint = f"; close matches: {', '.join(close)}" if close else f"; list them with: python -c \"import timm; print(timm.list_models('*{arch[:4]}*'))\""
        raise InputError(f"timm has no model {arch!r} ({len(known)} models known to timm {timm.__version__}){hint}")
    if tag:
        from timm.models import get_pretrained_cfg

        try:
            get_pretrained_cfg(model_name)
        except RuntimeError:
            tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
            raise InputError(f"timm has no pretrained tag {tag!r} for {arch}; choose from {', '.join(tags) or '(none)'}") from None


def _close_matches(name: str, containing: list[str], known: list[str], n: int = 8) -> list[str]:
    # Names that contain the text, or resemble it, ranked: same prefix first, then by similarity
    # (alphabetical order alone would put convit_small before vit_small_patch16_224).
    pool = set(containing) | set(difflib.get_close_matches(name, known, n=n, cutoff=0.6))
    return sorted(pool, key=lambda m: (not m.startswith(name), -difflib.SequenceMatcher(None, name, m).ratio(), m))[:n]


def create_timm_model(model_name: str, input_size: int, pretrained: bool = False) -> nn.Module:
    """``timm.create_model(model_name, num_classes=0)``: pooled features, no classifier.

    Models with a fixed input size get ``img_size=input_size`` even at their default size, so
    that the module does not depend on which pretrained tag timm takes as the default.
    """
    timm = import_timm()
    from timm.models import get_pretrained_cfg

    check_timm_name(model_name)
    cfg = get_pretrained_cfg(model_name)
    default_size = int(cfg.input_size[-1]) if cfg is not None else None
    fixed = bool(cfg is not None and cfg.fixed_input_size)
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **({"img_size": int(input_size)} if fixed else {}))
    except TypeError as exc:
        if not (fixed and "img_size" in str(exc)):
            raise
    # A fixed-size model without an img_size argument: usable at its own size only.
    if default_size != int(input_size):
        raise InputError(
            f"timm model {model_name} only takes {default_size}x{default_size} inputs (it cannot be built for "
            f"{input_size}x{input_size}); resize the images to {default_size} or choose another model"
        )
    return timm.create_model(model_name, pretrained=pretrained, num_classes=0)


def build_timm_backbone(name: str, input_size: int = 224, pretrained: bool = False) -> nn.Module:
    """``timm:NAME`` backbone with ``feature_dim`` and ``spec``; random init unless ``pretrained``
    (timm's own download, see :func:`calibclust.models.weights.load_backbone` for the errors)."""
    model_name = timm_model_name(name)
    model = create_timm_model(model_name, input_size, pretrained=pretrained)
    # head_hidden_size, not num_features: models with a pre-logits layer after pooling (MobileNetV3:
    # 288 pooled channels -> 1024) return head_hidden_size features when num_classes=0.
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    model.spec = {"name": name, "input_size": int(input_size)}
    return model


class L2Normalized(nn.Module):
    """A backbone whose features are L2-normalised rows: the features ``calibclust embed`` writes.
    A model trained on such features (``train cdc --features``) carries this wrapper, so that it
    sees at inference (and in its ONNX graph) the features it was trained on."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.feature_dim = inner.feature_dim
        self.spec = {"name": L2_NORMALIZED, "input_size": inner.spec.get("input_size"), "inner": dict(inner.spec)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.inner(x), dim=1)


L2_NORMALIZED = "l2-normalized"


class GradientInput(nn.Module):
    """A backbone that sees the edges of the image, not its colours: the per-pixel magnitude of the
    Sobel gradients of the three channels, sqrt(Σ_c (∂x I_c)² + (∂y I_c)²), divided by its
    maximum over the image and given to ``inner`` on all three channels.

    A fixed front end, as DeepCluster ("Deep Clustering for Unsupervised Learning of Visual
    Features", §4) and IIC feed Sobel-filtered images to stop clustering by colour: the magnitude is
    blind to ink/paper polarity and to the colour pair, and the per-image division to contrast. It
    runs inside the backbone, so training, ``calibclust embed`` and the exported ONNX graph apply
    the same transform. Where colour *is* the class it throws that information away.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.feature_dim = inner.feature_dim
        self.spec = {"name": GRADIENT_INPUT, "input_size": inner.spec.get("input_size"), "inner": dict(inner.spec)}
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        # (6, 1, 3, 3) with groups=3: ∂x and ∂y of each input channel. Not a state-dict entry: fixed.
        self.register_buffer("sobel", torch.stack([sobel_x, sobel_x.T]).repeat(3, 1, 1).unsqueeze(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Replicated borders: zero padding would draw an edge around every normalised image.
        gradients = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.sobel.to(x.dtype), groups=3)
        magnitude = gradients.square().sum(1, keepdim=True).add(1e-12).sqrt()
        # A flat image stays near zero instead of being scaled up to its noise (0.05 ≈ one grey level
        # of 255 after the usual normalisation, through the Sobel weights).
        magnitude = magnitude / magnitude.amax(dim=(2, 3), keepdim=True).clamp_min(0.05)
        return self.inner(magnitude.expand(-1, 3, -1, -1))


GRADIENT_INPUT = "gradient-input"
_WRAPPERS = {L2_NORMALIZED: (L2Normalized, "l2"), GRADIENT_INPUT: (GradientInput, "gradient")}


def with_input_filter(backbone: nn.Module, input_filter: str) -> nn.Module:
    """``backbone`` behind the named input filter (:data:`INPUT_FILTERS`)."""
    if input_filter not in INPUT_FILTERS:
        raise ValueError(f"input filter must be one of {INPUT_FILTERS}, got {input_filter!r}")
    return GradientInput(backbone) if input_filter == "gradient" else backbone


def backbone_label(module: nn.Module) -> str:
    """The architecture's name for metadata and tables (``resnet18``; ``resnet18+l2``,
    ``small+gradient`` when wrapped)."""
    spec, suffixes = module.spec, []
    while spec["name"] in _WRAPPERS:
        suffixes.insert(0, _WRAPPERS[spec["name"]][1])
        spec = spec["inner"]
    return "+".join([spec["name"], *suffixes])


def backbone_from_spec(spec: dict) -> nn.Module:
    """Rebuild a backbone from its ``spec`` (as stored in checkpoint JSON)."""
    spec = dict(spec)
    if spec["name"] in _WRAPPERS:
        return _WRAPPERS[spec["name"]][0](backbone_from_spec(spec["inner"]))
    name = spec.pop("name")
    stem = spec.pop("stem", "auto")
    if name == "small":
        stem = "auto"
    return build_backbone(name, stem=stem, **spec)


def backbone_spec(module: nn.Module) -> dict:
    return dict(module.spec)
