"""``report.html`` of a labelling run: one self-contained file (figures and thumbnails embedded).

Shows cluster sizes by decision, confidence and OOD-score histograms with the thresholds used,
the label-free estimated-accuracy-vs-coverage curve with the run's operating point, and for each
cluster thumbnails of its most and least confident images. matplotlib (Agg) + Pillow; no torch.

The small HTML/figure helpers here (figure → base64 PNG, thumbnail grid) are local because the
shared ``calibclust/report.py`` helpers were not on main when this was written; switch to them
once they are.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from calibclust.io.images import ImageDecodeError, decode_image
from calibclust.serve.resume import atomic_write_text

DECISION_CODES = {"accepted": 0, "rejected": 1, "ood": 2, "error": 3}
DECISION_COLOURS = {"accepted": "#2ca02c", "rejected": "#ff7f0e", "ood": "#9467bd", "error": "#d62728"}


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


# --- small HTML helpers ------------------------------------------------------------------------------
def figure_to_img_tag(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def thumbnail_tag(path: str | os.PathLike, caption: str, box: int = 96) -> str:
    from PIL import Image

    try:
        img = Image.fromarray(decode_image(path, max_pixels=50_000_000))
        img.thumbnail((box, box))
        if max(img.size) < box // 2:  # upscale tiny images (e.g. 32×32) so they can be seen
            scale = box // max(img.size)
            img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        inner = f'<img src="{src}" alt="{html.escape(str(path))}">'
    except (ImageDecodeError, OSError):
        inner = '<div class="missing">unreadable</div>'
    return (f'<figure title="{html.escape(str(path))}">{inner}<figcaption>{html.escape(caption)}'
            f"</figcaption></figure>")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# --- the report --------------------------------------------------------------------------------------
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
    plt = _plt()
    th = summary["thresholds"]
    conf = np.asarray(confidence, np.float64)[readable]
    ood = np.asarray(ood_score, np.float64)[readable]
    sections = []

    # Cluster sizes, stacked by decision.
    rows = collector.cluster_summary()
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rows) + 2), 3.2))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for name in ("accepted", "rejected", "ood"):
        values = np.array([r[name] for r in rows], float)
        ax.bar(x, values, bottom=bottom, color=DECISION_COLOURS[name], label=name)
        bottom += values
    ax.set_xticks(x, [r["name"] for r in rows], rotation=45 if len(rows) > 8 else 0, ha="right" if len(rows) > 8 else "center")
    ax.set_ylabel("images")
    ax.set_title("Cluster sizes by decision")
    ax.legend(fontsize=8)
    sections.append(("Cluster sizes", figure_to_img_tag(fig, "cluster sizes")))

    # Confidence and OOD histograms with the thresholds.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    bins = np.linspace(0, 1, 41)
    axes[0].hist(conf, bins=bins, color="#1f77b4")
    if math.isfinite(th["confidence_threshold"] or math.inf):
        axes[0].axvline(th["confidence_threshold"], color="k", ls="--", label=f"threshold {th['confidence_threshold']:.3f}")
        axes[0].legend(fontsize=8)
    axes[0].set_xlabel("confidence (max calibrated probability)")
    axes[0].set_ylabel("images")
    axes[0].set_title("Confidence")
    finite = ood[np.isfinite(ood)]
    axes[1].hist(finite, bins=40, color="#9467bd")
    if th["ood_threshold"] is not None:
        axes[1].axvline(th["ood_threshold"], color="k", ls="--", label=f"threshold {th['ood_threshold']:.3f}")
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel(f"OOD score ({summary['model']['ood_score']}; higher = more out-of-distribution)")
    axes[1].set_title("OOD score")
    sections.append(("Confidence and OOD score", figure_to_img_tag(fig, "histograms")))

    # Estimated accuracy vs coverage (label-free: mean confidence of the accepted set).
    if len(curve["coverage"]):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(curve["coverage"], curve["estimated_accuracy"], color="#1f77b4")
        cov, acc = th.get("coverage_in_distribution"), th.get("estimated_accuracy")
        if cov is not None and acc is not None:
            ax.plot([cov], [acc], "o", color="#d62728", label=f"this run: coverage {cov:.3f}, est. acc {acc:.3f}")
            ax.legend(fontsize=8, loc="lower left")
        ax.set_xlabel("coverage (fraction of in-distribution images accepted, most confident first)")
        ax.set_ylabel("estimated accuracy")
        ax.set_xlim(0, 1.01)
        ax.set_title("Estimated accuracy vs coverage")
        sections.append(("Estimated accuracy vs coverage", figure_to_img_tag(fig, "accuracy coverage")))

    # Thumbnails per cluster.
    grids = []
    for c, row in enumerate(rows):
        most, least = collector.thumbnails(c)
        if not most:
            continue
        top = "".join(thumbnail_tag(Path(folder) / p, f"{v:.3f}") for v, p in most)
        low = "".join(thumbnail_tag(Path(folder) / p, f"{v:.3f}") for v, p in least)
        grids.append(
            f"<h3>{html.escape(row['name'])} <small>({row['total']} images, {row['accepted']} accepted)</small></h3>"
            f'<div class="label">most confident</div><div class="grid">{top}</div>'
            f'<div class="label">least confident</div><div class="grid">{low}</div>'
        )
    if grids:
        sections.append(("Clusters: most and least confident images", "".join(grids)))

    counts = summary["counts"]
    facts = [
        ("files", summary["files"]),
        ("accepted", counts["accepted"]),
        ("rejected (low confidence)", counts["rejected"]),
        ("out of distribution", counts["ood"]),
        ("unreadable", counts["error"]),
        ("policy", f"{th['policy']} {_fmt(th['policy_value'])}"),
        ("confidence threshold", _fmt(th["confidence_threshold"], 4)),
        ("OOD threshold", _fmt(th["ood_threshold"], 4)),
        ("coverage (of readable)", _fmt(th["coverage"])),
        ("estimated accuracy of accepted", _fmt(th["estimated_accuracy"])),
        ("model", f"{summary['model']['method']}, {summary['model']['num_clusters']} clusters, "
                  f"{'calibrated' if summary['model']['calibrated'] else 'NOT calibrated'}"),
        ("backend / engine", f"{summary['model']['backend']} / {summary['engine']}"),
    ]
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    warn = "".join(f'<p class="warn">⚠ {html.escape(w)}</p>' for w in th.get("warnings", []))
    errors = summary.get("errors_first_100") or []
    err_html = ""
    if errors:
        err_rows = "".join(f"<tr><td>{html.escape(e['path'])}</td><td>{html.escape(e['error'])}</td></tr>" for e in errors[:20])
        err_html = f"<h2>Unreadable files (first {min(20, len(errors))})</h2><table>{err_rows}</table>"
    body = "".join(f"<h2>{html.escape(t)}</h2>{content}" for t, content in sections)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>calibclust label report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
th,td{{text-align:left;padding:2px 10px;border-bottom:1px solid #ddd;font-size:14px}}
.grid{{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:8px}} figure{{margin:0;text-align:center}}
figcaption{{font-size:11px;color:#555}} .label{{font-size:12px;color:#333;margin-top:4px}}
.warn{{color:#a15c00;font-weight:bold}} .missing{{width:96px;height:96px;background:#eee;font-size:11px}}
</style></head><body>
<h1>calibclust label — {html.escape(str(summary['folder']))}</h1>
{warn}<table>{fact_rows}</table>
{body}
{err_html}
<p style="font-size:12px;color:#777">Estimated accuracy is the mean calibrated confidence of the accepted
images; it needs no labels and is only as good as the model's calibration.</p>
</body></html>
"""
    atomic_write_text(path, doc)
    return path
