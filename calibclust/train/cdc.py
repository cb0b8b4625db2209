"""Calibrated Deep Clustering (CDC; "Towards Calibrated Deep Clustering Network", §3.1–3.4, Algorithm 1, appendix B.1).

Model: backbone f + clustering head g_clu + calibration head g_cal, both MLPs D → H → BN → ReLU → C
(:class:`calibclust.models.clustering.ClusteringModel`); the calibration head makes the final
prediction (§3.4).

Per batch of B samples (Algorithm 1):

1. no grad: calibration-head probabilities of the weak view → pseudo labels S by the selection
   strategy (Eq. 4 by default; :mod:`calibclust.train.selection`);
2. no grad: embeddings z of the un-augmented batch → K-means into K mini-clusters →
   target q̂_k = mean clustering-head prediction of mini-cluster k (Eq. 1);
3. for each sub-batch of B_s: L_clu = cross-entropy of the clustering head on the strong view of
   the selected samples (Eq. 5), updating backbone + clustering head; then
   L_cal = Eq. 1 + w_en · Eq. 2 on the un-augmented view, updating only the calibration head
   (stop-gradient, §3.1 Remark).

Before training both heads get the prototype initialisation of §3.3 (Eq. 6, Prop. 1).

Ablation switches reproduce Tab. 2: ``init="random"`` (2-I "w/o Init"), ``select="fixed:0.95"``
(2-II), ``heads="clu"`` / ``heads="clu+cal"`` (2-III / 2-IV single head), ``stop_gradient=False``
(2-V). ``freeze_backbone=True`` trains the heads on cached view features
(:mod:`calibclust.train.features`).

Labels never drive a decision: the saved model is the last epoch's; ground truth, when the folder
has it, is only evaluated and logged.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclust import __version__
from calibclust.cluster.kmeans import kmeans
from calibclust.device import resolve_device
from calibclust.errors import InputError
from calibclust.metadata import ModelMetadata
from calibclust.models.backbones import backbone_label, build_backbone
from calibclust.models.clustering import ClusteringModel, save_model
from calibclust.shortcut import shortcut_check
from calibclust.train.methods import ClusteringMethod
from calibclust.train.features import (
    FeatureCache,
    cache_key,
    compute_feature_cache,
    derive_seed,
    images_digest,
    load_feature_cache,
    module_digest,
    recalibrate_batchnorm,
    save_feature_cache,
)
from calibclust.train.data import TrainingData, embed_images, head_probabilities, head_report
from calibclust.train.selection import SelectionInputs, build_strategy
from calibclust.train.state import (
    has_state,
    optimizer_tensors,
    read_state,
    restore_optimizer,
    write_state,
)
from calibclust.augment.views import strong_view, weak_view
# Torch-free, so that `calibclust train cdc` builds its options from the fields without torch.
from calibclust.train.cdc_config import CDCConfig

STATE_FORMAT = "calibclust-cdc-state/1"


def build_cdc_model(config: CDCConfig, backbone: nn.Module, mean=None, std=None) -> ClusteringModel:
    heads = ("clustering", "calibration") if config.heads == "dual" else ("clustering",)
    kwargs = {}
    if mean is not None and std is not None:
        kwargs = {"mean": tuple(mean), "std": tuple(std)}
    return ClusteringModel(
        backbone,
        num_clusters=config.num_clusters,
        hidden_dim=config.hidden_dim,
        head_names=heads,
        predict_head=heads[-1],
        **kwargs,
    )


# --- equations ------------------------------------------------------------------------------------
def minicluster_targets(probs: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 1 targets: row i gets q̂_k = mean of ``probs`` over its mini-cluster Q_k.

    ``probs`` (B, C) clustering-head probabilities, ``assignment`` (B,) mini-cluster ids in [0, k).
    Differentiable in ``probs`` (used by the no-stop-gradient ablation).
    """
    sums = torch.zeros(k, probs.shape[1], dtype=probs.dtype, device=probs.device).index_add(0, assignment, probs)
    counts = torch.bincount(assignment, minlength=k).to(probs.dtype).clamp_min(1)
    return (sums / counts[:, None])[assignment]


def minicluster_features(z: torch.Tensor, norm: str) -> torch.Tensor:
    """The features Eq. 1's mini-cluster K-means runs on: L2- or (authors' code) L1-normalised rows."""
    return F.normalize(z.float(), p=1 if norm == "l1" else 2, dim=1)


def calibration_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_cal, L_en) of the calibration head on one (sub-)batch.

    L_cal (Eq. 1) = −(1/B) Σ_i q̂_{k(i)} · log p_i^cal.
    L_en (Eq. 2) = Σ_j p̄_j log p̄_j with p̄ = batch mean of p^cal (negative entropy of the mean
    prediction). Eq. 2 prints a 1/C factor; the authors' code (which produced the paper's tables)
    omits it, and so do we — ``w_en = 1/C`` recovers the printed form.
    """
    logp = F.log_softmax(logits, dim=1)
    l_cal = -(targets * logp).sum(1).mean()
    mean_p = logp.exp().mean(0)
    l_en = (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return l_cal, l_en


def clustering_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 5: cross-entropy of the clustering head's strong-view logits on the selected samples."""
    return F.cross_entropy(logits, labels)


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    # z-score each row, then L2-normalise it (authors' initialize_weights, before each K-means).
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-8)
    return F.normalize(x, dim=1)


def separate_prototypes(
    w: torch.Tensor, steps: int = 2000, scale: float = 5.0, lr: float = 0.1, relu_anchors: bool = False
) -> torch.Tensor:
    """The "orthogonalisation" of §3.3, as the authors' code does it (``orth_train``).

    Not a QR step: prototypes W (k, d) and a copy A (the anchors) are optimised jointly so that
    anchor i is closer, in cosine, to prototype i than to any other — cross-entropy on
    ``scale · cos(A_i, W_j)`` with identity targets, SGD (momentum 0.9, weight decay 1e-4, cosine
    lr schedule). This pushes the prototypes apart while each stays near its K-means centre; a QR
    step would instead rotate them away from the data (and cannot make H = 512 rows orthogonal when
    D < 512). ``relu_anchors`` passes the anchors through ReLU, as the authors do; we use it only
    where the layer's inputs are themselves post-ReLU (the second layer), see :func:`prototype_init`.
    """
    if steps <= 0:
        return w.clone()
    with torch.enable_grad():
        anchors = w.detach().clone().requires_grad_(True)
        protos = w.detach().clone().requires_grad_(True)
        target = torch.arange(w.shape[0], device=w.device)
        opt = torch.optim.SGD([anchors, protos], lr=lr, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
        for _ in range(steps):
            a = F.relu(anchors) if relu_anchors else anchors
            logits = scale * F.normalize(a, dim=1) @ F.normalize(protos, dim=1).T
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return protos.detach()


@torch.no_grad()
def prototype_init(
    z: torch.Tensor,
    hidden_dim: int,
    num_clusters: int,
    seed: int = 0,
    restarts: int = 3,
    orth_steps: int = 2000,
    orth_scale: float = 5.0,
    orth_lr: float = 0.1,
    bn_eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """Prototype initialisation of one head (§3.3, Eq. 6, Prop. 1) → an :class:`MLPHead` state dict.

    W1 = K-means_H(z) centres (bias 0); h = ReLU(BN(W1 z)); W2 = K-means_C(h) centres (bias 0);
    then both layers' prototypes are pushed apart (:func:`separate_prototypes`). As in the authors'
    code each K-means runs on z-scored, L2-normalised rows, while the layers are applied to raw
    features (BN absorbs the scale). Two deliberate differences from that code: h is computed with
    the *separated* W1 (the authors cluster h of the un-separated W1 and then install the separated
    one, so W2 was fitted to activations the network never produces), and BN's running statistics
    are set to the dataset statistics of W1 z so that eval-mode outputs equal what K-means_C saw.
    """
    z = z.float()
    n = z.shape[0]
    if n < hidden_dim:
        raise InputError(
            f"prototype initialisation needs at least H = {hidden_dim} images for K-means_H (Eq. 6), "
            f"got {n}; lower --hidden-dim or use --init random"
        )
    km1 = kmeans(_rownorm(z), hidden_dim, n_init=restarts, seed=derive_seed(seed, "init-W1") & 0x7FFFFFFF)
    w1 = separate_prototypes(km1.centers, orth_steps, orth_scale, orth_lr, relu_anchors=False)
    a = z @ w1.T  # (N, H), bias 0
    mean, var = a.mean(0), a.var(0, unbiased=False)
    h = F.relu((a - mean) / torch.sqrt(var + bn_eps))
    km2 = kmeans(_rownorm(h), num_clusters, n_init=restarts, seed=derive_seed(seed, "init-W2") & 0x7FFFFFFF)
    w2 = separate_prototypes(km2.centers, orth_steps, orth_scale, orth_lr, relu_anchors=True)
    return {
        "fc1.weight": w1.clone(),
        "fc1.bias": torch.zeros(hidden_dim),
        "bn.weight": torch.ones(hidden_dim),
        "bn.bias": torch.zeros(hidden_dim),
        "bn.running_mean": mean.clone(),
        "bn.running_var": a.var(0, unbiased=True).clone(),
        "bn.num_batches_tracked": torch.tensor(0, dtype=torch.long),
        "fc2.weight": w2.clone(),
        "fc2.bias": torch.zeros(num_clusters),
    }




# --- optimizer state <-> safetensors ---------------------------------------------------------------
# --- the trainer ----------------------------------------------------------------------------------
@dataclass
class CDCResult:
    model: ClusteringModel
    metadata: ModelMetadata
    model_dir: Path | None
    history: list[dict]
    config: CDCConfig


class CDCTrainer:
    """Runs Algorithm 1 on one :class:`TrainingData`; see the module docstring.

    ``out_dir`` receives ``run.json`` (resolved config, versions, data), ``log.jsonl`` (one record
    per epoch; epoch 0 = after initialisation), ``checkpoint/`` (resume state, every epoch),
    ``features.safetensors`` (frozen mode) and ``model/`` (the final model, :func:`save_model`).
    """

    def __init__(
        self,
        config: CDCConfig,
        data: TrainingData,
        out_dir: str | os.PathLike | None,
        backbone: nn.Module | None = None,
        backbone_info: dict | None = None,
        backbone_name: str = "small",
        device: str = "auto",
        progress: bool = True,
        feature_cache: FeatureCache | None = None,
        prototype_state: dict[str, torch.Tensor] | None = None,
        log: Callable[[str], None] | None = None,
        clusters_choice: dict | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        eval_data: TrainingData | None = None,
    ):
        self.config = config
        # Labelled images never trained on: each epoch's ACC/ECE are measured on them (the
        # ablation's and compare's held-out split); None: on the training images.
        self.eval_data = eval_data
        self._eval_features: torch.Tensor | None = None
        self.on_epoch = on_epoch  # called with every log.jsonl record (--tensorboard)
        self.clusters_choice = clusters_choice  # --clusters auto: KChoice.to_dict(), saved in run.json and metadata
        self.data = data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = str(resolve_device(device))
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.backbone_info = dict(backbone_info or {})
        self._pretrained = backbone is not None and bool(self.backbone_info.get("source"))
        # Random initial weights come from the run's seed without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "model") & 0x7FFFFFFF)
            if backbone is None:
                backbone = build_backbone(backbone_name, input_size=data.image_size[0])
                self.backbone_info.setdefault("source", f"random init ({backbone_name})")
            self.model = build_cdc_model(config, backbone, self.backbone_info.get("mean"), self.backbone_info.get("std"))
        self.model.to(self.device)
        self.dual = config.heads == "dual"
        self.select_head = "calibration" if self.dual else "clustering"
        self.cal_head = {"dual": "calibration", "clu+cal": "clustering", "clu": None}[config.heads]
        self.batch = config.effective_batch_size(data.num_images)
        self.k = config.resolved_mini_clusters(self.batch)
        self.top = config.resolved_top_size(self.batch)
        self.strategy = build_strategy(config.select, top_size=self.top)
        self.cache = feature_cache
        self._prototype_state = prototype_state
        self.labels = data.labels
        self.history: list[dict] = []
        self._build_optimizers()

    # .. setup ....................................................................................
    def _build_optimizers(self) -> None:
        cfg, m = self.config, self.model
        for p in m.backbone.parameters():
            p.requires_grad_(not cfg.freeze_backbone)
        groups = [{"params": list(m.heads["clustering"].parameters()), "lr": cfg.lr_heads}]
        if not cfg.freeze_backbone:
            groups.insert(0, {"params": list(m.backbone.parameters()), "lr": cfg.resolved_lr_backbone()})
        # Two optimizers, as Algorithm 1 updates (θ, θ_clu) by Eq. 5 and θ_cal by Eq. 3 separately.
        self.opt_clu = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        self.opt_cal = (
            torch.optim.Adam(m.heads["calibration"].parameters(), lr=cfg.lr_heads, weight_decay=cfg.weight_decay)
            if self.dual
            else None
        )

    def _should_recalibrate(self) -> bool:
        mode = self.config.recalibrate_bn
        return mode == "yes" or (mode == "auto" and not self._pretrained)

    def _prepare_backbone(self) -> None:
        if self._should_recalibrate():
            n = recalibrate_batchnorm(self.model.backbone, self.model.preprocess, self.data.images, self.config.eval_batch_size, self.device)
            if n:
                self.log(f"re-estimated BatchNorm statistics of {n} backbone layers on the unlabeled images")

    def _prepare_cache(self) -> None:
        if not self.config.freeze_backbone or self.cache is not None:
            if self.cache is not None:
                self.cache = self.cache.to(self.device)
            return
        cfg = self.config
        key = cache_key(module_digest(self.model.backbone), images_digest(self.data.images), cfg.num_views, cfg.seed, cfg.views, "float32")
        path = self.out_dir / "features.safetensors" if self.out_dir else None
        cache = load_feature_cache(path, key) if path else None
        if cache is None:
            self.model.backbone.eval()
            cache = compute_feature_cache(
                self.model.embed, self.model.preprocess, self.data.images, cfg.num_views, cfg.seed, cfg.views,
                cfg.eval_batch_size, self.device, progress=self.progress,
            )
            if path:
                save_feature_cache(cache, path, key)
        else:
            self.log(f"reusing cached view features {path}")
        self.cache = cache.to(self.device)

    def plain_features(self) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.plain
        return embed_images(self.model, self.data.images, self.config.eval_batch_size, self.device)

    def initialise_heads(self) -> dict:
        cfg = self.config
        if cfg.init == "random":
            return {"init": "random"}
        t0 = time.time()
        state = self._prototype_state
        if state is None:
            state = prototype_init(
                self.plain_features(), cfg.hidden_dim, cfg.num_clusters, cfg.seed,
                cfg.init_kmeans_restarts, cfg.orth_steps, cfg.orth_scale, cfg.orth_lr,
            )
            self._prototype_state = state
        for name in self.model.head_names:  # both heads start from the same prototypes (§3.3)
            self.model.heads[name].load_state_dict({k: v.to(self.device) for k, v in state.items()})
        return {"init": "prototype", "init_seconds": round(time.time() - t0, 2)}

    # .. one batch (Algorithm 1, inner loop) ......................................................
    def _features(self, kind: str, idx: torch.Tensor, g: torch.Generator, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.cache is not None:
            if kind == "plain":
                return self.cache.plain[idx.to(self.cache.plain.device)]
            return self.cache.sample(kind, idx, g)
        return self.model.embed(self.model.preprocess(x))

    def _train_batch(self, idx: torch.Tensor, g: torch.Generator, batch_seed: int, stats: dict) -> None:
        cfg, m = self.config, self.model
        m.train()
        if cfg.freeze_backbone:
            m.backbone.eval()
        frozen = self.cache is not None
        x = x_weak = x_strong = None
        if not frozen:
            x = torch.from_numpy(self.data.images[idx.numpy()]).to(self.device)
            x_weak = weak_view(x, g, cfg.views)
            x_strong = strong_view(x, g, cfg.views)

        with torch.no_grad():
            # Step 1: selection from the selecting head's weak-view probabilities (Eq. 4).
            z_weak = self._features("weak", idx, g, x_weak)
            p_sel = F.softmax(m.head_logits(z_weak, self.select_head), 1)
            # Step 2: mini-clusters of the un-augmented embeddings and their targets (Eq. 1).
            z = self._features("plain", idx, g, x)
            p_clu = F.softmax(m.head_logits(z, "clustering"), 1)
        selection = self.strategy.select(SelectionInputs(p_sel, embeddings=z, indices=idx))
        pseudo = selection.dense_labels()  # (B,) label or -1
        mini = kmeans(minicluster_features(z, cfg.minicluster_norm), self.k, n_init=cfg.minicluster_restarts,
                      max_iter=cfg.minicluster_iters, seed=batch_seed)
        assignment = mini.labels
        targets = minicluster_targets(p_clu, assignment, self.k)

        counts = selection.counts().cpu()
        stats["selected"] += counts
        stats["seen"] += len(idx)
        stats["selected_idx"].append(idx[selection.indices.cpu()].cpu())
        stats["selected_labels"].append(selection.labels.cpu())
        stats["sel_conf"] += float(p_sel.max(1).values.sum())

        n_sub = max(1, self.batch // cfg.sub_batch_size)
        for sub in torch.tensor_split(torch.arange(len(idx)), n_sub):
            sub_d = sub.to(self.device)
            # Step 3a: L_clu on the strong view of the selected samples (Eq. 5).
            keep = pseudo[sub_d] >= 0
            if bool(keep.any()):
                z_s = self._features("strong", idx[sub], g, None if frozen else x_strong[sub_d])
                logits = m.head_logits(z_s, "clustering")  # whole sub-batch, so BN sees it all
                loss_clu = clustering_loss(logits[keep], pseudo[sub_d][keep])
                self.opt_clu.zero_grad(set_to_none=True)
                loss_clu.backward()
                self.opt_clu.step()
                stats["loss_clu"] += float(loss_clu.detach())
                stats["n_clu"] += 1
            else:
                # An empty selection (e.g. a fixed 0.99 threshold early on) is a skipped step, not
                # a NaN loss: cross-entropy over zero samples is undefined.
                stats["empty_sub_batches"] += 1
            if self.cal_head is None:
                continue
            # Step 3b: L_cal + w_en L_en on the un-augmented view (Eq. 1–3).
            if cfg.stop_gradient:
                with torch.no_grad():
                    z_p = self._features("plain", idx[sub], g, None if frozen else x[sub_d])
                tgt = targets[sub_d]
            else:
                # Tab. 2-V: the calibration loss reaches everything it depends on — the backbone
                # through f(x) and the clustering head through the targets q̂ (Eq. 1).
                z_p = self._features("plain", idx[sub], g, None if frozen else x[sub_d])
                p_clu_live = F.softmax(m.head_logits(z.detach(), "clustering"), 1)
                tgt = minicluster_targets(p_clu_live, assignment, self.k)[sub_d]
            logits = m.head_logits(z_p, self.cal_head)
            l_cal, l_en = calibration_losses(logits, tgt)
            loss = l_cal + cfg.w_en * l_en
            self.opt_clu.zero_grad(set_to_none=True)
            if self.opt_cal is not None:
                self.opt_cal.zero_grad(set_to_none=True)
            loss.backward()
            if self.opt_cal is not None:
                self.opt_cal.step()
            if self.opt_cal is None or not cfg.stop_gradient:
                # single head: its parameters live in opt_clu; no stop-gradient: so do the
                # backbone's and the clustering head's, which now have gradients from L_cal.
                self.opt_clu.step()
            stats["loss_cal"] += float(l_cal.detach())
            stats["loss_en"] += float(l_en.detach())
            stats["n_cal"] += 1

    # .. evaluation and logging ...................................................................
    def scored_features(self) -> torch.Tensor:
        """Features of the images the figures are measured on (``eval_data``, else the training
        images); with a frozen backbone the held-out ones are embedded once."""
        if self.eval_data is None:
            return self.plain_features()
        if self._eval_features is not None:
            return self._eval_features
        z = embed_images(self.model, self.eval_data.images, self.config.eval_batch_size, self.device)
        if self.config.freeze_backbone:
            self._eval_features = z
        return z

    def evaluate(self, epoch: int, stats: dict | None = None, seconds: float = 0.0) -> dict:
        z = self.scored_features()
        labels = self.labels if self.eval_data is None else self.eval_data.labels
        record: dict[str, Any] = {"epoch": epoch, "seconds": round(seconds, 3),
                                  "scored_on": "training images" if self.eval_data is None else "held-out images"}
        heads = {}
        for name in self.model.head_names:
            heads[name] = head_report(head_probabilities(self.model, z, name), labels)
        record["heads"] = heads
        if stats is not None:
            seen = max(1, stats["seen"])
            sel = stats["selected"]
            record["loss_clu"] = stats["loss_clu"] / max(1, stats["n_clu"]) if stats["n_clu"] else None
            record["loss_cal"] = stats["loss_cal"] / stats["n_cal"] if stats["n_cal"] else None
            record["loss_en"] = stats["loss_en"] / stats["n_cal"] if stats["n_cal"] else None
            record["selected"] = {
                "total": int(sel.sum()),
                "share": float(sel.sum()) / seen,
                "per_cluster": sel.tolist(),
                "share_per_cluster": [float(v) / seen for v in sel.tolist()],
                "empty_sub_batches": stats["empty_sub_batches"],
                "mean_selecting_confidence": stats["sel_conf"] / seen,
            }
            if self.labels is not None and sel.sum() > 0:
                # Pseudo-label accuracy on the training images (reported only): through the
                # selecting head's Hungarian map at the end of the epoch, or, when the figures are
                # measured on held-out images, the pseudo-labels' own Hungarian map.
                sidx = torch.cat(stats["selected_idx"]).numpy()
                slab = torch.cat(stats["selected_labels"]).numpy()
                if self.eval_data is None:
                    mapping = {int(k): v for k, v in heads[self.select_head]["mapping"].items()}
                    mapped = np.array([mapping.get(int(c), -1) for c in slab])
                    record["selected"]["accuracy"] = float((mapped == self.labels[sidx]).mean())
                else:
                    from calibclust.metrics import hungarian_accuracy

                    record["selected"]["accuracy"] = hungarian_accuracy(self.labels[sidx], slab).accuracy
        return record

    def _summary_line(self, r: dict) -> str:
        parts = [f"epoch {r['epoch']}/{self.config.epochs}"]
        if r.get("loss_clu") is not None:
            parts.append(f"L_clu {r['loss_clu']:.3f}")
        if r.get("loss_cal") is not None:
            parts.append(f"L_cal {r['loss_cal']:.3f} L_en {r['loss_en']:.3f}")
        if "selected" in r:
            s = r["selected"]
            parts.append(f"selected {s['share']:.0%}" + (f" (acc {s['accuracy']:.1%})" if "accuracy" in s else ""))
        for name, h in r["heads"].items():
            short = "clu" if name == "clustering" else "cal"
            text = f"{short}: conf {h['mean_confidence']:.3f}"
            if "acc" in h:
                text += f" ACC {h['acc']:.1%} NMI {h['nmi']:.3f} ARI {h['ari']:.3f} ECE {h['ece']:.1%}"
            parts.append(text)
        return " | ".join(parts)

    # .. checkpoints (calibclust.train.state) ......................................................
    def save_state(self, epoch: int) -> None:
        if self.out_dir is None:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        meta: dict[str, Any] = {"format": STATE_FORMAT, "epoch": epoch, "config": self.config.to_dict(), "optimizers": {}}
        for name, opt in (("clu", self.opt_clu), ("cal", self.opt_cal)):
            if opt is not None:
                t, m = optimizer_tensors(name, opt)
                tensors.update(t)
                meta["optimizers"][name] = m
        meta["images"] = images_digest(self.data.images)
        meta["features"] = self.backbone_info.get("features_digest")  # --features: the rows trained on
        write_state(self.out_dir, tensors, meta)

    def load_state(self) -> int | None:
        """Restore the last checkpoint; returns its epoch, or None if there is none."""
        state = read_state(self.out_dir, STATE_FORMAT)
        if state is None:
            return None
        tensors, meta = state
        self.config.check_resume(meta["config"], f"the checkpoint in {self.out_dir}")
        if meta.get("images") != images_digest(self.data.images):
            raise InputError(f"--resume on different images than the checkpoint in {self.out_dir}")
        if meta.get("features") != self.backbone_info.get("features_digest"):
            raise InputError(f"--resume with other --features than the checkpoint in {self.out_dir} was trained on")
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state)
        self.model.to(self.device)
        for name, opt in (("clu", self.opt_clu), ("cal", self.opt_cal)):
            if opt is not None:
                restore_optimizer(name, opt, {k: v.to(self.device) for k, v in tensors.items()}, meta["optimizers"][name])
        return int(meta["epoch"])

    def _write_run_json(self, resumed_from: int | None) -> None:
        if self.out_dir is None:
            return
        info = {
            "method": "cdc",
            "config": self.config.to_dict(),
            "resolved": {"batch_size": self.batch, "mini_clusters": self.k, "top_size": self.top,
                         "selection": self.strategy.describe(), "device": self.device},
            "backbone": self.backbone_info,
            "data": {"root": self.data.root, "n_images": self.data.num_images, "image_size": list(self.data.image_size),
                     "has_labels": self.labels is not None, "n_unreadable": len(self.data.unreadable),
                     "unreadable": [{"path": p, "reason": r} for p, r in self.data.unreadable[:100]]},
            "versions": {"calibclust": __version__, "torch": torch.__version__, "python": platform.python_version(),
                         "numpy": np.__version__},
            "seed": self.config.seed,
            "clusters_choice": self.clusters_choice,
            "resumed_from_epoch": resumed_from,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (self.out_dir / "run.json").write_text(json.dumps(info, indent=2))

    def _append_log(self, record: dict) -> None:
        self.history.append(record)
        if self.out_dir is not None:
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _trim_log(self, last_epoch: int) -> None:
        path = self.out_dir / "log.jsonl"
        if not path.is_file():
            return
        kept = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        kept = [r for r in kept if r.get("epoch", 0) <= last_epoch]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept

    # .. main loop ................................................................................
    def fit(self, resume: bool = False) -> CDCResult:
        from tqdm.auto import tqdm

        cfg = self.config
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            existing = has_state(self.out_dir)
            if existing and not resume:
                raise InputError(f"{self.out_dir} already holds a training checkpoint; pass --resume to continue it or choose a new --out")
        start_epoch = self.load_state() if resume and self.out_dir is not None else None
        if start_epoch is None:
            if resume:
                self.log(f"no checkpoint in {self.out_dir}; starting from scratch")
            if self.out_dir is not None:
                (self.out_dir / "log.jsonl").unlink(missing_ok=True)
            self._prepare_backbone()
        else:
            self.log(f"resuming after epoch {start_epoch}")
            self._trim_log(start_epoch)
        self._prepare_cache()
        self._write_run_json(start_epoch)
        if start_epoch is None:
            info = self.initialise_heads()
            record = self.evaluate(0)
            record.update(info)
            self._append_log(record)
            self.log(self._summary_line(record) + f" | init {info['init']}")
            self.save_state(0)
            start_epoch = 0
        n = self.data.num_images
        n_batches = max(1, n // self.batch)  # Algorithm 1: ⌊N/B⌋ batches per epoch
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            t0 = time.time()
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "epoch", epoch))
            perm = torch.randperm(n, generator=g)
            stats = {"selected": torch.zeros(cfg.num_clusters, dtype=torch.long), "seen": 0, "loss_clu": 0.0, "n_clu": 0,
                     "loss_cal": 0.0, "loss_en": 0.0, "n_cal": 0, "empty_sub_batches": 0, "selected_idx": [],
                     "selected_labels": [], "sel_conf": 0.0}
            bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not self.progress, leave=False)
            for b in bar:
                idx = perm[b * self.batch : (b + 1) * self.batch]
                self._train_batch(idx, g, derive_seed(cfg.seed, "minicluster", epoch, b) & 0x7FFFFFFF, stats)
                if stats["n_clu"] or stats["n_cal"]:
                    bar.set_postfix(L_clu=f"{stats['loss_clu'] / max(1, stats['n_clu']):.3f}",
                                    L_cal=f"{stats['loss_cal'] / max(1, stats['n_cal']):.3f}",
                                    sel=f"{int(stats['selected'].sum()) / max(1, stats['seen']):.0%}")
            bar.close()
            record = self.evaluate(epoch, stats, time.time() - t0)
            self._append_log(record)
            self.save_state(epoch)
            self.log(self._summary_line(record))
        return self.finish()

    def finish(self) -> CDCResult:
        """Label-free model choice: the last epoch's model, saved with its metadata."""
        z = self.plain_features()
        probs = head_probabilities(self.model, z, self.model.predict_head)
        conf = probs.max(1).values
        stats = {
            "n_images": self.data.num_images,
            "mean_confidence": float(conf.mean()),
            "cluster_sizes": torch.bincount(probs.argmax(1), minlength=self.config.num_clusters).tolist(),
            "epochs": self.config.epochs,
            "selection": self.strategy.describe(),
            "heads": self.config.heads,
            "stop_gradient": self.config.stop_gradient,
            "init": self.config.init,
            "frozen_backbone": self.config.freeze_backbone,
            "checkpoint_choice": "last epoch (label-free)",
            "config": self.config.to_dict(),  # ClusteringMethod.load rebuilds the method with it
        }
        if self.clusters_choice:
            stats["clusters_choice"] = self.clusters_choice
        if self.dual:
            stats["mean_confidence_clustering_head"] = float(head_probabilities(self.model, z, "clustering").max(1).values.mean())
        try:
            shortcut = shortcut_check(self.data.images, probs.argmax(1).cpu().numpy(), seed=self.config.seed)
        except Exception as exc:  # advisory: never lose a trained model to it
            stats["shortcut_check"] = {"error": f"{type(exc).__name__}: {exc}"}
            self.log(f"warning: the shortcut check failed ({type(exc).__name__}: {exc}); the model is saved without it")
        else:
            stats["shortcut_check"] = shortcut.to_dict()
            if shortcut.fired:
                self.log(f"warning: {shortcut.message}")
        metadata = ModelMetadata(
            num_clusters=self.config.num_clusters,
            input_size=self.data.image_size,
            mean=tuple(self.model.mean.flatten().tolist()),
            std=tuple(self.model.std.flatten().tolist()),
            method="cdc",
            resize=self.data.resize,
            probs_head=self.model.predict_head,
            calibrated=self.dual,
            backbone=backbone_label(self.model.backbone),
            embedding_dim=self.model.feature_dim,
            confidence_threshold=0.5,
            train_stats=stats,
        )
        model_dir = None
        if self.out_dir is not None:
            model_dir = save_model(self.model.cpu(), self.out_dir / "model", metadata)
            self.model.to(self.device)
            try:
                write_training_report(self.history, self.out_dir / "training.html", self.config, self.data.root)
            except Exception as exc:  # advisory, like the shortcut check: never lose a trained model to it
                self.log(f"warning: training.html not written ({type(exc).__name__}: {exc})")
        self.model.eval()
        return CDCResult(self.model, metadata, model_dir, self.history, self.config)


def write_training_report(history: list[dict], path: Path, config: CDCConfig, folder: str | None) -> None:
    """``training.html``: the per-epoch curves of ``log.jsonl`` (losses of Eq. 3 and Eq. 5, Eq. 4's
    selected share, both heads' mean confidence; ACC and ECE when the folder has labels)."""
    from calibclust.report import HTMLReport, plot_training_curves

    def head(name, key):
        return lambda r: (r.get("heads", {}).get(name) or {}).get(key)

    labelled = any((r.get("heads", {}).get("calibration") or r.get("heads", {}).get("clustering") or {}).get("acc")
                   is not None for r in history)
    report = HTMLReport(f"CDC training: {folder or ''}",
                        f"{history[-1]['epoch'] if history else 0} epochs · C = {config.num_clusters} · "
                        "log.jsonl holds every value plotted")
    report.add_figure(plot_training_curves(history, "Losses per epoch", [
        ("L_clu (Eq. 5)", lambda r: r.get("loss_clu")), ("L_cal (Eq. 3, calibration)", lambda r: r.get("loss_cal")),
        ("L_en (Eq. 3, entropy)", lambda r: r.get("loss_en"))], "loss"), alt="losses")
    report.add_figure(plot_training_curves(history, "Pseudo-labels selected (Eq. 4) and mean confidence", [
        ("selected share", lambda r: (r.get("selected") or {}).get("share")),
        ("mean confidence, calibration head", head("calibration", "mean_confidence")),
        ("mean confidence, clustering head", head("clustering", "mean_confidence"))], "share", ylim=(0, 1.02)),
        alt="selection and confidence")
    if labelled:
        report.add_figure(plot_training_curves(history, "On the training images' labels (diagnosis only)", [
            ("ACC, calibration head", head("calibration", "acc")), ("ECE, calibration head", head("calibration", "ece")),
            ("ACC, clustering head", head("clustering", "acc")), ("ECE, clustering head", head("clustering", "ece"))],
            "ACC / ECE", ylim=(0, 1.02)), alt="accuracy and calibration")
    report.write(path)


def train_cdc(
    config: CDCConfig,
    data: TrainingData,
    out_dir: str | os.PathLike | None,
    backbone: nn.Module | None = None,
    backbone_info: dict | None = None,
    backbone_name: str = "small",
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    **kwargs,
) -> CDCResult:
    """Train CDC on ``data`` and save the final model under ``out_dir/model`` (see :class:`CDCTrainer`)."""
    trainer = CDCTrainer(config, data, out_dir, backbone, backbone_info, backbone_name, device, progress, **kwargs)
    return trainer.fit(resume=resume)


class CDCMethod(ClusteringMethod):
    """CDC on the method interface (:mod:`calibclust.train.methods`): the trainer above with
    ``self.config``; predicts with the calibration head (§3.4) and reports both heads."""

    name = "cdc"
    config_class = CDCConfig

    def row_names(self) -> list[str]:
        heads = self.model.head_names if self.model is not None else (
            ("clustering", "calibration") if self.config.heads == "dual" else ("clustering",))
        return ["CDC-Clu", "CDC-Cal"] if "calibration" in heads else ["CDC"]

    def _fit(self, data, backbone, backbone_info, out_dir, eval_data, resume) -> None:
        result = train_cdc(self.config, data, out_dir, backbone, backbone_info, resume=resume, device=self.device,
                           progress=self.progress, eval_data=eval_data)
        self.model, self.metadata, self.history = result.model, result.metadata, result.history

    def predictions(self, images) -> dict:
        rows = self.row_names()
        if len(rows) == 1:
            return super().predictions(images)
        probs = self.head_probabilities(images, ("clustering", "calibration"))
        return {"CDC-Clu": probs["clustering"], "CDC-Cal": probs["calibration"]}
