"""TensorRT engines from the exported ONNX contract graph (TensorRT 10.x / 11.x Python API).

Precision comes from the graph, not from builder flags: TensorRT 10 deprecated and TensorRT 11
removed ``BuilderFlag.FP16`` / ``INT8`` and the INT8 calibrators, so the network is created
**strongly typed** (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) and

* fp32 — the exported graph as it is;
* fp16 — the graph converted to FP16 first (:func:`convert_to_fp16`: the backbone region between the
  first Conv and the head; pre-processing, head, softmax and the OOD score stay fp32; uint8 input and
  fp32 outputs unchanged);
* int8 — the Q/DQ graph that ``export onnx --int8`` writes (:mod:`calibclust.export.int8`).

The build uses one optimisation profile over the dynamic batch (min, opt, max), a workspace limit,
and a timing cache file that is read before and written after the build. The engine is written with
a JSON sidecar (:func:`calibclust.contract.write_engine_sidecar`: contract metadata, TensorRT version,
GPU name and compute capability, I/O signature, parity figures); :func:`load_engine` refuses an
engine built by another TensorRT version or for another compute capability.

Parity gate against onnxruntime on the source ONNX model (fp32 CPU reference) over sample images:
fp16 needs label agreement ≥ 99.9% and max |Δconfidence| ≤ 1e-2 (:data:`~calibclust.export.parity.FP16_GATE`);
fp32 (TF32 convolutions allowed by TensorRT's default) ≥ 99.9% and max |Δprobs| ≤ 1e-3; int8 vs the
int8 ONNX model ≥ 99%.

Buffers are torch CUDA tensors (torch is already a dependency of the export side); nothing here
is imported unless TensorRT is used.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibclust.contract import (
    EngineSidecar,
    TensorSig,
    check_engine_compat,
    check_signature,
    read_engine_sidecar,
    read_model_metadata,
    write_engine_sidecar,
)
from calibclust.errors import CalibclustError, InputError, MissingDependencyError
from calibclust.export.parity import FP16_GATE, Gate, ParityReport, compare_outputs, enforce, ort_session, session_outputs

PRECISIONS = ("fp32", "fp16", "int8")
TRT_FP32_GATE = Gate("tensorrt fp32", max_abs_probs=1e-3, min_label_agreement=0.999)
TRT_INT8_GATE = Gate("tensorrt int8", min_label_agreement=0.99)


class TensorRTError(CalibclustError):
    """TensorRT could not parse or build the network, or the engine cannot run here."""


def import_tensorrt():
    """``tensorrt`` module, or MissingDependencyError naming the ``gpu`` extra."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("tensorrt", "tensorrt", "building TensorRT engines") from None
    return trt


def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("TensorRT needs a CUDA GPU; torch.cuda.is_available() is False on this machine")
    return torch


def gpu_identity() -> tuple[str, tuple[int, int]]:
    torch = _require_cuda()
    return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))


@dataclass
class TensorRTConfig:
    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 256
    workspace_gb: float = 4.0
    timing_cache: str | None = None  # default: <engine>.timing
    parity_images: int = 512

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(f"need 1 <= min <= opt <= max batch, got {self.min_batch},{self.opt_batch},{self.max_batch}")


@dataclass
class EngineResult:
    path: Path
    sidecar: Path
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    parity: ParityReport
    seconds: float
    notes: list[str] = field(default_factory=list)


# --- FP16 graph ----------------------------------------------------------------------------------
def head_start(nodes) -> int:
    """Index of the head's first node in a contract graph's ``nodes``: the first Gemm/MatMul after
    the first Conv (``len(nodes)`` when there is none)."""
    first_conv = next((i for i, n in enumerate(nodes) if n.op_type == "Conv"), 0)
    return next((i for i, n in enumerate(nodes) if i > first_conv and n.op_type in ("Gemm", "MatMul")), len(nodes))


def fp16_region(model_proto) -> list[str]:
    """Names of the nodes that stay fp32: everything before the first Conv and from the head on."""
    nodes = list(model_proto.graph.node)
    first_conv = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    head = head_start(nodes)
    return [n.name for i, n in enumerate(nodes) if i < first_conv or i >= head]


def convert_to_fp16(model_proto):
    """FP16 copy of an exported contract graph (backbone in fp16; I/O types unchanged)."""
    import copy

    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = copy.deepcopy(model_proto)
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    keep = fp16_region(proto)
    converted = convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep, disable_shape_infer=False)
    _drop_duplicate_casts(converted.graph)
    _restore_fp32_initializers(converted.graph, model_proto.graph)
    _toposort(converted.graph)  # the converter appends its Cast nodes at the end
    # Its value_info keeps some pre-conversion element types; it is optional, so drop it and let
    # shape inference (onnx.checker, TensorRT's parser) derive the types again.
    del converted.graph.value_info[:]
    return converted


def _drop_duplicate_casts(graph) -> None:
    """onnxruntime < 1.32's converter adds one ``<x>_cast_to_fp32`` Cast per fp32 consumer of an
    fp16 tensor ``x``, all with the same output name, which breaks SSA (onnx.checker refuses it;
    seen on an H100 machine with onnxruntime-gpu 1.31.1). The copies are identical: keep the first."""
    seen: dict[str, tuple] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Cast" and len(node.output) == 1:
            key = (tuple(node.input), tuple((a.name, a.i) for a in node.attribute))
            if node.output[0] in seen:
                if seen[node.output[0]] != key:
                    raise TensorRTError(f"two different Cast nodes write {node.output[0]!r}")
                continue
            seen[node.output[0]] = key
        kept.append(node)
    if len(kept) < len(graph.node):
        # Rebuilt by position: RepeatedField.remove() drops the first *equal* node, i.e. the original.
        _replace_nodes(graph, kept)


def _replace_nodes(graph, nodes) -> None:
    copies = [type(n)() for n in nodes]
    for new, old in zip(copies, nodes):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(copies)


def _restore_fp32_initializers(graph, original) -> None:
    """The converter stores *every* float initializer as fp16 and casts it back for blocked nodes;
    put the original fp32 tensors back where a Cast-to-fp32 is the initializer's only consumer
    (head weights, prototypes, the kNN bank), so the fp32 tail is exact."""
    from onnx import TensorProto

    fp32 = {t.name: t for t in original.initializer if t.data_type == TensorProto.FLOAT}
    init = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rename, drop = {}, []
    for node in graph.node:
        if node.op_type != "Cast" or len(node.input) != 1:
            continue
        src = node.input[0]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if to == TensorProto.FLOAT and src in init and src in fp32 and consumers.get(src) == 1:
            init[src].CopyFrom(fp32[src])
            rename[node.output[0]] = src
            drop.append(node)
    for node in drop:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _toposort(graph) -> None:
    """Reorder ``graph.node`` topologically (stable: keeps the original order where it is valid)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progressed, rest = False, []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise TensorRTError(f"graph has a cycle or dangling inputs at {rest[0].name!r}")
        pending = rest
    _replace_nodes(graph, ordered)


def _has_qdq(model_proto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model_proto.graph.node)


# --- building ------------------------------------------------------------------------------------
def _trt_dtype_name(trt, dtype) -> str:
    names = {
        trt.DataType.FLOAT: "float32",
        trt.DataType.HALF: "float16",
        trt.DataType.INT8: "int8",
        trt.DataType.INT32: "int32",
        trt.DataType.BOOL: "bool",
        trt.DataType.UINT8: "uint8",
    }
    if hasattr(trt.DataType, "INT64"):
        names[trt.DataType.INT64] = "int64"
    return names.get(dtype, str(dtype))


def engine_signature(trt, engine) -> tuple[list[TensorSig], list[TensorSig]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        sig = TensorSig(name, _trt_dtype_name(trt, engine.get_tensor_dtype(name)), tuple(engine.get_tensor_shape(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(sig)
    return inputs, outputs


def build_serialized(onnx_bytes: bytes, config: TensorRTConfig, input_hw: tuple[int, int], timing_cache: Path, log=print) -> bytes:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: tensor types follow the ONNX graph (TensorRT 10+; the only mode in 11).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT's ONNX parser rejected the model: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    h, w = input_hw
    name = network.get_input(0).name
    profile.set_shape(name, (config.min_batch, h, w, 3), (config.opt_batch, h, w, 3), (config.max_batch, h, w, 3))
    builder_config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = builder_config.create_timing_cache(cache_bytes)
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise TensorRTError("TensorRT failed to build the engine (see the TensorRT log above)")
    updated = builder_config.get_timing_cache()
    if updated is not None:
        tmp = timing_cache.with_name(f".{timing_cache.name}.tmp")
        tmp.write_bytes(memoryview(updated.serialize()))
        os.replace(tmp, timing_cache)
        log(f"timing cache: {timing_cache}")
    return bytes(serialized)


# --- running -------------------------------------------------------------------------------------
class TensorRTRunner:
    """Run a deserialized engine on uint8 NHWC numpy batches; returns the contract's outputs."""

    def __init__(self, engine_bytes: bytes):
        torch = _require_cuda()
        trt = import_tensorrt()
        self._torch, self._trt = torch, trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise TensorRTError("TensorRT could not deserialize the engine (other TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = engine_signature(trt, self.engine)
        self.input_name = self.inputs[0].name
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])

    def _torch_dtype(self, name: str):
        torch = self._torch
        return {
            "float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "int32": torch.int32,
            "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
        }[name]

    def run_device(self, images):
        """``images``: uint8 CUDA tensor (N, H, W, 3) → dict of CUDA tensors (no host copies)."""
        torch = self._torch
        self.context.set_input_shape(self.input_name, tuple(images.shape))
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        out = {}
        for sig in self.outputs:
            shape = tuple(self.context.get_tensor_shape(sig.name))
            out[sig.name] = torch.empty(shape, dtype=self._torch_dtype(sig.dtype), device="cuda")
            self.context.set_tensor_address(sig.name, out[sig.name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("TensorRT execution failed")
        return out

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), self.max_batch):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.max_batch])).cuda()
            out = self.run_device(batch)
            torch.cuda.current_stream().synchronize()
            for name, t in out.items():
                parts.setdefault(name, []).append(t.float().cpu().numpy() if t.dtype == torch.float16 else t.cpu().numpy())
        return {name: np.concatenate(v) for name, v in parts.items()}


def load_engine(engine_path: str | os.PathLike) -> tuple[TensorRTRunner, EngineSidecar]:
    """Load an engine after checking its sidecar against this TensorRT and GPU, and its I/O against the contract."""
    trt = import_tensorrt()
    sidecar = read_engine_sidecar(engine_path)
    _, capability = gpu_identity()
    check_engine_compat(sidecar, trt.__version__, capability, str(engine_path))
    runner = TensorRTRunner(Path(engine_path).read_bytes())
    check_signature(sidecar.metadata, runner.inputs, runner.outputs, str(engine_path))
    return runner, sidecar


def build_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    config: TensorRTConfig | None = None,
    images_folder: str | os.PathLike | None = None,
    images: np.ndarray | None = None,
    log=print,
) -> EngineResult:
    """Build, gate and write ``out_path`` + ``out_path.json`` from an exported ONNX model."""
    import onnx

    config = config or TensorRTConfig()
    config.validate()
    trt = import_tensorrt()
    gpu_name, capability = gpu_identity()
    started = time.perf_counter()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    metadata = read_model_metadata(onnx_path)
    proto = onnx.load(str(onnx_path))
    notes = []
    if config.precision == "int8" and not _has_qdq(proto):
        raise InputError(f"{onnx_path} has no Q/DQ nodes; build INT8 engines from the model 'export onnx --int8' writes")
    if config.precision == "fp16":
        proto = convert_to_fp16(proto)
        notes.append("graph converted to FP16 (backbone region), I/O types kept")
    if images is None:
        if images_folder is None:
            raise InputError("the parity gate needs sample images: pass --images FOLDER (the training images)")
        from calibclust.io.images import discover_images, load_images

        paths = list(discover_images(images_folder))[: config.parity_images * 4]
        rng = np.random.default_rng(0)
        chosen = [paths[i] for i in sorted(rng.permutation(len(paths))[: config.parity_images])]
        images, _ = load_images(chosen, metadata.input_size, resize=metadata.resize)
        if len(images) == 0:
            raise InputError(f"{images_folder}: no readable images for the parity gate")

    timing_cache = Path(config.timing_cache) if config.timing_cache else out_path.with_name(out_path.name + ".timing")
    engine_bytes = build_serialized(proto.SerializeToString(), config, metadata.input_size, timing_cache, log)
    runner = TensorRTRunner(engine_bytes)
    inputs, outputs = runner.inputs, runner.outputs
    check_signature(metadata, inputs, outputs, f"{out_path} (engine)")

    # Reference: onnxruntime on the ONNX file we were given (fp32 or the Q/DQ int8 model).
    reference = session_outputs(ort_session(onnx_path), images)
    report = compare_outputs(reference, runner(images), f"onnxruntime {metadata.precision}", f"TensorRT {config.precision}")
    enforce(report, {"fp32": TRT_FP32_GATE, "fp16": FP16_GATE, "int8": TRT_INT8_GATE}[config.precision])

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(engine_bytes)
    os.replace(tmp, out_path)
    parity = dict(metadata.parity)
    parity[f"tensorrt_{config.precision}"] = report.to_dict()
    sidecar = EngineSidecar(
        metadata=metadata.replace(precision=config.precision, parity=parity),
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        info={
            "batch_profile": [config.min_batch, config.opt_batch, config.max_batch],
            "source_onnx": onnx_path.name,
            "outputs": [[s.name, s.dtype, list(s.shape)] for s in outputs],
            "notes": notes,
        },
    )
    sidecar_path = write_engine_sidecar(out_path, sidecar)
    return EngineResult(out_path, sidecar_path, trt.__version__, gpu_name, capability, report, time.perf_counter() - started, notes)
