"""The predictions table: round trips in CSV / Parquet / JSONL, atomic writes, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibclust.io.predictions import (
    PredictionsFormatError,
    PredictionsWriter,
    order_columns,
    probability_columns,
    read_predictions,
    write_predictions,
)

FORMATS = ["csv", "parquet", "jsonl"]


def sample_rows():
    return {
        "path": ["a/1.png", "b, with comma/2.png", 'quote"d/3.jpg', "ünïcode/4.png"],
        "decision": ["accepted", "rejected", "ood", "error"],
        "cluster": np.array([0, 2, 1, -1]),
        "cluster_name": ["zero", "", "one", None],
        "confidence": np.array([0.9, 0.41, 0.77, np.nan]),
        "ood_score": [0.1, 0.2, 3.5, float("nan")],
        "error": ["", "", "", "unreadable image: truncated image"],
        "top1_cluster": [0, 2, 1, -1],
        "top1_prob": [0.9, 0.41, 0.77, float("nan")],
        "top2_cluster": [1, 0, 2, -1],
        "top2_prob": [0.05, 0.4, 0.2, float("nan")],
        "prob_0": [0.9, 0.4, 0.03, float("nan")],
        "prob_1": [0.05, 0.19, 0.77, float("nan")],
        "prob_2": [0.05, 0.41, 0.2, float("nan")],
    }


def assert_same_table(got, expected):
    assert list(got) == order_columns(expected)
    for name, values in expected.items():
        column = got[name]
        assert len(column) == len(values), name
        for a, b in zip(column, values):
            if isinstance(b, float) and math.isnan(b):
                assert isinstance(a, float) and math.isnan(a), f"{name}: {a!r} should be NaN"
            elif b is None:
                assert a == "", f"{name}: None is written as an empty string"
            elif isinstance(b, (float, np.floating)):
                assert a == pytest.approx(float(b), abs=1e-12), name
            else:
                assert a == b, f"{name}: {a!r} != {b!r}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt):
    rows = sample_rows()
    path = write_predictions(tmp_path / f"pred.{fmt}", rows)
    table = read_predictions(path)
    assert_same_table(table, rows)
    assert table["cluster"].dtype == np.int64 and table["confidence"].dtype == np.float64
    assert table["path"].dtype == object
    assert probability_columns(table) == ["prob_0", "prob_1", "prob_2"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_batches_equal_one_write(tmp_path, fmt):
    rows = sample_rows()
    with PredictionsWriter(tmp_path / f"s.{fmt}", list(rows)) as writer:
        for lo in range(0, 4, 3):  # batches of 3 and 1
            writer.write_rows({k: list(v)[lo : lo + 3] for k, v in rows.items()})
        writer.write_rows({k: [] for k in rows})  # empty batch is a no-op
    assert writer.rows_written == 4
    assert_same_table(read_predictions(tmp_path / f"s.{fmt}"), rows)


@pytest.mark.parametrize("fmt", FORMATS)
def test_minimal_columns_fill_optional_ones(tmp_path, fmt):
    path = write_predictions(tmp_path / f"m.{fmt}", {"confidence": [0.5], "cluster": [3], "path": ["x.png"]})
    table = read_predictions(path)
    assert list(table) == ["path", "cluster", "confidence"]
    assert table["cluster"].tolist() == [3]


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_appears_only_on_close(tmp_path, fmt):
    target = tmp_path / f"out.{fmt}"
    writer = PredictionsWriter(target, ["path", "cluster", "confidence"])
    writer.write_rows({"path": ["a.png"], "cluster": [0], "confidence": [0.5]})
    assert not target.exists(), "nothing at the target before close()"
    writer.close()
    assert target.exists() and read_predictions(target)["path"].tolist() == ["a.png"]
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "no temporary file left behind"


@pytest.mark.parametrize("fmt", FORMATS)
def test_abort_leaves_nothing_and_keeps_an_old_table(tmp_path, fmt):
    target = tmp_path / f"out.{fmt}"
    write_predictions(target, {"path": ["old.png"], "cluster": [1], "confidence": [0.25]})
    with pytest.raises(RuntimeError):
        with PredictionsWriter(target, ["path", "cluster", "confidence"]) as writer:
            writer.write_rows({"path": ["new.png"], "cluster": [0], "confidence": [0.5]})
            raise RuntimeError("killed mid-run")
    assert read_predictions(target)["path"].tolist() == ["old.png"], "the previous complete table survives"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]

    fresh = tmp_path / f"fresh.{fmt}"
    writer = PredictionsWriter(fresh, ["path", "cluster", "confidence"])
    writer.write_rows({"path": ["a.png"], "cluster": [0], "confidence": [0.5]})
    writer.abort()
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_writer_requires_the_required_columns(tmp_path):
    with pytest.raises(PredictionsFormatError, match="confidence"):
        PredictionsWriter(tmp_path / "x.csv", ["path", "cluster"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_names_a_missing_required_column(tmp_path, fmt):
    path = tmp_path / f"bad.{fmt}"
    if fmt == "csv":
        path.write_text("path,cluster\na.png,1\n")
    elif fmt == "jsonl":
        path.write_text('{"path": "a.png", "cluster": 1}\n')
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"path": ["a.png"], "cluster": [1]}), path)
    with pytest.raises(PredictionsFormatError, match="missing required column.*confidence"):
        read_predictions(path)


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(PredictionsFormatError, match="not found"):
        read_predictions(tmp_path / "absent.csv")
    (tmp_path / "p.txt").write_text("path,cluster,confidence\n")
    with pytest.raises(PredictionsFormatError, match="unknown predictions format"):
        read_predictions(tmp_path / "p.txt")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(PredictionsFormatError, match="empty file"):
        read_predictions(tmp_path / "e.csv")
    (tmp_path / "n.csv").write_text("path,cluster,confidence\na.png,one,0.5\n")
    with pytest.raises(PredictionsFormatError, match="'cluster' has a non-numeric value"):
        read_predictions(tmp_path / "n.csv")
    (tmp_path / "j.jsonl").write_text('{"path": "a.png", "cluster": 1, "confidence": 0.5}\n{oops\n')
    with pytest.raises(PredictionsFormatError, match=r"j.jsonl:2: invalid JSON"):
        read_predictions(tmp_path / "j.jsonl")


def test_column_order_is_fixed():
    cols = ["prob_10", "prob_2", "error", "top2_prob", "top1_cluster", "path", "top1_prob", "confidence",
            "top2_cluster", "cluster", "extra"]
    assert order_columns(cols) == ["path", "cluster", "confidence", "error", "top1_cluster", "top1_prob",
                                   "top2_cluster", "top2_prob", "prob_2", "prob_10", "extra"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_none_means_missing_in_numeric_columns(tmp_path, fmt):
    # Serving writes error rows with no cluster / confidence / score; None must not crash the writer
    # and must read back the way a blank cell does (-1 for ints, NaN for floats).
    path = write_predictions(tmp_path / f"n.{fmt}", {
        "path": ["ok.png", "broken.png"], "cluster": [2, None], "confidence": [0.5, None],
        "ood_score": [None, None], "error": ["", "truncated"],
    })
    table = read_predictions(path)
    assert table["cluster"].tolist() == [2, -1]
    assert table["confidence"][0] == 0.5 and np.isnan(table["confidence"][1])
    assert np.isnan(table["ood_score"]).all()


def test_csv_cells_a_spreadsheet_would_run_are_escaped_and_read_back(tmp_path):
    """Names beginning with = + - @ (or ') get a leading ' in the CSV only; every reader of ours
    restores them; with escape_formulas=False they are written as they are."""
    import csv

    from calibclust.io.predictions import PredictionsWriter, read_predictions

    names = ["=HYPERLINK(\"http://x\")", "+1", "-2.png", "@SUM(A1)", "'quoted", "plain.png", "a=b", "\tx"]
    rows = {"path": names, "cluster": list(range(len(names))), "confidence": [0.5] * len(names),
            "cluster_name": ["=evil"] * len(names)}
    with PredictionsWriter(tmp_path / "p.csv", list(rows)) as writer:
        writer.write_rows(rows)
    with open(tmp_path / "p.csv", newline="") as fh:
        cells = list(csv.DictReader(fh))
    assert [c["path"] for c in cells] == ["'" + n if n[0] in "=+-@'\t" else n for n in names]
    assert {c["cluster_name"] for c in cells} == {"'=evil"}
    assert cells[0]["cluster"] == "0", "numeric columns are never prefixed"
    back = read_predictions(tmp_path / "p.csv")
    assert back["path"].tolist() == names and set(back["cluster_name"]) == {"=evil"}
    with PredictionsWriter(tmp_path / "raw.csv", list(rows), escape_formulas=False) as writer:
        writer.write_rows(rows)
    with open(tmp_path / "raw.csv", newline="") as fh:
        assert [c["path"] for c in csv.DictReader(fh)] == names
