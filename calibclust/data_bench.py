"""``calibclust bench data``: peak memory and images/s of training's data path against the number of images.

For each N it makes (once, reused) a folder of N PNG digits at the image size, then measures in a
fresh process, so that each peak resident size is that N's alone:

1. **data**: the folder decoded, into the on-disk cache (:mod:`calibclust.io.cache`, what ``fit``
   uses) or into memory (``TrainingData.from_folder`` without a cache, as before the cache);
2. **pretrain**: MoCo-v2 steps on the small backbone, batches read from the images of step 1;
3. **features**: one backbone pass over every image (what CDC's prototype initialisation and the
   evaluation do).

It prints one table (peak RSS after each stage, images/s of each) and, per mode, the largest N's
peak RSS over the peak at 10,000 images (or the smallest N). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_SIZES = "1000,10000,100000"


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=DEFAULT_SIZES, metavar="N,N,...",
                   help="numbers of images to measure (default %(default)s)")
    p.add_argument("--image-size", type=int, default=64, metavar="PX", help="side of the images (default %(default)s)")
    p.add_argument("--modes", default="cache,memory", metavar="MODES",
                   help="cache (on-disk image cache, fit's path) and/or memory (decoded into RAM) (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="MoCo-v2 steps timed per N (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="pretraining batch (default %(default)s)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="where the generated folders and caches go (default: $TMPDIR/calibclust-bench-data); "
                        "100,000 images at 64 px take ~0.4 GB as PNGs and 1.2 GB as a cache")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def make_folder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` of sklearn's digits, each drawn at 60–100 % of a ``size`` px canvas at a random place and
    grey level, as PNGs in ``root/<digit>/`` (written once; a complete folder is reused)."""
    import numpy as np
    from PIL import Image

    from calibclust.datasets import digits_images

    done = root / f".complete-{n}"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    digits, labels = digits_images(size)
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = int(rng.integers(len(digits)))
        side = int(size * rng.uniform(0.6, 1.0))
        canvas = np.full((size, size, 3), int(rng.integers(0, 60)), np.uint8)
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        canvas[y : y + side, x : x + side] = np.asarray(Image.fromarray(digits[k]).resize((side, side), Image.BILINEAR))
        Image.fromarray(canvas).save(root / str(labels[k]) / f"{i:06d}.png", compress_level=1)
    done.write_text("")
    return root


def _peak_rss_mb() -> float:
    # VmHWM: this process's own peak; ru_maxrss of a spawned child starts at its parent's peak.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes


def measure(folder: str, work: str, mode: str, size: int, steps: int, batch: int, threads: int | None) -> dict:
    """One N, one mode, in the calling process (run it in a fresh one)."""
    import shutil

    import torch

    from calibclust.models.clustering import ClusteringModel
    from calibclust.pretrain import MoCoConfig, pretrain
    from calibclust.train.data import TrainingData, embed_images

    if threads:
        torch.set_num_threads(threads)
    row = {"rss_start": _peak_rss_mb()}
    cache = Path(work) / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # time a build, not a reuse
    t0 = time.perf_counter()
    data = TrainingData.from_folder(folder, size, progress=False, cache_dir=cache if mode == "cache" else None)
    row.update(n=data.num_images, data_s=time.perf_counter() - t0, rss_data=_peak_rss_mb())
    config = MoCoConfig(backbone="small", input_size=size, epochs=1000, batch_size=batch, lr=0.06, proj_hidden_dim=512,
                        proj_dim=128, queue_size=4096, seed=0)
    out = Path(work) / "pretrain"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = pretrain(data.images, config, out, progress=False, stop_after_steps=steps)
    row.update(pretrain_s=time.perf_counter() - t0, rss_pretrain=_peak_rss_mb())
    model = ClusteringModel(result.backbone, 2, head_names=("clustering",), predict_head="clustering").eval()
    t0 = time.perf_counter()
    features = embed_images(model, data.images, batch_size=512)
    row.update(features_s=time.perf_counter() - t0, rss_features=_peak_rss_mb(), feature_mb=features.numel() * 4 / 2**20)
    return row


def _child(queue, *args) -> None:
    try:
        queue.put(measure(*args))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _result(queue, proc) -> dict:
    """The child's measurement, or its exit code if it died without one (e.g. killed for memory)."""
    import queue as queues

    while True:
        try:
            r = queue.get(timeout=5)
            proc.join()
            return r
        except queues.Empty:
            if not proc.is_alive():
                return {"error": f"the measuring process died (exit code {proc.exitcode})"}


def run(args) -> int:
    import multiprocessing

    from calibclust.bench import print_table
    from calibclust.errors import InputError

    try:
        sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sizes: expected numbers separated by commas, got {args.sizes!r}") from None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not sizes or min(sizes) < 2 * args.batch_size or set(modes) - {"cache", "memory"} or not modes:
        raise InputError(f"--sizes must be numbers >= {2 * args.batch_size} (twice --batch-size) and --modes "
                         f"cache and/or memory; got {args.sizes!r} and {args.modes!r}")
    work = Path(args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "calibclust-bench-data")
    context = multiprocessing.get_context("spawn")  # a fresh process per measurement: its own peak RSS
    rows, table = {}, []
    for n in sizes:
        print(f"bench data: {n} images at {args.image_size} px (folder made once)", file=sys.stderr, flush=True)
        folder = make_folder(work / f"folder-{n}-{args.image_size}", n, args.image_size)
        for mode in modes:
            queue = context.Queue()
            proc = context.Process(target=_child, args=(queue, str(folder), str(work / f"run-{mode}"), mode,
                                                        args.image_size, args.steps, args.batch_size, args.threads))
            proc.start()
            r = _result(queue, proc)
            if "error" in r:
                print(f"bench data: {n} images, {mode}: {r['error']}", file=sys.stderr)
                continue
            rows[(n, mode)] = r
            table.append([n, mode, round(n / r["data_s"]), round(2 * args.batch_size * args.steps / r["pretrain_s"]),
                          round(n / r["features_s"]), round(r["rss_data"]), round(r["rss_pretrain"]),
                          round(r["rss_features"]), round(n * args.image_size**2 * 3 / 2**20)])
    print(f"Peak resident memory (MB, of a fresh process per row) after each stage, and images/s, on "
          f"{os.cpu_count()} CPU core(s); pretraining counts both views of {args.steps} steps of {args.batch_size}.")
    print_table(["N", "mode", "decode img/s", "pretrain img/s", "features img/s", "RSS data", "RSS pretrain",
                 "RSS features", "pixels MB"], table)
    base = 10_000 if 10_000 in sizes else min(sizes)
    for mode in modes:
        if (base, mode) in rows and (max(sizes), mode) in rows and max(sizes) != base:
            ratio = rows[(max(sizes), mode)]["rss_features"] / rows[(base, mode)]["rss_features"]
            print(f"{mode}: peak RSS at {max(sizes)} images / at {base} images = {ratio:.2f}")
    return 0
