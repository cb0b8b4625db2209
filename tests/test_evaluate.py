"""``calibclust evaluate``: metrics.json equals the metrics functions on the same rows; every row that
is not evaluated is counted; the CLI's exit codes and messages."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from calibclust import metrics as M
from calibclust.cli import main
from calibclust.datasets import make_digits_folder, make_ood_folder
from calibclust.evaluate import EvaluateError, evaluate_predictions, load_ground_truth
from calibclust.io.images import list_image_folder
from calibclust.io.predictions import PredictionsFormatError, read_predictions, write_predictions

TOL = 1e-12


def synthetic_predictions(listing, seed=0, extra_cluster_share=0.05):
    """Predictions with a known structure: a permutation of the classes, correct with probability
    equal to the confidence (so roughly calibrated), and a few samples in an 11th cluster."""
    rng = np.random.default_rng(seed)
    n = len(listing.paths)
    y = listing.labels
    conf = np.round(rng.uniform(0.2, 1.0, n), 6)
    right = rng.random(n) < conf
    perm = rng.permutation(10)
    cluster = np.where(right, perm[y], perm[(y + rng.integers(1, 10, n)) % 10])
    cluster[rng.random(n) < extra_cluster_share] = 10
    return cluster, conf


@pytest.fixture(scope="module")
def example(digits_folder, tmp_path_factory):
    """200 digits, their predictions (mixed path spellings), 3 rows without truth and 2 error rows."""
    tmp = tmp_path_factory.mktemp("eval")
    listing = list_image_folder(digits_folder)
    cluster, conf = synthetic_predictions(listing)
    rel = listing.relative_paths()
    # spellings: relative to the truth folder, './'-prefixed, and absolute
    spelled = [str(listing.paths[i].resolve()) if i % 7 == 0 else ("./" + p if i % 5 == 0 else p)
               for i, p in enumerate(rel)]
    rows = {
        "path": spelled + ["elsewhere/a.png", "elsewhere/b.png", "0/not_in_truth.png", "1/broken.png", rel[0]],
        "decision": ["accepted" if c >= 0.5 else "rejected" for c in conf] + ["accepted"] * 3 + ["error"] * 2,
        "cluster": list(cluster) + [1, 2, 3, -1, -1],
        "confidence": list(conf) + [0.9, 0.8, 0.7, None, None],
        "error": [""] * (len(rel) + 3) + ["unreadable image: truncated image", "file not found"],
    }
    pred = write_predictions(tmp / "pred.csv", rows)
    return {"listing": listing, "cluster": cluster, "conf": conf, "pred": pred, "tmp": tmp, "rows": rows}


def strict_json(path: Path) -> dict:
    def no_nan(token):
        raise AssertionError(f"metrics.json holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=no_nan)


def test_metrics_json_equals_metrics_functions(example):
    out = example["tmp"] / "out"
    result = evaluate_predictions(example["pred"], example["listing"].root, out)
    saved = strict_json(out / "metrics.json")
    assert {k: v for k, v in result.items() if k != "outputs"} == saved

    y_true, y_pred, conf = example["listing"].labels, example["cluster"], example["conf"]
    match = M.hungarian_accuracy(y_true, y_pred)
    correct = match.map(y_pred) == y_true
    cal = M.calibration_error(conf, correct)
    rej = M.rejection_metrics(conf, correct)
    cl = saved["clustering"]
    acc_msg = f"ACC {cl['acc']:.4f} vs {match.accuracy:.4f}, ECE {cl['calibration']['ece']:.4f} vs {cal.ece:.4f}"
    assert abs(cl["acc"] - match.accuracy) < TOL, acc_msg
    assert abs(cl["nmi"] - M.normalized_mutual_info(y_true, y_pred)) < TOL
    assert abs(cl["ari"] - M.adjusted_rand_index(y_true, y_pred)) < TOL
    assert abs(cl["calibration"]["ece"] - cal.ece) < TOL, acc_msg
    assert abs(cl["calibration"]["mce"] - cal.mce) < TOL
    assert cl["calibration"]["bin_count"] == cal.bin_count and cl["calibration"]["n_bins"] == 15
    assert abs(cl["rejection"]["auroc"] - rej.auroc) < TOL
    assert abs(cl["rejection"]["aurc"] - rej.aurc) < TOL
    assert abs(cl["rejection"]["fpr95"] - rej.fpr95) < TOL
    # class ids are folder names here, so the mapping reads cluster -> class name
    assert cl["mapping"] == {str(k): str(v) for k, v in match.mapping.items()}
    assert 0.4 < match.accuracy < 0.8, f"synthetic predictions are ~60% right by construction, ACC {match.accuracy}"

    # the decision column: accepted = confidence >= 0.5 among the 200 evaluated rows
    accepted = conf >= 0.5
    dec = saved["decisions"]
    assert dec["in_distribution_accepted"] == int(accepted.sum())
    assert abs(dec["accepted_accuracy"] - correct[accepted].mean()) < TOL
    assert dec["counts"]["error"] == 2

    per = {p["cluster"]: p for p in saved["per_cluster"]}
    assert sorted(per) == list(range(11)), "the 11th cluster (more clusters than classes) is listed"
    assert sum(p["evaluated"] for p in per.values()) == 200
    unmatched = [c for c, p in per.items() if p["matched_class"] is None]
    assert len(unmatched) == 1 and str(unmatched[0]) not in cl["mapping"], "11 clusters, 10 classes: one unmatched"
    assert per[unmatched[0]]["correct"] == 0, "samples of an unmatched cluster count as wrong"


def test_rows_that_are_not_evaluated_are_counted_and_listed(example):
    out = example["tmp"] / "counted"
    saved = evaluate_predictions(example["pred"], example["listing"].root, out)
    assert saved["rows"] == {"total": 205, "evaluated": 200, "invalid": 2, "unmatched": 3, "ood_truth": 0}, (
        "200 images; 3 paths without truth; 2 error rows (one of them for an image that has truth)"
    )
    assert saved["unmatched_examples"] == ["elsewhere/a.png", "elsewhere/b.png", "0/not_in_truth.png"]
    assert [e["reason"] for e in saved["invalid_examples"]] == ["unreadable image: truncated image", "file not found"]
    html = (out / "report.html").read_text()
    assert "3 of 205 rows have no ground truth" in html and "elsewhere/a.png" in html
    assert "2 rows have no prediction" in html


def test_report_is_self_contained_with_all_figures(example):
    out = example["tmp"] / "html"
    evaluate_predictions(example["pred"], example["listing"].root, out)
    html = (out / "report.html").read_text()
    for alt in ("reliability diagram", "confidence histograms correct vs wrong", "risk-coverage curve",
                "confusion matrix", "per-cluster counts"):
        match = re.search(r'<img src="data:image/(png|svg\+xml);base64,([A-Za-z0-9+/=]+)" alt="%s"' % re.escape(alt),
                          html)
        assert match, f"no embedded PNG or SVG with alt {alt!r}"
        data = base64.b64decode(match.group(2))
        if match.group(1) == "png":
            assert len(data) > 3500, f"{alt}: suspiciously small image ({len(data)} bytes)"
        else:  # a well-formed SVG that draws something
            root = ElementTree.fromstring(data)
            drawn = sum(1 for e in root.iter() if e.tag.rsplit("}", 1)[-1] in ("rect", "polyline", "circle"))
            assert drawn > 5, f"{alt}: only {drawn} shapes in the SVG"
    assert not re.search(r'(src|href)="(?!data:)', html), "nothing is loaded from outside the file"


def test_parquet_and_jsonl_give_the_same_metrics(example):
    table = read_predictions(example["pred"])
    reference = evaluate_predictions(example["pred"], example["listing"].root, example["tmp"] / "ref")
    for fmt in ("parquet", "jsonl"):
        pred = write_predictions(example["tmp"] / f"pred.{fmt}", {k: list(v) for k, v in table.items()})
        got = evaluate_predictions(pred, example["listing"].root, example["tmp"] / fmt)
        assert got["clustering"] == reference["clustering"] and got["rows"] == reference["rows"], fmt


def test_csv_truth_with_string_labels_and_ood_rows(example):
    tmp, listing = example["tmp"], example["listing"]
    rng = np.random.default_rng(1)
    names = [f"digit_{d}" for d in listing.labels]
    ood_paths = [f"ood/{i}.png" for i in range(30)]
    truth = tmp / "truth.csv"
    with open(truth, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(zip(listing.relative_paths(), names))
        w.writerows((p, "OOD") for p in ood_paths)
    score_in, score_out = rng.normal(0, 1, len(names)), rng.normal(1.5, 1, len(ood_paths))
    score_out[0] = np.nan  # a missing score is excluded from the OOD metrics and counted
    pred = write_predictions(tmp / "pred_ood.csv", {
        "path": listing.relative_paths() + ood_paths,
        "cluster": list(example["cluster"]) + list(rng.integers(0, 10, 30)),
        "confidence": list(example["conf"]) + list(rng.uniform(0.2, 1, 30)),
        "ood_score": list(score_in) + list(score_out),
        "decision": ["accepted"] * len(names) + ["ood"] * 20 + ["accepted"] * 10,
    })
    saved = evaluate_predictions(pred, truth, tmp / "ood_out")
    assert saved["truth_kind"] == "csv" and saved["rows"]["ood_truth"] == 30 and saved["rows"]["evaluated"] == 200
    assert saved["class_names"] == [f"digit_{d}" for d in range(10)]
    y_true, y_pred = listing.labels, example["cluster"]
    assert abs(saved["clustering"]["acc"] - M.hungarian_accuracy(y_true, y_pred).accuracy) < TOL
    expected = M.ood_metrics(score_in, score_out[1:])
    ood = saved["ood"]
    assert abs(ood["auroc"] - expected.auroc) < TOL, f"OOD AUROC {ood['auroc']:.4f} vs {expected.auroc:.4f}"
    assert abs(ood["fpr95"] - expected.fpr95) < TOL and abs(ood["aupr_out"] - expected.aupr_out) < TOL
    assert ood["n_out"] == 29 and ood["blank_scores_excluded"] == 1
    assert saved["decisions"]["ood_flagged_share"] == pytest.approx(20 / 30)
    assert "ood score histograms" in (tmp / "ood_out" / "report.html").read_text()


def test_ood_subfolder_in_truth_folder_and_missing_score_column(tmp_path):
    root = make_digits_folder(tmp_path / "data", limit=50)
    make_ood_folder(root / "_ood", kinds=("noise",), n_per_kind=8)
    listing = list_image_folder(root)
    assert "_ood" in listing.class_names
    rng = np.random.default_rng(0)
    n = len(listing.paths)
    rows = {"path": listing.relative_paths(), "cluster": rng.integers(0, 10, n), "confidence": rng.uniform(0, 1, n)}
    saved = evaluate_predictions(write_predictions(tmp_path / "p.csv", rows), root, tmp_path / "out")
    assert saved["rows"]["ood_truth"] == 8 and saved["rows"]["evaluated"] == n - 8
    assert "_ood" not in saved["class_names"]
    assert "no ood_score column" in saved["ood"]["skipped"]


def test_ground_truth_path_matching(tmp_path, digits_folder, monkeypatch):
    truth = load_ground_truth(digits_folder)
    some = list_image_folder(digits_folder).paths[0]
    rel = some.relative_to(digits_folder).as_posix()
    label = some.parent.name
    assert truth.lookup(rel) == label
    assert truth.lookup("./" + rel) == label and truth.lookup(str(some)) == label
    assert truth.lookup("x/../" + rel) == label
    monkeypatch.chdir(digits_folder.parent)
    assert truth.lookup(f"{digits_folder.name}/{rel}") == label, "relative to the working directory"
    link = tmp_path / "link.png"
    os.symlink(some, link)
    assert truth.lookup(str(link)) == label, "symlinks are resolved"
    assert truth.lookup("nope/1.png") is None and truth.lookup("") is None


def test_ground_truth_errors(tmp_path):
    with pytest.raises(EvaluateError, match="ground truth not found"):
        load_ground_truth(tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes((Path(__file__).parent / "conftest.py").read_bytes())
    with pytest.raises(EvaluateError, match="no labels"):
        load_ground_truth(tmp_path / "flat")
    (tmp_path / "t.csv").write_text("path,class\na.png,1\n")
    with pytest.raises(EvaluateError, match="missing label"):
        load_ground_truth(tmp_path / "t.csv")
    (tmp_path / "d.csv").write_text("path,label\na.png,1\nb.png,2\na.png,3\n")
    with pytest.raises(EvaluateError, match="listed twice"):
        load_ground_truth(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("path,label\na.png,\n")
    with pytest.raises(EvaluateError, match="empty label"):
        load_ground_truth(tmp_path / "e.csv")


# ----------------------------------------------------------------------------- CLI


def test_cli_ok_prints_summary(example, capsys):
    out = example["tmp"] / "cli"
    code = main(["evaluate", str(example["pred"]), "--truth", str(example["listing"].root), "--out", str(out),
                 "--bins", "10"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"^ACC\s+0\.\d{4}$", captured.out, re.M) and "ECE (10 bins)" in captured.out
    assert "3 of 205 rows have no ground truth" in captured.err
    assert strict_json(out / "metrics.json")["clustering"]["calibration"]["n_bins"] == 10
    assert (out / "report.html").stat().st_size > 50_000


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_pred", "predictions table not found"),
        ("missing_truth", "ground truth not found"),
        ("missing_column", "missing required column(s) confidence"),
        ("no_overlap", "no row of"),
        ("bad_confidence", "confidence must lie in [0, 1]"),
    ],
)
def test_cli_failures_exit_1_with_a_message(example, tmp_path, capsys, case, message):
    pred, truth = str(example["pred"]), str(example["listing"].root)
    if case == "missing_pred":
        pred = str(tmp_path / "absent.csv")
    elif case == "missing_truth":
        truth = str(tmp_path / "absent_folder")
    elif case == "missing_column":
        (tmp_path / "p.csv").write_text("path,cluster\n0/0000.png,1\n")
        pred = str(tmp_path / "p.csv")
    elif case == "no_overlap":
        pred = str(write_predictions(tmp_path / "p.csv", {"path": ["x/1.png"], "cluster": [0], "confidence": [0.5]}))
    else:
        rel = example["listing"].relative_paths()[0]
        pred = str(write_predictions(tmp_path / "p.csv", {"path": [rel], "cluster": [0], "confidence": [1.5]}))
    code = main(["evaluate", pred, "--truth", truth, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("calibclust evaluate: error:") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cli_usage_errors_exit_2(example, tmp_path, capsys):
    code = main(["evaluate", str(example["pred"]), "--truth", str(example["listing"].root), "--out",
                 str(tmp_path), "--bins", "0"])
    assert code == 2 and "--bins must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(example["pred"])])  # --truth and --out are required
    assert exc.value.code == 2


def test_predictions_error_is_a_calibclust_error():
    assert issubclass(PredictionsFormatError, Exception) and issubclass(EvaluateError, Exception)
    from calibclust.errors import CalibclustError

    assert issubclass(EvaluateError, CalibclustError) and issubclass(PredictionsFormatError, CalibclustError)


# ----------------------------------------------------------------------------- report helpers


def test_thumbnail_grid_embeds_the_exact_pixels():
    from PIL import Image

    from calibclust.report import thumbnail_grid

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    html = thumbnail_grid(images, captions=["a<b", "c", "d"], size=48, alt="cluster 0")
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 3 and 'alt="cluster 0: a&lt;b"' in html and "<figcaption>a&lt;b</figcaption>" in html
    for uri, image in zip(uris, images):
        assert (np.asarray(Image.open(io.BytesIO(base64.b64decode(uri)))) == image).all()
    with pytest.raises(ValueError, match="captions"):
        thumbnail_grid(images, captions=["only one"])
    with pytest.raises(ValueError, match="uint8"):
        thumbnail_grid(images.astype(np.float32))


def test_aligned_confusion_puts_matches_on_the_diagonal():
    from calibclust.report import aligned_confusion

    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([7, 7, 5, 5, 9, 9, 3])  # 4 clusters, 3 classes: 3 stays unmatched
    mapping = M.hungarian_accuracy(y_true, y_pred).mapping
    matrix, classes, clusters = aligned_confusion(y_true, y_pred, mapping)
    assert classes == [0, 1, 2] and clusters == [7, 5, 9, 3]
    assert matrix.tolist() == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 1]]


def test_report_tables_escape_and_format():
    from calibclust.report import HTMLReport, html_table, plot_reliability_diagram

    table = html_table([("<script>", 1234567, 0.123456789, float("nan"), None)], header=("a&b", "n", "x", "y", "z"))
    assert "&lt;script&gt;" in table and "<script>" not in table and "a&amp;b" in table
    assert ">1,234,567<" in table and ">0.1235<" in table and table.count(">–<") == 2
    report = HTMLReport('title "quoted"')
    report.add_figure(plot_reliability_diagram(M.calibration_error(np.zeros(0), np.zeros(0))), alt="empty")
    html = report.render()
    assert html.startswith("<!DOCTYPE html>") and "<title>title &quot;quoted&quot;</title>" in html
    assert 'alt="empty"' in html, "a reliability diagram with no samples still renders"
