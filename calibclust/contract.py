"""Read and check the model contract (described below; README.md, "Layers"). Torch-free.

An exported model is one ONNX file that takes raw ``uint8`` images ``(N, H, W, 3)`` and returns
``probs`` (N, C), ``confidence`` (N,), ``label`` (N,) int64, ``ood_score`` (N,) and optionally
``embedding`` (N, D), and that carries a :class:`~calibclust.metadata.ModelMetadata` JSON document
in its ``metadata_props`` under :data:`~calibclust.metadata.ONNX_METADATA_KEY`.

This module is what serving uses to accept or refuse a model file:

* :func:`read_model_metadata` – parse the metadata (through onnxruntime, the serving runtime, or
  ``onnx`` when onnxruntime is absent) and check the graph's inputs/outputs against it;
* :func:`check_signature` – the same check on a runtime-neutral description of the graph's tensors
  (:class:`TensorSig`), so TensorRT engines are checked by the very same rules;
* :func:`write_model_metadata` – put the document into an ``onnx.ModelProto``, *merging* with the
  properties already there (``onnx.helper.set_model_props`` replaces them all);
* :func:`read_engine_sidecar` / :func:`check_engine_compat` – the JSON sidecar of a TensorRT engine.

Every refusal is a :class:`~calibclust.metadata.MetadataError` whose message names the file and
the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from calibclust.metadata import ONNX_METADATA_KEY, OUTPUT_NAMES, MetadataError, ModelMetadata

INPUT_NAME = "images"
REQUIRED_OUTPUTS = ("probs", "confidence", "label", "ood_score")  # ``embedding`` is optional
FLOAT_DTYPES = ("float32", "float16")
ENGINE_SIDECAR_FORMAT = "calibclust-tensorrt-engine/1"

# onnxruntime reports element types as "tensor(<name>)"; onnx as TensorProto enum values.
_ORT_TYPES = {
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class TensorSig:
    """A graph input or output as any runtime reports it.

    ``dtype`` is a numpy dtype name; ``shape`` entries are ints for fixed axes and ``None`` (or a
    symbolic name, or -1 as TensorRT reports it) for dynamic ones.
    """

    name: str
    dtype: str
    shape: tuple[Any, ...]

    def dim(self, axis: int):
        d = self.shape[axis]
        return d if isinstance(d, int) and d >= 0 else None


# --- metadata_props ------------------------------------------------------------------------------
def metadata_from_props(props: Mapping[str, str], source: str = "model") -> ModelMetadata:
    """Parse our document out of an ONNX ``metadata_props`` mapping."""
    if ONNX_METADATA_KEY not in props:
        others = ", ".join(sorted(props)) or "none"
        raise MetadataError(
            f"{source}: no calibclust metadata (metadata_props has no {ONNX_METADATA_KEY!r} entry; "
            f"keys present: {others}). Export the model with 'calibclust export onnx'."
        )
    try:
        return ModelMetadata.from_json(props[ONNX_METADATA_KEY])
    except MetadataError as exc:
        raise MetadataError(f"{source}: {exc}") from None


def write_model_metadata(onnx_model, metadata: ModelMetadata, extra: Mapping[str, str] | None = None):
    """Store ``metadata`` (and optional ``extra`` string props) in ``onnx_model.metadata_props``.

    Existing entries with other keys are kept; ours are replaced in place (no duplicate keys).
    Returns the model for chaining.
    """
    metadata.validate()
    wanted = {ONNX_METADATA_KEY: metadata.to_json(), **dict(extra or {})}
    merged = {p.key: p.value for p in onnx_model.metadata_props}
    merged.update(wanted)
    del onnx_model.metadata_props[:]
    for key, value in merged.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return onnx_model


# --- graph signature checks ----------------------------------------------------------------------
def check_signature(
    metadata: ModelMetadata,
    inputs: Sequence[TensorSig],
    outputs: Sequence[TensorSig],
    source: str = "model",
) -> None:
    """Raise :class:`MetadataError` listing every way the graph disagrees with its metadata."""
    problems: list[str] = []
    height, width = metadata.input_size
    if len(inputs) != 1:
        problems.append(f"expected exactly one input (uint8 images), found {[i.name for i in inputs]}")
    else:
        image = inputs[0]
        if image.dtype != "uint8":
            problems.append(f"input {image.name!r} has dtype {image.dtype}, expected uint8 (raw images)")
        if len(image.shape) != 4:
            problems.append(f"input {image.name!r} has rank {len(image.shape)}, expected 4 (N, H, W, 3)")
        else:
            got = (image.dim(1), image.dim(2), image.dim(3))
            if got != (height, width, 3):
                problems.append(
                    f"input {image.name!r} has shape {list(image.shape)}, metadata input_size says "
                    f"[N, {height}, {width}, 3]"
                )
            if image.dim(0) is not None and image.dim(0) != -1:
                # A fixed batch of 1 still works one image at a time, but the contract says dynamic.
                problems.append(f"input {image.name!r} has a fixed batch size {image.dim(0)}, expected dynamic")

    by_name = {o.name: o for o in outputs}
    missing = [n for n in REQUIRED_OUTPUTS if n not in by_name]
    if missing:
        problems.append(f"missing outputs {missing} (found {sorted(by_name)})")
    unknown = sorted(set(by_name) - set(OUTPUT_NAMES))
    if unknown:
        problems.append(f"unexpected outputs {unknown}; the contract names {list(OUTPUT_NAMES)}")

    def expect(name: str, dtypes: tuple[str, ...], rank: int, width_: int | None = None):
        sig = by_name.get(name)
        if sig is None:
            return
        if sig.dtype not in dtypes:
            problems.append(f"output {name!r} has dtype {sig.dtype}, expected {' or '.join(dtypes)}")
        if len(sig.shape) != rank:
            problems.append(f"output {name!r} has rank {len(sig.shape)}, expected {rank}")
        elif width_ is not None and sig.dim(1) is not None and sig.dim(1) != width_:
            problems.append(f"output {name!r} has width {sig.dim(1)}, expected {width_}")

    expect("probs", FLOAT_DTYPES, 2, metadata.num_clusters)
    expect("confidence", FLOAT_DTYPES, 1)
    expect("label", ("int64",), 1)
    expect("ood_score", FLOAT_DTYPES, 1)
    expect("embedding", FLOAT_DTYPES, 2, metadata.embedding_dim)
    if metadata.ood.threshold is None:
        problems.append("metadata has no fitted OOD threshold (ood.threshold is null)")
    if problems:
        raise MetadataError(f"{source}: model does not match its metadata: " + "; ".join(problems))


def _ort_sig(arg) -> TensorSig:
    return TensorSig(arg.name, _ORT_TYPES.get(arg.type, arg.type), tuple(arg.shape))


def signature_from_session(session) -> tuple[list[TensorSig], list[TensorSig]]:
    """Inputs and outputs of an ``onnxruntime.InferenceSession``."""
    return [_ort_sig(a) for a in session.get_inputs()], [_ort_sig(a) for a in session.get_outputs()]


def signature_from_onnx(onnx_model) -> tuple[list[TensorSig], list[TensorSig]]:
    """Inputs and outputs of an ``onnx.ModelProto`` (initializers listed as inputs are skipped)."""
    from onnx import helper

    initializers = {t.name for t in onnx_model.graph.initializer}

    def sig(vi) -> TensorSig:
        tt = vi.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        import numpy as np

        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        return TensorSig(vi.name, dtype, dims)

    inputs = [sig(v) for v in onnx_model.graph.input if v.name not in initializers]
    return inputs, [sig(v) for v in onnx_model.graph.output]


# --- reading a model file ------------------------------------------------------------------------
def read_model_metadata(source, check: bool = True, backend: str = "auto") -> ModelMetadata:
    """The metadata of an exported model, checked against its graph.

    ``source`` is a path to an ``.onnx`` file, an ``onnxruntime.InferenceSession`` (serving passes
    the session it already built, so the file is parsed once) or an ``onnx.ModelProto``.
    ``backend`` for paths: ``"onnxruntime"`` (the serving runtime; the default when installed),
    ``"onnx"``, or ``"auto"``. With ``check=False`` only the document is parsed and validated.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise MetadataError(f"{path}: no such model file")
        if backend not in ("auto", "onnxruntime", "onnx"):
            raise ValueError(f"backend must be auto, onnxruntime or onnx, got {backend!r}")
        if backend in ("auto", "onnxruntime"):
            try:
                import onnxruntime as ort
            except ImportError:
                if backend == "onnxruntime":
                    from calibclust.errors import MissingDependencyError

                    raise MissingDependencyError("onnxruntime", "serve", "reading ONNX models") from None
            else:
                options = ort.SessionOptions()
                # Only metadata and signatures are needed: skip graph optimisation.
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                try:
                    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise MetadataError(f"{path}: not a loadable ONNX model: {exc}") from None
                return _from_session(session, str(path), check)
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise MetadataError(f"{path}: not an ONNX model: {exc}") from None
        return _from_onnx(model, str(path), check)
    if hasattr(source, "get_modelmeta"):
        return _from_session(source, "model", check)
    if hasattr(source, "metadata_props") and hasattr(source, "graph"):
        return _from_onnx(source, "model", check)
    raise TypeError(f"cannot read model metadata from {type(source).__name__}")


def _from_session(session, source: str, check: bool) -> ModelMetadata:
    props = dict(session.get_modelmeta().custom_metadata_map)
    metadata = metadata_from_props(props, source)
    if check:
        check_signature(metadata, *signature_from_session(session), source=source)
    return metadata


def _from_onnx(model, source: str, check: bool) -> ModelMetadata:
    props = {p.key: p.value for p in model.metadata_props}
    metadata = metadata_from_props(props, source)
    if check:
        check_signature(metadata, *signature_from_onnx(model), source=source)
    return metadata


# --- TensorRT engine sidecar ---------------------------------------------------------------------
def engine_sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` → ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


@dataclass
class EngineSidecar:
    metadata: ModelMetadata
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    info: dict[str, Any]  # batch profile, precision, parity figures, source ONNX digest, ...


def read_engine_sidecar(engine_path: str | os.PathLike) -> EngineSidecar:
    path = engine_sidecar_path(engine_path)
    if not path.is_file():
        raise MetadataError(f"{engine_path}: engine has no sidecar {path.name} (export it with 'calibclust export tensorrt')")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{path}: sidecar is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != ENGINE_SIDECAR_FORMAT:
        raise MetadataError(f"{path}: sidecar format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {ENGINE_SIDECAR_FORMAT!r}")
    try:
        metadata = ModelMetadata.from_dict(doc["metadata"])
        return EngineSidecar(
            metadata=metadata,
            tensorrt_version=str(doc["tensorrt_version"]),
            gpu_name=str(doc["gpu_name"]),
            compute_capability=tuple(int(v) for v in doc["compute_capability"]),
            info=dict(doc.get("info", {})),
        )
    except KeyError as exc:
        raise MetadataError(f"{path}: sidecar lacks {exc.args[0]!r}") from None
    except MetadataError as exc:
        raise MetadataError(f"{path}: {exc}") from None


def write_engine_sidecar(engine_path: str | os.PathLike, sidecar: EngineSidecar) -> Path:
    path = engine_sidecar_path(engine_path)
    doc = {
        "format": ENGINE_SIDECAR_FORMAT,
        "metadata": sidecar.metadata.to_dict(),
        "tensorrt_version": sidecar.tensorrt_version,
        "gpu_name": sidecar.gpu_name,
        "compute_capability": list(sidecar.compute_capability),
        "info": sidecar.info,
    }
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def check_engine_compat(
    sidecar: EngineSidecar, tensorrt_version: str, compute_capability: tuple[int, int], engine: str = "engine"
) -> None:
    """Refuse an engine built by another TensorRT release or for another GPU architecture.

    A serialized TensorRT plan is only valid for the exact TensorRT version and the GPU compute
    capability it was built on (unless built hardware/version-compatible, which we do not do).
    """
    problems = []
    if str(tensorrt_version) != sidecar.tensorrt_version:
        problems.append(f"built with TensorRT {sidecar.tensorrt_version}, this runtime is TensorRT {tensorrt_version}")
    if tuple(compute_capability) != tuple(sidecar.compute_capability):
        built = ".".join(map(str, sidecar.compute_capability))
        here = ".".join(map(str, compute_capability))
        problems.append(f"built for {sidecar.gpu_name} (compute capability {built}), this GPU has compute capability {here}")
    if problems:
        raise MetadataError(f"{engine}: cannot load engine: " + "; ".join(problems) + ". Rebuild it with 'calibclust export tensorrt' on this machine.")
