"""Backbone weights: our own checkpoints, and weights made elsewhere.

Our format (what ``calibclust pretrain`` writes, what ``calibclust embed --backbone`` and the
training methods read) is a directory with

* ``backbone.safetensors`` – the backbone's state dict, nothing pickled;
* ``backbone.json`` – ``{"format", "spec", "feature_dim", "mean", "std", "source"}``: ``spec``
  rebuilds the module (:func:`calibclust.models.backbones.backbone_from_spec`), ``mean``/``std``
  are the input normalisation the weights were trained with.

:func:`save_backbone` / :func:`load_backbone` are the one pair every caller uses.
:func:`load_backbone` also accepts

* a trained clustering model directory (``config.json`` + ``model.safetensors``): its backbone;
* ``torchvision`` / ``torchvision:IMAGENET1K_V2`` (with ``arch``): torchvision's ImageNet weights,
  from the torch hub cache or the internet, with a clear error when neither is available;
* ``timm`` / ``timm:TAG`` (with ``arch="timm:NAME"``, needs ``pip install 'calibclust[timm]'``):
  timm's pretrained weights for NAME (its default tag, or TAG, e.g. ``augreg_in21k``), from the
  Hugging Face cache or the Hub, with a clear error naming the cache when neither is available;
* a third-party file: ``.safetensors``, or a PyTorch ``.pth`` / ``.pth.tar`` / ``.pt`` (the
  MoCo-v2 checkpoints SCAN and SPICE users have) read with ``torch.load(weights_only=True)``.
  The key prefix (``module.encoder_q.``, ``module.backbone.``, ``encoder.``, ``backbone.``, ...)
  is found by matching against the target backbone; ``shortcut``/``downsample`` naming is
  reconciled; the architecture (ResNet-18/34/50, CIFAR or ImageNet stem) is inferred from the
  keys when ``arch`` is not given (``arch="timm:NAME"`` loads a timm model's checkpoint the same
  way). What did not load is reported (:class:`WeightLoadReport`).

A ``timm:NAME`` backbone saved with :func:`save_backbone` is rebuilt from its spec without timm
downloading anything (random init, then our weights).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from calibclust.errors import CalibclustError, InputError
from calibclust.models.backbones import BACKBONES, backbone_from_spec, backbone_spec, build_backbone
from calibclust.models.names import TIMM_PREFIX, is_timm, timm_model_name

BACKBONE_FORMAT = "calibclust-backbone/1"
BACKBONE_WEIGHTS, BACKBONE_CONFIG = "backbone.safetensors", "backbone.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin")
# Keys under these prefixes belong to the momentum (key) encoder or the queue of a MoCo
# checkpoint; they are never the backbone we want, even when their names would match.
_MOMENTUM_PREFIXES = ("encoder_k.", "momentum_encoder.", "model_ema.", "ema.", "teacher.")
# Containers in which training scripts nest the state dict.
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "network", "backbone", "encoder", "module")


class WeightsError(CalibclustError):
    """Weights could not be found, read, or matched to the backbone."""


@dataclass
class WeightLoadReport:
    """What happened when third-party weights were loaded into a backbone."""

    source: str
    prefix: str = ""  # stripped from the checkpoint's keys
    renamed: str = ""  # e.g. "shortcut. -> downsample."
    loaded: list[str] = field(default_factory=list)  # backbone keys that received a tensor
    missing: list[str] = field(default_factory=list)  # backbone keys left at their initial value
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys (under prefix) with no home
    shape_mismatch: list[str] = field(default_factory=list)  # "key: ckpt (..) vs backbone (..)"
    ignored: int = 0  # checkpoint keys outside the prefix (momentum encoder, queue, heads)

    @property
    def ok(self) -> bool:
        return bool(self.loaded) and not self.missing and not self.shape_mismatch

    def summary(self) -> str:
        lines = [
            f"{self.source}: loaded {len(self.loaded)} tensors"
            + (f" (prefix {self.prefix!r} stripped)" if self.prefix else "")
            + (f" ({self.renamed})" if self.renamed else "")
            + (f"; {self.ignored} checkpoint keys outside it ignored" if self.ignored else "")
        ]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}, left at random init): {_short(self.missing)}")
        if self.shape_mismatch:
            lines.append(f"  shape mismatch ({len(self.shape_mismatch)}, skipped): {_short(self.shape_mismatch)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}, unused): {_short(self.unexpected)}")
        return "\n".join(lines)


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


# --- our own format -----------------------------------------------------------------------------


def save_backbone(
    module: nn.Module,
    out_dir: str | os.PathLike,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    source: dict | None = None,
) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` into ``out_dir`` (created); returns it.

    ``mean``/``std`` default to the module's ``normalization`` attribute (set by
    :func:`load_backbone`), else to the augmentation defaults. Each file is replaced atomically.
    """
    from safetensors.torch import save_file

    from calibclust.augment import DEFAULT_MEAN, DEFAULT_STD

    norm = getattr(module, "normalization", None) or {}
    mean = tuple(float(v) for v in (mean or norm.get("mean") or DEFAULT_MEAN))
    std = tuple(float(v) for v in (std or norm.get("std") or DEFAULT_STD))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    config = {
        "format": BACKBONE_FORMAT,
        "spec": backbone_spec(module),
        "feature_dim": int(module.feature_dim),
        "mean": list(mean),
        "std": list(std),
        "source": source or getattr(module, "weights_source", None) or {},
    }
    tmp_w, tmp_c = out_dir / f".{BACKBONE_WEIGHTS}.tmp", out_dir / f".{BACKBONE_CONFIG}.tmp"
    save_file(state, str(tmp_w), metadata={"format": BACKBONE_FORMAT})
    tmp_c.write_text(json.dumps(config, indent=2))
    os.chmod(tmp_w, 0o644)  # safetensors writes 0600; a backbone is meant to be shared
    os.replace(tmp_w, out_dir / BACKBONE_WEIGHTS)
    os.replace(tmp_c, out_dir / BACKBONE_CONFIG)
    return out_dir


def _our_backbone_dir(path: Path) -> Path | None:
    directory = path if path.is_dir() else path.parent
    if (directory / BACKBONE_CONFIG).is_file() and (path.is_dir() or path.name in (BACKBONE_CONFIG, BACKBONE_WEIGHTS)):
        return directory
    return None


def read_backbone_config(path: str | os.PathLike) -> dict:
    """The ``backbone.json`` of one of our backbone checkpoints (directory or either file)."""
    directory = _our_backbone_dir(Path(path))
    if directory is None:
        raise WeightsError(f"{path} is not a calibclust backbone (needs {BACKBONE_CONFIG} and {BACKBONE_WEIGHTS})")
    config = json.loads((directory / BACKBONE_CONFIG).read_text())
    if config.get("format") != BACKBONE_FORMAT:
        raise WeightsError(f"{directory / BACKBONE_CONFIG}: format {config.get('format')!r}, expected {BACKBONE_FORMAT!r}")
    return config


def load_backbone(
    path: str | os.PathLike,
    arch: str | None = None,
    input_size: int | None = None,
    stem: str | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = False,
) -> nn.Module:
    """Load a backbone in eval mode, with ``normalization`` ({"mean", "std"}) set on the module.

    ``path`` is one of our backbone directories (or its ``backbone.json`` / ``backbone.safetensors``),
    a clustering model directory, ``torchvision[:WEIGHTS]`` (needs ``arch``), ``timm[:TAG]``
    (needs ``arch="timm:NAME"``; ``input_size`` defaults to the weights' own), or a third-party
    ``.safetensors`` / ``.pth(.tar)`` file (``arch`` inferred when omitted). For third-party
    weights, ``module.load_report`` holds the :class:`WeightLoadReport`; missing or mismatched keys
    are a warning, or a :class:`WeightsError` with ``strict=True``. ``stem`` does not apply to timm.
    """
    from safetensors.torch import load_file

    text = os.fspath(path)
    if text == "torchvision" or text.startswith("torchvision:"):
        if arch is None:
            raise InputError("torchvision weights need an architecture (arch='resnet18', 'resnet34' or 'resnet50')")
        weights_name = text.split(":", 1)[1] if ":" in text else "DEFAULT"
        state, mean, std, label = torchvision_state_dict(arch, weights_name)
        module = build_backbone(arch, input_size=input_size or 224, stem=stem or "imagenet")
        report = load_into(module, state, label)
        return _finish_third_party(module, report, mean, std, {"kind": "torchvision", "arch": arch, "weights": label}, strict, map_location)
    if text == "timm" or text.startswith(TIMM_PREFIX):
        module, label = timm_pretrained_backbone(arch, text.split(":", 1)[1] if ":" in text else "", input_size)
        cfg = module.pretrained_cfg
        # timm loaded every tensor itself (strictly; the classifier is dropped with num_classes=0).
        report = WeightLoadReport(source=f"timm {label}", loaded=sorted(module.state_dict()))
        source = {"kind": "timm", "arch": TIMM_PREFIX + label.partition(".")[0], "weights": label}
        return _finish_third_party(module, report, cfg["mean"], cfg["std"], source, strict, map_location)

    p = Path(text)
    if not p.exists():
        raise WeightsError(f"backbone weights not found: {p}")
    ours = _our_backbone_dir(p)
    if ours is not None:
        config = read_backbone_config(ours)
        module = backbone_from_spec(config["spec"])
        state = load_file(str(ours / BACKBONE_WEIGHTS), device=str(map_location))
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{ours}: weights do not match spec {config['spec']} (missing {missing[:5]}, unexpected {unexpected[:5]})")
        module.normalization = {"mean": list(config["mean"]), "std": list(config["std"])}
        module.weights_source = config.get("source") or {}
        return module.to(map_location).eval()

    model_dir = p if p.is_dir() else p.parent
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        from calibclust.models.clustering import load_model

        model, _ = load_model(model_dir, map_location=str(map_location))
        module = model.backbone
        module.normalization = {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
        module.weights_source = {"kind": "clustering-model", "path": str(model_dir)}
        return module.eval()
    if p.is_dir():
        raise WeightsError(f"{p} is a folder without {BACKBONE_CONFIG} (calibclust backbone) or config.json (calibclust model)")

    state = read_state_dict(p)
    if arch is None:
        arch, inferred_stem = infer_resnet_arch(state)
        stem = stem or inferred_stem
    if arch == "small":
        raise InputError("third-party weights cannot be loaded into the 'small' backbone; pass a ResNet arch")
    stem = stem or "auto"
    size = input_size or (32 if stem == "cifar" else 224)
    module = build_backbone(arch, input_size=size, stem=stem)
    report = load_into(module, state, str(p))
    return _finish_third_party(module, report, IMAGENET_MEAN, IMAGENET_STD, {"kind": "file", "path": str(p), "arch": arch}, strict, map_location)


def _finish_third_party(module, report, mean, std, source, strict, map_location):
    if not report.loaded:
        raise WeightsError(f"no tensor of {report.source} matches the {module.spec['name']} backbone:\n{report.summary()}")
    if not report.ok:
        if strict:
            raise WeightsError(report.summary())
        warnings.warn(report.summary(), stacklevel=3)
    module.load_report = report
    module.normalization = {"mean": list(mean), "std": list(std)}
    module.weights_source = source
    return module.to(map_location).eval()


# --- timm ----------------------------------------------------------------------------------------


def timm_pretrained_backbone(arch: str | None, tag: str = "", input_size: int | None = None) -> tuple[nn.Module, str]:
    """timm's pretrained ``arch`` (``timm:NAME`` or ``timm:NAME.TAG``), with pretrained ``tag`` when
    given (else the one in ``arch``, else timm's default): (backbone, label ``NAME.TAG``); the
    backbone's ``spec`` names the resolved ``timm:NAME.TAG``.

    Weights come from the Hugging Face cache or the Hub (timm's own download); offline without
    them this raises :class:`WeightsError` saying where the cache is and how to fill it.
    """
    if not arch or not is_timm(arch):
        raise InputError(
            f"timm weights need a timm architecture: arch='{TIMM_PREFIX}NAME', e.g. '{TIMM_PREFIX}resnet18' "
            f"(got {arch!r}); 'timm:TAG' picks one of its pretrained tags, e.g. timm:a1_in1k"
        )
    from calibclust.models.backbones import build_timm_backbone, check_timm_name

    name, _, arch_tag = timm_model_name(arch).partition(".")
    if tag and arch_tag and tag != arch_tag:
        raise InputError(f"two pretrained tags for {name}: {arch_tag!r} in arch {arch!r} and {tag!r} in timm:{tag}; give one")
    requested = name + (f".{tag or arch_tag}" if tag or arch_tag else "")
    check_timm_name(requested)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(requested)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for {name}; use it with random init ({TIMM_PREFIX}{name} as the backbone)")
    # Pin the resolved tag: the spec then rebuilds the same module whatever timm's default tag becomes.
    label = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    size = int(input_size or cfg.input_size[-1])
    try:
        module = build_timm_backbone(TIMM_PREFIX + label, size, pretrained=True)
    except CalibclustError:
        raise
    except Exception as exc:  # LocalEntryNotFoundError (offline), HTTP / connection errors, URLError
        raise WeightsError(_timm_download_help(label, cfg, exc)) from None
    return module, label


def _timm_download_help(label: str, cfg, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    head = f"could not get timm weights {label} ({type(exc).__name__}: {first})."
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    if cfg.hf_hub_id and constants is not None:
        cache = Path(constants.HF_HUB_CACHE)
        folder = "models--" + cfg.hf_hub_id.replace("/", "--")
        offline = " HF_HUB_OFFLINE is set, so nothing is downloaded." if constants.HF_HUB_OFFLINE else ""
        return (
            f"{head}{offline} They come from the Hugging Face Hub ({cfg.hf_hub_id}) through the cache {cache} "
            "(HF_HUB_CACHE sets it, or HF_HOME as HF_HOME/hub). Without internet: on a machine with internet run "
            f"`hf download {cfg.hf_hub_id}` (older huggingface_hub: `huggingface-cli download {cfg.hf_hub_id}`), "
            f"copy its cache folder {folder} into {cache} here, and set HF_HUB_OFFLINE=1; or pass the weights "
            f"file's path instead with arch='{TIMM_PREFIX}{cfg.architecture}'."
        )
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url or "")
    return (
        f"{head} Without internet, download {cfg.url} elsewhere and put it at {target} (or set TORCH_HOME), "
        f"or pass the file's path instead with arch='{TIMM_PREFIX}{cfg.architecture}'."
    )


# --- third-party weights ------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a PyTorch checkpoint (``weights_only=True``).

    Checkpoints that nest the weights (``{"state_dict": ...}``, ``{"model": ...}``, ...) are
    unwrapped. Pickled Python objects are refused (never unpickle a file a user hands us).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip / pickle), ...
        raise WeightsError(
            f"{path}: could not be read as weights-only PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). calibclust never unpickles arbitrary "
            "objects; if you trust the file, convert it yourself with: python -c \"import torch; "
            "from safetensors.torch import save_file; ck = torch.load('IN', weights_only=False); "
            "sd = ck.get('state_dict', ck); save_file({k: v.contiguous() for k, v in sd.items() "
            "if torch.is_tensor(v)}, 'OUT.safetensors')\""
        ) from None
    state = _unwrap_state_dict(obj)
    if state is None:
        raise WeightsError(f"{path}: no state dict of tensors found (top-level keys: {_short(sorted(map(str, obj)) if isinstance(obj, dict) else [type(obj).__name__])})")
    return state


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and sum(torch.is_tensor(v) for v in obj.values()) >= max(1, len(obj) // 2)


def _unwrap_state_dict(obj) -> dict[str, torch.Tensor] | None:
    if _is_tensor_dict(obj):
        return {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if key in obj:
                found = _unwrap_state_dict(obj[key])
                if found is not None:
                    return found
    return None


def _candidate_prefixes(keys, max_depth: int = 3) -> set[str]:
    prefixes = {""}
    for k in keys:
        parts = k.split(".")
        for depth in range(1, min(max_depth, len(parts) - 1) + 1):
            prefixes.add(".".join(parts[:depth]) + ".")
    return {p for p in prefixes if not any(p.startswith(m) or ("." + m) in p for m in _MOMENTUM_PREFIXES)}


_RENAMES = (("", ""), ("shortcut.", "downsample."), ("downsample.", "shortcut."))


def remap_state_dict(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, str]:
    """Pick the key prefix (and shortcut/downsample renaming) under which most checkpoint
    tensors land on a target key of the same shape; returns ``(remapped, prefix, renaming)``.

    Matching on names *and* shapes is what tells ``module.encoder_q.`` (the trained query
    encoder) from ``module.encoder_k.`` and heads; momentum-encoder prefixes are never chosen.
    """
    best = (-1, 0, "", ("", ""))
    for prefix in sorted(_candidate_prefixes(state.keys()), key=len):
        for old, new in _RENAMES:
            hits = 0
            for k, v in state.items():
                if not k.startswith(prefix):
                    continue
                name = k[len(prefix) :]
                if old:
                    name = name.replace(old, new)
                t = target.get(name)
                if t is not None and tuple(t.shape) == tuple(v.shape):
                    hits += 1
            # Most hits wins; on a tie the shorter prefix / no renaming (seen first) stays.
            if hits > best[0]:
                best = (hits, 0, prefix, (old, new))
    _, _, prefix, (old, new) = best
    remapped = {}
    for k, v in state.items():
        if k.startswith(prefix):
            name = k[len(prefix) :]
            remapped[name.replace(old, new) if old else name] = v
    return remapped, prefix, (f"{old} -> {new}" if old else "")


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> WeightLoadReport:
    """Load third-party ``state`` into ``module`` after :func:`remap_state_dict`; tensors whose
    name or shape does not fit are skipped and reported, never forced."""
    target = module.state_dict()
    remapped, prefix, renamed = remap_state_dict(state, target)
    report = WeightLoadReport(source=source, prefix=prefix, renamed=renamed)
    report.ignored = sum(1 for k in state if not k.startswith(prefix))
    usable = {}
    for name, tensor in remapped.items():
        t = target.get(name)
        if t is None:
            report.unexpected.append(name)
        elif tuple(t.shape) != tuple(tensor.shape):
            report.shape_mismatch.append(f"{name}: {tuple(tensor.shape)} vs {tuple(t.shape)}")
        else:
            usable[name] = tensor.to(t.dtype)
    module.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.unexpected.sort()
    report.shape_mismatch.sort()
    report.missing = sorted(k for k in target if k not in usable and not k.endswith("num_batches_tracked"))
    return report


def infer_resnet_arch(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(arch, stem) of a ResNet state dict from its block counts, block type and first conv."""
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    conv1 = None
    for k, v in state.items():
        if any(k.startswith(m) or ("." + m) in k for m in _MOMENTUM_PREFIXES):
            continue
        m = re.search(r"(?:^|\.)layer([1-4])\.(\d+)\.(conv\d)", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck |= m.group(3) == "conv3"
        elif re.search(r"(?:^|\.)conv1\.weight$", k) and v.ndim == 4 and v.shape[1] == 3:
            conv1 = v
    counts = tuple(len(blocks.get(i, ())) for i in (1, 2, 3, 4))
    table = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50"}
    arch = table.get((counts, bottleneck))
    if arch is None or conv1 is None:
        raise WeightsError(
            f"cannot tell the architecture from the checkpoint (blocks per stage {counts}, "
            f"bottleneck={bottleneck}); pass it explicitly, one of {', '.join(b for b in BACKBONES if b != 'small')}"
        )
    stem = "imagenet" if conv1.shape[-1] == 7 else "cifar"
    return arch, stem


def torchvision_state_dict(arch: str, weights: str = "DEFAULT"):
    """torchvision's ImageNet weights for ``arch``: (state dict, mean, std, label).

    Looks in the torch hub cache first (``$TORCH_HOME/hub/checkpoints``), then downloads;
    offline without a cached file this raises :class:`WeightsError` saying where to put it.
    """
    import torchvision

    if arch not in BACKBONES or arch == "small":
        raise InputError(f"torchvision weights exist for resnet18/34/50, not {arch!r}")
    enum = torchvision.models.get_model_weights(arch)
    try:
        w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        raise InputError(f"unknown torchvision weights {weights!r} for {arch}; choose from {', '.join(e.name for e in enum)}") from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    label = f"{arch}.{w.name}"
    mean = tuple(w.transforms().mean)
    std = tuple(w.transforms().std)
    if cache.is_file():
        return torch.load(str(cache), map_location="cpu", weights_only=True), mean, std, label
    try:
        state = torch.hub.load_state_dict_from_url(w.url, map_location="cpu", progress=True, check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, HTTPError, socket errors, hash mismatch
        raise WeightsError(
            f"could not get torchvision weights {label} ({type(exc).__name__}: {exc}). Without internet, "
            f"download {w.url} elsewhere and put it at {cache} (or set TORCH_HOME), or pass the file's path instead."
        ) from None
    return state, mean, std, label
