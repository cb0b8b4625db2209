"""What the demo shows for a result, as plain values Gradio displays: the decision badge (HTML) and
summary (Markdown) of one prediction under the sliders' thresholds, the batch table and its
summary, the page's CSS for the badge, and the nearest-neighbour upscaling that keeps small model
inputs crisp in the page.

No Gradio here (these are plain strings, lists and arrays); module level imports only the standard
library, numpy is imported on use.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from calibclust.serve.demo_session import DemoSession, Prediction

PREVIEW_SIDE = 224  # the model's input is shown upscaled (nearest) to about this size
BATCH_COLUMNS = ["path", "decision", "cluster", "cluster_name", "confidence", "ood_score", "error"]


def _upscale(image, side: int = PREVIEW_SIDE):
    """Nearest-neighbour upscaling by an integer factor, so small inputs stay crisp in the page."""
    import numpy as np

    h, w = image.shape[:2]
    k = max(1, side // max(h, w))
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1) if k > 1 else image


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


# The page's style for the classes badge_html writes (given to Gradio's launch).
CSS = """
.cc-badge .cc-sub{font-size:.75em;font-weight:400;opacity:.95;margin-top:.2em}
.cc-empty{color:#57606a;padding:.7em 1em;border:1px dashed #aaa;border-radius:.5em}
"""
