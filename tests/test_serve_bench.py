"""The label benchmark command runs end to end on tiny folders and prints its table (figures are
not asserted: benchmarks are commands, not timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_contract_model  # noqa: E402


def test_label_bench_command_tiny(tmp_path):
    model = make_contract_model(tmp_path / "m.onnx", input_size=(32, 32), conv_channels=(8, 16))
    proc = subprocess.run(
        [sys.executable, "-m", "calibclust", "bench", "label", "--model", str(model), "--work-dir", str(tmp_path / "b"),
         "--n-small", "300", "--n-large", "20", "--rss-sizes", "200,400", "--batch-size", "64", "--workers", "1",
         "--skip-torch", "--ceiling-seconds", "0.5", "--repeats", "1", "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "onnxruntime model only (ceiling, pre-decoded)" in out and "calibclust label, 1 process workers" in out
    assert "PyTorch DataLoader rows left out: --skip-torch" in out
    result = json.loads((tmp_path / "r.json").read_text())
    rows = {(r["workload"], r["engine"].split(",")[0]): r for r in result["throughput"]}
    assert rows[("32x32 JPEG", "calibclust label")]["images"] == 300
    assert rows[("224x224 JPEG", "calibclust label")]["images"] == 20
    assert [r["files"] for r in result["rss"]] == [200, 400] and all(r["main_mb"] > 10 for r in result["rss"])
    # The linked folder really holds that many files (hard links to the generated JPEGs).
    assert sum(1 for _ in (tmp_path / "b" / "linked-400").rglob("*.jpg")) == 400


def test_register_bench_label_adds_bench_label():
    import argparse

    from calibclust.serve.bench import register_bench_label

    parser = argparse.ArgumentParser(prog="calibclust")
    sub = parser.add_subparsers(dest="command")
    register_bench_label(sub)
    args = parser.parse_args(["bench", "label", "--model", "m.onnx", "--n-small", "10", "--skip-torch"])
    assert args.model == "m.onnx" and args.n_small == 10 and args.skip_torch and callable(args.func)
