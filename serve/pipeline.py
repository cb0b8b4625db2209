"""Label a folder: streaming discovery → parallel decode + resize → batched inference → journal →
final table, summary, report (and optionally a sorted copy of the folder). Torch-free.

Throughput: the main thread runs the model while a pool of workers decodes the next batches
(``prefetch`` batches in flight), so decoding overlaps inference. Workers are threads by default:
Pillow releases the GIL while it decodes and resizes and onnxruntime releases it while it runs, and
on the 2-core machine this was built on threads beat processes in every ``calibclust bench label``
run (32×32 JPEGs: 0.38 vs 0.40 CPU-seconds per 1,000 images; 224×224: 0.60 vs 0.86), with no start-up
or transfer cost. ``worker_type="process"`` remains for many-core machines, where the part of a
decode that holds the GIL (file open, header parsing) could cap threads; that was not measurable here.

Memory: nothing proportional to the folder is held except the per-image confidence/OOD scores that
the coverage and target-accuracy policies need (three floats per image); paths and probabilities
stream through the journal on disk (:mod:`calibclust.serve.resume`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from calibclust import __version__
from calibclust.errors import InputError
from calibclust.io.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, iter_image_files
from calibclust.io.predictions import FORMATS, PredictionsWriter
from calibclust.serve.labeler import Labeler, topk_columns
from calibclust.serve.policy import (
    Policy,
    accuracy_coverage_curve,
    coverage_threshold,
    decide,
    fit_thresholds,
    in_distribution,
    ood_threshold_for,
    target_accuracy_threshold,
)
from calibclust.serve.resume import Journal, PartBuffer, ResumeError, RunLock, file_sha256
from calibclust.errors import EXIT_OK, EXIT_PARTIAL
from calibclust.io.files import atomic_write_text, json_default

TABLE_STEM = "predictions"
PREFETCH_BYTES = 1 << 30  # decoded batches waiting for inference, at most (but always 2 batches)
EMBEDDINGS_FILE = "embeddings.npy"
OUTPUT_FILES = ("summary.json", "report.html", EMBEDDINGS_FILE) + tuple(f"{TABLE_STEM}{s}" for s in (".csv", ".parquet", ".jsonl"))


@dataclass
class LabelOptions:
    """Everything ``calibclust label`` can be told. Fields marked (table) change the output table and
    must match on ``--resume``."""

    folder: str
    model: str
    out_dir: str
    backend: str = "auto"  # (table) resolved name recorded
    policy: Policy = field(default_factory=Policy)  # (table)
    table_format: str = "csv"  # (table) csv | parquet | jsonl
    top_k: int = 0  # (table) add top<k>_cluster / top<k>_prob columns
    write_probs: bool = False  # (table) add prob_<c> for every cluster
    write_embeddings: bool = False  # (table) also write embeddings.npy, row i = the table's row i
    csv_escape: bool = True  # CSV: ' before cells a spreadsheet would run as formulas (read back without)
    batch_size: int | None = None  # (table: batch boundaries) None = backend's default
    max_pixels: int = DEFAULT_MAX_PIXELS  # (table) decompression-bomb guard
    max_file_mb: float = DEFAULT_MAX_BYTES / 2**20  # (table) files larger than this are not read
    workers: int | None = None  # decode workers; None = one per CPU core; 0 = decode inline
    worker_type: str = "thread"  # thread | process (see the module docstring)
    threads: int | None = None  # inference threads (onnxruntime intra-op); None = its default
    spin: bool = False  # let onnxruntime's threads spin-wait (faster only when decoding is elsewhere)
    resume: bool = False
    overwrite: bool = False
    sort_into: str | None = None  # (table) build DIR/<cluster>/, DIR/_rejected/, ...
    copy: bool = False  # (table) copy instead of symlink
    report: bool = True
    thumbnails: int = 8  # report: per gallery (a cluster's most / least confident accepted, OOD, rejected)
    progress: bool = True
    checkpoint_every: int = 4096  # commit results to the journal every N images (or 5 s); not (table)
    engine: str = "local"  # local | ray
    ray_actors: int | None = None

    def table_path(self) -> Path:
        suffix = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl"}[self.table_format]
        return Path(self.out_dir) / f"{TABLE_STEM}{suffix}"

    def validate(self) -> None:
        if self.table_format not in set(FORMATS.values()):
            raise InputError(f"--format must be csv, parquet or jsonl, got {self.table_format!r}")
        if self.worker_type not in ("process", "thread"):
            raise InputError(f"--worker-type must be process or thread, got {self.worker_type!r}")
        if self.engine not in ("local", "ray"):
            raise InputError(f"--engine must be local or ray, got {self.engine!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError("--batch-size must be >= 1")
        if not (math.isfinite(self.max_file_mb) and self.max_file_mb > 0):
            raise InputError(f"--max-file-mb must be a number > 0, got {self.max_file_mb}")
        if self.checkpoint_every < 1:
            raise InputError("--checkpoint-every-images must be >= 1")
        if self.top_k < 0:
            raise InputError("--top-k must be >= 0")
        if self.copy and not self.sort_into:
            raise InputError("--copy only makes sense with --sort-into DIR")
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite exclude each other")
        if not Path(self.folder).is_dir():
            raise InputError(f"not a folder: {self.folder}")
        if not Path(self.model).is_file():
            raise InputError(f"model file not found: {self.model}")
        if self.sort_into:
            from calibclust.serve.sort import check_destination

            check_destination(self.sort_into, self.folder)  # before hours of inference, not after


@dataclass
class LabelResult:
    exit_code: int
    table: Path
    summary: dict[str, Any]


# --- decoding (runs in worker processes or threads) ------------------------------------------------
def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the main process handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker must not inherit the CLI's handler


def decode_batch(
    paths: list[str], size: tuple[int, int], max_pixels: int, max_bytes: int = DEFAULT_MAX_BYTES, resize: str = "squash"
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Decode a batch with THE decoder: (indices of readable files, their uint8 stack, errors)."""
    ok, arrays, errors = [], [], []
    for i, path in enumerate(paths):
        try:
            arrays.append(decode_image(path, size=size, max_pixels=max_pixels, max_bytes=max_bytes, resize=resize))
            ok.append(i)
        except ImageDecodeError as err:
            errors.append((i, err.reason))
        except Exception as exc:  # a decoder bug must cost one row, never the run
            errors.append((i, f"decoder failure: {type(exc).__name__}: {exc}"))
    batch = np.stack(arrays) if arrays else np.zeros((0, size[0], size[1], 3), np.uint8)
    return np.asarray(ok, np.int64), batch, errors


def _noop() -> None:
    return None


def prefetch_batches(workers: int, batch_size: int, input_size: tuple[int, int]) -> int:
    """Decoded batches in flight: two per worker keeps the workers busy, but on a many-core machine
    with large inputs that is gigabytes of pixels, so the count is also bounded by PREFETCH_BYTES
    (never below 2: one being predicted, one being decoded)."""
    batch_bytes = max(1, batch_size * input_size[0] * input_size[1] * 3)
    return max(2, min(2 * workers, PREFETCH_BYTES // batch_bytes))


def _worker_count(opts: "LabelOptions") -> int:
    return (os.cpu_count() or 1) if opts.workers is None else max(0, int(opts.workers))


def make_executor(workers: int, worker_type: str, fork: bool = False) -> Executor | None:
    """Decode pool. ``fork=True`` (Linux only) forks the workers *now*: call it before any inference
    session exists, because forking a process that runs onnxruntime's thread pool can deadlock.
    Forked workers start in milliseconds and never re-import the caller's ``__main__`` (spawned ones
    do, which breaks scripts without a ``__main__`` guard and costs ~1 s per worker)."""
    if workers <= 0:
        return None
    if worker_type == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="calibclust-decode")
    import multiprocessing

    # Fork only a single-threaded process: a lock held by another thread at fork time stays held
    # forever in the child. Otherwise (an app calling us from a thread pool, say) spawn.
    method = "fork" if fork and sys.platform == "linux" and threading.active_count() == 1 else "spawn"
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_ignore_sigint)
    if method == "fork":
        executor.submit(_noop).result()  # a fork pool starts all its workers on the first task
    return executor


class _Inline:
    """Executor stand-in for workers=0 (decode in the main thread, no overlap)."""

    class _Done:
        def __init__(self, value):
            self._value = value

        def result(self):
            return self._value

    def submit(self, fn, *args):
        return self._Done(fn(*args))

    def shutdown(self, wait=True, cancel_futures=False):
        pass


# --- discovery -------------------------------------------------------------------------------------
class SkipLog:
    """Paths discovery passed over (loops, FIFOs, devices, unlistable folders): each printed once to
    stderr as it is met, the first 100 kept for summary.json, all counted."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.count, self.first = quiet, 0, []

    def __call__(self, path: str, reason: str) -> None:
        self.count += 1
        if len(self.first) < 100:
            self.first.append({"path": path, "reason": reason})
        if not self.quiet:
            print(f"calibclust label: skipped {path}: {reason}", file=sys.stderr)


def iter_relative_paths(folder: str | os.PathLike, on_skip=None) -> Iterator[str]:
    """Discovery order of :func:`~calibclust.io.images.iter_image_files`, as POSIX paths relative to
    ``folder`` (string slicing rather than ``Path.relative_to``: this runs once per file on the
    inference thread); passed-over paths go to ``on_skip`` (default: a :class:`SkipLog` on stderr)."""
    root = str(Path(folder).absolute()).rstrip(os.sep)  # "." would otherwise yield no "./" prefix
    if not os.path.isdir(root):
        raise InputError(f"not a folder: {folder}")
    prefix = len(root) + 1
    for path in iter_image_files(root, on_skip=on_skip or SkipLog()):
        rel = path[prefix:]
        yield rel if os.sep == "/" else rel.replace(os.sep, "/")


def _count_images(folder: str, box: dict) -> None:
    """Background count for the progress bar's total/ETA: the same walk as discovery, unsorted and
    silent (discovery itself reports what it passes over)."""
    try:
        box["total"] = sum(1 for _ in iter_image_files(folder, on_skip=SkipLog(quiet=True), ordered=False))
    except Exception:  # the count only feeds the progress bar; discovery itself reports problems
        pass


def build_rows(
    rel_paths: list[str], ok: np.ndarray, outputs: dict[str, np.ndarray], errors: list[tuple[int, str]],
    num_clusters: int, keep_probs: bool, embedding_dim: int = 0,
) -> dict[str, np.ndarray]:
    """Raw journal columns for one batch, rows in discovery order (``embedding`` when
    ``embedding_dim``; NaN rows for files that could not be read)."""
    n = len(rel_paths)
    cluster = np.full(n, -1, np.int64)
    confidence = np.full(n, np.nan, np.float32)
    ood = np.full(n, np.nan, np.float32)
    error = [""] * n
    if len(ok):
        cluster[ok] = outputs["label"]
        confidence[ok] = outputs["confidence"]
        ood[ok] = outputs["ood_score"]
    for i, reason in errors:
        error[i] = reason
    rows = {
        "path": np.asarray(rel_paths, dtype=str),
        "cluster": cluster,
        "confidence": confidence,
        "ood_score": ood,
        "error": np.asarray(error, dtype=str),
    }
    if keep_probs:
        probs = np.full((n, num_clusters), np.nan, np.float32)
        if len(ok):
            probs[ok] = outputs["probs"]
        rows["probs"] = probs
    if embedding_dim:
        embedding = np.full((n, embedding_dim), np.nan, np.float32)
        if len(ok):
            embedding[ok] = outputs["embedding"]
        rows["embedding"] = embedding
    return rows


def wanted_outputs(opts: "LabelOptions") -> tuple[str, ...]:
    """The contract outputs a run needs: probabilities only for top-k / prob columns, the
    embedding only for --embeddings."""
    wanted = ("confidence", "label", "ood_score")
    if opts.top_k or opts.write_probs:
        wanted = ("probs",) + wanted
    return wanted + (("embedding",) if opts.write_embeddings else ())


# --- the run ----------------------------------------------------------------------------------------
def fingerprint(opts: LabelOptions, labeler: Labeler, batch_size: int) -> dict[str, Any]:
    fp = {
        "calibclust_version": __version__,
        "model_sha256": file_sha256(opts.model),
        "folder": str(Path(opts.folder).resolve()),
        "backend": labeler.backend_name,
        "policy": opts.policy.to_dict(),
        "format": opts.table_format,
        "top_k": opts.top_k,
        "write_probs": opts.write_probs,
        "batch_size": batch_size,
        "max_pixels": opts.max_pixels,
        "sort_into": str(Path(opts.sort_into).resolve()) if opts.sort_into else None,
        "copy": opts.copy,
        "engine": opts.engine,
    }
    if opts.max_file_mb != DEFAULT_MAX_BYTES / 2**20:  # only when set: older journals still resume
        fp["max_file_mb"] = opts.max_file_mb
    if opts.write_embeddings:  # likewise
        fp["embeddings"] = True
    return fp


def _existing_outputs(out_dir: Path) -> list[str]:
    return [name for name in OUTPUT_FILES if (out_dir / name).exists()]


def label_folder(opts: LabelOptions) -> LabelResult:
    """Run ``calibclust label``: see the module docstring. Returns exit code 0 or 3 (some files failed)."""
    opts.validate()
    out_dir = Path(opts.out_dir)
    journal = Journal(out_dir)
    if journal.exists() and not (opts.resume or opts.overwrite):
        raise ResumeError(
            f"{out_dir} holds an unfinished run. Pass --resume to finish it, or --overwrite to start over."
        )
    with RunLock(out_dir):
        executor = None
        if opts.engine == "local":
            executor = make_executor(_worker_count(opts), opts.worker_type, fork=True)
        try:
            return _label_folder(opts, journal, executor)
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)


def _label_folder(opts: LabelOptions, journal: Journal, executor: Executor | None) -> LabelResult:
    out_dir = Path(opts.out_dir)
    # No spin-waiting when decode workers share the cores with inference (see OrtOptions).
    spin = opts.engine != "local" or _worker_count(opts) == 0 or opts.spin
    labeler = Labeler(opts.model, opts.backend, threads=opts.threads, max_pixels=opts.max_pixels,
                      max_batch_size=opts.batch_size, allow_spinning=spin)
    batch_size = opts.batch_size or labeler.batch_size
    fp = fingerprint(opts, labeler, batch_size)
    if journal.exists() and opts.resume:
        journal.check_fingerprint(fp)
    else:
        done = _existing_outputs(out_dir)
        if done and not opts.overwrite:
            if opts.resume and (out_dir / "summary.json").is_file():
                summary = json.loads((out_dir / "summary.json").read_text())
                if summary.get("fingerprint") == fp:
                    print(f"calibclust label: {out_dir} already holds this finished run", file=sys.stderr)
                    return LabelResult(int(summary.get("exit_code", 0)), opts.table_path(), summary)
            raise ResumeError(
                f"{out_dir} already holds results ({', '.join(done)}). Use --overwrite to replace them "
                f"or choose another --out."
            )
        journal.create(fp)
    _remove_stale_temporaries(out_dir)
    thumbnails = _thumbnail_cache(opts, labeler)
    skips = SkipLog() if opts.engine == "local" else None  # the Ray engine reports on stderr only
    t0 = time.monotonic()
    if opts.engine == "ray":
        from calibclust.serve.ray_engine import run_ray

        if opts.resume:
            # Ray retries failed tasks itself; a killed driver restarts the job (parts are not kept).
            journal.create(fp)
        parts = run_ray(opts, labeler, batch_size)
        processed = None
    else:
        processed = _run_local(opts, labeler, journal, batch_size, executor, thumbnails, skips)
        parts = journal.iter_parts
    seconds = time.monotonic() - t0
    result = finalise(opts, labeler, parts, fp, seconds, processed, thumbnails, skips)
    journal.remove()
    return result


def _thumbnail_cache(opts: LabelOptions, labeler: Labeler):
    """The report's thumbnails, captured while labelling (None: no report, or the Ray engine, whose
    decoded images never reach this process)."""
    if not (opts.report and opts.thumbnails) or opts.engine != "local":
        return None
    from calibclust.serve.report import ThumbnailCache

    meta = labeler.metadata
    ood = ood_threshold_for(opts.policy, meta.ood.threshold)
    value = opts.policy.value
    if opts.policy.kind == "min_confidence":
        return ThumbnailCache(opts.thumbnails, ood, meta.confidence_threshold if value is None else float(value))
    # Fitted after the pass on all confidences: the cache follows the policy's own estimate.
    fitted = coverage_threshold if opts.policy.kind == "coverage" else target_accuracy_threshold
    return ThumbnailCache(opts.thumbnails, ood, estimate=lambda sample: fitted(sample, float(value)))


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files of outputs whose writer was killed before its atomic rename."""
    for name in OUTPUT_FILES:
        for stale in out_dir.glob(f".{name}.*"):
            if ".partial-" in stale.name or ".tmp-" in stale.name:
                stale.unlink(missing_ok=True)


def _verify_prefix(stream: Iterator[str], journal: Journal) -> None:
    """On resume, the folder's first ``done`` files must be the ones already predicted."""
    for i, old in enumerate(journal.iter_paths()):
        new = next(stream, None)
        if new != old:
            raise ResumeError(
                f"cannot resume: the folder changed since the interrupted run (file #{i} was {old!r}, "
                f"now {new!r}). Start over with --overwrite."
            )


def _run_local(
    opts: LabelOptions, labeler: Labeler, journal: Journal, batch_size: int, executor: Executor | None = None,
    thumbnails=None, skips: SkipLog | None = None,
) -> int:
    """Predict every file not yet in the journal; returns how many this call processed.
    ``executor``: the decode pool (None: a spawned one is made and shut down here);
    ``thumbnails``: a :class:`~calibclust.serve.report.ThumbnailCache` offered each decoded batch;
    ``skips``: where discovery reports the paths it passes over."""
    done = journal.rows_done()
    stream = iter_relative_paths(opts.folder, skips)
    _verify_prefix(stream, journal)
    workers = (os.cpu_count() or 1) if opts.workers is None else opts.workers
    prefetch = prefetch_batches(workers, batch_size, labeler.input_size)
    keep_probs = bool(opts.top_k or opts.write_probs)
    wanted = wanted_outputs(opts)
    embedding_dim = labeler.embedding_dim() if opts.write_embeddings else 0
    size = labeler.input_size
    # A partial of a module-level function: process workers must be able to pickle it.
    decode = functools.partial(decode_batch, size=size, max_pixels=opts.max_pixels,
                               max_bytes=int(opts.max_file_mb * 2**20), resize=labeler.metadata.resize)
    root = str(Path(opts.folder).absolute()).rstrip(os.sep) + os.sep
    buffer = PartBuffer(journal, done, max_rows=max(1, opts.checkpoint_every))
    count = {"total": None}
    counter = threading.Thread(target=_count_images, args=(opts.folder, count), daemon=True)
    counter.start()
    from tqdm import tqdm

    bar = tqdm(total=None, initial=done, unit="img", unit_scale=True, dynamic_ncols=True,
               desc="label", disable=not opts.progress, smoothing=0.1)
    own_executor = executor is None
    if own_executor:
        executor = make_executor(workers, opts.worker_type) or _Inline()
    pending: deque = deque()
    processed = 0

    def handle(item) -> None:
        nonlocal processed
        rel, future = item
        ok, batch, errors = future.result()
        outputs = labeler.predict(batch, wanted) if len(ok) else {}
        if thumbnails is not None and len(ok):
            thumbnails.offer([rel[i] for i in ok], batch, outputs)
        buffer.add(build_rows(rel, ok, outputs, errors, labeler.num_clusters, keep_probs, embedding_dim))
        processed += len(rel)
        if count["total"] is not None and bar.total is None:
            bar.total = count["total"]
            bar.refresh()
        bar.update(len(rel))

    try:
        chunk: list[str] = []
        for rel in stream:
            chunk.append(rel)
            if len(chunk) == batch_size:
                pending.append((chunk, executor.submit(decode, [root + r for r in chunk])))
                chunk = []
                while len(pending) > prefetch:
                    handle(pending.popleft())
        if chunk:
            pending.append((chunk, executor.submit(decode, [root + r for r in chunk])))
        while pending:
            handle(pending.popleft())
        buffer.flush()
    except KeyboardInterrupt:
        buffer.flush()  # batches already predicted are kept: --resume continues after them
        executor.shutdown(wait=False, cancel_futures=True)
        bar.close()
        print(f"\ninterrupted after {journal.rows_done()} files; finish with the same command plus --resume",
              file=sys.stderr)
        raise
    finally:
        bar.close()
    if own_executor:
        executor.shutdown(wait=True)
    return processed


# --- finalisation ----------------------------------------------------------------------------------
def finalise(
    opts: LabelOptions, labeler: Labeler, parts: Callable[..., Iterator[dict[str, np.ndarray]]],
    fp: dict[str, Any], seconds: float, processed: int | None, thumbnails=None, skips: SkipLog | None = None,
) -> LabelResult:
    """Two streaming passes over the parts (``parts(columns)`` yields them in discovery order each time
    it is called): fit the policy on all scores, then write the outputs."""
    parts_again = parts
    conf, ood, clusters = [], [], []
    for part in parts_again(("confidence", "ood_score", "cluster")):
        conf.append(part["confidence"])
        ood.append(part["ood_score"])
        clusters.append(part["cluster"])
    confidence = np.concatenate(conf) if conf else np.zeros(0, np.float32)
    ood_score = np.concatenate(ood) if ood else np.zeros(0, np.float32)
    cluster = np.concatenate(clusters) if clusters else np.zeros(0, np.int64)
    n = len(confidence)
    if n == 0:
        raise InputError(f"no images found under {opts.folder} (extensions: png, jpg, jpeg, bmp, gif, tif, webp, ppm)")
    readable = cluster >= 0
    meta = labeler.metadata
    thresholds = fit_thresholds(confidence, ood_score, readable, opts.policy, meta.confidence_threshold,
                                meta.ood.threshold, meta.calibrated)
    for message in thresholds.warnings:
        warnings.warn(message, stacklevel=2)
        print(f"calibclust label: warning: {message}", file=sys.stderr)
    names = labeler.cluster_names
    columns = ["path", "decision", "cluster", "cluster_name", "confidence", "ood_score", "error"]
    if opts.top_k:
        k = min(opts.top_k, meta.num_clusters)
        columns += [f"top{j}_{s}" for j in range(1, k + 1) for s in ("cluster", "prob")]
    if opts.write_probs:
        columns += [f"prob_{c}" for c in range(meta.num_clusters)]
    from calibclust.serve.report import ReportCollector

    collector = ReportCollector(names, opts.thumbnails)
    sorter = None
    if opts.sort_into:
        from calibclust.serve.sort import FolderSorter

        sorter = FolderSorter(opts.sort_into, opts.folder, names, copy=opts.copy)
        for name, bucket in sorter.renamed.items():
            print(f"calibclust label: --sort-into: cluster {name!r} goes to {bucket}/ (its plain folder name "
                  f"is taken by another cluster)", file=sys.stderr)
    table = opts.table_path()
    errors_sample = []
    embeddings = None
    if opts.write_embeddings:
        # Memory-mapped and filled part by part: row i is the table's row i (NaN where unreadable).
        embeddings_tmp = Path(opts.out_dir) / f".{EMBEDDINGS_FILE}.tmp-{os.getpid()}"
        embeddings = np.lib.format.open_memmap(embeddings_tmp, mode="w+", dtype=np.float32,
                                               shape=(n, labeler.embedding_dim()))
    try:
        row = 0
        with PredictionsWriter(table, columns, escape_formulas=opts.csv_escape) as writer:
            for part in parts_again():
                if embeddings is not None:
                    embeddings[row : row + len(part["cluster"])] = part["embedding"]
                row += len(part["cluster"])
                ok = part["cluster"] >= 0
                decision = decide(part["confidence"], part["ood_score"], ok, thresholds)
                rows = {
                    "path": part["path"].tolist(),
                    "decision": decision.tolist(),
                    "cluster": part["cluster"],
                    "cluster_name": [names[c] if c >= 0 else "" for c in part["cluster"].tolist()],
                    "confidence": part["confidence"],
                    "ood_score": part["ood_score"],
                    "error": part["error"].tolist(),
                }
                if opts.top_k:
                    rows.update(topk_columns(part["probs"].astype(np.float64), opts.top_k))
                if opts.write_probs:
                    for c in range(meta.num_clusters):
                        rows[f"prob_{c}"] = part["probs"][:, c]
                writer.write_rows(rows)
                collector.add(part, decision)
                if sorter is not None:
                    sorter.add(rows["path"], decision, part["cluster"])
                if len(errors_sample) < 100:
                    errors_sample += [{"path": p, "error": e} for p, e in zip(rows["path"], rows["error"]) if e][:100]
    except BaseException:
        if embeddings is not None:  # no half-written file left behind
            embeddings = None  # its only reference: the map closes
            embeddings_tmp.unlink(missing_ok=True)
        raise
    if embeddings is not None:
        embeddings.flush()
        shape = list(embeddings.shape)
        embeddings = None  # the map closes before the rename (Windows refuses to rename an open map)
        os.replace(embeddings_tmp, Path(opts.out_dir) / EMBEDDINGS_FILE)
    counts = dict(collector.decision_counts)
    exit_code = EXIT_PARTIAL if counts["error"] else EXIT_OK
    summary = {
        "calibclust_version": __version__,
        "folder": str(Path(opts.folder).resolve()),
        "model": {
            "path": str(Path(opts.model).resolve()),
            "method": meta.method,
            "num_clusters": meta.num_clusters,
            "calibrated": meta.calibrated,
            "input_size": list(meta.input_size),
            "ood_score": meta.ood.score,
            "backend": labeler.backend_name,
            # Written by training (calibclust.shortcut); shown in the report, None when silent or absent.
            "shortcut_warning": (meta.train_stats.get("shortcut_check") or {}).get("message"),
            # Written by training under --clusters auto (calibclust.cluster.choose_k); plotted in the report.
            "clusters_choice": meta.train_stats.get("clusters_choice"),
        },
        "table": str(table.resolve()),
        "files": n,
        "counts": counts,
        "clusters": collector.cluster_summary(),
        "thresholds": thresholds.to_dict(),
        "errors_first_100": errors_sample[:100],
        "skipped": None if skips is None else {"count": skips.count, "first_100": skips.first},
        "engine": opts.engine,
        "seconds": round(seconds, 3),
        "files_this_call": processed,
        "images_per_second": round((processed if processed is not None else n) / seconds, 1) if seconds > 0 else None,
        "sort_into": sorter.summary() if sorter is not None else None,
        "embeddings": {"file": str((Path(opts.out_dir) / EMBEDDINGS_FILE).resolve()), "shape": shape}
                      if opts.write_embeddings else None,
        "exit_code": exit_code,
        "fingerprint": fp,
    }
    if opts.report:
        from calibclust.serve.report import write_report

        # The curve's coverage is a share of in-distribution images, as the run's operating point's is.
        in_dist = in_distribution(ood_score, readable, thresholds.ood_threshold) & ~np.isnan(confidence)
        curve = accuracy_coverage_curve(confidence[in_dist])
        decoded_again = write_report(Path(opts.out_dir) / "report.html", summary, confidence, ood_score, readable,
                                     collector, curve, folder=opts.folder, input_size=meta.input_size,
                                     thumbnails=thumbnails.lookup() if thumbnails is not None else None,
                                     max_pixels=opts.max_pixels)
        summary["report"] = {"thumbnails_decoded_again": decoded_again}
    atomic_write_text(Path(opts.out_dir) / "summary.json", json.dumps(summary, indent=2, default=json_default))
    # An --overwrite in another format must not leave the previous run's table beside this one.
    for other in OUTPUT_FILES:
        if other.startswith(TABLE_STEM) and other != table.name:
            (Path(opts.out_dir) / other).unlink(missing_ok=True)
    if not opts.report:
        (Path(opts.out_dir) / "report.html").unlink(missing_ok=True)
    if not opts.write_embeddings:
        (Path(opts.out_dir) / EMBEDDINGS_FILE).unlink(missing_ok=True)
    return LabelResult(exit_code, table, summary)
