"""The Python API: :func:`fit` a folder, :func:`load` an exported model (torch-free).

::

    import calibclust
    model = calibclust.fit("images/", out="runs/x", clusters=10)   # a FittedModel
    probs = model.predict_proba(images)                            # uint8 (N, H, W, 3) or paths
    model.export("model.onnx")
    labeller = calibclust.load("runs/x/model.onnx")                # no torch imported
    result = labeller.label_folder("new_images/", out="labelled/", target_accuracy=0.95)

This package is the application layer (with :mod:`calibclust.cli`): it may call training,
:mod:`calibclust.export` and :mod:`calibclust.serve`; nothing below it imports it. Every import of
torch happens inside the functions that need it, so ``import calibclust`` stays light.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from calibclust.app.fitting import DEFAULT_BUDGET_MINUTES, DEFAULT_HELDOUT_FRACTION, FitPlan
from calibclust.errors import InputError


class FittedModel:
    """The result of :func:`fit`: the run folder, its exported model and its torch checkpoint."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        run_json = self.out / "run.json"
        if not run_json.is_file():
            raise InputError(f"{self.out} is not a fit run (no run.json)")
        self.run = json.loads(run_json.read_text())
        if "evaluate" not in self.run.get("stages", {}):
            raise InputError(f"the fit run in {self.out} has not finished; continue it with resume=True")
        self.plan = FitPlan(**self.run["plan"])
        self.model_path = self.out / "model.onnx"
        self.checkpoint = self.out / self.plan.method / "model"
        self._loaded = None

    def __repr__(self) -> str:
        from calibclust.app.fitting import resolved_clusters

        return f"FittedModel({str(self.out)!r}, clusters={resolved_clusters(self.run)})"

    @property
    def heldout(self) -> dict:
        """The held-out figures of ``run.json`` (label-free; ACC/ECE per head when labelled)."""
        return self.run["stages"]["evaluate"]["heldout"]

    def _method(self):
        if self._loaded is None:
            from calibclust.train.methods import ClusteringMethod

            self._loaded = ClusteringMethod.load(self.checkpoint)
        return self._loaded

    def predict_proba(self, images, head: str | None = None) -> np.ndarray:
        """Cluster probabilities (N, K) from the torch checkpoint: ``images`` uint8 (N, H, W, 3) of any
        size, or a sequence of paths; ``head`` None for the head the exported model returns (CDC: the
        calibration head), or another head's name (CDC: "clustering")."""
        from calibclust.io.images import image_batch

        method = self._method()
        arrays = image_batch(images, tuple(method.metadata.input_size), resize=method.metadata.resize)
        return method.predict_proba(arrays, head)

    def export(self, path: str | os.PathLike, int8: bool = False):
        """Export the checkpoint to a contract ONNX file at ``path`` (the OOD threshold refitted on the
        run's training split); ``int8`` also writes ``<path stem>.int8.onnx`` when its gate passes
        (``QuantizationError`` otherwise). Returns the export result."""
        from calibclust.train.profiles import heldout_by_path_hash
        from calibclust.export.int8 import Int8Config, quantize_int8
        from calibclust.export.onnx import OnnxExportConfig, export_onnx
        from calibclust.train.data import TrainingData

        target = Path(path).resolve()
        if target.parent == self.out.resolve() and target.name.startswith(("model.", "model-base.")):
            raise InputError(f"{path} is this run's own model; export to another path")
        method = self._method()
        model, metadata = method.model, method.metadata
        from calibclust.app.fitting import CACHE_DIR

        data = TrainingData.from_folder(self.plan.folder, self.plan.input_size, progress=False, resize=self.plan.resize,
                                        cache_dir=self.out / CACHE_DIR)  # reused while the folder is unchanged
        train = data.subset(~heldout_by_path_hash(data.paths, self.plan.heldout_fraction))
        result = export_onnx(model, metadata, train.images, path, OnnxExportConfig(seed=self.plan.seed), log=lambda m: None)
        if int8:
            quantize_int8(result.path, result.path.with_suffix(".int8.onnx"), result.train_images,
                          Int8Config(seed=self.plan.seed), log=lambda m: None)
        return result

    def labeller(self, backend: str = "auto"):
        """The exported model as a torch-free :class:`calibclust.serve.labeler.Labeler`."""
        return load(self.model_path, backend=backend)


def fit(folder: str | os.PathLike, out: str | os.PathLike, clusters: int | str, budget_minutes: float = DEFAULT_BUDGET_MINUTES,
        device: str = "auto", resume: bool = False, backbone_weights: str | None = None,
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0, progress: bool = True,
        resize: str = "auto", pretrain_epochs: int | None = None, method: str | None = None,
        input_filter: str | None = None, k_range: tuple[int, int] | str | None = None,
        overcluster: float | None = None) -> FittedModel:
    """``calibclust fit`` from Python (same stages, same outputs): returns the :class:`FittedModel`;
    ``method`` any registered method (``calibclust.train.methods.method_names()``; None: CDC, or on
    ``resume`` the run's own); ``input_filter`` auto, none or gradient (None: auto, or on ``resume``
    the run's own; see ``calibclust fit --help``); ``clusters`` K or ``"auto"``, chosen without labels
    from ``k_range`` (LOW, HIGH), default (2, 30); ``overcluster`` F > 1 trains ⌈F·K⌉ clusters and
    merges them into K by how the head shares images between them."""
    from calibclust.app.fitting import fit as run_fit

    result = run_fit(folder, out, clusters, budget_minutes=budget_minutes, device=device, resume=resume,
                     backbone_weights=backbone_weights, heldout_fraction=heldout_fraction, seed=seed, progress=progress,
                     resize=resize, pretrain_epochs=pretrain_epochs, method=method, input_filter=input_filter,
                     k_range=k_range, overcluster=overcluster)
    return FittedModel(result.out)


def load(model_path: str | os.PathLike, backend: str = "auto"):
    """An exported model as a torch-free :class:`calibclust.serve.labeler.Labeler`
    (``predict_proba``, ``label_folder``, ``predict``)."""
    from calibclust.serve.labeler import Labeler

    return Labeler(model_path, backend=backend)


__all__ = ["FittedModel", "fit", "load"]
