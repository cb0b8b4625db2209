"""Self-supervised backbone pretraining with MoCo-v2, and the ``calibclust pretrain`` command.

MoCo-v2 (Chen et al. 2020b) as used by SPICE ("SPICE: Semantic Pseudo-Labeling for Image Clustering" §III-A, Eq. (1), §IV-A) and CDC
("Towards Calibrated Deep Clustering Network" §3.3, appendix B.1):

* query encoder f_q = projector ∘ backbone, trained; key encoder f_k, its momentum average
  θ_k ← μ θ_k + (1 − μ) θ_q (SPICE §III-A, text after Eq. (1));
* InfoNCE over one positive key and a queue of N_q negative keys, temperature τ (SPICE Eq. (1));
  the queue is a ring buffer of past keys, capped by the data set size;
* 2-layer MLP projector with BN + ReLU (CDC appendix B.1); MoCo-v2 augmentations applied to whole
  batches on the training device (:mod:`calibclust.augment`);
* SGD, linear warm-up then cosine decay per step (CDC appendix B.1), AMP on CUDA.

Determinism and resume: every random draw of a step comes from generators seeded by
``(seed, epoch, step, rank)`` (data order per epoch, views per step), so the run is a pure
function of the seed and the saved state; ``--resume`` reloads weights, key encoder, queue,
optimizer buffers and the global RNG states and continues bit-for-bit (on the same device type and
thread count). Checkpoints: ``backbone.safetensors`` + ``backbone.json`` (the inference artefact,
:func:`calibclust.models.weights.save_backbone`) and ``checkpoint/`` (resume state: one
safetensors file of tensors + a JSON of plain values, :mod:`calibclust.train.state`), written every epoch.

Multi-GPU / multi-process: launch with ``torchrun --nproc_per_node N -m calibclust pretrain ...``.
The query encoder is wrapped in DistributedDataParallel; keys are computed on a batch shuffled
across ranks (MoCo's "shuffling BN", so batch statistics cannot leak the positive) and gathered
from all ranks before they enter the queue. CUDA uses NCCL, CPU uses gloo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from calibclust.augment import AUGMENT_PRESETS, AugmentConfig
from calibclust.cli_config import ConfigOptions, FieldOption, add_config_args, build_config
from calibclust.config import Config
from calibclust.cli_names import device_arg
from calibclust.device import resolve_device
from calibclust.models.names import BACKBONE_HELP, INPUT_FILTER_HELP, INPUT_FILTERS, backbone_name
from calibclust.tensorboard import add_tensorboard_arg, open_writer
from calibclust.precision import backward_and_step, training_precision
from calibclust.errors import EXIT_OK, EXIT_PARTIAL

STATE_FORMAT = "calibclust-pretrain-state/2"  # /2: written by calibclust.train.state


@dataclass
class MoCoConfig(Config):
    """MoCo-v2 pretraining. Defaults follow CDC appendix B.1 unless a comment says otherwise."""

    TITLE: ClassVar[str] = "pretraining configuration"
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"checkpoint_every_steps"})  # do not alter the math

    backbone: str = "resnet34"  # CDC B.1 (SPICE uses ResNet-18/34); "small" for CPU runs
    stem: str = "auto"  # CIFAR stem for inputs <= 64 px (CDC B.1), ImageNet stem above
    width: int = 32  # width of the "small" backbone only
    # "gradient": the backbone sees Sobel gradient magnitudes instead of colours (GradientInput);
    # not in the papers' setting, which gives the backbone the image ("none").
    input_filter: str = "none"
    input_size: int = 32  # images are decoded once at this size (square)
    proj_hidden_dim: int = 4096  # CDC B.1: 2-layer MLP projector, hidden 4096-d with BN + ReLU
    proj_dim: int = 256  # CDC B.1: projector output 256-d
    momentum: float = 0.99  # μ of the key encoder (CDC B.1: 0.99; SPICE §III-A / MoCo: 0.999)
    temperature: float = 0.2  # τ in SPICE Eq. (1); CDC B.1
    queue_size: int = 32768  # N_q (CDC B.1); capped at N - batch (SPICE §IV-A shrinks it for small sets)
    epochs: int = 1000  # CDC B.1
    batch_size: int = 256  # global batch (CDC B.1), split evenly across ranks
    # Base learning rate for batch 256, scaled linearly with batch_size: MoCo-v2's 0.03 (SPICE
    # §IV-A: 0.015 at batch 128). CDC B.1 states 0.5, which collapsed MoCo to a uniform loss
    # (log N_q) in our short runs on digits, so it is not the default.
    lr: float = 0.03
    weight_decay: float = 1e-4  # CDC B.1 / SPICE §IV-A
    sgd_momentum: float = 0.9  # SPICE §IV-A
    warmup_epochs: float | None = None  # None = 5% of epochs (CDC B.1: 50 of 1000)
    seed: int = 0
    amp: bool = True  # mixed precision where it pays (calibclust.precision): CUDA bf16/fp16, CPU bf16 if native
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every_steps: int = 0  # extra resume checkpoints inside an epoch (0 = at epoch ends)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def problems(self) -> list[str]:
        problems = []
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum μ must be in [0, 1), got {self.momentum}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.input_filter not in INPUT_FILTERS:
            problems.append(f"input_filter must be one of {INPUT_FILTERS}, got {self.input_filter!r}")
        for name in ("epochs", "batch_size", "queue_size", "proj_dim", "proj_hidden_dim", "input_size", "width"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            problems.append(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        return problems

    @property
    def resolved_warmup_epochs(self) -> float:
        return 0.05 * self.epochs if self.warmup_epochs is None else float(self.warmup_epochs)



@dataclass
class PretrainResult:
    out_dir: Path
    backbone: object  # nn.Module (eval mode)
    step_losses: list[float]  # losses of the steps run by this call
    first_step: int  # global step index of step_losses[0]
    global_step: int  # steps done in total
    history: list[dict]  # per-epoch summaries of the whole run
    n_failed: int = 0  # images that could not be decoded (pretrain_folder)


# --- model ----------------------------------------------------------------------------------------


def _build_modules(config: MoCoConfig, n_images: int, world_batch: int):
    """The MoCo module of ``config``: backbone first, then (inside :class:`MoCo`) the projector,
    the key encoder's copy and the queue, the order that fixes the initial weights for a seed."""
    from calibclust.models.backbones import build_backbone, with_input_filter
    from calibclust.models.moco import MoCo

    backbone = with_input_filter(build_backbone(config.backbone, input_size=config.input_size, stem=config.stem,
                                                width=config.width), config.input_filter)
    return MoCo(backbone, config.proj_hidden_dim, config.proj_dim, queue_length(config.queue_size, n_images, world_batch),
                config.momentum, config.seed)


def queue_length(queue_size: int, n_images: int, batch: int) -> int:
    """N_q capped at the images outside the current batch (N − B), at least one batch: a queue
    longer than the data set would hold several stale keys of the same image."""
    return int(min(queue_size, max(n_images - batch, batch)))


def info_nce(q, k, queue, temperature: float):
    """SPICE Eq. (1): −log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_i exp(q·k_i⁻/τ)), mean over the batch.

    ``q``, ``k``: (B, d) unit vectors; ``queue``: (N_q, d) unit negatives. Computed in float32.
    """
    import torch
    import torch.nn.functional as F

    q = q.float()
    l_pos = (q * k.float()).sum(1, keepdim=True)  # (B, 1)
    l_neg = q @ queue.float().T  # (B, N_q)
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def learning_rate(config: MoCoConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up then cosine decay, per step (CDC appendix B.1)."""
    base = config.lr * config.batch_size / 256.0
    total = config.epochs * steps_per_epoch
    warm = config.resolved_warmup_epochs * steps_per_epoch
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1.0, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _seed_of(*parts: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# --- distributed helpers ------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _gather(t):
    import torch

    dist = _dist()
    if dist is None:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


# --- resume state ---------------------------------------------------------------------------------


def _write_state(out_dir: Path, moco, optimizer, scaler, global_step: int, meta: dict):
    import torch

    from calibclust.train.state import optimizer_tensors, write_state

    tensors = {f"moco.{k}": v for k, v in moco.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors("moco", optimizer)
    tensors.update(opt_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    write_state(out_dir, tensors, dict(meta, format=STATE_FORMAT, global_step=global_step, optimizer=opt_meta,
                                       scaler=scaler.state_dict() if scaler is not None else None))


def read_state(out_dir: str | os.PathLike) -> dict:
    """The resume state's JSON (plain values) of a pretraining run directory."""
    from calibclust.errors import CalibclustError
    from calibclust.train.state import read_state_meta, state_json

    doc = read_state_meta(out_dir, STATE_FORMAT)
    if doc is None:
        raise CalibclustError(f"nothing to resume: {state_json(out_dir)} does not exist")
    return doc


def _load_state(out_dir: Path, moco, optimizer, scaler, device):
    import torch

    from calibclust.train.state import read_state as read_tensors_and_meta
    from calibclust.train.state import restore_optimizer

    tensors, doc = read_tensors_and_meta(out_dir, STATE_FORMAT)
    moco_state = {k[len("moco.") :]: v for k, v in tensors.items() if k.startswith("moco.")}
    moco.load_state_dict(moco_state, strict=True)
    restore_optimizer("moco", optimizer, {k: v.to(device) for k, v in tensors.items() if k.startswith("opt.")},
                      doc["optimizer"])
    if scaler is not None and doc.get("scaler"):
        scaler.load_state_dict(doc["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def _versions() -> dict:
    import platform

    import numpy
    import torch

    from calibclust import __version__

    return {"calibclust": __version__, "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


# --- training -------------------------------------------------------------------------------------


def pretrain(
    images,
    config: MoCoConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    data_info: dict | None = None,
    stop_after_steps: int | None = None,
) -> PretrainResult:
    """Run (or resume) MoCo-v2 on ``images`` (uint8 (N, H, W, 3), array or tensor, already at
    ``config.input_size``) and write checkpoints to ``out_dir``.

    ``stop_after_epochs`` ends this call after that many epochs in total (checkpoint written),
    for splitting a run across jobs: a later ``resume=True`` call continues it exactly;
    ``stop_after_steps`` the same after that many steps (``calibclust bench data`` times a few steps).
    ``images`` may be a :class:`calibclust.io.cache.CachedImages`: each step then reads its batch
    from disk, and the images take no memory however many there are.
    Under ``torch.distributed`` every rank calls this with the same images; rank 0 writes files.
    """
    import numpy as np
    import torch

    from calibclust.augment import MoCoAugment
    from calibclust.errors import CalibclustError, InputError
    from calibclust.models.weights import save_backbone

    out_dir = Path(out_dir)
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    from calibclust.io.cache import CachedImages

    on_disk = isinstance(images, CachedImages)  # batches are read from disk as they are needed
    data = images if on_disk or torch.is_tensor(images) else torch.as_tensor(np.ascontiguousarray(images))
    if data.dtype not in (torch.uint8, np.uint8) or data.ndim != 4 or data.shape[-1] != 3:
        raise InputError(f"images must be uint8 (N, H, W, 3), got {data.dtype} {tuple(data.shape)}")
    if data.shape[1] != config.input_size or data.shape[2] != config.input_size:
        raise InputError(f"images are {data.shape[1]}x{data.shape[2]}, config.input_size is {config.input_size}")
    if not on_disk:
        data = data.cpu()
        if device.type == "cuda":
            data = data.pin_memory()
    n = data.shape[0]
    batch = min(config.batch_size, n - n % world)
    if batch < 2 * world:
        raise InputError(f"{n} images are too few for contrastive pretraining on {world} process(es)")
    if batch % world:
        raise InputError(f"batch size {batch} is not divisible by the {world} processes")
    if batch != config.batch_size and rank == 0:
        print(f"pretrain: only {n} images; batch size reduced to {batch}", file=sys.stderr)
    local = batch // world
    steps_per_epoch = n // batch

    torch.manual_seed(config.seed)  # same initial weights on every rank
    moco = _build_modules(config, n, batch).to(device)
    backbone = moco.backbone
    precision = training_precision(device, config.amp)
    if precision.channels_last:  # before DDP builds its gradient buckets from the parameters' strides
        moco.to(memory_format=torch.channels_last)
    encoder_q = moco.encoder_q
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel

        encoder_q = DistributedDataParallel(moco.encoder_q, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(
        moco.encoder_q.parameters(), lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda") if precision.grad_scaler else None
    if rank == 0:
        print(f"pretrain: precision {precision.label}", file=sys.stderr)
    augment = MoCoAugment(config.augment, config.input_size)

    meta = {
        "config": config.to_dict(),
        "n_images": n,
        "batch_size": batch,
        "world_size": world,
        "steps_per_epoch": steps_per_epoch,
        "precision": precision.label,
        "data": data_info or {},
        "versions": _versions(),
    }
    from calibclust.train.state import has_state

    history: list[dict] = []
    global_step = 0
    if resume:
        doc = read_state(out_dir)
        config.check_resume(doc["config"], f"the checkpoint in {out_dir}")
        if doc["n_images"] != n:
            raise CalibclustError(f"the checkpoint was trained on {doc['n_images']} images, this folder has {n}")
        digest = (data_info or {}).get("files_digest")
        if digest and doc.get("data", {}).get("files_digest") not in (None, digest):
            raise CalibclustError("the folder's file list differs from the one the checkpoint was trained on")
        if doc["world_size"] != world and rank == 0:
            print(f"pretrain: resuming a {doc['world_size']}-process run on {world}: not bit-for-bit", file=sys.stderr)
        if doc.get("precision") not in (None, precision.label) and rank == 0:
            print(f"pretrain: resuming a run trained in {doc['precision']} with {precision.label} "
                  "(another machine?): not bit-for-bit", file=sys.stderr)
        _load_state(out_dir, moco, optimizer, scaler, device)
        global_step = int(doc["global_step"])
        history = list(doc.get("history", []))
    elif has_state(out_dir):  # every rank checks: none may go on alone
        raise InputError(f"{out_dir} already holds a pretraining run; pass --resume to continue it or choose another --out")

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(meta, indent=2))

    def save(step: int):
        if rank == 0:
            _write_state(out_dir, moco, optimizer, scaler, step, dict(meta, history=history))
            save_backbone(
                backbone,
                out_dir,
                mean=config.augment.mean,
                std=config.augment.std,
                source={"kind": "moco-v2", "global_step": step, "epochs_done": step / steps_per_epoch},
            )
        if dist is not None:
            dist.barrier()

    end_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    if stop_after_steps is not None and global_step >= stop_after_steps:
        end_epoch = min(end_epoch, global_step // steps_per_epoch)  # already there: no step is run
    step_losses: list[float] = []
    first_step = global_step
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=end_epoch * steps_per_epoch, initial=min(global_step, end_epoch * steps_per_epoch), desc="pretrain", unit="step", dynamic_ncols=True)
    moco.train()
    interrupted = _Interrupt(single_process=dist is None)
    try:
        for epoch in range(global_step // steps_per_epoch, end_epoch):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(config.seed, epoch, 0xDA7A)))
            epoch_losses, t0, start = [], time.perf_counter(), global_step % steps_per_epoch
            for step in range(start, steps_per_epoch):
                lr = learning_rate(config, global_step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = perm[step * batch + rank * local : step * batch + (rank + 1) * local]
                x = (torch.from_numpy(data[idx.numpy()]) if on_disk else data[idx]).to(device, non_blocking=True)
                gen = torch.Generator().manual_seed(_seed_of(config.seed, epoch, step, rank))
                views = augment(torch.cat([x, x]), gen)  # both views in one batched call
                if precision.channels_last:
                    views = views.contiguous(memory_format=torch.channels_last)
                xq, xk = views[:local], views[local:]
                with precision.autocast(device):
                    q = torch.nn.functional.normalize(encoder_q(xq).float(), dim=1)
                    with torch.no_grad():
                        moco.momentum_update()
                        if dist is not None:
                            # Shuffle the key batch across ranks (MoCo's shuffling BN): same
                            # permutation on every rank, derived from the seed.
                            xk_all = _gather(xk)
                            shuffle = torch.randperm(
                                batch, generator=torch.Generator().manual_seed(_seed_of(config.seed, epoch, step, 0x5EED))
                            ).to(device)
                            k_local = moco.encoder_k(xk_all[shuffle.view(world, -1)[rank]]).float()
                            k_all = _gather(k_local)[torch.argsort(shuffle)]  # back to batch order
                            k_all = torch.nn.functional.normalize(k_all, dim=1)
                            k = k_all[rank * local : (rank + 1) * local]
                        else:
                            k = torch.nn.functional.normalize(moco.encoder_k(xk).float(), dim=1)
                            k_all = k
                loss = info_nce(q, k, moco.queue.clone(), config.temperature)
                optimizer.zero_grad(set_to_none=True)
                backward_and_step(loss, optimizer, scaler)
                moco.enqueue(k_all)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise CalibclustError(f"loss became {value} at step {global_step}; lower --lr")
                step_losses.append(value)
                epoch_losses.append(value)
                global_step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", lr=f"{lr:.3g}")
                every = config.checkpoint_every_steps
                if every and global_step % every == 0 and step + 1 < steps_per_epoch:
                    save(global_step)
                if interrupted.requested:
                    # Steps are pure functions of (seed, epoch, step) and the saved state, so a
                    # state taken between two steps is a valid resume point, even mid-epoch.
                    save(global_step)
                    print(f"\npretrain: interrupted; state saved at step {global_step}, continue with --resume", file=sys.stderr)
                    raise KeyboardInterrupt
                if stop_after_steps is not None and global_step >= stop_after_steps:
                    break
            if stop_after_steps is not None and global_step >= stop_after_steps and step + 1 < steps_per_epoch:
                save(global_step)  # mid-epoch, like an interruption: resume continues at this step
                break
            seconds = time.perf_counter() - t0
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
                    "lr": lr,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(2 * batch * len(epoch_losses) / max(seconds, 1e-9), 1),
                }
            )
            save(global_step)
            if on_epoch is not None and _rank() == 0:
                on_epoch(history[-1])
            if stop_after_steps is not None and global_step >= stop_after_steps:
                break
    finally:
        interrupted.restore()
        if bar is not None:
            bar.close()
    backbone.eval()
    backbone.normalization = {"mean": list(config.augment.mean), "std": list(config.augment.std)}
    return PretrainResult(out_dir, backbone, step_losses, first_step, global_step, history)


class _Interrupt:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once."""

    def __init__(self, single_process: bool):
        import signal
        import threading

        self.requested = False
        self._previous = None
        if single_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\npretrain: finishing the current step, then saving (Ctrl-C again to abort)", file=sys.stderr)

    def restore(self):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def pretrain_folder(folder, config: MoCoConfig, out_dir, resume: bool = False, stop_after_epochs=None, progress: bool = True,
                    on_epoch=None) -> PretrainResult:
    """Decode ``folder`` once at ``config.input_size`` (the one folder decoder,
    :meth:`calibclust.train.data.TrainingData.from_folder`) and run :func:`pretrain` on it."""
    import hashlib

    from calibclust.train.data import TrainingData

    data = TrainingData.from_folder(folder, config.input_size, progress=progress and _rank() == 0)
    errors = data.unreadable
    if _rank() == 0:
        for path, reason in errors[:20]:
            print(f"pretrain: skipped {path}: {reason}", file=sys.stderr)
        if len(errors) > 20:
            print(f"pretrain: ... {len(errors) - 20} more unreadable files", file=sys.stderr)
    digest = hashlib.sha256("\n".join(data.paths).encode()).hexdigest()
    info = {"folder": str(Path(folder).resolve()), "n_failed": len(errors), "files_digest": digest}
    result = pretrain(data.images, config, out_dir, resume=resume, stop_after_epochs=stop_after_epochs,
                      progress=progress, data_info=info, on_epoch=on_epoch)
    result.n_failed = len(errors)
    return result


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", 0))


# --- CLI ------------------------------------------------------------------------------------------

_EPILOG = """\
examples:
  # CPU run with the small backbone (~0.3 M parameters) and a narrower projector; on the
  # 1,797 sklearn digits 30 epochs lift K-means accuracy from ~0.28 (random init) to ~0.68
  calibclust pretrain images/ --out runs/moco --backbone small --epochs 30 --batch-size 128 \\
      --lr 0.06 --proj-hidden-dim 512 --proj-dim 128
  # the paper's setting (ResNet-34, 1000 epochs) on a GPU, images decoded at 32 px
  calibclust pretrain images/ --out runs/moco34
  # continue an interrupted run (same settings are read from runs/moco)
  calibclust pretrain images/ --out runs/moco --resume
  # two GPUs (or two CPU processes with gloo)
  torchrun --nproc_per_node 2 -m calibclust pretrain images/ --out runs/moco --backbone resnet18

The output directory receives backbone.safetensors + backbone.json after every epoch (use it
with 'calibclust embed --backbone-weights runs/moco' or as the backbone of a training method), the
resume state in checkpoint/, and config.json (settings, versions, seed).
Images are decoded once into memory at --image-size (N x S x S x 3 bytes).
"""


# The options of MoCoConfig's fields (defaults: the fields'). All are left unset, so that --resume
# reuses the checkpoint's settings and a new run takes MoCoConfig's defaults.
MOCO_OPTIONS = ConfigOptions(MoCoConfig, {
    "backbone": FieldOption(f"architecture (default %(default)s); {BACKBONE_HELP}", type=backbone_name, metavar="ARCH"),
    "stem": FieldOption("ResNet stem (default %(default)s: CIFAR stem <= 64 px)", choices=("auto", "cifar", "imagenet")),
    "width": FieldOption("width of the small backbone (default %(default)s)"),
    "input_size": FieldOption("images are resized to PX×PX (default %(default)s)", flag="--image-size", metavar="PX"),
    "input_filter": FieldOption(INPUT_FILTER_HELP, choices=INPUT_FILTERS),
    "proj_hidden_dim": FieldOption("projector hidden width (default %(default)s)"),
    "proj_dim": FieldOption("projector output dimension (default %(default)s)"),
    "momentum": FieldOption("key-encoder momentum μ (default %(default)s)"),
    "temperature": FieldOption("InfoNCE temperature τ (default %(default)s)"),
    "queue_size": FieldOption("negatives in the queue, capped by the data size (default %(default)s)"),
    # The preset's values replace the whole augmentation set (config_from_args); --blur applies after.
    "augment.preset": FieldOption(
        f"augmentation preset: {', '.join(AUGMENT_PRESETS)} (default %(default)s; geometry adds zoom-out, rotation "
        "and shift, colour adds hue rotation, channel permutation, inversion and stronger jitter, robust both)",
        flag="--augment", choices=tuple(AUGMENT_PRESETS), metavar="PRESET"),
    "augment.blur": FieldOption("Gaussian blur (default %(default)s: only above 32 px)", flag="--blur",
                                choices=("auto", "on", "off")),
    "epochs": FieldOption("passes over the images (default %(default)s)"),
    "batch_size": FieldOption("global batch size (default %(default)s)"),
    "lr": FieldOption("base learning rate at batch 256, scaled linearly (default %(default)s)"),
    "weight_decay": FieldOption("SGD weight decay (default %(default)s)"),
    "warmup_epochs": FieldOption("linear warm-up length (default 5%% of --epochs)"),
    "seed": FieldOption("the one seed of the run (default %(default)s)"),
    "device": FieldOption("auto | cpu | cuda | cuda:N | mps (default %(default)s)", type=device_arg),
    "amp": FieldOption("fp32 only (default: bf16/fp16 autocast on CUDA, bf16 on CPUs with native bf16)", flag="--no-amp"),
    "checkpoint_every_steps": FieldOption("also save resume state every N steps"),
}, not_options={
    "sgd_momentum": "SPICE §IV-A's SGD momentum; set in Python (MoCoConfig)",
    **{f"augment.{name}": "a value of the --augment preset; set in Python (AugmentConfig)"
       for name in ("crop_scale", "crop_ratio", "flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue",
                    "grayscale_p", "blur_p", "blur_sigma", "mean", "std", "zoom_out_p", "zoom_out_scale", "rotation",
                    "translate", "channel_shuffle_p", "invert_p")},
}, unset=True)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised MoCo-v2 pretraining of a backbone on an image folder",
        description=(
            "Pretrain a backbone with MoCo-v2 (momentum encoder, queue of negatives, InfoNCE) on "
            "the images of FOLDER, without labels. Defaults follow CDC appendix B.1 (learning "
            "rate: MoCo-v2 / SPICE §IV-A)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER", help="folder of images (sub-folders are searched)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, backbone)")
    g = p.add_argument_group("model")
    MOCO_OPTIONS.add(g, "backbone", "stem", "width", "input_size", "input_filter", "proj_hidden_dim", "proj_dim")
    g = p.add_argument_group("MoCo")
    MOCO_OPTIONS.add(g, "momentum", "temperature", "queue_size", "augment.preset", "augment.blur")
    g = p.add_argument_group("optimisation")
    MOCO_OPTIONS.add(g, "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs")
    g = p.add_argument_group("run")
    MOCO_OPTIONS.add(g, "seed", "device", "amp")
    g.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice). On a machine shared with other jobs use 1: "
        "oversubscribed OpenMP threads can make a step 5-10x slower",
    )
    MOCO_OPTIONS.add(g, "checkpoint_every_steps")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (its settings are reused)")
    g.add_argument("--stop-after-epochs", type=int, metavar="E", help="stop (with a checkpoint) once E epochs are done")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_tensorboard_arg(g)
    add_config_args(p)
    p.set_defaults(func=run)


def config_from_args(args, base: MoCoConfig | None = None) -> MoCoConfig:
    """Options given on the command line override ``base`` (defaults, or a run's saved config)."""
    d = (base or MoCoConfig()).to_dict()
    values = MOCO_OPTIONS.values(args)
    preset = values.pop("augment.preset", None)
    if preset:
        d["augment"] = AugmentConfig.from_preset(preset, mean=d["augment"]["mean"], std=d["augment"]["std"],
                                                 blur=d["augment"]["blur"]).to_dict()
    return build_config(MoCoConfig, values, base=d)


def run(args) -> int:
    import torch

    from calibclust.errors import InputError

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    base = None
    if args.resume:
        base = MoCoConfig.from_dict(read_state(args.out)["config"])
    try:
        config = config_from_args(args, base)
    except ValueError as exc:
        raise InputError(str(exc)) from None

    world = int(os.environ.get("WORLD_SIZE", "1"))
    started_dist = False
    if world > 1 and _dist() is None:
        import torch.distributed as dist

        device = resolve_device(config.device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        started_dist = True
    board = open_writer(args.tensorboard) if _rank() == 0 else None
    try:
        result = pretrain_folder(
            folder, config, args.out, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
            progress=not args.no_progress, on_epoch=board.write if board else None,
        )
    finally:
        if board:
            board.close()
        if started_dist:
            import torch.distributed as dist

            dist.destroy_process_group()
    if _rank() == 0:
        try:
            write_pretrain_report(result.history, Path(args.out) / "training.html", config, str(folder))
        except Exception as exc:  # the curves are a convenience; the backbone is what the run is for
            print(f"warning: training.html not written ({type(exc).__name__}: {exc})", file=sys.stderr)
        last = result.history[-1] if result.history else {}
        print(
            f"pretrain: {result.global_step} steps done; last epoch loss {last.get('loss', float('nan')):.4f}, "
            f"{last.get('images_per_s', 0):.0f} images/s; backbone written to {Path(args.out) / 'backbone.safetensors'}"
        )
    return EXIT_PARTIAL if result.n_failed else EXIT_OK


def write_pretrain_report(history: list[dict], path: Path, config: MoCoConfig, folder: str) -> None:
    """``training.html``: the InfoNCE loss, learning rate and throughput of every epoch so far."""
    from calibclust.report import HTMLReport, plot_training_curves

    report = HTMLReport(f"MoCo-v2 pretraining: {folder}",
                        f"{history[-1]['epoch'] if history else 0} of {config.epochs} epochs · backbone {config.backbone} · "
                        "checkpoint/state.json holds every value plotted")
    report.add_figure(plot_training_curves(history, "InfoNCE loss per epoch", [("loss", lambda r: r.get("loss"))], "loss"),
                      alt="loss")
    report.add_figure(plot_training_curves(history, "Learning rate (cosine schedule)", [("lr", lambda r: r.get("lr"))], "lr"),
                      alt="learning rate")
    report.add_figure(plot_training_curves(history, "Throughput", [("images/s (both views)", lambda r: r.get("images_per_s"))],
                                           "images/s"), alt="throughput")
    report.write(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m calibclust.pretrain ...`` = ``calibclust pretrain ...`` without the other
    subcommands (what ``torchrun -m calibclust.pretrain`` runs on every rank)."""
    from calibclust.errors import CalibclustError

    from calibclust.cli_names import add_deprecated_aliases

    parser = argparse.ArgumentParser(prog="calibclust")
    register_cli(parser.add_subparsers(dest="command"))
    add_deprecated_aliases(parser)
    args = parser.parse_args(["pretrain", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or EXIT_OK)
    except CalibclustError as exc:
        print(f"calibclust pretrain: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover - exercised through torchrun in tests
    sys.exit(main())
