"""What every clustering method trains on and scores with: decoded images (:class:`TrainingData`),
pretrained backbones (:func:`load_backbone_dir`), and eval-mode features / head probabilities of a
:class:`calibclust.models.clustering.ClusteringModel` with the report of one head."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclust.errors import InputError
from calibclust.models.clustering import ClusteringModel


@dataclass
class TrainingData:
    """Decoded training images plus what is only ever *reported* (labels)."""

    images: np.ndarray  # (N, H, W, 3) uint8, in memory or read from disk (calibclust.io.cache.CachedImages)
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
                    resize: str = "squash", cache_dir: str | os.PathLike | None = None) -> "TrainingData":
        """Decode an image folder with the one decoder (:mod:`calibclust.io.images`, ``resize`` policy);
        unreadable files are skipped and listed. Class sub-folders give labels used for reporting only.
        With ``cache_dir`` the images go to an on-disk cache (:mod:`calibclust.io.cache`: built once,
        reused, resumable) and are read by index, so the images take no memory however large the folder."""
        from tqdm.auto import tqdm

        if cache_dir is not None:
            from calibclust.io.cache import build_image_cache

            cached = build_image_cache(root, cache_dir, size, resize=resize, progress=progress)
            return cls(cached.images, cached.paths, cached.labels, cached.class_names, str(root), cached.unreadable, resize)

        from calibclust.io.images import iter_decoded_chunks, list_image_folder

        try:
            listing = list_image_folder(root)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
        size = (size, size) if isinstance(size, int) else tuple(size)
        arrays, keep, unreadable = [], [], []
        bar = tqdm(total=len(listing.paths), desc="decoding images", unit="img", disable=not progress)
        for start, part, batch, failed in iter_decoded_chunks(listing.paths, size, resize=resize):
            unreadable += [(str(part[i]), reason) for i, reason in failed.items()]
            keep += [start + i for i in range(len(part)) if i not in failed]
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
        # An on-disk cache gives a view (nothing read); an in-memory array a copy of the rows.
        from calibclust.io.cache import CachedImages

        images = self.images.subset(idx) if isinstance(self.images, CachedImages) else self.images[idx]
        return TrainingData(images, [self.paths[i] for i in idx], labels, self.class_names, self.root,
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


def choose_k_on_backbone(images: np.ndarray, backbone: nn.Module, backbone_info: dict, k_range: tuple[int, int],
                         seed: int = 0, device: str = "cpu", progress=None):
    """``--clusters auto``: :func:`calibclust.cluster.choose_k.choose_k` on the L2-normalised eval-mode
    features ``backbone`` (normalised as ``backbone_info`` says) gives a fixed random subset of
    ``images`` (at most :data:`~calibclust.cluster.choose_k.DEFAULT_MAX_POINTS`: the criteria are
    sample statistics, and the rest would only cost time). Returns the ``KChoice``."""
    from calibclust.cluster.choose_k import DEFAULT_MAX_POINTS, choose_k

    norm = {k: tuple(backbone_info[k]) for k in ("mean", "std") if backbone_info.get(k) is not None}
    probe = ClusteringModel(backbone, 2, head_names=("clustering",), predict_head="clustering", **norm).to(device)
    n = len(images)
    rows = (np.sort(np.random.default_rng(seed).choice(n, DEFAULT_MAX_POINTS, replace=False)) if n > DEFAULT_MAX_POINTS
            else slice(None))
    z = F.normalize(embed_images(probe, np.asarray(images[rows]), device=device), dim=1).cpu().numpy()
    return choose_k(z, k_range, seed=seed, progress=progress)


def fit_head_to_targets(head: nn.Module, features: torch.Tensor, targets: torch.Tensor, epochs: int, lr: float,
                        batch_size: int, generator: torch.Generator) -> float:
    """Adam on a head over fixed features (N, D): cross-entropy against ``targets``, class indices
    (N,) or probabilities (N, C) (soft cross-entropy); batches shuffled by ``generator``, a last
    batch of one row skipped (BatchNorm). Returns the last epoch's mean loss; the head ends in eval mode."""
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    soft = targets.is_floating_point()
    n, last = len(features), float("nan")
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(features.device)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            logits = head(features[idx])
            if soft:
                loss = -(targets[idx] * F.log_softmax(logits, 1)).sum(1).mean()
            else:
                loss = F.cross_entropy(logits, targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        last = total / n
    head.eval()
    return last


def heldout_figures(probs: torch.Tensor, labels: np.ndarray) -> dict:
    """ACC / NMI / ARI / ECE of one head's probabilities against known labels, as ``eval_*`` (the
    columns of the training histories that score held-out images)."""
    report = head_report(probs, labels)
    return {f"eval_{key}": report[key] for key in ("acc", "nmi", "ari", "ece")}


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
