"""``--engine ray``: the labelling pipeline as a Ray Data job.

    paths (discovery order, with their index) → ``map_batches(LabelActor)`` on an actor pool — each
    actor holds one model session and decodes + predicts its batches → ``write_parquet``

on a local Ray instance by default (all local CPUs), or on the cluster named by ``RAY_ADDRESS``
(``ray://head:10001`` or ``auto``). On a cluster, the image folder, the model file and ``--out`` must
be visible at the same paths on every node (a shared filesystem); the workers need
``calibclust[serve]`` installed.

The Parquet parts are then read back on the driver, ordered by index, and go through the very same
finalisation as the local engine (policy fitted on all scores, table/summary/report), so the outputs
have the same rows in the same order. Per-image numbers equal the local engine's up to float32
rounding differences that a different batch composition can cause.

Resuming: Ray retries failed tasks and restarts dead actors itself; if the driver is killed,
``--resume`` restarts the Ray job from the beginning (its parts are not kept).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from calibclust.errors import require
from calibclust.io.images import DEFAULT_MAX_BYTES
from calibclust.serve.pipeline import build_rows, decode_batch, iter_relative_paths, wanted_outputs


class LabelActor:
    """One model session per actor; called on dict-of-numpy batches with ``index`` and ``path``."""

    def __init__(self, model: str, folder: str, backend: str, max_pixels: int, threads: int | None, keep_probs: bool,
                 max_bytes: int = DEFAULT_MAX_BYTES, wanted: tuple[str, ...] | None = None, embedding_dim: int = 0):
        from calibclust.serve.labeler import Labeler

        self.labeler = Labeler(model, backend, threads=threads, max_pixels=max_pixels)
        self.folder = Path(folder)
        self.keep_probs = keep_probs
        self.max_bytes = max_bytes
        self.wanted = wanted or (("probs", "confidence", "label", "ood_score") if keep_probs else ("confidence", "label", "ood_score"))
        self.embedding_dim = embedding_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rel = [str(p) for p in batch["path"]]
        ok, images, errors = decode_batch([str(self.folder / r) for r in rel], self.labeler.input_size,
                                          self.labeler.max_pixels, self.max_bytes, self.labeler.metadata.resize)
        outputs = self.labeler.predict(images, self.wanted) if len(ok) else {}
        rows = build_rows(rel, ok, outputs, errors, self.labeler.num_clusters, self.keep_probs, self.embedding_dim)
        result = {"index": np.asarray(batch["index"], np.int64)}
        for key, value in rows.items():
            if key in ("probs", "embedding"):  # one Arrow column per entry
                prefix = "prob" if key == "probs" else "emb"
                for c in range(value.shape[1]):
                    result[f"{prefix}_{c}"] = value[:, c]
            elif value.dtype.kind == "U":
                result[key] = value.astype(object)  # Arrow strings
            else:
                result[key] = value
        return result


def _init_ray(actors: int | None):
    ray = require("ray", "ray", "--engine ray")
    require("ray.data", "ray", "--engine ray")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    return ray


def run_ray(opts, labeler, batch_size: int) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """Run the job; returns a callable yielding the parts in discovery order (re-iterable)."""
    ray = _init_ray(opts.ray_actors)
    import ray.data

    keep_probs = bool(opts.top_k or opts.write_probs)
    embedding_dim = labeler.embedding_dim() if opts.write_embeddings else 0
    rel_paths = list(iter_relative_paths(opts.folder))
    out = Path(opts.out_dir) / ".calibclust-label" / "ray"
    if out.exists():
        shutil.rmtree(out)
    if not rel_paths:
        return lambda: iter(())
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = opts.ray_actors or max(1, cpus)
    gpu = labeler.backend_name in ("cuda", "tensorrt")
    ray.data.DataContext.get_current().enable_progress_bars = bool(opts.progress)
    items = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(rel_paths)])
    ds = items.map_batches(
        LabelActor,
        fn_constructor_kwargs=dict(
            model=str(Path(opts.model).resolve()), folder=str(Path(opts.folder).resolve()),
            backend=labeler.backend_name, max_pixels=opts.max_pixels, threads=opts.threads or 1,
            keep_probs=keep_probs, max_bytes=int(opts.max_file_mb * 2**20), wanted=wanted_outputs(opts),
            embedding_dim=embedding_dim,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=1 if gpu else 0,
    )
    ds.write_parquet(str(out))
    num_clusters = labeler.num_clusters

    def parts(columns: tuple[str, ...] | None = None, chunk: int = 4096) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow.dataset as pads

        # Only the columns asked for: a pass that needs three must not load every emb_<d> column.
        wanted = ["index", "path", "cluster", "confidence", "ood_score", "error"]
        if keep_probs and (columns is None or "probs" in columns):
            wanted += [f"prob_{c}" for c in range(num_clusters)]
        if embedding_dim and (columns is None or "embedding" in columns):
            wanted += [f"emb_{d}" for d in range(embedding_dim)]
        table = pads.dataset(str(out), format="parquet").to_table(columns=wanted).sort_by("index")
        if table.num_rows != len(rel_paths):
            raise RuntimeError(f"Ray returned {table.num_rows} rows for {len(rel_paths)} files")
        for start in range(0, table.num_rows, chunk):
            t = table.slice(start, chunk)
            part = {
                "path": np.asarray(t.column("path").to_pylist(), dtype=str),
                "cluster": t.column("cluster").to_numpy().astype(np.int64),
                "confidence": t.column("confidence").to_numpy(zero_copy_only=False).astype(np.float32),
                "ood_score": t.column("ood_score").to_numpy(zero_copy_only=False).astype(np.float32),
                "error": np.asarray(t.column("error").to_pylist(), dtype=str),
            }
            if keep_probs and (columns is None or "probs" in columns):
                part["probs"] = np.stack(
                    [t.column(f"prob_{c}").to_numpy(zero_copy_only=False) for c in range(num_clusters)], axis=1
                ).astype(np.float32)
            if embedding_dim and (columns is None or "embedding" in columns):
                part["embedding"] = np.stack(
                    [t.column(f"emb_{d}").to_numpy(zero_copy_only=False) for d in range(embedding_dim)], axis=1
                ).astype(np.float32)
            yield part

    return parts
