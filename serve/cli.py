"""``calibclust label``: parse arguments, build :class:`LabelOptions`, call :func:`label_folder`.

Imports nothing heavy at module level (``calibclust --help`` must stay fast and torch-free).
"""

from __future__ import annotations

import argparse
import math
import sys

DESCRIPTION = """\
Label every image under FOLDER with an exported calibclust model (.onnx), deciding per image:

  accepted  the model is confident enough: its cluster is the label
  rejected  confidence below the threshold: look at these by hand
  ood       the image looks unlike anything the model was trained on
  error     the file could not be read (the reason is in the table)

The confidence threshold comes from ONE policy (default: the threshold stored in the model):
  --confidence-threshold T  accept confidence >= T
  --coverage F           accept the most confident fraction F of the in-distribution images
  --target-accuracy A    accept the largest set whose mean calibrated confidence is >= A, i.e. whose
                         estimated accuracy is A; needs no labels, and is only as good as the model's
                         calibration (a warning is printed when the model is not calibrated)
The OOD threshold defaults to the one fitted when the model was exported (--ood-threshold to change).

Outputs in --out DIR: predictions.csv (or .parquet/.jsonl) with one row per file found, summary.json,
report.html. Work is saved as it goes: after an interruption (Ctrl-C, a crash, a killed job) rerun the
same command with --resume; the finished table is identical to an uninterrupted run's.
Exit codes: 0 all files labelled, 3 finished but some files were unreadable, 1 failure, 2 bad usage.
"""

EPILOG = """\
examples:
  calibclust label photos/ --model model.onnx --out labels/
  calibclust label photos/ --model model.onnx --out labels/ --target-accuracy 0.95 --top-k 3
  calibclust label photos/ --model model.onnx --out labels/ --coverage 0.8 --sort-into sorted/
  calibclust label photos/ --model model.onnx --out labels/ --resume        # after an interruption
  calibclust label photos/ --model model.onnx --out labels/ --format parquet --probs --embeddings  # for curation tools
  calibclust label photos/ --model model.onnx --out labels/ --format parquet --engine ray
      (Ray: a local instance by default; set RAY_ADDRESS=ray://head:10001 to use a cluster)
"""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _ood(text: str) -> float:
    if text.lower() in ("none", "off", "inf"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    from calibclust.io.images import DEFAULT_MAX_BYTES

    p.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively; hidden files skipped)")
    p.add_argument("--model", required=True, metavar="MODEL", help="exported model (.onnx from 'calibclust export onnx')")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    g = p.add_argument_group("decisions (choose at most one confidence policy)")
    policy = g.add_mutually_exclusive_group()
    policy.add_argument("--confidence-threshold", type=_fraction, metavar="T",
                        help="accept images with confidence >= T (default: the model's stored threshold)")
    policy.add_argument("--coverage", type=_fraction, metavar="F",
                        help="accept the most confident fraction F (0 < F <= 1) of in-distribution images")
    policy.add_argument("--target-accuracy", type=_fraction, metavar="A",
                        help="accept the largest set whose estimated accuracy (mean calibrated confidence) is >= A")
    g.add_argument("--ood-threshold", type=_ood, metavar="X",
                   help="flag ood_score > X as out-of-distribution (default: the model's; 'none' disables)")
    o = p.add_argument_group("outputs")
    o.add_argument("--format", choices=("csv", "parquet", "jsonl"), default="csv", help="table format (default csv)")
    o.add_argument("--top-k", type=int, default=0, metavar="K", help="add the K most probable clusters per image")
    o.add_argument("--probs", action="store_true", help="add prob_<c> columns (every cluster's probability)")
    o.add_argument("--embeddings", action="store_true",
                   help="also write embeddings.npy: the model's embedding of every file, row i = the table's row i "
                        "(float32, memory-mappable with numpy.load(..., mmap_mode='r'); NaN rows for unreadable files)")
    o.add_argument("--sort-into", metavar="DIR",
                   help="also build DIR/<cluster>/, DIR/_rejected/, DIR/_ood/, DIR/_errors/ of symlinks "
                        "(never overwrites an existing file; DIR must be outside FOLDER; clusters whose names "
                        "give the same folder name get _<cluster id> appended)")
    o.add_argument("--copy", action="store_true", help="with --sort-into: copy files instead of symlinking")
    o.add_argument("--no-csv-escape", action="store_true",
                   help="write CSV cells that begin with = + - @ as they are (by default they get a leading ' so "
                        "spreadsheets show them as text instead of running them as formulas; calibclust's own "
                        "readers remove it)")
    o.add_argument("--no-report", action="store_true",
                   help="skip report.html (accepted images per cluster, set-aside images with reasons, histograms)")
    r = p.add_argument_group("running")
    r.add_argument("--backend", default="auto", metavar="NAME",
                   help="auto (default: the first of TensorRT > CUDA > CPU that starts here; one that onnxruntime "
                        "lists but cannot start is passed over with a note), cpu, cuda, tensorrt")
    r.add_argument("--batch-size", type=int, metavar="N", help="images per inference batch (default: 256 CPU, 512 GPU)")
    r.add_argument("--workers", type=int, metavar="N", help="decode workers (default: one per CPU core; 0 = none)")
    r.add_argument("--worker-type", choices=("thread", "process"), default="thread",
                   help="decode in threads (default; measured faster on small machines) or processes "
                        "(may scale better on many cores; calibclust bench label compares both)")
    r.add_argument("--threads", type=int, metavar="N", help="inference threads (default: onnxruntime's, one per core)")
    r.add_argument("--max-pixels", type=int, metavar="N", help="refuse images larger than N pixels (default 100,000,000)")
    r.add_argument("--max-file-mb", type=float, metavar="MB", default=DEFAULT_MAX_BYTES / 2**20,
                   help="refuse files larger than MB MiB before reading them (an 'error' row; default %(default)g)")
    r.add_argument("--resume", action="store_true", help="finish an interrupted run in --out (same options required)")
    r.add_argument("--checkpoint-every-images", type=int, default=4096, metavar="N",
                   help="save finished results for --resume every N images or 5 s, whichever first (default 4096)")
    r.add_argument("--overwrite", action="store_true", help="replace results or an unfinished run already in --out")
    r.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default) or ray: Ray Data on a local instance, or the cluster in RAY_ADDRESS")
    r.add_argument("--ray-actors", type=int, metavar="N", help="with --engine ray: inference actors, one model session each (default: one per CPU of the Ray cluster)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "label",
        help="label a folder of images with rejection and OOD flags (torch-free)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_label_arguments(p)
    p.set_defaults(func=run)


def options_from_args(args):
    from calibclust.io.images import DEFAULT_MAX_PIXELS
    from calibclust.serve.pipeline import LabelOptions
    from calibclust.serve.policy import Policy

    if args.coverage is not None:
        policy = Policy("coverage", args.coverage, args.ood_threshold)
    elif args.target_accuracy is not None:
        policy = Policy("target_accuracy", args.target_accuracy, args.ood_threshold)
    else:
        policy = Policy("min_confidence", args.confidence_threshold, args.ood_threshold)
    return LabelOptions(
        folder=args.folder,
        model=args.model,
        out_dir=args.out,
        backend=args.backend,
        policy=policy,
        table_format=args.format,
        top_k=args.top_k,
        write_probs=args.probs,
        write_embeddings=args.embeddings,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        max_file_mb=args.max_file_mb,
        csv_escape=not args.no_csv_escape,
        workers=args.workers,
        worker_type=args.worker_type,
        threads=args.threads,
        resume=args.resume,
        overwrite=args.overwrite,
        sort_into=args.sort_into,
        copy=args.copy,
        report=not args.no_report,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every_images,
        engine=args.engine,
        ray_actors=args.ray_actors,
    )


def _sigterm_as_interrupt(signum, frame):
    # Batch schedulers (SLURM, Kubernetes) stop jobs with SIGTERM: treat it like Ctrl-C so finished
    # batches are saved for --resume before exiting.
    raise KeyboardInterrupt


def run(args) -> int:
    import signal
    import threading

    from calibclust.serve.pipeline import label_folder

    opts = options_from_args(args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    result = label_folder(opts)
    s = result.summary
    th, c = s["thresholds"], s["counts"]

    def fmt(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"

    print(
        f"{s['files']} files: {c['accepted']} accepted, {c['rejected']} rejected, {c['ood']} ood, "
        f"{c['error']} unreadable\n"
        f"policy {th['policy']}: confidence >= {fmt(th['confidence_threshold'], 4)}, "
        f"coverage {fmt(th['coverage'])}, estimated accuracy of accepted {fmt(th['estimated_accuracy'])}\n"
        f"table: {result.table}",
        file=sys.stdout,
    )
    if c["error"]:
        print(f"{c['error']} file(s) could not be read: see the 'error' column (exit code 3)", file=sys.stderr)
    return result.exit_code
