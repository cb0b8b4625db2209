"""Cluster exemplars: a small sidecar of each cluster's most typical images. Torch-free.

Unsupervised clusters have no names; a person names them by looking at typical members. The
exemplars travel with an exported model as one ``.npz`` file next to it, named (relative to the
model file) by the model metadata's ``exemplars`` field (the model contract: calibclust/contract.py).
Whoever has scores for a folder of images — training (any typicality score), the quick start,
``calibclust exemplars`` (the model's calibrated confidence) — builds it with the same functions.

Sidecar layout (``FORMAT``; read with ``allow_pickle=False``, so a sidecar can never run code):

=============  ==============================  =============================================
``images``     uint8 (N, h, w, 3)              thumbnails, all the same size
``cluster``    int64 (N,)                      the cluster each thumbnail belongs to
``score``      float64 (N,)                    its typicality score (higher = more typical)
``paths``      unicode (N,)                    source image path, as the caller gave it
``info``       unicode scalar, JSON            format, num_clusters, score_name, thumbnail size
=============  ==============================  =============================================

Within a cluster, thumbnails are stored most typical first.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from calibclust.errors import CalibclustError, InputError
from calibclust.io.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

FORMAT = "calibclust-exemplars/1"
SIDECAR_SUFFIX = ".exemplars.npz"
DEFAULT_PER_CLUSTER = 8
# Thumbnails keep the model's input aspect and are shrunk so the longer side is at most this
# (96 px: 10 clusters × 8 thumbnails of 96×96 RGB is 2.2 MB before compression).
MAX_THUMBNAIL_SIDE = 96


class ExemplarsError(CalibclustError):
    """A sidecar that is missing, malformed or does not fit its model."""


@dataclass
class Exemplars:
    images: np.ndarray  # uint8 (N, h, w, 3)
    cluster: np.ndarray  # int64 (N,)
    score: np.ndarray  # float64 (N,)
    paths: list[str]
    num_clusters: int
    score_name: str = "confidence"
    info: dict = field(default_factory=dict)  # free-form provenance (model digest, folder, ...)

    def __post_init__(self):
        self.images = np.asarray(self.images)
        self.cluster = np.asarray(self.cluster, dtype=np.int64).reshape(-1)
        self.score = np.asarray(self.score, dtype=np.float64).reshape(-1)
        self.paths = [str(p) for p in self.paths]
        self.num_clusters = int(self.num_clusters)
        self.validate()

    def validate(self) -> None:
        n = len(self.cluster)
        problems = []
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            problems.append(f"images must be uint8 (N, h, w, 3), got {self.images.dtype} {self.images.shape}")
        elif len(self.images) != n:
            problems.append(f"{len(self.images)} images for {n} cluster ids")
        if len(self.score) != n or len(self.paths) != n:
            problems.append(f"lengths differ: cluster {n}, score {len(self.score)}, paths {len(self.paths)}")
        if self.num_clusters < 1:
            problems.append(f"num_clusters must be >= 1, got {self.num_clusters}")
        if n and (self.cluster.min() < 0 or self.cluster.max() >= self.num_clusters):
            problems.append(f"cluster ids must be in [0, {self.num_clusters}), got {self.cluster.min()}..{self.cluster.max()}")
        if problems:
            raise ExemplarsError("invalid exemplars: " + "; ".join(problems))

    @property
    def thumbnail_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.images.shape[1:3])

    def counts(self) -> np.ndarray:
        return np.bincount(self.cluster, minlength=self.num_clusters)

    def for_cluster(self, c: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Thumbnails, scores and source paths of cluster ``c``, most typical first."""
        idx = np.flatnonzero(self.cluster == int(c))
        idx = idx[np.argsort(-self.score[idx], kind="stable")]
        return self.images[idx], self.score[idx], [self.paths[i] for i in idx]


# --- sidecar file ----------------------------------------------------------------------------------
def write_exemplars(path: str | os.PathLike, exemplars: Exemplars) -> Path:
    """Write the sidecar atomically (temporary file, then rename)."""
    path = Path(path)
    exemplars.validate()
    order = np.lexsort((-exemplars.score, exemplars.cluster))  # by cluster, most typical first
    info = {
        "format": FORMAT,
        "num_clusters": exemplars.num_clusters,
        "score_name": exemplars.score_name,
        "thumbnail_size": list(exemplars.thumbnail_size) if len(exemplars.cluster) else None,
        **{k: v for k, v in exemplars.info.items() if k not in ("format", "num_clusters", "score_name")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                images=exemplars.images[order],
                cluster=exemplars.cluster[order],
                score=exemplars.score[order],
                paths=np.array([exemplars.paths[i] for i in order], dtype=np.str_).reshape(-1),
                info=np.array(json.dumps(info, sort_keys=True), dtype=np.str_),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_exemplars(path: str | os.PathLike) -> Exemplars:
    """Read a sidecar written by :func:`write_exemplars` (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise ExemplarsError(f"{path}: exemplars sidecar not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("images", "cluster", "score", "paths", "info") if k not in npz.files]
            if missing:
                raise ExemplarsError(f"{path}: not an exemplars sidecar (missing {', '.join(missing)})")
            info = json.loads(str(npz["info"]))
            arrays = {k: npz[k] for k in ("images", "cluster", "score", "paths")}
    except ExemplarsError:
        raise
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ExemplarsError(f"{path}: unreadable exemplars sidecar ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        raise ExemplarsError(f"{path}: exemplars format {got!r}, this calibclust reads {FORMAT!r}")
    extra = {k: v for k, v in info.items() if k not in ("format", "num_clusters", "score_name", "thumbnail_size")}
    try:
        return Exemplars(
            images=arrays["images"],
            cluster=arrays["cluster"],
            score=arrays["score"],
            paths=arrays["paths"].tolist(),
            num_clusters=int(info["num_clusters"]),
            score_name=str(info.get("score_name", "score")),
            info=extra,
        )
    except (KeyError, TypeError) as exc:
        raise ExemplarsError(f"{path}: incomplete exemplars sidecar ({exc})") from None
    except ExemplarsError as exc:
        raise ExemplarsError(f"{path}: {exc}") from None


def sidecar_path(model_path: str | os.PathLike, metadata) -> Path | None:
    """Where the model's metadata says its exemplars are (None when it names none)."""
    if not getattr(metadata, "exemplars", None):
        return None
    return Path(model_path).parent / metadata.exemplars


def load_model_exemplars(model_path: str | os.PathLike, metadata) -> tuple[Exemplars | None, str]:
    """The model's exemplars, or None with a sentence saying why there are none (for a UI note)."""
    path = sidecar_path(model_path, metadata)
    if path is None:
        return None, (
            "This model names no exemplars sidecar, so no typical images can be shown. "
            "Create one with: calibclust exemplars FOLDER --model MODEL"
        )
    try:
        ex = read_exemplars(path)
    except ExemplarsError as exc:
        return None, f"The model's exemplars could not be loaded: {exc}"
    if ex.num_clusters != metadata.num_clusters:
        return None, (
            f"{path.name} holds exemplars for {ex.num_clusters} clusters but the model has "
            f"{metadata.num_clusters}; ignoring it"
        )
    return ex, ""


# --- choosing and building ---------------------------------------------------------------------------
def thumbnail_size_for(input_size: Sequence[int], max_side: int = MAX_THUMBNAIL_SIDE) -> tuple[int, int]:
    """The model's input size, shrunk (aspect kept) so that the longer side is ≤ ``max_side``."""
    h, w = int(input_size[0]), int(input_size[1])
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def select_exemplars(
    cluster: np.ndarray,
    score: np.ndarray,
    num_clusters: int,
    per_cluster: int = DEFAULT_PER_CLUSTER,
    eligible: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Indices of the ``per_cluster`` highest-scoring eligible rows of each cluster (best first).

    Rows with cluster < 0 (unreadable images), a NaN score, or ``eligible`` False are never chosen.
    Ties are broken by row order, so the choice is deterministic.
    """
    cluster = np.asarray(cluster, np.int64)
    score = np.asarray(score, np.float64)
    ok = (cluster >= 0) & (cluster < num_clusters) & ~np.isnan(score)
    if eligible is not None:
        ok &= np.asarray(eligible, bool)
    chosen = []
    for c in range(num_clusters):
        idx = np.flatnonzero(ok & (cluster == c))
        idx = idx[np.argsort(-score[idx], kind="stable")][:per_cluster]
        chosen.append(idx)
    return chosen


class TopPerCluster:
    """Streaming version of :func:`select_exemplars` for folders too large to hold in memory:
    feed batches with :meth:`add`; keeps at most ``per_cluster`` (score, path) per cluster."""

    def __init__(self, num_clusters: int, per_cluster: int = DEFAULT_PER_CLUSTER):
        self.num_clusters, self.per_cluster = int(num_clusters), int(per_cluster)
        self._heaps: list[list[tuple[float, int, str]]] = [[] for _ in range(self.num_clusters)]
        self._seen = 0  # a running counter: earlier rows win ties, as in select_exemplars

    def add(self, paths: Sequence[str], cluster: Sequence[int], score: Sequence[float], eligible=None) -> None:
        eligible = [True] * len(paths) if eligible is None else eligible
        for path, c, s, ok in zip(paths, cluster, score, eligible):
            order = self._seen
            self._seen += 1
            c, s = int(c), float(s)
            if not ok or not 0 <= c < self.num_clusters or s != s:
                continue
            heap = self._heaps[c]
            item = (s, -order, str(path))  # min-heap: the root is the weakest kept candidate
            if len(heap) < self.per_cluster:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

    def result(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(paths, cluster, score) of the kept candidates, by cluster, best first."""
        paths, cluster, score = [], [], []
        for c, heap in enumerate(self._heaps):
            for s, _, p in sorted(heap, reverse=True):
                paths.append(p)
                cluster.append(c)
                score.append(s)
        return paths, np.asarray(cluster, np.int64), np.asarray(score, np.float64)


def build_exemplars(
    paths: Sequence[str | os.PathLike],
    cluster: np.ndarray,
    score: np.ndarray,
    num_clusters: int,
    thumbnail_size: tuple[int, int],
    per_cluster: int = DEFAULT_PER_CLUSTER,
    eligible: np.ndarray | None = None,
    score_name: str = "confidence",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    display_paths: Sequence[str] | None = None,
    info: dict | None = None,
    resize: str = "squash",
) -> tuple[Exemplars, list[ImageDecodeError]]:
    """Pick each cluster's ``per_cluster`` most typical images by the caller's ``score`` and
    decode them as thumbnails with THE decoder. A chosen file that cannot be read is replaced by
    the next candidate of its cluster; the errors are returned. ``display_paths`` (default:
    ``paths``) is what the sidecar records as each thumbnail's source; ``resize`` is the model's
    policy, so a thumbnail shows what the model saw."""
    paths = [os.fspath(p) for p in paths]
    cluster = np.asarray(cluster, np.int64)
    score = np.asarray(score, np.float64)
    if not (len(paths) == len(cluster) == len(score)):
        raise InputError(f"lengths differ: paths {len(paths)}, cluster {len(cluster)}, score {len(score)}")
    shown = list(display_paths) if display_paths is not None else paths
    ranked = select_exemplars(cluster, score, num_clusters, per_cluster=len(paths), eligible=eligible)
    images, out_cluster, out_score, out_paths, errors = [], [], [], [], []
    for c, candidates in enumerate(ranked):
        kept = 0
        for i in candidates:
            if kept == per_cluster:
                break
            try:
                images.append(decode_image(paths[i], size=tuple(thumbnail_size), max_pixels=max_pixels, resize=resize))
            except ImageDecodeError as err:
                errors.append(err)
                continue
            out_cluster.append(c)
            out_score.append(score[i])
            out_paths.append(shown[i])
            kept += 1
    h, w = thumbnail_size
    stack = np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8)
    ex = Exemplars(stack, np.asarray(out_cluster, np.int64), np.asarray(out_score), out_paths,
                   num_clusters, score_name, dict(info or {}))
    return ex, errors


# --- new model files ---------------------------------------------------------------------------------
_SAFE_STEM = re.compile(r"[^A-Za-z0-9._-]+")


def new_model_path(original: str | os.PathLike, suffix: str, directory: str | os.PathLike | None = None) -> Path:
    """``dir/<stem>-<suffix>.onnx``, numbered (``-2``, ``-3``, …) until the name is free."""
    original = Path(original)
    directory = Path(directory) if directory is not None else original.parent
    base = f"{original.stem}-{_SAFE_STEM.sub('_', suffix)}"
    candidate = directory / f"{base}{original.suffix or '.onnx'}"
    k = 2
    while candidate.exists():
        candidate = directory / f"{base}-{k}{original.suffix or '.onnx'}"
        k += 1
    return candidate


def save_model_copy(src: str | os.PathLike, dst: str | os.PathLike, metadata) -> Path:
    """Write a copy of the ONNX model ``src`` to ``dst`` with ``metadata`` in its metadata_props.

    The original is never modified and an existing ``dst`` is never replaced (the file is created
    exclusively). Weights are unchanged, so the metadata's weights digest stays valid. When
    ``metadata.exemplars`` names a sidecar next to ``src`` and ``dst`` is in another folder, the
    sidecar is copied beside ``dst`` too (the name is relative to the model file).
    """
    from calibclust.errors import require

    onnx = require("onnx", "demo", "writing model metadata")
    from calibclust.contract import read_model_metadata, write_model_metadata

    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".onnx":
        raise InputError(f"{dst}: the new model file must end in .onnx")
    if dst.exists() or (src.exists() and dst.resolve() == src.resolve()):
        raise InputError(f"{dst} already exists; choose a new file name (the original is never overwritten)")
    model = onnx.load(str(src))  # loads external data too, so the copy is self-contained
    write_model_metadata(model, metadata)
    dst.parent.mkdir(parents=True, exist_ok=True)
    copy_sidecar = None
    if metadata.exemplars:
        side_src, side_dst = src.parent / metadata.exemplars, dst.parent / metadata.exemplars
        if side_src.is_file() and side_src.resolve() != side_dst.resolve():
            if side_dst.exists():
                raise InputError(f"{side_dst} already exists; save the model in another folder")
            copy_sidecar = (side_src, side_dst)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    done = False
    try:
        if model.ByteSize() > 1_900_000_000:  # protobuf's 2 GB limit: weights go to a data file
            onnx.save(model, str(tmp), save_as_external_data=True, location=dst.name + ".data")
        else:
            onnx.save(model, str(tmp))
        read_model_metadata(tmp)  # the copy must pass the same contract check serving applies
        if copy_sidecar:
            shutil.copyfile(*copy_sidecar)
        _link_exclusive(tmp, dst)
        done = True
    finally:
        tmp.unlink(missing_ok=True)
        if copy_sidecar and not done:
            copy_sidecar[1].unlink(missing_ok=True)
    return dst


def _link_exclusive(tmp: Path, dst: Path) -> None:
    """Move ``tmp`` to ``dst`` only if ``dst`` does not exist (no overwrite, even in a race)."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise InputError(f"{dst} already exists; choose a new file name") from None
    except OSError:  # a filesystem without hard links: exclusive create, then copy
        with open(dst, "xb") as out, open(tmp, "rb") as inp:
            shutil.copyfileobj(inp, out)


def attach_exemplars(
    model_path: str | os.PathLike,
    exemplars: Exemplars,
    out_model: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Write ``exemplars`` as a sidecar and a NEW model file that points to it.

    ``out_model`` defaults to ``<stem>-exemplars.onnx`` beside the original (numbered when taken);
    the sidecar is ``<new stem>.exemplars.npz`` beside the new model. Returns (model, sidecar).
    """
    from calibclust.contract import read_model_metadata

    model_path = Path(model_path)
    metadata = read_model_metadata(model_path)
    if exemplars.num_clusters != metadata.num_clusters:
        raise InputError(f"exemplars for {exemplars.num_clusters} clusters, model has {metadata.num_clusters}")
    out = Path(out_model) if out_model is not None else new_model_path(model_path, "exemplars")
    if out.exists():
        raise InputError(f"{out} already exists; choose a new file name (the original is never overwritten)")
    sidecar = out.with_name(out.stem + SIDECAR_SUFFIX)
    if sidecar.exists():
        raise InputError(f"{sidecar} already exists; choose another --out")
    write_exemplars(sidecar, exemplars)
    try:
        save_model_copy(model_path, out, metadata.replace(exemplars=sidecar.name))
    except BaseException:
        sidecar.unlink(missing_ok=True)
        raise
    return out, sidecar


def exemplar_captions(exemplars: Exemplars, c: int) -> Iterable[str]:
    _, scores, paths = exemplars.for_cluster(c)
    for s, p in zip(scores, paths):
        yield f"{s:.3f} · {Path(p).name}"  # the score first: gallery captions are cut short
