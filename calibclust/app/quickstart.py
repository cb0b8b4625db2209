"""``calibclust quickstart``: ``calibclust fit`` on the bundled digits, then the exported model at work.

1. **data**: scikit-learn's 1,797 handwritten digits as 32×32 PNGs (``OUT/data/digits``, class
   sub-folders) and an out-of-distribution folder of letters, photo patches and noise
   (``OUT/data/ood``);
2. **fit**: :func:`calibclust.app.fitting.fit` on the digits into ``OUT`` itself, holding out
   :data:`HELDOUT_FRACTION` of them (by the same path hash as any ``fit`` run), so every figure the
   quick start prints comes from digits the model never trained on;
3. **label**: the exported ONNX model, through the torch-free labeller, labels the held-out digits
   plus the OOD folder (``OUT/data/label-me``: digits in class sub-folders, OOD images under
   ``_ood/``, the convention of ``calibclust evaluate``), with rejection and OOD flags;
4. **evaluate**: that table against the known labels (``OUT/eval-label``).

Everything runs in this process through the same functions the commands call; ``OUT/commands.sh``
holds the equivalent commands. Rerunning with the same settings continues an interrupted run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from calibclust.errors import InputError
from calibclust.app.runs import continue_or_refuse, record_settings, truth_folder
from calibclust.io.files import atomic_write_text, link_or_copy, write_json_atomic
from calibclust.train.profiles import FIGURES_HELDOUT_FRACTION

DEFAULT_OUT = "quickstart-out"
HELDOUT_FRACTION = FIGURES_HELDOUT_FRACTION  # a fifth of the digits (~350)
SETTINGS_FILE = "quickstart.json"


@dataclass(frozen=True)
class QuickstartSettings:
    """``full`` is ``fit`` with its default budget (sized for 2 CPU cores); ``fast`` fixes a short
    pretraining (what the test suite runs)."""

    pretrain_epochs: int | None  # None: sized by fit to its default budget
    n_ood_per_kind: int

    @classmethod
    def full(cls) -> "QuickstartSettings":
        return cls(pretrain_epochs=None, n_ood_per_kind=200)

    @classmethod
    def fast(cls) -> "QuickstartSettings":
        # Measured with fit on the 1,451 training digits, scored on the 346 held out: 15 MoCo-v2
        # epochs gave ACC 0.73, CDC-Cal ECE 0.09, and --target-accuracy 0.95 realised 0.86 (0.90:
        # 0.88); 30 epochs give ACC 0.84, ECE 0.057 (CDC-Clu 0.10), 0.95 -> 0.956 and 0.90 -> 0.923,
        # for ~30 s more pretraining on 2 idle cores.
        return cls(pretrain_epochs=30, n_ood_per_kind=60)


def build_data(out: Path, settings: QuickstartSettings, seed: int) -> dict[str, Path]:
    """The digits (fit's folder) and the OOD folder, under ``out/data``."""
    from calibclust.datasets import make_digits_folder, make_ood_folder

    data = out / "data"
    return {"digits": make_digits_folder(data / "digits", seed=seed),
            "ood": make_ood_folder(data / "ood", n_per_kind=settings.n_ood_per_kind, seed=seed)}


def heldout_folders(paths: dict[str, Path], fraction: float, n_heldout: int) -> dict[str, Path]:
    """Links to the digits ``fit`` held out (``data/heldout``, class sub-folders; the same rule on the
    same relative paths, checked against fit's count ``n_heldout``) and the labelling folder
    ``data/label-me``: those digits plus the OOD images under ``_ood/``."""
    from calibclust.io.images import discover_images
    from calibclust.train.profiles import heldout_by_path_hash

    digits, data = paths["digits"], paths["digits"].parent
    files = list(discover_images(digits))
    held = heldout_by_path_hash([f.relative_to(digits).as_posix() for f in files], fraction)
    if int(held.sum()) != n_heldout:
        raise InputError(f"fit held out {n_heldout} digits, the rule picks {int(held.sum())} of {digits} "
                         "(an unreadable digit?); delete the quick start's folder and run it again")
    for path, is_held in zip(files, held):
        if is_held:
            link_or_copy(path, data / "heldout" / path.relative_to(digits))
    return {"heldout": data / "heldout", "label-me": truth_folder(data / "label-me", data / "heldout", {"": paths["ood"]})}


def summarise(run: dict, label_metrics: dict) -> dict:
    """Both CDC heads on the held-out digits (fit's evaluate stage) and the labelling figures."""
    heldout = run["stages"]["evaluate"]["heldout"]
    keys = ("acc", "nmi", "ari", "ece", "aurc")
    ood = label_metrics.get("ood") or {}
    decisions = label_metrics.get("decisions") or {}
    return {
        "figures_on": f"{heldout['n']} held-out digits, never trained on",
        "heldout_images": heldout["n"],
        "cdc_clu": {k: heldout["CDC-Clu"][k] for k in keys},
        "cdc_cal": {k: heldout["CDC-Cal"][k] for k in keys},
        "label": {
            "ood_auroc": ood.get("auroc"),
            "ood_fpr95": ood.get("fpr95"),
            "coverage": decisions.get("in_distribution_coverage"),
            "accepted_accuracy": decisions.get("accepted_accuracy"),
            "acc_all": label_metrics["clustering"]["acc"],
        },
    }


def format_table(summary: dict) -> str:
    def f(v):
        return "   –  " if v is None else f"{100 * v:6.2f}"

    lines = [f"on the {summary['figures_on']}:", "head      ACC %   NMI %   ARI %   ECE %   AURC %", "-" * 50]
    for name, key in (("CDC-Clu", "cdc_clu"), ("CDC-Cal", "cdc_cal")):
        r = summary[key]
        lines.append(f"{name:<8} {f(r['acc'])}  {f(r['nmi'])}  {f(r['ari'])}  {f(r['ece'])}  {f(r['aurc'])}")
    lab = summary["label"]
    lines += [
        "",
        "labelling the held-out digits + out-of-distribution images with the exported model (calibration head):",
        f"  OOD AUROC {f(lab['ood_auroc'])} %   OOD FPR95 {f(lab['ood_fpr95'])} %",
        f"  accepted {f(lab['coverage'])} % of the digits; accuracy of the accepted ones {f(lab['accepted_accuracy'])} % "
        f"(all digits: {f(lab['acc_all'])} %)",
    ]
    return "\n".join(lines)


def _append_commands(out: Path, folders: dict[str, Path]) -> None:
    """fit's commands.sh plus the labelling and evaluation the quick start ran."""
    path = out / "commands.sh"
    label_me, model = str(folders["label-me"]), str(out / "model.onnx")
    extra = (
        "# the quick start then labelled the held-out digits + OOD images and scored the table:\n"
        f"calibclust {shlex.join(['label', label_me, '--model', model, '--out', str(out / 'label'), '--overwrite', '--top-k', '3'])}\n"
        f"calibclust {shlex.join(['evaluate', str(out / 'label' / 'predictions.csv'), '--truth', label_me, '--out', str(out / 'eval-label')])}\n"
    )
    text = path.read_text()
    if extra not in text:
        atomic_write_text(path, text + extra)


def run_quickstart(out: str | os.PathLike = DEFAULT_OUT, fast: bool = False, seed: int = 0, verbose: bool = False) -> dict:
    from calibclust.app.fitting import fit
    from calibclust.evaluate import evaluate_predictions
    from calibclust.serve.labeler import Labeler

    out = Path(out).resolve()
    settings = QuickstartSettings.fast() if fast else QuickstartSettings.full()
    wanted = {**asdict(settings), "seed": seed, "heldout_fraction": HELDOUT_FRACTION}
    resume = continue_or_refuse(out, SETTINGS_FILE, wanted, out, "quick start")
    record_settings(out, SETTINGS_FILE, wanted)
    start = time.perf_counter()
    print(f"calibclust quickstart ({'fast' if fast else 'full'}) into {out}" + (" (continuing)" if resume else ""), flush=True)
    print("data: sklearn digits -> 32x32 PNGs, OOD letters/photos/noise", flush=True)
    paths = build_data(out, settings, seed)
    result = fit(paths["digits"], out, clusters=10, resume=resume, heldout_fraction=HELDOUT_FRACTION, seed=seed,
                 progress=verbose, pretrain_epochs=settings.pretrain_epochs)
    folders = heldout_folders(paths, result.plan.heldout_fraction, result.plan.n_heldout)
    _append_commands(out, folders)
    print(f"label: {folders['label-me']} (held-out digits + OOD) with the exported model", flush=True)
    Labeler(result.model_path).label_folder(folders["label-me"], out / "label", overwrite=True, top_k=3, progress=verbose)
    label_metrics = evaluate_predictions(out / "label" / "predictions.csv", folders["label-me"], out / "eval-label")
    summary = summarise(result.run, label_metrics)
    summary["seconds"] = time.perf_counter() - start
    write_json_atomic(out / "summary.json", summary)
    print()
    print(format_table(summary))
    print(f"\nfinished in {summary['seconds']:.0f}s; report: {out / 'report.html'} (labelling: {out / 'label' / 'report.html'})")
    print(f"the equivalent commands are in {out / 'commands.sh'}; try the model in a browser with:")
    print(f"  calibclust demo --model {out / 'model.onnx'}")
    return summary


DESCRIPTION = """\
Runs `calibclust fit` on a small real image folder: scikit-learn's 1,797 handwritten digits as
32x32 PNGs, a fifth of them held out. Pretrains the small backbone with MoCo-v2, trains CDC, exports ONNX
(fp32 + INT8 when its gate passes), then labels the held-out digits plus an out-of-distribution
folder (letters, photo patches, noise) with rejection and OOD flags and scores them against the
known labels. Every printed figure comes from digits the model never trained on. Needs no internet
and no GPU."""

EPILOG = """\
outputs in OUT: fit's (model.onnx + exemplar sidecar, model-base[.int8].onnx, report.html, run.json,
commands.sh, pretrain/, cdc/, cache/), data/ (digits/, ood/, heldout/, label-me/), label/
(predictions.csv, summary.json, report.html), eval-label/ (metrics.json, report.html), summary.json.

examples:
  calibclust quickstart                        # fit with its default budget (~10 minutes on 2 CPU cores)
  calibclust quickstart --fast --out /tmp/qs   # 30 pretraining epochs (what the tests run)
  calibclust demo                              # then open the model in the browser"""


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="calibclust fit on bundled digits, then label held-out digits + OOD images",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}); rerun to continue an interrupted one")
    p.add_argument("--fast", action="store_true", help="30 pretraining epochs instead of fit's budget (what the tests run); lower quality")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    p.add_argument("--verbose", action="store_true", help="progress bars inside the stages")
    p.set_defaults(func=lambda args: (run_quickstart(args.out, args.fast, args.seed, args.verbose), 0)[1])
