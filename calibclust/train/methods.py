"""One interface for every clustering method, and the registry ``train compare`` and ``fit`` are built from.

A method turns decoded images (:class:`calibclust.train.data.TrainingData`) and a backbone into a
:class:`calibclust.models.clustering.ClusteringModel` with its :class:`calibclust.metadata.ModelMetadata`
— the model contract — so everything after training (``predict``, ``export``, ``label``, the demo)
works for every method without knowing which one trained it::

    from calibclust.train.methods import get_method

    method = get_method("kmeans")(n_clusters=10, seed=0).fit(data, backbone, info)
    probs = method.predict_proba(heldout_images)  # (N, K) numpy
    method.save("runs/kmeans/model")              # what `calibclust export onnx` reads

**Adding a method is one module and one line**: a module with a :class:`ClusteringMethod` subclass
(``_fit`` sets ``self.model`` and ``self.metadata``), and its ``"module:Class"`` in :data:`METHODS`
(:mod:`calibclust.train.kmeans_method` is the smallest example). Third-party packages add methods
without editing this file through the ``calibclust.methods`` entry-point group, name = registry name,
value = ``module:Class``.

This module imports no torch, so the CLI can list the methods (``fit --method``, ``train compare
--methods``) cheaply.
"""

from __future__ import annotations

import copy
import importlib
import os
import time
import warnings
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from calibclust.errors import InputError

# Registry name → "module:Class". Order = the rows' order in `train compare`.
METHODS: dict[str, str] = {
    "kmeans": "calibclust.train.kmeans_method:KMeansMethod",
    "spice": "calibclust.train.spice:SpiceMethod",
    "cdc": "calibclust.train.cdc:CDCMethod",
    "dccm": "calibclust.train.dccm:DCCMMethod",
    "spc": "calibclust.train.spc:SPCMethod",
    "gcc": "calibclust.train.gcc:GCCMethod",
}
ENTRY_POINT_GROUP = "calibclust.methods"
# Methods with a `calibclust train NAME` command of their own (many method-specific options); every
# other registered method gets the generic one (calibclust.train.cli), with its default settings.
DEDICATED_COMMANDS = frozenset({"cdc", "spice"})


def _plugins() -> dict[str, object]:
    """Methods of other packages (entry points), by name; a built-in name cannot be taken."""
    from calibclust.metadata import METHOD_NAME

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in METHODS and METHOD_NAME.fullmatch(ep.name)}


def method_names() -> list[str]:
    """Every registered method, built-in first (registry order), then plugins by name."""
    return list(METHODS) + sorted(_plugins())


def get_method(name: str) -> type["ClusteringMethod"]:
    """The :class:`ClusteringMethod` subclass registered as ``name``."""
    try:
        if name in METHODS:
            module_name, _, class_name = METHODS[name].partition(":")
            cls = getattr(importlib.import_module(module_name), class_name)
        else:
            plugins = _plugins()
            if name not in plugins:
                raise InputError(f"unknown method {name!r}; available: {', '.join(method_names())}")
            cls = plugins[name].load()
    except (ImportError, AttributeError) as exc:
        raise InputError(f"method {name!r} could not be loaded ({type(exc).__name__}: {exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, ClusteringMethod)) or cls.name != name:
        raise InputError(f"method {name!r} is not a ClusteringMethod named {name!r}")
    return cls


class ClusteringMethod(ABC):
    """Base of every method: ``fit`` / ``predict_proba`` / ``save`` / ``load``.

    Subclasses set :attr:`name` (the registry name, also ``ModelMetadata.method``), :attr:`config_class`
    (a dataclass whose ``num_clusters`` and ``seed`` this class fills) and implement :meth:`_fit`.
    ``fit`` never changes the backbone it is given (methods that train it train a copy), so one
    pretrained backbone can be handed to several methods in turn, as ``train compare`` does.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None

    def __init__(self, n_clusters: int, config: Any = None, *, seed: int = 0, device: str = "cpu",
                 progress: bool = False):
        from calibclust.device import resolve_device

        self.n_clusters = int(n_clusters)
        self.seed = int(seed)
        self.device = str(resolve_device(device))
        self.progress = progress
        self.config = self._resolve_config(config)
        self.model = None  # ClusteringModel once fitted
        self.metadata = None  # ModelMetadata once fitted
        self.seconds: dict[str, float] = {}  # training seconds of each row of predictions()

    def _resolve_config(self, config: Any) -> Any:
        if self.config_class is None:
            return config
        if config is None:
            return self.config_class(num_clusters=self.n_clusters, seed=self.seed)
        if not isinstance(config, self.config_class):
            raise InputError(f"{self.name}: config must be a {self.config_class.__name__}, got {type(config).__name__}")
        if config.num_clusters != self.n_clusters:
            raise InputError(f"{self.name}: config.num_clusters={config.num_clusters} but n_clusters={self.n_clusters}")
        return config

    # --- training ---------------------------------------------------------------------------------
    def fit(self, data, backbone, backbone_info: dict | None = None, out_dir: str | os.PathLike | None = None,
            eval_data=None, resume: bool = False) -> "ClusteringMethod":
        """Train on ``data`` (TrainingData) from ``backbone`` (pretrained, weights as ``backbone_info``
        describes: ``mean``/``std``, calibclust's defaults when absent, and ``source``); ``out_dir``
        keeps checkpoints and logs where the method has any, and ``resume`` continues from them
        (methods without checkpoints start over); ``eval_data`` is scored in the logs only, never
        trained on."""
        if data.num_images < self.n_clusters:
            raise InputError(f"{self.name}: {data.num_images} images cannot form {self.n_clusters} clusters")
        from calibclust.augment import DEFAULT_MEAN, DEFAULT_STD

        start = time.perf_counter()
        self.seconds = {}
        info = dict(backbone_info or {})  # every method sees a normalisation: calibclust's when none is given
        info.setdefault("mean", DEFAULT_MEAN)
        info.setdefault("std", DEFAULT_STD)
        self._fit(data, copy.deepcopy(backbone), info, None if out_dir is None else Path(out_dir), eval_data, resume)
        if self.model is None or self.metadata is None:
            raise RuntimeError(f"{type(self).__name__}._fit must set model and metadata")
        self.model.eval()
        for row in self.row_names():  # one training run gives every row unless _fit timed them apart
            self.seconds.setdefault(row, time.perf_counter() - start)
        return self

    @abstractmethod
    def _fit(self, data, backbone, backbone_info: dict, out_dir: Path | None, eval_data, resume: bool) -> None:
        """Train on a copy of the backbone and set ``self.model`` and ``self.metadata`` (see :meth:`fit`)."""

    def _forked_rng(self):
        """A context that restores the caller's torch RNG (CPU, and this CUDA device) afterwards: the
        methods that seed torch from their config leave the caller's random state as it was."""
        import torch

        return torch.random.fork_rng(devices=[self.device] if str(self.device).startswith("cuda") else [])

    def _single_head_metadata(self, data, backbone_info: dict, stats: dict, out_dir: Path | None = None,
                              history: list | None = None):
        """The metadata of a fitted model whose one head, "clustering", predicts, uncalibrated;
        ``stats`` (the method's own) gains the training images' count, cluster sizes and mean
        confidence, the config and the backbone's source. ``history`` is written to
        ``out_dir/history.json`` when both are given."""
        import json

        import torch

        from calibclust.metadata import ModelMetadata
        from calibclust.models.backbones import backbone_label
        from calibclust.train.data import head_report

        report = head_report(torch.from_numpy(self.predict_proba(data.images)), None)
        stats = {"n_images": data.num_images, "mean_confidence": report["mean_confidence"],
                 "cluster_sizes": report["cluster_sizes"], **stats,
                 "config": self.config.to_dict(),  # ClusteringMethod.load rebuilds the method with it
                 "backbone_source": backbone_info.get("source", "")}
        if out_dir is not None and history is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
        model = self.model
        return ModelMetadata(
            num_clusters=self.n_clusters, input_size=data.image_size, mean=tuple(model.mean.flatten().tolist()),
            std=tuple(model.std.flatten().tolist()), method=self.name, resize=data.resize, probs_head="clustering",
            calibrated=False, backbone=backbone_label(model.backbone), embedding_dim=model.feature_dim,
            train_stats=stats)

    def merge_clusters(self, k: int, data) -> list[int]:
        """Merge the fitted model's clusters into ``k`` groups by how its predicting head shares the
        training images ``data`` between them (:func:`calibclust.cluster.merge.merge_groups`, no label
        read), for a model trained with more clusters than wanted (``fit --overcluster``). Every head is
        merged with those groups; the metadata's cluster count, sizes and mean confidence follow, and
        ``train_stats["overcluster"]`` records the trained count and the groups. Returns the group of
        each trained cluster."""
        import torch

        from calibclust.cluster.merge import merge_groups
        from calibclust.shortcut import shortcut_check
        from calibclust.train.data import embed_images, head_probabilities, head_report

        model = self._fitted()
        trained = model.num_clusters
        with torch.no_grad():
            z = embed_images(model, data.images, device=self.device)
            groups = merge_groups(head_probabilities(model, z, model.predict_head).numpy(), k)
            model.merge_clusters(groups)
            probs = {h: head_probabilities(model, z, h) for h in model.head_names}
        stats = dict(self.metadata.train_stats)
        report = head_report(probs[model.predict_head], None)
        stats.update(mean_confidence=report["mean_confidence"], cluster_sizes=report["cluster_sizes"],
                     overcluster={"trained_clusters": trained, "groups": groups,
                                  "rule": "co-assignment of the training images (average linkage), label-free"})
        if "mean_confidence_clustering_head" in stats:
            stats["mean_confidence_clustering_head"] = float(probs["clustering"].max(1).values.mean())
        if "shortcut_check" in stats:  # the check describes the clusters the model now has
            labels = probs[model.predict_head].argmax(1).numpy()
            try:
                stats["shortcut_check"] = shortcut_check(data.images, labels, seed=self.seed).to_dict()
            except Exception as exc:  # advisory, as in training: never lose a trained model to it
                stats["shortcut_check"] = {"error": f"{type(exc).__name__}: {exc}"}
        self.metadata = self.metadata.replace(num_clusters=k, cluster_names=[], train_stats=stats)
        return groups

    # --- inference --------------------------------------------------------------------------------
    def _fitted(self):
        if self.model is None:
            raise InputError(f"{self.name}: not fitted; call fit() or ClusteringMethod.load() first")
        return self.model

    def predict_proba(self, images, head: str | None = None):
        """Cluster probabilities (N, K) numpy float32 of uint8 (N, H, W, 3) images at the model's
        input size, from the predicting head (or ``head``)."""
        head = head or self._fitted().predict_head
        return self.head_probabilities(images, (head,))[head]

    def head_probabilities(self, images, heads: tuple[str, ...], batch_size: int = 512, model=None) -> dict:
        """Probabilities of several heads from one pass of the backbone, by head name; of ``model``
        instead of the fitted one when given (SPICE's stage-2 model)."""
        import numpy as np
        import torch

        from calibclust.io.cache import CachedImages
        from calibclust.train.data import embed_images, head_probabilities

        model = model or self._fitted()
        if not isinstance(images, CachedImages):  # an on-disk cache is read in batches, never whole
            images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != 3:
            raise InputError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        unknown = [h for h in heads if h not in model.head_names]
        if unknown:
            raise InputError(f"{self.name}: no head {unknown[0]!r}; the model has {', '.join(model.head_names)}")
        with torch.no_grad():
            z = embed_images(model, images, batch_size=batch_size, device=self.device)
            return {h: head_probabilities(model, z, h).numpy() for h in heads}

    def predictions(self, images) -> dict[str, Any]:
        """Every prediction the method reports, by row name (``train compare`` prints one row each);
        one row, the model's, unless a method has more (CDC's two heads, SPICE's two stages)."""
        return {self.row_names()[0]: self.predict_proba(images)}

    def row_names(self) -> list[str]:
        return [self.name]

    # --- persistence ------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> Path:
        """The model directory every command reads (``model.safetensors`` + ``config.json``)."""
        from calibclust.models.clustering import save_model

        model = self._fitted()
        device = next(model.parameters()).device
        path = save_model(model.cpu(), out_dir, self.metadata)
        model.to(device)
        return path

    @staticmethod
    def load(path: str | os.PathLike, device: str = "cpu") -> "ClusteringMethod":
        """A saved model as the method that trained it (``ModelMetadata.method``), ready to predict."""
        from calibclust.models.clustering import load_model

        model, metadata = load_model(path)
        cls = get_method(metadata.method)
        saved = metadata.train_stats.get("config")  # the settings it was trained with (older models: none)
        config = None
        if saved and cls.config_class is not None:
            try:
                config = cls.config_class.from_dict(saved)
            except InputError as exc:  # e.g. a model from a newer calibclust: predicting needs no settings
                warnings.warn(f"{path}: its training settings are not readable here ({exc}); loaded with the defaults",
                              stacklevel=2)
        # A merged model (fit --overcluster) was trained with more clusters than it outputs.
        method = cls(model.trained_clusters, config, device=device)
        method.model, method.metadata = model.to(method.device).eval(), metadata
        return method
