"""Self-contained HTML reports: charts embedded as SVG, figures and thumbnails as PNG, no external files.

Used by ``calibclust evaluate``, ``calibclust label``'s ``report.html`` and the quick start:
torch-free, numpy + Pillow (+ matplotlib for two figures) only.

Bar charts, histograms and curves are :mod:`calibclust.charts` SVG (no matplotlib import, which
alone costs ``label`` more than half a second). The reliability diagram and the confusion-matrix
heat map are drawn on ``matplotlib.figure.Figure`` objects attached to an explicit Agg canvas
(``FigureCanvasAgg``) instead of going through ``pyplot``: that is the Agg backend without
touching matplotlib's global backend or pyplot's figure registry, so it works on headless
servers, in threads, and inside a user's notebook without changing their backend.

Typical use::

    report = HTMLReport("Evaluation of predictions.csv")
    report.add_heading("Calibration")
    report.add_figure(plot_reliability_diagram(calibration), alt="reliability diagram")
    report.write("out/report.html")
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from calibclust.charts import COLOR_BAD, COLOR_GOOD, COLOR_NEUTRAL, PALETTE, Chart, SVGFigure, text_width

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from calibclust.metrics import CalibrationResult, RiskCoverage

DEFAULT_DPI = 100


# ----------------------------------------------------------------------------- HTML helpers


def escape(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes included, so the result is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def format_value(value: Any, digits: int = 4) -> str:
    """Numbers for tables: floats to ``digits`` significant places, NaN/None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "–"
        return f"{float(value):.{digits}g}"
    return str(value)


def html_table(
    rows: Sequence[Sequence[Any]],
    header: Sequence[str] | None = None,
    caption: str | None = None,
    digits: int = 4,
) -> str:
    """A plain ``<table>``; cells go through :func:`format_value` and are escaped."""
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{escape(caption)}</caption>")
    if header:
        parts.append("<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{escape(format_value(value, digits))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(data_uri: str, alt: str, width: int | None = None, css_class: str | None = None,
            title: str | None = None) -> str:
    """``<img>`` with alt text (screen readers, and what tests look for), an optional width and an
    optional title (shown on hover)."""
    attrs = [f'src="{data_uri}"', f'alt="{escape(alt)}"']
    if title:
        attrs.append(f'title="{escape(title)}"')
    if width:
        attrs.append(f'width="{int(width)}"')
    if css_class:
        attrs.append(f'class="{escape(css_class)}"')
    return "<img " + " ".join(attrs) + ">"


# ----------------------------------------------------------------------------- figures → PNG


def new_figure(width: float = 6.4, height: float = 4.8, dpi: int = DEFAULT_DPI) -> "Figure":
    """A matplotlib Figure bound to an Agg canvas (see the module docstring for why not pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_png(fig: "Figure", dpi: int | None = None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, facecolor="white")
    return buf.getvalue()


def figure_to_data_uri(fig: "Figure", dpi: int | None = None) -> str:
    return png_data_uri(figure_to_png(fig, dpi))


def array_to_png(image: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` / ``(H, W)`` uint8 array as PNG bytes."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"expected (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def plot_reliability_diagram(calibration: "CalibrationResult", title: str | None = None) -> "Figure":
    """Reliability diagram (Guo et al., 2017, Fig. 1): per confidence bin the accuracy (bars) against
    the mean confidence (the gap drawn in red); the diagonal is perfect calibration. ECE and MCE in the
    title; a lower panel shows how many samples fall in each bin."""
    n_bins = calibration.n_bins
    edges = np.arange(n_bins + 1) / n_bins
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    acc = np.array([np.nan if a is None else a for a in calibration.bin_accuracy], dtype=float)
    conf = np.array([np.nan if c is None else c for c in calibration.bin_confidence], dtype=float)
    count = np.asarray(calibration.bin_count)
    filled = count > 0

    fig = new_figure(5.6, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres[filled], acc[filled], width=width, color=COLOR_GOOD, edgecolor="white", label="accuracy")
    gap_low = np.minimum(acc, conf)[filled]
    gap = np.abs(acc - conf)[filled]
    top.bar(centres[filled], gap, bottom=gap_low, width=width, color=COLOR_BAD, alpha=0.35,
            edgecolor=COLOR_BAD, hatch="//", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "--", color=COLOR_NEUTRAL, lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    ece = calibration.ece
    heading = title or "Reliability diagram"
    top.set_title(f"{heading}\nECE = {100 * ece:.2f}%  MCE = {100 * calibration.mce:.2f}%  ({n_bins} bins)"
                  if np.isfinite(ece) else f"{heading}\nECE undefined (no samples)")
    bottom.bar(centres, count, width=width, color=COLOR_NEUTRAL, edgecolor="white")
    bottom.set_ylabel("samples")
    bottom.set_xlabel("confidence")
    return fig


def plot_score_histograms(
    groups: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str,
    bins: int = 20,
    value_range: tuple[float, float] | None = None,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    colors: Sequence[str] | None = None,
) -> SVGFigure:
    """Overlaid histograms of one score for several groups (e.g. correct vs wrong, in- vs out-of-
    distribution), with an optional vertical threshold line."""
    colors = list(colors or PALETTE)
    finite = [np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for v in groups.values()]
    if value_range is None:
        everything = np.concatenate(finite) if finite else np.zeros(0)
        if threshold is not None and np.isfinite(threshold):  # the threshold line stays in view
            everything = np.r_[everything, threshold]
        value_range = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
        if value_range[0] == value_range[1]:
            value_range = (value_range[0] - 0.5, value_range[1] + 0.5)
        margin = 0.02 * (value_range[1] - value_range[0])
        value_range = (value_range[0] - margin, value_range[1] + margin)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    counts = [np.histogram(v, bins=edges)[0] for v in finite]  # values outside value_range are left out
    top = max((int(c.max()) for c in counts if c.size), default=0)
    chart = Chart(title, xlabel, "images", xlim=value_range, ylim=(0, max(1.0, top * 1.08)))
    for i, (name, values, count) in enumerate(zip(groups, finite, counts)):
        color = colors[i % len(colors)]
        for left, right, n in zip(edges[:-1], edges[1:], count):
            if n:
                chart.rect(left, right, 0, n, color, opacity=0.45)
        # Outline (matplotlib's histtype="step"): down to zero at both ends.
        chart.line(np.repeat(edges, 2), np.r_[0, np.repeat(count, 2), 0], color, width=1.5)
        chart.legend(f"{name} (n={values.size:,})", color)
    if threshold is not None and np.isfinite(threshold):
        chart.vline(threshold, label=f"{threshold_label} = {threshold:.3g}")
    return chart.render()


def plot_confidence_histograms(confidence, correct, bins: int = 20, threshold: float | None = None) -> SVGFigure:
    """Confidence of correct vs wrong predictions: a calibrated model puts its errors at low confidence."""
    confidence = np.asarray(confidence, float)
    correct = np.asarray(correct, bool)
    return plot_score_histograms(
        {"correct": confidence[correct], "wrong": confidence[~correct]},
        title="Confidence of correct vs wrong predictions",
        xlabel="confidence",
        bins=bins,
        value_range=(0.0, 1.0),
        threshold=threshold,
    )


def plot_risk_coverage(curve: "RiskCoverage", title: str | None = None) -> SVGFigure:
    """Risk–coverage curve (Geifman & El-Yaniv, 2017; CDC paper Fig. 3) with its AURC, and the
    oracle curve that rejects all errors first (the best any confidence ordering could do)."""
    coverage = np.r_[0.0, np.asarray(curve.coverage, float)]
    risk = np.asarray(curve.risk, float)
    top = max(0.05, float(np.nanmax(risk)) * 1.1) if risk.size and np.isfinite(risk).any() else 1.0
    chart = Chart(title or "Risk–coverage curve", "coverage (share of images accepted, most confident first)",
                  "risk (error rate of accepted)", xlim=(0, 1), ylim=(0, top))
    if risk.size:
        # step=True holds each value until the next coverage: the k-th image's risk on (c_k-1, c_k].
        chart.line(coverage, np.r_[risk, risk[-1]], COLOR_GOOD, step=True, label=f"model (AURC = {curve.aurc:.4f})")
        total_risk = float(risk[-1])
        grid = np.linspace(1e-6, 1.0, 200)
        chart.line(grid, np.maximum(0.0, grid - (1.0 - total_risk)) / grid, COLOR_NEUTRAL, style="dot",
                   label="oracle (errors rejected first)")
        chart.hline(total_risk, COLOR_BAD, label=f"no rejection (risk = {total_risk:.3f})")
    return chart.render()


def plot_k_criteria(choice: dict) -> SVGFigure:
    """The ``--clusters auto`` criteria against K (:class:`calibclust.cluster.choose_k.KChoice`'s dict),
    each scaled to [0, 1] over the range so that they share one axis; the chosen K is marked."""
    ks = np.asarray(choice["ks"], float)
    chart = Chart(f"Choosing K without labels: chosen {choice['k']}, runner-up {choice['runner_up']}",
                  "K (number of clusters)", "criterion, each scaled to [0, 1] over the range",
                  xlim=(ks.min() - 0.5, ks.max() + 0.5), ylim=(-0.02, 1.1))
    for color, (name, values) in zip(PALETTE, choice["curves"].items()):
        v = np.asarray(values, float)
        span = float(np.ptp(v)) or 1.0
        chart.line(ks, (v - v.min()) / span, color, label=f"{name} (picks {choice['picks'][name]})")
    chart.vline(float(choice["k"]), COLOR_NEUTRAL, label=f"chosen K = {choice['k']}")
    return chart.render()


def add_k_choice_section(report: "HTMLReport", choice: dict) -> None:
    """The "How K was chosen" section of a model trained with ``--clusters auto`` (fit's report and
    label's): the choice in words and :func:`plot_k_criteria`."""
    report.add_heading("How K was chosen")
    report.add_paragraph(
        f"The model was trained with --clusters auto: K = {choice['k']} of {choice['ks'][0]}..{choice['ks'][-1]} "
        f"({choice['rule']}; runner-up {choice['runner_up']}), from the backbone's features of "
        f"{choice['n_points']} training images, without labels." + (f" {choice['message']}" if choice.get("message") else ""))
    report.add_figure(plot_k_criteria(choice), alt="criteria against K")


def plot_training_curves(history: Sequence[Mapping[str, Any]], title: str, series: Sequence[tuple[str, Any]],
                         ylabel: str, ylim: tuple[float, float] | None = None, x: str = "epoch") -> SVGFigure:
    """One chart of per-epoch (or per-``x``) values from a training log: ``series`` = (label,
    record -> value or None); records without a value are skipped."""
    epochs = [float(r[x]) for r in history]
    lines = []
    for label, get in series:
        xs, ys = [], []
        for e, r in zip(epochs, history):
            v = get(r)
            if v is not None and np.isfinite(v):
                xs.append(e)
                ys.append(float(v))
        if xs:
            lines.append((label, xs, ys))
    values = [y for _, _, ys in lines for y in ys] or [0.0, 1.0]
    if ylim is None:
        lo, hi = min(values), max(values)
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ylim = (lo - pad, hi + pad)
    chart = Chart(title, x, ylabel, xlim=(min(epochs, default=0.0), max(max(epochs, default=1.0), 1.0)), ylim=ylim)
    for i, (label, xs, ys) in enumerate(lines):
        color = PALETTE[i % len(PALETTE)]  # more series than colours (SPICE's 10 heads) still all drawn
        chart.line(xs, ys, color, label=label)
        if len(xs) == 1:
            chart.point(xs[0], ys[0], color)
    return chart.render()


def plot_confusion_matrix(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "Confusion matrix",
    xlabel: str = "cluster",
    ylabel: str = "class",
    annotate_max: int = 25,
) -> "Figure":
    """Counts as a heat map, annotated when the matrix is small enough to read.

    Pass the columns already ordered the way they should be read, e.g. clusters aligned to classes by
    Hungarian matching so that a perfect clustering is diagonal (see :func:`aligned_confusion`).
    """
    matrix = np.asarray(matrix)
    rows, cols = matrix.shape
    side = min(12.0, max(4.5, 0.45 * max(rows, cols) + 2.5))
    fig = new_figure(side + 1.0, side)
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="images")
    ax.set_xticks(range(cols), [str(c) for c in col_labels], rotation=90 if cols > 12 else 0, fontsize=8)
    ax.set_yticks(range(rows), [str(r) for r in row_labels], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if max(rows, cols) <= annotate_max and matrix.size:
        vmax = matrix.max() or 1
        for i in range(rows):
            for j in range(cols):
                if matrix[i, j]:
                    color = "white" if matrix[i, j] > 0.6 * vmax else "black"
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7, color=color)
    return fig


def aligned_confusion(
    y_true: np.ndarray, y_pred: np.ndarray, mapping: Mapping[int, int]
) -> tuple[np.ndarray, list[int], list[int]]:
    """Contingency matrix with clusters ordered by the class they are matched to.

    Returns ``(matrix, classes, clusters)``: row ``i`` is ``classes[i]``, column ``j`` is cluster
    ``clusters[j]``. Matched clusters come first in the order of their class, so a perfect
    clustering is diagonal; unmatched clusters (more clusters than classes) follow by id.
    """
    from calibclust.metrics import contingency_matrix

    matrix, classes, clusters = contingency_matrix(y_true, y_pred)
    class_pos = {int(c): i for i, c in enumerate(classes)}
    key = [(0, class_pos[mapping[int(c)]]) if int(c) in mapping and mapping[int(c)] in class_pos
           else (1, int(c)) for c in clusters]
    order = sorted(range(len(clusters)), key=lambda j: key[j])
    return matrix[:, order], [int(c) for c in classes], [int(clusters[j]) for j in order]


HORIZONTAL_BARS_FROM = 8
MAX_NAMED_BARS = 120
BAR_ROW_PX = 18  # one horizontal bar per row; more than the tick font (11 px), so names never touch
MAX_NAME_CHARS = 24


def plot_cluster_counts(
    names: Sequence[str],
    counts: Mapping[str, Sequence[int]] | Sequence[int],
    title: str = "Images per cluster",
    ylabel: str = "images",
) -> SVGFigure:
    """Bar chart of images per cluster; ``counts`` may map series names to counts, which are stacked
    (e.g. ``{"correct": ..., "wrong": ...}`` or ``{"accepted": ..., "rejected": ...}``). Past
    :data:`HORIZONTAL_BARS_FROM` clusters, or when a name is wider than its bar, the bars lie
    horizontally, one readable name per row (vertical bars' names overlap into one string from
    about ten clusters on); past :data:`MAX_NAMED_BARS` only every k-th row is named."""
    series = dict(counts) if isinstance(counts, Mapping) else {"images": counts}
    n = len(names)
    labels = [str(x) if len(str(x)) <= MAX_NAME_CHARS else str(x)[:MAX_NAME_CHARS - 1] + "…" for x in names]
    stacked = np.cumsum([np.asarray(v, float) for v in series.values()], axis=0) if series else np.zeros((1, n))
    top = max(1.0, float(stacked[-1].max()) * 1.05) if n else 1.0
    width = 720
    pitch = (width - 260) / max(n, 1)  # vertical bars' slot width, roughly, legend outside included
    horizontal = n > HORIZONTAL_BARS_FROM or max((text_width(t) for t in labels), default=0) > 0.9 * pitch
    positions = np.arange(n)
    if horizontal:
        name_every = -(-n // MAX_NAMED_BARS)
        rows = min(n, MAX_NAMED_BARS)
        chart = Chart(title, ylabel, "cluster", xlim=(0, top), ylim=(n - 0.5, -0.5),  # cluster 0 on top
                      width=width, height=int(max(260, BAR_ROW_PX * rows + 90)),
                      yticks=(positions[::name_every], labels[::name_every]), legend_outside=len(series) > 1)
    else:
        chart = Chart(title, "cluster", ylabel, xlim=(-0.5, n - 0.5), ylim=(0, top), width=width,
                      xticks=(positions, labels), legend_outside=len(series) > 1)
    base = np.zeros(n)
    for i, (label, values) in enumerate(series.items()):
        values = np.asarray(values, float)
        color = PALETTE[i % len(PALETTE)]
        for c in np.flatnonzero(values > 0):
            if horizontal:
                chart.rect(base[c], base[c] + values[c], c - 0.4, c + 0.4, color, stroke="#ffffff")
            else:
                chart.rect(c - 0.4, c + 0.4, base[c], base[c] + values[c], color, stroke="#ffffff")
        if len(series) > 1:
            chart.legend(label, color)
        base += values
    return chart.render()


# ----------------------------------------------------------------------------- thumbnails


def thumbnail_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    captions: Sequence[str] | None = None,
    size: int = 64,
    alt: str = "thumbnail",
    titles: Sequence[str] | None = None,
) -> str:
    """HTML grid of uint8 images (each ``(H, W, 3)``), each embedded as its own PNG and shown at
    ``size`` px wide with pixelated upscaling (small training images stay crisp). ``titles`` (e.g.
    file names) go into each image's ``title`` (shown on hover) and ``alt``."""
    for what, values in (("captions", captions), ("titles", titles)):
        if values is not None and len(values) != len(images):
            raise ValueError(f"{len(values)} {what} for {len(images)} images")
    cells = []
    for i, image in enumerate(images):
        caption = captions[i] if captions is not None else None
        title = titles[i] if titles is not None else None
        text = " ".join(part for part in (f"{alt}:", title, f"({caption})" if caption and title else caption) if part)
        tag = img_tag(png_data_uri(array_to_png(image)), text if (caption or title) else alt,
                      width=size, css_class="thumb", title=title)
        cap = f"<figcaption>{escape(caption)}</figcaption>" if caption is not None else ""
        cells.append(f"<figure>{tag}{cap}</figure>")
    return '<div class="thumbs">' + "".join(cells) + "</div>"


# ----------------------------------------------------------------------------- the document

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}td.num{text-align:right;
font-variant-numeric:tabular-nums}caption{text-align:left;font-weight:bold;padding:.3em 0}
figure.plot{margin:1em 0}figure.plot img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}.thumbs figure{margin:0;text-align:center;font-size:.75em}
img.thumb{image-rendering:pixelated;border:1px solid #ddd;display:block}
.warning{background:#fff4e5;border-left:4px solid #E69F00;padding:.5em 1em;margin:1em 0}
code{background:#f5f5f5;padding:0 .2em}
"""


class HTMLReport:
    """Build a one-file HTML report piece by piece; every image is embedded, nothing is fetched."""

    def __init__(self, title: str, subtitle: str | None = None):
        self.title = title
        self.subtitle = subtitle
        self._parts: list[str] = []

    def add_heading(self, text: str, level: int = 2) -> None:
        level = min(max(int(level), 2), 6)
        self._parts.append(f"<h{level}>{escape(text)}</h{level}>")

    def add_paragraph(self, text: str, css_class: str | None = None) -> None:
        cls = f' class="{escape(css_class)}"' if css_class else ""
        self._parts.append(f"<p{cls}>{escape(text)}</p>")

    def add_warning(self, text: str, items: Sequence[str] = ()) -> None:
        listed = "<ul>" + "".join(f"<li><code>{escape(i)}</code></li>" for i in items) + "</ul>" if items else ""
        self._parts.append(f'<div class="warning"><p>{escape(text)}</p>{listed}</div>')

    def add_table(self, rows, header=None, caption=None, digits: int = 4) -> None:
        self._parts.append(html_table(rows, header, caption, digits))

    def add_figure(self, fig: "Figure | SVGFigure", alt: str, caption: str | None = None,
                   width: int | None = None) -> None:
        """Embed a chart (:class:`~calibclust.charts.SVGFigure`, as SVG) or a matplotlib figure (as
        PNG); ``alt`` is its accessible name (tests search for it)."""
        uri = fig.data_uri() if isinstance(fig, SVGFigure) else figure_to_data_uri(fig)
        tag = img_tag(uri, alt, width)
        cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
        self._parts.append(f'<figure class="plot">{tag}{cap}</figure>')

    def add_thumbnails(self, images, captions=None, size: int = 64, alt: str = "thumbnail", titles=None) -> None:
        self._parts.append(thumbnail_grid(images, captions, size, alt, titles))

    def add_html(self, fragment: str) -> None:
        """Append trusted, already-escaped HTML."""
        self._parts.append(fragment)

    def render(self) -> str:
        sub = f'<p class="meta">{escape(self.subtitle)}</p>' if self.subtitle else ""
        body = "\n".join(self._parts)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(self.title)}</title><style>{_CSS}</style></head>\n"
            f"<body><h1>{escape(self.title)}</h1>{sub}\n{body}\n</body></html>\n"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename), so a reader never sees half a report."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        # A file name that is not UTF-8 (lone surrogates) becomes a character reference, not an error.
        tmp.write_text(self.render(), encoding="utf-8", errors="xmlcharrefreplace")
        os.replace(tmp, path)
        return path
