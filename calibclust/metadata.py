"""The model metadata schema: the one description of a trained/exported model.

It travels in three places and is the same document in each:
* ``config.json`` beside a checkpoint's ``model.safetensors`` (key ``"metadata"``),
* the ONNX file's ``metadata_props`` under the key :data:`ONNX_METADATA_KEY` (the model contract:
  calibclust/contract.py),
* the JSON sidecar of a TensorRT engine.

Torch-free: serving reads it without the training stack. Unknown keys are rejected, so a typo or a
file from a newer calibclust is caught instead of silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from calibclust.errors import CalibclustError

SCHEMA_VERSION = 1
MAX_METADATA_CHARS = 4 << 20  # exemplar thumbnails live in a sidecar; real metadata is a few kB
ONNX_METADATA_KEY = "calibclust"
OUTPUT_NAMES = ("probs", "confidence", "label", "ood_score", "embedding")
# A method's registry name (calibclust.train.methods): serving does not depend on which method trained
# a model, so any well-formed name is accepted and a new method needs no change here.
METHOD_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# How the decoder (calibclust.io.images.resize_image) brings an image to the model's input size.
RESIZE_POLICIES = ("squash", "center-crop", "letterbox")
PROBS_HEADS = ("calibration", "clustering", "spice")


class MetadataError(CalibclustError):
    """A model's metadata is missing, of another schema version, or inconsistent with its graph."""


@dataclass
class OODSpec:
    """How ``ood_score`` is computed in the graph; higher always means more out-of-distribution."""

    score: str = "msp"  # msp | energy | prototype | knn
    threshold: float | None = None  # flags OOD above this; fitted at 95% in-distribution acceptance
    fitted_tpr: float = 0.95
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"k": 10, "bank_size": 2048}
    benchmark: dict[str, Any] = field(default_factory=dict)  # measured AUROCs behind the choice


@dataclass
class ModelMetadata:
    num_clusters: int
    input_size: tuple[int, int]  # (H, W) of the uint8 NHWC input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    method: str = "cdc"
    cluster_names: list[str] = field(default_factory=list)
    probs_head: str = "calibration"
    calibrated: bool = True  # False for models whose probs are not from a calibration head
    backbone: str = ""
    embedding_dim: int | None = None
    ood: OODSpec = field(default_factory=OODSpec)
    confidence_threshold: float = 0.5
    train_stats: dict[str, Any] = field(default_factory=dict)  # mean confidence, n_images, ...
    parity: dict[str, Any] = field(default_factory=dict)  # export's torch-vs-runtime figures
    weights_digest: str = ""
    exemplars: str | None = None  # sidecar file name (relative to the model file) with thumbnails
    precision: str = "fp32"  # fp32 | int8 | fp16
    resize: str = "squash"  # how images reach input_size (calibclust.io.images.RESIZE_POLICIES)
    schema_version: int = SCHEMA_VERSION
    calibclust_version: str = ""

    def __post_init__(self):
        from calibclust import __version__

        if not self.calibclust_version:
            self.calibclust_version = __version__
        try:
            self.input_size = tuple(int(v) for v in self.input_size)
            self.mean = tuple(float(v) for v in self.mean)
            self.std = tuple(float(v) for v in self.std)
        except (TypeError, ValueError) as exc:
            raise MetadataError(f"invalid model metadata: input_size, mean and std must be lists of numbers ({exc})") from None
        if isinstance(self.ood, dict):
            self.ood = _build(OODSpec, self.ood, "ood")
        elif not isinstance(self.ood, OODSpec):
            raise MetadataError(f"invalid model metadata: ood must be an object, got {self.ood!r}")
        if not self.cluster_names and isinstance(self.num_clusters, int):
            self.cluster_names = [f"cluster_{i}" for i in range(self.num_clusters)]
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.schema_version != SCHEMA_VERSION:
            problems.append(
                f"schema_version is {self.schema_version}, this calibclust reads version {SCHEMA_VERSION}"
            )
        if not isinstance(self.num_clusters, int) or isinstance(self.num_clusters, bool) or self.num_clusters < 1:
            problems.append(f"num_clusters must be an integer >= 1, got {self.num_clusters!r}")
            raise MetadataError("invalid model metadata: " + "; ".join(problems))
        if not isinstance(self.cluster_names, list) or not all(isinstance(n, str) for n in self.cluster_names):
            raise MetadataError("invalid model metadata: cluster_names must be a list of strings")
        if len(self.cluster_names) != self.num_clusters:
            problems.append(
                f"{len(self.cluster_names)} cluster names for {self.num_clusters} clusters"
            )
        if len(set(self.cluster_names)) != len(self.cluster_names):
            problems.append("cluster names must be unique")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            problems.append(f"input_size must be (H, W), got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean and std need 3 values each, std > 0")
        if not isinstance(self.method, str) or not METHOD_NAME.fullmatch(self.method):
            problems.append(f"method must be a method's registry name (lower-case letters, digits, - or _), "
                            f"got {self.method!r}")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.probs_head not in PROBS_HEADS:
            problems.append(f"probs_head must be one of {PROBS_HEADS}, got {self.probs_head!r}")
        _check_number(problems, "confidence_threshold", self.confidence_threshold, 0.0, 1.0)
        # NaN would turn OOD rejection off without a word (every comparison with it is False).
        _check_number(problems, "ood.threshold", self.ood.threshold, allow_none=True)
        if problems:
            raise MetadataError("invalid model metadata: " + "; ".join(problems))

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=None, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetadata":
        if not isinstance(data, dict):
            raise MetadataError("model metadata must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise MetadataError(
                f"model metadata schema_version is {version!r}; this calibclust reads version "
                f"{SCHEMA_VERSION}. Re-export the model with this calibclust version."
            )
        return _build(cls, data, "metadata")

    @classmethod
    def from_json(cls, text: str) -> "ModelMetadata":
        if len(text) > MAX_METADATA_CHARS:
            raise MetadataError(f"model metadata is {len(text):,} characters; at most {MAX_METADATA_CHARS:,} are read")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"model metadata is not valid JSON: {exc}") from None
        except RecursionError:
            raise MetadataError("model metadata is nested too deeply to be read") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> "ModelMetadata":
        return dataclasses.replace(self, **changes)


def _check_number(problems: list[str], name: str, value, low: float = -math.inf, high: float = math.inf,
                  allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{name} must be a number, got {value!r}")
    elif not math.isfinite(value) or not low <= value <= high:
        bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low:g}, {high:g}]"
        problems.append(f"{name} must be a finite number{bounds}, got {value!r}")


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MetadataError(f"unknown keys in {where}: {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise MetadataError(f"incomplete {where}: {exc}") from None


def digest_arrays(named_arrays: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over (name, raw bytes) pairs in the given order: the weights digest."""
    h = hashlib.sha256()
    for name, raw in named_arrays:
        h.update(name.encode())
        h.update(raw)
    return "sha256:" + h.hexdigest()
