"""The demo's logic, without Gradio: :class:`DemoSession` holds one loaded model (a torch-free
:class:`~calibclust.serve.labeler.Labeler`), its exemplars, the limits and the per-run state
(named-model saves, temporary files), and answers every request the app makes; :class:`Prediction`
is one image's model outputs, kept in the page so thresholds can change without the model.

Prediction is the Labeler's (THE decoder at the model's input size, then the ONNX graph), and
decisions are :func:`calibclust.serve.policy.decide` with a ``min_confidence`` policy, so an image
gets here exactly the decision ``calibclust label --confidence-threshold T --ood-threshold X`` gives it.
Uploads are checked by :mod:`calibclust.serve.demo_uploads` before anything is decoded.

Module level imports only the standard library; numpy, Pillow and onnxruntime are imported when a
session is made or used.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from calibclust.serve import demo_uploads
from calibclust.serve.demo_config import DemoConfig, DemoError
from calibclust.serve.demo_view import _upscale

BATCH_TOP_K = 3  # top-k columns of the batch CSV
MAX_NAME_LENGTH = 100
MAX_SAVES = 20  # named model copies one server run writes, at most
MAX_SAVED_BYTES = 2 << 30  # and their total size


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
        """A DemoError when the upload is over the size limit (:func:`~calibclust.serve.demo_uploads.check_upload`)."""
        demo_uploads.check_upload(self.config, path)

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
        """Turn uploads (images, other files, zips) into (paths to label, display names, notes),
        within this server's limits: :func:`~calibclust.serve.demo_uploads.gather_batch`."""
        return demo_uploads.gather_batch(self.config, files, dest)

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
