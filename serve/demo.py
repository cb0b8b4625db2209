"""``calibclust demo``: try a calibrated clustering model in the browser (Gradio). Torch-free.

Tabs:

* **Single image** – upload (or pick an example) → the predicted cluster (its name if named), the
  calibrated top-k probabilities, the OOD score against its threshold and a decision badge
  (accepted / rejected — low confidence / rejected — out of distribution). The two threshold
  sliders re-decide from the prediction kept in ``gr.State``: the model is not run again.
* **Clusters & naming** – each cluster's most typical images (the exemplars sidecar the model
  points to, :mod:`calibclust.exemplars`; a note when there is none), a name per cluster, and
  "save" → a NEW model file with the names in its metadata (the original is never modified).
* **Batch** – several images or a zip → the decisions table and a CSV download, through the same
  :class:`~calibclust.serve.labeler.Labeler` and predictions-table writer as ``calibclust label``.

Prediction is the Labeler's (THE decoder at the model's input size, then the ONNX graph), and
decisions are :func:`calibclust.serve.policy.decide` with a ``min_confidence`` policy, so an image
gets here exactly the decision ``calibclust label --confidence-threshold T --ood-threshold X`` gives it.

Bad input never shows a stack trace: unreadable or non-image uploads, files over the size limit
and images over the pixel limit come back as a message in the page. Requests go through Gradio's
queue (``--concurrency`` at a time). The server binds 127.0.0.1 unless ``--host`` says otherwise.

Module level imports only the standard library (``calibclust --help`` stays fast); numpy, gradio
and onnxruntime are imported when the app is built.
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

# Where `calibclust quickstart` writes its exported model (relative to the current folder); the
# demo opens it when no --model is given.
DEFAULT_QUICKSTART_MODEL = Path("quickstart-out") / "model" / "model.onnx"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0
# calibclust.io.images.DEFAULT_MAX_PIXELS (label's default too), restated so that this module imports
# only the standard library; tests/test_cli_names.py checks the two agree.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_CONCURRENCY = 2  # inference threads share the CPU cores; more would only queue inside ORT
MAX_BATCH_FILES = 2_000  # images per batch request (loose files plus zip members)
ZIP_EXPANSION = 4  # a zip may unpack to at most this many times the upload limit
TOP_K = 5  # probabilities shown in the gr.Label
BATCH_TOP_K = 3  # top-k columns of the batch CSV
PREVIEW_SIDE = 224  # the model's input is shown upscaled (nearest) to about this size
MAX_NAME_LENGTH = 100
DEFAULT_BATCH_PIXELS = 200_000_000  # per batch request, summed from image headers before decoding
MAX_SAVES = 20  # named model copies one server run writes, at most
MAX_SAVED_BYTES = 2 << 30  # and their total size
OVERVIEW_COLUMNS = 10  # cluster tiles per row in the exemplars overview
BATCH_COLUMNS = ["path", "decision", "cluster", "cluster_name", "confidence", "ood_score", "error"]

DESCRIPTION = """\
Start a local web app (Gradio) to try an exported calibclust model:

  Single image        upload a picture (or pick an example): predicted cluster, calibrated top-k
                      probabilities, OOD score vs. its threshold, and the decision (accepted /
                      rejected - low confidence / rejected - out of distribution). The threshold
                      sliders change the decision without running the model again.
  Clusters & naming   the most typical images of each cluster (from the model's exemplars sidecar,
                      see 'calibclust exemplars'); type a name per cluster and save a NEW model file
                      with those names (the original file is never modified).
  Batch               several images or a .zip: a table of decisions and a CSV download, the same
                      table 'calibclust label' writes.

Without --model the demo opens the quick start's model, %s
(relative to the current folder). The server listens on 127.0.0.1 (this machine only) unless --host says otherwise; --share asks
Gradio for a temporary public link (needs internet access). Reachable from other machines, it needs a
login (--auth USER:PASSWORD or --auth-file FILE, Gradio's own auth) or an explicit --insecure-no-auth;
a batch request may hold --max-batch-pixels (read from image headers before decoding), and one server
run saves at most %d named models (%d GB).
""" % (DEFAULT_QUICKSTART_MODEL.as_posix(), MAX_SAVES, MAX_SAVED_BYTES >> 30)

EPILOG = """\
examples:
  calibclust quickstart && calibclust demo          # the quick start's model
  calibclust demo --model model.onnx                # http://127.0.0.1:7860
  calibclust demo --model model.onnx --examples photos/ --port 8080
  calibclust demo --model model.onnx --host 0.0.0.0 --auth-file login.txt --max-upload-mb 5   # on the network
  calibclust exemplars train_images/ --model model.onnx   # add the exemplars gallery, then demo the new file
"""


# =============================================================================== configuration
@dataclass
class DemoConfig:
    model: str | os.PathLike
    host: str = DEFAULT_HOST
    port: int | None = DEFAULT_PORT  # None: Gradio picks a free one from 7860 up
    share: bool = False
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    examples: str | os.PathLike | None = None  # folder of example images
    max_examples: int = 12
    save_dir: str | os.PathLike | None = None  # where named models go (default: the model's folder)
    backend: str = "auto"
    concurrency: int = DEFAULT_CONCURRENCY
    work_dir: str | os.PathLike | None = None  # temporary files (default: a fresh temp folder)
    auth: tuple[str, str] | None = None  # Gradio's login (user, password); required when exposed
    insecure_no_auth: bool = False  # exposed without a login, knowingly
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS

    @property
    def exposed(self) -> bool:
        """Reachable from other machines: a non-loopback address or a public share link."""
        if self.share:
            return True
        if self.host == "localhost":
            return False
        import ipaddress

        try:
            return not ipaddress.ip_address(self.host).is_loopback  # 127.0.0.0/8, ::1
        except ValueError:  # a host name (e.g. 127.example.org): treated as reachable
            return True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """``--model`` or the quick start's model; an InputError that says what to do otherwise."""
    from calibclust.errors import InputError

    if model is not None:
        path = Path(model)
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        return path
    if DEFAULT_QUICKSTART_MODEL.is_file():
        return DEFAULT_QUICKSTART_MODEL
    raise InputError(
        f"no --model given and no quick-start model at {DEFAULT_QUICKSTART_MODEL.as_posix()} "
        f"(looked in {Path.cwd()}).\n"
        "  Either run the quick start first, from this folder:   calibclust quickstart\n"
        "  or point the demo at an exported model:              calibclust demo --model path/to/model.onnx"
    )


# =============================================================================== the logic
class DemoError(Exception):
    """A problem to show the user as a message (never a traceback)."""


@dataclass
class Prediction:
    """One image's model outputs, kept in gr.State so thresholds can change without the model."""

    source: str  # the file name as the user knows it
    cluster: int = -1
    confidence: float = math.nan
    ood_score: float = math.nan
    probs: list[float] = field(default_factory=list)
    error: str = ""

    def to_state(self) -> dict[str, Any]:
        return {"source": self.source, "cluster": self.cluster, "confidence": self.confidence,
                "ood_score": self.ood_score, "probs": self.probs, "error": self.error}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "Prediction | None":
        return None if not state else cls(**state)


class DemoSession:
    """Everything the app does, without Gradio: one loaded model, its exemplars, the limits.

    Thread-safe for concurrent requests (onnxruntime sessions run concurrently; the rest is
    read-only after construction or per-request).
    """

    def __init__(self, config: DemoConfig):
        from calibclust.exemplars import load_model_exemplars
        from calibclust.serve.labeler import Labeler

        self.config = config
        self.model_path = Path(config.model)
        # No spin-waiting between ops: a demo idles between requests and shares the cores with
        # Gradio's web threads and concurrent requests.
        self.labeler = Labeler(self.model_path, backend=config.backend, max_pixels=config.max_pixels,
                               allow_spinning=False)
        self.metadata = self.labeler.metadata
        self.exemplars, self.exemplars_note = load_model_exemplars(self.model_path, self.metadata)
        self.save_dir = Path(config.save_dir) if config.save_dir else self.model_path.resolve().parent
        self._own_work_dir = config.work_dir is None
        self.work_dir = Path(config.work_dir or tempfile.mkdtemp(prefix="calibclust-demo-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._saves, self._saved_bytes = 0, 0  # named model copies written by this server run
        try:
            self.example_paths = self._prepare_examples()
        except BaseException:
            self.close()
            raise

    # --- model facts ------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        return self.metadata.num_clusters

    @property
    def names(self) -> list[str]:
        return list(self.metadata.cluster_names)

    def default_thresholds(self) -> tuple[float, float]:
        ood = self.metadata.ood.threshold
        return float(self.metadata.confidence_threshold), (math.inf if ood is None else float(ood))

    def ood_slider_range(self) -> tuple[float, float]:
        """Range of the OOD threshold slider: the score's natural range where it has one."""
        score = self.metadata.ood.score
        _, t = self.default_thresholds()
        if score == "msp":  # 1 − max softmax probability (CDC appendix C.5)
            return 0.0, 1.0
        if score in ("prototype", "knn"):  # 1 − cosine similarity
            return 0.0, 2.0
        if not math.isfinite(t):
            return 0.0, 1.0
        span = max(1.0, abs(t))
        return t - span, t + span

    def header_markdown(self) -> str:
        m = self.metadata
        conf, ood = self.default_thresholds()
        calibrated = "calibrated" if m.calibrated else "not calibrated"
        named = sum(1 for i, n in enumerate(m.cluster_names) if n != f"cluster_{i}")
        parts = [
            f"**{m.num_clusters} clusters**",
            f"{m.method.upper()}, probabilities from the {m.probs_head} head ({calibrated})",
            f"input {m.input_size[0]}×{m.input_size[1]}",
            f"OOD score `{m.ood.score}`, threshold {ood:.4g}",
            f"default confidence threshold {conf:.3g}",
            f"{named} of {m.num_clusters} clusters named",
            f"backend {self.labeler.backend_name}",
        ]
        ex = "no exemplars sidecar" if self.exemplars is None else f"{len(self.exemplars.cluster)} exemplar thumbnails"
        warning = "" if m.calibrated else (
            "\n\n**Note:** this model's probabilities do not come from a calibration head, so a confidence "
            "of 0.9 does not mean 9 in 10 such images are right; treat the thresholds as relative scores."
        )
        return (
            f"# calibclust demo — `{self.model_path.name}`\n"
            + " · ".join(parts) + f" · {ex}{warning}\n\n"
            "The model abstains when it is not confident (confidence below the threshold) or when the image "
            "looks unlike its training data (OOD score above the threshold). Move the sliders to see how the "
            "decision changes; the model is not re-run."
        )

    # --- limits -----------------------------------------------------------------------------
    def check_upload(self, path: str | os.PathLike) -> None:
        size = os.path.getsize(path)
        if size > self.config.max_upload_bytes:
            raise DemoError(
                f"{Path(path).name} is {size / 2**20:.1f} MB; the limit is {self.config.max_upload_mb:g} MB"
            )

    # --- single image -----------------------------------------------------------------------
    def predict_file(self, path: str | os.PathLike | None) -> tuple[Prediction, Any]:
        """Decode one upload with THE decoder and run the model. Returns the prediction and the
        decoded model input (None when unreadable); never raises for a bad file."""
        import numpy as np

        from calibclust.io.images import ImageDecodeError

        if path is None:
            raise DemoError("no file given")
        source = Path(path).name
        try:
            self.check_upload(path)
            image = self.labeler.decode(path)
        except DemoError as exc:
            return Prediction(source, error=str(exc)), None
        except ImageDecodeError as exc:
            return Prediction(source, error=exc.reason), None
        except OSError as exc:
            return Prediction(source, error=f"could not open the upload ({exc.strerror or exc})"), None
        out = self.labeler.predict(image[None], ("probs", "confidence", "label", "ood_score"))
        probs = np.asarray(out["probs"][0], np.float64)
        pred = Prediction(source, int(out["label"][0]), float(out["confidence"][0]), float(out["ood_score"][0]),
                          [float(p) for p in probs])
        return pred, image

    def thresholds(self, confidence_threshold: float | None, ood_threshold: float | None):
        """The serving layer's Thresholds for the sliders' values (None = the model's default)."""
        from calibclust.serve.policy import Thresholds

        conf_default, ood_default = self.default_thresholds()
        conf = conf_default if confidence_threshold is None else float(confidence_threshold)
        ood = ood_default if ood_threshold is None else float(ood_threshold)
        return Thresholds("min_confidence", conf, conf, None if math.isinf(ood) else ood)

    def decide(self, pred: Prediction, confidence_threshold=None, ood_threshold=None) -> str:
        import numpy as np

        from calibclust.serve.policy import decide

        th = self.thresholds(confidence_threshold, ood_threshold)
        readable = np.array([pred.cluster >= 0])
        return str(decide(np.array([pred.confidence]), np.array([pred.ood_score]), readable, th)[0])

    def details(self, pred: Prediction, confidence_threshold=None, ood_threshold=None) -> dict[str, Any]:
        th = self.thresholds(confidence_threshold, ood_threshold)
        ok = pred.cluster >= 0
        return {
            "file": pred.source,
            "decision": self.decide(pred, confidence_threshold, ood_threshold),
            "cluster": pred.cluster,
            "cluster_name": self.names[pred.cluster] if ok else "",
            "confidence": pred.confidence if ok else None,
            "confidence_threshold": th.confidence_threshold,
            "ood_score": pred.ood_score if ok else None,
            "ood_threshold": th.ood_threshold,
            "ood_score_kind": self.metadata.ood.score,
            "error": pred.error,
        }

    def top_probs(self, pred: Prediction) -> dict[str, float]:
        if pred.cluster < 0:
            return {}
        return {self.names[c]: p for c, p in enumerate(pred.probs)}

    # --- batch ------------------------------------------------------------------------------
    def gather_batch(self, files: Sequence[str | os.PathLike], dest: Path) -> tuple[list[str], list[str], list[str]]:
        """Turn uploads (images, other files, zips) into (paths to label, display names, notes).

        Zip members are written under ``dest`` with generated names (a member's own name is only
        displayed, never used as a path: no zip-slip), within the member-count and size budget.
        """
        from calibclust.io.images import IMAGE_EXTENSIONS

        paths, shown, notes = [], [], []
        budget = self.config.max_upload_bytes * ZIP_EXPANSION
        pixels = 0  # decoding cost of the request, from image headers: a small zip can hold huge images
        for f in files:
            f = Path(f)
            try:
                self.check_upload(f)
            except DemoError as exc:
                notes.append(str(exc))
                continue
            if not zipfile.is_zipfile(f):
                if len(paths) >= MAX_BATCH_FILES:
                    raise DemoError(f"more than {MAX_BATCH_FILES} images in one batch; use 'calibclust label' for folders")
                pixels = self._count_pixels(f, f.name, pixels)
                paths.append(str(f))
                shown.append(f.name)
                continue
            try:
                with zipfile.ZipFile(f) as zf:
                    skipped = 0
                    for info in zf.infolist():
                        inner = info.filename
                        base = inner.rstrip("/").rsplit("/", 1)[-1]
                        if info.is_dir() or base.startswith(".") or "__MACOSX" in inner.split("/"):
                            continue
                        ext = os.path.splitext(base)[1].lower()
                        if ext not in IMAGE_EXTENSIONS:
                            skipped += 1
                            continue
                        if len(paths) >= MAX_BATCH_FILES:
                            raise DemoError(f"more than {MAX_BATCH_FILES} images in one batch; use 'calibclust label' for folders")
                        target = dest / f"z{len(paths):05d}{ext}"
                        budget -= _copy_limited(zf, info, target, budget)
                        pixels = self._count_pixels(target, f"{f.name}/{inner}", pixels)
                        paths.append(str(target))
                        shown.append(f"{f.name}/{inner}")
                    if skipped:
                        notes.append(f"{f.name}: skipped {skipped} member(s) that are not images by their extension")
            except zipfile.BadZipFile as exc:
                notes.append(f"{f.name}: not a readable zip ({exc})")
        return paths, shown, notes

    def _count_pixels(self, path: Path, shown: str, total: int) -> int:
        """Add one image's pixel count, read from its header (no decoding), to the request's total;
        a DemoError once the request's budget is spent. Unreadable headers count 0 (they fail later)."""
        from PIL import Image

        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception:
            return total
        total += width * height
        if total > self.config.max_batch_pixels:
            raise DemoError(f"this batch holds more than {self.config.max_batch_pixels:,} pixels (at {shown}); "
                            f"send fewer or smaller images, or use 'calibclust label' for folders")
        return total

    def label_batch(self, files: Sequence[str | os.PathLike] | None, confidence_threshold=None, ood_threshold=None):
        """Label uploads with the Labeler (same columns as ``calibclust label``). Returns
        (table columns, thresholds, notes); raises DemoError for an unusable request."""
        from calibclust.serve.policy import Policy

        if not files:
            raise DemoError("no files given: drop some images or a .zip of images")
        dest = Path(tempfile.mkdtemp(prefix="batch-", dir=self.work_dir))
        try:
            paths, shown, notes = self.gather_batch(files, dest)
            if not paths:
                raise DemoError("no images to label. " + " ".join(notes))
            th = self.thresholds(confidence_threshold, ood_threshold)
            policy = Policy("min_confidence", th.confidence_threshold,
                            math.inf if th.ood_threshold is None else th.ood_threshold)
            table, thresholds = self.labeler.label(paths, policy=policy, top_k=min(BATCH_TOP_K, self.num_clusters))
        finally:
            shutil.rmtree(dest, ignore_errors=True)  # the table is all that is kept
        table["path"] = shown
        return table, thresholds, notes

    def redecide_table(self, table: dict[str, list], confidence_threshold=None, ood_threshold=None) -> dict[str, list]:
        import numpy as np

        from calibclust.serve.policy import decide

        th = self.thresholds(confidence_threshold, ood_threshold)
        readable = np.asarray(table["cluster"]) >= 0
        out = dict(table)
        out["decision"] = list(decide(np.asarray(table["confidence"], np.float64),
                                      np.asarray(table["ood_score"], np.float64), readable, th))
        return out

    def write_csv(self, table: dict[str, list], path: str | os.PathLike | None = None, owner: str | None = None) -> Path:
        """The predictions table as CSV, with THE writer (:mod:`calibclust.io.predictions`);
        ``path`` rewrites an earlier one (atomically) instead of starting a new file. A new file goes
        into the folder of the browser session ``owner``, removed by :meth:`end_session`."""
        from calibclust.io.predictions import write_predictions

        if path is None:
            folder = self.session_dir(owner)
            folder.mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix="csv-", dir=folder)) / "predictions.csv"
        return write_predictions(path, table)

    def session_dir(self, owner: str | None) -> Path:
        """Temporary files of one browser session (Gradio's session hash; made safe as a name)."""
        name = "".join(ch for ch in (owner or "") if ch.isalnum())[:64] or "anonymous"
        return self.work_dir / "sessions" / name

    def end_session(self, owner: str | None) -> None:
        """A visitor closed the page: their batch tables go (the server keeps nobody's files)."""
        shutil.rmtree(self.session_dir(owner), ignore_errors=True)

    # --- names ------------------------------------------------------------------------------
    def parse_names(self, rows: Sequence[Sequence[Any]]) -> list[str]:
        """Names from the naming table's rows ``[cluster, name]``; blank keeps the current name."""
        names = self.names
        for row in rows:
            if len(row) < 2 or row[0] in ("", None):
                continue
            try:
                c = int(float(row[0]))
            except (TypeError, ValueError):
                raise DemoError(f"cluster id {row[0]!r} is not a number") from None
            if not 0 <= c < self.num_clusters:
                raise DemoError(f"cluster {c} does not exist (the model has {self.num_clusters})")
            name = "" if row[1] is None else " ".join(str(row[1]).split())
            if not name:
                continue
            if len(name) > MAX_NAME_LENGTH:
                raise DemoError(f"the name of cluster {c} is longer than {MAX_NAME_LENGTH} characters")
            if any(ord(ch) < 32 for ch in name):
                raise DemoError(f"the name of cluster {c} contains control characters")
            names[c] = name
        seen: dict[str, int] = {}
        for c, n in enumerate(names):
            if n in seen:
                raise DemoError(f"clusters {seen[n]} and {c} are both named {n!r}; names must be unique")
            seen[n] = c
        return names

    def suggested_filename(self) -> str:
        from calibclust.exemplars import new_model_path

        return new_model_path(self.model_path, "named", self.save_dir).name

    def save_names(self, rows: Sequence[Sequence[Any]], filename: str | None) -> Path:
        """Write a NEW model file in the save folder with the names in its metadata."""
        from calibclust.errors import CalibclustError
        from calibclust.exemplars import save_model_copy

        names = self.parse_names(rows)
        filename = (filename or "").strip() or self.suggested_filename()
        if "/" in filename or "\\" in filename or filename.startswith(".") or filename in ("", ".onnx"):
            raise DemoError(f"{filename!r}: give a plain file name (no folders); it is saved in the save folder")
        if not filename.lower().endswith(".onnx"):
            filename += ".onnx"
        dst = self.save_dir / filename
        if dst.resolve() == self.model_path.resolve():
            raise DemoError("that is the model being served; the original is never modified, choose a new name")
        with self._lock:  # two users saving the same name at once: one wins, one gets a message
            # Every save is a full model copy: an exposed server must not fill its disk on request.
            if self._saves >= MAX_SAVES or self._saved_bytes >= MAX_SAVED_BYTES:
                raise DemoError(f"this server has saved {self._saves} named models "
                                f"({self._saved_bytes / 2**20:,.0f} MB), its limit; restart it to save more")
            try:
                path = save_model_copy(self.model_path, dst, self.metadata.replace(cluster_names=names))
            except CalibclustError as exc:
                raise DemoError(str(exc).replace(str(self.save_dir) + os.sep, "")) from None
            self._saves += 1
            self._saved_bytes += path.stat().st_size
            return path

    # --- exemplars and examples -------------------------------------------------------------
    def cluster_label(self, c: int) -> str:
        n = 0 if self.exemplars is None else int(self.exemplars.counts()[c])
        return f"{c} · {self.names[c]} ({n} exemplars)"

    def gallery_label(self, c: int) -> str:
        if self.exemplars is None:
            return "Typical images of this cluster: none (the model has no exemplars sidecar)"
        n = int(self.exemplars.counts()[c])
        if n == 0:
            return f"Typical images of cluster {c}: none (no image was assigned to it when the exemplars were made)"
        return f"Typical images of cluster {c} (most typical first; click to enlarge)"

    def cluster_gallery(self, c: int) -> list[tuple[Any, str]]:
        from calibclust.exemplars import exemplar_captions

        if self.exemplars is None or not 0 <= c < self.num_clusters:
            return []
        images, _, _ = self.exemplars.for_cluster(c)
        return [(_upscale(img), cap) for img, cap in zip(images, exemplar_captions(self.exemplars, c))]

    def overview_gallery(self) -> list[tuple[Any, str]]:
        """One tile per cluster that has exemplars: its most typical image."""
        if self.exemplars is None:
            return []
        tiles = []
        for c in range(self.num_clusters):
            images, _, _ = self.exemplars.for_cluster(c)
            if len(images):
                tiles.append((_upscale(images[0]), f"{c} · {self.names[c]}"))
        return tiles

    def example_images(self):
        """The examples decoded for their gallery tiles (an unreadable example shows as grey)."""
        import numpy as np

        from calibclust.io.images import ImageDecodeError, decode_image

        out = []
        for p in self.example_paths:
            try:
                out.append(decode_image(p, size=self.labeler.input_size, max_pixels=self.config.max_pixels,
                                        resize=self.labeler.metadata.resize))
            except ImageDecodeError:
                out.append(np.full((*self.labeler.input_size, 3), 128, np.uint8))
        return out

    def _prepare_examples(self) -> list[str]:
        """Example files: up to ``max_examples`` images from --examples, else each cluster's top
        exemplar written as a PNG (the thumbnails are real training images)."""
        from calibclust.io.images import discover_images

        folder = self.work_dir / "examples"
        if self.config.examples is not None:
            source = Path(self.config.examples)
            if not source.is_dir():
                from calibclust.errors import InputError

                raise InputError(f"--examples {source}: not a folder")
            # Copies in the work folder: Gradio serves files from there (and the temp/current
            # folders) only, so the user's folder is never exposed to the web.
            folder.mkdir(exist_ok=True)
            found = []
            for p in discover_images(source):
                if p.stat().st_size > self.config.max_upload_bytes:
                    continue
                target = folder / f"{len(found):02d}_{p.name}"
                shutil.copyfile(p, target)
                found.append(str(target))
                if len(found) >= self.config.max_examples:
                    break
            return found
        if self.exemplars is None:
            return []
        from PIL import Image

        folder.mkdir(exist_ok=True)
        out = []
        for c in range(self.num_clusters):
            images, _, paths = self.exemplars.for_cluster(c)
            if len(images) and len(out) < self.config.max_examples:
                target = folder / f"cluster{c:03d}_{Path(paths[0]).stem[:40]}.png"
                Image.fromarray(images[0]).save(target)
                out.append(str(target))
        return out

    def close(self) -> None:
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _copy_limited(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Extract one member to ``target`` counting real bytes (headers can lie): stop at ``budget``."""
    written = 0
    with zf.open(info) as src, open(target, "wb") as dst:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            written += len(chunk)
            if written > budget:
                raise DemoError(f"the zip unpacks to more than {ZIP_EXPANSION}× the upload limit; "
                                "use 'calibclust label' on a folder for large batches")
            dst.write(chunk)
    return written


def anchored_step(low: float, value: float, step: float) -> float:
    """A slider step close to ``step`` whose grid from ``low`` passes through ``value``, so that
    dragging back to the model's threshold gives exactly the model's threshold (and with it the
    decisions of ``calibclust label``), not the nearest multiple of 0.001."""
    if not (math.isfinite(value) and value > low and step > 0):
        return step
    return (value - low) / max(1, round((value - low) / step))


def _upscale(image, side: int = PREVIEW_SIDE):
    """Nearest-neighbour upscaling by an integer factor, so small inputs stay crisp in the page."""
    import numpy as np

    h, w = image.shape[:2]
    k = max(1, side // max(h, w))
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1) if k > 1 else image


# =============================================================================== rendering
_BADGES = {
    "accepted": ("#1a7f37", "Accepted"),
    "rejected": ("#b35900", "Rejected — low confidence"),
    "ood": ("#a40e26", "Rejected — out of distribution"),
    "error": ("#57606a", "Could not read the image"),
}


def badge_html(decision: str | None, subtitle: str = "") -> str:
    if decision is None:
        return '<div class="cc-badge cc-empty">Upload an image or pick an example.</div>'
    colour, text = _BADGES[decision]
    sub = f'<div class="cc-sub">{html.escape(subtitle)}</div>' if subtitle else ""
    return (
        f'<div class="cc-badge cc-{decision}" data-decision="{decision}" style="background:{colour};color:#fff;'
        f'padding:.7em 1em;border-radius:.5em;font-size:1.25em;font-weight:600">{html.escape(text)}{sub}</div>'
    )


def single_outputs(session: DemoSession, pred: Prediction | None, conf_t, ood_t) -> tuple[str, str, dict]:
    """(badge HTML, summary markdown, details) for a prediction under the slider thresholds."""
    if pred is None:
        return badge_html(None), "", {}
    d = session.details(pred, conf_t, ood_t)
    if pred.cluster < 0:
        return badge_html("error", pred.error), f"**{pred.source}**: {pred.error}", d
    decision = d["decision"]
    name = d["cluster_name"]
    conf_ok = "≥" if pred.confidence >= d["confidence_threshold"] else "<"
    if d["ood_threshold"] is None:
        ood_line = f"OOD score {pred.ood_score:.4f} (no OOD threshold)"
    else:
        above = pred.ood_score > d["ood_threshold"]
        ood_line = (f"OOD score **{pred.ood_score:.4f}** {'>' if above else '≤'} threshold {d['ood_threshold']:.4f} "
                    f"→ {'out of distribution' if above else 'in distribution'}")
    sub = {"accepted": f"cluster {pred.cluster} · {name}",
           "rejected": f"best guess: cluster {pred.cluster} · {name}",
           "ood": "unlike the training images"}[decision]
    summary = (
        f"**{pred.source}** → cluster **{pred.cluster} · {name}**\n\n"
        f"- confidence **{pred.confidence:.4f}** {conf_ok} threshold {d['confidence_threshold']:.4f}\n"
        f"- {ood_line}\n"
    )
    return badge_html(decision, sub), summary, d


def batch_view(table: dict[str, list]) -> tuple[list[str], list[list[Any]]]:
    """The table shown in the page: the columns a person reads first."""
    cols = BATCH_COLUMNS
    rows = []
    for i in range(len(table["path"])):
        row = []
        for c in cols:
            v = table[c][i]
            if isinstance(v, float):
                v = None if math.isnan(v) else round(v, 4)
            row.append(v)
        rows.append(row)
    return cols, rows


def batch_summary(table: dict[str, list], notes: Sequence[str] = ()) -> str:
    from collections import Counter

    counts = Counter(table["decision"])
    line = (f"**{len(table['path'])} images**: {counts.get('accepted', 0)} accepted, "
            f"{counts.get('rejected', 0)} rejected (low confidence), {counts.get('ood', 0)} out of distribution, "
            f"{counts.get('error', 0)} unreadable")
    return line + "".join(f"\n\n- {html.escape(n)}" for n in notes)


# =============================================================================== the app
CSS = """
.cc-badge .cc-sub{font-size:.75em;font-weight:400;opacity:.95;margin-top:.2em}
.cc-empty{color:#57606a;padding:.7em 1em;border:1px dashed #aaa;border-radius:.5em}
"""


def build_app(session: DemoSession):
    """The Gradio Blocks app for ``session``. Gradio is imported here, not at module level."""
    from calibclust.errors import require

    gr = require("gradio", "demo", "the demo app")

    conf0, ood0 = session.default_thresholds()
    ood_lo, ood_hi = session.ood_slider_range()
    if math.isfinite(ood0):
        ood_lo, ood_hi = min(ood_lo, ood0), max(ood_hi, ood0)
    ood_init = ood0 if math.isfinite(ood0) else ood_hi
    n_clusters = session.num_clusters
    cluster_choices = [(session.cluster_label(c), c) for c in range(n_clusters)]

    def safe(fn, fallback):
        """Run a handler; turn any failure into a message in the page (never a traceback)."""

        @functools.wraps(fn)  # Gradio reads the handler's signature (gr.Request, gr.SelectData) through it
        def wrapper(*args):
            try:
                return fn(*args)
            except DemoError as exc:
                return fallback(str(exc))
            except Exception as exc:  # noqa: BLE001 - the page must get a message, the log the details
                log.exception("demo handler %s failed", fn.__name__)
                # The type only: an exception's text can hold server paths; the log has it all.
                return fallback(f"internal error ({type(exc).__name__}); the server log has the details")

        return wrapper

    # --- handlers: single image ------------------------------------------------------------
    def on_predict(image, confidence_threshold, ood_threshold):
        if image is None:
            return on_clear()
        pred, seen = session.predict_file(image)
        badge, summary, details = single_outputs(session, pred, confidence_threshold, ood_threshold)
        preview = None if seen is None else _upscale(seen)
        return badge, summary, session.top_probs(pred), preview, details, pred.to_state()

    def predict_fallback(msg):
        return badge_html("error", msg), f"**Error:** {html.escape(msg)}", {}, None, {"error": msg}, None

    def on_thresholds(state, confidence_threshold, ood_threshold):
        badge, summary, details = single_outputs(session, Prediction.from_state(state), confidence_threshold, ood_threshold)
        return badge, summary, details

    def on_clear():
        return badge_html(None), "", {}, None, {}, None

    # --- handlers: batch --------------------------------------------------------------------
    def on_batch(images, confidence_threshold, ood_threshold, request):
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        table, _, notes = session.label_batch(images, confidence_threshold, ood_threshold)
        headers, rows = batch_view(table)
        csv = session.write_csv(table, owner=getattr(request, "session_hash", None))
        return (batch_summary(table, notes), {"headers": headers, "data": rows}, str(csv),
                {"table": table, "notes": notes, "csv": str(csv)})

    def batch_fallback(msg):
        return f"**Error:** {html.escape(msg)}", {"headers": ["path", "decision"], "data": []}, None, None

    def on_batch_thresholds(state, conf_t, ood_t):
        if not state:
            return gr.update(), gr.update(), gr.update(), state
        table = session.redecide_table(state["table"], conf_t, ood_t)
        headers, rows = batch_view(table)
        csv = session.write_csv(table, state["csv"])
        return (batch_summary(table, state["notes"]), {"headers": headers, "data": rows}, str(csv),
                {**state, "table": table})

    # --- handlers: clusters & naming --------------------------------------------------------
    def names_rows(names: list[str]) -> list[list[Any]]:
        return [[c, n] for c, n in enumerate(names)]

    def table_rows(table) -> list[list[Any]]:
        if table is None:
            return []
        if hasattr(table, "values") and hasattr(table, "columns"):  # pandas DataFrame
            return table.values.tolist()
        if isinstance(table, dict):
            return table.get("data", [])
        return list(table)

    def on_select_cluster(c, table):
        c = int(c) if c is not None else 0
        rows = table_rows(table)
        name = next((r[1] for r in rows if len(r) > 1 and str(r[0]) != "" and int(float(r[0])) == c), session.names[c])
        return gr.update(value=session.cluster_gallery(c), label=session.gallery_label(c)), name

    # Navigation (Previous/Next, overview tiles) only moves the dropdown; its change event alone
    # fills the gallery and the name box, so a name typed right after "Next" is never overwritten
    # by a second, late update.

    def on_name_typed(c, name, table):
        rows = [list(r) for r in table_rows(table)] or names_rows(session.names)
        c = int(c or 0)
        for r in rows:
            if int(float(r[0])) == c:
                r[1] = name
        return {"headers": ["cluster", "name"], "data": rows}

    def on_overview_select(evt):
        tiles = [c for c in range(n_clusters) if session.exemplars is not None and session.exemplars.counts()[c]]
        return tiles[evt.index] if evt.index is not None and evt.index < len(tiles) else 0

    def on_example_select(evt):
        return session.example_paths[evt.index]

    # Event data is recognised by its annotation, resolved against the function's globals, where
    # the lazily imported gradio is not: give the class itself.
    on_overview_select.__annotations__ = {"evt": gr.SelectData}
    on_batch.__annotations__ = {"request": gr.Request}  # Gradio passes the request (its session hash)
    on_example_select.__annotations__ = {"evt": gr.SelectData}

    def on_save(cluster_names, filename):
        path = session.save_names(table_rows(cluster_names), filename)
        names = session.parse_names(table_rows(cluster_names))
        if session.config.exposed:  # a visitor from another machine learns no server folder
            path = path.name
        return (f"Saved **{path}** with cluster names {', '.join(names)}. The original "
                f"`{session.model_path.name}` is unchanged. Serve the named model with:\n\n"
                f"`calibclust demo --model {path}`"), session.suggested_filename()

    def save_fallback(msg):
        return f"**Not saved:** {html.escape(msg)}", gr.update()

    # The page opens with the first example already predicted (computed once, here), so a visitor
    # sees a complete result at once, without a round trip.
    first = [None, badge_html(None), "", {}, None, {}, None]
    if session.example_paths:
        try:
            first = [session.example_paths[0], *on_predict(session.example_paths[0], conf0, ood_init)]
        except Exception:  # noqa: BLE001 - an unusable example only costs the pre-filled result
            log.exception("could not predict the first example")

    # --- layout -----------------------------------------------------------------------------
    # delete_cache: Gradio's copies of uploads and outputs older than an hour go, hourly, so a
    # long-running demo does not fill the disk.
    with gr.Blocks(title=f"calibclust demo — {session.model_path.name}", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as app:
        gr.Markdown(session.header_markdown(), elem_id="cc-header")
        with gr.Row():
            conf_slider = gr.Slider(0.0, 1.0, value=conf0, step=anchored_step(0.0, conf0, 0.001), label="Confidence threshold",
                                    info="accept when confidence ≥ this", elem_id="cc-conf")
            ood_slider = gr.Slider(ood_lo, ood_hi, value=ood_init, step=anchored_step(ood_lo, ood_init, (ood_hi - ood_lo) / 1000),
                                   label=f"OOD threshold ({session.metadata.ood.score} score)",
                                   info="out of distribution when the score is > this", elem_id="cc-ood")
            reset = gr.Button("Model defaults", size="sm", scale=0)
        with gr.Tabs():
            with gr.Tab("Single image", id="single"):
                pred_state = gr.State(first[6])
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.File(first[0], label="Image (any format Pillow reads)", file_count="single",
                                         type="filepath", elem_id="cc-upload", height=140)
                        if session.example_paths:
                            examples = gr.Gallery(
                                [(_upscale(img, 96), Path(p).name) for img, p in zip(session.example_images(), session.example_paths)],
                                label="Examples (click one)", columns=6, height=200, format="png", fit_columns=False,
                                allow_preview=False, elem_id="cc-examples")
                        else:
                            examples = None
                            gr.Markdown("*No examples: start with `--examples FOLDER`, or add exemplars to the "
                                        "model with `calibclust exemplars`.*")
                        preview = gr.Image(label=f"What the model sees ({session.labeler.input_size[0]}×"
                                           f"{session.labeler.input_size[1]}, upscaled)", interactive=False,
                                           format="png", height=240, value=first[4])
                    with gr.Column(scale=1):
                        # Labels name the outputs in the HTTP API (gradio_client); the page hides them.
                        badge = gr.HTML(first[1], elem_id="cc-badge", label="decision badge (HTML)", show_label=False)
                        summary = gr.Markdown(first[2], elem_id="cc-summary", label="summary (Markdown)", show_label=False)
                        probs = gr.Label(first[3] or None, num_top_classes=min(TOP_K, n_clusters),
                                         label="Calibrated probabilities (top-k)")
                        with gr.Accordion("Details", open=False):
                            details = gr.JSON(first[5], label="Prediction and thresholds")
            with gr.Tab("Clusters & naming", id="clusters"):
                if session.exemplars is None:
                    gr.Markdown(f"**No exemplars.** {session.exemplars_note}", elem_id="cc-exemplars-note")
                else:
                    gr.Markdown("Each cluster's most typical images (highest "
                                f"{session.exemplars.score_name}). Click a tile to open that cluster.")
                    tile_rows = math.ceil(n_clusters / OVERVIEW_COLUMNS)
                    overview = gr.Gallery(session.overview_gallery(), label="Clusters (most typical image)",
                                          columns=OVERVIEW_COLUMNS, fit_columns=False, format="png",
                                          height=min(420, 60 + 130 * tile_rows), allow_preview=False,
                                          elem_id="cc-overview")
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            cluster_dd = gr.Dropdown(cluster_choices, value=0, label="Cluster", scale=3)
                            prev_btn = gr.Button("◀ Previous", scale=0, size="sm")
                            next_btn = gr.Button("Next ▶", scale=0, size="sm")
                        cluster_gallery = gr.Gallery(session.cluster_gallery(0), label=session.gallery_label(0),
                                                     columns=6, fit_columns=False, height=300, format="png",
                                                     allow_preview=True, elem_id="cc-cluster-gallery")
                    with gr.Column(scale=2):
                        name_box = gr.Textbox(session.names[0], label="Name for this cluster",
                                              info="typing here fills the table below")
                        names_table = gr.Dataframe(
                            value={"headers": ["cluster", "name"], "data": names_rows(session.names)},
                            headers=["cluster", "name"], datatype=["number", "str"], type="array",
                            interactive=True, static_columns=[0], label="Cluster names (editable)",
                            row_count=n_clusters, max_height=300,
                        )
                        filename = gr.Textbox(session.suggested_filename(),
                                              label=f"New model file (saved in {session.save_dir})")
                        save_btn = gr.Button("Save named model", variant="primary")
                        save_msg = gr.Markdown(elem_id="cc-save-msg", label="save result (Markdown)", show_label=False)
            with gr.Tab("Batch", id="batch"):
                batch_state = gr.State(None)
                gr.Markdown(f"Several images or a .zip of images (up to {MAX_BATCH_FILES}; each upload up to "
                            f"{session.config.max_upload_mb:g} MB). For whole folders use `calibclust label`.")
                batch_files = gr.File(label="Images or .zip", file_count="multiple", type="filepath", height=160)
                batch_btn = gr.Button("Label these files", variant="primary")
                batch_msg = gr.Markdown(elem_id="cc-batch-msg", label="batch summary (Markdown)", show_label=False)
                batch_table = gr.Dataframe({"headers": BATCH_COLUMNS, "data": []}, label="Decisions",
                                           interactive=False, type="array", max_height=500)
                batch_csv = gr.File(label="predictions.csv (download)", interactive=False, height=80)

        # --- events -------------------------------------------------------------------------
        single_out = [badge, summary, probs, preview, details, pred_state]
        # change fires on upload, on picking an example and on clearing; this is the API endpoint.
        upload.change(safe(on_predict, predict_fallback), [upload, conf_slider, ood_slider], single_out,
                      api_name="predict", trigger_mode="always_last")
        if examples is not None:
            # A clicked example becomes the upload, whose change event runs the model.
            examples.select(on_example_select, None, upload, api_visibility="undocumented")
        for slider in (conf_slider, ood_slider):
            slider.change(safe(on_thresholds, lambda m: (badge_html("error", m), m, {})),
                          [pred_state, conf_slider, ood_slider], [badge, summary, details],
                          api_name="decide" if slider is conf_slider else False,
                          trigger_mode="always_last", show_progress="hidden")
            slider.change(safe(on_batch_thresholds, batch_fallback), [batch_state, conf_slider, ood_slider],
                          [batch_msg, batch_table, batch_csv, batch_state], api_visibility="undocumented",
                          trigger_mode="always_last", show_progress="hidden")
        reset.click(lambda: (conf0, ood_init), None, [conf_slider, ood_slider], api_visibility="undocumented",
                    queue=False)

        batch_btn.click(safe(on_batch, batch_fallback), [batch_files, conf_slider, ood_slider],
                        [batch_msg, batch_table, batch_csv, batch_state], api_name="label_batch")

        def on_unload(request):
            session.end_session(getattr(request, "session_hash", None))

        on_unload.__annotations__ = {"request": gr.Request}
        app.unload(on_unload)  # the page was closed: that visitor's batch tables are deleted

        cluster_dd.change(safe(on_select_cluster, lambda m: ([], gr.update())), [cluster_dd, names_table],
                          [cluster_gallery, name_box], api_visibility="undocumented")
        # Stepping runs in the browser (no round trip), so quick clicks each count.
        prev_btn.click(None, cluster_dd, cluster_dd, js=f"(c) => ((Number(c) || 0) + {n_clusters - 1}) % {n_clusters}",
                       api_visibility="undocumented")
        next_btn.click(None, cluster_dd, cluster_dd, js=f"(c) => ((Number(c) || 0) + 1) % {n_clusters}",
                       api_visibility="undocumented")
        # .change, not .input: fires for typing and for our own updates alike (and .input did not
        # reach the server from a headless browser with Gradio 6.31 in our tests).
        name_box.change(on_name_typed, [cluster_dd, name_box, names_table], names_table,
                       api_visibility="undocumented", trigger_mode="always_last", show_progress="hidden")
        if session.exemplars is not None:
            overview.select(on_overview_select, None, cluster_dd, api_visibility="undocumented")
        save_btn.click(safe(on_save, save_fallback), [names_table, filename], [save_msg, filename],
                       api_name="save_names")
    return app


# =============================================================================== running
@dataclass
class RunningDemo:
    app: Any
    session: DemoSession
    url: str

    def close(self) -> None:
        try:
            self.app.close(verbose=False)
        finally:
            self.session.close()


def check_exposure(config: DemoConfig) -> None:
    """A server reachable from other machines needs a login; without one only by an explicit
    ``--insecure-no-auth``, which is said loudly."""
    from calibclust.errors import InputError

    if not config.exposed or config.auth:
        return
    where = "a public share link" if config.share else f"{config.host} (reachable from other machines)"
    if not config.insecure_no_auth:
        raise InputError(f"the demo would listen on {where} with no login: anyone could label images and save "
                         f"models on this machine. Pass --auth USER:PASSWORD (or --auth-file FILE), or "
                         f"--insecure-no-auth if that is really meant")
    print(f"calibclust demo: WARNING: listening on {where} WITHOUT A LOGIN (--insecure-no-auth)",
          file=sys.stderr, flush=True)


AUTH_ENV = "CALIBCLUST_DEMO_AUTH"


def parse_auth(text: str | None, file: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` from ``--auth``, from the first line of ``--auth-file`` (kept out of the
    shell history and process list), or else from the environment variable ``CALIBCLUST_DEMO_AUTH``
    (e.g. ``docker run -e``)."""
    from calibclust.errors import InputError

    if text and file:
        raise InputError("--auth and --auth-file exclude each other")
    if not text and not file:
        text = os.environ.get(AUTH_ENV)
    if file:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise InputError(f"--auth-file {file}: {exc.strerror or exc}") from None
        text = lines[0].strip() if lines else ""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise InputError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password


def launch(config: DemoConfig, block: bool = True, quiet: bool = False) -> RunningDemo:
    """Build and start the app. ``block=False`` returns once the server listens (tests, notebooks)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_exposure(config)
    session = DemoSession(config)
    try:
        app = build_app(session)
        app.queue(default_concurrency_limit=max(1, int(config.concurrency)), max_size=64)
        _, local_url, share_url = app.launch(
            server_name=config.host,
            server_port=config.port,
            share=config.share,
            max_file_size=config.max_upload_bytes,
            prevent_thread_lock=True,
            quiet=quiet,
            show_error=False,  # a handler failure shows our message, not Python's
            footer_links=["api"],
            css=CSS,
            allowed_paths=[str(session.work_dir)],
            auth=config.auth,  # Gradio's own login page and API check
        )
    except BaseException:
        session.close()
        raise
    running = RunningDemo(app, session, share_url or local_url)
    if block:
        try:
            app.block_thread()
        finally:
            running.close()
    return running


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL",
                   help=f"exported model (.onnx); default: the quick start's {DEFAULT_QUICKSTART_MODEL.as_posix()}")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default 127.0.0.1 = this machine only; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true", help="also create a temporary public gradio.live link (needs internet)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                   help=f"largest upload accepted, per file (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images with more than N pixels (default {DEFAULT_MAX_PIXELS:,}, as 'calibclust label'; "
                        "a decoded image takes 3 bytes per pixel, and --concurrency of them may be in memory at once)")
    p.add_argument("--examples", metavar="FOLDER",
                   help="offer the first images of FOLDER as clickable examples (default: the exemplars' top images)")
    p.add_argument("--save-dir", metavar="DIR", help="where the naming tab writes new model files (default: the model's folder)")
    p.add_argument("--backend", default="auto", metavar="NAME", help="auto (default), cpu, cuda, tensorrt")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                   help=f"requests processed at once; the rest wait in Gradio's queue (default {DEFAULT_CONCURRENCY})")
    g = p.add_argument_group("exposed use (--host beyond this machine, or --share)")
    g.add_argument("--auth", metavar="USER:PASSWORD",
                   help=f"a login (Gradio's own auth); required when exposed (default: ${AUTH_ENV} if set)")
    g.add_argument("--auth-file", metavar="FILE", help="the same, read from the first line of FILE")
    g.add_argument("--insecure-no-auth", action="store_true", help="serve beyond this machine without a login")
    g.add_argument("--max-batch-pixels", type=int, default=DEFAULT_BATCH_PIXELS, metavar="N",
                   help=f"pixels per batch request, read from image headers before decoding (default {DEFAULT_BATCH_PIXELS:,})")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="try a model in the browser: single images, cluster exemplars and naming, batches (Gradio)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_demo_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args) -> DemoConfig:
    from calibclust.errors import InputError

    if args.max_upload_mb <= 0:
        raise InputError("--max-upload-mb must be > 0")
    if args.max_pixels < 1:
        raise InputError("--max-pixels must be >= 1")
    if args.concurrency < 1:
        raise InputError("--concurrency must be >= 1")
    if not 0 <= args.port < 65536:
        raise InputError("--port must be in 0..65535")
    return DemoConfig(
        model=resolve_model_path(args.model),
        host=args.host,
        port=args.port or None,
        share=args.share,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        examples=args.examples,
        save_dir=args.save_dir,
        backend=args.backend,
        concurrency=args.concurrency,
        auth=parse_auth(args.auth, args.auth_file),
        insecure_no_auth=args.insecure_no_auth,
        max_batch_pixels=args.max_batch_pixels,
    )


def run(args) -> int:
    import signal

    from calibclust.errors import require

    config = config_from_args(args)
    require("gradio", "demo", "the demo app")

    def stop(signum, frame):  # `docker stop` / kill: shut down as on Ctrl-C (server closed, temp files removed)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    running = None
    try:
        print(f"calibclust demo: loading {config.model} ...", flush=True)
        running = launch(config, block=False, quiet=True)
        print(f"calibclust demo: open {running.url} in a browser (Ctrl-C to stop)", flush=True)
        if config.exposed:
            login = "with a login" if config.auth else "WITHOUT a login"
            print(f"calibclust demo: listening on {config.host}, reachable from other machines, {login}", flush=True)
        running.app.block_thread()  # returns after Ctrl-C, having closed the server
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped, at any moment: not an error
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if running is not None:
            running.close()
    print("calibclust demo: stopped", flush=True)
    return 0


__all__ = [
    "DEFAULT_QUICKSTART_MODEL", "DemoConfig", "DemoSession", "Prediction", "build_app", "launch",
    "register_cli", "resolve_model_path",
]
