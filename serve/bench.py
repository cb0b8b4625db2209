"""End-to-end labelling benchmark: prints one table.

Rows, on generated JPEG folders (default 20,000 at 32×32 and 2,000 at 224×224):

* ``calibclust label`` end to end (discovery, decode + resize in workers, inference, journal, final
  table; the HTML report is skipped) with process and with thread decode workers;
* a plain PyTorch ``DataLoader`` (PIL open → torchvision Resize/ToTensor/Normalize, ``num_workers``
  = the same worker count) + eager model loop over the same files — only when torch and the model's
  checkpoint (``--checkpoint``, the safetensors directory it was exported from) are available; the
  loop is the core's (``calibclust.baseline``), so this module imports neither torch nor the export layer;
* the model-only onnxruntime ceiling: the same session on pre-decoded uint8 batches.

Then peak RSS of the labelling process for two folder sizes (default 10,000 and 100,000 files; the
big folder is hard links to the small one's files, so only discovery/decoding/bookkeeping scale),
each in a fresh subprocess reading its own ``ru_maxrss``.

Timings on a shared machine are noisy: the table says how many cores the machine has and that
other work may run beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL",
                   help="exported contract model (.onnx); default: build one (needs torch and calibclust.export): "
                        "a randomly initialised CDC model on the small backbone, exported with 'calibclust export onnx'")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="the torch checkpoint the model was exported from (for the PyTorch DataLoader row; "
                        "set automatically when the model is built here)")
    p.add_argument("--backbone", default="small", help="backbone of the model built when --model is omitted")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "calibclust-bench"),
                   help="where generated folders are kept between runs (default: %(default)s)")
    p.add_argument("--n-small", type=int, default=20_000, help="32×32 JPEGs (default %(default)s)")
    p.add_argument("--n-large", type=int, default=2_000, help="224×224 JPEGs (default %(default)s)")
    p.add_argument("--rss-sizes", default="10000,100000", help="folder sizes for peak RSS ('' to skip)")
    p.add_argument("--batch-size", type=int, default=256, help="images per inference batch (default %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode workers (both engines)")
    p.add_argument("--threads", type=int, help="inference threads (default: onnxruntime's)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per engine, alternating engines; the best is reported (default %(default)s)")
    p.add_argument("--ceiling-seconds", type=float, default=5.0, help="how long to time the model-only ceiling")
    p.add_argument("--skip-torch", action="store_true", help="leave out the PyTorch DataLoader rows")
    p.add_argument("--out", help="also write the results as JSON here")


# --- data ------------------------------------------------------------------------------------------
def _complete(root: Path, n: int) -> bool:
    marker = root / ".complete"
    return marker.is_file() and marker.read_text().strip() == str(n)


def _write_jpegs(root: Path, start: int, images) -> None:
    """Image ``start + j`` as ``root/<thousands>/<index>.jpg``: 1,000 files per sub-folder."""
    from PIL import Image

    for j, img in enumerate(images):
        i = start + j
        folder = root / f"{i // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:07d}.jpg", quality=90)


def make_small_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 32×32 JPEGs: scikit-learn's digits with random tint, shift and noise (all files differ)."""
    if _complete(root, n):
        return root
    from calibclust.datasets import digits_images

    base, _ = digits_images(32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 2000):
        m = min(2000, n - start)
        idx = rng.integers(0, len(base), m)
        tint = rng.uniform(0.6, 1.0, (m, 1, 1, 3))
        noise = rng.normal(0, 12, (m, 32, 32, 3))
        imgs = np.clip(base[idx] * tint + noise + rng.uniform(0, 40, (m, 1, 1, 3)), 0, 255).astype(np.uint8)
        _write_jpegs(root, start, imgs)
    (root / ".complete").write_text(str(n))
    return root


def make_large_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 224×224 JPEGs: 56-px patches of the photographs matplotlib ships, upscaled, with sensor-like
    noise (the sample photos are too small for many distinct 224-px crops)."""
    if _complete(root, n):
        return root
    from PIL import Image

    from calibclust.datasets import photo_patches

    rng = np.random.default_rng(seed)
    for start in range(0, n, 250):
        m = min(250, n - start)
        small = photo_patches(m, size=56, seed=seed + start)
        imgs = [np.clip(np.asarray(Image.fromarray(p).resize((224, 224), Image.BICUBIC), np.float32)
                        + rng.normal(0, 6, (224, 224, 3)), 0, 255).astype(np.uint8) for p in small]
        _write_jpegs(root, start, imgs)
    (root / ".complete").write_text(str(n))
    return root


def make_linked_folder(root: Path, source: Path, n: int) -> Path:
    """``n`` files (1,000 per sub-folder) that are hard links to ``source``'s JPEGs, cycled."""
    if _complete(root, n):
        return root
    files = sorted(source.rglob("*.jpg"))
    for i in range(n):
        folder = root / f"{i // 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{i:07d}.jpg"
        if not dst.exists():
            try:
                os.link(files[i % len(files)], dst)
            except OSError:  # another filesystem: copy
                dst.write_bytes(files[i % len(files)].read_bytes())
    (root / ".complete").write_text(str(n))
    return root


def build_model(root: Path, backbone: str = "small", clusters: int = 10) -> tuple[str, str]:
    """A randomly initialised model (weights do not change the cost), saved as a checkpoint by the core
    and exported by ``calibclust export onnx`` in a subprocess (serve never imports the export layer);
    returns (onnx path, checkpoint dir)."""
    from calibclust.baseline import save_random_checkpoint, torch_available
    from calibclust.datasets import make_digits_folder
    from calibclust.errors import InputError

    ckpt, onnx_path = root / f"model-{backbone}", root / f"model-{backbone}.onnx"
    if onnx_path.is_file():
        return str(onnx_path), str(ckpt)
    if not torch_available():
        raise InputError("building a benchmark model needs torch and torchvision (pip install 'calibclust[export]'); "
                         "or pass --model")
    save_random_checkpoint(ckpt, backbone, clusters)
    digits = make_digits_folder(root / "digits", limit=500)
    cmd = [sys.executable, "-m", "calibclust", "export", "onnx", "--model", str(ckpt), "--images", str(digits), "--out", str(onnx_path)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InputError(f"exporting the benchmark model failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return str(onnx_path), str(ckpt)


# --- measurements ------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """User + system CPU of this process and of its reaped children (decode workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_label(folder: Path, model: str, args, worker_type: str) -> dict:
    from calibclust.serve.pipeline import LabelOptions, label_folder

    n = sum(1 for _ in folder.rglob("*.jpg"))
    with tempfile.TemporaryDirectory() as out:
        opts = LabelOptions(folder=str(folder), model=model, out_dir=out, batch_size=args.batch_size,
                            workers=args.workers, worker_type=worker_type, threads=args.threads,
                            report=False, progress=False)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        result = label_folder(opts)  # its decode workers are reaped before it returns
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    assert result.summary["files"] == n
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_s": cpu}


def time_torch(folder: Path, checkpoint: str, args) -> dict:
    """A plain PyTorch DataLoader + eager loop over the same files (the core's reference loop)."""
    from calibclust.baseline import dataloader_eager_throughput

    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    return dataloader_eager_throughput(paths, checkpoint, args.batch_size, args.workers, args.threads, _cpu_seconds)


def time_ceiling(folder: Path, model: str, args, min_seconds: float = 5.0) -> dict:
    """Model only: the pipeline's session on pre-decoded batches (no decoding, no I/O)."""
    from calibclust.serve.labeler import Labeler
    from calibclust.serve.pipeline import decode_batch

    labeler = Labeler(model, threads=args.threads)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))[: args.batch_size]
    _, batch, _ = decode_batch(paths, labeler.input_size, labeler.max_pixels,
                               resize=labeler.metadata.resize)
    labeler.predict(batch)  # warm-up
    n, c0, t0 = 0, _cpu_seconds(), time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        labeler.predict(batch, ("confidence", "label", "ood_score"))
        n += len(batch)
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_s": _cpu_seconds() - c0}


# VmHWM (peak RSS of this process image) rather than ru_maxrss: Linux carries ru_maxrss over exec,
# so a child started by a big parent (this benchmark, with torch loaded) would report the parent's peak.
_RSS_SCRIPT = """
import json, resource, sys, tempfile

def peak_kb():
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from calibclust.serve.pipeline import LabelOptions, label_folder
folder, model, bs, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with tempfile.TemporaryDirectory() as out:
    r = label_folder(LabelOptions(folder=folder, model=model, out_dir=out, batch_size=bs, workers=workers,
                                  report=False, progress=False))
print(json.dumps({"files": r.summary["files"],
                  "main_kb": peak_kb()}))
"""


def peak_rss(folder: Path, model: str, args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(folder), model, str(args.batch_size), str(args.workers)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the command -----------------------------------------------------------------------------------
BENCH_HELP = "end-to-end 'calibclust label' images/s vs a PyTorch DataLoader loop and the model-only ceiling"


def register_bench_label(subparsers) -> argparse.ArgumentParser:
    """Add ``calibclust bench label`` through :func:`calibclust.bench.add_bench_target` (``subparsers``
    are the top-level ones); registered through the ``bench-label`` entry point."""
    from calibclust.bench import add_bench_target

    return add_bench_target(subparsers, "label", help=BENCH_HELP, configure=add_bench_arguments, run=run_bench,
                            description=__doc__, epilog=None)


def run_bench(args) -> int:
    from calibclust.serve.labeler import Labeler

    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not args.model:
        args.model, built_ckpt = build_model(root, args.backbone)
        args.checkpoint = args.checkpoint or built_ckpt
        print(f"built {args.model} (random-init CDC model, {args.backbone} backbone, exported by calibclust.export)")
    labeler = Labeler(args.model, threads=args.threads)
    meta = labeler.metadata
    torch_ok = False
    if not args.skip_torch and args.checkpoint:
        from calibclust.baseline import torch_available

        torch_ok = torch_available()
    cores = os.cpu_count()
    print(f"model: {args.model} ({meta.method}, {meta.num_clusters} clusters, input {meta.input_size[0]}x"
          f"{meta.input_size[1]}, backend {labeler.backend_name}); batch {args.batch_size}, "
          f"{args.workers} decode workers; {cores} CPU cores, shared with other work (timings are noisy)",
          flush=True)
    workloads = []
    if args.n_small:
        print(f"preparing {args.n_small} 32x32 JPEGs under {root} ...", flush=True)
        workloads.append(("32x32 JPEG", make_small_folder(root / f"small-{args.n_small}", args.n_small)))
    if args.n_large:
        print(f"preparing {args.n_large} 224x224 JPEGs under {root} ...", flush=True)
        workloads.append(("224x224 JPEG", make_large_folder(root / f"large-{args.n_large}", args.n_large)))
    results = []
    for name, folder in workloads:
        engines = [
            ("onnxruntime model only (ceiling, pre-decoded)",
             lambda f=folder: time_ceiling(f, args.model, args, args.ceiling_seconds)),
            (f"calibclust label, {args.workers} process workers", lambda f=folder: time_label(f, args.model, args, "process")),
            (f"calibclust label, {args.workers} thread workers", lambda f=folder: time_label(f, args.model, args, "thread")),
        ]
        if torch_ok:
            engines.append((f"PyTorch DataLoader({args.workers} workers) + eager",
                            lambda f=folder: time_torch(f, args.checkpoint, args)))
        # Repeats alternate the engines (A B C A B C ...) so that a burst of load from other work on a
        # shared machine hits them alike; the best run of each is reported (the least disturbed one).
        runs: dict[str, list[dict]] = {label: [] for label, _ in engines}
        for _ in range(max(1, args.repeats)):
            for label, measure in engines:
                runs[label].append(measure())
                print(f"  {name} | {label}: {runs[label][-1]['images_per_s']:.0f} images/s", flush=True)
        best = {label: max(rs, key=lambda r: r["images_per_s"]) for label, rs in runs.items()}
        ceiling = best[engines[0][0]]
        torch_row = best.get(engines[-1][0]) if torch_ok else None
        for label, _ in engines:
            r = best[label]
            results.append({
                "workload": name, "engine": label, **{k: round(v, 3) for k, v in r.items()},
                "runs_images_per_s": [round(x["images_per_s"], 1) for x in runs[label]],
                "vs_torch": round(r["images_per_s"] / torch_row["images_per_s"], 2) if torch_row else None,
                "vs_ceiling": round(r["images_per_s"] / ceiling["images_per_s"], 3),
            })
    header = (f"| {'workload':<13}| {'engine':<48}| {'images':>7} | {'seconds':>8} | {'images/s':>9} | "
              f"{'vs torch':>8} | {'vs ceiling':>10} | {'CPU s / 1k img':>14} |")
    print()
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        vt = "n/a" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}x"
        print(f"| {r['workload']:<13}| {r['engine']:<48}| {r['images']:>7} | {r['seconds']:>8.2f} | "
              f"{r['images_per_s']:>9.0f} | {vt:>8} | {r['vs_ceiling'] * 100:>9.1f}% | "
              f"{1000 * r['cpu_s'] / r['images']:>14.3f} |")
    try:
        load = os.getloadavg()
        print(f"load average during the run (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {cores} cores; "
              "'CPU s / 1k img' (user+system, workers included) is the contention-independent cost")
    except OSError:
        pass
    if not torch_ok:
        why = "--skip-torch" if args.skip_torch else ("no --checkpoint given" if not args.checkpoint else "torch not installed")
        print(f"(PyTorch DataLoader rows left out: {why})")
    rss = []
    sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
    if sizes and args.n_small:
        print()
        for n in sizes:
            print(f"preparing {n} files (hard links) for peak RSS ...", flush=True)
            folder = make_linked_folder(root / f"linked-{n}", root / f"small-{args.n_small}", n)
            r = peak_rss(folder, args.model, args)
            rss.append({"files": n, "main_mb": r["main_kb"] / 1024})
        print(f"peak RSS of 'calibclust label' (default options: {args.workers} decode threads in the process)")
        print("| files   | peak RSS (MB) | vs first |")
        print("|---------|---------------|----------|")
        for r in rss:
            print(f"| {r['files']:>7} | {r['main_mb']:>13.1f} | {r['main_mb'] / rss[0]['main_mb']:>7.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps({"throughput": results, "rss": rss}, indent=2))
    return 0
