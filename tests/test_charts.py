"""calibclust.charts: SVG charts drawn without matplotlib (ticks, limits, legend placement, escaping)."""

from __future__ import annotations

import re
from xml.etree import ElementTree

import numpy as np
import pytest

from calibclust.charts import Chart, format_tick, nice_ticks


@pytest.mark.parametrize("lo,hi", [(0, 1), (0, 257), (0.08, 0.65), (-3.2, 7.9), (0, 1.005), (1e-4, 3e-4)])
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi):
    ticks, step = nice_ticks(lo, hi)
    assert 3 <= len(ticks) <= 12, ticks
    assert ticks[0] >= lo - 1e-12 and ticks[-1] <= hi + 1e-12 and ticks[0] - step < lo <= ticks[0] + 1e-12
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert round(mantissa, 6) in (1, 2, 2.5, 5), step
    labels = [format_tick(t, step) for t in ticks]
    assert len(set(labels)) == len(labels), f"ticks {ticks} print as duplicates {labels}"


def _legend_x(svg: str) -> float:
    return float(re.search(r'<g class="legend"><rect x="([\d.]+)"', svg).group(1))


def test_inside_legend_goes_where_the_data_is_not():
    """Bars on the left → legend top right; bars on the right → legend top left (matplotlib's "best")."""
    for bars, expect_right in (((0.0, 0.4), True), ((0.6, 1.0), False)):
        chart = Chart("t", "x", "y", xlim=(0, 1), ylim=(0, 10))
        for left in np.arange(*bars, 0.05):
            chart.rect(left, left + 0.05, 0, 9.5, "#0072B2")
        chart.legend("a series with a long name", "#0072B2")
        svg = chart.render().svg
        assert (_legend_x(svg) > 300) == expect_right, (bars, _legend_x(svg))


def test_svg_is_well_formed_and_escapes_text():
    chart = Chart('a <"title"> & more', "x & y", "<y>", xlim=(0, 1), ylim=(1, 0))  # reversed y axis
    chart.line([0, 0.5, 1], [0, np.nan, 1], "#000000", label="a & b")
    chart.point(0.5, 0.5, "#D55E00", label="<point>")
    figure = chart.render()
    root = ElementTree.fromstring(figure.svg)
    texts = ["".join(e.itertext()) for e in root.iter() if e.tag.endswith("text")]
    assert 'a <"title"> & more' in texts and "a & b" in texts and "<point>" in texts
    # y reversed: data y = 0 is drawn at the top of the plot area (smaller screen y) than y = 1.
    points = re.search(r'<polyline points="([^"]+)"', figure.svg).group(1).split()
    assert len(points) == 2, "the NaN point is dropped"
    (_, y0), (_, y1) = (map(float, p.split(",")) for p in points)
    assert y0 < y1
    assert figure.data_uri().startswith("data:image/svg+xml;base64,")


@pytest.mark.parametrize("lo,hi", [(0, 15), (0, 1.5), (0, 150), (0, 0.3)])
def test_tick_labels_read_back_as_their_values(lo, hi):
    ticks, step = nice_ticks(lo, hi)
    for tick in ticks:
        assert float(format_tick(tick, step).replace(",", "")) == pytest.approx(tick, abs=1e-9), (tick, step)


def test_histogram_keeps_its_threshold_line_in_view():
    """All scores below a threshold (a clean folder): the x range widens to show the line."""
    from calibclust.report import plot_score_histograms

    svg = plot_score_histograms({"images": np.linspace(0.1, 0.2, 50)}, "t", "x", threshold=0.6).svg
    dashed = re.findall(r'<polyline points="([\d.]+),[\d.]+ ([\d.]+),[\d.]+"[^>]*stroke-dasharray', svg)
    assert dashed and 0 < float(dashed[0][0]) < 600, dashed


def test_risk_coverage_steps_follow_the_risk_of_each_coverage():
    """4 images, errors on the two most confident: risk 1, 1, 2/3, 1/2 over coverage quarters; the
    drawn step is the risk of each quarter, not the previous one."""
    from calibclust.metrics import risk_coverage
    from calibclust.report import plot_risk_coverage

    curve = risk_coverage(np.array([0.9, 0.8, 0.7, 0.6]), np.array([False, False, True, True]))
    svg = plot_risk_coverage(curve).svg
    points = [tuple(map(float, p.split(","))) for p in re.search(r'<polyline points="([^"]+)"', svg).group(1).split()]
    ys = sorted({y for _, y in points})
    assert len(ys) == 3, points  # risks 1, 2/3 and 1/2 → three heights
    # The last segment (coverage 0.75 → 1) is drawn at risk 1/2: the lowest line, i.e. the largest y.
    assert points[-1][1] == points[-2][1] == max(ys)
