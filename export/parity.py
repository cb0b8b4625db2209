"""Parity gates: the exported artefact must compute what the reference computes.

Like optimum's ``validate_model_outputs`` (which raises ``AtolError`` / ``ShapeError``), every
export runs reference and candidate on the same training images and raises :class:`ParityError`
with the measured figures when a tolerance is exceeded:

* fp32 ONNX vs torch: max |Δprobs| ≤ 1e-5 and no label differs (:data:`FP32_GATE`);
* INT8 ONNX vs fp32 ONNX: label agreement ≥ 99% (:data:`INT8_GATE`);
* TensorRT FP16 vs onnxruntime fp32: label agreement ≥ 99.9%, max |Δconfidence| ≤ 1e-2 (:data:`FP16_GATE`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from calibclust.errors import CalibclustError
from calibclust.metadata import OUTPUT_NAMES


class ParityError(CalibclustError):
    """The exported model's outputs differ from the reference beyond the gate's tolerance."""

    def __init__(self, message: str, report: "ParityReport"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Gate:
    name: str
    max_abs_probs: float | None = None
    max_abs_confidence: float | None = None
    min_label_agreement: float = 1.0


FP32_GATE = Gate("fp32", max_abs_probs=1e-5, min_label_agreement=1.0)
INT8_GATE = Gate("int8", min_label_agreement=0.99)
FP16_GATE = Gate("fp16", max_abs_confidence=1e-2, min_label_agreement=0.999)


@dataclass
class ParityReport:
    reference: str
    candidate: str
    n_images: int
    max_abs_probs: float
    max_abs_confidence: float
    max_abs_ood_score: float
    max_abs_embedding: float | None
    label_mismatches: int
    label_agreement: float
    gate: str = ""
    passed: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        emb = "n/a" if self.max_abs_embedding is None else f"{self.max_abs_embedding:.2e}"
        return (
            f"{self.candidate} vs {self.reference} on {self.n_images} training images: "
            f"max|Δprobs| {self.max_abs_probs:.2e}, max|Δconfidence| {self.max_abs_confidence:.2e}, "
            f"max|Δood_score| {self.max_abs_ood_score:.2e}, max|Δembedding| {emb}, "
            f"labels differing {self.label_mismatches} (agreement {100 * self.label_agreement:.2f}%)"
        )


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], ref_name: str, cand_name: str) -> ParityReport:
    """Max absolute differences of the contract's outputs (dicts keyed by output name)."""
    for name in ("probs", "confidence", "label", "ood_score"):
        if reference[name].shape != candidate[name].shape:
            raise ValueError(f"output {name!r}: shape {candidate[name].shape} vs reference {reference[name].shape}")

    def maxdiff(name):
        a, b = reference[name].astype(np.float64), candidate[name].astype(np.float64)
        return float(np.max(np.abs(a - b))) if a.size else 0.0

    mismatches = int(np.sum(reference["label"] != candidate["label"]))
    n = int(reference["label"].shape[0])
    has_emb = "embedding" in reference and "embedding" in candidate
    return ParityReport(
        reference=ref_name,
        candidate=cand_name,
        n_images=n,
        max_abs_probs=maxdiff("probs"),
        max_abs_confidence=maxdiff("confidence"),
        max_abs_ood_score=maxdiff("ood_score"),
        max_abs_embedding=maxdiff("embedding") if has_emb else None,
        label_mismatches=mismatches,
        label_agreement=1.0 - mismatches / max(n, 1),
    )


def enforce(report: ParityReport, gate: Gate) -> ParityReport:
    """Mark the report with the gate's verdict; raise :class:`ParityError` when it fails."""
    failures = []
    if gate.max_abs_probs is not None and not report.max_abs_probs <= gate.max_abs_probs:
        failures.append(f"max|Δprobs| {report.max_abs_probs:.3e} > {gate.max_abs_probs:.0e}")
    if gate.max_abs_confidence is not None and not report.max_abs_confidence <= gate.max_abs_confidence:
        failures.append(f"max|Δconfidence| {report.max_abs_confidence:.3e} > {gate.max_abs_confidence:.0e}")
    if report.label_agreement < gate.min_label_agreement:
        failures.append(
            f"label agreement {100 * report.label_agreement:.2f}% < {100 * gate.min_label_agreement:.2f}% "
            f"({report.label_mismatches} of {report.n_images} labels differ)"
        )
    report.gate, report.passed = gate.name, not failures
    if failures:
        raise ParityError(f"{gate.name} parity gate failed: " + "; ".join(failures) + f" [{report.summary()}]", report)
    return report


# --- running the two sides ----------------------------------------------------------------------
def ort_session(model, threads: int | None = None, optimization: str = "all", providers=None):
    """An onnxruntime session for a path / serialized bytes, with explicit thread settings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    source = str(model) if isinstance(model, (str, os.PathLike)) else model
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


def run_batched(fn: Callable[[np.ndarray], dict[str, np.ndarray]], images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        for name, value in fn(images[start : start + batch_size]).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def session_outputs(session, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    return run_batched(lambda b: dict(zip(names, session.run(names, {input_name: b}))), images, batch_size)


def torch_outputs(module, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Outputs of a :class:`calibclust.export.onnx.ContractModule` (the torch side of the gate)."""
    import torch

    def fn(batch):
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(batch)))
        return {name: t.numpy() for name, t in zip(OUTPUT_NAMES, out)}

    return run_batched(fn, images, batch_size)
