"""``report.html`` of a labelling run: one self-contained file (figures and thumbnails embedded).

Shows the decisions (a summary, the policy in words), cluster sizes by decision, confidence and
OOD-score histograms with the thresholds used, the label-free estimated-accuracy-vs-coverage curve
with the run's operating point, per cluster a gallery of its **accepted** images (most and least
confident), and a "Set aside" section: the OOD images (highest score first), the rejected ones
(lowest confidence first) and the unreadable files with their reasons — what a person should look
at by hand. Every thumbnail names its file (``title``, shown on hover, and ``alt``).

Thumbnails are what the model saw (the decoded input at the model's size) and are captured during
the labelling pass by :class:`ThumbnailCache`, so the report does not decode the folder a second
time; only images the cache missed (a resumed run's earlier part, the Ray engine, a threshold that
moved past a confidence bin's candidates) are decoded again, and the summary counts them.
Built with the shared torch-free helpers of :mod:`calibclust.report`.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from calibclust.io.images import DEFAULT_MAX_PIXELS, decode_image

DECISION_CODES = {"accepted": 0, "rejected": 1, "ood": 2, "error": 3}
THUMBNAIL_BOX = 72  # px, the size the report shows; larger model inputs are reduced (aspect kept)
SAMPLE_SIZE = 4096  # confidences sampled for the running estimate of a fitted threshold
# Candidates around the running estimate of a fitted threshold. Measured on the quick start's mixed
# folder (class-ordered, so the estimate moves) at --target-accuracy 0.95, images the report had to
# decode again out of 176 shown: 3 / 4 / 5 / 6 slots -> 13 / 5 / 0 / 0 (margin 0); margin 0.01 /
# 0.02 / 0.05 -> more, not fewer (12 / 13 / 32, with 3 slots and a per-bin fallback since removed
# for memory); no running estimate at all -> 49.
ESTIMATE_MARGIN = 0.0
ESTIMATE_SLOTS = 5  # x n candidates per cluster from the running estimate up


def shrink(image: np.ndarray, box: int = THUMBNAIL_BOX) -> np.ndarray:
    """A copy of ``image`` that fits ``box``: reduced by a whole factor (box filter, aspect kept; a
    tenth of the cost of an antialiased resize, and the report shows thumbnails pixelated anyway).
    Always a copy, so that a view does not keep a whole decoded batch alive."""
    factor = -(-max(image.shape[:2]) // box)
    if factor <= 1:
        return np.array(image)
    from PIL import Image

    return np.asarray(Image.fromarray(image).reduce(factor))


class ThumbnailCache:
    """Thumbnails kept during the labelling pass for the images the report may show (bounded).

    The decisions are only final after the pass, so the cache keeps, from the in-distribution
    images (the OOD threshold is known up front): per cluster the ``n`` most confident, and the
    ``n`` least confident at or above the confidence threshold; over the run the ``n`` least
    confident below it (rejected candidates) and the ``n`` highest OOD scores among flagged images.

    A coverage or target-accuracy threshold is fitted on all confidences after the pass. Then
    ``estimate`` (the policy's own threshold function) is applied to a uniform sample of the
    confidences seen so far and candidates are routed by that running estimate (kept from
    :data:`ESTIMATE_MARGIN` below it, ``ESTIMATE_SLOTS``·n per cluster); an image the estimate
    misrouted early is decoded again by the report, and counted. Memory: at most
    ``n·(2 + C·(1 + slots))`` thumbnails of at most :data:`THUMBNAIL_BOX` px; only images still
    kept at the end of a batch are shrunk.
    """

    def __init__(self, n: int, ood_threshold: float | None, confidence_threshold: float | None = None,
                 estimate: Callable[[np.ndarray], float] | None = None, box: int = THUMBNAIL_BOX, seed: int = 0):
        if (confidence_threshold is None) == (estimate is None):
            raise ValueError("give either the confidence threshold or the function that estimates it")
        self.n, self.box = int(n), int(box)
        self.ood_threshold, self.confidence_threshold = ood_threshold, confidence_threshold
        self._estimate = estimate
        self._heaps: dict[tuple, list] = {}  # key -> min-heap of (priority, -seq, path, thumbnail)
        self._seq = itertools.count()
        self._sample = np.empty(SAMPLE_SIZE)  # uniform reservoir of in-distribution confidences
        self._seen = 0
        self._rng = np.random.default_rng(seed)
        self._running: float | None = None  # the running estimate of a fitted threshold

    def _capacity(self, key: tuple) -> int:
        return self.n * ESTIMATE_SLOTS if key[0] == "near" else self.n

    def _keys(self, cluster: int, confidence: float, ood_score: float) -> list[tuple[tuple, float]]:
        """(heap, priority) pairs this image competes in; a heap keeps its largest priorities."""
        if self.ood_threshold is not None and ood_score > self.ood_threshold:
            return [(("ood",), ood_score)]
        keys = [(("top", cluster), confidence)]
        if self.confidence_threshold is None:
            keys.append((("rejected",), -confidence))
            if self._running is not None and confidence >= self._running - ESTIMATE_MARGIN:
                keys.append((("near", cluster), -confidence))
        elif confidence >= self.confidence_threshold:
            keys.append((("low", cluster), -confidence))
        else:
            keys.append((("rejected",), -confidence))
        return keys

    def _update_estimate(self, confidence: np.ndarray) -> None:
        """Algorithm R over the batch's in-distribution confidences, then a new estimate; candidates
        that fell out of the margin make room."""
        fill = min(len(confidence), max(0, SAMPLE_SIZE - self._seen))
        self._sample[self._seen : self._seen + fill] = confidence[:fill]
        rest = confidence[fill:]
        if len(rest):  # item number m (0-based) replaces a random slot with probability SIZE/(m+1)
            slots = self._rng.integers(0, np.arange(self._seen + fill, self._seen + len(confidence)) + 1)
            keep = slots < SAMPLE_SIZE
            self._sample[slots[keep]] = rest[keep]
        self._seen += len(confidence)
        estimate = float(self._estimate(self._sample[: min(self._seen, SAMPLE_SIZE)]))
        self._running = estimate if math.isfinite(estimate) else None
        for key, heap in self._heaps.items():
            if key[0] == "near":
                floor = -math.inf if self._running is None else self._running - ESTIMATE_MARGIN
                heap[:] = [entry for entry in heap if -entry[0] >= floor]
                heapq.heapify(heap)

    def offer(self, paths: Sequence[str], images: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """One predicted batch: ``paths[i]`` was decoded to ``images[i]`` with these ``outputs``."""
        if not self.n:
            return
        confidence = np.asarray(outputs["confidence"], np.float64)
        ood_score = np.asarray(outputs["ood_score"], np.float64)
        if self._estimate is not None:
            in_dist = np.isfinite(confidence)
            if self.ood_threshold is not None:
                in_dist &= ~(ood_score > self.ood_threshold)
            if in_dist.any():
                self._update_estimate(confidence[in_dist])
        touched = set()
        for i, path in enumerate(paths):
            if not math.isfinite(confidence[i]):
                continue
            for key, priority in self._keys(int(outputs["label"][i]), float(confidence[i]), float(ood_score[i])):
                heap = self._heaps.setdefault(key, [])
                full = len(heap) >= self._capacity(key)
                if full and priority <= heap[0][0]:
                    continue
                # -seq: of two equal priorities the later image is the smaller entry, evicted
                # first, so the earlier one stays (as in ReportCollector). The thumbnail is the
                # batch index until the batch is done.
                entry = (priority, -next(self._seq), path, i)
                if full:
                    heapq.heapreplace(heap, entry)
                else:
                    heapq.heappush(heap, entry)
                touched.add(key)
        shrunk: dict[int, np.ndarray] = {}
        for key in touched:
            heap = self._heaps[key]
            for j, (priority, seq, path, thumb) in enumerate(heap):
                if isinstance(thumb, int):  # same (priority, seq): the heap order is unchanged
                    if thumb not in shrunk:
                        shrunk[thumb] = shrink(images[thumb], self.box)
                    heap[j] = (priority, seq, path, shrunk[thumb])

    def lookup(self) -> dict[str, np.ndarray]:
        return {path: thumb for heap in self._heaps.values() for _, _, path, thumb in heap}

    def __len__(self) -> int:
        return len(self.lookup())


class _Extremes:
    """The n largest and n smallest (value, path) pairs seen, merged batch by batch."""

    def __init__(self, n: int):
        self.n, self.high, self.low = n, [], []

    def add(self, values: np.ndarray, paths: np.ndarray) -> None:
        finite = np.isfinite(values)  # a NaN confidence (decided "rejected") has no place in an order
        values, paths = values[finite], paths[finite]
        if not self.n or len(values) == 0:
            return
        # Ties go to the earlier image on both ends, as in ThumbnailCache (which keeps the first of
        # equal candidates), so that duplicates of one image pick the same file there and here.
        low = [(float(values[i]), str(paths[i])) for i in np.argsort(values, kind="stable")[: self.n]]
        high = [(float(values[i]), str(paths[i])) for i in np.argsort(-values, kind="stable")[: self.n]]
        self.low = sorted(self.low + low, key=lambda t: t[0])[: self.n]
        self.high = sorted(self.high + high, key=lambda t: -t[0])[: self.n]


class ReportCollector:
    """Streaming per-cluster counts and, from the final decisions, the images each section shows:
    per cluster the most and least confident *accepted* images; over the run the highest-scoring
    OOD images and the least confident rejected ones (bounded memory)."""

    def __init__(self, cluster_names: Sequence[str], thumbnails: int = 8):
        self.names = list(cluster_names)
        self.n_thumbs = int(thumbnails)
        self.counts = np.zeros((len(self.names), 4), np.int64)  # cluster × decision (no error column use)
        self.accepted_confidence = np.zeros(len(self.names))  # sum, for the mean
        self.decision_counts = dict.fromkeys(DECISION_CODES, 0)
        self._accepted = [_Extremes(self.n_thumbs) for _ in self.names]
        self._ood = _Extremes(self.n_thumbs)
        self._rejected = _Extremes(self.n_thumbs)

    def add(self, part: dict[str, np.ndarray], decision: np.ndarray) -> None:
        cluster, conf, paths = part["cluster"], part["confidence"], part["path"]
        for name in DECISION_CODES:
            self.decision_counts[name] += int((decision == name).sum())
        ok = cluster >= 0
        codes = np.array([DECISION_CODES[d] for d in decision[ok]], np.int64)
        np.add.at(self.counts, (cluster[ok], codes), 1)
        accepted = decision == "accepted"
        np.add.at(self.accepted_confidence, cluster[accepted], conf[accepted].astype(np.float64))
        for c in np.unique(cluster[accepted]):
            idx = np.flatnonzero(accepted & (cluster == c))
            self._accepted[c].add(conf[idx], paths[idx])
        ood = np.flatnonzero(decision == "ood")
        self._ood.add(part["ood_score"][ood], paths[ood])
        rejected = np.flatnonzero(decision == "rejected")
        self._rejected.add(conf[rejected], paths[rejected])

    def cluster_summary(self) -> list[dict[str, Any]]:
        rows = []
        for c, name in enumerate(self.names):
            accepted = int(self.counts[c, 0])
            rows.append({
                "cluster": c,
                "name": name,
                "accepted": accepted,
                "rejected": int(self.counts[c, 1]),
                "ood": int(self.counts[c, 2]),
                "total": int(self.counts[c].sum()),
                "mean_accepted_confidence": float(self.accepted_confidence[c] / accepted) if accepted else None,
            })
        return rows

    def accepted_gallery(self, c: int) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
        """(most confident accepted, least confident accepted) of cluster ``c``, as (confidence, path)."""
        return self._accepted[c].high, self._accepted[c].low

    def set_aside(self) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
        """(OOD images by highest OOD score, rejected images by lowest confidence)."""
        return self._ood.high, self._rejected.low


# --- the report --------------------------------------------------------------------------------------
class _Thumbnails:
    """Thumbnails for the report: from the labelling pass's cache, else decoded (once) at the
    model's input size, i.e. the same pixels the model saw."""

    def __init__(self, cache: dict[str, np.ndarray], folder: str | os.PathLike, input_size: Sequence[int],
                 max_pixels: int):
        self.cache, self.folder, self.size, self.max_pixels = cache, Path(folder), tuple(input_size), max_pixels
        self.decoded_again = 0

    def __call__(self, path: str) -> np.ndarray:
        if path in self.cache:
            return self.cache[path]
        self.decoded_again += 1
        try:
            image = shrink(decode_image(self.folder / path, size=self.size, max_pixels=self.max_pixels))
        except Exception:  # gone or changed since it was labelled (or a decoder bug): a grey square
            image = np.full((min(self.size[0], THUMBNAIL_BOX), min(self.size[1], THUMBNAIL_BOX), 3), 200, np.uint8)
        self.cache[path] = image
        return image


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def policy_in_words(th: dict[str, Any]) -> str:
    """The confidence policy as a person would say it, e.g. "target accuracy 0.95 → threshold 0.83"."""
    t = th["confidence_threshold"]
    threshold = "nothing accepted" if t is None or not math.isfinite(t) else f"threshold {t:.2f}"
    if th["policy"] == "min_confidence":
        if th["policy_value"] is None:
            return f"confidence ≥ {t:.2f} (model default)"
        return f"confidence ≥ {th['policy_value']:.2f} (--confidence-threshold)"
    if th["policy"] == "coverage":
        return f"coverage {th['policy_value']:.2f} → {threshold}"
    return f"target accuracy {th['policy_value']:.2f} → {threshold}"


def write_report(
    path: Path,
    summary: dict[str, Any],
    confidence: np.ndarray,
    ood_score: np.ndarray,
    readable: np.ndarray,
    collector: ReportCollector,
    curve: dict[str, np.ndarray],
    folder: str | os.PathLike,
    input_size: Sequence[int] = (32, 32),
    thumbnails: dict[str, np.ndarray] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> int:
    """Write ``path``; ``thumbnails`` maps relative paths to images captured while labelling
    (:meth:`ThumbnailCache.lookup`). Returns how many shown images had to be decoded again."""
    from calibclust.charts import COLOR_BAD, COLOR_GOOD, Chart
    from calibclust.report import HTMLReport, add_k_choice_section, plot_cluster_counts, plot_score_histograms

    th = summary["thresholds"]
    counts = summary["counts"]
    conf = np.asarray(confidence, np.float64)[readable]
    ood = np.asarray(ood_score, np.float64)[readable]
    model = summary["model"]
    thumb = _Thumbnails(dict(thumbnails or {}), folder, input_size, max_pixels)
    report = HTMLReport(
        f"calibclust label: {summary['folder']}",
        f"{summary['files']:,} files · model {model['path']} ({model['method']}, {model['num_clusters']} clusters, "
        f"{'calibrated' if model['calibrated'] else 'NOT calibrated'}) · backend {model['backend']} · "
        f"engine {summary['engine']}",
    )
    for message in th.get("warnings", []):
        report.add_warning(message)
    if model.get("shortcut_warning"):
        report.add_warning(f"Warning from training: {model['shortcut_warning']}")
    report.add_table(
        [
            ("files", summary["files"]),
            ("accepted", counts["accepted"]),
            ("rejected (confidence below threshold)", counts["rejected"]),
            ("out of distribution", counts["ood"]),
            ("unreadable", counts["error"]),
            ("policy", policy_in_words(th)),
            ("confidence threshold (accept ≥)", _fmt(th["confidence_threshold"], 4)),
            ("OOD threshold (flag >)", _fmt(th["ood_threshold"], 4)),
            ("coverage of readable images", _fmt(th["coverage"])),
            ("estimated accuracy of accepted images", _fmt(th["estimated_accuracy"])),
        ],
        header=("", "value"),
        caption="Summary",
    )

    rows = collector.cluster_summary()
    report.add_heading("Cluster sizes")
    report.add_figure(
        plot_cluster_counts([r["name"] for r in rows], {d: [r[d] for r in rows] for d in ("accepted", "rejected", "ood")},
                            title="Images per cluster, by decision"),
        alt="cluster sizes",
    )

    report.add_heading("Confidence and OOD score")
    in_dist = ~(ood > th["ood_threshold"]) if th["ood_threshold"] is not None else np.ones(len(ood), bool)
    report.add_figure(
        plot_score_histograms({"in-distribution": conf[in_dist], "flagged OOD": conf[~in_dist]},
                              title="Confidence (max calibrated probability)", xlabel="confidence", bins=40,
                              value_range=(0.0, 1.0), threshold=th["confidence_threshold"],
                              threshold_label="accept ≥"),
        alt="confidence histogram",
    )
    report.add_figure(
        plot_score_histograms({"images": ood}, title=f"OOD score ({model['ood_score']}; higher = more out-of-distribution)",
                              xlabel="ood_score", bins=40, threshold=th["ood_threshold"], threshold_label="flag >"),
        alt="OOD score histogram",
    )

    choice = model.get("clusters_choice")
    if choice:
        add_k_choice_section(report, choice)

    if len(curve["coverage"]):
        report.add_heading("Estimated accuracy vs coverage")
        estimated = np.asarray(curve["estimated_accuracy"], float)
        low = float(np.nanmin(estimated)) if np.isfinite(estimated).any() else 0.0
        chart = Chart("Estimated accuracy (mean calibrated confidence) vs coverage",
                      "coverage (share of in-distribution images accepted, most confident first)",
                      "estimated accuracy", xlim=(0, 1.01), ylim=(min(low, 0.9) - 0.02, 1.005))
        chart.line(curve["coverage"], estimated, COLOR_GOOD, label="accept the most confident fraction")
        cov, acc = th.get("coverage_in_distribution"), th.get("estimated_accuracy")
        if cov is not None and acc is not None:
            chart.point(cov, acc, COLOR_BAD, label=f"this run: coverage {cov:.3f}, est. accuracy {acc:.3f}")
        fig = chart.render()
        report.add_figure(fig, alt="estimated accuracy vs coverage",
                          caption="Needs no labels: the estimate is only as good as the model's calibration.")

    def gallery(items: list[tuple[float, str]], caption: str, alt: str) -> None:
        report.add_thumbnails([thumb(p) for _, p in items], [caption.format(v) for v, _ in items], size=72,
                              alt=alt, titles=[p for _, p in items])

    report.add_heading("Clusters: accepted images")
    report.add_paragraph("Only images the run accepted; what it set aside is in the next section. "
                         "Hover over a thumbnail for its file.", css_class="meta")
    for c, row in enumerate(rows):
        most, least = collector.accepted_gallery(c)
        share = f"{row['accepted'] / row['total']:.0%}" if row["total"] else "–"
        mean = _fmt(row["mean_accepted_confidence"])
        report.add_heading(f"{row['name']} — {row['total']:,} images, {row['accepted']:,} accepted ({share}), "
                           f"mean confidence of the accepted {mean}", level=3)
        if not most:
            if not row["accepted"]:
                report.add_paragraph("no accepted images")
            continue
        report.add_paragraph("most confident accepted")
        gallery(most, "{:.3f}", f"{row['name']} most confident accepted")
        report.add_paragraph("least confident accepted")
        gallery(least, "{:.3f}", f"{row['name']} least confident accepted")

    ood_items, rejected_items = collector.set_aside()
    report.add_heading(f"Set aside: {counts['ood']:,} out of distribution, {counts['rejected']:,} rejected, "
                       f"{counts['error']:,} unreadable")
    report.add_paragraph("The images to look at by hand.", css_class="meta")
    if ood_items:
        report.add_heading(f"Out of distribution ({counts['ood']:,}), highest OOD score first", level=3)
        gallery(ood_items, "ood {:.3f}", "out of distribution")
    if rejected_items:
        report.add_heading(f"Rejected ({counts['rejected']:,}), lowest confidence first", level=3)
        gallery(rejected_items, "conf {:.3f}", "rejected")
    errors = summary.get("errors_first_100") or []
    if errors:
        report.add_heading(f"Unreadable ({counts['error']:,})", level=3)
        report.add_table([(e["path"], e["error"]) for e in errors[:20]], header=("file", "reason"),
                         caption=f"first {min(20, len(errors))}; every one is in the table's error column")
    report.write(path)
    return thumb.decoded_again
