"""Our own Tab. 2 of "Towards Calibrated Deep Clustering Network" (``calibclust train cdc-ablation``):
every variant is a real code path of :class:`calibclust.train.cdc.CDCTrainer`, run on the same
cached features, prototypes and seed."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn.functional as F
from torch import nn

from calibclust.cluster.kmeans import assign, kmeans
from calibclust.errors import InputError
from calibclust.train.cdc import CDCConfig, CDCResult, CDCTrainer, prototype_init
from calibclust.train.data import TrainingData, embed_images
from calibclust.train.features import derive_seed

# (row name, config overrides, which record/head to report). Every variant is a real code path
# of :class:`calibclust.train.cdc.CDCTrainer`, run on the same cached features, prototypes and seed.
ABLATION_VARIANTS: list[tuple[str, dict]] = [
    ("cdc", {}),
    ("no-init", {"init": "random"}),
    ("fixed-0.99", {"select": "fixed:0.99"}),
    ("fixed-0.95", {"select": "fixed:0.95"}),
    ("fixed-0.90", {"select": "fixed:0.9"}),
    ("fixed-0.80", {"select": "fixed:0.8"}),
    ("single-clu", {"heads": "clu"}),
    ("single-clu+cal", {"heads": "clu+cal"}),
    ("no-stop-grad", {"stop_gradient": False}),
]


@dataclass
class AblationResult:
    rows: list[dict]
    table: str
    runs: dict[str, CDCResult]


def _row(setting: str, rec: dict | None, head: str | None, extra: dict | None = None) -> dict:
    row = {"setting": setting}
    if rec is not None and head is not None:
        h = rec["heads"][head]
        row.update(acc=h.get("acc"), nmi=h.get("nmi"), ari=h.get("ari"), ece=h.get("ece"), confidence=h["mean_confidence"])
        sel = rec.get("selected")
        if sel:
            row.update(selected_share=sel["share"], selected_accuracy=sel.get("accuracy"))
        if head == "calibration" and "clustering" in rec["heads"]:
            row["ece_clu_head"] = rec["heads"]["clustering"].get("ece")
    row.update(extra or {})
    return row


def format_ablation_table(rows: list[dict], title: str = "") -> str:
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    header = f"{'Setting':<28} {'ACC':>5} {'NMI':>5} {'ARI':>5} {'ECE':>5} | {'conf':>5} {'sel%':>5} {'selACC':>6} {'ECEclu':>6}"
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['setting']:<28} {pct(r.get('acc'))} {pct(r.get('nmi'))} {pct(r.get('ari'))} {pct(r.get('ece'))} | "
            f"{pct(r.get('confidence'))} {pct(r.get('selected_share'))} {pct(r.get('selected_accuracy')):>6} {pct(r.get('ece_clu_head')):>6}"
        )
    return "\n".join(lines)


def run_ablation(
    data: TrainingData,
    config: CDCConfig,
    out_dir: str | os.PathLike,
    backbone: nn.Module | None = None,
    backbone_info: dict | None = None,
    backbone_name: str = "small",
    device: str = "auto",
    progress: bool = True,
    variants: list[str] | None = None,
    log: Callable[[str], None] | None = None,
    finetune_backbone: bool = False,
    eval_data: TrainingData | None = None,
) -> AblationResult:
    """CDC paper Tab. 2 on ``data``: K-means on the same features, initialisation (2-I), fixed
    thresholds (2-II), CDC-Clu / CDC-Cal, single head (2-III/IV), no stop-gradient (2-V).

    Needs ground-truth labels (it is an evaluation); every figure is measured on ``eval_data``
    (labelled images never trained on) when given, else on the training images. Every variant
    starts from the same backbone, prototypes and seed and trains under ``out_dir/<variant>/``:
    heads only on shared cached features by default (fast), or backbone and heads together with
    ``finetune_backbone`` — the paper's setting, where Eq. 5 updates θ and, in 2-V, so does the
    calibration loss.
    """
    import copy

    from calibclust.metrics import adjusted_rand_index, hungarian_accuracy, normalized_mutual_info

    if data.labels is None:
        raise InputError("the ablation table needs ground-truth labels: give a folder in ImageFolder layout (root/<class>/<image>)")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_cfg = dataclasses.replace(config, freeze_backbone=True)
    base = CDCTrainer(base_cfg, data, out_dir, backbone, backbone_info, backbone_name, device, progress, log=log)
    base._prepare_backbone()
    base._prepare_cache()
    z = base.cache.plain
    km = kmeans(F.normalize(z.float(), dim=1), config.num_clusters, n_init=10, seed=derive_seed(config.seed, "kmeans-baseline") & 0x7FFFFFFF)
    truth = data.labels
    pred = km.labels.cpu().numpy()
    if eval_data is not None:  # the held-out images go to the nearest centre
        truth = eval_data.labels
        z_eval = F.normalize(embed_images(base.model, eval_data.images, config.eval_batch_size, base.device).float(), dim=1)
        pred = assign(z_eval, km.centers.to(z_eval))[0].cpu().numpy()
    rows = [{"setting": "K-means (same features)", "acc": hungarian_accuracy(truth, pred).accuracy,
             "nmi": normalized_mutual_info(truth, pred), "ari": adjusted_rand_index(truth, pred)}]
    log(f"K-means on the same features: ACC {rows[0]['acc']:.1%}")
    t0 = time.time()
    state = prototype_init(z, config.hidden_dim, config.num_clusters, config.seed, config.init_kmeans_restarts,
                           config.orth_steps, config.orth_scale, config.orth_lr)
    log(f"prototype initialisation (Eq. 6 + separation) in {time.time() - t0:.1f}s")
    prepared = {**base.backbone_info, "source": base.backbone_info.get("source", backbone_name),
                "bn_recalibrated": base._should_recalibrate()}
    chosen = [v for v in ABLATION_VARIANTS if variants is None or v[0] in variants]
    runs: dict[str, CDCResult] = {}
    for name, overrides in chosen:
        cfg = dataclasses.replace(base_cfg, recalibrate_bn="no", freeze_backbone=not finetune_backbone, **overrides)
        log(f"--- {name}: {overrides or 'CDC defaults'}")
        vdir = out_dir / name
        if (vdir / "checkpoint").exists():  # rerunning the command redoes every variant
            import shutil

            shutil.rmtree(vdir)
        trainer = CDCTrainer(cfg, data, vdir, copy.deepcopy(base.model.backbone), prepared, backbone_name, device,
                             progress, feature_cache=None if finetune_backbone else base.cache, prototype_state=state,
                             log=log, eval_data=eval_data)
        runs[name] = trainer.fit()
    first = lambda n: runs[n].history[0] if n in runs else None  # noqa: E731
    last = lambda n: runs[n].history[-1] if n in runs else None  # noqa: E731
    if "no-init" in runs:
        rows.append(_row("After random init", first("no-init"), "calibration"))
    if "cdc" in runs:
        rows.append(_row("After proposed init", first("cdc"), "calibration"))
    if "no-init" in runs:
        rows.append(_row("w/o Init + CDC", last("no-init"), "calibration"))
    for t in ("0.99", "0.95", "0.90", "0.80"):
        if f"fixed-{t}" in runs:
            rows.append(_row(f"Fixed thr. ({t})", last(f"fixed-{t}"), "calibration"))
    if "cdc" in runs:
        rows.append(_row("CDC-Clu", last("cdc"), "clustering"))
        rows.append(_row("CDC-Cal", last("cdc"), "calibration"))
    if "single-clu" in runs:
        rows.append(_row("Single head (Clu)", last("single-clu"), "clustering"))
    if "single-clu+cal" in runs:
        rows.append(_row("Single head (Clu+Cal)", last("single-clu+cal"), "clustering"))
    if "no-stop-grad" in runs:
        rows.append(_row("Cal w/o stop-gradient", last("no-stop-grad"), "calibration"))
    title = (
        f"CDC ablation (our Tab. 2) on {data.root or 'the given images'}: N={data.num_images}, C={config.num_clusters}, "
        f"backbone {prepared.get('source')} ({'fine-tuned' if finetune_backbone else 'frozen'}), epochs={config.epochs}, "
        f"B={base.batch}, K={base.k}, seed={config.seed}. Scored on "
        f"{'the training images' if eval_data is None else f'{eval_data.num_images} held-out images'}. Percent; "
        f"ECE 15 bins; sel% / selACC = last epoch's pseudo-label share / accuracy (training images); "
        f"ECEclu = the same run's clustering head."
    )
    table = format_ablation_table(rows, title)
    (out_dir / "ablation.md").write_text(table + "\n")
    (out_dir / "ablation.json").write_text(json.dumps({
        "rows": rows, "config": config.to_dict(), "backbone": prepared, "finetune_backbone": finetune_backbone,
        "scored_on": "training images" if eval_data is None else f"{eval_data.num_images} held-out images"}, indent=2))
    return AblationResult(rows, table, runs)
