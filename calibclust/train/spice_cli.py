"""``calibclust train spice`` and ``calibclust train compare`` (argparse; no torch at module level).

Attached to the ``train`` command group of :mod:`calibclust.train.cli` through its documented hook
:func:`~calibclust.train.cli.train_subparsers` (``train-spice`` in the command table of :mod:`calibclust.cli`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Imported at module level (it imports no torch) so that, if the train group is missing, this
# module fails at load time and `calibclust` reports and skips it instead of crashing.
from calibclust.augment.view_config import ViewConfig
from calibclust.cli_config import ConfigOptions, FieldOption, add_config_args, build_config
from calibclust.cli_names import device_arg
from calibclust.tensorboard import add_tensorboard_arg, open_writer, require_tensorboard
from calibclust.cluster.choose_k import add_cluster_args
from calibclust.models.names import BACKBONE_HELP, backbone_name
from calibclust.train.methods import method_names
from calibclust.train.cdc_config import CDCConfig
from calibclust.train.spice_config import JOINT_SCHEDULES, SpiceConfig
from calibclust.train.cli import (
    CDC_OPTIONS,
    add_features_arg,
    add_heldout_args,
    choose_clusters,
    features_cache,
    refuse_auto_without_backbone,
    refuse_features_without_backbone,
    train_subparsers,
)
from calibclust.errors import EXIT_OK

_RAW = argparse.RawDescriptionHelpFormatter

SPICE_DESCRIPTION = """\
Train SPICE ("SPICE: Semantic Pseudo-Labeling for Image Clustering") on a folder of images.

Stage 2 (SPICE_s): with the backbone frozen, --heads clustering heads are trained at once on cached
features of the images and of strong views. Each batch of M images: the M/K most confident
un-augmented images of each cluster define a prototype in feature space; the M/K images nearest to
it get that cluster as pseudo label (Eq. 2-4, overlap assignment); the head learns them on strong
views with SPICE's double-softmax cross-entropy (Eq. 5), in --mstep-repeats passes of
--mstep-batch-size rows as the authors' code does. Each head is kept at the epoch of its lowest loss
over the whole data set, and the head with the lowest such loss is the model (never chosen with labels).
Stage 3 (SPICE): images whose predicted cluster is shared by more than --reliable-threshold of
their --neighbors nearest neighbours are "reliable" (Eq. 6-7); backbone and head are then trained
FixMatch-style (Eq. 8-9): reliable images on the weak view + confident weak→strong consistency.

The model's probabilities come from its single head and are NOT calibrated (metadata
calibrated=false). Outputs in --out: model/ (model.safetensors + config.json, read by
'calibclust predict' / 'calibclust export'), run.json (settings, head losses, reliable-set sizes,
metrics when FOLDER has class sub-folders).
"""

SPICE_EPILOG = """\
examples:
  # paper settings from a pretrained backbone
  calibclust train spice images/ --clusters 10 --backbone-weights pretrain_out/ --out runs/spice

  # K chosen without labels (the eigengap pick over 2..30)
  calibclust train spice images/ --clusters auto --backbone-weights pretrain_out/ --out runs/spice-auto

  # quick CPU run on sklearn's digits (small backbone, few steps)
  python -c "from calibclust.datasets import make_digits_folder; make_digits_folder('digits')"
  calibclust train spice digits --clusters 10 --out runs/spice --head-epochs 40 --batch-size 300 \\
      --heads 4 --joint-steps 100 --neighbors 20 --no-flip
"""

COMPARE_DESCRIPTION = """\
Train every registered method (--methods; built in: K-means, SPICE, CDC, DCCM, SPC, GCC) on the same labelled
folder and backbone, and print one table: one row per prediction a method reports (SPICE: SPICE_s
after stage 2 and SPICE after stage 3; CDC: both heads, CDC-Clu and CDC-Cal) × ACC / NMI / ARI /
ECE / AURC (ECE: 15 bins; AURC:
area under the risk-coverage curve, lower is better; correctness after the Hungarian
cluster→class mapping). FOLDER must have the ImageFolder layout (FOLDER/<class>/<image>).

K-means runs on the L2-normalised frozen features; its confidence is the Student-t soft
assignment of DEC, q_k ∝ (1 + ||z - μ_k||²)^-1. CDC runs with a frozen backbone unless
--finetune-backbone. Each method trains through the one method interface
(calibclust.train.methods) and saves its model to OUT/METHOD/model, which 'calibclust export onnx
--model' takes like any other.

Every fifth image of each class is held out: no method trains on it, and every figure is measured
on those images (or on --heldout FOLDER; --no-holdout scores the training images). The seconds
column is each method's training time. Writes compare.md and compare.json into --out.
"""

COMPARE_EPILOG = """\
example (sklearn's digits, small backbone; ~3.5 min pretraining, then on 2 idle CPU cores ~5 min of compare
for K-means, SPICE and CDC, ~5 min more for DCCM and SPC and ~11 min for GCC; --methods picks fewer):
  python -c "from calibclust.datasets import make_digits_folder; make_digits_folder('digits')"
  calibclust pretrain digits --out runs/moco --epochs 100 --batch-size 64 --lr 0.06 \\
      --proj-hidden-dim 512 --proj-dim 128
  calibclust train compare digits --clusters 10 --out runs/compare --no-flip --backbone-weights runs/moco \\
      --cdc-orth-steps 500 --batch-size 300 --neighbors 20 --joint-steps 100

SPICE's options and defaults are those of 'calibclust train spice' (the paper's); the example
shortens stage 3 for a CPU.

Without --backbone-weights the backbone is random (BatchNorm statistics re-estimated): SPICE's
prototype pseudo-labels assume a pretrained embedding and collapse on random features.
"""


def _mstep_batch(text: str) -> int | str:
    # "all" stays a word here (settings.json must not read it back as null, i.e. the default).
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a sub-batch of at least 2 rows or 'all', got {text!r}")
    return value


def _repeats(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of passes >= 1, got {text!r}")
    return int(text)


# The options of SpiceConfig's fields; each default is the field's. Stage 3's steps and batches are
# left unset (None): --joint-schedule resolves them.
SPICE_OPTIONS = ConfigOptions(SpiceConfig, {
    "n_heads": FieldOption("clustering heads trained at once (default %(default)s)", flag="--heads"),
    "batch_size": FieldOption("E-step/M-step batch M (default %(default)s)", metavar="M"),
    "score_batch_size": FieldOption("score a 'big batch' of N images per E-step (authors' code: 5000-10000)", metavar="N"),
    "top_fraction": FieldOption("prototype from the top fraction·M/K images (Eq. 2: 1.0; authors' code 0.5)"),
    "overlap": FieldOption("non-overlap assignment instead of Eq. 4's overlap (Fig. 4)", flag="--non-overlap"),
    "head_lr": FieldOption("Adam lr of the heads (default %(default)s)", flag="--lr-heads"),
    "head_epochs": FieldOption("stage-2 epochs (default %(default)s)"),
    "mstep_batch_size": FieldOption("M-step sub-batch: after each E-step, Adam steps on N selected rows at a time, as the "
                                    "authors' code does; 'all' = one step on every selected row (default %(default)s)",
                                    type=_mstep_batch, metavar="N|all",
                                    convert=lambda value: None if value == "all" else value),
    "mstep_repeats": FieldOption("passes over the selected rows per E-step (authors' code: 8; default %(default)s)",
                                 type=_repeats, metavar="R"),
    "views": FieldOption("cached views per image (stage 2 trains on the strong ones; default %(default)s)"),
    "head_batchnorm": FieldOption("heads D → 512 → ReLU → K without BatchNorm, as the authors' code (held-out SPICE_s ACC "
                                  "on digits 0.70 vs 0.82 with it, so ours keeps it by default)", flag="--no-head-batchnorm"),
    "num_neighbors": FieldOption("neighbours for Eq. 6 (default %(default)s)", flag="--neighbors", metavar="N_S"),
    "reliable_threshold": FieldOption("Eq. 7 threshold (default %(default)s)", metavar="λ"),
    "reliable_min_confidence": FieldOption("also require max prob > P (authors' code: 0.99)", metavar="P"),
    "reliable_balance": FieldOption("subsample reliable samples of each cluster to the smallest cluster (authors' code)",
                                    flag="--balance"),
    "reliable_fallback": FieldOption("a cluster with no reliable sample: keep its most consistent images (top, default), "
                                     "leave it empty, or stop", flag="--empty-cluster", choices=("top", "none", "error")),
    "joint": FieldOption("stop after stage 2 (SPICE_s)", flag="--no-joint"),
    "joint_steps": FieldOption("joint-training steps (default: by --joint-schedule)", metavar="N", unset=True),
    "joint_threshold": FieldOption("Eq. 8 threshold (default %(default)s)", metavar="η"),
    "joint_lr": FieldOption("SGD lr, cosine schedule (default %(default)s)"),
    "joint_ema": FieldOption("keep the moving average of stage 3's weights, decay D, as the authors' FixMatch code "
                             "evaluates (default %(default)s; 0: the last step's weights)", metavar="D"),
    "labeled_batch": FieldOption("reliable images per step L (default: by --joint-schedule)", metavar="L", unset=True),
    "unlabeled_ratio": FieldOption("U = R × L unlabelled images per step (default: by --joint-schedule)", metavar="R",
                                   unset=True),
    "seed": FieldOption("the one seed of the run (default %(default)s)"),
}, not_options={
    "num_clusters": "--clusters (a number, or auto: chosen from the features)",
    "hidden_dim": "§IV-B's head width; set in Python (SpiceConfig)",
    **dict.fromkeys(("joint_momentum", "joint_weight_decay"), "FixMatch's / §IV-B's value; set in Python (SpiceConfig)"),
})
# SPICE's views (the ViewConfig that train spice and train compare pass beside SpiceConfig).
VIEW_OPTIONS = ConfigOptions(ViewConfig, {
    "flip_p": FieldOption("no horizontal flips in the views (digits, text)", flag="--no-flip", sets=0.0),
}, not_options={
    "crop": "SCAN/SPICE's shift crop; set in Python (ViewConfig)",
    **dict.fromkeys(("crop_scale", "pad_fraction", "num_ops", "cutout", "cutout_fraction", "cutout_fill", "fill"),
                    "SCAN's view setting; set in Python (ViewConfig)"),
})
# --recalibrate-bn is CDCConfig's setting; SPICE and compare re-estimate BatchNorm by it before any method.
BACKBONE_OPTIONS = ConfigOptions(CDCConfig, {
    "recalibrate_bn": FieldOption("re-estimate BatchNorm statistics on the images (auto: random-init backbones only)",
                                  choices=CDC_OPTIONS.options["recalibrate_bn"].choices),
})
# compare's CDC: train cdc's fields under --cdc-* names. Epochs and batch are compare's own (shorter,
# so every method trains in minutes on a CPU); the others are CDCConfig's.
COMPARE_CDC_OPTIONS = ConfigOptions(CDCConfig, {
    "epochs": FieldOption("CDC epochs (default %(default)s)", flag="--cdc-epochs", default=40),
    "batch_size": FieldOption("CDC batch B (default %(default)s)", flag="--cdc-batch-size", default=300),
    "num_views": FieldOption("CDC's cached weak/strong views per image, frozen mode (default %(default)s, as train cdc)",
                             flag="--cdc-views"),
    "orth_steps": FieldOption("CDC's prototype separation steps (default %(default)s, the authors'; the quick start uses "
                              "500, which measured 0.815 vs 0.719 ACC on digits)", flag="--cdc-orth-steps"),
})


def _add_data_args(p: argparse.ArgumentParser, allow_auto: bool = True) -> None:
    p.add_argument("folder", metavar="FOLDER", help="image folder (flat, or FOLDER/<class>/<image> for reporting)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_cluster_args(p, allow_auto=allow_auto)
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default="small", type=backbone_name, metavar="ARCH",
                   help=f"architecture when no --backbone-weights (random init), or of torchvision/timm weights; {BACKBONE_HELP}")
    g.add_argument("--backbone-weights", metavar="PATH",
                   help="pretrained weights: a 'calibclust pretrain' directory, a trained model directory, a "
                        "checkpoint file, torchvision[:WEIGHTS] or, with --backbone timm:NAME, timm[:TAG]")
    g.add_argument("--image-size", type=int, metavar="PX", help="resize images to PX×PX (default: the backbone's, else 32)")
    BACKBONE_OPTIONS.add(g, "recalibrate_bn")
    s = p.add_argument_group("SPICE stage 2 (defaults: paper §IV-B)")
    SPICE_OPTIONS.add(s, "n_heads", "batch_size", "score_batch_size", "top_fraction", "overlap", "head_lr", "head_epochs",
                      "mstep_batch_size", "mstep_repeats", "views", "head_batchnorm")
    j = p.add_argument_group("SPICE stage 3 (defaults: paper §IV-B)")
    SPICE_OPTIONS.add(j, "num_neighbors", "reliable_threshold", "reliable_min_confidence", "reliable_balance",
                      "reliable_fallback", "joint")
    j.add_argument("--joint-schedule", choices=tuple(JOINT_SCHEDULES), default="cpu",
                   help="stage 3's steps and batch: cpu = 2,000 steps of 64 reliable + 448 unlabelled images (minutes "
                        "on a CPU); paper = §IV-B's 1,048,576 steps of 16 + 112 (days on a GPU); --joint-steps, "
                        "--labeled-batch and --unlabeled-ratio override it (default %(default)s)")
    SPICE_OPTIONS.add(j, "joint_steps", "joint_threshold", "joint_lr", "joint_ema", "labeled_batch", "unlabeled_ratio")
    r = p.add_argument_group("run")
    VIEW_OPTIONS.add(r, "flip_p")
    SPICE_OPTIONS.add(r, "seed")
    r.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_args(p)


def register_cli(subparsers) -> None:
    sub = train_subparsers(subparsers)
    p = sub.add_parser("spice", help="SPICE: prototype pseudo-labelling heads + reliable joint training",
                       description=SPICE_DESCRIPTION, epilog=SPICE_EPILOG, formatter_class=_RAW)
    _add_data_args(p)
    ck = p.add_argument_group("checkpoints")
    ck.add_argument("--resume", action="store_true",
                    help="continue the interrupted run in --out (same settings and images; ends with the same weights)")
    add_features_arg(p)
    add_tensorboard_arg(ck)
    ck.add_argument("--checkpoint-every-steps", type=int, default=50, metavar="STEPS",
                    help="joint-training steps between resume checkpoints (default %(default)s; stage 2 is saved when it ends)")
    p.set_defaults(func=run_spice)

    c = sub.add_parser("compare", help="one table of held-out figures: every registered method on one folder",
                       description=COMPARE_DESCRIPTION, epilog=COMPARE_EPILOG, formatter_class=_RAW)
    _add_data_args(c, allow_auto=False)
    COMPARE_CDC_OPTIONS.add(c, "epochs", "batch_size", "num_views", "orth_steps")
    c.add_argument("--finetune-backbone", action="store_true",
                   help="train CDC's backbone with its heads, as the paper does, so Eq. 5 updates θ (default: heads "
                        "on frozen features, much faster; SPICE's stage 3 always trains its backbone)")
    add_heldout_args(c)
    c.add_argument("--methods", type=_method_list, default=",".join(method_names()), metavar="NAME[,NAME...]",
                   help="registered methods to train and score, in this order (default %(default)s)")
    c.set_defaults(func=run_compare)  # SPICE's settings and defaults are train spice's


# --- command functions -----------------------------------------------------------------------------
def _device(name: str) -> str:
    from calibclust.device import resolve_device

    return str(resolve_device(name))


def _method_list(text: str) -> str:
    # Kept as one comma-separated string, so --print-config / --config round-trip it as written.
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in method_names()]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct method names from {', '.join(method_names())}, got {text!r}")
    return ",".join(names)


def spice_config_from_args(args, num_clusters: int | None = None):
    # explicit flags > --joint-schedule
    values = {**JOINT_SCHEDULES[args.joint_schedule], **SPICE_OPTIONS.values(args)}
    values["num_clusters"] = args.clusters if num_clusters is None else num_clusters
    return build_config(SpiceConfig, values)


def compare_cdc_config(args, view_config):
    """The CDCConfig ``train compare`` trains CDC with (frozen backbone unless --finetune-backbone)."""
    values = COMPARE_CDC_OPTIONS.values(args)
    values.update(num_clusters=args.clusters, sub_batch_size=max(2, values["batch_size"] // 2),
                  freeze_backbone=not args.finetune_backbone, recalibrate_bn="no", views=view_config, seed=args.seed)
    return build_config(CDCConfig, values)


def _prepare(args):
    """Decoded data, a backbone (see :func:`calibclust.train.cli.load_data_and_backbone`), its
    normalisation, and the view settings."""
    from calibclust.train.cli import load_data_and_backbone

    data, backbone, info, pretrained = load_data_and_backbone(args, "SPICE's prototype pseudo-labels assume a pretrained "
                                                              "embedding and tend to collapse on random features")
    view_config = build_config(ViewConfig, VIEW_OPTIONS.values(args))
    return data, backbone, info, (info["mean"], info["std"]), view_config, pretrained


def _report(probs, labels):
    from calibclust.metrics import clustering_report

    conf, pred = probs.max(1)
    rep = clustering_report(labels, pred.numpy(), conf.numpy())
    return {"acc": rep.acc, "nmi": rep.nmi, "ari": rep.ari, "ece": rep.calibration.ece, "aurc": rep.rejection.aurc,
            "mean_confidence": float(conf.mean())}


def _spice_run(args, data, backbone, norm, view_config, device, out_dir=None, board=None, cache=None, info=None):
    from calibclust.models.clustering import ClusteringModel
    from calibclust.train.features import compute_feature_cache
    from calibclust.train.spice import train_spice

    config = spice_config_from_args(args)
    probe = ClusteringModel(backbone, config.num_clusters, head_names=("clustering",), predict_head="clustering",
                            mean=norm[0], std=norm[1]).to(device).eval()
    if cache is None:
        cache = compute_feature_cache(probe.embed, probe.preprocess, data.images, config.views, config.seed, view_config,
                                      device=device, progress=not args.no_progress)
    def log(rec):
        if not args.no_progress:
            print(json.dumps(rec), file=sys.stderr)
        if board is not None and ("epoch" in rec or "step" in rec):
            stage2 = "epoch" in rec  # stage 2 logs epochs, stage 3 (joint training) steps
            board.write(rec, "epoch" if stage2 else "step", prefix="stage2/" if stage2 else "stage3/")

    resume = {} if out_dir is None else {"out_dir": out_dir, "resume": args.resume, "checkpoint_every": args.checkpoint_every_steps}
    result = train_spice(backbone, data.images, config, feature_cache=cache, mean=norm[0], std=norm[1],
                         view_config=view_config, progress=not args.no_progress, log=log, device=device,
                         features_digest=(info or {}).get("features_digest"), **resume)
    return config, cache, result


def _save_spice(args, data, config, result, pretrained, clusters_choice=None) -> Path:
    from calibclust.models.clustering import save_model
    from calibclust.train.spice import spice_metadata, spice_train_stats

    stats = spice_train_stats(result, config, data.num_images, pretrained, clusters_choice)
    meta = spice_metadata(result.model, data.image_size, train_stats=stats, resize=data.resize)
    return save_model(result.model, Path(args.out) / "model", meta)


def write_spice_report(result, path: Path, config, folder: str) -> None:
    """``training.html``: stage 2's whole-dataset loss of every head per epoch (the kept head marked)
    and stage 3's FixMatch loss and confident share per step."""
    from calibclust.report import HTMLReport, plot_training_curves

    report = HTMLReport(f"SPICE training: {folder}", f"{config.head_epochs} stage-2 epochs · {len(result.joint_history)} "
                        f"joint steps · K = {config.num_clusters} · run.json holds the losses")
    heads = result.heads.history
    series = [(f"head {i}" + (" (kept: lowest loss)" if i == result.heads.best else ""),
               lambda r, i=i: (r.get("dataset_loss") or r["mean_loss"])[i]) for i in range(config.n_heads)]
    report.add_figure(plot_training_curves(heads, "Stage 2: loss of each clustering head (Eq. 5)", series, "loss"),
                      alt="stage 2 losses")
    if result.joint_history:
        report.add_figure(plot_training_curves(result.joint_history, "Stage 3: joint training (Eq. 8-9)", [
            ("loss", lambda r: r.get("loss")), ("confident share (mask)", lambda r: r.get("mask"))], "value", x="step"),
            alt="stage 3")
    report.write(path)


def _say_how_to_resume(out: Path) -> None:
    from calibclust.train.state import state_json

    meta_path = state_json(out)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        where = f"joint step {meta['step']}" if meta.get("stage") == "joint" else "the end of stage 2"
        print(f"\ntrain spice: interrupted; the last checkpoint in {meta_path.parent} is at {where}. "
              "Continue with the same command plus --resume.", file=sys.stderr)
    else:
        print("\ntrain spice: interrupted before the first checkpoint (the end of stage 2); rerun the command.",
              file=sys.stderr)


def run_spice(args) -> int:
    from calibclust.errors import InputError
    from calibclust.train.state import has_state

    # Before the data and feature passes: refuse early, or say that --resume found nothing.
    if has_state(args.out) and not args.resume:
        raise InputError(f"{args.out} already holds a SPICE training checkpoint; pass --resume to continue it "
                         "or choose a new --out")
    if args.resume and not has_state(args.out):
        print(f"train spice: no checkpoint in {args.out}; starting from scratch", file=sys.stderr)
    refuse_features_without_backbone(args)  # before: it may name the backbone --clusters auto needs
    if args.features:
        args.views = 1  # precomputed features have one view; the settings say so
    refuse_auto_without_backbone(args)
    # Settings are checked before the images are decoded (K = 2 stands in for a K still to choose).
    spice_config_from_args(args, num_clusters=2 if args.clusters == "auto" else args.clusters)
    require_tensorboard(args.tensorboard)
    device = _device(args.device)
    data, backbone, info, norm, view_config, pretrained = _prepare(args)
    cache = None
    if args.features:
        backbone, cache = features_cache(args, data, backbone, info, device)
    clusters_choice = choose_clusters(args, data, backbone, info, device)
    print(f"training SPICE on {data.num_images} images, K={args.clusters}, output {args.out}", file=sys.stderr)
    board = open_writer(args.tensorboard)
    try:
        config, _, result = _spice_run(args, data, backbone, norm, view_config, device, out_dir=Path(args.out), board=board,
                                       cache=cache, info=info)
    except KeyboardInterrupt:
        _say_how_to_resume(Path(args.out))
        raise
    finally:
        if board:
            board.close()
    model_dir = _save_spice(args, data, config, result, pretrained, clusters_choice)
    try:
        write_spice_report(result, Path(args.out) / "training.html", config, str(args.folder))
    except Exception as exc:  # the curves are a convenience; the model is what the run is for
        print(f"warning: training.html not written ({type(exc).__name__}: {exc})", file=sys.stderr)
    run = {"method": "spice", "folder": str(args.folder), "config": config.to_dict(), "clusters_choice": clusters_choice, "backbone": info if pretrained else {"name": args.backbone},
           "head_losses": result.heads.losses.tolist(), "best_head": result.heads.best,
           "kept_epochs": result.heads.kept_epochs,
           "reliable": result.reliable_report, "seconds": result.seconds}
    if data.labels is not None:
        run["metrics"] = {"spice_s": _report(result.spice_s_probs, data.labels), "spice": _report(result.probs, data.labels)}
        for name, m in run["metrics"].items():
            print(f"{name}: ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  ECE {m['ece']:.4f}  AURC {m['aurc']:.4f}")
    (Path(args.out) / "run.json").write_text(json.dumps(run, indent=2, default=str))
    kept = result.heads.kept_epochs[result.heads.best] if result.heads.kept_epochs else config.head_epochs
    print(f"model: {model_dir}  (head {result.heads.best} of {config.n_heads} at epoch {kept}, by minimum loss; "
          f"{len(result.reliable_indices)} reliable images)")
    print(f"next: calibclust predict {args.folder} --model {model_dir} --out predictions.csv")
    return EXIT_OK


def format_table(rows: list[dict], title: str = "") -> str:
    head = "| method | ACC | NMI | ARI | ECE | AURC | seconds |\n|---|---|---|---|---|---|---|"
    lines = [f"| {r['method']} | {r['acc']:.4f} | {r['nmi']:.4f} | {r['ari']:.4f} | {r['ece']:.4f} | {r['aurc']:.4f} "
             f"| {r['seconds']:.0f} |" for r in rows]
    return (title + "\n\n" if title else "") + "\n".join([head, *lines])


def run_compare(args) -> int:
    import torch

    from calibclust.errors import InputError
    from calibclust.train.cli import split_heldout
    from calibclust.train.methods import get_method

    methods = [get_method(name) for name in args.methods.split(",")]  # unknown names fail before any decoding
    device = _device(args.device)
    data, backbone, info, norm, view_config, pretrained = _prepare(args)
    if data.labels is None:
        raise InputError(f"{args.folder}: compare needs class sub-folders (FOLDER/<class>/<image>) to score methods")
    data, held, where = split_heldout(args, data)
    scored = held or data
    print(f"scoring every method on {where}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # _prepare re-estimated BatchNorm where asked; the methods must not redo it on their copies.
    info = {**info, "pretrained": pretrained, "source": info.get("source") or f"random init ({args.backbone})"}
    # Settings of the methods this command has options for; any other registered method runs with its defaults.
    configs = {
        "spice": spice_config_from_args(args),
        "cdc": compare_cdc_config(args, view_config),
    }
    if "dccm" in args.methods.split(","):  # its transformed copies take the views too (--no-flip)
        from calibclust.train.profiles import dccm_config

        configs["dccm"] = dccm_config(args.clusters, seed=args.seed, views=view_config)
    options = {"spice": {"view_config": view_config}}
    rows, settings = [], {}
    for cls in methods:
        method = cls(args.clusters, configs.get(cls.name), seed=args.seed, device=device,
                     progress=not args.no_progress, **options.get(cls.name, {}))
        print(f"--- {cls.name}", file=sys.stderr)
        if (out / cls.name / "checkpoint").exists():  # rerunning the command redoes every method
            shutil.rmtree(out / cls.name / "checkpoint")
        method.fit(data, backbone, info, out_dir=out / cls.name, eval_data=held)
        method.save(out / cls.name / "model")
        settings[cls.name] = method.config.to_dict() if hasattr(method.config, "to_dict") else None
        for row, probs in method.predictions(scored.images).items():
            rows.append({"method": row, "seconds": method.seconds[row], **_report(torch.from_numpy(probs), scored.labels)})
    title = (f"Scored on {where}; trained on {data.num_images} images of {args.folder}, K={args.clusters}, backbone "
             f"{'pretrained ' + str(args.backbone_weights) if pretrained else args.backbone + ' (random init, BN re-estimated)'}"
             + (f", CDC's {'fine-tuned with its heads' if args.finetune_backbone else 'frozen'}"
                if "cdc" in args.methods.split(",") else "")
             + f", seed {args.seed}. Seconds: training, each method's own feature pass included (SPICE_s: stage 2; "
               "SPICE: stages 2 and 3; CDC-Clu and CDC-Cal are one run).")
    table = format_table(rows, title)
    print(table)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps({"rows": rows, "scored_on": where, "methods": args.methods.split(","),
                                                  "configs": settings}, indent=2, default=str))
    print(f"\n(written to {out}/compare.md and compare.json; each method's model in {out}/METHOD/model)")
    return EXIT_OK
