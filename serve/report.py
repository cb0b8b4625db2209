"""``report.html`` of a labelling run: one self-contained file (figures and thumbnails embedded).

Shows cluster sizes by decision, confidence and OOD-score histograms with the thresholds used,
the label-free estimated-accuracy-vs-coverage curve with the run's operating point, and for each
cluster thumbnails of its most and least confident images. Built with the shared torch-free
helpers of :mod:`calibclust.report` (HTMLReport, figures on an Agg canvas, thumbnail grids).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from calibclust.io.images import ImageDecodeError, decode_image

DECISION_CODES = {"accepted": 0, "rejected": 1, "ood": 2, "error": 3}


class ReportCollector:
    """Streaming per-cluster counts and thumbnail candidates (bounded memory)."""

    def __init__(self, cluster_names: Sequence[str], thumbnails: int = 8):
        self.names = list(cluster_names)
        self.n_thumbs = int(thumbnails)
        self.counts = np.zeros((len(self.names), 4), np.int64)  # cluster × decision (no error column use)
        self.decision_counts = dict.fromkeys(DECISION_CODES, 0)
        # Per cluster: (confidence, path) candidates for most / least confident, trimmed per part.
        self._most: list[list[tuple[float, str]]] = [[] for _ in self.names]
        self._least: list[list[tuple[float, str]]] = [[] for _ in self.names]

    def add(self, part: dict[str, np.ndarray], decision: np.ndarray) -> None:
        cluster, conf, paths = part["cluster"], part["confidence"], part["path"]
        for name in DECISION_CODES:
            self.decision_counts[name] += int((decision == name).sum())
        ok = cluster >= 0
        codes = np.array([DECISION_CODES[d] for d in decision[ok]], np.int64)
        np.add.at(self.counts, (cluster[ok], codes), 1)
        if not self.n_thumbs:
            return
        for c in np.unique(cluster[ok]):
            idx = np.flatnonzero(cluster == c)
            order = idx[np.argsort(-conf[idx], kind="stable")]
            top = [(float(conf[i]), str(paths[i])) for i in order[: self.n_thumbs]]
            bottom = [(float(conf[i]), str(paths[i])) for i in order[::-1][: self.n_thumbs]]
            self._most[c] = sorted(self._most[c] + top, key=lambda t: -t[0])[: self.n_thumbs]
            self._least[c] = sorted(self._least[c] + bottom, key=lambda t: t[0])[: self.n_thumbs]

    def cluster_summary(self) -> list[dict[str, Any]]:
        return [
            {
                "cluster": c,
                "name": name,
                "accepted": int(self.counts[c, 0]),
                "rejected": int(self.counts[c, 1]),
                "ood": int(self.counts[c, 2]),
                "total": int(self.counts[c].sum()),
            }
            for c, name in enumerate(self.names)
        ]

    def thumbnails(self, c: int) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
        return self._most[c], self._least[c]


# --- the report --------------------------------------------------------------------------------------
def _thumbnail(path: Path, box: int = 96) -> np.ndarray:
    """The image scaled to fit ``box`` (aspect kept); a grey square if it cannot be read any more."""
    from PIL import Image

    try:
        img = Image.fromarray(decode_image(path, max_pixels=50_000_000))
    except (ImageDecodeError, OSError):
        return np.full((box, box, 3), 200, np.uint8)
    img.thumbnail((box, box))
    return np.asarray(img)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


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
) -> Path:
    from calibclust.report import HTMLReport, new_figure, plot_cluster_counts, plot_score_histograms

    th = summary["thresholds"]
    counts = summary["counts"]
    conf = np.asarray(confidence, np.float64)[readable]
    ood = np.asarray(ood_score, np.float64)[readable]
    model = summary["model"]
    report = HTMLReport(
        f"calibclust label: {summary['folder']}",
        f"{summary['files']:,} files · model {model['path']} ({model['method']}, {model['num_clusters']} clusters, "
        f"{'calibrated' if model['calibrated'] else 'NOT calibrated'}) · backend {model['backend']} · "
        f"engine {summary['engine']}",
    )
    for message in th.get("warnings", []):
        report.add_warning(message)
    report.add_table(
        [
            ("files", summary["files"]),
            ("accepted", counts["accepted"]),
            ("rejected (confidence below threshold)", counts["rejected"]),
            ("out of distribution", counts["ood"]),
            ("unreadable", counts["error"]),
            ("policy", f"{th['policy']} {_fmt(th['policy_value'])}"),
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

    if len(curve["coverage"]):
        report.add_heading("Estimated accuracy vs coverage")
        fig = new_figure(6.0, 3.8)
        ax = fig.subplots()
        ax.plot(curve["coverage"], curve["estimated_accuracy"], color="#0072B2", lw=1.8,
                label="accept the most confident fraction")
        cov, acc = th.get("coverage_in_distribution"), th.get("estimated_accuracy")
        if cov is not None and acc is not None:
            ax.plot([cov], [acc], "o", color="#D55E00", label=f"this run: coverage {cov:.3f}, est. accuracy {acc:.3f}")
        ax.set_xlim(0, 1.01)
        ax.set_xlabel("coverage (share of in-distribution images accepted, most confident first)")
        ax.set_ylabel("estimated accuracy")
        ax.set_title("Estimated accuracy (mean calibrated confidence) vs coverage")
        ax.legend(fontsize=8, loc="lower left")
        report.add_figure(fig, alt="estimated accuracy vs coverage",
                          caption="Needs no labels: the estimate is only as good as the model's calibration.")

    report.add_heading("Clusters: most and least confident images")
    for c, row in enumerate(rows):
        most, least = collector.thumbnails(c)
        if not most:
            continue
        report.add_heading(f"{row['name']} — {row['total']:,} images, {row['accepted']:,} accepted", level=3)
        report.add_paragraph("most confident")
        report.add_thumbnails([_thumbnail(Path(folder) / p) for _, p in most],
                              [f"{v:.3f}" for v, _ in most], size=72, alt=f"{row['name']} most confident")
        report.add_paragraph("least confident")
        report.add_thumbnails([_thumbnail(Path(folder) / p) for _, p in least],
                              [f"{v:.3f}" for v, _ in least], size=72, alt=f"{row['name']} least confident")

    errors = summary.get("errors_first_100") or []
    if errors:
        report.add_heading(f"Unreadable files ({counts['error']:,})")
        report.add_table([(e["path"], e["error"]) for e in errors[:20]], header=("file", "reason"),
                         caption=f"first {min(20, len(errors))}; every one is in the table's error column")
    return report.write(path)
