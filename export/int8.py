"""INT8 for CPUs: static QDQ quantisation of the exported fp32 contract graph.

onnxruntime.quantization with QDQ format, per-channel int8 weights and uint8 activations (U8S8,
the combination onnxruntime's x86 kernels run fastest, using VNNI where the CPU has it), calibrated
with a reader over training images (the uint8 batches the graph takes; no Python preprocessing).

Only the backbone is quantised — every ``Conv`` and the residual ``Add`` between two computed
tensors. Pre-processing, the predicting head, softmax and the OOD score (kNN bank product, TopK)
stay fp32: they cost a fraction of a percent of the FLOPs and are where int8 rounding would move
labels and OOD scores most.

If the first attempt misses the bar, a second one keeps the stem Conv and the residual Adds in fp32
(measured on a CDC model of digits whose calibrated confidences are mostly below 0.5: 98.0% →
99.1% agreement). The quantised model is accepted only when its labels agree with the fp32 model on at least
``min_agreement`` (default 99%, :data:`calibclust.export.parity.INT8_GATE`) of held-out training
images (images not used for calibration); its OOD threshold is re-fitted on its own scores, since
int8 embeddings shift the kNN distances.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from calibclust.contract import read_model_metadata, write_model_metadata
from calibclust.errors import CalibclustError, InputError
from calibclust.export.parity import Gate, ParityError, ParityReport, compare_outputs, enforce, ort_session, session_outputs

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class QuantizationError(CalibclustError):
    """The INT8 model disagrees with fp32 too often (or could not be produced)."""


@dataclass
class Int8Config:
    calibration_images: int = 512  # training images the activation ranges are calibrated on
    eval_images: int = 1000  # held-out training images for the agreement check
    min_agreement: float = 0.99  # refuse to write a model below this label agreement with fp32
    per_channel: bool = True
    calibrate_method: str = "minmax"
    keep_stem_fp32: bool = False  # leave the first Conv in fp32 (first-layer rule of thumb)
    quantize_residual_add: bool = True
    fallback: bool = True  # below the bar: retry with stem Conv and residual Adds in fp32
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise InputError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.calibrate_method!r}")
        if not 0.0 < self.min_agreement <= 1.0:
            raise InputError(f"min agreement must be in (0, 1], got {self.min_agreement}")


@dataclass
class Int8Result:
    path: Path
    agreement: ParityReport
    speedup: float  # int8 vs fp32 images/s on one batch, measured during export (rough)
    calibration_images: int
    seconds: float
    quantized_nodes: int
    notes: list[str] = field(default_factory=list)


class UInt8CalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over uint8 NHWC training images, in batches."""

    def __init__(self, images: np.ndarray, input_name: str = "images", batch_size: int = 64):
        self.images, self.input_name, self.batch_size = images, input_name, batch_size
        self._next = 0

    def get_next(self):
        if self._next >= len(self.images):
            return None
        batch = np.ascontiguousarray(self.images[self._next : self._next + self.batch_size])
        self._next += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


def _backbone_node_names(model_proto) -> set[str]:
    """The nodes the ``embedding`` output is computed from (pre-processing and backbone; Linear
    layers inside a timm backbone included), or without that output, those before the head (the
    first Gemm/MatMul after the first Conv, TensorRT's fp16 boundary)."""
    nodes = list(model_proto.graph.node)
    if "embedding" in {o.name for o in model_proto.graph.output}:
        producer = {o: n for n in nodes for o in n.output}
        seen, todo = set(), ["embedding"]
        while todo:
            node = producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen
    from calibclust.export.tensorrt import head_start

    return {n.name for n in nodes[:head_start(nodes)]}


def backbone_nodes(model_proto, keep_stem_fp32: bool = False, residual_add: bool = True) -> list[str]:
    """Names of the nodes to quantise: every Conv, and the backbone's Adds of two computed tensors
    (residuals; :func:`_backbone_node_names`): a merged head's ``top + log(...)`` (``fit
    --overcluster``) is an Add of two computed tensors too, and stays fp32 with the head."""
    initializers = {t.name for t in model_proto.graph.initializer}
    constants = {o for n in model_proto.graph.node if n.op_type == "Constant" for o in n.output}
    fixed = initializers | constants
    backbone = _backbone_node_names(model_proto)
    names = []
    for node in model_proto.graph.node:
        if node.op_type == "Conv":
            names.append(node.name)
        elif (residual_add and node.name in backbone and node.op_type == "Add" and len(node.input) == 2
              and not (set(node.input) & fixed)):
            names.append(node.name)
    if keep_stem_fp32:
        first_conv = next(n.name for n in model_proto.graph.node if n.op_type == "Conv")
        names.remove(first_conv)
    return names


def _name_nodes(model_proto) -> None:
    seen = set()
    for i, node in enumerate(model_proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _images_per_second(session, batch: np.ndarray, repeats: int = 3) -> float:
    name = session.get_inputs()[0].name
    session.run(None, {name: batch})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: batch})
        times.append(time.perf_counter() - start)
    return len(batch) / float(np.median(times))


def quantize_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    train_images: np.ndarray,
    config: Int8Config | None = None,
    threads: int | None = None,
    log=print,
) -> Int8Result:
    """Quantise ``fp32_path`` (an exported contract model) into ``out_path``.

    Raises :class:`QuantizationError` (nothing written) when label agreement with fp32 on held-out
    training images is below ``config.min_agreement``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from calibclust.export.ood import fit_threshold

    config = config or Int8Config()
    config.validate()
    started = time.perf_counter()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    metadata = read_model_metadata(fp32_path)
    if len(train_images) < 20:
        raise InputError(f"INT8 calibration needs at least 20 training images, got {len(train_images)}")
    notes: list[str] = []

    # Calibration and evaluation images are disjoint so the agreement figure is not flattered.
    order = np.random.default_rng(config.seed).permutation(len(train_images))
    n_cal = min(config.calibration_images, len(train_images) // 2)
    cal_images = train_images[np.sort(order[:n_cal])]
    eval_images = train_images[np.sort(order[n_cal : n_cal + config.eval_images])]

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.calibrate_method]
    # Attempts: the configured node selection, then (if allowed) the conservative one that keeps
    # the stem Conv and the residual Adds in fp32 — on calibrated models with many near-tie
    # predictions (CDC-Cal's mean confidence is often < 0.5) that is what recovers the last labels.
    attempts = [(config.keep_stem_fp32, config.quantize_residual_add)]
    if config.fallback and attempts[0] != (True, False):
        attempts.append((True, False))
    fp32_session = ort_session(fp32_path, threads)
    reference = session_outputs(fp32_session, eval_images)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference + graph optimisation (Conv/BN folding) before inserting Q/DQ pairs.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        proto = onnx.load(str(pre))
        _name_nodes(proto)
        onnx.save(proto, str(pre))
        failures = []
        for attempt, (keep_stem, residual_add) in enumerate(attempts):
            nodes = backbone_nodes(proto, keep_stem, residual_add)
            raw = Path(tmp) / f"int8_{attempt}.onnx"
            quantize_static(
                str(pre),
                str(raw),
                UInt8CalibrationReader(cal_images, batch_size=config.batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                calibrate_method=method,
                calibration_providers=["CPUExecutionProvider"],
            )
            int8_proto = onnx.load(str(raw))
            int8_session = ort_session(int8_proto.SerializeToString(), threads)
            candidate = session_outputs(int8_session, eval_images)
            report = compare_outputs(reference, candidate, "onnxruntime fp32", "onnxruntime int8")
            selection = f"stem {'fp32' if keep_stem else 'int8'}, residual Add {'int8' if residual_add else 'fp32'}"
            try:
                enforce(report, Gate("int8", min_label_agreement=config.min_agreement))
                break
            except ParityError as exc:
                failures.append(f"[{selection}] {exc}")
                log(f"int8 attempt {attempt + 1} ({selection}): label agreement {100 * report.label_agreement:.2f}% "
                    f"< {100 * config.min_agreement:.2f}%")
        else:
            raise QuantizationError(
                f"refusing to write {out_path}: " + " | ".join(failures)
                + ". Try --int8-calibration entropy or more calibration images."
            )
    if failures:
        notes.append(f"first attempt below the bar; used {selection}")
    bench = np.ascontiguousarray(eval_images[: min(256, len(eval_images))])
    speedup = _images_per_second(int8_session, bench) / _images_per_second(fp32_session, bench)

    # The int8 embedding moves the OOD score: re-fit the threshold on the int8 model's own scores
    # over all training images it was given (calibration + held-out).
    int8_scores = np.concatenate([candidate["ood_score"], session_outputs(int8_session, cal_images)["ood_score"]])
    ood = replace(metadata.ood, threshold=fit_threshold(int8_scores, metadata.ood.fitted_tpr))
    parity = dict(metadata.parity)
    parity["int8"] = {**report.to_dict(), "calibration_images": int(n_cal), "speedup_vs_fp32": round(float(speedup), 3),
                      "quantized_nodes": len(nodes), "node_selection": selection}
    metadata = metadata.replace(precision="int8", ood=ood, parity=parity)
    write_model_metadata(int8_proto, metadata)
    onnx.checker.check_model(int8_proto, full_check=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_name(f".{out_path.name}.tmp")
    onnx.save(int8_proto, str(tmp_out))
    os.replace(tmp_out, out_path)
    read_model_metadata(out_path)
    log(f"int8 {report.summary()}; speed {speedup:.2f}x fp32 on a batch of {len(bench)}")
    return Int8Result(out_path, report, float(speedup), int(n_cal), time.perf_counter() - started, len(nodes), notes)
