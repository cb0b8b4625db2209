"""``calibclust predict``: the training-side (torch) writer of the predictions table.

Runs a saved :class:`~calibclust.models.clustering.ClusteringModel` over an image folder and
writes the table of :mod:`calibclust.io.predictions` that ``calibclust evaluate`` reads — from the
model's predicting head (CDC: the calibration head) or any other head (``head="clustering"`` gives
CDC-Clu). Decoding is the one decoder of :mod:`calibclust.io.images`; unreadable files become
rows with ``cluster = -1`` and the reason in ``error``. Rows are streamed to disk batch by batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from calibclust.device import resolve_device
from calibclust.errors import InputError
from calibclust.io.images import discover_images, iter_decoded_chunks
from calibclust.io.predictions import PredictionsWriter
from calibclust.models.clustering import load_model


@dataclass
class PredictSummary:
    out: Path
    rows: int
    errors: int
    head: str
    cluster_sizes: list[int]
    mean_confidence: float


def predict_folder(
    model_dir: str | os.PathLike,
    folder: str | os.PathLike,
    out: str | os.PathLike,
    head: str | None = None,
    batch_size: int = 256,
    top_k: int = 0,
    probs: bool = True,
    device: str = "auto",
    progress: bool = True,
    topk: int | None = None,
) -> PredictSummary:
    """Predict every image under ``folder`` and write the predictions table to ``out``
    (.csv / .parquet / .jsonl). Paths in the table are relative to ``folder``. ``topk`` is 0.1's
    name of ``top_k`` (removed in 0.2)."""
    if topk is not None:
        import warnings

        warnings.warn("predict_folder(topk=) is deprecated; use top_k=", DeprecationWarning, stacklevel=2)
        top_k = topk
    from tqdm.auto import tqdm

    model, metadata = load_model(model_dir)
    head = head or model.predict_head
    if head not in model.head_names:
        raise InputError(f"the model has heads {', '.join(model.head_names)}; no head {head!r}")
    device = str(resolve_device(device))
    model.to(device).eval()
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    paths = list(discover_images(folder))
    if not paths:
        raise InputError(f"no images found under {folder}")
    c = model.num_clusters
    k = max(0, min(top_k, c))
    names = metadata.cluster_names
    columns = ["path", "cluster", "cluster_name", "confidence", "error"]
    columns += [f"top{i}_{kind}" for i in range(1, k + 1) for kind in ("cluster", "prob")]
    columns += [f"prob_{j}" for j in range(c)] if probs else []
    size = tuple(metadata.input_size)
    sizes = np.zeros(c, np.int64)
    conf_sum, n_ok, n_err = 0.0, 0, 0
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)
    with PredictionsWriter(out, columns) as writer, torch.no_grad():
        for _, part, batch, failed in iter_decoded_chunks(paths, size, resize=metadata.resize, chunk=batch_size):
            ok = [q for i, q in enumerate(part) if i not in failed]
            if len(ok):
                x = torch.from_numpy(batch).to(device)
                p = F.softmax(model.head_logits(model.embed(model.preprocess(x)), head), 1).cpu()
                conf, label = p.max(1)
                top = torch.topk(p, k, dim=1) if k else None
                rows = {
                    "path": [q.relative_to(folder).as_posix() for q in ok],
                    "cluster": label.numpy(),
                    "cluster_name": [names[i] for i in label.tolist()],
                    "confidence": conf.double().numpy(),
                    "error": [""] * len(ok),
                }
                for i in range(k):
                    rows[f"top{i + 1}_cluster"] = top.indices[:, i].numpy()
                    rows[f"top{i + 1}_prob"] = top.values[:, i].double().numpy()
                if probs:
                    for j in range(c):
                        rows[f"prob_{j}"] = p[:, j].double().numpy()
                writer.write_rows(rows)
                sizes += np.bincount(label.numpy(), minlength=c)
                conf_sum += float(conf.sum())
                n_ok += len(ok)
            if failed:
                bad = [part[i] for i in failed]
                writer.write_rows(
                    {
                        "path": [q.relative_to(folder).as_posix() for q in bad],
                        "cluster": [-1] * len(bad),
                        "cluster_name": [""] * len(bad),
                        "confidence": [float("nan")] * len(bad),
                        "error": list(failed.values()),
                    }
                )
                n_err += len(bad)
            bar.update(len(part))
    bar.close()
    return PredictSummary(Path(out), n_ok + n_err, n_err, head, sizes.tolist(), conf_sum / max(1, n_ok))
