"""Charts drawn straight to SVG (bars, histograms, lines): milliseconds, no matplotlib.

Why not matplotlib for these: ``calibclust label`` writes its report after every run, and
matplotlib's import (about 0.65 s) plus Agg rendering (about 0.2 s a figure) cost as much as
labelling 120 camera-size JPEGs on two cores. Plain SVG needs no import, is crisp at any zoom
and is a few kB. :mod:`calibclust.report` draws its bar charts, histograms and curves with
:class:`Chart`; the reliability diagram and the confusion-matrix heat map stay on matplotlib.

Layout needs text widths before any renderer exists; :func:`text_width` estimates them from an
average sans-serif glyph width (generous, so estimated boxes contain the real ones) and the
layout keeps labels apart by that estimate.

Typical use::

    chart = Chart("Scores", xlabel="score", ylabel="images", xlim=(0, 1), ylim=(0, 40))
    chart.rect(0.0, 0.1, 0, 12, COLOR_GOOD)
    chart.vline(0.5, dash=True, label="threshold = 0.5")
    figure = chart.render()          # SVGFigure; figure.data_uri() goes into an <img>
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Sequence
from xml.sax.saxutils import escape as _xml_escape

import numpy as np

# Colour-blind-safe palette (Okabe & Ito): "good" blue, "bad" vermillion, then the rest.
COLOR_GOOD = "#0072B2"
COLOR_BAD = "#D55E00"
COLOR_NEUTRAL = "#555555"
PALETTE = (COLOR_GOOD, COLOR_BAD, "#009E73", "#E69F00", "#CC79A7", COLOR_NEUTRAL)

FONT_PX = 12
TICK_FONT_PX = 11
# Average advance of DejaVu Sans / Helvetica glyphs is about 0.55 em for lowercase and digits;
# 0.62 errs wide so that two labels the layout keeps apart never touch on screen.
CHAR_EM = 0.62
FONT_FAMILY = "DejaVu Sans, Helvetica, Arial, sans-serif"


def text_width(text: str, size: float = TICK_FONT_PX) -> float:
    """Estimated rendered width of ``text`` in px (see the module docstring)."""
    return len(text) * size * CHAR_EM


def _esc(value: object) -> str:
    return _xml_escape(str(value), {'"': "&quot;"})


def nice_ticks(lo: float, hi: float, target: int = 6) -> tuple[np.ndarray, float]:
    """Round tick positions (1, 2, 2.5 or 5 × 10^k apart) covering [lo, hi], and their step."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        lo, hi = (lo, lo + 1.0) if np.isfinite(lo) else (0.0, 1.0)
    raw = (hi - lo) / max(1, target)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = np.arange(first, hi + step * 1e-6, step)
    return ticks, step


def format_tick(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs (2.5 needs one more than 2 or 5)."""
    exponent = math.floor(math.log10(step) + 1e-9)
    decimals = max(0, -exponent + (1 if round(step / 10.0 ** exponent, 6) == 2.5 else 0))
    text = f"{value:,.{decimals}f}"
    return "0" if text.strip("-0.,") == "" else text


@dataclass(frozen=True)
class SVGFigure:
    """A finished chart: SVG source and its size in px."""

    svg: str
    width: int
    height: int

    def data_uri(self) -> str:
        return "data:image/svg+xml;base64," + base64.b64encode(self.svg.encode("utf-8")).decode("ascii")


class Chart:
    """One plot area with linear axes, a title, axis labels and a legend.

    Limits are fixed up front, so every element is placed as it is added. A reversed limit pair
    (``ylim=(n - 0.5, -0.5)``) flips the axis, e.g. bar 0 on top. ``xticks`` / ``yticks`` given as
    (positions, labels) replace the numeric ticks of that axis (categorical axes)."""

    def __init__(
        self,
        title: str,
        xlabel: str,
        ylabel: str,
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        width: int = 600,
        height: int = 380,
        xticks: tuple[Sequence[float], Sequence[str]] | None = None,
        yticks: tuple[Sequence[float], Sequence[str]] | None = None,
        legend_outside: bool = False,
    ):
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.xlim = self._limits(xlim)
        self.ylim = self._limits(ylim)
        self.width, self.height = int(width), int(height)
        self.xticks = self._ticks(xticks, self.xlim)
        self.yticks = self._ticks(yticks, self.ylim)
        self.legend_outside = legend_outside
        self._elements: list = []
        self._footprints: list = []  # screen-space boxes and points, to keep an inside legend off the data
        self._legend: list[tuple[str, str, str]] = []  # (label, colour, "box" | "line" | "dash" | "dot" | "point")
        widest_ytick = max((text_width(t) for _, t in self.yticks), default=0.0)
        self.left = 22 + FONT_PX + widest_ytick
        self.top = 14 + FONT_PX * 1.6
        self.bottom_margin = 18 + TICK_FONT_PX + FONT_PX * 1.6
        self.right_margin = 16.0

    @staticmethod
    def _limits(lim: tuple[float, float]) -> tuple[float, float]:
        lo, hi = (float(v) for v in lim)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return 0.0, 1.0
        return (lo, lo + 1.0) if lo == hi else (lo, hi)

    @staticmethod
    def _ticks(given, lim) -> list[tuple[float, str]]:
        if given is not None:
            positions, labels = given
            return [(float(p), str(t)) for p, t in zip(positions, labels)]
        lo, hi = sorted(lim)
        ticks, step = nice_ticks(lo, hi)
        return [(float(t), format_tick(t, step)) for t in ticks]

    # ---------------------------------------------------------------- coordinates

    def _plot_right(self) -> float:
        legend = self._legend_width() + 12 if self.legend_outside and self._legend else 0.0
        return self.width - self.right_margin - legend

    def _sx(self, x: float) -> float:
        x0, x1 = self.xlim
        return self.left + (float(x) - x0) / (x1 - x0) * (self._plot_right() - self.left)

    def _sy(self, y: float) -> float:
        y0, y1 = self.ylim
        bottom = self.height - self.bottom_margin
        return bottom - (float(y) - y0) / (y1 - y0) * (bottom - self.top)

    # ---------------------------------------------------------------- elements (data coordinates)
    # Elements are stored as callables so the plot area's right edge (which depends on the legend,
    # known only once every label is in) is resolved at render time.

    def rect(self, x0: float, x1: float, y0: float, y1: float, color: str, opacity: float = 1.0,
             label: str | None = None, stroke: str | None = None) -> None:
        def draw() -> str:
            xa, xb = sorted((self._sx(x0), self._sx(x1)))
            ya, yb = sorted((self._sy(y0), self._sy(y1)))
            edge = f' stroke="{stroke}" stroke-width="0.8"' if stroke else ""
            return (f'<rect x="{xa:.2f}" y="{ya:.2f}" width="{xb - xa:.2f}" height="{yb - ya:.2f}" '
                    f'fill="{color}" fill-opacity="{opacity:g}"{edge}/>')
        self._elements.append(draw)
        self._footprints.append(lambda: ("box", (self._sx(x0), self._sx(x1), self._sy(y0), self._sy(y1))))
        if label is not None:
            self._legend.append((label, color, "box"))

    def line(self, xs: Sequence[float], ys: Sequence[float], color: str, width: float = 1.8,
             style: str = "line", label: str | None = None, step: bool = False) -> None:
        """A polyline; ``style`` is "line", "dash" or "dot"; ``step`` draws a step curve that holds
        each y until the next x (matplotlib's ``where="post"``). Non-finite points are dropped."""
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        keep = np.isfinite(xs) & np.isfinite(ys)
        xs, ys = xs[keep], ys[keep]
        if step and xs.size > 1:
            xs, ys = np.repeat(xs, 2)[1:], np.repeat(ys, 2)[:-1]
        dash = {"line": "", "dash": ' stroke-dasharray="6 4"', "dot": ' stroke-dasharray="2 3"'}[style]

        def draw() -> str:
            points = " ".join(f"{self._sx(x):.2f},{self._sy(y):.2f}" for x, y in zip(xs, ys))
            return (f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="{width:g}"'
                    f'{dash} stroke-linejoin="round"/>')
        if xs.size:
            self._elements.append(draw)
            self._footprints.append(lambda: ("line", [(self._sx(x), self._sy(y)) for x, y in zip(xs, ys)]))
        if label is not None:
            self._legend.append((label, color, style))

    def vline(self, x: float, color: str = "#000000", style: str = "dash", label: str | None = None) -> None:
        self.line([x, x], list(self.ylim), color, 1.2, style, label)

    def hline(self, y: float, color: str = "#000000", style: str = "dash", label: str | None = None) -> None:
        self.line(list(self.xlim), [y, y], color, 1.2, style, label)

    def point(self, x: float, y: float, color: str, label: str | None = None) -> None:
        self._elements.append(lambda: f'<circle cx="{self._sx(x):.2f}" cy="{self._sy(y):.2f}" r="4.5" fill="{color}"/>')
        self._footprints.append(lambda: ("line", [(self._sx(x), self._sy(y))]))
        if label is not None:
            self._legend.append((label, color, "point"))

    def legend(self, label: str, color: str, kind: str = "box") -> None:
        """A legend entry without an element (e.g. one entry for many bars of one series)."""
        self._legend.append((label, color, kind))

    # ---------------------------------------------------------------- rendering

    def _legend_width(self) -> float:
        return 34 + max((text_width(label, TICK_FONT_PX) for label, _, _ in self._legend), default=0.0)

    def _inside_legend_corner(self, box_w: float, box_h: float) -> tuple[float, float]:
        """The plot-area corner where the legend covers the least data (what matplotlib's
        ``loc="best"`` does): area of bars under it, plus lines and points under it, weighted."""
        right, bottom = self._plot_right(), self.height - self.bottom_margin
        corners = [(self.left + 8, self.top + 8), (right - 8 - box_w, self.top + 8),
                   (right - 8 - box_w, bottom - 8 - box_h), (self.left + 8, bottom - 8 - box_h)]
        footprints = [f() for f in self._footprints]
        boxes = np.array([[*sorted(shape[:2]), *sorted(shape[2:])] for kind, shape in footprints if kind == "box"]
                         ).reshape(-1, 4)
        # Polylines sampled densely enough that a line crossing the legend counts.
        t = np.linspace(0.0, 1.0, 24)[:, None]
        samples = [np.zeros((0, 2))]
        for kind, shape in footprints:
            if kind != "box":
                p = np.asarray(shape, float).reshape(-1, 2)
                a, b = (p[:-1], p[1:]) if len(p) > 1 else (p, p)
                samples.append((a[None] + t[..., None] * (b - a)[None]).reshape(-1, 2))
        points = np.concatenate(samples)

        def covered(x: float, y: float) -> float:
            w = np.clip(np.minimum(boxes[:, 1], x + box_w) - np.maximum(boxes[:, 0], x), 0, None)
            h = np.clip(np.minimum(boxes[:, 3], y + box_h) - np.maximum(boxes[:, 2], y), 0, None)
            inside = ((points[:, 0] >= x) & (points[:, 0] <= x + box_w)
                      & (points[:, 1] >= y) & (points[:, 1] <= y + box_h))
            return float((w * h).sum()) + 40.0 * float(inside.sum())

        return min(corners, key=lambda corner: covered(*corner))  # ties keep the first: top left

    def _legend_svg(self) -> str:
        if not self._legend:
            return ""
        pitch = TICK_FONT_PX + 7
        box_w, box_h = self._legend_width(), 8 + pitch * len(self._legend)
        if self.legend_outside:
            x, y = self._plot_right() + 12, self.top
        else:
            x, y = self._inside_legend_corner(box_w, box_h)
        parts = [f'<g class="legend"><rect x="{x:.1f}" y="{y:.1f}" width="{box_w:.1f}" height="{box_h:.1f}" '
                 'fill="#ffffff" fill-opacity="0.85" stroke="#cccccc"/>']
        for i, (label, color, kind) in enumerate(self._legend):
            cy = y + 4 + pitch * (i + 0.5)
            if kind == "box":
                parts.append(f'<rect x="{x + 6:.1f}" y="{cy - 5:.1f}" width="18" height="10" fill="{color}" '
                             'fill-opacity="0.7"/>')
            elif kind == "point":
                parts.append(f'<circle cx="{x + 15:.1f}" cy="{cy:.1f}" r="4" fill="{color}"/>')
            else:
                dash = {"line": "", "dash": ' stroke-dasharray="6 4"', "dot": ' stroke-dasharray="2 3"'}[kind]
                parts.append(f'<line x1="{x + 4:.1f}" x2="{x + 26:.1f}" y1="{cy:.1f}" y2="{cy:.1f}" '
                             f'stroke="{color}" stroke-width="1.8"{dash}/>')
            parts.append(f'<text class="legend" x="{x + 30:.1f}" y="{cy + 4:.1f}" font-size="{TICK_FONT_PX}">'
                         f'{_esc(label)}</text>')
        parts.append("</g>")
        return "".join(parts)

    def render(self) -> SVGFigure:
        right, bottom = self._plot_right(), self.height - self.bottom_margin
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
               f'viewBox="0 0 {self.width} {self.height}" font-family="{FONT_FAMILY}" fill="#222222">',
               f'<rect width="{self.width}" height="{self.height}" fill="#ffffff"/>']
        for x, text in self.xticks:
            sx = self._sx(x)
            if self.left - 0.5 <= sx <= right + 0.5:
                out.append(f'<line x1="{sx:.2f}" x2="{sx:.2f}" y1="{bottom}" y2="{bottom + 4}" stroke="#444"/>')
                out.append(f'<text class="xtick" x="{sx:.2f}" y="{bottom + 6 + TICK_FONT_PX}" '
                           f'font-size="{TICK_FONT_PX}" text-anchor="middle">{_esc(text)}</text>')
        for y, text in self.yticks:
            sy = self._sy(y)
            if self.top - 0.5 <= sy <= bottom + 0.5:
                out.append(f'<line x1="{self.left - 4:.2f}" x2="{self.left:.2f}" y1="{sy:.2f}" y2="{sy:.2f}" '
                           'stroke="#444"/>')
                out.append(f'<text class="ytick" x="{self.left - 6:.2f}" y="{sy + TICK_FONT_PX * 0.35:.2f}" '
                           f'font-size="{TICK_FONT_PX}" text-anchor="end">{_esc(text)}</text>')
        out.append(f'<svg x="{self.left:.2f}" y="{self.top:.2f}" width="{right - self.left:.2f}" '
                   f'height="{bottom - self.top:.2f}" overflow="hidden">'
                   f'<g transform="translate({-self.left:.2f},{-self.top:.2f})">')
        out.extend(draw() for draw in self._elements)
        out.append("</g></svg>")
        out.append(f'<rect x="{self.left:.2f}" y="{self.top:.2f}" width="{right - self.left:.2f}" '
                   f'height="{bottom - self.top:.2f}" fill="none" stroke="#444"/>')
        out.append(f'<text x="{(self.left + right) / 2:.1f}" y="{FONT_PX + 8}" font-size="{FONT_PX + 1}" '
                   f'text-anchor="middle" font-weight="bold">{_esc(self.title)}</text>')
        out.append(f'<text x="{(self.left + right) / 2:.1f}" y="{self.height - 8}" font-size="{FONT_PX}" '
                   f'text-anchor="middle">{_esc(self.xlabel)}</text>')
        mid = (self.top + bottom) / 2
        out.append(f'<text x="{FONT_PX + 4}" y="{mid:.1f}" font-size="{FONT_PX}" text-anchor="middle" '
                   f'transform="rotate(-90 {FONT_PX + 4} {mid:.1f})">{_esc(self.ylabel)}</text>')
        out.append(self._legend_svg())
        out.append("</svg>")
        return SVGFigure("".join(out), self.width, self.height)
