"""``calibclust fit FOLDER``: from a user's own image folder to a deployable, calibrated model.

One command and one Python call (:func:`fit`) run, in this process, the stages a user would
otherwise chain as separate commands (``pretrain``, ``train``, ``export onnx``, ``exemplars``,
``label``); ``calibclust quickstart`` is this on the bundled digits:

1. **data**: list and decode the folder once (nested folders, mixed sizes, unreadable files
   skipped and listed); keep a held-out split (default 10 %, chosen by a hash of each file's
   relative path, so it is the same on every resume and independent of listing order);
2. **plan**: look at the images (count, sizes, aspect ratios), the device and the CPU's bf16
   support, and size the pretraining to the time budget (printed before anything trains, saved);
3. **pretrain**: MoCo-v2 on the training split (or ``--backbone-weights``); with ``--clusters auto``
   K is then chosen without labels on its features (:func:`_choose_clusters`);
4. **train**: CDC on the frozen backbone (the CPU profile, :mod:`calibclust.train.profiles`), or any registered
   method (``--method``; :mod:`calibclust.train.methods`); with ``--input-filter auto`` (the default)
   3 and 4 (and the choice of K) run a second time, the backbone seeing gradient magnitudes instead of colours, when the
   label-free shortcut check finds that the first model's clusters follow colour
   (:func:`_choose_input_filter`); with ``--overcluster F`` the method trains ⌈F·K⌉ clusters, merged
   into K afterwards by how its head shares the training images between them (:meth:`calibclust.train.methods.ClusteringMethod.merge_clusters`);
5. **export**: ONNX with the OOD threshold (+ INT8 when its agreement gate passes);
6. **exemplars**: each cluster's most confident training images in a sidecar (the demo's gallery);
7. **evaluate**: the held-out split through the exported model: label-free diagnostics always,
   ACC / NMI / ARI / ECE of every prediction the method reports (CDC: both heads) when the folder
   has class sub-folders.

Outputs in ``--out``: ``model.onnx`` (+ sidecar, ``model-base.onnx``, ``model-base.int8.onnx``),
``report.html``, ``run.json`` (plan, stages, figures), ``commands.sh``, ``pretrain/``, ``METHOD/``,
``cache/`` (the decoded images; delete it once the run is finished to free the disk).
Ctrl-C keeps every finished stage; ``--resume`` continues at the stage (and, inside pretraining and
CDC, at the epoch) where the run stopped.

This module is the application layer: it alone (with :mod:`calibclust.cli`) calls into
training, :mod:`calibclust.export` and :mod:`calibclust.serve` together; the core never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calibclust.cluster.choose_k import DEFAULT_K_RANGE, DEFAULT_MAX_POINTS, add_cluster_args
from calibclust.errors import EXIT_OK, EXIT_PARTIAL, InputError
from calibclust.io.files import atomic_write_text, write_json_atomic
from calibclust.models.names import FIT_INPUT_FILTERS, INPUT_FILTER_HELP
from calibclust.train.methods import METHODS, method_names
from calibclust.train.profiles import (CDC_EPOCHS, CDC_VIEWS, SPICE_HEAD_EPOCHS, SPICE_JOINT_STEPS,
                                       cdc_batch, cdc_hidden, cdc_views, heldout_by_path_hash, moco_config,
                                       pretrain_batch)

RUN_FORMAT = "calibclust-fit/1"
# The decoded images at the input size (calibclust.io.cache): training reads them from disk, so
# the images take no memory however large the folder; a resumed run or FittedModel.export reuses them.
CACHE_DIR = "cache"
DEFAULT_BUDGET_MINUTES = 10.0
DEFAULT_HELDOUT_FRACTION = 0.1
STAGES = ("pretrain", "train", "export", "exemplars", "evaluate")

# The small backbone at 32 px is what 2 CPU cores can pretrain in minutes (the quick start's
# measured setting); larger inputs cost quadratically more per image.
INPUT_SIZE = 32
# Measured with `calibclust fit` on 1,607 training images (small backbone, 32 px, batch 64, bf16
# autocast on a CPU with native bf16): 160 epochs in 256 s on 2 cores, 0.001 s per image and epoch.
CPU_SECONDS_PER_IMAGE_EPOCH_2_THREADS = 0.001
# The same run after pretraining: CDC on the frozen backbone (8 cached views, 40 epochs) 27 s,
# export with its parity and INT8 gates 6 s, exemplars and evaluation 1 s, for 1,797 images.
CPU_SECONDS_AFTER_PRETRAIN_PER_IMAGE = 0.016
# Pretraining in fp32 relative to bf16 autocast, measured side by side on this 2-core machine (3
# epochs of 1,200 digits, best of two: 1.48 vs 0.89 ms per image and epoch). Used when the CPU
# has no native bf16; such a CPU may differ in other ways too.
CPU_FP32_SLOWDOWN = 1.7
FIXED_SECONDS = 10.0
MIN_PRETRAIN_EPOCHS, MAX_PRETRAIN_EPOCHS = 5, 200
SPICE_SECONDS_PER_IMAGE_HEAD_EPOCH, SPICE_SECONDS_PER_JOINT_STEP = 0.0028, 0.4
# Training seconds per training image of the methods with no plan settings of their own (their
# default CPU profiles), from `train compare` on 1,442 digits: DCCM 257 s (2 idle cores), SPC
# 141-207 s (11 rounds, or the 20-round cap; cores shared); GCC 658 s on 1,455 (2 idle cores).
OTHER_METHOD_SECONDS_PER_IMAGE = {"dccm": 0.18, "spc": 0.15, "gcc": 0.45}
# --clusters auto: one k-means sweep (calibclust.cluster.choose_k) on at most 2,000 images' features,
# its cost about proportional to the images times the sum of the K compared: 36 s for K = 2..30
# (sum 464) on 1,797 digits, 2 cores; with the eigengap added, 29 s on 1,455 training images.
CHOOSE_K_SECONDS_PER_IMAGE_K = 36 / (1797 * 464)
# --overcluster F trains ⌈F·K⌉ clusters (at most half the training images, for the top of --k-range);
# only F = 2 is measured (README); beyond a few looks per class each cluster gets few images.
MAX_OVERCLUSTER = 5.0


# --- the plan ------------------------------------------------------------------------------------
@dataclass
class FitPlan:
    """What ``fit`` decided before training, and why (saved in ``run.json``)."""

    folder: str
    clusters: int | str  # K, or "auto": chosen without labels after pretraining (run.json's "clusters_choice")
    n_images: int
    n_unreadable: int
    n_train: int
    n_heldout: int
    labelled: bool
    class_names: list[str]
    image_sizes: dict  # median / min / max width and height, aspect-ratio range (of a sample)
    device: str
    cpu_bf16: bool
    threads: int
    backbone: str
    backbone_weights: str | None
    input_size: int
    resize: str
    pretrain_epochs: int
    pretrain_batch: int
    cdc_epochs: int
    cdc_batch: int
    cdc_hidden: int
    budget_minutes: float
    estimated_minutes: float
    heldout_fraction: float
    seed: int
    files_digest: str = ""  # of the readable files' relative paths: --resume refuses other files
    notes: list[str] = field(default_factory=list)
    method: str = "cdc"  # the registry name (calibclust.train.methods); runs before the option trained CDC
    cdc_views: int = CDC_VIEWS  # cached weak/strong views per image (fewer for large folders)
    input_filter: str = "none"  # what the pretrained backbone sees (FIT_INPUT_FILTERS); runs before the option: none
    k_range: list[int] | None = None  # the K values --clusters auto compares
    overcluster: float | None = None  # train ⌈F·K⌉ clusters and merge them into K (calibclust.cluster.merge)

    def describe_clusters(self) -> str:
        if self.clusters != "auto":
            described = f"{self.clusters} clusters"
        else:
            described = f"K clusters, K chosen without labels from {self.k_range[0]}..{self.k_range[1]} after pretraining"
        if self.overcluster and self.clusters != "auto":
            described += (f" (trained as {trained_clusters(self.clusters, self.overcluster)} = ⌈{self.overcluster:g}·"
                          f"{self.clusters}⌉, merged into {self.clusters} by co-assignment)")
        elif self.overcluster:
            described += f" (trained as ⌈{self.overcluster:g}·K⌉, merged into K by co-assignment)"
        return described

    def describe_method(self) -> str:
        if self.method == "cdc":
            return (f"CDC, {self.describe_clusters()}, frozen backbone, {self.cdc_epochs} epochs, batch {self.cdc_batch}, "
                    f"hidden {self.cdc_hidden}, {self.cdc_views} cached views per image")
        if self.method == "spice":
            return (f"SPICE, {self.describe_clusters()}, stage 2 on the frozen backbone ({SPICE_HEAD_EPOCHS} epochs, batch "
                    f"{self.cdc_batch}), stage 3 {SPICE_JOINT_STEPS} steps training the backbone")
        return f"{self.method}, {self.describe_clusters()}, its default settings"

    def describe(self) -> str:
        sizes = self.image_sizes
        lines = [
            f"plan for {self.folder}:",
            f"  images      {self.n_images} readable ({self.n_unreadable} unreadable, skipped); "
            f"{self.n_train} train / {self.n_heldout} held out ({100 * self.heldout_fraction:.0f} %, by path hash)",
            "  labels      " + (f"{len(self.class_names)} class sub-folders: used for the report only, never to train"
                                 if self.labelled else "none (label-free diagnostics only)"),
            f"  sizes       median {sizes['median_width']}×{sizes['median_height']} px "
            f"(width {sizes['min_width']}–{sizes['max_width']}, aspect {sizes['min_aspect']:.2f}–{sizes['max_aspect']:.2f})",
            f"  input       {self.input_size}×{self.input_size}, resize: {self.resize}",
            f"  device      {self.device}, {self.threads} thread(s), CPU bf16 {'native' if self.cpu_bf16 else 'not native (fp32)'}",
            f"  backbone    {self.backbone}: " + (f"weights from {self.backbone_weights}" if self.backbone_weights
                                                  else f"MoCo-v2 pretraining, {self.pretrain_epochs} epochs, batch {self.pretrain_batch}"
                                                  + ("" if self.input_filter == "none" else f", input filter {self.input_filter}")
                                                  + (" (pretraining and training again, on gradients, if the clusters "
                                                     "follow colour: about twice the estimate)" if self.input_filter == "auto" else "")),
            f"  clustering  {self.describe_method()}",
            f"  budget      {self.budget_minutes:g} min; estimated {self.estimated_minutes:.1f} min",
        ]
        lines += [f"  note        {n}" for n in self.notes]
        return "\n".join(lines)


def files_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode("utf-8")).hexdigest()


def image_sizes(folder: Path, sample: int = 200) -> dict:
    """Sizes read from file headers only (PIL's lazy open) of a fixed sample of the files."""
    from PIL import Image

    from calibclust.io.images import discover_images

    paths = list(discover_images(folder))
    chosen = paths if len(paths) <= sample else [paths[i] for i in np.linspace(0, len(paths) - 1, sample).astype(int)]
    widths, heights = [], []
    for path in chosen:
        try:
            with Image.open(path) as img:
                widths.append(img.width)
                heights.append(img.height)
        except Exception:  # noqa: BLE001 - unreadable files are listed by the decoder, not here
            continue
    if not widths:
        widths, heights = [INPUT_SIZE], [INPUT_SIZE]
    w, h = np.asarray(widths), np.asarray(heights)
    aspect = w / h
    return {"sampled": len(widths), "median_width": int(np.median(w)), "median_height": int(np.median(h)),
            "min_width": int(w.min()), "max_width": int(w.max()), "min_height": int(h.min()), "max_height": int(h.max()),
            "min_aspect": float(aspect.min()), "max_aspect": float(aspect.max())}


def choose_resize(sizes: dict) -> str:
    """``squash`` when every image has about the same shape (nothing is distorted relative to the
    others), else ``center-crop``. Measured with ``fit --budget 4`` on the 1,797 digits drawn at
    60–100 % of the short side at random places on canvases of aspect 0.6–1.6
    (``calibclust.datasets.make_mixed_size_folder``), CDC-Cal ACC on the 190 held-out images, seeds
    0 / 1: center-crop 0.368 / 0.368, letterbox 0.284 / 0.321, squash 0.300 / 0.279. The crop keeps
    the subject larger in the frame; it can cut objects that sit at the edges of wide images."""
    return "squash" if sizes["max_aspect"] / sizes["min_aspect"] <= 1.1 else "center-crop"


def _absolute(weights: str | None) -> str | None:
    """A weights path made absolute (so commands.sh and --resume work from anywhere); other
    specifications (``torchvision:...``) as given."""
    return str(Path(weights).resolve()) if weights and Path(weights).exists() else weights


def make_plan(folder: str, data, sizes: dict, heldout: np.ndarray, clusters: int | str, budget_minutes: float, device: str,
              backbone_weights: str | None, heldout_fraction: float, seed: int, pretrain_epochs: int | None = None,
              method: str = "cdc", input_filter: str = "none", k_range: tuple[int, int] = DEFAULT_K_RANGE,
              overcluster: float | None = None) -> FitPlan:
    import torch

    from calibclust.precision import cpu_bf16_supported

    n_train = int((~heldout).sum())
    threads = torch.get_num_threads()
    notes = []
    bf16 = bool(cpu_bf16_supported())
    if device.startswith("cuda"):
        per_epoch = 0.0
        if not (backbone_weights or pretrain_epochs):
            notes.append(f"the budget is not enforced on a GPU (its pretraining cost is not measured here): "
                         f"{MAX_PRETRAIN_EPOCHS} epochs, the cap")
    else:
        # Measured on 2 cores only; more threads are not assumed to help (small batches of 32 px
        # images scale poorly), so a larger machine finishes early rather than late.
        per_epoch = n_train * CPU_SECONDS_PER_IMAGE_EPOCH_2_THREADS * 2 / min(2, max(1, threads))
        if not bf16:
            per_epoch *= CPU_FP32_SLOWDOWN
    after = CPU_SECONDS_AFTER_PRETRAIN_PER_IMAGE * len(data.paths)
    after += OTHER_METHOD_SECONDS_PER_IMAGE.get(method, 0.0) * n_train
    if method == "spice":
        after += SPICE_HEAD_EPOCHS * n_train * SPICE_SECONDS_PER_IMAGE_HEAD_EPOCH + SPICE_JOINT_STEPS * SPICE_SECONDS_PER_JOINT_STEP
    after = FIXED_SECONDS + after * (0.1 if device.startswith("cuda") else 1)  # CPU measurements; a GPU taken as 10x
    if clusters == "auto":  # the k-means sweep runs on the CPU whatever the device (calibclust.cluster.choose_k)
        after += CHOOSE_K_SECONDS_PER_IMAGE_K * min(n_train, DEFAULT_MAX_POINTS) * sum(range(k_range[0], k_range[1] + 1))
    if backbone_weights:
        epochs = 0
    elif pretrain_epochs is not None:
        epochs = int(pretrain_epochs)
        notes.append(f"{epochs} pretraining epochs as given (--pretrain-epochs), whatever the budget")
    else:
        available = budget_minutes * 60 - after
        epochs = MAX_PRETRAIN_EPOCHS if per_epoch == 0 else int(available // per_epoch)
        if epochs < MIN_PRETRAIN_EPOCHS:
            notes.append(f"the budget allows {max(epochs, 0)} pretraining epochs; running the minimum of {MIN_PRETRAIN_EPOCHS} "
                         f"(raise --budget for better features)")
        epochs = int(min(MAX_PRETRAIN_EPOCHS, max(MIN_PRETRAIN_EPOCHS, epochs)))
    short = min(sizes["median_width"], sizes["median_height"])
    if short > 4 * INPUT_SIZE:
        notes.append(f"images (median short side {short} px) are resized to {INPUT_SIZE}×{INPUT_SIZE}: fine detail is lost; "
                     f"the small backbone at {INPUT_SIZE} px is what the budget on this machine allows")
    if data.resize == "squash" and sizes["max_aspect"] / sizes["min_aspect"] > 1.1:
        notes.append(f"aspect ratios vary ({sizes['min_aspect']:.2f}–{sizes['max_aspect']:.2f}) and images are squashed to a "
                     f"square, which changes shapes differently per image (--resize center-crop or letterbox keep them)")
    return FitPlan(
        folder=str(Path(folder).resolve()), clusters=clusters, n_images=len(data.paths), n_unreadable=len(data.unreadable),
        n_train=n_train, n_heldout=int(heldout.sum()), labelled=data.labels is not None, class_names=list(data.class_names),
        image_sizes=sizes, device=device, cpu_bf16=bf16, threads=threads, backbone="small",
        backbone_weights=_absolute(backbone_weights), input_size=INPUT_SIZE, resize=data.resize,
        pretrain_epochs=epochs, pretrain_batch=pretrain_batch(n_train), cdc_epochs=CDC_EPOCHS,
        cdc_batch=cdc_batch(n_train), cdc_hidden=cdc_hidden(n_train), budget_minutes=float(budget_minutes),
        estimated_minutes=(epochs * per_epoch + after) / 60, heldout_fraction=float(heldout_fraction), seed=seed,
        files_digest=files_digest(data.paths), notes=notes, method=method,
        cdc_views=cdc_views(n_train), input_filter=input_filter, k_range=list(k_range) if clusters == "auto" else None,
        overcluster=float(overcluster) if overcluster else None,
    )


# --- the run ---------------------------------------------------------------------------------------
class FitRun:
    """The state of one ``fit`` output folder: plan, finished stages and figures (``run.json``)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / "run.json"
        self.record: dict = {"format": RUN_FORMAT, "stages": {}}

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> None:
        record = json.loads(self.path.read_text())
        if record.get("format") != RUN_FORMAT:
            raise InputError(f"{self.path}: format {record.get('format')!r}, expected {RUN_FORMAT!r}; use a new --out")
        self.record = record

    def save(self) -> None:
        write_json_atomic(self.path, self.record)

    def done(self, stage: str) -> bool:
        return stage in self.record["stages"]

    def finish(self, stage: str, seconds: float, **info) -> None:
        self.record["stages"][stage] = {"seconds": round(seconds, 2), **info}
        self.save()


@dataclass
class FitResult:
    out: Path
    model_path: Path
    checkpoint: Path
    plan: FitPlan
    run: dict


def _progress(index: int, name: str, started: float, plan: FitPlan) -> None:
    elapsed = (time.perf_counter() - started) / 60
    print(f"[{index}/{len(STAGES)}] {name}  (elapsed {elapsed:.1f} of ~{plan.estimated_minutes:.1f} min)", flush=True)


def fit(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    clusters: int | str,
    budget_minutes: float = DEFAULT_BUDGET_MINUTES,
    device: str = "auto",
    resume: bool = False,
    backbone_weights: str | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = 0,
    progress: bool = True,
    resize: str = "auto",
    pretrain_epochs: int | None = None,
    method: str | None = None,
    input_filter: str | None = None,
    k_range: tuple[int, int] | str | None = None,
    overcluster: float | None = None,
) -> FitResult:
    """Train, export and check a calibrated clustering model on ``folder`` (see the module docstring);
    ``method`` is any registered method (:func:`calibclust.train.methods.method_names`); None: CDC, or
    on ``resume`` the run's own. ``input_filter`` is what the pretrained backbone sees
    (:data:`calibclust.models.names.FIT_INPUT_FILTERS`): ``"none"`` the images, ``"gradient"`` their
    gradient magnitudes (for folders whose colours vary independently of the classes), ``"auto"``
    (None: the default, or on ``resume`` the run's own) the images, then their gradients when the
    trained model's clusters follow colour, brightness or contrast (:func:`_choose_input_filter`).
    ``clusters`` is K, or ``"auto"``: K chosen without labels from ``k_range`` (LOW, HIGH) or
    ``"LOW..HIGH"`` (None: 2..30) on the pretrained backbone's features of the training split
    (:func:`_choose_clusters`). ``overcluster`` F > 1 trains ⌈F·K⌉ clusters and merges them into K by
    how the head shares images between them (:meth:`calibclust.train.methods.ClusteringMethod.merge_clusters`)."""
    from calibclust.device import resolve_device
    from calibclust.train.data import TrainingData

    folder, out = Path(folder), Path(out)
    k_range = _validate(folder, clusters, budget_minutes, heldout_fraction, resize, pretrain_epochs, method or "cdc",
                        input_filter or "auto", backbone_weights, k_range, overcluster)
    run = FitRun(out)
    if run.exists() and not resume:
        raise InputError(f"{out} already holds a fit run (run.json); pass --resume to continue it or choose a new --out")
    if resume and not run.exists():
        raise InputError(f"nothing to resume: {run.path} does not exist")
    stale = [name for base in ("pretrain", method or "cdc") for name in (base, f"{base}-none")
             if not resume and (out / name).exists()]
    if stale:  # another run's training state: a new run would resume it unasked, with other settings
        raise InputError(f"{out} holds training state ({', '.join(n + '/' for n in stale)}) but no run.json; "
                         "delete it or choose a new --out")
    started = time.perf_counter()
    print(f"[0/{len(STAGES)}] data: reading {folder}", flush=True)
    device = str(resolve_device(device))
    if resume:
        # The run's own plan decides the split, resize policy and sizes; only the device may change.
        run.load()
        plan = FitPlan(**run.record["plan"])
        data = TrainingData.from_folder(folder, plan.input_size, progress=progress, resize=plan.resize,
                                        cache_dir=out / CACHE_DIR)
        differences = [f"{name}: the run has {then}, now {now}" for name, then, now in (
            ("clusters", plan.clusters, clusters), ("seed", plan.seed, seed), ("method", plan.method, method or plan.method),
            # with --backbone-weights the weights bring their filter: the plan's "none" is no choice
            ("input filter", plan.input_filter, input_filter if input_filter and not plan.backbone_weights else plan.input_filter),
            ("K range", plan.k_range, list(k_range) if k_range else plan.k_range),
            ("overcluster", plan.overcluster, float(overcluster) if overcluster else plan.overcluster))
            if then != now]
        if plan.files_digest and files_digest(data.paths) != plan.files_digest:
            differences.append(f"files: the run had {plan.n_images} readable files, now {len(data.paths)}"
                               + (" (not the same ones)" if len(data.paths) == plan.n_images else ""))
        if differences:
            raise InputError("--resume with other settings or files (" + "; ".join(differences) + "); use a new --out")
        if device != plan.device:
            print(f"note: the run was planned for {plan.device}; it continues on {device}", flush=True)
        # Same files (the digest covers relative paths): a moved folder continues from its new place.
        plan.device, plan.folder = device, str(folder.resolve())
        run.record["plan"].update(device=plan.device, folder=plan.folder)
        run.save()
        print(f"resuming {out}: finished stages {', '.join(run.record['stages']) or 'none'} "
              f"(the saved plan is kept: its budget, split and resize policy)", flush=True)
        heldout = heldout_by_path_hash(data.paths, plan.heldout_fraction)
    else:
        sizes = image_sizes(folder)
        resize = choose_resize(sizes) if resize == "auto" else resize
        new_out = not out.exists()
        data = TrainingData.from_folder(folder, INPUT_SIZE, progress=progress, resize=resize, cache_dir=out / CACHE_DIR)
        heldout = heldout_by_path_hash(data.paths, heldout_fraction)
        n_train = int((~heldout).sum())
        k_range = k_range or DEFAULT_K_RANGE
        # --clusters auto compares K with at least 3 images per cluster (calibclust.cluster.choose_k).
        # --overcluster trains ⌈F·K⌉ clusters, at most half the images (under auto, for the highest K).
        needed = max(20, 3 * k_range[0]) if clusters == "auto" else max(20, 2 * trained_clusters(clusters, overcluster))
        if clusters == "auto" and overcluster:
            needed = max(needed, 2 * trained_clusters(k_range[1], overcluster))
        if n_train < needed:
            shutil.rmtree(out / CACHE_DIR, ignore_errors=True)  # a refused run leaves nothing behind
            if new_out:
                with contextlib.suppress(OSError):
                    out.rmdir()
            wanted = f"--k-range {k_range[0]}..{k_range[1]}" if clusters == "auto" else f"{clusters} clusters"
            rule = "max(20, 3 × the lowest K)" if clusters == "auto" else "max(20, 2 × clusters)"
            if overcluster:
                top = k_range[1] if clusters == "auto" else clusters
                wanted += f" trained as up to {trained_clusters(top, overcluster)} (--overcluster {overcluster:g})"
                rule += ", and 2 × the clusters trained"
            raise InputError(f"{n_train} training images for {wanted}; fit needs at least {needed} ({rule}) "
                             f"after holding out {100 * heldout_fraction:.0f} %")
        plan = make_plan(str(folder), data, sizes, heldout, clusters, budget_minutes, device, backbone_weights, heldout_fraction, seed,
                         pretrain_epochs, method or "cdc", "none" if backbone_weights else input_filter or "auto",
                         k_range, overcluster)
        out.mkdir(parents=True, exist_ok=True)
        _write_commands(out, plan)
        run.record.update(plan=asdict(plan), unreadable=[list(u) for u in data.unreadable])
        run.save()
    print(plan.describe(), flush=True)
    if data.unreadable:
        print(f"warning: skipped {len(data.unreadable)} unreadable file(s), e.g. {data.unreadable[0][0]}: "
              f"{data.unreadable[0][1]} (all listed in run.json)", file=sys.stderr)
    train, held = data.subset(~heldout), data.subset(heldout)

    _progress(1, "pretrain", started, plan)
    backbone, info = _pretrain_stage(run, plan, train, progress)
    _choose_clusters(run, plan, train, backbone, info, progress)
    _progress(2, f"train ({plan.method})", started, plan)
    checkpoint = _train_stage(run, plan, train, held, backbone, info, progress)
    if _choose_input_filter(run, plan, train, checkpoint) == "gradient" and not run.done("train"):
        _progress(1, "pretrain again, on gradient magnitudes", started, plan)
        backbone, info = _pretrain_stage(run, plan, train, progress)
        _choose_clusters(run, plan, train, backbone, info, progress)
        _progress(2, f"train ({plan.method}) again", started, plan)
        checkpoint = _train_stage(run, plan, train, held, backbone, info, progress)
    _progress(3, "export (ONNX + INT8 gate)", started, plan)
    base = _export_stage(run, plan, train, checkpoint)
    _progress(4, "exemplars", started, plan)
    model_path = _exemplars_stage(run, plan, train, base)
    _progress(5, "evaluate (held-out split)", started, plan)
    _evaluate_stage(run, plan, held, checkpoint, model_path)
    seconds = [s["seconds"] for s in [*run.record["stages"].values(), *first_try_stages(run.record).values()]]
    seconds += [c["seconds"] for c in clusters_choices(run.record)]
    run.record["minutes"] = round(sum(seconds) / 60, 2)
    run.save()
    print(format_summary(run.record), flush=True)
    print(f"model: {model_path}\nreport: {out / 'report.html'}\n"
          f"label a folder: calibclust label NEW_FOLDER --model {model_path} --out labelled/", flush=True)
    return FitResult(out, model_path, checkpoint, plan, run.record)


def _validate(folder: Path, clusters, budget_minutes: float, heldout_fraction: float, resize: str,
              pretrain_epochs: int | None = None, method: str = "cdc", input_filter: str = "auto",
              backbone_weights: str | None = None, k_range=None, overcluster=None) -> tuple[int, int] | None:
    """Every problem with the arguments in one error; returns ``k_range`` parsed (None when not given)."""
    from calibclust.cluster.choose_k import parse_k_range
    from calibclust.metadata import RESIZE_POLICIES
    from calibclust.train.methods import method_names

    problems = []
    if method not in method_names():
        problems.append(f"method must be one of {', '.join(method_names())}, got {method!r}")
    if resize not in ("auto", *RESIZE_POLICIES):
        problems.append(f"resize must be auto or one of {', '.join(RESIZE_POLICIES)}, got {resize!r}")
    if not folder.is_dir():
        problems.append(f"not a folder: {folder}")
    if clusters != "auto" and (not isinstance(clusters, (int, np.integer)) or clusters < 2):
        problems.append(f"clusters must be an integer >= 2 or 'auto', got {clusters!r}")
    if k_range is not None:
        if clusters != "auto":
            problems.append(f"k_range (--k-range) applies to clusters='auto' only, got clusters={clusters!r}")
        try:
            k_range = parse_k_range(k_range if isinstance(k_range, str) else "..".join(str(int(k)) for k in k_range))
        except (InputError, TypeError, ValueError) as exc:
            problems.append(str(exc) if isinstance(exc, InputError) else f"k_range must be (LOW, HIGH) or 'LOW..HIGH', got {k_range!r}")
    if overcluster is not None:
        if isinstance(overcluster, bool) or not isinstance(overcluster, (int, float, np.integer, np.floating)) \
                or not 1 < overcluster <= MAX_OVERCLUSTER:
            problems.append(f"overcluster must be a factor in (1, {MAX_OVERCLUSTER:g}], got {overcluster!r}")
        elif method == "kmeans":
            # Its Student-t assignment spreads ~1/K over every cluster, so summed members favour the
            # group with the most members whatever the image (measured on three shapes: ACC 1/3).
            problems.append("--overcluster does not apply to kmeans: its soft assignment is nearly uniform, so merged "
                            "clusters favour the largest group; train kmeans at K")
    if pretrain_epochs is not None and not (isinstance(pretrain_epochs, (int, np.integer)) and pretrain_epochs >= 1):
        problems.append(f"pretrain epochs must be an integer >= 1, got {pretrain_epochs!r}")
    if not budget_minutes > 0:
        problems.append(f"budget must be > 0 minutes, got {budget_minutes}")
    if not 0 < heldout_fraction < 0.5:
        problems.append(f"held-out fraction must be in (0, 0.5), got {heldout_fraction}")
    if input_filter not in FIT_INPUT_FILTERS:
        problems.append(f"input filter must be one of {', '.join(FIT_INPUT_FILTERS)}, got {input_filter!r}")
    elif input_filter == "gradient" and backbone_weights:
        problems.append("--input-filter applies to the pretraining; --backbone-weights brings its own (set when it was pretrained)")
    if problems:
        raise InputError("; ".join(problems))
    return k_range


def _pretrain_stage(run: FitRun, plan: FitPlan, train, progress: bool):
    from calibclust.pretrain import pretrain
    from calibclust.train.data import load_backbone_dir
    from calibclust.train.state import has_state

    if plan.backbone_weights:
        return load_backbone_dir(plan.backbone_weights, input_size=plan.input_size)
    pretrain_dir = run.out / "pretrain"
    if not run.done("pretrain"):
        start = time.perf_counter()
        input_filter = resolved_input_filter(run.record, plan)
        if plan.input_filter == "auto" and input_filter == "gradient":
            _set_aside_first_try(run.out, plan.method)
        config = moco_config(plan.pretrain_epochs, plan.n_train, seed=plan.seed, device=plan.device, backbone=plan.backbone,
                             input_size=plan.input_size, batch_size=plan.pretrain_batch, input_filter=input_filter)
        result = pretrain(train.images, config, pretrain_dir, resume=has_state(pretrain_dir), progress=progress,
                          data_info={"folder": plan.folder, "split": "fit train split", "n_images": train.num_images})
        run.finish("pretrain", time.perf_counter() - start, final_loss=result.history[-1]["loss"] if result.history else None)
    return load_backbone_dir(pretrain_dir)


def trained_clusters(clusters: int, overcluster: float | None) -> int:
    """How many clusters a method trains for K = ``clusters``: ⌈F·K⌉ under ``--overcluster F``."""
    return int(math.ceil(overcluster * clusters - 1e-9)) if overcluster else int(clusters)


def resolved_clusters(record: dict) -> int:
    """The K a run (``run.json``'s ``record``) trains: the plan's, or under ``--clusters auto`` the one
    chosen (for the try in progress)."""
    clusters = record["plan"]["clusters"]
    return int(record["clusters_choice"]["k"]) if clusters == "auto" else int(clusters)


def _choose_clusters(run: FitRun, plan: FitPlan, train, backbone, info: dict, progress: bool) -> None:
    """``--clusters auto``, after pretraining: K by :func:`calibclust.cluster.choose_k.choose_k` on the
    backbone's features of (up to 2,000 of) the training images, saved in ``run.json`` before training
    so that ``--resume`` keeps it; :func:`_train_stage` stores it in the model metadata, and
    ``label``'s report plots it. The training split and not the held-out one: no label is read, so nothing leaks, and
    the held-out split (10 % by default) is too small to compare K up to 30 with at least 3 images
    per cluster. A second try of ``--input-filter auto`` chooses again on its own backbone."""
    if plan.clusters != "auto" or "clusters_choice" in run.record:
        return
    from calibclust.train.data import choose_k_on_backbone

    low, high = plan.k_range
    print(f"      --clusters auto: comparing K = {low}..{high} on the backbone's features of the training images "
          "(label-free)", flush=True)
    report = (lambda k: print(f"      K = {k} compared", flush=True)) if progress else None
    choice = choose_k_on_backbone(train.images, backbone, info, (low, high), seed=plan.seed, device=plan.device,
                                  progress=report)
    print("\n".join("    " + line for line in choice.format_table().splitlines()), flush=True)
    run.record["clusters_choice"] = choice.to_dict()
    run.save()


# The statistics the gradient filter is blind to by construction (a per-image gradient magnitude
# over its maximum). Measured only for mean colour (the data zoo's digits-colour and emoji).
FILTERED_SHORTCUTS = ("mean colour", "brightness", "contrast")


def resolved_input_filter(record: dict, plan: FitPlan) -> str:
    """The filter a run (``run.json``'s ``record``) pretrains with: the plan's, or for ``auto`` the one
    chosen so far."""
    return record.get("input_filter", {}).get("chosen", "none") if plan.input_filter == "auto" else plan.input_filter


def _choose_input_filter(run: FitRun, plan: FitPlan, train, checkpoint: Path) -> str:
    """``--input-filter auto``, after the first training: keep the images, or pretrain again on their
    gradient magnitudes when the trained model's clusters follow a statistic that filter removes
    (:data:`FILTERED_SHORTCUTS`, by the label-free shortcut check, :mod:`calibclust.shortcut`). On
    the data zoo's held-out splits (``bench zoo``) that took nuisance-colour digits from ACC 0.18 to
    0.76 and emoji from 0.24 to 0.98, while the check stays silent on plain and reframed digits and on
    letters, where gradients alone measured worse (0.85 → 0.61 on digits). The first try is kept in
    ``pretrain-none/`` and ``METHOD-none/``; ``run.json`` records the choice and the check."""
    if plan.input_filter != "auto" or plan.backbone_weights or "input_filter" in run.record:
        return resolved_input_filter(run.record, plan)
    try:
        check = _shortcut_check_of(checkpoint, train, plan.seed)
    except Exception as exc:  # noqa: BLE001 - advisory, as in CDC: never lose a trained model to it
        check = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"warning: the shortcut check failed ({check['error']}); keeping the images (input filter none)", flush=True)
    strongest = check.get("strongest")
    follows = bool(check.get("fired")) and strongest in FILTERED_SHORTCUTS
    chosen = "gradient" if follows else "none"
    run.record["input_filter"] = {"chosen": chosen, "first_try": "none", "shortcut_check": check}
    if follows:
        print(f"input filter (auto): the clusters follow {strongest} ({check['explained'][strongest]:.2f}, warning from "
              f"{check['threshold']:.2f}); pretraining again on the images' gradient magnitudes (the first try is kept in "
              f"pretrain-none/ and {plan.method}-none/)", flush=True)
        first = {k: run.record["stages"].pop(k) for k in ("pretrain", "train")}
        first["train"]["model_dir"] = str(run.out / f"{plan.method}-none" / "model")
        run.record["input_filter"]["first_try_stages"] = first
        if "clusters_choice" in run.record:  # the gradients' backbone chooses K again
            run.record["input_filter"]["first_try_clusters_choice"] = run.record.pop("clusters_choice")
    run.save()
    if follows:
        _set_aside_first_try(run.out, plan.method)
    return chosen


def first_try_stages(record: dict) -> dict:
    """The stages (with their seconds) of the try ``--input-filter auto`` set aside; empty if none."""
    return record.get("input_filter", {}).get("first_try_stages", {})


def clusters_choices(record: dict) -> list[dict]:
    """Every ``--clusters auto`` choice a run made: the first try's (set aside by ``--input-filter
    auto``), then the current one."""
    choices = [record.get("input_filter", {}).get("first_try_clusters_choice"), record.get("clusters_choice")]
    return [c for c in choices if c]


def _set_aside_first_try(out: Path, method: str) -> None:
    """Rename the first try's ``pretrain/`` and ``METHOD/`` to ``*-none/`` (idempotent: a run
    interrupted between the choice and the renames finishes them on resume)."""
    for name in ("pretrain", method):
        if (out / name).exists() and not (out / f"{name}-none").exists():
            os.replace(out / name, out / f"{name}-none")


def _shortcut_check_of(checkpoint: Path, train, seed: int) -> dict:
    """The trained model's shortcut check: the one CDC stores in its metadata, else computed on (up to
    :data:`calibclust.shortcut.MAX_IMAGES`) training images."""
    from calibclust.shortcut import MAX_IMAGES, shortcut_check, stored_shortcut_check
    from calibclust.train.methods import ClusteringMethod

    stored = stored_shortcut_check(checkpoint)
    if stored and "explained" in stored:
        return stored
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(train.num_images, min(MAX_IMAGES, train.num_images), replace=False))
    images = np.asarray(train.images[index])
    clusters = ClusteringMethod.load(checkpoint).predict_proba(images).argmax(1)
    return shortcut_check(images, clusters, seed=seed).to_dict()


def method_config(plan: FitPlan, clusters: int):
    """The settings ``fit`` trains its method with for ``clusters`` (None: the method's defaults): the
    CPU profile (:mod:`calibclust.train.profiles`) with the sizes the plan fixed."""
    from calibclust.train.profiles import cdc_config, dccm_config, spice_config

    if plan.method == "cdc":
        return cdc_config(clusters, plan.n_train, seed=plan.seed, batch_size=plan.cdc_batch, hidden_dim=plan.cdc_hidden,
                          num_views=plan.cdc_views, epochs=plan.cdc_epochs)
    if plan.method == "spice":
        return spice_config(clusters, plan.n_train, seed=plan.seed, batch_size=plan.cdc_batch, num_views=plan.cdc_views)
    if plan.method == "dccm":
        return dccm_config(clusters, seed=plan.seed)
    return None


def _train_stage(run: FitRun, plan: FitPlan, train, held, backbone, info, progress: bool) -> Path:
    from calibclust.augment.views import ViewConfig
    from calibclust.train.methods import get_method
    from calibclust.train.state import has_state

    method_dir = run.out / plan.method
    if not run.done("train"):
        start = time.perf_counter()
        options = {"view_config": ViewConfig(flip_p=0.0)} if plan.method == "spice" else {}
        clusters = resolved_clusters(run.record)
        trained = trained_clusters(clusters, plan.overcluster)
        method = get_method(plan.method)(trained, method_config(plan, trained), seed=plan.seed, device=plan.device,
                                         progress=progress, **options)
        eval_data = held if (held.labels is not None and held.num_images) else None
        method.fit(train, backbone, info, out_dir=method_dir, eval_data=eval_data, resume=has_state(method_dir))
        merged = {}
        if trained > clusters:
            groups = method.merge_clusters(clusters, train)
            merged = {"overcluster": {"trained_clusters": trained, "groups": groups}}
            print(f"      merged {trained} trained clusters into {clusters} by co-assignment (label-free); "
                  f"trained clusters per cluster: {np.bincount(groups, minlength=clusters).tolist()}", flush=True)
        if "clusters_choice" in run.record:  # into the model metadata: label's report plots it
            method.metadata.train_stats["clusters_choice"] = run.record["clusters_choice"]
        model_dir = method.save(method_dir / "model")
        run.finish("train", time.perf_counter() - start, model_dir=str(model_dir),
                   mean_confidence=method.metadata.train_stats.get("mean_confidence"), **merged)
    return method_dir / "model"


def _export_stage(run: FitRun, plan: FitPlan, train, checkpoint: Path) -> Path:
    from calibclust.export.int8 import Int8Config, QuantizationError, quantize_int8
    from calibclust.export.onnx import OnnxExportConfig, export_onnx
    from calibclust.models.clustering import load_model

    base = run.out / "model-base.onnx"
    if run.done("export"):
        return base
    start = time.perf_counter()
    model, metadata = load_model(checkpoint)
    result = export_onnx(model, metadata, train.images, base, OnnxExportConfig(seed=plan.seed), log=_log)
    info = {"parity": result.parity.summary(), "ood_threshold": result.metadata.ood.threshold}
    try:
        int8 = quantize_int8(base, base.with_suffix(".int8.onnx"), result.train_images, Int8Config(seed=plan.seed), log=_log)
        info["int8"] = {"path": str(int8.path), "label_agreement": int8.agreement.label_agreement}
    except QuantizationError as exc:
        # The fp32 model passed its own gate; a refused INT8 model is a finding, not a failure.
        info["int8"] = {"refused": str(exc)}
        print(f"      INT8 model refused by its gate (fp32 model kept): {exc}", flush=True)
    run.finish("export", time.perf_counter() - start, **info)
    return base


def _log(message: str) -> None:
    print(f"      {message}", flush=True)


def _exemplars_stage(run: FitRun, plan: FitPlan, train, base: Path) -> Path:
    from calibclust.exemplars import attach_exemplars, build_exemplars, thumbnail_size_for
    from calibclust.serve.labeler import Labeler

    model_path = run.out / "model.onnx"
    if run.done("exemplars"):
        return model_path
    start = time.perf_counter()
    labeler = Labeler(base)
    out = labeler.predict_all(train.images, ("confidence", "label", "ood_score"))
    eligible = out["ood_score"] <= labeler.metadata.ood.threshold
    root = Path(train.root)
    exemplars, errors = build_exemplars(
        [root / p for p in train.paths], out["label"], out["confidence"], labeler.num_clusters,
        thumbnail_size_for(labeler.input_size, 96), eligible=eligible, display_paths=train.paths,
        info={"source_folder": plan.folder, "weights_digest": labeler.metadata.weights_digest},
        resize=labeler.metadata.resize,
    )
    # A stage interrupted after writing its files runs again: attach_exemplars never overwrites.
    model_path.unlink(missing_ok=True)
    (run.out / "model.exemplars.npz").unlink(missing_ok=True)
    attach_exemplars(base, exemplars, model_path)
    run.finish("exemplars", time.perf_counter() - start, per_cluster=exemplars.counts().tolist(), unreadable=len(errors))
    return model_path


def _evaluate_stage(run: FitRun, plan: FitPlan, held, checkpoint: Path, model_path: Path) -> None:
    """The held-out split through the exported model (and every row the method reports, from its
    checkpoint: CDC's clustering head beside the calibration head it exports). The report is written
    before the stage is recorded as done, so a resumed run never lacks it."""
    import torch

    from calibclust.serve.labeler import Labeler
    from calibclust.train.data import head_report
    from calibclust.train.methods import ClusteringMethod

    if run.done("evaluate"):
        return
    start = time.perf_counter()
    heldout, reports, outputs = {"n": int(held.num_images)}, {}, None
    if held.num_images:
        labeler = Labeler(model_path)
        meta = labeler.metadata
        outputs = labeler.predict_all(held.images, ("probs", "confidence", "label", "ood_score"))
        method = ClusteringMethod.load(checkpoint)
        rows = method.predictions(held.images)  # the last row is the model's own prediction, the one exported
        exported = list(rows)[-1]
        ood = outputs["ood_score"] > meta.ood.threshold
        accepted = ~ood & (outputs["confidence"] >= meta.confidence_threshold)
        sizes = np.bincount(outputs["label"], minlength=meta.num_clusters)
        # Label-free: what a user without labels can still check on images the model never trained on.
        heldout.update(
            mean_confidence=float(outputs["confidence"].mean()),
            accepted_share=float(accepted.mean()),
            confidence_threshold=float(meta.confidence_threshold),
            ood_share=float(ood.mean()),
            cluster_share_min=float(sizes.min() / held.num_images),
            cluster_share_max=float(sizes.max() / held.num_images),
            empty_clusters=int((sizes == 0).sum()),
            onnx_torch_label_agreement=float((rows[exported].argmax(1) == outputs["label"]).mean()),
        )
        if len(rows) > 1:  # e.g. CDC's clustering head: how often it agrees with what is exported
            heldout["heads_agree"] = float(np.mean([(p.argmax(1) == outputs["label"]).mean()
                                                    for name, p in rows.items() if name != exported]))
        heldout["rows"] = list(rows)
        if held.labels is not None:
            rows[exported] = outputs["probs"]  # the exported model's figures are the ones that count
            for name, probs in rows.items():
                reports[name] = head_report(torch.from_numpy(probs), held.labels, reliability=True)
                heldout[name] = {k: reports[name][k] for k in ("acc", "nmi", "ari", "ece", "aurc")}
            mapping = reports[exported]["mapping"]
            mapped = np.array([mapping.get(str(int(c)), -1) for c in outputs["label"]])
            heldout["accepted_accuracy"] = (float((mapped[accepted] == held.labels[accepted]).mean())
                                            if accepted.any() else None)
        exported_report = reports.get(exported)
    else:
        exported_report = None
    stage = {"seconds": round(time.perf_counter() - start, 2), "heldout": heldout}
    record = {**run.record, "stages": {**run.record["stages"], "evaluate": stage}}
    write_report(run.out, record, exported_report, (held, outputs) if outputs is not None else None)
    run.finish("evaluate", stage["seconds"], heldout=heldout)


def format_summary(record: dict) -> str:
    h = record["stages"].get("evaluate", {}).get("heldout", {})
    if not h.get("n"):
        return "no held-out images: nothing measured (raise the held-out fraction)"

    def pct(v):
        return "  –  " if v is None else f"{100 * v:5.1f}"

    choice = record.get("clusters_choice")
    lines = [f"K = {choice['k']} chosen without labels from {choice['ks'][0]}..{choice['ks'][-1]} (runner-up "
             f"{choice['runner_up']}; picks: " + ", ".join(f"{c} {k}" for c, k in choice["picks"].items()) + ")"
             + (f"; {choice['message']}" if choice.get("message") else "")] if choice else []
    merged = record["stages"].get("train", {}).get("overcluster")
    if merged:
        members = np.bincount(merged["groups"]).tolist()
        lines.append(f"trained {merged['trained_clusters']} clusters, merged into {len(members)} by co-assignment "
                     f"(trained clusters per cluster: {members})")
    lines += [f"held-out split ({h['n']} images never trained on):",
             f"  mean confidence {pct(h['mean_confidence'])} %   accepted at confidence >= {h['confidence_threshold']:.2f}: "
             f"{pct(h['accepted_share'])} %   flagged OOD {pct(h['ood_share'])} %",
             f"  cluster sizes {pct(h['cluster_share_min'])}–{pct(h['cluster_share_max'])} % of images "
             f"({h['empty_clusters']} empty)" + (f"; heads agree on {pct(h['heads_agree'])} %" if "heads_agree" in h else "")]
    scored = [name for name in _rows(h) if name in h]
    if scored:
        lines += ["  model     ACC %  NMI %  ARI %  ECE %  AURC %"]
        for name in scored:
            r = h[name]
            lines.append(f"  {name:<8} {pct(r['acc'])}  {pct(r['nmi'])}  {pct(r['ari'])}  {pct(r['ece'])}  {pct(r['aurc'])}")
        lines.append(f"  accuracy of the accepted images {pct(h['accepted_accuracy'])} %")
    minutes = record.get("minutes")
    if minutes is not None:
        first_try = first_try_stages(record)
        parts = [f"{k} {v['seconds']:.0f}s" for k, v in record["stages"].items()]
        parts += [f"choosing K {sum(c['seconds'] for c in clusters_choices(record)):.0f}s"] if choice else []
        parts += [f"first try without the input filter {sum(v['seconds'] for v in first_try.values()):.0f}s"] if first_try else []
        lines.append(f"finished in {minutes:.1f} min (" + ", ".join(parts) + ")")
    return "\n".join(lines)


def _rows(heldout: dict) -> list[str]:
    # Runs written before fit --method scored CDC's two heads and did not list them.
    return heldout.get("rows", ["CDC-Clu", "CDC-Cal"])


def write_report(out: Path, record: dict, calibration_report, heldout_outputs) -> Path:
    """``report.html``: the plan, held-out figures, reliability diagram (with labels), clusters."""
    from calibclust.metrics import CalibrationResult
    from calibclust.report import HTMLReport, add_k_choice_section, plot_reliability_diagram

    plan = record["plan"]
    clusters = resolved_clusters(record)
    report = HTMLReport("calibclust fit", f"{plan['folder']} → {clusters} clusters")
    report.add_heading("Plan")
    report.add_html("<pre>" + _escape(FitPlan(**plan).describe()) + "</pre>")
    choice = record.get("clusters_choice")
    if choice:
        add_k_choice_section(report, choice)
    merged = record["stages"].get("train", {}).get("overcluster")
    if merged:
        report.add_paragraph(f"Trained with {merged['trained_clusters']} clusters (--overcluster), merged into {clusters}: "
                             + "; ".join(f"cluster {g} = trained {', '.join(str(j) for j, gj in enumerate(merged['groups']) if gj == g)}"
                                         for g in range(clusters)) + " (the clusters its head spreads the same training images over).")
    h = record["stages"].get("evaluate", {}).get("heldout", {})
    report.add_heading("Held-out split")
    if h.get("n"):
        report.add_table([[k, v] for k, v in h.items() if not isinstance(v, (dict, list))], header=["label-free figure", "value"],
                         caption=f"{h['n']} held-out images, never trained on, through the exported model")
        scored = [name for name in _rows(h) if name in h]
        if scored:
            report.add_table([[name, *(h[name][m] for m in ("acc", "nmi", "ari", "ece", "aurc"))] for name in scored],
                             header=["model", "ACC", "NMI", "ARI", "ECE", "AURC"],
                             caption=f"on the held-out images (class sub-folders as labels); {scored[-1]} is the exported "
                                     "model" + (", the others the method's other predictions" if len(scored) > 1 else ""))
        else:
            report.add_paragraph("The folder has no class sub-folders, so accuracy and ECE cannot be measured; "
                                 "the figures above need no labels.")
    else:
        report.add_warning("No image was held out; nothing was measured on unseen images.")
    if calibration_report is not None:
        report.add_figure(plot_reliability_diagram(CalibrationResult(**calibration_report["calibration"]), title=None),
                          alt="reliability diagram", caption=f"{_rows(h)[-1]} (the exported model) on the held-out images")
    if heldout_outputs is not None:
        held, outputs = heldout_outputs
        report.add_heading("Clusters: most confident held-out images")
        for c in range(clusters):
            idx = np.flatnonzero(outputs["label"] == c)
            idx = idx[np.argsort(-outputs["confidence"][idx])][:10]
            report.add_paragraph(f"cluster {c}: {int((outputs['label'] == c).sum())} held-out images")
            if len(idx):
                report.add_thumbnails([held.images[i] for i in idx], captions=[f"{outputs['confidence'][i]:.2f}" for i in idx],
                                      size=48, alt=f"cluster {c} thumbnails")
    report.add_heading("Stages")
    report.add_table([[k, v["seconds"]] for k, v in record["stages"].items()], header=["stage", "seconds"])
    return report.write(out / "report.html")


def _escape(text: str) -> str:
    from calibclust.report import escape

    return escape(text)


def fit_command(plan: FitPlan, out: Path) -> list[str]:
    argv = ["fit", plan.folder, "--out", str(out.resolve()), "--clusters", str(plan.clusters)]
    argv += ["--k-range", "{}..{}".format(*plan.k_range)] if plan.clusters == "auto" else []
    argv += ["--overcluster", f"{plan.overcluster:.17g}"] if plan.overcluster else []  # exact: --resume compares it
    argv += ["--budget", f"{plan.budget_minutes:g}", "--heldout-fraction", f"{plan.heldout_fraction:g}", "--seed", str(plan.seed)]
    argv += ["--resize", plan.resize, "--method", plan.method]
    argv += ["--input-filter", plan.input_filter]  # always: the default (auto) is not every run's
    # The epochs the plan chose, so the same run repeats on a machine of another speed.
    argv += ["--backbone-weights", plan.backbone_weights] if plan.backbone_weights else ["--pretrain-epochs", str(plan.pretrain_epochs)]
    return argv


def _write_commands(out: Path, plan: FitPlan) -> None:
    model = out.resolve() / "model.onnx"
    text = (
        "#!/usr/bin/env bash\n# This run, and what to do with its model.\nset -e\n"
        f"calibclust {shlex.join(fit_command(plan, out))}\n"
        f"# continue it after an interruption:\n# calibclust {shlex.join(fit_command(plan, out))} --resume\n"
        f"# label a new folder (torch-free), keeping what the model should not be trusted on apart:\n"
        f"# calibclust label NEW_FOLDER --model {shlex.quote(str(model))} --out labelled/ --target-accuracy 0.9\n"
        f"# try it in a browser:\n# calibclust demo --model {shlex.quote(str(model))}\n"
    )
    path = out / "commands.sh"
    atomic_write_text(path, text)
    path.chmod(0o755)


# --- CLI ---------------------------------------------------------------------------------------------
DESCRIPTION = """From your own image folder to a deployable, calibrated clustering model in one command: read the
folder (nested sub-folders, any sizes; unreadable files are skipped and listed), hold out a split,
pretrain a backbone with MoCo-v2 sized to --budget, train CDC (or another --method), export ONNX
(+ INT8 when its gate passes) with an OOD threshold and exemplars, and check the model on the
held-out images.

If FOLDER holds only class sub-folders, their names are used as labels for the report (accuracy,
ECE); they never reach training. Without labels the report shows label-free figures."""

EPILOG = """outputs in OUT: model.onnx (+ .exemplars.npz; label folders with it, no torch needed),
model-base.onnx, model-base.int8.onnx (when its gate passes), report.html, run.json (plan, stages,
held-out figures), commands.sh, pretrain/, METHOD/ (torch checkpoint in METHOD/model/, e.g. cdc/model/);
pretrain-none/ and METHOD-none/ when --input-filter auto set a first try aside.

examples:
  calibclust fit photos/ --out runs/photos --clusters 8
  calibclust fit photos/ --out runs/photos --clusters 8 --budget 30     # more pretraining
  calibclust fit photos/ --out runs/photos --clusters 8 --resume        # after Ctrl-C
  calibclust fit photos/ --out runs/auto --clusters auto --k-range 2..20  # K chosen without labels
  calibclust fit photos/ --out runs/over --clusters 10 --overcluster 2  # train 20 clusters, merge into 10
  calibclust fit photos/ --out runs/kmeans --clusters 8 --method kmeans # a baseline, same outputs
  calibclust label new_photos/ --model runs/photos/model.onnx --out labelled/ --target-accuracy 0.9"""


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("fit", help="one command from your image folder to a calibrated, exported model",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (new, or an interrupted run with --resume)")
    add_cluster_args(p, resumable_k_range=True)
    p.add_argument("--overcluster", type=float, metavar="F",
                   help="train ⌈F·K⌉ clusters and merge them into K, the clusters the head spreads the same "
                        "images over first (label-free): for classes made of several looks; F in (1, "
                        f"{MAX_OVERCLUSTER:g}] (default: off, or with --resume the run's own)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_MINUTES, metavar="MINUTES",
                   help=f"time to aim for on this machine; sizes the pretraining (default {DEFAULT_BUDGET_MINUTES:g}, "
                        "sized for 2 CPU cores)")
    p.add_argument("--method", choices=method_names(),
                   help="clustering method (default cdc, or with --resume the run's own): cdc gives calibrated "
                        f"confidence from its calibration head; the other built-in ones ({', '.join(n for n in METHODS if n != 'cdc')}) "
                        "are uncalibrated, their confidence is not an accuracy estimate")
    p.add_argument("--backbone-weights", metavar="PATH", help="skip pretraining: a 'calibclust pretrain' output folder")
    p.add_argument("--pretrain-epochs", type=int, metavar="N", help="MoCo-v2 epochs, instead of sizing them to --budget")
    p.add_argument("--input-filter", choices=FIT_INPUT_FILTERS,
                   help=INPUT_FILTER_HELP.replace("(default %(default)s)", "for the pretraining (default auto, or with --resume "
                                                  "the run's own)").replace("none = the image", "auto = the image, and again "
                                                  "the gradients if the trained model's clusters follow colour, brightness or "
                                                  "contrast (label-free shortcut check); none = the image")),
    p.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                   help=f"share of the images kept out of training for the report (default {DEFAULT_HELDOUT_FRACTION:g})")
    p.add_argument("--resize", default="auto", choices=("auto", "squash", "center-crop", "letterbox"),
                   help="how images reach the input size: squash (stretch), center-crop, letterbox (fit + pad); "
                        "auto = squash when all images share an aspect ratio, else center-crop (default auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside stages")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = fit(args.folder, args.out, args.clusters, budget_minutes=args.budget, device=args.device, resume=args.resume,
                 backbone_weights=args.backbone_weights, heldout_fraction=args.heldout_fraction, seed=args.seed,
                 progress=not args.no_progress, resize=args.resize, pretrain_epochs=args.pretrain_epochs, method=args.method,
                 input_filter=args.input_filter, k_range=args.k_range, overcluster=args.overcluster)
    return EXIT_PARTIAL if result.run.get("unreadable") else EXIT_OK
