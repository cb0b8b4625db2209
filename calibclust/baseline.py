"""PyTorch reference points for benchmarks that live in layers without torch.

``calibclust bench label`` (in ``calibclust.serve``, which never imports torch) compares the labelling
pipeline with the loop a user would write in plain PyTorch. That loop, and the random-init checkpoint
it runs, live here in the core (which owns the torch models); torch is imported inside the functions,
so importing this module stays torch-free.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("torchvision") is not None


def save_random_checkpoint(out_dir: str | os.PathLike, backbone: str = "small", clusters: int = 10,
                           input_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised clustering model saved as a checkpoint directory. For throughput
    measurements only: weights do not change the cost of a forward pass."""
    import torch

    from calibclust.metadata import ModelMetadata
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel, save_model

    torch.manual_seed(seed)
    net = ClusteringModel(build_backbone(backbone, input_size), clusters).eval()
    meta = ModelMetadata(num_clusters=clusters, input_size=(input_size, input_size), mean=(0.5,) * 3,
                         std=(0.25,) * 3, backbone=backbone, embedding_dim=net.feature_dim)
    return save_model(net, out_dir, meta)


def dataloader_eager_throughput(paths: Sequence[str], checkpoint: str | os.PathLike, batch_size: int = 256,
                                workers: int = 2, threads: int | None = None,
                                cpu_seconds: Callable[[], float] | None = None) -> dict:
    """Label ``paths`` the way a plain PyTorch user would: a ``DataLoader`` over PIL open →
    torchvision Resize/ToTensor/Normalize with ``workers`` processes, then an eager forward pass and
    softmax/argmax per batch under ``inference_mode``. Returns images, seconds, images_per_s (and
    cpu_s when ``cpu_seconds`` is given, read before and after with the workers reaped)."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from calibclust.models.clustering import load_model

    model, meta = load_model(checkpoint)
    if threads:
        torch.set_num_threads(threads)
    tf = transforms.Compose([
        transforms.Resize(tuple(meta.input_size)),
        transforms.ToTensor(),
        transforms.Normalize(meta.mean, meta.std),
    ])
    paths = list(paths)

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as img:
                return tf(img.convert("RGB"))

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, num_workers=workers)
    c0 = cpu_seconds() if cpu_seconds else 0.0
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for x in loader:
            torch.softmax(model(x), dim=1).max(dim=1)
            n += len(x)
    seconds = time.perf_counter() - t0
    del loader  # reap the workers so their CPU time is counted
    gc.collect()
    result = {"images": n, "seconds": seconds, "images_per_s": n / seconds}
    if cpu_seconds:
        result["cpu_s"] = cpu_seconds() - c0
    return result
