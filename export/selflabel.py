"""Label-free models that actually cluster digits, for tests and measurements (not a shipped method).

CDC and SPICE (calibclust.train) are the clustering methods users train. Export, OOD-score and
INT8 measurements need a model whose predictions mean something before those land, without ever
reading ground-truth labels, and in about a minute on 2 CPU cores:

* :func:`thumbnail_kmeans_labels` – K-means (:mod:`calibclust.cluster.kmeans`, k-means++) on
  z-scored 8×8 grey thumbnails; on scikit-learn's digits this is roughly 0.7–0.8 ACC, far above
  K-means on a random network's features (~0.3 measured here);
* :func:`recalibrate_batchnorm` + :func:`fit_heads` – data-dependent BN statistics for a random
  backbone, then train only the heads on its cached features with those pseudo-labels (cheap,
  works for ResNet-18 on CPU);
* :func:`pseudo_label_digits_model` – train backbone + heads end to end on them with random-shift
  augmentation (DeepCluster-style self-labelling, one round).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from calibclust.export.ood import logits_and_embeddings


def thumbnail_kmeans_labels(images: np.ndarray, k: int, seed: int = 0) -> torch.Tensor:
    from calibclust.cluster.kmeans import kmeans

    grey = torch.from_numpy(images).float().mean(-1, keepdim=True).permute(0, 3, 1, 2)
    thumbs = nn.functional.adaptive_avg_pool2d(grey, 8).flatten(1)
    thumbs = (thumbs - thumbs.mean(0)) / thumbs.std(0).clamp_min(1e-6)
    return kmeans(thumbs, k, n_init=5, seed=seed).labels


@torch.no_grad()
def recalibrate_batchnorm(model, images: np.ndarray, n: int = 512, batch_size: int = 128, seed: int = 0):
    """Set every BatchNorm2d's running statistics to the exact mean/variance over ``n`` images.

    A randomly initialised network keeps BN's default statistics (mean 0, var 1), so its layers do
    not standardise the data and its features hardly vary between images: a head must then amplify
    tiny differences, which also amplifies fp32 rounding (parity) and int8 noise. With data-dependent
    statistics every layer is standardised and the random features spread out.
    """
    rng = np.random.default_rng(seed)
    chosen = images[np.sort(rng.permutation(len(images))[:n])]
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches seen
    model.backbone.train()
    for i in range(0, len(chosen), batch_size):
        model.embed(model.preprocess(torch.from_numpy(np.ascontiguousarray(chosen[i : i + batch_size]))))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def fit_heads(model, images: np.ndarray, pseudo: torch.Tensor, steps: int = 300, batch_size: int = 256, seed: int = 0):
    """Train every head of ``model`` on frozen backbone features (computed once) → eval-mode model."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.inference_mode():
        feats = torch.cat([
            model.embed(model.preprocess(torch.from_numpy(np.ascontiguousarray(images[i : i + 256]))))
            for i in range(0, len(images), 256)
        ])
    feats = feats.clone()
    heads = nn.ModuleList(model.heads[h] for h in model.head_names)
    heads.train()
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(feats), (batch_size,), generator=generator)
        loss = sum(nn.functional.cross_entropy(model.head_logits(feats[idx], h), pseudo[idx]) for h in model.head_names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def pseudo_label_digits_model(
    backbone: str = "small",
    steps: int = 150,
    batch_size: int = 128,
    seed: int = 0,
    images: np.ndarray | None = None,
    num_clusters: int = 10,
):
    """Small backbone + heads trained end to end on thumbnail-K-means pseudo-labels of digits."""
    from calibclust.datasets import digits_images
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel

    torch.manual_seed(seed)
    if images is None:
        images, _ = digits_images(32)
    model = ClusteringModel(build_backbone(backbone, images.shape[1]), num_clusters, hidden_dim=128)
    pseudo = thumbnail_kmeans_labels(images, num_clusters, seed)
    x_all = torch.from_numpy(images)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = model.preprocess(x_all[idx])
        # random shift by up to 3 px (replicate-pad + crop), the weak view of CDC / SCAN, batched
        pad = nn.functional.pad(x, (3, 3, 3, 3), mode="replicate")
        dy, dx = torch.randint(0, 7, (2,), generator=generator).tolist()
        x = pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
        z = model.embed(x)
        loss = sum(nn.functional.cross_entropy(model.head_logits(z, h), pseudo[idx]) for h in model.head_names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


__all__ = ["thumbnail_kmeans_labels", "recalibrate_batchnorm", "fit_heads", "pseudo_label_digits_model", "logits_and_embeddings"]
