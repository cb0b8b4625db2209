"""Small model and data helpers shared by the torch tests (imported as a plain module)."""

from __future__ import annotations

import numpy as np
import torch


def randomise(module, seed: int = 0, scale: float = 1.0):
    """Distinct random values in every floating tensor (BN statistics too), so that "same output"
    or "same tensors" means something; the module's train/eval mode is left as it was."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g).abs() * scale + 0.1)
    return module


def three_shapes(n: int = 96, size: int = 16, seed: int = 0):
    """TrainingData of three visually distinct classes: vertical bars, a bright block, noise."""
    from calibclust.train.data import TrainingData

    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, size, size, 3), np.uint8)
    labels = np.arange(n) % 3
    a, b, c = size // 4, size // 2, 3 * size // 4
    for i, k in enumerate(labels):
        if k == 0:
            imgs[i, :, a:b] = 255
        elif k == 1:
            imgs[i, a:c, a:c] = 200
        else:
            imgs[i] = rng.integers(0, 256, (size, size, 3))
    imgs = np.clip(imgs.astype(int) + rng.integers(0, 40, imgs.shape), 0, 255).astype(np.uint8)
    return TrainingData(imgs, [f"{i}.png" for i in range(n)], labels)


def assert_exports_and_labels(method, images, paths, folder, out):
    """A fitted method's model exports to ONNX, onnxruntime gives its probabilities (1e-4), and
    ``calibclust label FOLDER`` (whose files are ``paths``, in ``images``' order) gives its clusters."""
    import csv

    from calibclust.cli import main
    from calibclust.export.onnx import export_onnx
    from calibclust.serve.labeler import Labeler

    probs = method.predict_proba(images)
    exported = export_onnx(method.model, method.metadata, images, out / "model.onnx", log=lambda *a: None)
    np.testing.assert_allclose(Labeler(str(exported.path)).predict_all(images[:20])["probs"], probs[:20], atol=1e-4)
    rc = main(["label", str(folder), "--model", str(exported.path), "--out", str(out / "labelled"),
               "--no-report", "--no-progress", "--confidence-threshold", "0"])
    assert rc == 0
    with open(out / "labelled" / "predictions.csv", newline="") as f:
        rows = {r["path"]: int(r["cluster"]) for r in csv.DictReader(f)}
    by_path = dict(zip(paths, probs.argmax(1).tolist()))
    assert len(rows) == len(paths)
    agree = np.mean([rows[p] == by_path[p] for p in paths])
    assert agree >= 0.99, agree


def assert_round_trips(method, images, path):
    """``save`` then ``ClusteringMethod.load`` gives the same method class, settings and probabilities (1e-5)."""
    from calibclust.train.methods import ClusteringMethod

    method.save(path)
    loaded = ClusteringMethod.load(path)
    assert type(loaded) is type(method) and loaded.config == method.config
    np.testing.assert_allclose(loaded.predict_proba(images), method.predict_proba(images), atol=1e-5)
