"""``calibclust evaluate``: score a predictions table against known labels.

Reads the predictions table that ``calibclust predict`` / ``calibclust label`` write
(:mod:`calibclust.io.predictions`), matches every row to a ground-truth label, and writes
``metrics.json`` plus a self-contained ``report.html`` (:mod:`calibclust.report`).

Rules, in the order they are applied to each row (every row lands in exactly one bucket and
every bucket is counted in ``metrics.json`` and the report — nothing is dropped silently):

1. **invalid** – the model gave no prediction: ``cluster`` is -1, ``decision`` is ``error``,
   ``error`` is non-empty, or ``confidence`` is blank. Excluded from all metrics.
2. **unmatched** – the row's path has no ground truth. Paths are matched (a) as written, after
   normalisation (``./a/../b.png`` → ``b.png``), which for a truth folder means relative to that
   folder; (b) as an absolute path (relative paths resolved against the working directory);
   (c) after resolving symlinks.
3. **ood** – the ground-truth label is ``ood`` or ``_ood`` (any case): an out-of-distribution
   image. These have no class, so they are excluded from the clustering metrics and used, with
   the in-distribution rows, for the OOD metrics when the table has an ``ood_score`` column.
   In a truth folder this is a class sub-folder named ``_ood`` (it may hold sub-folders).
4. **evaluated** – everything else: ACC/NMI/ARI, calibration (ECE/MCE, reliability diagram) and
   failure rejection (AUROC/AURC/FPR95 of confidence), correctness judged after Hungarian
   matching of clusters to classes (:func:`calibclust.metrics.clustering_report`).

Ground truth is either a folder in ImageFolder layout (``root/<class>/<file>``, read with
:func:`calibclust.io.images.list_image_folder`) or a CSV file with columns ``path,label``
(labels are class names: any strings). Relative CSV paths are also resolved against the CSV's
own folder and against the working directory for absolute matching.

This module imports only the standard library at import time (the CLI loads it for ``--help``);
numpy, metrics and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibclust.errors import CalibclustError, InputError
from calibclust.io.files import write_json_atomic

OOD_LABELS = frozenset({"ood", "_ood"})
MAX_EXAMPLES = 20  # paths listed per problem kind in metrics.json / report.html


class EvaluateError(CalibclustError):
    """Ground truth or predictions that cannot be evaluated (missing file or column, no overlap)."""


class GroundTruthError(EvaluateError):
    pass


# ----------------------------------------------------------------------------- ground truth


def _norm(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


def _abs(path: str | os.PathLike) -> str:
    return _norm(os.path.abspath(path))


@dataclass
class GroundTruth:
    """Labels keyed by every spelling of each path we accept (relative, absolute, resolved)."""

    source: Path
    kind: str  # "folder" | "csv"
    labels: dict[str, str]
    n_images: int

    def lookup(self, path: str) -> str | None:
        if not path:
            return None
        # cheapest spelling first; abspath/realpath only for the rows that need them
        label = self.labels.get(_norm(path))
        if label is None:
            label = self.labels.get(_abs(path))
        if label is None:
            label = self.labels.get(_norm(os.path.realpath(path)))
        return label


def load_ground_truth(truth: str | os.PathLike) -> GroundTruth:
    """Ground truth from an ImageFolder-layout folder or a ``path,label`` CSV (see module docstring)."""
    source = Path(truth)
    if source.is_dir():
        return _truth_from_folder(source)
    if source.is_file():
        return _truth_from_csv(source)
    raise GroundTruthError(
        f"ground truth not found: {source} (expected an ImageFolder-layout folder root/<class>/<image> "
        "or a CSV file with columns path,label)"
    )


def _truth_from_folder(root: Path) -> GroundTruth:
    from calibclust.io.images import list_image_folder

    try:
        listing = list_image_folder(root)
    except FileNotFoundError as exc:
        raise GroundTruthError(f"ground-truth folder: {exc}") from None
    if not listing.has_labels:
        raise GroundTruthError(
            f"ground-truth folder {root} has images at its top level, so it carries no labels; it needs "
            "the ImageFolder layout root/<class>/<image> (or pass a CSV with columns path,label)"
        )
    labels: dict[str, str] = {}
    for path, rel, label in zip(listing.paths, listing.relative_paths(), listing.labels):
        name = listing.class_names[int(label)]
        for key in (rel, _abs(path), _norm(os.path.realpath(path))):
            labels.setdefault(key, name)
    return GroundTruth(root, "folder", labels, len(listing.paths))


def _truth_from_csv(path: Path) -> GroundTruth:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in fields]
            if missing:
                raise GroundTruthError(
                    f"{path}: ground-truth CSV needs columns path,label; missing {', '.join(missing)} "
                    f"(found: {', '.join(fields) or 'no header'})"
                )
            reader.fieldnames = fields
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise GroundTruthError(f"{path}: not a UTF-8 CSV file ({exc.reason})") from None
    base = path.parent
    labels: dict[str, str] = {}
    written: dict[str, str] = {}
    for lineno, row in enumerate(rows, 2):
        p, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not p:
            raise GroundTruthError(f"{path}:{lineno}: empty path")
        if not label:
            raise GroundTruthError(f"{path}:{lineno}: empty label for {p!r}")
        key = _norm(p)
        if written.get(key, label) != label:
            raise GroundTruthError(f"{path}:{lineno}: {p!r} is listed twice with labels {written[key]!r} and {label!r}")
        written[key] = label
    # os.path.abspath calls getcwd() every time; join onto the two bases once computed instead.
    roots = list(dict.fromkeys([os.path.abspath(base), os.getcwd()]))
    for p, label in written.items():
        labels.setdefault(p, label)
        if not os.path.isabs(p):
            for root in roots:
                labels.setdefault(_norm(os.path.join(root, p)), label)
    return GroundTruth(path, "csv", labels, len(written))


def _class_order(names) -> list[str]:
    """Digit-only names sort numerically ("2" before "10"), others alphabetically after them."""
    return sorted(set(names), key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))


# ----------------------------------------------------------------------------- evaluation


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python, tuples → lists."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def evaluate_predictions(
    pred_path: str | os.PathLike,
    truth: str | os.PathLike,
    out_dir: str | os.PathLike,
    n_bins: int = 15,
) -> dict:
    """Evaluate a predictions table against ground truth; write ``metrics.json`` and ``report.html``
    into ``out_dir`` and return the metrics (the same dict that ``metrics.json`` holds).

    Raises :class:`EvaluateError` (or :class:`calibclust.io.predictions.PredictionsFormatError`) for a
    missing file or column, confidences outside [0, 1], or when no row can be evaluated.
    """
    import numpy as np

    from calibclust import __version__
    from calibclust.io.predictions import read_predictions
    from calibclust.metrics import clustering_report, ood_metrics, risk_coverage

    if n_bins < 1:
        raise InputError(f"--bins must be at least 1, got {n_bins}")
    pred_path, out_dir = Path(pred_path), Path(out_dir)
    ground_truth = load_ground_truth(truth)  # first: a missing truth fails before reading a big table
    table = read_predictions(pred_path)
    n_rows = len(table["path"])
    paths = [str(p) for p in table["path"]]
    cluster = table["cluster"]
    confidence = table["confidence"]
    decision = table.get("decision")
    error = table.get("error")
    ood_score = table.get("ood_score")

    finite_conf = confidence[np.isfinite(confidence)]
    if finite_conf.size and (finite_conf.min() < 0 or finite_conf.max() > 1):
        bad = int(np.flatnonzero(np.isfinite(confidence) & ((confidence < 0) | (confidence > 1)))[0])
        raise EvaluateError(
            f"{pred_path}: confidence must lie in [0, 1]; row {bad + 1} ({paths[bad]!r}) has {confidence[bad]!r}"
        )

    # 1. invalid rows (no prediction)
    reasons: list[str | None] = [None] * n_rows
    for i in range(n_rows):
        if error is not None and str(error[i]).strip():
            reasons[i] = str(error[i]).strip()
        elif decision is not None and str(decision[i]) == "error":
            reasons[i] = "decision is 'error'"
        elif cluster[i] < 0:
            reasons[i] = f"cluster is {int(cluster[i])}"
        elif not np.isfinite(confidence[i]):
            reasons[i] = "confidence is blank"
    invalid = np.array([r is not None for r in reasons], dtype=bool)

    # 2./3. ground truth per remaining row
    truth_label: list[str | None] = [None if invalid[i] else ground_truth.lookup(paths[i]) for i in range(n_rows)]
    unmatched = np.array([not invalid[i] and truth_label[i] is None for i in range(n_rows)], dtype=bool)
    is_ood = np.array([lab is not None and lab.casefold() in OOD_LABELS for lab in truth_label], dtype=bool)
    evaluated = ~invalid & ~unmatched & ~is_ood
    n_eval = int(evaluated.sum())
    if n_eval == 0:
        examples = [paths[i] for i in np.flatnonzero(unmatched)[:3]]
        raise EvaluateError(
            f"no row of {pred_path} could be evaluated: {int(invalid.sum())} invalid, {int(unmatched.sum())} "
            f"without ground truth in {ground_truth.source}, {int(is_ood.sum())} out-of-distribution"
            + (f"; unmatched paths look like {examples} — paths are matched relative to the truth folder, "
               "as written in the truth CSV, or as absolute paths" if examples else "")
        )

    class_names = _class_order(truth_label[i] for i in np.flatnonzero(evaluated))
    class_index = {name: k for k, name in enumerate(class_names)}
    idx = np.flatnonzero(evaluated)
    y_true = np.array([class_index[truth_label[i]] for i in idx], dtype=np.int64)
    y_pred = cluster[idx]
    conf = confidence[idx]
    report = clustering_report(y_true, y_pred, conf, n_bins=n_bins)
    mapped = np.array([report.mapping.get(int(c), -1) for c in y_pred], dtype=np.int64)
    correct = mapped == y_true
    curve = risk_coverage(conf, correct)

    cluster_names: dict[int, str] = {}
    if "cluster_name" in table:
        for c, name in zip(cluster, table["cluster_name"]):
            if c >= 0 and str(name) and int(c) not in cluster_names:
                cluster_names[int(c)] = str(name)

    # per-cluster summary over every valid row (evaluated or not)
    valid = ~invalid
    per_cluster = []
    for c in np.unique(cluster[valid]):
        in_c = valid & (cluster == c)
        ev_c = evaluated & (cluster == c)
        sel = y_pred == c
        matched = report.mapping.get(int(c))
        per_cluster.append({
            "cluster": int(c),
            "name": cluster_names.get(int(c)),
            "rows": int(in_c.sum()),
            "evaluated": int(ev_c.sum()),
            "correct": int(correct[sel].sum()),
            "ood_truth": int((is_ood & in_c).sum()),
            "no_truth": int((unmatched & in_c).sum()),
            "matched_class": class_names[matched] if matched is not None else None,
            "accuracy": float(correct[sel].mean()) if sel.any() else None,
            "mean_confidence": float(confidence[in_c].mean()),
        })

    clustering = report.to_dict()
    clustering["mapping"] = {str(k): class_names[v] for k, v in report.mapping.items()}

    metrics: dict[str, Any] = {
        "calibclust_version": __version__,
        "predictions": str(pred_path),
        "truth": str(ground_truth.source),
        "truth_kind": ground_truth.kind,
        "truth_images": ground_truth.n_images,
        "n_bins": n_bins,
        "rows": {
            "total": n_rows,
            "evaluated": n_eval,
            "invalid": int(invalid.sum()),
            "unmatched": int(unmatched.sum()),
            "ood_truth": int(is_ood.sum()),
        },
        "invalid_examples": [{"path": paths[i], "reason": reasons[i]} for i in np.flatnonzero(invalid)[:MAX_EXAMPLES]],
        "unmatched_examples": [paths[i] for i in np.flatnonzero(unmatched)[:MAX_EXAMPLES]],
        "class_names": class_names,
        "clustering": clustering,
        "per_cluster": per_cluster,
        "ood": _ood_section(ood_score, evaluated, is_ood, ood_metrics),
        "decisions": _decision_section(decision, evaluated, is_ood, correct) if decision is not None else None,
    }
    metrics = _clean(metrics)

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, report_path = out_dir / "metrics.json", out_dir / "report.html"
    write_json_atomic(metrics_path, metrics, allow_nan=False)
    _write_report(report_path, metrics, report, curve, y_true, y_pred, conf, correct,
                  class_names, cluster_names, ood_score, evaluated, is_ood)
    metrics["outputs"] = {"metrics": str(metrics_path), "report": str(report_path)}
    return metrics


def _ood_section(ood_score, evaluated, is_ood, ood_metrics) -> dict | None:
    """OOD metrics when the truth marks some rows OOD and the table has scores (higher = more OOD)."""
    import numpy as np

    n_out = int(is_ood.sum())
    if n_out == 0:
        return None
    if ood_score is None:
        return {"skipped": f"{n_out} rows are out-of-distribution in the ground truth, but the table has no ood_score column"}
    score_in = ood_score[evaluated]
    score_out = ood_score[is_ood]
    blank = int((~np.isfinite(score_in)).sum() + (~np.isfinite(score_out)).sum())
    score_in, score_out = score_in[np.isfinite(score_in)], score_out[np.isfinite(score_out)]
    if score_in.size == 0 or score_out.size == 0:
        return {"skipped": "no finite ood_score on the in-distribution or on the out-of-distribution rows"}
    result = ood_metrics(score_in, score_out).__dict__.copy()
    result["blank_scores_excluded"] = blank
    return result


def _decision_section(decision, evaluated, is_ood, correct) -> dict:
    """What the serving decisions achieved: coverage and realised accuracy of the accepted images."""
    import numpy as np

    decision = np.asarray([str(d) for d in decision], dtype=object)
    counts = {str(d): int((decision == d).sum()) for d in sorted(set(decision.tolist()))}
    accepted_eval = decision[evaluated] == "accepted"
    out = {
        "counts": counts,
        "in_distribution_accepted": int(accepted_eval.sum()),
        "in_distribution_coverage": float(accepted_eval.mean()),
        "accepted_accuracy": float(correct[accepted_eval].mean()) if accepted_eval.any() else None,
    }
    if is_ood.any():
        d_ood = decision[is_ood]
        out["ood_flagged_share"] = float((d_ood == "ood").mean())
        out["ood_accepted_share"] = float((d_ood == "accepted").mean())
    return out


# ----------------------------------------------------------------------------- report


def _write_report(path, metrics, report, curve, y_true, y_pred, conf, correct,
                  class_names, cluster_names, ood_score, evaluated, is_ood) -> None:
    import numpy as np

    from calibclust import report as rp

    rows = metrics["rows"]
    doc = rp.HTMLReport(
        f"Evaluation of {Path(metrics['predictions']).name}",
        f"predictions: {metrics['predictions']} · ground truth: {metrics['truth']} ({metrics['truth_kind']}) · "
        f"calibclust {metrics['calibclust_version']}",
    )
    rej, cal = report.rejection, report.calibration
    doc.add_heading("Summary")
    doc.add_table(
        [
            ("rows in the table", rows["total"]),
            ("evaluated (in-distribution, with ground truth)", rows["evaluated"]),
            ("no ground truth for the path (not evaluated)", rows["unmatched"]),
            ("invalid: error / cluster -1 (not evaluated)", rows["invalid"]),
            ("out-of-distribution in the ground truth", rows["ood_truth"]),
            ("classes / clusters", f"{len(class_names)} / {len(np.unique(y_pred))}"),
            ("ACC (Hungarian)", report.acc),
            ("NMI", report.nmi),
            ("ARI", report.ari),
            (f"ECE ({cal.n_bins} bins)", cal.ece),
            ("MCE", cal.mce),
            ("AUROC of confidence (correct vs wrong)", rej.auroc),
            ("AURC", rej.aurc),
            ("FPR at 95% TPR", rej.fpr95),
        ],
        header=("", "value"),
    )
    if rows["unmatched"]:
        doc.add_warning(
            f"{rows['unmatched']} of {rows['total']} rows have no ground truth for their path and are not in "
            f"the metrics. Paths are matched relative to the truth folder, as written in the truth CSV, or as "
            f"absolute paths. First {len(metrics['unmatched_examples'])}:",
            metrics["unmatched_examples"],
        )
    if rows["invalid"]:
        doc.add_warning(
            f"{rows['invalid']} rows have no prediction (error, cluster -1 or blank confidence) and are not in "
            f"the metrics. First {len(metrics['invalid_examples'])}:",
            [f"{e['path']}: {e['reason']}" for e in metrics["invalid_examples"]],
        )

    doc.add_heading("Calibration")
    doc.add_figure(rp.plot_reliability_diagram(cal), alt="reliability diagram",
                   caption="Accuracy per confidence bin after Hungarian matching of clusters to classes.")
    doc.add_figure(rp.plot_confidence_histograms(conf, correct), alt="confidence histograms correct vs wrong")

    doc.add_heading("Failure rejection")
    doc.add_figure(rp.plot_risk_coverage(curve), alt="risk-coverage curve",
                   caption="Error rate of the accepted images when accepting the most confident first.")

    doc.add_heading("Clusters")
    matrix, classes, clusters = rp.aligned_confusion(y_true, y_pred, report.mapping)

    def cluster_label(c: int) -> str:
        return f"{c}: {cluster_names[c]}" if c in cluster_names else str(c)

    doc.add_figure(
        rp.plot_confusion_matrix(matrix, [class_names[k] for k in classes], [cluster_label(c) for c in clusters],
                                 title="Confusion matrix (clusters ordered by their Hungarian-matched class)"),
        alt="confusion matrix",
    )
    per = metrics["per_cluster"]
    series = {
        "correct": [p["correct"] for p in per],
        "wrong": [p["evaluated"] - p["correct"] for p in per],
        "out-of-distribution (truth)": [p["ood_truth"] for p in per],
        "no ground truth": [p["no_truth"] for p in per],
    }
    series = {k: v for k, v in series.items() if any(v)}
    doc.add_figure(rp.plot_cluster_counts([cluster_label(p["cluster"]) for p in per], series),
                   alt="per-cluster counts")
    doc.add_table(
        [(cluster_label(p["cluster"]), p["rows"], p["evaluated"], p["matched_class"] or "(unmatched)",
          p["accuracy"], p["mean_confidence"]) for p in per],
        header=("cluster", "rows", "evaluated", "matched class", "accuracy", "mean confidence"),
    )

    ood = metrics["ood"]
    if ood is not None:
        doc.add_heading("Out-of-distribution detection")
        if "skipped" in ood:
            doc.add_paragraph(f"Not computed: {ood['skipped']}.")
        else:
            doc.add_table(
                [("in-distribution rows", ood["n_in"]), ("out-of-distribution rows", ood["n_out"]),
                 ("AUROC (OOD = positive)", ood["auroc"]), ("FPR at 95% TPR", ood["fpr95"]),
                 ("AUPR-out", ood["aupr_out"]), ("AUPR-in", ood["aupr_in"])],
                header=("", "value"),
            )
            doc.add_figure(
                rp.plot_score_histograms({"in-distribution": ood_score[evaluated], "out-of-distribution": ood_score[is_ood]},
                                         title="OOD score", xlabel="ood_score (higher = more out-of-distribution)"),
                alt="ood score histograms",
            )
    dec = metrics["decisions"]
    if dec is not None:
        doc.add_heading("Serving decisions")
        rows_ = [(f"decision = {k}", v) for k, v in dec["counts"].items()]
        rows_ += [("in-distribution coverage (accepted share)", dec["in_distribution_coverage"]),
                  ("realised accuracy of accepted in-distribution images", dec["accepted_accuracy"])]
        if "ood_flagged_share" in dec:
            rows_ += [("OOD images flagged 'ood'", dec["ood_flagged_share"]),
                      ("OOD images accepted", dec["ood_accepted_share"])]
        doc.add_table(rows_, header=("", "value"))
    doc.write(path)


# ----------------------------------------------------------------------------- CLI


def format_summary(metrics: dict) -> str:
    """Short two-column table for the terminal."""
    rows, cl = metrics["rows"], metrics["clustering"]
    cal, rej = cl["calibration"], cl["rejection"]

    def f(v):
        return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = [
        ("rows", rows["total"]), ("evaluated", rows["evaluated"]), ("no ground truth", rows["unmatched"]),
        ("invalid (error)", rows["invalid"]), ("ood (truth)", rows["ood_truth"]),
        ("ACC", cl["acc"]), ("NMI", cl["nmi"]), ("ARI", cl["ari"]),
        (f"ECE ({metrics['n_bins']} bins)", cal["ece"]), ("MCE", cal["mce"]),
        ("AUROC (conf.)", rej["auroc"]), ("AURC", rej["aurc"]), ("FPR95 (conf.)", rej["fpr95"]),
    ]
    ood = metrics.get("ood")
    if ood and "skipped" not in ood:
        lines += [("OOD AUROC", ood["auroc"]), ("OOD FPR95", ood["fpr95"]), ("OOD AUPR-out", ood["aupr_out"])]
    dec = metrics.get("decisions")
    if dec:
        lines += [("coverage (accepted)", dec["in_distribution_coverage"]), ("accepted accuracy", dec["accepted_accuracy"])]
    width = max(len(k) for k, _ in lines)
    body = "\n".join(f"{k:<{width}}  {f(v):>8}" for k, v in lines)
    return f"{'metric':<{width}}  {'value':>8}\n{'-' * (width + 10)}\n{body}"


DESCRIPTION = """\
Score a predictions table (from 'calibclust predict' or 'calibclust label') against known labels.
Writes DIR/metrics.json and a self-contained DIR/report.html (reliability diagram with ECE,
confidence histograms of correct vs wrong predictions, risk-coverage curve, confusion matrix after
Hungarian matching of clusters to classes, per-cluster counts) and prints a summary.

PRED: CSV, Parquet or JSONL with columns path, cluster, confidence (optional: ood_score, decision,
error, cluster_name, prob_<c>). Ground truth (--truth): a folder in ImageFolder layout
(root/<class>/<image>; paths in PRED relative to it, or absolute) or a CSV with columns path,label.

Rows whose path has no ground truth, and rows without a prediction (cluster -1, decision 'error'),
are counted and listed, not used. Images labelled 'ood' or '_ood' in the ground truth (a '_ood'
sub-folder) are out-of-distribution: they score the ood_score column (AUROC, FPR95, AUPR) and are
left out of the clustering metrics."""

EPILOG = """\
examples:
  # ground truth from an ImageFolder layout (the class is the first sub-folder)
  calibclust evaluate runs/digits/predictions.csv --truth data/digits --out runs/digits/eval
  # ground truth from a CSV with columns path,label; 10 calibration bins
  calibclust evaluate preds.parquet --truth labels.csv --out eval --bins 10

exit codes: 0 ok, 1 missing file/column or nothing to evaluate, 2 bad arguments"""


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a predictions table against known labels (metrics.json + report.html)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("predictions", metavar="PRED", help="predictions table (.csv, .parquet or .jsonl)")
    parser.add_argument("--truth", required=True, metavar="FOLDER_OR_CSV",
                        help="ImageFolder-layout folder or CSV with columns path,label")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for metrics.json and report.html")
    parser.add_argument("--bins", type=int, default=15, metavar="N",
                        help="equal-width confidence bins for ECE and the reliability diagram (default: 15)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    metrics = evaluate_predictions(args.predictions, args.truth, args.out, n_bins=args.bins)
    rows = metrics["rows"]
    if rows["unmatched"]:
        print(f"warning: {rows['unmatched']} of {rows['total']} rows have no ground truth and were not evaluated "
              f"(e.g. {metrics['unmatched_examples'][0]!r}); listed in metrics.json", file=sys.stderr)
    if rows["invalid"]:
        print(f"warning: {rows['invalid']} rows have no prediction (errors) and were not evaluated", file=sys.stderr)
    print(f"calibclust evaluate: {metrics['predictions']} vs {metrics['truth']} ({metrics['truth_kind']})")
    print(format_summary(metrics))
    print(f"wrote {metrics['outputs']['metrics']} and {metrics['outputs']['report']}")
    return 0
