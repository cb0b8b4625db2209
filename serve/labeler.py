"""``Labeler``: a contract model plus a backend, predicting on uint8 batches and labelling files.

    >>> lab = Labeler("model.onnx")                      # backend picked by availability
    >>> out = lab.predict(batch_uint8_nhwc)              # {"probs", "confidence", "label", "ood_score"}
    >>> table = lab.label(["a.jpg", "b.png"])            # columns of the predictions table

Everything the model needs to know about itself (input size, cluster names, thresholds) is read
from its metadata (the model contract: calibclust/contract.py); nothing is restated here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from calibclust.errors import InputError
from calibclust.io.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, image_batch
from calibclust.metadata import ModelMetadata
from calibclust.serve.backends import CONTRACT_OUTPUTS, Backend, OrtOptions, create_backend
from calibclust.serve.policy import Policy, Thresholds, decide, fit_thresholds


def read_metadata(source) -> ModelMetadata:
    """The model's contract metadata, checked against its graph (``calibclust.contract``, the one
    implementation shared with export). ``source``: a path or an onnxruntime session."""
    from calibclust.contract import read_model_metadata

    return read_model_metadata(source)


class Labeler:
    """A loaded model. ``backend``: ``auto`` | ``cpu`` | ``cuda`` | ``tensorrt`` | a registered plugin."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        backend: str = "auto",
        threads: int | None = None,
        max_batch_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allow_spinning: bool = True,
    ):
        self.model_path = Path(model_path)
        self.backend_request, self.threads = backend, threads  # what label_folder passes on
        if not self.model_path.is_file():
            raise InputError(f"model file not found: {self.model_path}")
        self.backend: Backend = create_backend(
            self.model_path, backend, OrtOptions(threads=threads, max_batch_size=max_batch_size, allow_spinning=allow_spinning),
            log=lambda message: print(f"calibclust: {message}", file=sys.stderr),
        )
        # A plugin backend (native engine) carries the metadata from its sidecar.
        # onnxruntime backends hand over their session, so the file is parsed only once.
        meta = getattr(self.backend, "metadata", None)
        if meta is None:
            meta = read_metadata(getattr(self.backend, "session", None) or self.model_path)
        self.metadata: ModelMetadata = meta
        self.max_pixels = int(max_pixels)

    # --- properties read from the contract --------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.metadata.input_size)

    @property
    def num_clusters(self) -> int:
        return self.metadata.num_clusters

    @property
    def cluster_names(self) -> list[str]:
        return list(self.metadata.cluster_names)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def batch_size(self) -> int:
        return int(self.backend.default_batch_size)

    def embedding_dim(self) -> int:
        """Width D of the model's ``embedding`` output (optional in the model contract): from the
        metadata, else from one blank image; an InputError when the model has none."""
        if self.metadata.embedding_dim:
            return int(self.metadata.embedding_dim)
        names = getattr(self.backend, "output_names", None)
        if names is not None and "embedding" not in names:
            raise InputError(f"{self.model_path.name} has no 'embedding' output (it has {', '.join(names)}); "
                             "--embeddings needs a model exported by 'calibclust export onnx'")
        h, w = self.input_size
        try:
            out = self.backend.run(np.zeros((1, h, w, 3), np.uint8), ("embedding",))["embedding"]
        except Exception as exc:  # noqa: BLE001 - each runtime raises its own type for a missing output
            raise InputError(f"{self.model_path.name} has no 'embedding' output ({type(exc).__name__}); "
                             "--embeddings needs a model exported by 'calibclust export onnx'") from None
        return int(out.shape[1])

    # --- prediction -----------------------------------------------------------------------------
    def predict(self, images: np.ndarray, outputs: Sequence[str] = CONTRACT_OUTPUTS) -> dict[str, np.ndarray]:
        """Run the model on ``images`` uint8 (N, H, W, 3) of the model's input size."""
        images = np.asarray(images)
        h, w = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise InputError(
                f"predict needs uint8 images of shape (N, {h}, {w}, 3); got {images.dtype} {images.shape}. "
                f"Decode files with labeler.decode(path) (the model's resize policy), or pass any images to predict_proba."
            )
        if len(images) == 0:
            c = self.num_clusters
            empty = {"probs": np.zeros((0, c), np.float32), "confidence": np.zeros(0, np.float32),
                     "label": np.zeros(0, np.int64), "ood_score": np.zeros(0, np.float32)}
            return {k: empty[k] for k in outputs if k in empty}
        return self.backend.run(np.ascontiguousarray(images), tuple(outputs))

    def predict_all(self, images: np.ndarray, outputs: Sequence[str] = CONTRACT_OUTPUTS) -> dict[str, np.ndarray]:
        """:meth:`predict` on any number of images, in batches of the backend's size (memory stays
        bounded, and engines with a maximum batch accept every call)."""
        step = self.batch_size
        if len(images) <= step:
            return self.predict(images, outputs)
        parts = [self.predict(images[i : i + step], outputs) for i in range(0, len(images), step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def predict_proba(self, images) -> np.ndarray:
        """Cluster probabilities (N, K) of ``images``: uint8 (N, H, W, 3) of any size (resized like
        every image the model sees), or a sequence of file paths (decoded by THE decoder)."""
        arrays = image_batch(images, self.input_size, self.max_pixels, self.metadata.resize)
        return self.predict_all(arrays, ("probs",))["probs"]

    def label_folder(self, folder: str | os.PathLike, out: str | os.PathLike, target_accuracy: float | None = None,
                     coverage: float | None = None, confidence_threshold: float | None = None,
                     ood_threshold: float | None = None, **options):
        """``calibclust label`` from Python: label every image under ``folder`` into ``out``
        (predictions table, summary.json, report.html; resumable). At most one of
        ``target_accuracy``, ``coverage`` and ``confidence_threshold`` sets the rejection policy;
        ``options`` are :class:`calibclust.serve.pipeline.LabelOptions` fields (``resume``,
        ``overwrite``, ``top_k``, ``progress``, …). Returns its :class:`LabelResult`."""
        import dataclasses

        from calibclust.serve.pipeline import LabelOptions, label_folder

        allowed = {f.name for f in dataclasses.fields(LabelOptions)} - {"folder", "model", "out_dir", "backend", "policy"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InputError(f"label_folder: unknown option(s) {', '.join(unknown)}; choose from {', '.join(sorted(allowed))}")
        options.setdefault("threads", self.threads)
        options.setdefault("max_pixels", self.max_pixels)
        policy = Policy.choose(target_accuracy, coverage, confidence_threshold, ood_threshold)
        options.setdefault("progress", False)
        opts = LabelOptions(folder=os.fspath(folder), model=os.fspath(self.model_path), out_dir=os.fspath(out),
                            backend=self.backend_request, policy=policy, **options)
        return label_folder(opts)

    def decode(self, path: str | os.PathLike | bytes) -> np.ndarray:
        """Decode one file with THE decoder at the model's input size (raises ImageDecodeError)."""
        return decode_image(path, size=self.input_size, max_pixels=self.max_pixels, resize=self.metadata.resize)

    def label(
        self,
        paths: Iterable[str | os.PathLike],
        policy: Policy | None = None,
        batch_size: int | None = None,
        top_k: int = 0,
    ) -> tuple[dict[str, list], Thresholds]:
        """Label files in memory (for small sets, the demo and tests; folders: :mod:`pipeline`).

        Returns the predictions-table columns (path, decision, cluster, cluster_name, confidence,
        ood_score, error and ``top<k>_*``) and the resolved thresholds. Coverage and
        target-accuracy policies are fitted on these files.
        """
        if isinstance(paths, (str, os.PathLike)):
            raise InputError(f"label() takes a list of files, got the single path {os.fspath(paths)!r}: wrap one file "
                             "in a list, or label a whole folder with label_folder(folder, out)")
        paths = [os.fspath(p) for p in paths]
        batch_size = batch_size or self.batch_size
        n = len(paths)
        cluster = np.full(n, -1, np.int64)
        confidence = np.full(n, np.nan)
        ood = np.full(n, np.nan)
        errors = [""] * n
        probs = np.full((n, self.num_clusters), np.nan) if top_k else None
        outputs = ("probs", "confidence", "label", "ood_score") if top_k else ("confidence", "label", "ood_score")
        for start in range(0, n, batch_size):
            idx, arrays = [], []
            for i in range(start, min(n, start + batch_size)):
                try:
                    arrays.append(self.decode(paths[i]))
                    idx.append(i)
                except ImageDecodeError as err:
                    errors[i] = err.reason
            if idx:
                out = self.predict(np.stack(arrays), outputs)
                cluster[idx], confidence[idx], ood[idx] = out["label"], out["confidence"], out["ood_score"]
                if probs is not None:
                    probs[idx] = out["probs"]
        readable = cluster >= 0
        thresholds = fit_thresholds(
            confidence, ood, readable, policy or Policy(), self.metadata.confidence_threshold,
            self.metadata.ood.threshold, self.metadata.calibrated,
        )
        names = self.cluster_names
        table = {
            "path": paths,
            "decision": list(decide(confidence, ood, readable, thresholds)),
            "cluster": cluster.tolist(),
            "cluster_name": [names[c] if c >= 0 else "" for c in cluster],
            "confidence": confidence.tolist(),
            "ood_score": ood.tolist(),
            "error": errors,
        }
        if probs is not None:
            table.update(topk_columns(probs, top_k))
        return table, thresholds


def topk_columns(probs: np.ndarray, k: int) -> dict[str, list]:
    """``top<j>_cluster`` / ``top<j>_prob`` for j = 1..k (rows of NaN probs → -1 / NaN)."""
    k = min(k, probs.shape[1])
    order = np.argsort(-np.nan_to_num(probs, nan=-1.0), axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(probs, order, axis=1)
    bad = np.isnan(probs).any(axis=1)
    order[bad] = -1
    cols: dict[str, list] = {}
    for j in range(k):
        cols[f"top{j + 1}_cluster"] = order[:, j].tolist()
        cols[f"top{j + 1}_prob"] = top_p[:, j].tolist()
    return cols
