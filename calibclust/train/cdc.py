"""Calibrated Deep Clustering (CDC; "Towards Calibrated Deep Clustering Network", §3.1–3.4, Algorithm 1, appendix B.1).

Model: backbone f + clustering head g_clu + calibration head g_cal, both MLPs D → H → BN → ReLU → C
(:class:`calibclust.models.clustering.ClusteringModel`); the calibration head makes the final
prediction (§3.4).

Per batch of B samples (Algorithm 1):

1. no grad: calibration-head probabilities of the weak view → pseudo labels S by the selection
   strategy (Eq. 4 by default; :mod:`calibclust.train.selection`);
2. no grad: embeddings z of the un-augmented batch → K-means into K mini-clusters →
   target q̂_k = mean clustering-head prediction of mini-cluster k (Eq. 1);
3. for each sub-batch of B_s: L_clu = cross-entropy of the clustering head on the strong view of
   the selected samples (Eq. 5), updating backbone + clustering head; then
   L_cal = Eq. 1 + w_en · Eq. 2 on the un-augmented view, updating only the calibration head
   (stop-gradient, §3.1 Remark).

Before training both heads get the prototype initialisation of §3.3 (Eq. 6, Prop. 1).

Ablation switches reproduce Tab. 2: ``init="random"`` (2-I "w/o Init"), ``select="fixed:0.95"``
(2-II), ``heads="clu"`` / ``heads="clu+cal"`` (2-III / 2-IV single head), ``stop_gradient=False``
(2-V). ``freeze_backbone=True`` trains the heads on cached view features
(:mod:`calibclust.train.features`).

Labels never drive a decision: the saved model is the last epoch's; ground truth, when the folder
has it, is only evaluated and logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclust import __version__
from calibclust.cluster.kmeans import assign, kmeans
from calibclust.train.paper_settings import BATCH_PER_MINICLUSTER, LR_BACKBONE
from calibclust.device import resolve_device
from calibclust.errors import InputError
from calibclust.metadata import ModelMetadata
from calibclust.models.backbones import backbone_label, build_backbone
from calibclust.models.clustering import ClusteringModel, save_model
from calibclust.shortcut import shortcut_check
from calibclust.train.features import (
    FeatureCache,
    cache_key,
    compute_feature_cache,
    derive_seed,
    images_digest,
    load_feature_cache,
    module_digest,
    recalibrate_batchnorm,
    save_feature_cache,
)
from calibclust.train.selection import SelectionInputs, build_strategy
from calibclust.train.state import (
    check_same_settings,
    has_state,
    optimizer_tensors,
    read_state,
    restore_optimizer,
    write_state,
)
from calibclust.augment.views import ViewConfig, strong_view, weak_view

HEAD_MODES = ("dual", "clu", "clu+cal")
INIT_MODES = ("prototype", "random")
DIFFICULTIES = ("easy", "hard")
MINICLUSTER_NORMS = ("l2", "l1")
STATE_FORMAT = "calibclust-cdc-state/1"


@dataclass
class CDCConfig:
    """CDC hyper-parameters; defaults are the paper's (section / equation in each comment)."""

    num_clusters: int = 10  # C, predefined number of clusters (§3 "Notation")
    epochs: int = 100  # §4.1 "Implementation Details"
    batch_size: int = 1000  # B (§4.1: 1,000 for CIFAR-10/20 and STL-10)
    sub_batch_size: int = 500  # B_s (Algorithm 1; authors' configs: 500 for B = 1,000)
    mini_clusters: int | None = None  # K (Eq. 1); None → B // BATCH_PER_MINICLUSTER[difficulty]
    difficulty: str = "easy"  # rule of thumb for K (Tab. 5, appendix B.5)
    top_size: int | None = None  # |TOP(c)| in Eq. 4; None → ⌊B/C⌋ (authors' configs)
    hidden_dim: int = 512  # H (Tab. 6)
    lr_backbone: float | None = None  # Adam, encoder (§4.1); None → LR_BACKBONE[difficulty]
    lr_heads: float = 1e-4  # Adam, MLP heads (§4.1)
    weight_decay: float = 0.0  # authors' configs
    w_en: float = 1.0  # weight of L_en (Eq. 3)
    select: str = "cdc"  # pseudo-label selection: "cdc" (Eq. 4) | "fixed:T" (Tab. 2-II)
    heads: str = "dual"  # "dual" | "clu" (Tab. 2-III) | "clu+cal" (Tab. 2-IV)
    stop_gradient: bool = True  # §3.1 Remark; False = Tab. 2-V
    init: str = "prototype"  # §3.3 prototype initialisation | "random" (Tab. 2-I "w/o Init")
    init_kmeans_restarts: int = 3  # K-means restarts for Eq. 6 (k-means++ seeding)
    orth_steps: int = 2000  # prototype separation steps (authors' orth_train: 2,000 SGD steps)
    orth_scale: float = 5.0  # cosine-logit scale in the separation loss (authors' code)
    orth_lr: float = 0.1  # SGD lr (momentum 0.9, wd 1e-4, cosine schedule; authors' code)
    minicluster_restarts: int = 3  # K-means restarts for the mini-clusters of Eq. 1
    minicluster_norm: str = "l2"  # features' normalisation before that K-means: "l2" | "l1" (authors' code)
    minicluster_iters: int = 50
    freeze_backbone: bool = False  # train heads only, on cached view features
    num_views: int = 8  # frozen mode: cached weak and strong views per image
    recalibrate_bn: str = "auto"  # "auto" (random-init backbones only) | "yes" | "no"
    views: ViewConfig = field(default_factory=ViewConfig)
    seed: int = 0
    eval_batch_size: int = 512

    def __post_init__(self):
        if isinstance(self.views, dict):
            self.views = ViewConfig(**self.views)
        problems = []
        if self.num_clusters < 2:
            problems.append(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2 or self.sub_batch_size < 2:
            problems.append("batch_size and sub_batch_size must be >= 2 (BatchNorm needs two samples)")
        if self.sub_batch_size > self.batch_size:
            problems.append(f"sub_batch_size {self.sub_batch_size} exceeds batch_size {self.batch_size}")
        if self.heads not in HEAD_MODES:
            problems.append(f"heads must be one of {HEAD_MODES}, got {self.heads!r}")
        if self.init not in INIT_MODES:
            problems.append(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.difficulty not in DIFFICULTIES:
            problems.append(f"difficulty must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        if self.minicluster_norm not in MINICLUSTER_NORMS:
            problems.append(f"minicluster_norm must be one of {MINICLUSTER_NORMS}, got {self.minicluster_norm!r}")
        if self.recalibrate_bn not in ("auto", "yes", "no"):
            problems.append(f"recalibrate_bn must be auto, yes or no, got {self.recalibrate_bn!r}")
        if self.mini_clusters is not None and not 1 <= self.mini_clusters <= self.batch_size:
            problems.append(f"mini_clusters must be in [1, batch_size], got {self.mini_clusters}")
        if self.num_views < 1:
            problems.append(f"num_views must be >= 1, got {self.num_views}")
        try:
            build_strategy(self.select)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise InputError("invalid CDC configuration: " + "; ".join(problems))

    # Values that depend on the data size are resolved against the effective batch size.
    def effective_batch_size(self, n_images: int) -> int:
        return max(2, min(self.batch_size, n_images))

    def resolved_mini_clusters(self, batch: int) -> int:
        if self.mini_clusters is not None:
            return min(self.mini_clusters, batch)
        return max(1, min(batch, batch // BATCH_PER_MINICLUSTER[self.difficulty]))

    def resolved_lr_backbone(self) -> float:
        return self.lr_backbone if self.lr_backbone is not None else LR_BACKBONE[self.difficulty]

    def resolved_top_size(self, batch: int) -> int:
        return self.top_size if self.top_size is not None else max(1, batch // self.num_clusters)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CDCConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown CDC config keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass
class TrainingData:
    """Decoded training images plus what is only ever *reported* (labels)."""

    images: np.ndarray  # (N, H, W, 3) uint8
    paths: list[str]
    labels: np.ndarray | None = None  # ground truth for reporting only; never used to train
    class_names: list[str] = field(default_factory=list)
    root: str = ""
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    resize: str = "squash"  # how the files were brought to the image size (model metadata records it)

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if len(self.paths) != len(self.images):
            raise ValueError("one path per image is needed")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError("labels and images differ in length")

    @property
    def num_images(self) -> int:
        return int(len(self.images))

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @classmethod
    def from_folder(cls, root: str | os.PathLike, size: int | tuple[int, int], progress: bool = True,
                    resize: str = "squash") -> "TrainingData":
        """Decode an image folder with the one decoder (:mod:`calibclust.io.images`, ``resize`` policy);
        unreadable files are skipped and listed. Class sub-folders give labels used for reporting only."""
        from tqdm.auto import tqdm

        from calibclust.io.images import list_image_folder, load_images

        try:
            listing = list_image_folder(root)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
        size = (size, size) if isinstance(size, int) else tuple(size)
        arrays, keep, unreadable = [], [], []
        chunk = 512
        bar = tqdm(total=len(listing.paths), desc="decoding images", unit="img", disable=not progress)
        for start in range(0, len(listing.paths), chunk):
            part = listing.paths[start : start + chunk]
            batch, errors = load_images(part, size, resize=resize)
            bad = {e.path for e in errors}
            unreadable += [(e.path, e.reason) for e in errors]
            keep += [start + i for i, p in enumerate(part) if str(p) not in bad]
            arrays.append(batch)
            bar.update(len(part))
        bar.close()
        if not keep:
            raise InputError(f"none of the {len(listing.paths)} images under {root} could be read")
        rel = listing.relative_paths()
        labels = listing.labels[keep] if listing.has_labels else None
        return cls(np.concatenate(arrays), [rel[i] for i in keep], labels, listing.class_names, str(root), unreadable,
                   resize)

    def subset(self, mask: np.ndarray) -> "TrainingData":
        """The images where ``mask`` (N,) is true, with their paths and labels."""
        idx = np.flatnonzero(mask)
        labels = None if self.labels is None else self.labels[idx]
        return TrainingData(self.images[idx], [self.paths[i] for i in idx], labels, self.class_names, self.root,
                            self.unreadable, self.resize)


# --- backbones --------------------------------------------------------------------------------------
def load_backbone_dir(path: str | os.PathLike, arch: str | None = None, input_size: int | None = None) -> tuple[nn.Module, dict]:
    """Pretrained backbone weights → (backbone, info with ``source``, ``spec``, ``mean``, ``std``).

    ``path`` is anything :func:`calibclust.models.weights.load_backbone` reads: a backbone directory
    written by ``calibclust pretrain`` (``backbone.safetensors`` + ``backbone.json``), a trained
    clustering model directory, ``torchvision[:WEIGHTS]`` (with ``arch``), or a third-party MoCo /
    torchvision checkpoint. The input normalisation the weights were trained with is kept.
    """
    from calibclust.models.weights import load_backbone

    backbone = load_backbone(path, arch=arch, input_size=input_size)
    norm = getattr(backbone, "normalization", None) or {}
    info = {"source": os.fspath(path), "spec": dict(backbone.spec), "weights": getattr(backbone, "weights_source", {})}
    if norm.get("mean") and norm.get("std"):
        info["mean"], info["std"] = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    return backbone, info


def build_cdc_model(config: CDCConfig, backbone: nn.Module, mean=None, std=None) -> ClusteringModel:
    heads = ("clustering", "calibration") if config.heads == "dual" else ("clustering",)
    kwargs = {}
    if mean is not None and std is not None:
        kwargs = {"mean": tuple(mean), "std": tuple(std)}
    return ClusteringModel(
        backbone,
        num_clusters=config.num_clusters,
        hidden_dim=config.hidden_dim,
        head_names=heads,
        predict_head=heads[-1],
        **kwargs,
    )


# --- equations ------------------------------------------------------------------------------------
def minicluster_targets(probs: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 1 targets: row i gets q̂_k = mean of ``probs`` over its mini-cluster Q_k.

    ``probs`` (B, C) clustering-head probabilities, ``assignment`` (B,) mini-cluster ids in [0, k).
    Differentiable in ``probs`` (used by the no-stop-gradient ablation).
    """
    sums = torch.zeros(k, probs.shape[1], dtype=probs.dtype, device=probs.device).index_add(0, assignment, probs)
    counts = torch.bincount(assignment, minlength=k).to(probs.dtype).clamp_min(1)
    return (sums / counts[:, None])[assignment]


def minicluster_features(z: torch.Tensor, norm: str) -> torch.Tensor:
    """The features Eq. 1's mini-cluster K-means runs on: L2- or (authors' code) L1-normalised rows."""
    return F.normalize(z.float(), p=1 if norm == "l1" else 2, dim=1)


def calibration_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_cal, L_en) of the calibration head on one (sub-)batch.

    L_cal (Eq. 1) = −(1/B) Σ_i q̂_{k(i)} · log p_i^cal.
    L_en (Eq. 2) = Σ_j p̄_j log p̄_j with p̄ = batch mean of p^cal (negative entropy of the mean
    prediction). Eq. 2 prints a 1/C factor; the authors' code (which produced the paper's tables)
    omits it, and so do we — ``w_en = 1/C`` recovers the printed form.
    """
    logp = F.log_softmax(logits, dim=1)
    l_cal = -(targets * logp).sum(1).mean()
    mean_p = logp.exp().mean(0)
    l_en = (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return l_cal, l_en


def clustering_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 5: cross-entropy of the clustering head's strong-view logits on the selected samples."""
    return F.cross_entropy(logits, labels)


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    # z-score each row, then L2-normalise it (authors' initialize_weights, before each K-means).
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-8)
    return F.normalize(x, dim=1)


def separate_prototypes(
    w: torch.Tensor, steps: int = 2000, scale: float = 5.0, lr: float = 0.1, relu_anchors: bool = False
) -> torch.Tensor:
    """The "orthogonalisation" of §3.3, as the authors' code does it (``orth_train``).

    Not a QR step: prototypes W (k, d) and a copy A (the anchors) are optimised jointly so that
    anchor i is closer, in cosine, to prototype i than to any other — cross-entropy on
    ``scale · cos(A_i, W_j)`` with identity targets, SGD (momentum 0.9, weight decay 1e-4, cosine
    lr schedule). This pushes the prototypes apart while each stays near its K-means centre; a QR
    step would instead rotate them away from the data (and cannot make H = 512 rows orthogonal when
    D < 512). ``relu_anchors`` passes the anchors through ReLU, as the authors do; we use it only
    where the layer's inputs are themselves post-ReLU (the second layer), see :func:`prototype_init`.
    """
    if steps <= 0:
        return w.clone()
    with torch.enable_grad():
        anchors = w.detach().clone().requires_grad_(True)
        protos = w.detach().clone().requires_grad_(True)
        target = torch.arange(w.shape[0], device=w.device)
        opt = torch.optim.SGD([anchors, protos], lr=lr, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
        for _ in range(steps):
            a = F.relu(anchors) if relu_anchors else anchors
            logits = scale * F.normalize(a, dim=1) @ F.normalize(protos, dim=1).T
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return protos.detach()


@torch.no_grad()
def prototype_init(
    z: torch.Tensor,
    hidden_dim: int,
    num_clusters: int,
    seed: int = 0,
    restarts: int = 3,
    orth_steps: int = 2000,
    orth_scale: float = 5.0,
    orth_lr: float = 0.1,
    bn_eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """Prototype initialisation of one head (§3.3, Eq. 6, Prop. 1) → an :class:`MLPHead` state dict.

    W1 = K-means_H(z) centres (bias 0); h = ReLU(BN(W1 z)); W2 = K-means_C(h) centres (bias 0);
    then both layers' prototypes are pushed apart (:func:`separate_prototypes`). As in the authors'
    code each K-means runs on z-scored, L2-normalised rows, while the layers are applied to raw
    features (BN absorbs the scale). Two deliberate differences from that code: h is computed with
    the *separated* W1 (the authors cluster h of the un-separated W1 and then install the separated
    one, so W2 was fitted to activations the network never produces), and BN's running statistics
    are set to the dataset statistics of W1 z so that eval-mode outputs equal what K-means_C saw.
    """
    z = z.float()
    n = z.shape[0]
    if n < hidden_dim:
        raise InputError(
            f"prototype initialisation needs at least H = {hidden_dim} images for K-means_H (Eq. 6), "
            f"got {n}; lower --hidden-dim or use --init random"
        )
    km1 = kmeans(_rownorm(z), hidden_dim, n_init=restarts, seed=derive_seed(seed, "init-W1") & 0x7FFFFFFF)
    w1 = separate_prototypes(km1.centers, orth_steps, orth_scale, orth_lr, relu_anchors=False)
    a = z @ w1.T  # (N, H), bias 0
    mean, var = a.mean(0), a.var(0, unbiased=False)
    h = F.relu((a - mean) / torch.sqrt(var + bn_eps))
    km2 = kmeans(_rownorm(h), num_clusters, n_init=restarts, seed=derive_seed(seed, "init-W2") & 0x7FFFFFFF)
    w2 = separate_prototypes(km2.centers, orth_steps, orth_scale, orth_lr, relu_anchors=True)
    return {
        "fc1.weight": w1.clone(),
        "fc1.bias": torch.zeros(hidden_dim),
        "bn.weight": torch.ones(hidden_dim),
        "bn.bias": torch.zeros(hidden_dim),
        "bn.running_mean": mean.clone(),
        "bn.running_var": a.var(0, unbiased=True).clone(),
        "bn.num_batches_tracked": torch.tensor(0, dtype=torch.long),
        "fc2.weight": w2.clone(),
        "fc2.bias": torch.zeros(num_clusters),
    }


@torch.no_grad()
def head_probabilities(model: ClusteringModel, z: torch.Tensor, head: str, batch_size: int = 4096) -> torch.Tensor:
    """Eval-mode softmax of one head on features ``z`` (N, D) → (N, C) on the CPU."""
    was = model.heads[head].training
    model.heads[head].eval()
    out = torch.cat([F.softmax(model.head_logits(z[i : i + batch_size], head), 1).cpu() for i in range(0, len(z), batch_size)])
    model.heads[head].train(was)
    return out


@torch.no_grad()
def embed_images(model: ClusteringModel, images: np.ndarray, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """Eval-mode backbone features of un-augmented uint8 images → (N, D) float32 on ``device``."""
    was = model.backbone.training
    model.backbone.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device)
        out.append(model.embed(model.preprocess(x)).float())
    model.backbone.train(was)
    return torch.cat(out) if out else torch.zeros(0, model.feature_dim, device=device)


def head_report(probs: torch.Tensor, labels: np.ndarray | None, reliability: bool = False) -> dict:
    """Cluster sizes and mean confidence of one head's probabilities; with ``labels``, ACC / NMI /
    ARI / ECE / AURC and the Hungarian map (and with ``reliability`` the reliability-diagram bins)."""
    conf, pred = probs.max(1)
    report = {
        "cluster_sizes": torch.bincount(pred, minlength=probs.shape[1]).tolist(),
        "mean_confidence": float(conf.mean()) if len(conf) else float("nan"),
    }
    if labels is not None:
        from calibclust.metrics import clustering_report

        r = clustering_report(labels, pred.numpy(), conf.double().clamp(0, 1).numpy())
        report.update(acc=r.acc, nmi=r.nmi, ari=r.ari, ece=r.calibration.ece, aurc=r.rejection.aurc,
                      mapping={str(k): v for k, v in r.mapping.items()})
        if reliability:
            report["calibration"] = r.calibration.to_dict()
    return report


# --- optimizer state <-> safetensors ---------------------------------------------------------------
# --- the trainer ----------------------------------------------------------------------------------
@dataclass
class CDCResult:
    model: ClusteringModel
    metadata: ModelMetadata
    model_dir: Path | None
    history: list[dict]
    config: CDCConfig


class CDCTrainer:
    """Runs Algorithm 1 on one :class:`TrainingData`; see the module docstring.

    ``out_dir`` receives ``run.json`` (resolved config, versions, data), ``log.jsonl`` (one record
    per epoch; epoch 0 = after initialisation), ``checkpoint/`` (resume state, every epoch),
    ``features.safetensors`` (frozen mode) and ``model/`` (the final model, :func:`save_model`).
    """

    def __init__(
        self,
        config: CDCConfig,
        data: TrainingData,
        out_dir: str | os.PathLike | None,
        backbone: nn.Module | None = None,
        backbone_info: dict | None = None,
        backbone_name: str = "small",
        device: str = "auto",
        progress: bool = True,
        feature_cache: FeatureCache | None = None,
        prototype_state: dict[str, torch.Tensor] | None = None,
        log: Callable[[str], None] | None = None,
        clusters_choice: dict | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        eval_data: TrainingData | None = None,
    ):
        self.config = config
        # Labelled images never trained on: each epoch's ACC/ECE are measured on them (the
        # ablation's and compare's held-out split); None: on the training images.
        self.eval_data = eval_data
        self._eval_features: torch.Tensor | None = None
        self.on_epoch = on_epoch  # called with every log.jsonl record (--tensorboard)
        self.clusters_choice = clusters_choice  # --clusters auto: KChoice.to_dict(), saved in run.json and metadata
        self.data = data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = str(resolve_device(device))
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.backbone_info = dict(backbone_info or {})
        self._pretrained = backbone is not None and bool(self.backbone_info.get("source"))
        # Random initial weights come from the run's seed without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "model") & 0x7FFFFFFF)
            if backbone is None:
                backbone = build_backbone(backbone_name, input_size=data.image_size[0])
                self.backbone_info.setdefault("source", f"random init ({backbone_name})")
            self.model = build_cdc_model(config, backbone, self.backbone_info.get("mean"), self.backbone_info.get("std"))
        self.model.to(self.device)
        self.dual = config.heads == "dual"
        self.select_head = "calibration" if self.dual else "clustering"
        self.cal_head = {"dual": "calibration", "clu+cal": "clustering", "clu": None}[config.heads]
        self.batch = config.effective_batch_size(data.num_images)
        self.k = config.resolved_mini_clusters(self.batch)
        self.top = config.resolved_top_size(self.batch)
        self.strategy = build_strategy(config.select, top_size=self.top)
        self.cache = feature_cache
        self._prototype_state = prototype_state
        self.labels = data.labels
        self.history: list[dict] = []
        self._build_optimizers()

    # .. setup ....................................................................................
    def _build_optimizers(self) -> None:
        cfg, m = self.config, self.model
        for p in m.backbone.parameters():
            p.requires_grad_(not cfg.freeze_backbone)
        groups = [{"params": list(m.heads["clustering"].parameters()), "lr": cfg.lr_heads}]
        if not cfg.freeze_backbone:
            groups.insert(0, {"params": list(m.backbone.parameters()), "lr": cfg.resolved_lr_backbone()})
        # Two optimizers, as Algorithm 1 updates (θ, θ_clu) by Eq. 5 and θ_cal by Eq. 3 separately.
        self.opt_clu = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        self.opt_cal = (
            torch.optim.Adam(m.heads["calibration"].parameters(), lr=cfg.lr_heads, weight_decay=cfg.weight_decay)
            if self.dual
            else None
        )

    def _should_recalibrate(self) -> bool:
        mode = self.config.recalibrate_bn
        return mode == "yes" or (mode == "auto" and not self._pretrained)

    def _prepare_backbone(self) -> None:
        if self._should_recalibrate():
            n = recalibrate_batchnorm(self.model.backbone, self.model.preprocess, self.data.images, self.config.eval_batch_size, self.device)
            if n:
                self.log(f"re-estimated BatchNorm statistics of {n} backbone layers on the unlabeled images")

    def _prepare_cache(self) -> None:
        if not self.config.freeze_backbone or self.cache is not None:
            if self.cache is not None:
                self.cache = self.cache.to(self.device)
            return
        cfg = self.config
        key = cache_key(module_digest(self.model.backbone), images_digest(self.data.images), cfg.num_views, cfg.seed, cfg.views, "float32")
        path = self.out_dir / "features.safetensors" if self.out_dir else None
        cache = load_feature_cache(path, key) if path else None
        if cache is None:
            self.model.backbone.eval()
            cache = compute_feature_cache(
                self.model.embed, self.model.preprocess, self.data.images, cfg.num_views, cfg.seed, cfg.views,
                cfg.eval_batch_size, self.device, progress=self.progress,
            )
            if path:
                save_feature_cache(cache, path, key)
        else:
            self.log(f"reusing cached view features {path}")
        self.cache = cache.to(self.device)

    def plain_features(self) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.plain
        return embed_images(self.model, self.data.images, self.config.eval_batch_size, self.device)

    def initialise_heads(self) -> dict:
        cfg = self.config
        if cfg.init == "random":
            return {"init": "random"}
        t0 = time.time()
        state = self._prototype_state
        if state is None:
            state = prototype_init(
                self.plain_features(), cfg.hidden_dim, cfg.num_clusters, cfg.seed,
                cfg.init_kmeans_restarts, cfg.orth_steps, cfg.orth_scale, cfg.orth_lr,
            )
            self._prototype_state = state
        for name in self.model.head_names:  # both heads start from the same prototypes (§3.3)
            self.model.heads[name].load_state_dict({k: v.to(self.device) for k, v in state.items()})
        return {"init": "prototype", "init_seconds": round(time.time() - t0, 2)}

    # .. one batch (Algorithm 1, inner loop) ......................................................
    def _features(self, kind: str, idx: torch.Tensor, g: torch.Generator, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.cache is not None:
            if kind == "plain":
                return self.cache.plain[idx.to(self.cache.plain.device)]
            return self.cache.sample(kind, idx, g)
        return self.model.embed(self.model.preprocess(x))

    def _train_batch(self, idx: torch.Tensor, g: torch.Generator, batch_seed: int, stats: dict) -> None:
        cfg, m = self.config, self.model
        m.train()
        if cfg.freeze_backbone:
            m.backbone.eval()
        frozen = self.cache is not None
        x = x_weak = x_strong = None
        if not frozen:
            x = torch.from_numpy(self.data.images[idx.numpy()]).to(self.device)
            x_weak = weak_view(x, g, cfg.views)
            x_strong = strong_view(x, g, cfg.views)

        with torch.no_grad():
            # Step 1: selection from the selecting head's weak-view probabilities (Eq. 4).
            z_weak = self._features("weak", idx, g, x_weak)
            p_sel = F.softmax(m.head_logits(z_weak, self.select_head), 1)
            # Step 2: mini-clusters of the un-augmented embeddings and their targets (Eq. 1).
            z = self._features("plain", idx, g, x)
            p_clu = F.softmax(m.head_logits(z, "clustering"), 1)
        selection = self.strategy.select(SelectionInputs(p_sel, embeddings=z, indices=idx))
        pseudo = selection.dense_labels()  # (B,) label or -1
        mini = kmeans(minicluster_features(z, cfg.minicluster_norm), self.k, n_init=cfg.minicluster_restarts,
                      max_iter=cfg.minicluster_iters, seed=batch_seed)
        assignment = mini.labels
        targets = minicluster_targets(p_clu, assignment, self.k)

        counts = selection.counts().cpu()
        stats["selected"] += counts
        stats["seen"] += len(idx)
        stats["selected_idx"].append(idx[selection.indices.cpu()].cpu())
        stats["selected_labels"].append(selection.labels.cpu())
        stats["sel_conf"] += float(p_sel.max(1).values.sum())

        n_sub = max(1, self.batch // cfg.sub_batch_size)
        for sub in torch.tensor_split(torch.arange(len(idx)), n_sub):
            sub_d = sub.to(self.device)
            # Step 3a: L_clu on the strong view of the selected samples (Eq. 5).
            keep = pseudo[sub_d] >= 0
            if bool(keep.any()):
                z_s = self._features("strong", idx[sub], g, None if frozen else x_strong[sub_d])
                logits = m.head_logits(z_s, "clustering")  # whole sub-batch, so BN sees it all
                loss_clu = clustering_loss(logits[keep], pseudo[sub_d][keep])
                self.opt_clu.zero_grad(set_to_none=True)
                loss_clu.backward()
                self.opt_clu.step()
                stats["loss_clu"] += float(loss_clu.detach())
                stats["n_clu"] += 1
            else:
                # An empty selection (e.g. a fixed 0.99 threshold early on) is a skipped step, not
                # a NaN loss: cross-entropy over zero samples is undefined.
                stats["empty_sub_batches"] += 1
            if self.cal_head is None:
                continue
            # Step 3b: L_cal + w_en L_en on the un-augmented view (Eq. 1–3).
            if cfg.stop_gradient:
                with torch.no_grad():
                    z_p = self._features("plain", idx[sub], g, None if frozen else x[sub_d])
                tgt = targets[sub_d]
            else:
                # Tab. 2-V: the calibration loss reaches everything it depends on — the backbone
                # through f(x) and the clustering head through the targets q̂ (Eq. 1).
                z_p = self._features("plain", idx[sub], g, None if frozen else x[sub_d])
                p_clu_live = F.softmax(m.head_logits(z.detach(), "clustering"), 1)
                tgt = minicluster_targets(p_clu_live, assignment, self.k)[sub_d]
            logits = m.head_logits(z_p, self.cal_head)
            l_cal, l_en = calibration_losses(logits, tgt)
            loss = l_cal + cfg.w_en * l_en
            self.opt_clu.zero_grad(set_to_none=True)
            if self.opt_cal is not None:
                self.opt_cal.zero_grad(set_to_none=True)
            loss.backward()
            if self.opt_cal is not None:
                self.opt_cal.step()
            if self.opt_cal is None or not cfg.stop_gradient:
                # single head: its parameters live in opt_clu; no stop-gradient: so do the
                # backbone's and the clustering head's, which now have gradients from L_cal.
                self.opt_clu.step()
            stats["loss_cal"] += float(l_cal.detach())
            stats["loss_en"] += float(l_en.detach())
            stats["n_cal"] += 1

    # .. evaluation and logging ...................................................................
    def scored_features(self) -> torch.Tensor:
        """Features of the images the figures are measured on (``eval_data``, else the training
        images); with a frozen backbone the held-out ones are embedded once."""
        if self.eval_data is None:
            return self.plain_features()
        if self._eval_features is not None:
            return self._eval_features
        z = embed_images(self.model, self.eval_data.images, self.config.eval_batch_size, self.device)
        if self.config.freeze_backbone:
            self._eval_features = z
        return z

    def evaluate(self, epoch: int, stats: dict | None = None, seconds: float = 0.0) -> dict:
        z = self.scored_features()
        labels = self.labels if self.eval_data is None else self.eval_data.labels
        record: dict[str, Any] = {"epoch": epoch, "seconds": round(seconds, 3),
                                  "scored_on": "training images" if self.eval_data is None else "held-out images"}
        heads = {}
        for name in self.model.head_names:
            heads[name] = head_report(head_probabilities(self.model, z, name), labels)
        record["heads"] = heads
        if stats is not None:
            seen = max(1, stats["seen"])
            sel = stats["selected"]
            record["loss_clu"] = stats["loss_clu"] / max(1, stats["n_clu"]) if stats["n_clu"] else None
            record["loss_cal"] = stats["loss_cal"] / stats["n_cal"] if stats["n_cal"] else None
            record["loss_en"] = stats["loss_en"] / stats["n_cal"] if stats["n_cal"] else None
            record["selected"] = {
                "total": int(sel.sum()),
                "share": float(sel.sum()) / seen,
                "per_cluster": sel.tolist(),
                "share_per_cluster": [float(v) / seen for v in sel.tolist()],
                "empty_sub_batches": stats["empty_sub_batches"],
                "mean_selecting_confidence": stats["sel_conf"] / seen,
            }
            if self.labels is not None and sel.sum() > 0:
                # Pseudo-label accuracy on the training images (reported only): through the
                # selecting head's Hungarian map at the end of the epoch, or, when the figures are
                # measured on held-out images, the pseudo-labels' own Hungarian map.
                sidx = torch.cat(stats["selected_idx"]).numpy()
                slab = torch.cat(stats["selected_labels"]).numpy()
                if self.eval_data is None:
                    mapping = {int(k): v for k, v in heads[self.select_head]["mapping"].items()}
                    mapped = np.array([mapping.get(int(c), -1) for c in slab])
                    record["selected"]["accuracy"] = float((mapped == self.labels[sidx]).mean())
                else:
                    from calibclust.metrics import hungarian_accuracy

                    record["selected"]["accuracy"] = hungarian_accuracy(self.labels[sidx], slab).accuracy
        return record

    def _summary_line(self, r: dict) -> str:
        parts = [f"epoch {r['epoch']}/{self.config.epochs}"]
        if r.get("loss_clu") is not None:
            parts.append(f"L_clu {r['loss_clu']:.3f}")
        if r.get("loss_cal") is not None:
            parts.append(f"L_cal {r['loss_cal']:.3f} L_en {r['loss_en']:.3f}")
        if "selected" in r:
            s = r["selected"]
            parts.append(f"selected {s['share']:.0%}" + (f" (acc {s['accuracy']:.1%})" if "accuracy" in s else ""))
        for name, h in r["heads"].items():
            short = "clu" if name == "clustering" else "cal"
            text = f"{short}: conf {h['mean_confidence']:.3f}"
            if "acc" in h:
                text += f" ACC {h['acc']:.1%} NMI {h['nmi']:.3f} ARI {h['ari']:.3f} ECE {h['ece']:.1%}"
            parts.append(text)
        return " | ".join(parts)

    # .. checkpoints (calibclust.train.state) ......................................................
    def save_state(self, epoch: int) -> None:
        if self.out_dir is None:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        meta: dict[str, Any] = {"format": STATE_FORMAT, "epoch": epoch, "config": self.config.to_dict(), "optimizers": {}}
        for name, opt in (("clu", self.opt_clu), ("cal", self.opt_cal)):
            if opt is not None:
                t, m = optimizer_tensors(name, opt)
                tensors.update(t)
                meta["optimizers"][name] = m
        meta["images"] = images_digest(self.data.images)
        meta["features"] = self.backbone_info.get("features_digest")  # --features: the rows trained on
        write_state(self.out_dir, tensors, meta)

    def load_state(self) -> int | None:
        """Restore the last checkpoint; returns its epoch, or None if there is none."""
        state = read_state(self.out_dir, STATE_FORMAT)
        if state is None:
            return None
        tensors, meta = state
        # Through from_dict: JSON turned tuples into lists, and options added since the checkpoint
        # take their defaults (as the run had them).
        saved = CDCConfig.from_dict(dict(meta["config"])).to_dict()
        check_same_settings(saved, self.config.to_dict(), self.out_dir, ignore=("epochs",))
        if meta.get("images") != images_digest(self.data.images):
            raise InputError(f"--resume on different images than the checkpoint in {self.out_dir}")
        if meta.get("features") != self.backbone_info.get("features_digest"):
            raise InputError(f"--resume with other --features than the checkpoint in {self.out_dir} was trained on")
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state)
        self.model.to(self.device)
        for name, opt in (("clu", self.opt_clu), ("cal", self.opt_cal)):
            if opt is not None:
                restore_optimizer(name, opt, {k: v.to(self.device) for k, v in tensors.items()}, meta["optimizers"][name])
        return int(meta["epoch"])

    def _write_run_json(self, resumed_from: int | None) -> None:
        if self.out_dir is None:
            return
        info = {
            "method": "cdc",
            "config": self.config.to_dict(),
            "resolved": {"batch_size": self.batch, "mini_clusters": self.k, "top_size": self.top,
                         "selection": self.strategy.describe(), "device": self.device},
            "backbone": self.backbone_info,
            "data": {"root": self.data.root, "n_images": self.data.num_images, "image_size": list(self.data.image_size),
                     "has_labels": self.labels is not None, "n_unreadable": len(self.data.unreadable),
                     "unreadable": [{"path": p, "reason": r} for p, r in self.data.unreadable[:100]]},
            "versions": {"calibclust": __version__, "torch": torch.__version__, "python": platform.python_version(),
                         "numpy": np.__version__},
            "seed": self.config.seed,
            "clusters_choice": self.clusters_choice,
            "resumed_from_epoch": resumed_from,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (self.out_dir / "run.json").write_text(json.dumps(info, indent=2))

    def _append_log(self, record: dict) -> None:
        self.history.append(record)
        if self.out_dir is not None:
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _trim_log(self, last_epoch: int) -> None:
        path = self.out_dir / "log.jsonl"
        if not path.is_file():
            return
        kept = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        kept = [r for r in kept if r.get("epoch", 0) <= last_epoch]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept

    # .. main loop ................................................................................
    def fit(self, resume: bool = False) -> CDCResult:
        from tqdm.auto import tqdm

        cfg = self.config
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            existing = has_state(self.out_dir)
            if existing and not resume:
                raise InputError(f"{self.out_dir} already holds a training checkpoint; pass --resume to continue it or choose a new --out")
        start_epoch = self.load_state() if resume and self.out_dir is not None else None
        if start_epoch is None:
            if resume:
                self.log(f"no checkpoint in {self.out_dir}; starting from scratch")
            if self.out_dir is not None:
                (self.out_dir / "log.jsonl").unlink(missing_ok=True)
            self._prepare_backbone()
        else:
            self.log(f"resuming after epoch {start_epoch}")
            self._trim_log(start_epoch)
        self._prepare_cache()
        self._write_run_json(start_epoch)
        if start_epoch is None:
            info = self.initialise_heads()
            record = self.evaluate(0)
            record.update(info)
            self._append_log(record)
            self.log(self._summary_line(record) + f" | init {info['init']}")
            self.save_state(0)
            start_epoch = 0
        n = self.data.num_images
        n_batches = max(1, n // self.batch)  # Algorithm 1: ⌊N/B⌋ batches per epoch
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t0 = time.time()
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "epoch", epoch))
            perm = torch.randperm(n, generator=g)
            stats = {"selected": torch.zeros(cfg.num_clusters, dtype=torch.long), "seen": 0, "loss_clu": 0.0, "n_clu": 0,
                     "loss_cal": 0.0, "loss_en": 0.0, "n_cal": 0, "empty_sub_batches": 0, "selected_idx": [],
                     "selected_labels": [], "sel_conf": 0.0}
            bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not self.progress, leave=False)
            for b in bar:
                idx = perm[b * self.batch : (b + 1) * self.batch]
                self._train_batch(idx, g, derive_seed(cfg.seed, "minicluster", epoch, b) & 0x7FFFFFFF, stats)
                if stats["n_clu"] or stats["n_cal"]:
                    bar.set_postfix(L_clu=f"{stats['loss_clu'] / max(1, stats['n_clu']):.3f}",
                                    L_cal=f"{stats['loss_cal'] / max(1, stats['n_cal']):.3f}",
                                    sel=f"{int(stats['selected'].sum()) / max(1, stats['seen']):.0%}")
            bar.close()
            record = self.evaluate(epoch, stats, time.time() - t0)
            self._append_log(record)
            self.save_state(epoch)
            self.log(self._summary_line(record))
        return self.finish()

    def finish(self) -> CDCResult:
        """Label-free model choice: the last epoch's model, saved with its metadata."""
        z = self.plain_features()
        probs = head_probabilities(self.model, z, self.model.predict_head)
        conf = probs.max(1).values
        stats = {
            "n_images": self.data.num_images,
            "mean_confidence": float(conf.mean()),
            "cluster_sizes": torch.bincount(probs.argmax(1), minlength=self.config.num_clusters).tolist(),
            "epochs": self.config.epochs,
            "selection": self.strategy.describe(),
            "heads": self.config.heads,
            "stop_gradient": self.config.stop_gradient,
            "init": self.config.init,
            "frozen_backbone": self.config.freeze_backbone,
            "checkpoint_choice": "last epoch (label-free)",
        }
        if self.clusters_choice:
            stats["clusters_choice"] = self.clusters_choice
        if self.dual:
            stats["mean_confidence_clustering_head"] = float(head_probabilities(self.model, z, "clustering").max(1).values.mean())
        try:
            shortcut = shortcut_check(self.data.images, probs.argmax(1).cpu().numpy(), seed=self.config.seed)
        except Exception as exc:  # advisory: never lose a trained model to it
            stats["shortcut_check"] = {"error": f"{type(exc).__name__}: {exc}"}
            self.log(f"warning: the shortcut check failed ({type(exc).__name__}: {exc}); the model is saved without it")
        else:
            stats["shortcut_check"] = shortcut.to_dict()
            if shortcut.fired:
                self.log(f"warning: {shortcut.message}")
        metadata = ModelMetadata(
            num_clusters=self.config.num_clusters,
            input_size=self.data.image_size,
            mean=tuple(self.model.mean.flatten().tolist()),
            std=tuple(self.model.std.flatten().tolist()),
            method="cdc",
            resize=self.data.resize,
            probs_head=self.model.predict_head,
            calibrated=self.dual,
            backbone=backbone_label(self.model.backbone),
            embedding_dim=self.model.feature_dim,
            confidence_threshold=0.5,
            train_stats=stats,
        )
        model_dir = None
        if self.out_dir is not None:
            model_dir = save_model(self.model.cpu(), self.out_dir / "model", metadata)
            self.model.to(self.device)
            try:
                write_training_report(self.history, self.out_dir / "training.html", self.config, self.data.root)
            except Exception as exc:  # advisory, like the shortcut check: never lose a trained model to it
                self.log(f"warning: training.html not written ({type(exc).__name__}: {exc})")
        self.model.eval()
        return CDCResult(self.model, metadata, model_dir, self.history, self.config)


def write_training_report(history: list[dict], path: Path, config: CDCConfig, folder: str | None) -> None:
    """``training.html``: the per-epoch curves of ``log.jsonl`` (losses of Eq. 3 and Eq. 5, Eq. 4's
    selected share, both heads' mean confidence; ACC and ECE when the folder has labels)."""
    from calibclust.report import HTMLReport, plot_training_curves

    def head(name, key):
        return lambda r: (r.get("heads", {}).get(name) or {}).get(key)

    labelled = any((r.get("heads", {}).get("calibration") or r.get("heads", {}).get("clustering") or {}).get("acc")
                   is not None for r in history)
    report = HTMLReport(f"CDC training: {folder or ''}",
                        f"{history[-1]['epoch'] if history else 0} epochs · C = {config.num_clusters} · "
                        "log.jsonl holds every value plotted")
    report.add_figure(plot_training_curves(history, "Losses per epoch", [
        ("L_clu (Eq. 5)", lambda r: r.get("loss_clu")), ("L_cal (Eq. 3, calibration)", lambda r: r.get("loss_cal")),
        ("L_en (Eq. 3, entropy)", lambda r: r.get("loss_en"))], "loss"), alt="losses")
    report.add_figure(plot_training_curves(history, "Pseudo-labels selected (Eq. 4) and mean confidence", [
        ("selected share", lambda r: (r.get("selected") or {}).get("share")),
        ("mean confidence, calibration head", head("calibration", "mean_confidence")),
        ("mean confidence, clustering head", head("clustering", "mean_confidence"))], "share", ylim=(0, 1.02)),
        alt="selection and confidence")
    if labelled:
        report.add_figure(plot_training_curves(history, "On the training images' labels (diagnosis only)", [
            ("ACC, calibration head", head("calibration", "acc")), ("ECE, calibration head", head("calibration", "ece")),
            ("ACC, clustering head", head("clustering", "acc")), ("ECE, clustering head", head("clustering", "ece"))],
            "ACC / ECE", ylim=(0, 1.02)), alt="accuracy and calibration")
    report.write(path)


def train_cdc(
    config: CDCConfig,
    data: TrainingData,
    out_dir: str | os.PathLike | None,
    backbone: nn.Module | None = None,
    backbone_info: dict | None = None,
    backbone_name: str = "small",
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    **kwargs,
) -> CDCResult:
    """Train CDC on ``data`` and save the final model under ``out_dir/model`` (see :class:`CDCTrainer`)."""
    trainer = CDCTrainer(config, data, out_dir, backbone, backbone_info, backbone_name, device, progress, **kwargs)
    return trainer.fit(resume=resume)


# --- our own Tab. 2 ---------------------------------------------------------------------------------
# (row name, config overrides, which record/head to report). Every variant is a real code path
# of the trainer above, run on the same cached features, prototypes and seed.
ABLATION_VARIANTS: list[tuple[str, dict]] = [
    ("cdc", {}),
    ("no-init", {"init": "random"}),
    ("fixed-0.99", {"select": "fixed:0.99"}),
    ("fixed-0.95", {"select": "fixed:0.95"}),
    ("fixed-0.90", {"select": "fixed:0.9"}),
    ("fixed-0.80", {"select": "fixed:0.8"}),
    ("single-clu", {"heads": "clu"}),
    ("single-clu+cal", {"heads": "clu+cal"}),
    ("no-stop-grad", {"stop_gradient": False}),
]


@dataclass
class AblationResult:
    rows: list[dict]
    table: str
    runs: dict[str, CDCResult]


def _row(setting: str, rec: dict | None, head: str | None, extra: dict | None = None) -> dict:
    row = {"setting": setting}
    if rec is not None and head is not None:
        h = rec["heads"][head]
        row.update(acc=h.get("acc"), nmi=h.get("nmi"), ari=h.get("ari"), ece=h.get("ece"), confidence=h["mean_confidence"])
        sel = rec.get("selected")
        if sel:
            row.update(selected_share=sel["share"], selected_accuracy=sel.get("accuracy"))
        if head == "calibration" and "clustering" in rec["heads"]:
            row["ece_clu_head"] = rec["heads"]["clustering"].get("ece")
    row.update(extra or {})
    return row


def format_ablation_table(rows: list[dict], title: str = "") -> str:
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    header = f"{'Setting':<28} {'ACC':>5} {'NMI':>5} {'ARI':>5} {'ECE':>5} | {'conf':>5} {'sel%':>5} {'selACC':>6} {'ECEclu':>6}"
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['setting']:<28} {pct(r.get('acc'))} {pct(r.get('nmi'))} {pct(r.get('ari'))} {pct(r.get('ece'))} | "
            f"{pct(r.get('confidence'))} {pct(r.get('selected_share'))} {pct(r.get('selected_accuracy')):>6} {pct(r.get('ece_clu_head')):>6}"
        )
    return "\n".join(lines)


def run_ablation(
    data: TrainingData,
    config: CDCConfig,
    out_dir: str | os.PathLike,
    backbone: nn.Module | None = None,
    backbone_info: dict | None = None,
    backbone_name: str = "small",
    device: str = "auto",
    progress: bool = True,
    variants: list[str] | None = None,
    log: Callable[[str], None] | None = None,
    finetune_backbone: bool = False,
    eval_data: TrainingData | None = None,
) -> AblationResult:
    """CDC paper Tab. 2 on ``data``: K-means on the same features, initialisation (2-I), fixed
    thresholds (2-II), CDC-Clu / CDC-Cal, single head (2-III/IV), no stop-gradient (2-V).

    Needs ground-truth labels (it is an evaluation); every figure is measured on ``eval_data``
    (labelled images never trained on) when given, else on the training images. Every variant
    starts from the same backbone, prototypes and seed and trains under ``out_dir/<variant>/``:
    heads only on shared cached features by default (fast), or backbone and heads together with
    ``finetune_backbone`` — the paper's setting, where Eq. 5 updates θ and, in 2-V, so does the
    calibration loss.
    """
    import copy

    from calibclust.metrics import adjusted_rand_index, hungarian_accuracy, normalized_mutual_info

    if data.labels is None:
        raise InputError("the ablation table needs ground-truth labels: give a folder in ImageFolder layout (root/<class>/<image>)")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_cfg = dataclasses.replace(config, freeze_backbone=True)
    base = CDCTrainer(base_cfg, data, out_dir, backbone, backbone_info, backbone_name, device, progress, log=log)
    base._prepare_backbone()
    base._prepare_cache()
    z = base.cache.plain
    km = kmeans(F.normalize(z.float(), dim=1), config.num_clusters, n_init=10, seed=derive_seed(config.seed, "kmeans-baseline") & 0x7FFFFFFF)
    truth = data.labels
    pred = km.labels.cpu().numpy()
    if eval_data is not None:  # the held-out images go to the nearest centre
        truth = eval_data.labels
        z_eval = F.normalize(embed_images(base.model, eval_data.images, config.eval_batch_size, base.device).float(), dim=1)
        pred = assign(z_eval, km.centers.to(z_eval))[0].cpu().numpy()
    rows = [{"setting": "K-means (same features)", "acc": hungarian_accuracy(truth, pred).accuracy,
             "nmi": normalized_mutual_info(truth, pred), "ari": adjusted_rand_index(truth, pred)}]
    log(f"K-means on the same features: ACC {rows[0]['acc']:.1%}")
    t0 = time.time()
    state = prototype_init(z, config.hidden_dim, config.num_clusters, config.seed, config.init_kmeans_restarts,
                           config.orth_steps, config.orth_scale, config.orth_lr)
    log(f"prototype initialisation (Eq. 6 + separation) in {time.time() - t0:.1f}s")
    prepared = {**base.backbone_info, "source": base.backbone_info.get("source", backbone_name),
                "bn_recalibrated": base._should_recalibrate()}
    chosen = [v for v in ABLATION_VARIANTS if variants is None or v[0] in variants]
    runs: dict[str, CDCResult] = {}
    for name, overrides in chosen:
        cfg = dataclasses.replace(base_cfg, recalibrate_bn="no", freeze_backbone=not finetune_backbone, **overrides)
        log(f"--- {name}: {overrides or 'CDC defaults'}")
        vdir = out_dir / name
        if (vdir / "checkpoint").exists():  # rerunning the command redoes every variant
            import shutil

            shutil.rmtree(vdir)
        trainer = CDCTrainer(cfg, data, vdir, copy.deepcopy(base.model.backbone), prepared, backbone_name, device,
                             progress, feature_cache=None if finetune_backbone else base.cache, prototype_state=state,
                             log=log, eval_data=eval_data)
        runs[name] = trainer.fit()
    first = lambda n: runs[n].history[0] if n in runs else None  # noqa: E731
    last = lambda n: runs[n].history[-1] if n in runs else None  # noqa: E731
    if "no-init" in runs:
        rows.append(_row("After random init", first("no-init"), "calibration"))
    if "cdc" in runs:
        rows.append(_row("After proposed init", first("cdc"), "calibration"))
    if "no-init" in runs:
        rows.append(_row("w/o Init + CDC", last("no-init"), "calibration"))
    for t in ("0.99", "0.95", "0.90", "0.80"):
        if f"fixed-{t}" in runs:
            rows.append(_row(f"Fixed thr. ({t})", last(f"fixed-{t}"), "calibration"))
    if "cdc" in runs:
        rows.append(_row("CDC-Clu", last("cdc"), "clustering"))
        rows.append(_row("CDC-Cal", last("cdc"), "calibration"))
    if "single-clu" in runs:
        rows.append(_row("Single head (Clu)", last("single-clu"), "clustering"))
    if "single-clu+cal" in runs:
        rows.append(_row("Single head (Clu+Cal)", last("single-clu+cal"), "clustering"))
    if "no-stop-grad" in runs:
        rows.append(_row("Cal w/o stop-gradient", last("no-stop-grad"), "calibration"))
    title = (
        f"CDC ablation (our Tab. 2) on {data.root or 'the given images'}: N={data.num_images}, C={config.num_clusters}, "
        f"backbone {prepared.get('source')} ({'fine-tuned' if finetune_backbone else 'frozen'}), epochs={config.epochs}, "
        f"B={base.batch}, K={base.k}, seed={config.seed}. Scored on "
        f"{'the training images' if eval_data is None else f'{eval_data.num_images} held-out images'}. Percent; "
        f"ECE 15 bins; sel% / selACC = last epoch's pseudo-label share / accuracy (training images); "
        f"ECEclu = the same run's clustering head."
    )
    table = format_ablation_table(rows, title)
    (out_dir / "ablation.md").write_text(table + "\n")
    (out_dir / "ablation.json").write_text(json.dumps({
        "rows": rows, "config": config.to_dict(), "backbone": prepared, "finetune_backbone": finetune_backbone,
        "scored_on": "training images" if eval_data is None else f"{eval_data.num_images} held-out images"}, indent=2))
    return AblationResult(rows, table, runs)
