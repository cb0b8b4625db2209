"""``calibclust train ...`` and ``calibclust predict`` (argparse; imports no torch at module level).

``train`` is a command group: this module adds ``train cdc``, ``train cdc-ablation`` and, for every
registered method without a command of its own (:mod:`calibclust.train.methods`), a generic
``train NAME``; a method with its own options attaches its subcommand from its own ``register_cli``::

    from calibclust.train.cli import train_subparsers

    def register_cli(subparsers):
        p = train_subparsers(subparsers).add_parser("spice", help=..., description=...)
        ...

:func:`train_subparsers` creates the group on first use and returns the same one afterwards,
whatever order the modules register in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calibclust.cli_config import ConfigOptions, FieldOption, add_config_args, build_config
from calibclust.cli_names import device_arg
from calibclust.models.names import BACKBONE_HELP, backbone_name, is_timm
from calibclust.tensorboard import add_tensorboard_arg, open_writer, require_tensorboard
from calibclust.cluster.choose_k import add_cluster_args
from calibclust.train.cdc_config import DIFFICULTIES, HEAD_MODES, INIT_MODES, MINICLUSTER_NORMS, CDCConfig
from calibclust.train.paper_settings import LR_BACKBONE, PAPER_SETTINGS
from calibclust.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE

_RAW = argparse.RawDescriptionHelpFormatter


def train_subparsers(subparsers) -> argparse._SubParsersAction:
    """The ``calibclust train`` command group's subparsers (created once, shared by methods)."""
    existing = subparsers.choices.get("train")
    if existing is not None:
        return existing._calibclust_train_subparsers
    parser = subparsers.add_parser(
        "train",
        help="train a clustering model on an image folder (cdc, ...)",
        description="Train a calibrated clustering model on a folder of unlabeled images.",
        epilog="Run 'calibclust train METHOD --help' for a method's options.",
        formatter_class=_RAW,
    )
    sub = parser.add_subparsers(dest="method", metavar="METHOD")
    parser._calibclust_train_subparsers = sub

    def _usage(args) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    parser.set_defaults(func=_usage)
    return sub


CDC_DESCRIPTION = """\
Train Calibrated Deep Clustering (CDC; "Towards Calibrated Deep Clustering Network") on a folder of images.

A backbone f (random init, or pretrained weights from a backbone checkpoint) gets two MLP heads:
a clustering head that learns from confident pseudo labels on strongly augmented views, and a
calibration head that learns the clustering head's average prediction over small groups of
similar images ("mini-clusters") and so becomes calibrated. The calibration head picks the pseudo
labels (per cluster, as many as its confidence justifies: Eq. 4) and makes the final prediction.
Both heads start from K-means prototypes of the backbone features (§3.3).

Ground-truth labels are never used for training or for choosing the model: the saved model is
the last epoch's. If FOLDER has the ImageFolder layout (FOLDER/<class>/<image>), ACC/NMI/ARI/ECE
of both heads are reported each epoch; a flat folder trains exactly the same way.

Outputs in --out: model/ (model.safetensors + config.json: what 'calibclust predict' and
'calibclust export' read), log.jsonl (one JSON record per epoch; epoch 0 = after initialisation),
run.json (resolved settings, versions, seed), checkpoint/ (for --resume), features.safetensors
(--freeze-backbone only: cached view features).

Choosing K (--mini-clusters): fewer mini-clusters penalise over-confidence more. The paper uses
B/K = 2 on easy data (CIFAR-10: B=1000, K=500) and B/K = 25 on hard data (CIFAR-20: K=40);
--difficulty easy|hard applies that rule when --mini-clusters is not given.
"""

CDC_EPILOG = """\
examples:
  # the paper's settings (B=1000, Adam 5e-5/1e-4, 100 epochs) from a pretrained backbone
  calibclust train cdc images/ --clusters 10 --backbone-weights pretrain_out/ --out runs/cdc

  # fast CPU run: heads only, on cached features of 8 weak + 8 strong views per image
  calibclust train cdc images/ --clusters 10 --backbone-weights pretrain_out/ \\
      --freeze-backbone --epochs 30 --batch-size 500 --sub-batch-size 250 --out runs/cdc-frozen

  # continue an interrupted run (same settings; --epochs may grow)
  calibclust train cdc images/ --clusters 10 --backbone-weights pretrain_out/ --out runs/cdc --resume

  # K not known: choose it without labels from the backbone's features (curve printed, saved in run.json)
  calibclust train cdc images/ --clusters auto --k-range 2..20 --backbone-weights pretrain_out/ --out runs/cdc-auto

  # ablations of the paper's Tab. 2
  calibclust train cdc images/ --clusters 10 --select fixed:0.95 --out runs/fixed095
  calibclust train cdc images/ --clusters 10 --single-head clu --out runs/single
  calibclust train cdc images/ --clusters 10 --no-stop-grad --out runs/nosg
  calibclust train cdc images/ --clusters 10 --init random --out runs/noinit

  # then: predictions from the calibration head (or --head clustering for CDC-Clu)
  calibclust predict images/ --model runs/cdc/model --out preds.csv
"""

ABLATION_DESCRIPTION = """\
Reproduce the CDC paper's ablation table (Tab. 2) on a labelled image folder, with one command.

Every row starts from the same backbone, prototypes and seed: K-means on the features, the heads
right after random / prototype initialisation, CDC without initialisation, fixed-threshold
selection (0.99/0.95/0.90/0.80), CDC-Clu and CDC-Cal, single head (Clu; Clu+Cal) and the
calibration loss without stop-gradient. By default the heads train on shared frozen features
(minutes on a CPU); --finetune-backbone trains backbone and heads as the paper does, so that the
calibration loss without stop-gradient reaches the feature extractor (Tab. 2-V).

FOLDER must have the ImageFolder layout (FOLDER/<class>/<image>) because the table is an
evaluation. Every fifth image of each class is held out of training and every figure is measured
on those (or on --heldout FOLDER). Writes ablation.md / ablation.json and one run directory per
variant under --out, and prints the table.
"""

ABLATION_EPILOG = """\
examples (sklearn's digits, the small backbone, minutes on 2 CPU cores):
  python -c "from calibclust.datasets import make_digits_folder; make_digits_folder('digits')"
  # randomly initialised backbone (weak features: expect modest ACC)
  calibclust train cdc-ablation digits --clusters 10 --no-flip --threads 1 --out runs/ablation-random
  # a MoCo-v2 backbone pretrained on the same images first (the setting of the paper)
  calibclust pretrain digits --out runs/moco --backbone small --epochs 30 --batch-size 128 \\
      --lr 0.06 --proj-hidden-dim 512 --proj-dim 128
  calibclust train cdc-ablation digits --clusters 10 --no-flip --threads 1 \\
      --backbone-weights runs/moco --out runs/ablation-moco
"""


# The options of CDCConfig's fields; each default is the field's. Left unset (None), where the
# command resolves the value: --batch-size by --paper-setting, --sub-batch-size as B/2 of the
# resolved B, --single-head as "dual". --lr-backbone resolves to LR_BACKBONE[--difficulty] (the
# config leaves it None): the saved settings name the lr a run used, so it resumes with it.
CDC_OPTIONS = ConfigOptions(CDCConfig, {
    "recalibrate_bn": FieldOption("re-estimate the backbone's BatchNorm statistics on the images first "
                                  "(auto: only for randomly initialised backbones)", choices=("auto", "yes", "no")),
    "epochs": FieldOption("epochs (default %(default)s)"),
    "batch_size": FieldOption("batch B (default %(default)s, or by --paper-setting)", metavar="B", unset=True),
    "sub_batch_size": FieldOption("sub-batch B_s (default B/2: the authors' 500 for B = 1000)", metavar="BS", unset=True),
    "mini_clusters": FieldOption("mini-clusters K per batch for Eq. 1 (default: by --difficulty)", metavar="K"),
    "difficulty": FieldOption("K rule of thumb when --mini-clusters is absent: easy K=B/2, hard K=B/25 (held-out: hard "
                              "calibrates letters in many fonts and reframed digits better, plain digits worse; "
                              "see calibclust bench calibration)", choices=DIFFICULTIES),
    "minicluster_norm": FieldOption("normalisation of the features the Eq. 1 mini-cluster K-means runs on: l2, or l1 as the "
                                    "authors' code does (held-out ECE within 0.005 of l2 on three zoo sets; default "
                                    "%(default)s)", choices=MINICLUSTER_NORMS),
    "top_size": FieldOption("|TOP(c)| of Eq. 4 (default ⌊B/C⌋)", metavar="T"),
    "hidden_dim": FieldOption("head hidden units H (default %(default)s)", metavar="H"),
    "lr_backbone": FieldOption("Adam lr of the backbone when it is trained (default 5e-5; 1e-5 with --difficulty hard, as "
                               "the paper lowers it for CIFAR-20 and Tiny-ImageNet; or by --paper-setting)", metavar="LR"),
    "lr_heads": FieldOption("Adam lr of the heads (default %(default)s)"),
    "w_en": FieldOption("weight of the entropy term, Eq. 3 (default %(default)s)"),
    "orth_steps": FieldOption("prototype separation steps at init (default %(default)s)"),
    "freeze_backbone": FieldOption("train the heads only, on cached features of --views weak and strong views per image"),
    "num_views": FieldOption("cached views per kind in --freeze-backbone mode (default %(default)s)", flag="--views"),
    "views.flip_p": FieldOption("no horizontal flips in the views (for data where mirroring changes the class, e.g. digits)",
                                flag="--no-flip", sets=0.0),
    "views.crop": FieldOption("crop of the weak and strong views: resized = RandomResizedCrop (the CDC authors' code), "
                              "shift = RandomCrop with 1/8 padding (SCAN/SPICE) (default %(default)s)",
                              flag="--view-crop", choices=("resized", "shift")),
    "seed": FieldOption("the one seed of the run (default %(default)s)"),
    "select": FieldOption("pseudo-label selection: cdc (Eq. 4, default) | fixed:T (global threshold T, Tab. 2-II)",
                          metavar="SPEC"),
    "heads": FieldOption("one head only: clu = clustering loss only (Tab. 2-III); clu+cal = both losses on it (Tab. 2-IV)",
                         flag="--single-head", choices=HEAD_MODES[1:], unset=True),
    "stop_gradient": FieldOption("let the calibration loss reach the backbone and, via its targets, the clustering head "
                                 "(Tab. 2-V)", flag="--no-stop-grad"),
    "init": FieldOption("head initialisation: prototype (§3.3, default) | random (Tab. 2-I 'w/o Init')", choices=INIT_MODES),
}, not_options={
    "num_clusters": "--clusters (a number, or auto: chosen from the features)",
    **dict.fromkeys(("weight_decay", "init_kmeans_restarts", "orth_scale", "orth_lr", "minicluster_restarts",
                     "minicluster_iters", "eval_batch_size"), "the authors' value; set in Python (CDCConfig)"),
    **dict.fromkeys(("views.crop_scale", "views.pad_fraction", "views.num_ops", "views.cutout", "views.cutout_fraction",
                     "views.cutout_fill", "views.fill"), "SCAN's view setting; set in Python (ViewConfig)"),
})
# What cdc-ablation's rows vary, so the command has no option for them.
ABLATED = ("select", "heads", "stop_gradient", "init")
# cdc-ablation trains ten rows: shorter than a CDC run by default, so the table takes minutes on a CPU.
ABLATION_DEFAULTS = {"epochs": 30, "batch_size": 300, "orth_steps": 500, "views": 4}


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default="small", type=backbone_name, metavar="ARCH",
                   help="architecture when starting from random weights, or of torchvision/timm weights "
                        f"(default: small, ~0.3 M parameters); {BACKBONE_HELP}")
    g.add_argument("--backbone-weights", metavar="PATH",
                   help="pretrained weights, overriding --backbone: a 'calibclust pretrain' output directory "
                        "(backbone.safetensors + backbone.json), a trained model directory, a MoCo/torchvision "
                        "checkpoint file, torchvision[:WEIGHTS] or, with --backbone timm:NAME, timm[:TAG] "
                        "(the timm model's pretrained weights, from the Hugging Face cache or the internet)")
    g.add_argument("--image-size", type=int, metavar="PX",
                   help="images are resized to PX×PX (default: the backbone's input size, else 32)")
    # CDCConfig's field; the generic commands pass it to load_data_and_backbone with the same meaning.
    CDC_OPTIONS.add(g, "recalibrate_bn")


def add_run_args(p: argparse.ArgumentParser, seed_default: int | None = None) -> None:
    """The run group; ``--seed`` is CDCConfig's field, or (``seed_default``) a generic command's."""
    r = p.add_argument_group("run")
    if seed_default is None:
        CDC_OPTIONS.add(r, "seed")
    else:
        r.add_argument("--seed", type=int, default=seed_default, help="the one seed of the run (default %(default)s)")
    r.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    r.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice; 1 is "
                                                            "faster on a machine whose cores are busy)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_common_training_args(p: argparse.ArgumentParser, allow_auto: bool = True, paper_setting: bool = False) -> None:
    p.add_argument("folder", metavar="FOLDER", help="image folder (flat, or FOLDER/<class>/<image> for reporting)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_cluster_args(p, allow_auto=allow_auto)
    add_backbone_args(p)
    t = p.add_argument_group("training (defaults: paper §4.1 / appendix B)")
    CDC_OPTIONS.add(t, "epochs", "batch_size", "sub_batch_size")
    if paper_setting:
        t.add_argument("--paper-setting", choices=sorted(PAPER_SETTINGS), metavar="NAME",
                       help="the paper's B, K and encoder lr for one of its benchmarks (§4.1): " + "; ".join(
                           f"{name} B={v['batch_size']} K={v['mini_clusters']}"
                           + (f" lr {v['lr_backbone']:g}" if "lr_backbone" in v else "")
                           for name, v in sorted(PAPER_SETTINGS.items()))
                       + "; --batch-size, --mini-clusters and --lr-backbone override it")
    CDC_OPTIONS.add(t, "mini_clusters", "difficulty", "minicluster_norm", "top_size", "hidden_dim", "lr_backbone",
                    "lr_heads", "w_en", "orth_steps", "freeze_backbone", "num_views", "views.flip_p", "views.crop")
    add_run_args(p)
    add_config_args(p)


def _add_ablation_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("ablations (paper Tab. 2)")
    CDC_OPTIONS.add(a, *ABLATED)


def register_cli(subparsers) -> None:
    sub = train_subparsers(subparsers)
    p = sub.add_parser("cdc", help="Calibrated Deep Clustering (dual head)", description=CDC_DESCRIPTION,
                       epilog=CDC_EPILOG, formatter_class=_RAW)
    _add_common_training_args(p, paper_setting=True)
    _add_ablation_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_features_arg(p)
    add_tensorboard_arg(p)
    p.set_defaults(func=run_cdc)

    a = sub.add_parser("cdc-ablation", help="print our own CDC Tab. 2 on a labelled folder",
                       description=ABLATION_DESCRIPTION, epilog=ABLATION_EPILOG, formatter_class=_RAW)
    _add_common_training_args(a, allow_auto=False)
    a.set_defaults(func=run_cdc_ablation, **ABLATION_DEFAULTS)
    a.add_argument("--finetune-backbone", action="store_true",
                   help="train backbone and heads in every row, as the paper does (Eq. 5 updates θ; in 'no-stop-grad' "
                        "the calibration loss does too, Tab. 2-V); default: heads on shared frozen features, much faster")
    add_heldout_args(a)
    _register_method_commands(sub)
    a.add_argument("--variants", metavar="NAMES", help="comma-separated subset of: cdc,no-init,fixed-0.99,fixed-0.95,"
                   "fixed-0.90,fixed-0.80,single-clu,single-clu+cal,no-stop-grad (default all)")


def _register_method_commands(sub) -> None:
    """``calibclust train NAME`` for every registered method without a command of its own: the same
    folder, backbone and run options, the method's default settings."""
    import inspect

    from calibclust.train.methods import DEDICATED_COMMANDS, ClusteringMethod, method_names

    # The seed goes to the method (ClusteringMethod(seed=...) fills its config's), so its default is
    # the method interface's: a method's config class is not loaded to build the command line.
    seed = inspect.signature(ClusteringMethod.__init__).parameters["seed"].default

    for name in method_names():
        if name in DEDICATED_COMMANDS or name in sub.choices:
            continue
        p = sub.add_parser(name, help=f"train the registered method {name!r} (its default settings)",
                           description=METHOD_DESCRIPTION.format(name=name), epilog=METHOD_EPILOG.format(name=name),
                           formatter_class=_RAW)
        p.add_argument("folder", metavar="FOLDER", help="image folder (flat, or FOLDER/<class>/<image> for reporting)")
        p.add_argument("--out", required=True, metavar="DIR", help="output directory; the model goes to DIR/model")
        add_cluster_args(p, allow_auto=False)
        add_backbone_args(p)
        add_run_args(p, seed_default=seed)
        p.set_defaults(func=run_method, method_name=name)


METHOD_DESCRIPTION = """Train the registered method '{name}' (calibclust.train.methods) on a folder of images, from a
pretrained backbone, and save the model to OUT/model, which 'calibclust export onnx --model'
and 'calibclust predict --model' take like any other. If FOLDER has class sub-folders, the
figures printed are measured on the training images (use 'calibclust train compare' for
held-out figures).
"""
METHOD_EPILOG = """example:
  calibclust pretrain images/ --out runs/moco
  calibclust train {name} images/ --clusters 10 --backbone-weights runs/moco --out runs/{name}
"""


def run_method(args) -> int:
    import torch

    from calibclust.device import resolve_device
    from calibclust.train.data import head_report
    from calibclust.train.methods import get_method

    _set_threads(args)
    cls = get_method(args.method_name)
    data, backbone, info, _ = load_data_and_backbone(args, f"{args.method_name} clusters its features, which "
                                                           "carry little meaning before pretraining")
    method = cls(args.clusters, seed=args.seed, device=str(resolve_device(args.device)), progress=not args.no_progress)
    method.fit(data, backbone, info, out_dir=args.out)
    model_dir = method.save(Path(args.out) / "model")
    report = head_report(torch.from_numpy(method.predict_proba(data.images)), data.labels)
    figures = (f", on its training images ACC {report['acc']:.3f} ECE {report['ece']:.3f}"
               if data.labels is not None else "")
    print(f"model: {model_dir}  (mean confidence {report['mean_confidence']:.3f}, cluster sizes "
          f"{report['cluster_sizes']}{figures}; {method.seconds[method.row_names()[-1]]:.1f} s)")
    print(f"next: calibclust export onnx --model {model_dir} --images {args.folder} --out {args.method_name}.onnx")
    return EXIT_OK


def register_predict_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="write the predictions table for an image folder (torch)",
        description=(
            "Run a trained model (a 'model/' directory written by 'calibclust train') over an image folder "
            "and write the predictions table that 'calibclust evaluate' reads: path, cluster, cluster_name, "
            "confidence, error, top-k clusters and probabilities, and one prob_<c> column per cluster. "
            "Unreadable images get a row with cluster -1 and the reason (exit code 3)."
        ),
        epilog=(
            "examples:\n"
            "  calibclust predict images/ --model runs/cdc/model --out preds.csv\n"
            "  calibclust predict images/ --model runs/cdc/model --head clustering --out preds_clu.parquet\n"
            "  calibclust evaluate preds.csv --truth images/ --out report/"
        ),
        formatter_class=_RAW,
    )
    p.add_argument("folder", metavar="FOLDER", help="images to predict")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (model.safetensors + config.json)")
    p.add_argument("--out", required=True, metavar="FILE", help="table to write: .csv, .parquet or .jsonl")
    p.add_argument("--head", help="head to read probabilities from (default: the model's; CDC: calibration; "
                                  "'clustering' gives CDC-Clu)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="also write the K most likely clusters and their probabilities (default 0: none, as "
                        "'calibclust label'; the prob_<c> columns hold every cluster)")
    p.add_argument("--no-probs", action="store_true", help="leave out the prob_<c> columns")
    p.add_argument("--device", type=device_arg, default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)


# --- command functions (heavy imports happen here) --------------------------------------------------
def _set_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _config_from_args(args, **overrides):
    values = CDC_OPTIONS.values(args)
    # explicit flags > --paper-setting > CDCConfig's defaults
    values = {**PAPER_SETTINGS.get(getattr(args, "paper_setting", None) or "", {}), **values}
    batch = values.get("batch_size", CDC_OPTIONS.default("batch_size"))
    if not values.get("sub_batch_size"):
        values["sub_batch_size"] = max(2, batch // 2)
    # A concrete lr in the saved settings, so a run started before the hard rule resumes.
    values.setdefault("lr_backbone", LR_BACKBONE[values["difficulty"]])
    values = {**values, "num_clusters": args.clusters, **overrides}
    return build_config(CDCConfig, values)


def _load_inputs(args):
    from calibclust.train.data import TrainingData, load_backbone_dir

    backbone, info = None, {}
    if args.backbone_weights:
        backbone, info = load_backbone_dir(args.backbone_weights, arch=weights_arch(args), input_size=args.image_size)
    size = args.image_size or (backbone.spec.get("input_size") if backbone is not None else None) or 32
    data = TrainingData.from_folder(args.folder, size, progress=not args.no_progress)
    if data.unreadable:
        print(f"warning: skipped {len(data.unreadable)} unreadable image(s), e.g. {data.unreadable[0][0]}: "
              f"{data.unreadable[0][1]} (all listed in run.json)", file=sys.stderr)
    return data, backbone, info


def load_data_and_backbone(args, why_pretrain: str):
    """(data, backbone, info, pretrained) for commands that hand one backbone to methods: the
    --backbone-weights (or a random --backbone, with a warning saying ``why_pretrain``), BatchNorm
    re-estimated per --recalibrate-bn, and ``info["mean"]`` / ``info["std"]`` always set."""
    import torch

    from calibclust.augment import DEFAULT_MEAN, DEFAULT_STD
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel
    from calibclust.train.data import TrainingData, load_backbone_dir
    from calibclust.train.features import recalibrate_batchnorm

    torch.manual_seed(args.seed)
    backbone, info = None, {}
    if args.backbone_weights:
        backbone, info = load_backbone_dir(args.backbone_weights, arch=weights_arch(args), input_size=args.image_size)
    size = args.image_size or (backbone.spec.get("input_size") if backbone is not None else None) or 32
    data = TrainingData.from_folder(args.folder, size, progress=not args.no_progress)
    pretrained = backbone is not None
    if backbone is None:
        backbone = build_backbone(args.backbone, input_size=size)
        # Measured on digits: SPICE_s 0.29 ACC on random features vs 0.84 on a MoCo-v2 backbone.
        print(f"warning: no --backbone-weights: the backbone is randomly initialised; {why_pretrain}. Pretrain "
              "first ('calibclust pretrain FOLDER --out DIR') and pass --backbone-weights DIR.", file=sys.stderr)
    info = {**info, "mean": info.get("mean", DEFAULT_MEAN), "std": info.get("std", DEFAULT_STD)}
    if args.recalibrate_bn == "yes" or (args.recalibrate_bn == "auto" and not pretrained):
        pre = ClusteringModel(backbone, 2, head_names=("clustering",), predict_head="clustering", mean=info["mean"],
                              std=info["std"]).preprocess
        recalibrate_batchnorm(backbone, pre, data.images)
    return data, backbone, info, pretrained


def add_heldout_args(p: argparse.ArgumentParser) -> None:
    """Where an evaluation command (cdc-ablation, compare) measures its figures."""
    g = p.add_argument_group("held-out images (where the figures come from)")
    g.add_argument("--heldout", metavar="FOLDER",
                   help="labelled images of the same classes (same class sub-folder names), never trained on, that "
                        "every figure is measured on; FOLDER is then trained on whole (default: every fifth image "
                        "of each class of FOLDER is held out of training and scored)")
    g.add_argument("--no-holdout", action="store_true",
                   help="train on every image of FOLDER and score those same images (figures on training images "
                        "say little about new ones)")


# Without --heldout, `train cdc`, `train compare` and `cdc-ablation` score on every HELDOUT_EVERY-th
# image of each class (balanced per class; fit and the data zoo hold out by path hash instead).
HELDOUT_EVERY = 5


def heldout_mask(labels):
    """Within each class, every :data:`HELDOUT_EVERY`-th image in the folder's order."""
    import numpy as np

    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[idx[HELDOUT_EVERY - 1 :: HELDOUT_EVERY]] = True
    return mask


def split_heldout(args, data):
    """(training data, scored data, where the figures come from) per :func:`add_heldout_args`."""
    from calibclust.errors import InputError
    from calibclust.train.data import TrainingData

    if args.heldout and args.no_holdout:
        raise InputError("--heldout FOLDER and --no-holdout contradict each other; give one")
    if args.no_holdout:
        return data, None, f"the {data.num_images} training images"
    if data.labels is None:
        raise InputError(f"{args.folder} has no class sub-folders (FOLDER/<class>/<image>): there is nothing to score")
    if args.heldout:
        held = TrainingData.from_folder(args.heldout, data.image_size, progress=not args.no_progress)
        if held.labels is None or held.class_names != data.class_names:
            raise InputError(f"--heldout {args.heldout} must hold the class sub-folders of {args.folder} "
                             f"({', '.join(data.class_names)}); it has {', '.join(held.class_names) or 'none'}")
        return data, held, f"{held.num_images} held-out images of {args.heldout}"
    mask = heldout_mask(data.labels)
    if mask.all() or not mask.any():
        raise InputError(f"{args.folder} is too small to hold out every {HELDOUT_EVERY}th image of each class; "
                         "give --heldout FOLDER or --no-holdout")
    return (data.subset(~mask), data.subset(mask),
            f"{int(mask.sum())} held-out images (every {HELDOUT_EVERY}th of each class of {args.folder}, never trained on)")


def add_features_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", metavar="FILE",
                   help="train the heads on precomputed features instead of embedding the images: an (N, D) .npy "
                        "with FILE.files.txt (one image path per row, relative to FOLDER), e.g. 'calibclust embed' "
                        "output. The backbone that computed them is --backbone-weights (default: the one FILE.json "
                        "names); the model combines it with the heads, so it exports and labels images as usual. "
                        "Implies a frozen backbone; there are no augmented views of precomputed features")


def refuse_features_without_backbone(args) -> None:
    """Before decoding: --features needs its backbone (given, or named by embed's FILE.json)."""
    if not getattr(args, "features", None):
        return
    from calibclust.errors import InputError
    from calibclust.train.features import features_file_list

    path = Path(args.features)
    features_file_list(path)
    if getattr(args, "recalibrate_bn", "auto") == "yes":
        raise InputError("--features with --recalibrate-bn yes: re-estimated BatchNorm statistics would make the backbone "
                         "give other features than the file's, so the model would not match what it was trained on")
    if args.backbone_weights:
        return
    meta = path.with_suffix(".json")
    try:
        described = json.loads(meta.read_text()) if meta.is_file() else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"--features: {meta} is not valid JSON ({exc})") from None
    named = described.get("backbone")
    if not named:
        raise InputError("--features needs the backbone that computed them, so that the trained model can label images: "
                         f"give --backbone-weights ({meta.name} would name it when 'calibclust embed' wrote the features). "
                         "A model on features alone, without their backbone, is not supported yet")
    args.backbone_weights = named
    # The architecture and image size the features were computed with, which torchvision and timm
    # weights (and a timm file) cannot tell by themselves.
    spec = described.get("backbone_spec") or {}
    if spec.get("name") and str(named).split(":", 1)[0] in ("torchvision", "timm"):
        args.backbone = spec["name"]
    if getattr(args, "image_size", None) is None and described.get("input_size"):
        args.image_size = int(described["input_size"])
    print(f"--features: backbone {named} (from {meta})", file=sys.stderr)


def features_cache(args, data, backbone, info: dict, device: str):
    """(backbone, FeatureCache) for ``--features``: the file's rows in the order of ``data``, checked
    against the backbone on a sample of images (wrapped to L2-normalise when the features are)."""
    from calibclust.models.clustering import ClusteringModel
    from calibclust.train.features import features_digest, match_backbone, read_precomputed_features, single_view_cache

    features, _ = read_precomputed_features(args.features, data.paths)
    norm = {k: tuple(info[k]) for k in ("mean", "std") if info.get(k) is not None}
    probe = ClusteringModel(backbone, 2, head_names=("clustering",), predict_head="clustering", **norm).to(device)
    backbone = match_backbone(backbone, probe.preprocess, data.images, features, device, seed=args.seed)
    info["features"] = str(args.features)
    info["features_digest"] = features_digest(features)  # a resumed run must train on the same rows
    return backbone, single_view_cache(features)


def weights_arch(args) -> str | None:
    """The architecture --backbone-weights is loaded into: --backbone for torchvision and timm weights
    (and for a file under a timm architecture, whose keys cannot tell); else found from the weights."""
    keyword = args.backbone_weights.split(":", 1)[0]
    return args.backbone if keyword in ("torchvision", "timm") or is_timm(args.backbone) else None


CLUSTERS_CHOICE_FILE = "clusters_choice.json"  # written before training, so that --resume keeps the K


def refuse_auto_without_backbone(args) -> None:
    """Before any image is decoded: ``--clusters auto`` reads K from pretrained features."""
    if args.clusters == "auto" and not args.backbone_weights:
        from calibclust.errors import InputError

        raise InputError("--clusters auto needs --backbone-weights: K is read from a pretrained backbone's features, "
                         "and a randomly initialised network's say nothing about the classes. Pretrain first "
                         "('calibclust pretrain FOLDER --out DIR') or give --clusters C")


def choose_clusters(args, data, backbone, info: dict, device: str) -> dict | None:
    """Resolve ``--clusters auto`` in place (``args.clusters`` becomes an int) and return the choice
    (``KChoice.to_dict()``, also written to OUT/clusters_choice.json before training), or None when K
    was given. A resumed run keeps the K it started with."""
    saved_path = Path(args.out) / CLUSTERS_CHOICE_FILE
    saved = json.loads(saved_path.read_text()) if getattr(args, "resume", False) and saved_path.is_file() else None
    if args.clusters != "auto":
        # An explicit K equal to the one an auto run chose keeps that run's record.
        return saved if saved and int(saved["k"]) == args.clusters else None
    if saved:
        args.clusters = int(saved["k"])
        print(f"--clusters auto: resuming with K = {args.clusters}, chosen when the run started "
              f"({saved_path}; --k-range is not searched again)", file=sys.stderr)
        return saved
    from calibclust.cluster.choose_k import DEFAULT_MAX_POINTS
    from calibclust.device import resolve_device
    from calibclust.train.data import choose_k_on_backbone

    low, high = args.k_range
    print(f"--clusters auto: comparing K = {low}..{high} on the backbone's features of "
          f"{min(data.num_images, DEFAULT_MAX_POINTS)} of {data.num_images} images", file=sys.stderr)
    progress = None if args.no_progress else (lambda k: print(f"  K = {k} done", file=sys.stderr, flush=True))
    choice = choose_k_on_backbone(data.images, backbone, info, (low, high), seed=args.seed,
                                  device=str(resolve_device(device)), progress=progress)
    print(choice.format_table(), file=sys.stderr)
    args.clusters = choice.k
    saved_path.parent.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(choice.to_dict(), indent=2))
    return choice.to_dict()


def run_cdc(args) -> int:
    from calibclust.device import resolve_device
    from calibclust.train.cdc import train_cdc

    _set_threads(args)
    refuse_features_without_backbone(args)  # before: it may name the backbone --clusters auto needs
    refuse_auto_without_backbone(args)
    # Precomputed features: heads only, on their one view, and BatchNorm as the features were made.
    # Settings are checked before the images are decoded (K = 2 stands in for a K still to choose).
    frozen = {"freeze_backbone": True, "num_views": 1, "recalibrate_bn": "no"} if args.features else {}
    _config_from_args(args, num_clusters=2 if args.clusters == "auto" else args.clusters, **frozen)
    require_tensorboard(args.tensorboard)
    data, backbone, info = _load_inputs(args)
    cache = None
    if args.features:
        backbone, cache = features_cache(args, data, backbone, info, str(resolve_device(args.device)))
    clusters_choice = choose_clusters(args, data, backbone, info, args.device)
    config = _config_from_args(args, **frozen)
    board = open_writer(args.tensorboard)
    print(f"training CDC on {data.num_images} images ({'labelled: metrics reported' if data.labels is not None else 'no labels'}), "
          f"C={config.num_clusters}, output {args.out}", file=sys.stderr)
    try:
        result = train_cdc(config, data, args.out, backbone, info, args.backbone, resume=args.resume, device=args.device,
                           progress=not args.no_progress, clusters_choice=clusters_choice,
                           on_epoch=board.write if board else None, feature_cache=cache)
    finally:
        if board:
            board.close()
    print(f"model: {result.model_dir}  (mean confidence {result.metadata.train_stats['mean_confidence']:.3f}, "
          f"cluster sizes {result.metadata.train_stats['cluster_sizes']})")
    print(f"next: calibclust predict {args.folder} --model {result.model_dir} --out predictions.csv")
    return EXIT_OK


def run_cdc_ablation(args) -> int:
    from calibclust.train.cdc_ablation import ABLATION_VARIANTS, run_ablation

    variants = None
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(variants) - {name for name, _ in ABLATION_VARIANTS})
        if unknown:
            from calibclust.errors import InputError

            raise InputError(f"unknown variant(s): {', '.join(unknown)}")
    if args.freeze_backbone and args.finetune_backbone:
        from calibclust.errors import InputError

        raise InputError("--freeze-backbone and --finetune-backbone contradict each other (frozen is the default)")
    _set_threads(args)
    config = _config_from_args(args, freeze_backbone=True)
    data, backbone, info = _load_inputs(args)
    train, held, where = split_heldout(args, data)
    print(f"scoring on {where}", file=sys.stderr)
    result = run_ablation(train, config, args.out, backbone, info, args.backbone, device=args.device,
                          progress=not args.no_progress, variants=variants, finetune_backbone=args.finetune_backbone,
                          eval_data=held)
    print(result.table)
    print(f"\n(written to {args.out}/ablation.md and ablation.json)")
    return EXIT_OK


def run_predict(args) -> int:
    from calibclust.predict import predict_folder

    _set_threads(args)
    s = predict_folder(args.model, args.folder, args.out, head=args.head, batch_size=args.batch_size, top_k=args.top_k,
                       probs=not args.no_probs, device=args.device, progress=not args.no_progress)
    print(f"wrote {s.rows} rows to {s.out} (head {s.head}; mean confidence {s.mean_confidence:.3f}; "
          f"cluster sizes {s.cluster_sizes})")
    if s.errors:
        print(f"{s.errors} image(s) could not be read (rows with cluster -1 and the reason in 'error')", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK
