"""Backbone features of an image folder, written in chunks, and nearest-neighbour mining.

``calibclust embed FOLDER --backbone-weights CKPT --out FEATURES.npy`` writes

* ``FEATURES.npy`` – float32 (N, D), L2-normalised rows, a memory-mapped ``.npy`` filled chunk by
  chunk, so 10⁶ images never sit in RAM at once (``np.load(path, mmap_mode="r")`` reads it back);
* ``FEATURES.files.txt`` – the image paths of the rows, relative to FOLDER, one per line;
* ``FEATURES.json`` – backbone, normalisation, image size, counts;
* with ``--neighbors K``: ``FEATURES.knn.npy`` (N, K) int64 neighbour rows and ``FEATURES.knn_sims.npy``
  (N, K) float32 cosine similarities, most similar first, the image itself excluded.

Images are preprocessed without augmentation (resize to the backbone's input size, normalise with
the mean/std the backbone was trained with). Unreadable files are skipped, listed on stderr and in
the JSON, and the command exits with code 3.

:func:`knn_neighbours` is the top-k cosine search that SPICE's reliable pseudo-labelling ("SPICE:
Semantic Pseudo-Labeling for Image Clustering", §III-C) and SCAN-style methods need: chunked matrix products in torch (any device),
or faiss when it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from calibclust.cli_names import device_arg, warn_deprecated
from calibclust.models.names import is_timm
from calibclust.errors import EXIT_OK, EXIT_PARTIAL

# Architectures --backbone may name here: those third-party and torchvision weights come in.
ARCHITECTURES = ("resnet18", "resnet34", "resnet50")


def sidecar_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files that belong to a features file ``out`` (``.npy``)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    return {
        "features": stem.with_name(stem.name + ".npy"),
        "files": stem.with_name(stem.name + ".files.txt"),
        "meta": stem.with_name(stem.name + ".json"),
        "knn": stem.with_name(stem.name + ".knn.npy"),
        "knn_sims": stem.with_name(stem.name + ".knn_sims.npy"),
    }


@dataclass
class EmbedResult:
    features: Path
    n_images: int
    feature_dim: int
    files: list[str]
    errors: list = field(default_factory=list)  # ImageDecodeError
    knn: Path | None = None


def embed_folder(
    folder: str | os.PathLike,
    backbone: str | os.PathLike,
    out: str | os.PathLike,
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 2,
    arch: str | None = None,
    knn: int = 0,
    progress: bool = True,
) -> EmbedResult:
    """Embed every image of ``folder`` with the backbone at ``backbone`` (see
    :func:`calibclust.models.weights.load_backbone` for what it accepts) into ``out``."""
    import numpy as np
    import torch

    from calibclust.augment import preprocess
    from calibclust.errors import CalibclustError
    from calibclust.io.images import discover_images, load_images
    from calibclust.models.weights import load_backbone
    from calibclust.device import resolve_device

    folder = Path(folder)
    paths = list(discover_images(folder))
    if not paths:
        raise CalibclustError(f"no images found under {folder}")
    dev = resolve_device(device)
    model = load_backbone(backbone, arch=arch, map_location=dev)
    norm = model.normalization
    size = int(model.spec["input_size"])
    dim = int(model.feature_dim)
    sidecars = sidecar_paths(out)
    sidecars["features"].parent.mkdir(parents=True, exist_ok=True)
    tmp = sidecars["features"].with_name("." + sidecars["features"].name + ".tmp.npy")
    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(paths), dim))

    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="embed", unit="img", dynamic_ncols=True)
    errors, kept, row = [], [], 0
    from concurrent.futures import ThreadPoolExecutor

    def decode(batch_paths):
        # Split one batch over the workers; Pillow releases the GIL while decoding.
        parts = max(1, min(workers, len(batch_paths)))
        step = -(-len(batch_paths) // parts)
        chunks = [batch_paths[i : i + step] for i in range(0, len(batch_paths), step)]
        results = list(inner.map(lambda c: load_images(c, (size, size)), chunks))
        arrays = [r[0] for r in results]
        errs = [e for r in results for e in r[1]]
        return np.concatenate(arrays), errs

    try:
        with ThreadPoolExecutor(max(1, workers)) as inner, ThreadPoolExecutor(1) as outer, torch.inference_mode():
            pending = outer.submit(decode, batches[0])
            for i, batch_paths in enumerate(batches):
                images, errs = pending.result()
                if i + 1 < len(batches):
                    pending = outer.submit(decode, batches[i + 1])  # decode ahead while the model runs
                bad = {e.path for e in errs}
                errors.extend(errs)
                kept.extend(p for p in batch_paths if str(p) not in bad)
                if len(images):
                    x = preprocess(torch.from_numpy(images).to(dev), norm["mean"], norm["std"])
                    z = torch.nn.functional.normalize(model(x).float(), dim=1)
                    feats[row : row + len(images)] = z.cpu().numpy()
                    row += len(images)
                if bar is not None:
                    bar.update(len(batch_paths))
    finally:
        if bar is not None:
            bar.close()
    feats.flush()
    del feats
    final = sidecars["features"]
    if row == len(paths):
        os.replace(tmp, final)
    else:
        # Some files failed: copy the filled rows into a file of the right shape, chunk by chunk.
        src = np.load(tmp, mmap_mode="r")
        dst = np.lib.format.open_memmap(final, mode="w+", dtype=np.float32, shape=(row, dim))
        for start in range(0, row, 65536):
            stop = min(row, start + 65536)
            dst[start:stop] = src[start:stop]
        dst.flush()
        del src, dst
        tmp.unlink()
    rel = [p.relative_to(folder).as_posix() for p in kept]
    sidecars["files"].write_text("".join(r + "\n" for r in rel), encoding="utf-8")
    meta = {
        "folder": str(folder.resolve()),
        # Resolved, so that 'train --features' finds it from any working directory; keywords stay.
        "backbone": os.fspath(Path(backbone).resolve()) if Path(backbone).exists() else os.fspath(backbone),
        "backbone_spec": dict(model.spec),
        "feature_dim": dim,
        "input_size": size,
        "mean": list(norm["mean"]),
        "std": list(norm["std"]),
        "n_images": row,
        "n_failed": len(errors),
        "failed": [{"path": e.path, "reason": e.reason} for e in errors],
        "l2_normalised": True,
    }
    result = EmbedResult(final, row, dim, rel, errors)
    if knn and row > 1:
        k = min(knn, row - 1)
        idx, sims = knn_neighbours(np.load(final, mmap_mode="r"), k, device=dev, progress=progress)
        np.save(sidecars["knn"], idx)
        np.save(sidecars["knn_sims"], sims)
        meta["knn"] = k
        result.knn = sidecars["knn"]
    sidecars["meta"].write_text(json.dumps(meta, indent=2))
    return result


def _faiss():
    try:
        import faiss  # noqa: F401

        return faiss
    except ImportError:
        return None


def knn_neighbours(
    features,
    k: int,
    chunk: int = 4096,
    device=None,
    exclude_self: bool = True,
    backend: str = "auto",
    normalize: bool = False,
    progress: bool = False,
):
    """Top-``k`` cosine neighbours of every row of ``features`` (N, D) among all rows.

    Returns ``(indices int64 (N, k), similarities float32 (N, k))``, most similar first; with
    ``exclude_self`` a row is never its own neighbour. Rows are expected L2-normalised (pass
    ``normalize=True`` otherwise). ``backend``: "torch" (chunked ``(chunk × chunk)`` similarity
    blocks merged into a running top-k, so memory stays O(chunk · (chunk + k)); the features may
    be a memory-mapped array), "faiss" (exact ``IndexFlatIP``), or "auto" (faiss if installed).
    """
    import numpy as np
    import torch

    n = features.shape[0]
    if not 1 <= k <= n - int(exclude_self):
        raise ValueError(f"k must be in [1, {n - int(exclude_self)}] for {n} rows, got {k}")
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        from calibclust.errors import MissingDependencyError

        raise MissingDependencyError("faiss", "train", "faiss nearest-neighbour search (pip install faiss-cpu)")
    if faiss is not None:
        x = np.ascontiguousarray(features, dtype=np.float32)
        if normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        sims, idx = index.search(x, k + int(exclude_self))
        if exclude_self:
            # Drop the row itself (usually first; among exact duplicates it may be elsewhere or
            # absent, then the (k+1)-th hit goes instead).
            is_self = idx == np.arange(n)[:, None]
            drop = np.where(is_self.any(1), is_self.argmax(1), k)
            keep = np.ones(idx.shape, bool)
            keep[np.arange(n), drop] = False
            idx, sims = idx[keep].reshape(n, k), sims[keep].reshape(n, k)
        return idx.astype(np.int64), sims.astype(np.float32)

    dev = torch.device(device) if device is not None else torch.device("cpu")

    def block(a: int, b: int):
        if torch.is_tensor(features):
            t = features[a:b].float()
        else:  # a copy: the rows may come from a read-only memory map
            t = torch.from_numpy(np.array(features[a:b], dtype=np.float32, copy=True))
        t = t.to(dev)
        return torch.nn.functional.normalize(t, dim=1) if normalize else t

    # Keep the whole database on the device when it is small; otherwise stream it in chunks.
    resident = block(0, n) if n * features.shape[1] * 4 <= 2**30 else None
    out_i = np.empty((n, k), np.int64)
    out_s = np.empty((n, k), np.float32)
    starts = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="knn", unit="chunk", dynamic_ncols=True)
    with torch.inference_mode():
        for qa in starts:
            qb = min(n, qa + chunk)
            q = resident[qa:qb] if resident is not None else block(qa, qb)
            best_s = torch.full((qb - qa, k), float("-inf"), device=dev)
            best_i = torch.zeros((qb - qa, k), dtype=torch.long, device=dev)
            for da in range(0, n, chunk):
                db = min(n, da + chunk)
                d = resident[da:db] if resident is not None else block(da, db)
                s = q @ d.T  # (q, d) cosine similarities
                if exclude_self and da < qb and qa < db:
                    rows = torch.arange(qa, qb, device=dev)
                    cols = rows - da
                    ok = (cols >= 0) & (cols < db - da)
                    s[(rows - qa)[ok], cols[ok]] = float("-inf")
                ids = torch.arange(da, db, device=dev).expand(qb - qa, -1)
                cand_s = torch.cat([best_s, s], 1)
                cand_i = torch.cat([best_i, ids], 1)
                best_s, pos = torch.topk(cand_s, k, dim=1)
                best_i = cand_i.gather(1, pos)
            out_s[qa:qb] = best_s.cpu().numpy()
            out_i[qa:qb] = best_i.cpu().numpy()
    return out_i, out_s


# --- CLI ------------------------------------------------------------------------------------------

_EPILOG = """\
examples:
  calibclust embed images/ --backbone-weights runs/moco --out feats.npy
  calibclust embed images/ --backbone-weights runs/moco --out feats.npy --neighbors 20
  # third-party weights (architecture inferred from the keys), or torchvision's ImageNet weights
  calibclust embed images/ --backbone-weights moco_v2_800ep_pretrain.pth.tar --out feats.npy
  calibclust embed images/ --backbone-weights torchvision --backbone resnet50 --out feats.npy

Reading the result in Python:
  feats = np.load("feats.npy", mmap_mode="r"); files = open("feats.files.txt").read().splitlines()
"""


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="L2-normalised backbone features of every image of a folder (+ nearest neighbours)",
        description=(
            "Compute the backbone features of every image in FOLDER (no augmentation), L2-normalise "
            "them and write them chunk by chunk to a memory-mapped .npy file, with the file list "
            "beside it (FILE.files.txt) and a description (FILE.json)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER", help="folder of images (sub-folders are searched)")
    p.add_argument(
        "--backbone-weights",
        metavar="PATH",
        help="the backbone (required): a 'calibclust pretrain' run dir / backbone.json, a trained model dir, "
        "a .safetensors or MoCo .pth.tar file, or 'torchvision[:WEIGHTS]'",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="features file (.npy)")
    p.add_argument("--backbone", metavar="ARCH",
                   help="architecture of third-party, torchvision or timm weights: resnet18, resnet34, resnet50 or "
                        "timm:NAME (inferred from a file's keys when omitted)")
    # 0.1's spelling: --backbone named the weights and --arch the architecture (until 0.2).
    p.add_argument("--arch", dest="legacy_arch", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default %(default)s)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    p.add_argument("--neighbors", type=int, default=0, metavar="K", help="also write the K nearest neighbours of every image")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from calibclust.errors import InputError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not Path(args.folder).is_dir():
        raise InputError(f"not a folder: {args.folder}")
    if args.batch_size < 1 or args.neighbors < 0:
        raise InputError("--batch-size must be >= 1 and --neighbors >= 0")
    weights, arch = args.backbone_weights, args.backbone
    if weights is None and arch is not None and arch not in ARCHITECTURES and not is_timm(arch):
        # Before 0.2 --backbone named the weights (and --arch the architecture).
        warn_deprecated("calibclust embed", "--backbone PATH", "--backbone-weights PATH")
        weights, arch = arch, None
    if args.legacy_arch is not None:
        warn_deprecated("calibclust embed", "--arch", "--backbone")
        arch = args.legacy_arch
    if weights is None:
        raise InputError("--backbone-weights is required: the backbone whose features to write")
    if arch is not None and arch not in ARCHITECTURES and not is_timm(arch):
        raise InputError(f"--backbone {arch!r}: choose {', '.join(ARCHITECTURES)} or timm:NAME (the architecture of --backbone-weights)")
    result = embed_folder(
        args.folder,
        weights,
        args.out,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        arch=arch,
        knn=args.neighbors,
        progress=not args.no_progress,
    )
    for err in result.errors[:20]:
        print(f"embed: skipped {err.path}: {err.reason}", file=sys.stderr)
    if len(result.errors) > 20:
        print(f"embed: ... {len(result.errors) - 20} more unreadable files", file=sys.stderr)
    side = sidecar_paths(result.features)
    print(
        f"embed: {result.n_images} x {result.feature_dim} features -> {result.features} "
        f"(files: {side['files'].name})" + (f"; neighbours -> {result.knn.name}" if result.knn else "")
    )
    return EXIT_PARTIAL if result.errors else EXIT_OK
