"""Triton Inference Server model repository for an exported model.

Layout written::

    REPO/NAME/config.pbtxt
    REPO/NAME/calibclust_metadata.json      # the contract's metadata (Triton ignores extra files)
    REPO/NAME/<version>/model.onnx          # platform onnxruntime_onnx
    REPO/NAME/<version>/model.plan          # or platform tensorrt_plan (from a .engine + sidecar)

``config.pbtxt`` declares the contract's tensors without the batch axis (``max_batch_size`` > 0
makes Triton add it): ``images`` TYPE_UINT8 [H, W, 3]; ``probs`` [C]; ``embedding`` [D]; and the
per-image scalars ``confidence``, ``label``, ``ood_score`` as ``dims: [ 1 ]`` with
``reshape: { shape: [ ] }`` — the model produces them as [batch], and Triton requires a non-empty
``dims`` (Triton model-configuration docs, "Reshape"). Dynamic batching is on with the preferred
batch sizes and queue delay given.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from calibclust.contract import TensorSig, check_signature, read_engine_sidecar, read_model_metadata, signature_from_onnx
from calibclust.errors import InputError
from calibclust.metadata import ModelMetadata

_TRITON_TYPES = {
    "uint8": "TYPE_UINT8",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
}


@dataclass
class TritonConfig:
    name: str | None = None
    version: int = 1
    max_batch_size: int = 256
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [32, 256])
    max_queue_delay_us: int = 500
    instances: int = 1
    device: str | None = None  # cpu | gpu; default gpu for TensorRT plans, cpu for ONNX
    force: bool = False


def _quote(text: str) -> str:
    """A protobuf text-format string literal: C-style escapes only (no \\u escapes), UTF-8 kept."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def render_config(
    name: str,
    platform: str,
    metadata: ModelMetadata,
    outputs: list[TensorSig],
    config: TritonConfig,
) -> str:
    h, w = metadata.input_size
    kind = "KIND_GPU" if (config.device or ("gpu" if platform == "tensorrt_plan" else "cpu")) == "gpu" else "KIND_CPU"
    preferred = [b for b in config.preferred_batch_sizes if b <= config.max_batch_size]
    lines = [
        f"name: {_quote(name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {config.max_batch_size}",
        "input [",
        "  {",
        '    name: "images"',
        "    data_type: TYPE_UINT8",
        f"    dims: [ {h}, {w}, 3 ]",
        "  }",
        "]",
        "output [",
    ]
    blocks = []
    for sig in outputs:
        dtype = _TRITON_TYPES.get(sig.dtype)
        if dtype is None:
            raise InputError(f"output {sig.name!r} has dtype {sig.dtype}, which Triton config cannot declare")
        if len(sig.shape) == 1:
            dims = "    dims: [ 1 ]\n    reshape: { shape: [ ] }"
        else:
            width = sig.dim(1)
            if width is None:
                width = metadata.num_clusters if sig.name == "probs" else metadata.embedding_dim
            dims = f"    dims: [ {width} ]"
        blocks.append(f"  {{\n    name: {_quote(sig.name)}\n    data_type: {dtype}\n{dims}\n  }}")
    lines.append(",\n".join(blocks))
    lines += [
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else "",
        f"  max_queue_delay_microseconds: {config.max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {config.instances}",
        f"    kind: {kind}",
        "  }",
        "]",
        "parameters {",
        '  key: "calibclust_metadata"',
        f"  value: {{ string_value: {_quote(metadata.to_json())} }}",
        "}",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def write_triton_repository(model_path: str | os.PathLike, repo: str | os.PathLike, config: TritonConfig | None = None) -> Path:
    """Write (or, with ``force``, replace) ``repo/<name>`` for an exported ONNX model or engine."""
    import onnx

    config = config or TritonConfig()
    if config.max_batch_size < 1:
        raise InputError(f"max batch size must be >= 1, got {config.max_batch_size}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InputError(f"{model_path}: no such model file")
    name = config.name or model_path.name.split(".")[0]
    if model_path.suffix in (".engine", ".plan"):
        sidecar = read_engine_sidecar(model_path)
        metadata, platform, target = sidecar.metadata, "tensorrt_plan", "model.plan"
        outputs = [TensorSig(n, d, tuple(s)) for n, d, s in sidecar.info["outputs"]]
    else:
        proto = onnx.load(str(model_path), load_external_data=False)
        metadata = read_model_metadata(proto)
        inputs, outputs = signature_from_onnx(proto)
        check_signature(metadata, inputs, outputs, str(model_path))
        platform, target = "onnxruntime_onnx", "model.onnx"
    folder = Path(repo) / name
    if folder.exists():
        if not config.force:
            raise InputError(f"{folder} exists; pass --overwrite to replace it")
        shutil.rmtree(folder)
    version_dir = folder / str(config.version)
    version_dir.mkdir(parents=True)
    shutil.copyfile(model_path, version_dir / target)
    (folder / "config.pbtxt").write_text(render_config(name, platform, metadata, outputs, config))
    (folder / "calibclust_metadata.json").write_text(json.dumps(metadata.to_dict(), indent=2))
    return folder
