"""The predictions table: the one format that ``calibclust predict`` / ``label`` write and
``calibclust evaluate`` reads.

Columns (in this order; only ``path``, ``cluster`` and ``confidence`` are required):

=================  =======  =====================================================================
``path``           str      image path as discovered (relative to the labelled folder when known)
``decision``       str      accepted | rejected | ood | error  (serving only)
``cluster``        int      predicted cluster, -1 for an unreadable file
``cluster_name``   str      the cluster's name from the model metadata
``confidence``     float    max calibrated probability (NaN for an unreadable file)
``ood_score``      float    higher = more out-of-distribution
``error``          str      why the file could not be read; empty otherwise
``top<k>_cluster`` int      k-th most probable cluster (k = 1..K), optional
``top<k>_prob``    float    its probability, optional
``prob_<c>``       float    probability of cluster c for every cluster, optional
=================  =======  =====================================================================

Formats: CSV (default), Parquet (needs pyarrow) and JSON Lines, chosen by file suffix.
Writers stream row batches to a temporary file and move it into place on ``close()``, so a
reader never sees a half-written table.

CSV and spreadsheets: a text cell beginning with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return is run as a formula when the file is opened in Excel, LibreOffice or Google Sheets (OWASP,
"CSV injection"); a file or cluster name is attacker-chosen text. So the CSV writer prefixes such
cells (and cells beginning with ``'``, to stay reversible) with ``'``, which spreadsheets show as
text, and :func:`read_predictions` removes the prefix again. ``escape_formulas=False`` (``label
--no-csv-escape``) writes cells as they are. Parquet and JSON Lines are not spreadsheets' inputs and
are written as they are. The reader cannot tell an escaped table from a raw one: a CSV written raw
(or by another tool) whose cell really begins with ``'=`` ``'+`` ``'-`` ``'@`` or ``''`` loses that
first ``'`` when read here.

File names that are not valid UTF-8 (bytes from an old Latin-1 archive, say) arrive from the file
system as ``str`` with lone surrogates (Python's ``surrogateescape``). They are kept losslessly:
CSV is written and read with ``errors="surrogateescape"`` (the cell holds the name's original
bytes), JSON Lines escapes them (``"\\udce9"``), and Parquet, whose strings must be UTF-8, stores
such a name as ``\\xNN`` for each undecodable byte with any backslash doubled, flagged by the
column's field metadata ``calibclust.escaped: backslash`` (only names that hold a backslash or an
undecodable byte change). :func:`read_predictions` returns the same ``str`` in every format.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from calibclust.errors import CalibclustError, require

REQUIRED_COLUMNS = ("path", "cluster", "confidence")
BASE_COLUMNS = ("path", "decision", "cluster", "cluster_name", "confidence", "ood_score", "error")
DECISIONS = ("accepted", "rejected", "ood", "error")
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT_COLUMN = re.compile(r"^(cluster|top\d+_cluster)$")
_FLOAT_COLUMN = re.compile(r"^(confidence|ood_score|top\d+_prob|prob_\d+)$")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


_PARQUET_ESCAPE_KEY, _PARQUET_ESCAPE = b"calibclust.escaped", b"backslash"


def _escape_parquet(text: str) -> str:
    """Valid UTF-8 for a name with undecodable bytes (lone surrogates): each such byte as backslash-x-NN,
    each backslash doubled; other names unchanged."""
    if "\\" not in text and not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _unescape_parquet(text: str) -> str:
    if "\\" not in text:
        return text
    return re.sub(r"\\(\\|x[0-9a-f]{2})", lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), text)


def escape_csv_cell(text: str) -> str:
    """``'`` before a cell a spreadsheet would run as a formula (see the module docstring)."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def unescape_csv_cell(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_STARTS) else text


class PredictionsFormatError(CalibclustError):
    pass


def table_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise PredictionsFormatError(
            f"{path}: unknown predictions format {suffix!r}; use one of {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[suffix]


def order_columns(columns: Iterable[str]) -> list[str]:
    """Base columns first in their fixed order, then top-k, then per-cluster probabilities."""
    columns = list(dict.fromkeys(columns))
    base = [c for c in BASE_COLUMNS if c in columns]

    def number(c):
        return int(re.findall(r"\d+", c)[0])

    topk = sorted((c for c in columns if c.startswith("top")), key=lambda c: (number(c), c.endswith("prob")))
    probs = sorted((c for c in columns if c.startswith("prob_")), key=number)
    rest = [c for c in columns if c not in base and c not in topk and c not in probs]
    return base + topk + probs + rest


def _column_kind(name: str) -> str:
    if _INT_COLUMN.match(name):
        return "int"
    if _FLOAT_COLUMN.match(name):
        return "float"
    return "str"


class PredictionsWriter:
    """Streaming writer; use as a context manager. ``write_rows`` takes a mapping of equal-length
    columns (lists or numpy arrays). The file appears atomically at ``path`` on close."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], escape_formulas: bool = True):
        self.path = Path(path)
        self.escape_formulas = escape_formulas
        self.format = table_format(self.path)
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise PredictionsFormatError(f"predictions table needs columns {missing}")
        self.columns = order_columns(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self.rows_written = 0
        self._parquet_writer = None
        if self.format == "csv":
            self._fh = open(self._tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")
            self._csv = csv.writer(self._fh)
            self._csv.writerow(self.columns)
        elif self.format == "jsonl":
            self._fh = open(self._tmp, "w", encoding="utf-8")
        else:
            self._fh = None
            self._pa = require("pyarrow", "serve", "Parquet tables")
            import pyarrow.parquet as pq

            types = {"int": self._pa.int64(), "float": self._pa.float64(), "str": self._pa.string()}
            self._schema = self._pa.schema([
                self._pa.field(c, types[_column_kind(c)],
                               metadata={_PARQUET_ESCAPE_KEY: _PARQUET_ESCAPE} if _column_kind(c) == "str" else None)
                for c in self.columns
            ])
            self._parquet_writer = pq.ParquetWriter(self._tmp, self._schema)

    def write_rows(self, rows: Mapping[str, Any]) -> None:
        lengths = {len(v) for v in rows.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of unequal length: {lengths}")
        n = lengths.pop() if lengths else 0
        if n == 0:
            return
        cols = [self._normalise(c, rows.get(c), n) for c in self.columns]
        if self.format == "parquet":
            cols = [[_escape_parquet(v) for v in col] if _column_kind(c) == "str" else col
                    for c, col in zip(self.columns, cols)]
            table = self._pa.table(dict(zip(self.columns, cols)), schema=self._schema)
            self._parquet_writer.write_table(table)
        elif self.format == "csv":
            if self.escape_formulas:
                cols = [[escape_csv_cell(v) for v in col] if _column_kind(c) == "str" else col
                        for c, col in zip(self.columns, cols)]
            self._csv.writerows(zip(*cols))
        else:
            for values in zip(*cols):
                record = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in zip(self.columns, values)}
                self._fh.write(json.dumps(record) + "\n")
        self.rows_written += n

    @staticmethod
    def _normalise(name: str, values, n: int) -> list:
        kind = _column_kind(name)
        if values is None:
            return [float("nan")] * n if kind == "float" else ([-1] * n if kind == "int" else [""] * n)
        # None means "no value" (e.g. an unreadable file), read back like a blank cell: -1 / NaN.
        if kind == "int":
            return [-1 if v is None else int(v) for v in values]
        if kind == "float":
            return [float("nan") if v is None else float(v) for v in values]
        return ["" if v is None else str(v) for v in values]

    def close(self) -> None:
        if self._parquet_writer is not None:
            self._parquet_writer.close()
            self._parquet_writer = None
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        if self._tmp.exists():
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        for closer in (self._parquet_writer, self._fh):
            if closer is not None:
                closer.close()
        self._parquet_writer = self._fh = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "PredictionsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_predictions(path: str | os.PathLike, rows: Mapping[str, Any]) -> Path:
    """Write a whole table at once (see :class:`PredictionsWriter`)."""
    with PredictionsWriter(path, list(rows)) as writer:
        writer.write_rows(rows)
    return Path(path)


def read_predictions(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a predictions table into numpy columns (ints, floats with NaN for blanks, strings)."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsFormatError(f"predictions table not found: {path}")
    fmt = table_format(path)
    if fmt == "parquet":
        require("pyarrow", "serve", "Parquet tables")
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = {k: list(v) for k, v in table.to_pydict().items()}
        for field in table.schema:  # names stored in the escaped form (see the module docstring)
            if (field.metadata or {}).get(_PARQUET_ESCAPE_KEY) == _PARQUET_ESCAPE:
                raw[field.name] = [v if v is None else _unescape_parquet(v) for v in raw[field.name]]
    elif fmt == "csv":
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise PredictionsFormatError(f"{path}: empty file")
            rows = list(reader)
        raw = {name: [r[i] if i < len(r) else "" for r in rows] for i, name in enumerate(header)}
        for name in raw:
            if _column_kind(name) == "str":
                raw[name] = [unescape_csv_cell(v) for v in raw[name]]
    else:
        records = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise PredictionsFormatError(f"{path}:{lineno}: invalid JSON ({exc})") from None
        names = list(dict.fromkeys(k for r in records for k in r))
        raw = {name: [r.get(name) for r in records] for name in names}
    missing = [c for c in REQUIRED_COLUMNS if c not in raw]
    if missing:
        raise PredictionsFormatError(
            f"{path}: missing required column(s) {', '.join(missing)}; a predictions table needs "
            f"{', '.join(REQUIRED_COLUMNS)}"
        )
    return {name: _parse_column(name, values, path) for name, values in raw.items()}


def _parse_column(name: str, values: list, path: Path) -> np.ndarray:
    kind = _column_kind(name)
    try:
        if kind == "int":
            return np.array([-1 if v in ("", None) else int(float(v)) for v in values], dtype=np.int64)
        if kind == "float":
            return np.array([np.nan if v in ("", None) else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PredictionsFormatError(f"{path}: column {name!r} has a non-numeric value ({exc})") from None
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


def probability_columns(table: Mapping[str, np.ndarray]) -> list[str]:
    return sorted((c for c in table if c.startswith("prob_")), key=lambda c: int(c[5:]))
