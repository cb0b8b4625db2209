"""``calibclust bench TARGET``: benchmark commands that print tables (never timed tests).

Targets register through one helper, so any module can add its own without touching this file:

    # in mymodule.py, listed in calibclust.cli.COMMANDS (or, in another package, under
    # [project.entry-points."calibclust.commands"])
    def register_cli(subparsers):
        from calibclust.bench import add_bench_target
        add_bench_target(subparsers, "model", help="...", configure=_add_options, run=_run)

:func:`add_bench_target` finds (or creates) the ``bench`` command on the top-level subparsers and
adds ``bench model`` under it; entry-point load order does not matter. This module itself
registers ``bench pretrain`` (MoCo-v2 step throughput), ``bench data`` (:mod:`calibclust.data_bench`:
memory and speed against the number of images), ``bench kmeans`` (ours vs scikit-learn), ``bench
choose-k`` (:mod:`calibclust.zoo`) and ``bench calibration`` (:mod:`calibclust.train.calibration`) on
the data zoo's held-out splits. ``bench zoo`` runs ``calibclust fit`` and so lives in the application
layer (:mod:`calibclust.app.zoo_bench`), which adds it here through the same helper.
Nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Callable

from calibclust.cli_names import device_arg
from calibclust.models.names import FIT_INPUT_FILTERS, INPUT_FILTERS

_TARGETS_ATTR = "_calibclust_bench_targets"


def _bench_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.choices.get("bench")
    if parser is None:
        parser = subparsers.add_parser(
            "bench",
            help="benchmarks that print tables (throughput, quality vs reference implementations)",
            description="Run a benchmark and print its table. Each TARGET has its own options.",
            epilog="Run 'calibclust bench TARGET --help' for the options of one benchmark.",
        )
        targets = parser.add_subparsers(dest="bench_target", metavar="TARGET")
        setattr(parser, _TARGETS_ATTR, targets)

        def _no_target(args) -> int:
            parser.print_help()
            return 2

        parser.set_defaults(func=_no_target)
    return parser


def add_bench_target(
    subparsers,
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """Add ``calibclust bench NAME``: ``configure(parser)`` adds its options, ``run(args)`` runs it
    (imports heavy modules inside) and returns an exit code. Returns the target's parser."""
    targets = getattr(_bench_parser(subparsers), _TARGETS_ATTR)
    if name in targets.choices:
        raise ValueError(f"bench target {name!r} is registered twice")
    p = targets.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure(p)
    p.set_defaults(func=run)
    return p


def print_table(headers: list[str], rows: list[list], file=None) -> None:
    """A plain fixed-width table (right-aligned numbers), for benchmark output."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    print("\n".join(lines), file=file, flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.4g}" if abs(v) >= 0.001 else f"{v:.3g}"
    return str(v)


def _machine_line(device) -> str:
    import torch

    where = f"{device}"
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    # The load average is printed because CPU timings on a shared machine mean little without it.
    return f"device {where}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads; {os.cpu_count()} CPUs visible{load}"


# --- bench pretrain -------------------------------------------------------------------------------


def _pretrain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="small", choices=("small", "resnet18", "resnet34", "resnet50"),
                   help="architecture timed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (each gives two views)")
    p.add_argument("--image-size", type=int, default=32, metavar="PX", help="side of the images in pixels (default %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--proj-hidden-dim", type=int, default=None, help="projector hidden width (default: MoCoConfig's)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data", choices=("digits", "random"), default="digits", help="digits (real) or random pixels")
    p.add_argument("--bf16", action="store_true", help="also time bf16 + channels_last on a CPU without native "
                   "bf16 (emulated; on CPUs with AVX-512 BF16 / AMX that row is always printed)")


def _run_pretrain(args) -> int:
    import numpy as np
    import torch

    from calibclust.augment import MoCoAugment
    from calibclust.precision import cpu_bf16_supported, training_precision
    from calibclust.device import resolve_device
    from calibclust.pretrain import MoCoConfig, _build_modules, info_nce

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kw = {"proj_hidden_dim": args.proj_hidden_dim} if args.proj_hidden_dim else {}
    config = MoCoConfig(backbone=args.backbone, input_size=args.image_size, batch_size=args.batch_size, **kw)
    b = args.batch_size
    if args.data == "digits":
        from calibclust.datasets import digits_images

        pool, _ = digits_images(args.image_size)
        pool = pool[np.arange(b) % len(pool)]
    else:
        pool = np.random.default_rng(0).integers(0, 256, (b, args.image_size, args.image_size, 3), dtype=np.uint8)
    x = torch.from_numpy(pool).to(device)
    aug = MoCoAugment(config.augment, args.image_size)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(precision) -> tuple[float, float, int]:
        torch.manual_seed(0)  # the same model and data in every mode
        moco = _build_modules(config, n_images=10 * b, world_batch=b).to(device).train()
        if precision.channels_last:
            moco.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        t_aug = t_total = 0.0
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            views = aug(torch.cat([x, x]), torch.Generator().manual_seed(i))
            if precision.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            sync()
            t1 = time.perf_counter()
            with precision.autocast(device):
                q = torch.nn.functional.normalize(moco.encoder_q(views[:b]).float(), dim=1)
                with torch.no_grad():
                    moco.momentum_update()
                    k = torch.nn.functional.normalize(moco.encoder_k(views[b:]).float(), dim=1)
            loss = info_nce(q, k, moco.queue.clone(), config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            moco.enqueue(k)
            sync()
            t2 = time.perf_counter()
            if i >= args.warmup:
                t_aug += t1 - t0
                t_total += t2 - t0
        return t_total, t_aug, sum(p.numel() for p in moco.backbone.parameters())

    if device.type == "cpu":
        # Side by side: fp32, and bf16 + channels_last where the CPU has native bf16 (AVX-512 BF16 /
        # AMX); elsewhere bf16 is emulated and many times slower, so it runs only with --bf16.
        native = cpu_bf16_supported()
        modes = [("fp32", training_precision(device, amp=False))]
        if native or args.bf16:
            modes.append(("bf16 + channels_last" + ("" if native else " (emulated: no native bf16)"),
                          training_precision(device, cpu_bf16=True)))
    else:
        modes = [(training_precision(device).label, training_precision(device))]
    steps = max(1, args.steps)
    rows = []
    for name, precision in modes:
        t_total, t_aug, n_params = measure(precision)
        rows.append([
            args.backbone, name, f"{n_params / 1e6:.2f} M", f"{args.image_size}x{args.image_size}", b, 2 * b,
            t_total / steps, t_aug / steps, f"{100 * t_aug / max(t_total, 1e-12):.0f}%",
            2 * b * steps / max(t_total, 1e-12),
        ])
    base = rows[0][-1]
    for row in rows:
        row.append(f"{row[-1] / base:.2f}x")
    print(f"calibclust bench pretrain: MoCo-v2 steps ({_machine_line(device)}; CPU native bf16: "
          f"{cpu_bf16_supported()})")
    print_table(
        ["backbone", "precision", "params", "input", "batch", "views/step", "s/step", "aug s/step", "aug share",
         "images/s (both views)", "vs first"],
        rows,
    )
    return 0


# --- bench kmeans ---------------------------------------------------------------------------------

DEFAULT_KMEANS_CASES = ("60000x512x512", "1000x512x500")


def _parse_case(text: str) -> tuple[int, int, int]:
    try:
        n, d, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"case must be NxDxK (e.g. 1000x512x500), got {text!r}") from None
    if not (n >= 1 and d >= 1 and 1 <= k <= n):
        raise argparse.ArgumentTypeError(f"case {text!r}: need N, D >= 1 and 1 <= K <= N")
    return n, d, k


def _kmeans_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--case",
        dest="cases",
        action="append",
        type=_parse_case,
        metavar="NxDxK",
        help=f"data size and clusters; repeatable (default: {' and '.join(DEFAULT_KMEANS_CASES)})",
    )
    p.add_argument("--n-init", type=int, default=1, help="k-means++ restarts for both (default 1)")
    p.add_argument("--max-iter", type=int, default=100, help="Lloyd iterations at most, both (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of k-means++ (default %(default)s)")
    p.add_argument("--clusters-in-data", type=int, default=None, help="true clusters in the synthetic data (default K)")
    p.add_argument("--device", type=device_arg, default="cpu", help="device of our k-means (default cpu; sklearn is always CPU)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and for sklearn (threadpoolctl)")


def make_blobs(n: int, d: int, centers: int, seed: int = 0, noise: float = 0.5):
    """Gaussian mixture in d dims (float32): ``centers`` standard-normal centres, isotropic noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32)
    labels = rng.integers(0, centers, n)
    return (c[labels] + noise * rng.normal(size=(n, d)).astype(np.float32)).astype(np.float32)


def _run_kmeans(args) -> int:
    import numpy as np
    import torch
    from sklearn.cluster import KMeans

    from calibclust.cluster.kmeans import kmeans
    from calibclust.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cases = args.cases or [_parse_case(c) for c in DEFAULT_KMEANS_CASES]
    rows = []
    print(
        f"calibclust bench kmeans: ours (torch, {device}) vs sklearn.cluster.KMeans (lloyd), n_init={args.n_init}, "
        f"max_iter={args.max_iter}, seed={args.seed}, Gaussian blobs ({_machine_line(device)})",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        if args.threads:
            from threadpoolctl import threadpool_limits  # a scikit-learn dependency

            stack.enter_context(threadpool_limits(args.threads))
        # Warm both up (torch kernels, sklearn's thread pools) so the first case is not penalised.
        warm = make_blobs(256, 16, 8, args.seed)
        kmeans(torch.from_numpy(warm).to(device), 8, n_init=1, max_iter=5, seed=0)
        KMeans(8, n_init=1, max_iter=5, random_state=0).fit(warm)
        for n, d, k in cases:
            x = make_blobs(n, d, args.clusters_in_data or k, args.seed)
            xt = torch.from_numpy(x).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            ours = kmeans(xt, k, n_init=args.n_init, max_iter=args.max_iter, seed=args.seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_ours = time.perf_counter() - t0
            # Same objective, evaluated in float64 on the same data for both.
            inertia_ours = _inertia(x, ours.centers.double().cpu().numpy(), ours.labels.cpu().numpy())
            t0 = time.perf_counter()
            sk = KMeans(k, n_init=args.n_init, max_iter=args.max_iter, random_state=args.seed, algorithm="lloyd").fit(x)
            t_sk = time.perf_counter() - t0
            inertia_sk = _inertia(x, sk.cluster_centers_.astype(np.float64), sk.labels_)
            rows.append(
                [
                    f"{n:,}", d, k, t_ours, t_sk, f"{t_ours / t_sk:.3f}", ours.n_iter, int(sk.n_iter_),
                    inertia_ours, inertia_sk, f"{inertia_ours / inertia_sk:.4f}",
                ]
            )
    print_table(HEADERS, rows)
    print("time ratio = ours / sklearn (below 1: ours faster); inertia ratio = ours / sklearn (below 1: ours better)")
    return 0


HEADERS = ["N", "D", "K", "ours s", "sklearn s", "time ratio", "ours iters", "sk iters", "ours inertia", "sk inertia", "inertia ratio"]


def _inertia(x, centers, labels) -> float:
    import numpy as np

    total = 0.0
    for start in range(0, len(x), 8192):
        xb = x[start : start + 8192].astype(np.float64)
        total += float(((xb - centers[labels[start : start + 8192]]) ** 2).sum())
    return total


# --- the data-zoo benches (calibclust.zoo; imported when they run: numpy and Pillow stay out of CLI start-up) --

ZOO_SETS = ("digits", "digits-geometric", "digits-colour", "letters-fonts", "emoji")  # = calibclust.zoo.ZOO


def zoo_set_options(p: argparse.ArgumentParser, out: str, contents: str, fit_filters: bool = False) -> None:
    """The options every data-zoo bench shares (``bench zoo``, ``choose-k``, ``calibration``): which
    sets, the working folder, settings (:class:`calibclust.zoo.ZooSettings`), seed."""
    p.add_argument("sets", nargs="*", metavar="SET", help="zoo sets to run (default: all, in the order listed below)")
    p.add_argument("--out", default=out, help=f"working folder: {contents} (default {out})")
    p.add_argument("--fast", action="store_true",
                   help="15 MoCo-v2 pretraining epochs instead of 100 (fit --pretrain-epochs 15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage (default 0)")
    if fit_filters:
        p.add_argument("--input-filter", default="auto", choices=FIT_INPUT_FILTERS,
                       help="what the pretrained backbone sees, as fit --input-filter (default auto, fit's)")
    else:
        p.add_argument("--input-filter", default="none", choices=INPUT_FILTERS,
                       help="what the pretrained backbone sees, as pretrain --input-filter (default none)")
    p.add_argument("--verbose", action="store_true", help="progress bars inside the stages")


# --- bench choose-k (calibclust.zoo + calibclust.cluster.choose_k) -----------------------------------

CHOOSE_K_EPILOG = f"""\
Per zoo set ({", ".join(ZOO_SETS)}): calibclust fit's MoCo-v2 pretraining on the train split (the split
fit makes), the backbone's features of the held-out split, then --clusters auto on those features (all classes, and the
first classes only for each --subsets value, to show the choice follows the data and not a constant),
with every criterion's pick and K-means' ACC/NMI at the chosen and the true K.

examples:
  calibclust bench choose-k --fast digits letters-fonts   # about two minutes a set on 2 CPU cores
  calibclust bench choose-k --out runs/choose-k           # every set, 100 pretraining epochs"""


def _class_counts(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class counts like 3,5, got {text!r}") from None


def _choose_k_options(p: argparse.ArgumentParser) -> None:
    from calibclust.cluster.choose_k import DEFAULT_K_RANGE, argparse_type, parse_k_range

    zoo_set_options(p, "choose-k-bench", "data, pretraining, features, choose-k.json")
    p.add_argument("--k-range", type=argparse_type(parse_k_range), default=DEFAULT_K_RANGE, metavar="LOW..HIGH",
                   help=f"K values compared (default {DEFAULT_K_RANGE[0]}..{DEFAULT_K_RANGE[1]})")
    p.add_argument("--subsets", type=_class_counts, default=[5],
                   metavar="N,N", help="also choose K on the first N classes of each set (default 5; '' for none)")


def _run_choose_k(args) -> int:
    from calibclust.zoo import run_choose_k_bench

    return run_choose_k_bench(args)


# --- bench calibration (calibclust.train.calibration) -------------------------------------------------

CALIBRATION_EPILOG = f"""\
Per zoo set ({", ".join(ZOO_SETS)}): calibclust fit's MoCo-v2 pretraining on the train split (the split
fit makes), then K-means, SPICE_s and CDC with fit's CPU settings (the paper's mini-cluster rule
K = B/2, the hard-data rule K = B/25, and the authors' L1-normalised mini-clusters; two seeds each) on
its frozen features, every figure scored on the
held-out split. Beside each measured ECE: three label-free estimates of it (agreement across seeds, with
nearest neighbours, across views) and, for diagnosis, the purity of Eq. 1's mini-clusters and Eq. 4's
pseudo-label share and accuracy. Finished sets are reused from --out.

examples:
  calibclust bench calibration --fast digits letters-fonts   # about 10 minutes a set on 2 CPU cores
  calibclust bench calibration --out runs/calibration         # every set, 100 pretraining epochs"""


def _calibration_options(p: argparse.ArgumentParser) -> None:
    zoo_set_options(p, "calibration-bench", "data, pretraining, calibration.json")


def _run_calibration(args) -> int:
    from calibclust.train.calibration import run_calibration_bench

    return run_calibration_bench(args)


# --- registration ---------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    from calibclust import data_bench  # imports nothing heavy at module level

    add_bench_target(
        subparsers,
        "data",
        help="peak memory and images/s of training's data path against the number of images (cache vs memory)",
        description=data_bench.__doc__,
        configure=data_bench.options,
        run=data_bench.run,
        epilog=("examples:\n  calibclust bench data                                   # 1k, 10k, 100k images at 64 px\n"
                "  calibclust bench data --sizes 2000,20000 --modes cache --threads 2"),
    )
    add_bench_target(
        subparsers,
        "pretrain",
        help="MoCo-v2 training throughput (images/s, both views counted)",
        configure=_pretrain_options,
        run=_run_pretrain,
        epilog="example:\n  calibclust bench pretrain --threads 2            # small backbone, 2x256 views of 32x32",
    )
    add_bench_target(
        subparsers,
        "kmeans",
        help="our torch k-means vs scikit-learn KMeans: time ratio and inertia ratio",
        configure=_kmeans_options,
        run=_run_kmeans,
        epilog=(
            "examples:\n  calibclust bench kmeans                             # 60000x512x512 and 1000x512x500\n"
            "  calibclust bench kmeans --case 1000x512x500 --case 10000x128x100 --threads 2"
        ),
    )
    add_bench_target(
        subparsers,
        "choose-k",
        help="--clusters auto on each data-zoo set's held-out features: chosen vs true K, each criterion's pick",
        configure=_choose_k_options,
        run=_run_choose_k,
        epilog=CHOOSE_K_EPILOG,
    )
    add_bench_target(
        subparsers,
        "calibration",
        help="CDC's calibration per data-zoo set on held-out images, beside K-means, SPICE_s and label-free estimates",
        configure=_calibration_options,
        run=_run_calibration,
        epilog=CALIBRATION_EPILOG,
    )
