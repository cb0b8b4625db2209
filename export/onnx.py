"""Export a :class:`~calibclust.models.clustering.ClusteringModel` to the ONNX model contract.

One graph (the model contract: calibclust/contract.py)::

    images uint8 (N, H, W, 3)
      → transpose to NCHW, cast to float, /255, (x − mean) / std          (ClusteringModel.preprocess)
      → backbone → embedding z (N, D)
      → predicting head (CDC: calibration head, §3.4) → softmax → probs (N, C)
      → confidence = max probs, label = argmax probs (int64)
      → ood_score (export.ood; default kNN distance), embedding = z / ‖z‖

The dynamo exporter (opset 18) is tried first with an example batch of 2 and a dynamic batch axis;
the TorchScript exporter is the fallback. The file is checked with ``onnx.checker`` (full check),
optionally simplified with onnxslim, carries :class:`~calibclust.metadata.ModelMetadata` in its
``metadata_props``, and is only written after the fp32 parity gate (:mod:`calibclust.export.parity`)
passed on a sample of the training images.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calibclust.contract import INPUT_NAME, read_model_metadata, write_model_metadata
from calibclust.errors import CalibclustError, InputError
from calibclust.export.ood import (
    DEFAULT_OOD_SCORE,
    OOD_SCORES,
    OODScore,
    build_ood_score,
    fit_threshold,
    logits_and_embeddings,
)
from calibclust.export.parity import FP32_GATE, ParityReport, enforce, compare_outputs, ort_session, session_outputs, torch_outputs
from calibclust.metadata import OUTPUT_NAMES, ModelMetadata, OODSpec

EXPORTERS = ("auto", "dynamo", "torchscript")


class ExportError(CalibclustError):
    """The graph could not be exported or failed the ONNX checker."""


@dataclass
class OnnxExportConfig:
    opset: int = 18  # the dynamo exporter's native opset; ≥ 17 is what the contract asks
    ood_score: str = DEFAULT_OOD_SCORE  # chosen by measurement, see calibclust.export.ood
    knn_k: int = 5  # k-th neighbour (Sun et al. 2022 use k = 50 with a full CIFAR bank; 5 for ≤ 2k rows)
    bank_size: int = 1024  # rows of the kNN bank carried in the file (D floats each)
    energy_temperature: float = 1.0  # Liu et al. 2020, T = 1
    ood_tpr: float = 0.95  # threshold keeps this share of training images in-distribution
    confidence_threshold: float | None = None  # None: keep the checkpoint metadata's value
    max_images: int = 5000  # training images used to fit OOD statistics (seeded subsample)
    parity_images: int = 256  # training images the parity gate runs on
    include_embedding: bool = True
    exporter: str = "auto"  # auto (dynamo, then TorchScript) | dynamo | torchscript
    slim: bool = False  # run onnxslim on the exported graph
    seed: int = 0
    batch_size: int = 256

    def validate(self) -> None:
        if self.opset < 17:
            raise InputError(f"opset must be >= 17, got {self.opset}")
        if self.ood_score not in OOD_SCORES:
            raise InputError(f"ood score must be one of {OOD_SCORES}, got {self.ood_score!r}")
        if self.exporter not in EXPORTERS:
            raise InputError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if not 0.5 <= self.ood_tpr < 1.0:
            raise InputError(f"ood tpr must be in [0.5, 1), got {self.ood_tpr}")
        if self.knn_k < 1 or self.bank_size < self.knn_k:
            raise InputError(f"need 1 <= knn k <= bank size, got k={self.knn_k}, bank={self.bank_size}")


class ContractModule(nn.Module):
    """uint8 NHWC → the contract's outputs, as one traceable module (the graph that is exported)."""

    def __init__(self, model: nn.Module, ood: OODScore, include_embedding: bool = True):
        super().__init__()
        self.model, self.ood, self.include_embedding = model, ood, include_embedding

    def forward(self, images: torch.Tensor):
        x = self.model.preprocess(images)
        z = self.model.embed(x)
        logits = self.model.head_logits(z)
        probs = torch.softmax(logits, dim=1)
        confidence, _ = probs.max(dim=1)
        label = torch.argmax(probs, dim=1)  # int64, first index on ties (= ONNX ArgMax default)
        embedding = nn.functional.normalize(z, dim=1)
        ood_score = self.ood(logits, embedding)
        if self.include_embedding:
            return probs, confidence, label, ood_score, embedding
        return probs, confidence, label, ood_score


@dataclass
class ExportResult:
    path: Path
    metadata: ModelMetadata
    parity: ParityReport
    exporter: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    module: ContractModule | None = None  # the torch side, for INT8 / TensorRT gates downstream
    train_images: np.ndarray | None = None  # the (subsampled) training images used, for INT8 calibration


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _to_onnx(module: ContractModule, example: torch.Tensor, opset: int, exporter: str, notes: list[str]):
    """Trace ``module``; returns (ModelProto, exporter used)."""
    import onnx

    output_names = list(OUTPUT_NAMES[: 5 if module.include_embedding else 4])
    errors = []
    if exporter in ("auto", "dynamo"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=output_names,
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 20)},),
                    verbose=False,
                )
            return program.model_proto, "dynamo"
        except Exception as exc:  # the dynamo exporter raises many types; report and fall back
            errors.append(f"dynamo exporter: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if exporter == "dynamo":
                raise ExportError("; ".join(errors)) from exc
            notes.append(f"dynamo exporter failed ({errors[-1]}); used the TorchScript exporter")
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}},
            )
    except Exception as exc:
        errors.append(f"TorchScript exporter: {type(exc).__name__}: {exc}")
        raise ExportError("could not export the model: " + "; ".join(errors)) from exc
    return onnx.load_from_string(buffer.getvalue()), "torchscript"


def _slim(model_proto, notes: list[str]):
    try:
        import onnxslim
    except ImportError:
        from calibclust.errors import MissingDependencyError

        raise MissingDependencyError("onnxslim", "export", "--slim") from None
    before = len(model_proto.graph.node)
    slimmed = onnxslim.slim(model_proto)
    notes.append(f"onnxslim: {before} → {len(slimmed.graph.node)} nodes")
    return slimmed


def _check(model_proto) -> None:
    import onnx

    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc


def _save_atomic(model_proto, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model_proto, str(tmp))
    os.replace(tmp, path)


def export_onnx(
    model: nn.Module,
    metadata: ModelMetadata,
    train_images: np.ndarray,
    out_path: str | os.PathLike,
    config: OnnxExportConfig | None = None,
    log=print,
) -> ExportResult:
    """Export ``model`` with its OOD statistics fitted on ``train_images`` (uint8 NHWC).

    Raises :class:`ExportError` when no exporter produces a valid graph and
    :class:`~calibclust.export.parity.ParityError` when onnxruntime disagrees with torch; in both
    cases nothing is written to ``out_path``.
    """
    import onnx

    from calibclust.models.clustering import weights_digest

    config = config or OnnxExportConfig()
    config.validate()
    started = time.perf_counter()
    out_path = Path(out_path)
    model = model.eval()
    h, w = metadata.input_size
    if train_images.ndim != 4 or train_images.shape[1:] != (h, w, 3) or train_images.dtype != np.uint8:
        raise InputError(f"training images must be uint8 (N, {h}, {w}, 3), got {train_images.dtype} {train_images.shape}")
    if len(train_images) < max(2, config.knn_k + 2):
        raise InputError(f"need at least {max(2, config.knn_k + 2)} training images, got {len(train_images)}")
    notes: list[str] = []

    # 1. OOD statistics and training-set figures from (a seeded subsample of) the training images.
    fit_idx = _sample(len(train_images), config.max_images, config.seed)
    images = train_images[fit_idx]
    logits, emb = logits_and_embeddings(model, images, config.batch_size)
    ood = build_ood_score(
        config.ood_score, logits.shape[1], emb.shape[1], k=config.knn_k, bank_size=config.bank_size,
        temperature=config.energy_temperature,
    )
    ood.fit(logits, emb, torch.Generator().manual_seed(config.seed))
    with torch.inference_mode():
        train_scores = ood.training_scores(logits, emb).numpy()
    threshold = fit_threshold(train_scores, config.ood_tpr)
    probs = torch.softmax(logits, 1)
    confidence = probs.amax(1).numpy()
    conf_threshold = metadata.confidence_threshold if config.confidence_threshold is None else config.confidence_threshold
    sizes = np.bincount(probs.argmax(1).numpy(), minlength=metadata.num_clusters)
    train_stats = dict(metadata.train_stats)
    train_stats.update(
        n_images_export=int(len(images)),
        mean_confidence=float(confidence.mean()),
        cluster_shares=[round(float(s) / len(images), 6) for s in sizes],
        rejected_share_at_confidence_threshold=float(np.mean(confidence < conf_threshold)),
        ood_score_mean=float(train_scores.mean()),
    )
    metadata = metadata.replace(
        embedding_dim=int(emb.shape[1]),
        confidence_threshold=float(conf_threshold),
        ood=OODSpec(
            score=config.ood_score,
            threshold=threshold,
            fitted_tpr=config.ood_tpr,
            params=ood.params(),
            benchmark=dict(metadata.ood.benchmark),
        ),
        train_stats=train_stats,
        precision="fp32",
        weights_digest=metadata.weights_digest or weights_digest(model),
    )
    log(f"OOD score {config.ood_score} {ood.params()}: threshold {threshold:.4g} at {100 * config.ood_tpr:.0f}% "
        f"training acceptance over {len(images)} images; mean training confidence {confidence.mean():.3f}")

    # 2. Trace. Example batch of 2 (a batch of 1 would let the exporter specialise the axis).
    module = ContractModule(model, ood.eval(), config.include_embedding).eval()
    example = torch.from_numpy(np.ascontiguousarray(images[:2]))
    proto, exporter = _to_onnx(module, example, config.opset, config.exporter, notes)
    if config.slim:
        proto = _slim(proto, notes)
    proto.producer_name, proto.doc_string = "calibclust", "calibclust model contract: uint8 NHWC images -> probs, confidence, label, ood_score, embedding"
    write_model_metadata(proto, metadata)
    _check(proto)

    # 3. Parity gate on training images, through the serialized bytes that will be written.
    parity_idx = _sample(len(images), config.parity_images, config.seed + 1)
    sample = images[parity_idx]
    session = ort_session(proto.SerializeToString())
    report = compare_outputs(torch_outputs(module, sample), session_outputs(session, sample), "torch", "onnxruntime fp32")
    enforce(report, FP32_GATE)
    log("parity " + report.summary())

    metadata = metadata.replace(parity={"fp32": report.to_dict(), "exporter": exporter, "opset": config.opset})
    write_model_metadata(proto, metadata)
    _save_atomic(proto, out_path)
    read_model_metadata(out_path)  # the file must pass the same checks serving applies
    return ExportResult(out_path, metadata, report, exporter, time.perf_counter() - started, notes, module, images)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    images_folder: str | os.PathLike,
    out_path: str | os.PathLike,
    config: OnnxExportConfig | None = None,
    log=print,
) -> ExportResult:
    """Load a checkpoint directory and its training images folder, then :func:`export_onnx`."""
    from calibclust.io.images import discover_images, load_images
    from calibclust.models.clustering import load_model

    config = config or OnnxExportConfig()
    model, metadata = load_model(checkpoint)
    paths = list(discover_images(images_folder))
    if not paths:
        raise InputError(f"{images_folder}: no images found")
    # Decode only the subsample that will be used (the gate and the OOD fit both draw from it).
    chosen = [paths[i] for i in _sample(len(paths), config.max_images, config.seed)]
    images, errors = load_images(chosen, metadata.input_size, resize=metadata.resize)
    if errors:
        log(f"{len(errors)} of {len(chosen)} training images could not be read (first: {errors[0]})")
    if len(images) == 0:
        raise InputError(f"{images_folder}: none of the images could be read")
    config = OnnxExportConfig(**{**config.__dict__, "max_images": len(images)})
    return export_onnx(model, metadata, images, out_path, config, log)
