"""``calibclust quickstart``: from nothing to a calibrated, exported model labelling real images.

Every stage runs as the same ``calibclust`` command a user would type (a subprocess of this
Python), so the quick start adds no second implementation of anything, keeps the import direction
(core never imports export/serve), and can print the exact commands to rerun each stage. The
commands are also written to ``OUT/commands.sh``.

Stages: data (sklearn digits as 32×32 PNGs + an out-of-distribution folder of letters, photo patches
and noise) → MoCo-v2 pretraining of the small backbone → CDC (frozen-backbone mode) → ONNX export
(fp32 + INT8, OOD threshold fitted) → exemplar thumbnails for the demo → ``calibclust label`` on
digits + OOD images → ``calibclust evaluate`` of the labelled table and of both CDC heads →
``OUT/report.html`` and a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from calibclust.errors import CalibclustError

DEFAULT_OUT = "quickstart-out"


@dataclass(frozen=True)
class QuickstartSettings:
    """Stage sizes. ``full`` aims at < 10 min on 2 idle CPU cores, ``fast`` at < 2 min (what CI runs)."""

    pretrain_epochs: int
    cdc_epochs: int
    cdc_batch_size: int
    cdc_views: int
    orth_steps: int
    n_ood_per_kind: int
    digits_limit: int | None

    @classmethod
    def full(cls) -> "QuickstartSettings":
        return cls(pretrain_epochs=100, cdc_epochs=40, cdc_batch_size=300, cdc_views=8, orth_steps=500,
                   n_ood_per_kind=200, digits_limit=None)

    @classmethod
    def fast(cls) -> "QuickstartSettings":
        # Measured on 2 idle cores: 15 MoCo epochs (~35 s) + the full CDC settings (~25 s) give ACC
        # ~80 % with CDC-Cal ECE ~5 % (CDC-Clu ~10 %); 4 epochs, or 3 views and 30 CDC epochs, left
        # the calibration head over-confident (ECE 8-10 %) and --target-accuracy 0.9 realising ~0.71.
        return cls(pretrain_epochs=15, cdc_epochs=40, cdc_batch_size=300, cdc_views=8, orth_steps=500,
                   n_ood_per_kind=60, digits_limit=None)


class QuickstartError(CalibclustError):
    pass


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        return
    try:
        os.symlink(os.path.relpath(src, dst.parent), dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def build_data(out: Path, settings: QuickstartSettings, seed: int) -> dict[str, Path]:
    """Training folder (digits), OOD folder, and the labelling folder: digits + ``_ood/`` (the
    evaluate command's convention for out-of-distribution ground truth)."""
    from calibclust.datasets import make_digits_folder, make_ood_folder
    from calibclust.io.images import discover_images

    data = out / "data"
    digits = make_digits_folder(data / "digits", limit=settings.digits_limit, seed=seed)
    ood = make_ood_folder(data / "ood", n_per_kind=settings.n_ood_per_kind, seed=seed)
    mixed = data / "label-me"
    for path in discover_images(digits):
        _link_or_copy(path, mixed / path.relative_to(digits))
    for path in discover_images(ood):
        _link_or_copy(path, mixed / "_ood" / path.relative_to(ood))
    return {"digits": digits, "ood": ood, "mixed": mixed}


def stage_commands(out: Path, paths: dict[str, Path], settings: QuickstartSettings, seed: int,
                   clusters: int = 10) -> list[tuple[str, list[str]]]:
    """The stages as ``calibclust`` argument lists: train on ``paths["digits"]``, label
    ``paths["mixed"]``, and score both CDC heads on ``paths.get("heads_on", paths["digits"])`` (the
    data zoo passes its held-out split there)."""
    digits, mixed = str(paths["digits"]), str(paths["mixed"])
    heads_on = str(paths.get("heads_on", paths["digits"]))
    model_dir = out / "model"
    s = settings
    return [
        # Settings measured to learn quickly on digits (tests/test_pretrain.py): small batches and a
        # narrow projector; the paper's 4096-wide projector at batch 256 barely moves in a few epochs.
        ("pretrain", ["pretrain", digits, "--out", str(out / "pretrain"), "--backbone", "small",
                      "--epochs", str(s.pretrain_epochs), "--batch-size", "64", "--lr", "0.06",
                      "--proj-hidden-dim", "512", "--proj-dim", "128", "--seed", str(seed), "--no-progress"]),
        ("train cdc", ["train", "cdc", digits, "--out", str(out / "cdc"), "--clusters", str(clusters),
                       "--backbone-weights", str(out / "pretrain"), "--freeze-backbone", "--no-flip",
                       "--epochs", str(s.cdc_epochs), "--batch-size", str(s.cdc_batch_size),
                       "--sub-batch-size", str(s.cdc_batch_size // 2),
                       "--views", str(s.cdc_views), "--orth-steps", str(s.orth_steps), "--seed", str(seed),
                       "--no-progress"]),
        ("export onnx", ["export", "onnx", "--model", str(out / "cdc" / "model"), "--images", digits,
                         "--out", str(model_dir / "model-base.onnx"), "--int8", "--seed", str(seed)]),
        ("exemplars", ["exemplars", digits, "--model", str(model_dir / "model-base.onnx"), "--out", str(model_dir / "model.onnx"),
                       "--no-progress"]),
        ("label", ["label", mixed, "--model", str(model_dir / "model.onnx"), "--out", str(out / "label"),
                   "--overwrite", "--no-progress", "--top-k", "3"]),
        ("evaluate label", ["evaluate", str(out / "label" / "predictions.csv"), "--truth", mixed,
                            "--out", str(out / "eval-label")]),
        ("predict clu", ["predict", heads_on, "--model", str(out / "cdc" / "model"), "--head", "clustering",
                         "--out", str(out / "heads" / "clu.csv"), "--no-progress"]),
        ("predict cal", ["predict", heads_on, "--model", str(out / "cdc" / "model"), "--head", "calibration",
                         "--out", str(out / "heads" / "cal.csv"), "--no-progress"]),
        ("evaluate clu", ["evaluate", str(out / "heads" / "clu.csv"), "--truth", heads_on, "--out", str(out / "eval-clu")]),
        ("evaluate cal", ["evaluate", str(out / "heads" / "cal.csv"), "--truth", heads_on, "--out", str(out / "eval-cal")]),
    ]


def _run_stage(index: int, total: int, name: str, argv: list[str], log_dir: Path, verbose: bool) -> float:
    cmd = [sys.executable, "-m", "calibclust", *argv]
    print(f"[{index}/{total}] {name}: calibclust {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    log_path = log_dir / f"{index:02d}-{name.replace(' ', '-')}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=None if verbose else log, stderr=subprocess.STDOUT if not verbose else None)
    elapsed = time.perf_counter() - start
    # label/exemplars exit 3 when some files were unreadable: the quick start's own files never are.
    if proc.returncode != 0 and name == "export onnx" and (log_dir.parent / "model" / "model-base.onnx").is_file():
        # The fp32 model passed its parity gate and was written; only the INT8 model was refused by
        # its agreement gate. That is a finding to report, not a reason to stop the quick start.
        refused = [l for l in log_path.read_text(errors="replace").splitlines() if "int8 parity gate failed" in l]
        if refused:
            print(f"      INT8 model refused by its gate (fp32 model kept): {refused[-1].split(': ', 2)[-1][:200]}", flush=True)
            return time.perf_counter() - start
    if proc.returncode != 0:
        tail = "" if verbose else "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise QuickstartError(f"stage '{name}' failed (exit {proc.returncode}); log: {log_path}\n{tail}")
    print(f"      done in {elapsed:.1f}s", flush=True)
    return elapsed


def summarise(out: Path) -> dict:
    def load(name):
        return json.loads((out / name / "metrics.json").read_text())

    clu, cal, lab = load("eval-clu"), load("eval-cal"), load("eval-label")
    train_log = out / "cdc" / "log.jsonl"

    def head_row(m):
        c = m["clustering"]
        return {"acc": c["acc"], "nmi": c["nmi"], "ari": c["ari"], "ece": c["calibration"]["ece"],
                "aurc": c["rejection"]["aurc"]}

    kmeans_acc = None
    if train_log.is_file():
        for line in train_log.read_text().splitlines():
            rec = json.loads(line)
            kmeans_acc = rec.get("kmeans_acc", kmeans_acc)
    ood = lab.get("ood") or {}
    dec = lab.get("decisions") or {}
    return {
        "cdc_clu": head_row(clu),
        "cdc_cal": head_row(cal),
        "label": {
            "ood_auroc": ood.get("auroc"),
            "ood_fpr95": ood.get("fpr95"),
            "coverage": dec.get("in_distribution_coverage"),
            "accepted_accuracy": dec.get("accepted_accuracy"),
            "acc_all": lab["clustering"]["acc"],
        },
    }


def format_table(summary: dict) -> str:
    def f(v):
        return "   –  " if v is None else f"{100 * v:6.2f}"

    lines = ["head      ACC %   NMI %   ARI %   ECE %   AURC %", "-" * 50]
    for name, key in (("CDC-Clu", "cdc_clu"), ("CDC-Cal", "cdc_cal")):
        r = summary[key]
        lines.append(f"{name:<8} {f(r['acc'])}  {f(r['nmi'])}  {f(r['ari'])}  {f(r['ece'])}  {f(r['aurc'])}")
    lab = summary["label"]
    lines += [
        "",
        f"labelling digits + out-of-distribution images with the exported model (calibration head):",
        f"  OOD AUROC {f(lab['ood_auroc'])} %   OOD FPR95 {f(lab['ood_fpr95'])} %",
        f"  accepted {f(lab['coverage'])} % of the digits; accuracy of the accepted ones {f(lab['accepted_accuracy'])} % "
        f"(all digits: {f(lab['acc_all'])} %)",
    ]
    return "\n".join(lines)


def write_report(out: Path, summary: dict, timings: dict[str, float]) -> Path:
    """One report.html: summary, the labelled run's reliability diagram, cluster thumbnails."""
    import numpy as np

    from calibclust.io.images import decode_image
    from calibclust.io.predictions import read_predictions
    from calibclust.metrics import CalibrationResult
    from calibclust.report import HTMLReport, plot_reliability_diagram

    report = HTMLReport("calibclust quick start", "sklearn digits → MoCo-v2 → CDC → ONNX → calibclust label")
    report.add_heading("Summary")
    rows = [[name, *(summary[key][m] for m in ("acc", "nmi", "ari", "ece", "aurc"))]
            for name, key in (("CDC-Clu", "cdc_clu"), ("CDC-Cal", "cdc_cal"))]
    report.add_table(rows, header=["head", "ACC", "NMI", "ARI", "ECE", "AURC"], caption="both CDC heads on the training digits")
    lab = summary["label"]
    report.add_table([[k, v] for k, v in lab.items()], header=["labelling (digits + OOD)", "value"])
    cal = json.loads((out / "eval-cal" / "metrics.json").read_text())["clustering"]["calibration"]
    report.add_figure(plot_reliability_diagram(CalibrationResult(**cal), title=None), alt="reliability diagram",
                      caption="CDC-Cal reliability diagram on the training digits")
    table = read_predictions(out / "label" / "predictions.csv")
    report.add_heading("Clusters: most confident accepted images")
    accepted = table["decision"] == "accepted" if "decision" in table else np.ones(len(table["path"]), bool)
    for cluster in sorted(set(table["cluster"][accepted].tolist())):
        idx = np.flatnonzero(accepted & (table["cluster"] == cluster))
        idx = idx[np.argsort(-table["confidence"][idx])][:12]
        images = [decode_image(out / "data" / "label-me" / table["path"][i]) for i in idx]
        name = table["cluster_name"][idx[0]] if "cluster_name" in table else str(cluster)
        report.add_paragraph(f"cluster {cluster} ({name}): {int((table['cluster'][accepted] == cluster).sum())} accepted")
        report.add_thumbnails(images, captions=[f"{table['confidence'][i]:.2f}" for i in idx], size=48,
                              alt=f"cluster {cluster} thumbnails")
    report.add_heading("Stages")
    report.add_table([[k, f"{v:.1f}"] for k, v in timings.items()], header=["stage", "seconds"])
    report.add_paragraph("Detailed reports: eval-label/report.html, eval-cal/report.html, eval-clu/report.html, "
                         "label/report.html.")
    return report.write(out / "report.html")


def run_quickstart(out: str | os.PathLike = DEFAULT_OUT, fast: bool = False, seed: int = 0, verbose: bool = False) -> dict:
    out = Path(out).resolve()
    settings = QuickstartSettings.fast() if fast else QuickstartSettings.full()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"calibclust quickstart ({'fast' if fast else 'full'}) into {out}", flush=True)
    print("[0] data: sklearn digits -> 32x32 PNGs, OOD letters/photos/noise", flush=True)
    paths = build_data(out, settings, seed)
    commands = stage_commands(out, paths, settings, seed)
    (out / "commands.sh").write_text(
        "#!/usr/bin/env bash\nset -e\n" + "".join(f"calibclust {shlex.join(a)}\n" for _, a in commands)
    )
    timings = {"data": time.perf_counter() - start}
    for i, (name, argv) in enumerate(commands, 1):
        timings[name] = _run_stage(i, len(commands), name, argv, out / "logs", verbose)
    summary = summarise(out)
    summary["seconds"] = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(out, summary, timings)
    print()
    print(format_table(summary))
    print(f"\nfinished in {summary['seconds']:.0f}s; report: {report}")
    print(f"rerun any stage with the commands in {out / 'commands.sh'}; try the model in a browser with:")
    print(f"  calibclust demo --model {out / 'model' / 'model.onnx'}")
    return summary


DESCRIPTION = """\
Build a small real image folder (scikit-learn's 1,797 handwritten digits as 32x32 PNGs) and an
out-of-distribution folder (letters, photo patches, noise), pretrain the small backbone with
MoCo-v2, train CDC, export ONNX (fp32 + INT8), label digits + OOD images with rejection and OOD
flags, evaluate against the known labels, and write OUT/report.html. Needs no internet and no GPU."""

EPILOG = """\
outputs in OUT: data/, pretrain/, cdc/ (checkpoint + log.jsonl), model/model.onnx (+ .int8.onnx,
exemplar sidecar), label/ (predictions.csv, summary.json, report.html), eval-*/ (metrics.json,
report.html), report.html, summary.json, commands.sh (every stage as a command), logs/.

examples:
  calibclust quickstart                  # aimed at ~10 minutes on 2 idle CPU cores
  calibclust quickstart --fast --out /tmp/qs   # smaller settings (what CI runs)
  calibclust demo                        # then open the model in the browser"""


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="end-to-end demo on bundled digits: pretrain, train, export, label, evaluate",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--fast", action="store_true", help="smaller settings (what CI runs); lower quality")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    p.add_argument("--verbose", action="store_true", help="show each stage's own output instead of logging it")
    p.set_defaults(func=lambda args: (run_quickstart(args.out, args.fast, args.seed, args.verbose), 0)[1])
