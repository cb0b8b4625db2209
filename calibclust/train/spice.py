"""SPICE ("SPICE: Semantic Pseudo-Labeling for Image Clustering").

Stage 1 (representation learning) is the backbone the user brings (pretraining issue). Here:

* **Stage 2, SPICE_s** (§III-B, Algorithm 1): frozen backbone, ``n_heads`` MLP clustering heads
  trained at once on cached features. Per batch of M images: E-step = SPICE prototype
  pseudo-labelling on the un-augmented images (Alg. 1 line 6; Eq. 2–4, :class:`~calibclust.train.selection_spice.PrototypeSelection`
  through the selection seam); M-step = cross-entropy of the strong view with SPICE's double
  softmax (Eq. 5). The head kept is the one with the **lowest loss over the whole dataset** (M = N,
  §III-B Remark), each head taken at the epoch of its lowest loss, as the authors' code does — never
  chosen by ground-truth labels.
* **Stage 3, SPICE** (§III-C): reliable pseudo-labels by neighbourhood consistency (Eq. 6–7,
  :class:`~calibclust.train.selection_spice.ReliableSelection`), then FixMatch-style joint training
  of backbone + head (Eq. 8–9); the model kept is the moving average of its weights
  (``joint_ema``), as the authors' FixMatch code evaluates.

The result is a :class:`~calibclust.models.clustering.ClusteringModel` with one head
``clustering`` (``predict_head="clustering"``), saved with :func:`save_model` and metadata
``method="spice", probs_head="spice", calibrated=False``, so export/serve treat it like a CDC model.

Resume (``out_dir`` + ``resume``): the state in ``OUT/checkpoint/`` (:mod:`calibclust.train.state`)
is written when stage 2 ends (all heads, their losses, the chosen one) and every
``checkpoint_every`` joint steps (model, its moving average, SGD state, schedule, the step generator). Everything else
(features, SPICE_s probabilities, the reliable set) is recomputed deterministically from those, so
a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclust.errors import InputError
from calibclust.models.backbones import backbone_label
from calibclust.models.clustering import ClusteringModel, MLPHead
from calibclust.train import selection_spice  # noqa: F401  (registers the SPICE strategies)
from calibclust.train.methods import ClusteringMethod
from calibclust.train.selection import SelectionInputs, build_strategy
from calibclust.train.selection_spice import PrototypeSelection, ReliableSelection
from calibclust.train.state import (
    has_state,
    optimizer_tensors,
    read_state,
    restore_optimizer,
    write_state,
)

# /2: stage 2 scores un-augmented images, keeps each head's best epoch and runs the authors' M-step
# passes; /3: heads with or without BatchNorm, stage 3's weight average saved. Older checkpoints' heads
# were trained otherwise, so they are refused rather than resumed.
STATE_FORMAT = "calibclust-spice-state/3"
from calibclust.augment.views import ViewConfig, strong_view, weak_view
# Torch-free, so that `calibclust train spice` builds its options from the fields without torch.
from calibclust.train.spice_config import SpiceConfig


# --- Eq. 5 ------------------------------------------------------------------------------------------
def double_softmax_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SPICE's clustering loss (Eq. 5): the head's output p = softmax(logits) goes through a second
    softmax before cross-entropy, CE(y, softmax(p)); this slows learning on low-probability
    predictions (paper Appendix A). Mean over rows; 0 rows → 0."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(torch.softmax(logits, dim=1), labels)


# --- stage 2 ----------------------------------------------------------------------------------------
def _prototype_strategy(config: SpiceConfig, per_cluster: int) -> PrototypeSelection:
    return build_strategy(
        f"spice-prototype:top_fraction={config.top_fraction},overlap={config.overlap}", per_cluster=per_cluster
    )


def estep(head: nn.Module, score_feats: torch.Tensor, strategy: PrototypeSelection):
    """E-step (Eq. 2–4 on ``score_feats``, eval mode, no gradient) → the selection (rows, labels)."""
    was_training = head.training
    head.eval()
    with torch.no_grad():
        probs = torch.softmax(head(score_feats), 1)
    head.train(was_training)
    return strategy.select(SelectionInputs(probs, embeddings=score_feats))


def mstep_batches(n_selected: int, config: SpiceConfig, g: torch.Generator) -> list[torch.Tensor]:
    """Positions into the selection for each M-step Adam step: ``mstep_repeats`` shuffled passes in
    sub-batches of about ``mstep_batch_size`` (the remainder joins the last one; None: the whole
    selection is one step of each pass)."""
    if config.mstep_batch_size is None:
        return [torch.arange(n_selected) for _ in range(config.mstep_repeats)]
    pieces = max(1, n_selected // config.mstep_batch_size)
    return [chunk for _ in range(config.mstep_repeats)
            for chunk in torch.tensor_split(torch.randperm(n_selected, generator=g), pieces)]


def estep_mstep_loss(
    head: nn.Module, score_feats: torch.Tensor, train_feats: torch.Tensor, strategy: PrototypeSelection
) -> tuple[torch.Tensor, int]:
    """One E-step (:func:`estep`) + the M-step loss (Eq. 5 on the same rows' ``train_feats``).
    Returns (loss, number of (row, label) pairs)."""
    sel = estep(head, score_feats, strategy)
    logits = head(train_feats[sel.indices])
    return double_softmax_ce(logits, sel.labels), len(sel)


@torch.no_grad()
def head_losses(heads: nn.ModuleList, features: torch.Tensor, config: SpiceConfig) -> torch.Tensor:
    """Loss of every head over the whole dataset (M = N, §III-B Remark): E-step and M-step on the
    un-augmented features of all N images, M/K = ⌊N/K⌋. Uses no labels."""
    n = features.shape[0]
    strategy = _prototype_strategy(config, max(1, n // config.num_clusters))
    out = []
    for head in heads:
        head.eval()
        loss, _ = estep_mstep_loss(head, features, features, strategy)
        out.append(float(loss))
    return torch.tensor(out)


def select_head(losses: torch.Tensor) -> int:
    """Index of the head with the minimum whole-dataset loss (§III-B Remark; first on ties)."""
    return int(torch.argmin(losses))


@dataclass
class HeadsResult:
    heads: nn.ModuleList
    losses: torch.Tensor  # (n_heads,) whole-dataset loss of each head
    best: int
    history: list[dict] = field(default_factory=list)
    kept_epochs: list[int] = field(default_factory=list)  # per head, the epoch of its lowest loss (0: none ran)

    @property
    def best_head(self) -> MLPHead:
        return self.heads[self.best]


def _view(bank: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One randomly drawn cached view (V, N, D) per index → (len(idx), D) float."""
    v = torch.randint(0, bank.shape[0], (idx.numel(),), generator=g)
    return bank[v, idx].float()


def train_heads(
    plain: torch.Tensor,
    strong: torch.Tensor,
    config: SpiceConfig,
    progress: bool = False,
    log=None,
) -> HeadsResult:
    """Stage 2 (Algorithm 1) on cached features: ``plain`` (N, D), ``strong`` (V, N, D).
    All ``n_heads`` heads see the same batches and views; each has its own Adam (independent)."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    n, d = plain.shape
    k = config.num_clusters
    heads = nn.ModuleList(MLPHead(d, config.hidden_dim, k, config.head_batchnorm) for _ in range(config.n_heads))
    opts = [torch.optim.Adam(h.parameters(), lr=config.head_lr) for h in heads]
    g = torch.Generator().manual_seed(config.seed)
    m = min(config.batch_size, n)
    score_m = min(config.score_batch_size or m, n)
    strategy = _prototype_strategy(config, max(1, score_m // k))
    steps_per_epoch = max(1, n // m)
    history = []
    plain_f = plain.float()
    kept_loss, kept_epoch, kept_state = [float("inf")] * len(heads), [0] * len(heads), [None] * len(heads)
    bar = tqdm(total=config.head_epochs * steps_per_epoch, desc="SPICE_s heads", unit="step", disable=not progress)
    for epoch in range(config.head_epochs):
        perm = torch.randperm(n, generator=g)
        total, updates = torch.zeros(len(heads)), torch.zeros(len(heads))
        for step in range(steps_per_epoch):
            if score_m > m:  # "big batch" E-step: score score_m rows, train on the selected ones
                idx = torch.randperm(n, generator=g)[:score_m]
            else:
                idx = perm[step * m : (step + 1) * m]
            # E-step on the un-augmented images' features (Alg. 1 line 6, Fig. 3b, and the authors'
            # code), M-step (Eq. 5) on one strong view of the selected rows.
            zp, zs = plain[idx].float(), _view(strong, idx, g)
            for i, (head, opt) in enumerate(zip(heads, opts)):
                sel = estep(head, zp, strategy)
                head.train()
                rows, labels = zs[sel.indices], sel.labels
                for part in mstep_batches(len(labels), config, g):
                    loss = double_softmax_ce(head(rows[part]), labels[part])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total[i] += float(loss.detach())
                    updates[i] += 1
            bar.update(1)
        # The authors' code keeps, over all epochs, the (epoch, head) pair with the lowest
        # whole-dataset loss (§III-B Remark): each head keeps its best epoch, then the best head wins.
        epoch_losses = head_losses(heads, plain_f, config)
        for i, loss in enumerate(epoch_losses.tolist()):
            if loss < kept_loss[i]:
                kept_loss[i], kept_epoch[i] = loss, epoch + 1
                kept_state[i] = copy.deepcopy(heads[i].state_dict())
        rec = {"epoch": epoch + 1, "mean_loss": (total / updates.clamp_min(1)).tolist(), "dataset_loss": epoch_losses.tolist()}
        history.append(rec)
        if log is not None:
            log(rec)
    bar.close()
    for head, state in zip(heads, kept_state):
        if state is not None:
            head.load_state_dict(state)
    losses = head_losses(heads, plain_f, config)
    for h in heads:
        h.eval()
    return HeadsResult(heads, losses, select_head(losses), history, kept_epoch)


# --- stage 3 ----------------------------------------------------------------------------------------
def reliable_selection(probs: torch.Tensor, embeddings: torch.Tensor, config: SpiceConfig) -> tuple:
    """Reliable pseudo-labels over the whole dataset (Eq. 6–7 + the configured extras).
    Returns (Selection, the strategy with its ``report``)."""
    strategy = ReliableSelection(
        num_neighbors=min(config.num_neighbors, probs.shape[0] - 1),
        threshold=config.reliable_threshold,
        min_confidence=config.reliable_min_confidence,
        balance=config.reliable_balance,
        fallback=config.reliable_fallback,
        seed=config.seed,
    )
    return strategy.select(SelectionInputs(probs, embeddings=embeddings)), strategy


def fixmatch_loss(
    logits_labeled: torch.Tensor,
    labels: torch.Tensor,
    logits_weak_u: torch.Tensor,
    logits_strong_u: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, dict]:
    """Eq. 9: CE on reliable samples (weak view α) + consistency CE on every unlabelled sample
    whose weak-view max probability ≥ η (Eq. 8: y^u = argmax, or ignored), averaged over U.
    Plain CE on logits here (FixMatch, which §III-C adapts); the double softmax is stage 2's only."""
    sup = F.cross_entropy(logits_labeled, labels) if labels.numel() else logits_labeled.sum() * 0.0
    with torch.no_grad():
        conf, pseudo = torch.softmax(logits_weak_u.detach(), 1).max(1)
        mask = (conf >= threshold).float()  # Eq. 8
    cons = (F.cross_entropy(logits_strong_u, pseudo, reduction="none") * mask).mean()
    return sup + cons, {"sup": float(sup.detach()), "cons": float(cons.detach()), "mask": float(mask.mean())}


class WeightAverage:
    """Exponential moving average of a model's parameters, ŵ ← d_t·ŵ + (1 − d_t)·w after step t
    (the evaluation model of FixMatch, which SPICE's stage 3 adapts); buffers (BatchNorm
    statistics) are copied from the model, as FixMatch's code does. d_t = min(d, (1 + t)/(10 + t)),
    the usual warm-up, so that a short CPU schedule does not keep the pre-stage-3 weights
    (0.999^2000 ≈ 14 % of them without it)."""

    def __init__(self, model: nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None):
        self.decay = decay
        self.params = {name for name, _ in model.named_parameters()}
        source = state if state is not None else model.state_dict()
        self.state = {k: v.detach().clone() for k, v in source.items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after ``step`` (1-based) optimizer steps."""
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        for name, value in model.state_dict().items():
            target = self.state[name]
            value = value.detach().to(target.device)
            if name in self.params:
                target.lerp_(value, 1.0 - decay)
            else:
                target.copy_(value)


@dataclass
class JointState:
    """Where stage 3 stands: restored from a checkpoint, or fresh (step 0)."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    optimizer: tuple[dict, dict] | None = None  # (tensors, meta) of optimizer_tensors
    scheduler: dict | None = None
    generator: torch.Tensor | None = None
    average: dict[str, torch.Tensor] | None = None  # WeightAverage.state


def joint_train(
    model: ClusteringModel,
    images: np.ndarray,
    reliable_idx: torch.Tensor,
    reliable_labels: torch.Tensor,
    config: SpiceConfig,
    view_config: ViewConfig | None = None,
    progress: bool = False,
    log=None,
    device: str = "cpu",
    start: JointState | None = None,
    checkpoint=None,
    checkpoint_every: int = 0,
    stop_after_steps: int | None = None,
    average: WeightAverage | None = None,
) -> list[dict]:
    """Stage 3 joint training of backbone + head (Eq. 8–9), SGD + cosine schedule (§IV-B).
    ``start`` continues a checkpointed run; ``checkpoint(step, history, opt, sched, generator)`` is
    called every ``checkpoint_every`` steps and at the end; ``stop_after_steps`` ends the call there.
    ``average`` (a :class:`WeightAverage`) is updated after every step."""
    from tqdm.auto import tqdm

    start = start or JointState()
    model.to(device).train()
    if average is not None:
        average.state = {k: v.to(device) for k, v in average.state.items()}
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.joint_lr,
        momentum=config.joint_momentum,
        nesterov=True,
        weight_decay=config.joint_weight_decay,
    )
    steps = config.joint_steps
    # FixMatch's cosine decay: lr · cos(7πk / 16K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: math.cos(7 * math.pi * s / (16 * max(1, steps))))
    g = torch.Generator().manual_seed(config.seed + 1)
    if start.optimizer is not None:
        restore_optimizer("joint", opt, {k: v.to(device) for k, v in start.optimizer[0].items()}, start.optimizer[1])
    if start.scheduler is not None:
        sched.load_state_dict(start.scheduler)
    if start.generator is not None:
        g.set_state(start.generator)
    n = len(images)
    u_size = min(n, config.labeled_batch * config.unlabeled_ratio)
    history = list(start.history)
    end = steps if stop_after_steps is None else min(steps, stop_after_steps)
    bar = tqdm(total=steps, initial=start.step, desc="SPICE joint", unit="step", disable=not progress)
    for step in range(start.step, end):
        li = torch.randint(0, reliable_idx.numel(), (min(config.labeled_batch, reliable_idx.numel()),), generator=g)
        ui = torch.randperm(n, generator=g)[:u_size]
        xl = torch.from_numpy(images[reliable_idx[li].numpy()]).to(device)
        xu = torch.from_numpy(images[ui.numpy()]).to(device)
        wl = weak_view(xl, g, view_config)
        wu, su = weak_view(xu, g, view_config), strong_view(xu, g, view_config)
        x = model.preprocess(torch.cat([wl, wu, su]))
        logits = model(x)
        nl, nu = len(wl), len(wu)
        loss, parts = fixmatch_loss(
            logits[:nl], reliable_labels[li].to(device), logits[nl : nl + nu], logits[nl + nu :], config.joint_threshold
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if average is not None:
            average.update(model, step + 1)
        rec = {"step": step + 1, "loss": float(loss.detach()), **parts}
        history.append(rec)
        if log is not None and ((step + 1) % 50 == 0 or step + 1 == steps):
            log(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", mask=f"{parts['mask']:.2f}")
        if checkpoint is not None and (step + 1 == end or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
            checkpoint(step + 1, history, opt, sched, g)
    bar.close()
    model.eval()
    return history


# --- features & whole pipeline ----------------------------------------------------------------------
@torch.no_grad()
def embed_all(model: ClusteringModel, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Backbone features (N, D) of un-augmented uint8 images, eval mode."""
    model.to(device).eval()
    out = [model.embed(model.preprocess(torch.from_numpy(images[s : s + batch_size]).to(device))).float().cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def predict_probs(model: ClusteringModel, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    model.to(device).eval()
    out = [torch.softmax(model(model.preprocess(torch.from_numpy(images[s : s + batch_size]).to(device))), 1).cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out)


def view_features(model: ClusteringModel, images: np.ndarray, config: SpiceConfig, view_config=None,
                  progress: bool = False, device: str = "cpu"):
    """Frozen-backbone features of the plain images and of ``config.views`` weak/strong views
    (the CDC helper's :func:`calibclust.train.features.compute_feature_cache`, same layout)."""
    from calibclust.train.features import compute_feature_cache

    model.to(device).eval()
    return compute_feature_cache(model.embed, model.preprocess, images, config.views, config.seed,
                                 view_config, device=device, progress=progress)


@dataclass
class SpiceResult:
    model: ClusteringModel
    heads: HeadsResult
    spice_s_probs: torch.Tensor  # (N, K) best head on frozen features
    probs: torch.Tensor  # (N, K) final model (after stage 3 if it ran)
    reliable_indices: torch.Tensor
    reliable_labels: torch.Tensor
    reliable_report: dict
    joint_history: list[dict]
    seconds: float  # both stages (the feature pass included when no cache was given)
    heads_seconds: float = 0.0  # stage 2 alone (SPICE_s)


def train_spice(
    backbone: nn.Module,
    images: np.ndarray,
    config: SpiceConfig,
    feature_cache=None,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    view_config: ViewConfig | None = None,
    progress: bool = False,
    log=None,
    device: str = "cpu",
    out_dir=None,
    resume: bool = False,
    checkpoint_every: int = 50,
    stop_after_joint_steps: int | None = None,
    features_digest: str | None = None,
) -> SpiceResult | None:
    """Stages 2 and 3 on uint8 images (N, H, W, 3). ``feature_cache`` (plain/weak/strong
    tensors, e.g. a :class:`calibclust.train.features.FeatureCache`) skips the feature pass;
    ``features_digest`` names precomputed features it came from (a resumed run must match).

    With ``out_dir`` the resume state goes to ``out_dir/checkpoint/`` (see the module docstring);
    ``resume`` continues from it (same settings and images, else an error); without ``resume`` an
    existing state is an error. ``stop_after_joint_steps`` ends the call after that many joint steps
    in total, state written, and returns None (a later ``resume=True`` call finishes the run exactly)."""
    from calibclust.train.features import images_digest, module_digest

    t0 = time.time()
    # What a resumed run must share with the checkpoint besides the settings: the same images, the
    # same backbone as passed in (weights + BatchNorm statistics) and the same views.
    views = None if view_config is None else json.loads(json.dumps(dataclasses.asdict(view_config)))
    identity = {"images": images_digest(images), "backbone": module_digest(backbone), "views": views}
    if features_digest is not None:  # --features: the rows the heads train on
        identity["features"] = features_digest
    model = ClusteringModel(backbone, config.num_clusters, config.hidden_dim, head_names=("clustering",),
                            predict_head="clustering", mean=tuple(mean), std=tuple(std),
                            head_batchnorm=config.head_batchnorm)
    state = None
    if out_dir is not None:
        if has_state(out_dir) and not resume:
            raise InputError(f"{out_dir} already holds a SPICE training checkpoint; pass --resume to continue it "
                             "or choose a new --out")
        state = read_state(out_dir, STATE_FORMAT) if resume else None
        if resume and state is None and log is not None:
            log({"resume": f"no checkpoint in {out_dir}; starting from scratch"})
    if state is not None:
        config.check_resume(state[1]["config"], f"the checkpoint in {out_dir}")
        for key, value in identity.items():
            if state[1].get(key) != value:
                raise InputError(f"--resume with different {key} than the checkpoint in {out_dir} was trained on")
    cache = feature_cache or view_features(model, images, config, view_config, progress, device)
    plain = cache.plain.float().cpu()
    t_heads = time.time()
    if state is None:
        heads = train_heads(plain, cache.strong.cpu(), config, progress, log)
        if out_dir is not None:
            write_state(out_dir, _heads_tensors(heads), {**_heads_meta(heads, config, identity), "stage": "heads"})
    else:
        heads = _heads_from_state(state, plain.shape[1], config)
    heads_seconds = time.time() - t_heads
    model.heads["clustering"].load_state_dict(heads.best_head.state_dict())
    with torch.no_grad():
        spice_s = torch.softmax(heads.best_head.eval()(plain), 1)
    sel, strategy = reliable_selection(spice_s, plain, config)
    report = {k: v for k, v in strategy.report.items() if k != "ratios"}
    history: list[dict] = []
    probs = spice_s
    if config.joint and len(sel):
        start = None
        if state is not None and state[1]["stage"] == "joint":
            tensors, meta = state
            model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
            start = JointState(meta["step"], meta["joint_history"], (tensors, meta["optimizer"]), meta["scheduler"],
                               tensors["generator"],
                               {k[len("average.") :]: v for k, v in tensors.items() if k.startswith("average.")})
        average = (WeightAverage(model, config.joint_ema, (start.average or None) if start is not None else None)
                   if config.joint_ema else None)

        def checkpoint(step, hist, opt, sched, gen):
            opt_t, opt_m = optimizer_tensors("joint", opt)
            tensors = {**_heads_tensors(heads), **opt_t, "generator": gen.get_state(),
                       **{f"model.{k}": v for k, v in model.state_dict().items()},
                       **({f"average.{k}": v for k, v in average.state.items()} if average is not None else {})}
            write_state(out_dir, tensors, {**_heads_meta(heads, config, identity), "stage": "joint", "step": step,
                                           "joint_history": hist, "optimizer": opt_m, "scheduler": sched.state_dict()})

        history = joint_train(model, images, sel.indices.cpu(), sel.labels.cpu(), config, view_config, progress, log,
                              device, start, checkpoint if out_dir is not None else None, checkpoint_every,
                              stop_after_joint_steps, average)
        if stop_after_joint_steps is not None and len(history) < config.joint_steps:
            return None
        if average is not None:
            model.load_state_dict(average.state)
        probs = predict_probs(model, images, device=device)
    return SpiceResult(model.cpu().eval(), heads, spice_s, probs, sel.indices.cpu(), sel.labels.cpu(), report,
                       history, time.time() - t0, heads_seconds)


def _heads_tensors(heads: HeadsResult) -> dict[str, torch.Tensor]:
    return {f"heads.{k}": v for k, v in heads.heads.state_dict().items()}


def _heads_meta(heads: HeadsResult, config: SpiceConfig, identity: dict) -> dict:
    return {"format": STATE_FORMAT, "config": config.to_dict(), **identity, "best": heads.best,
            "losses": heads.losses.tolist(), "heads_history": heads.history, "kept_epochs": heads.kept_epochs}


def _heads_from_state(state, dim: int, config: SpiceConfig) -> HeadsResult:
    tensors, meta = state
    heads = nn.ModuleList(MLPHead(dim, config.hidden_dim, config.num_clusters, config.head_batchnorm)
                          for _ in range(config.n_heads))
    heads.load_state_dict({k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")})
    for h in heads:
        h.eval()
    return HeadsResult(heads, torch.tensor(meta["losses"]), int(meta["best"]), list(meta["heads_history"]),
                       list(meta.get("kept_epochs", [])))


def spice_metadata(model: ClusteringModel, input_size, cluster_names=None, train_stats=None, resize: str = "squash"):
    """Model metadata of a SPICE model: probs from the single head, not calibrated."""
    from calibclust.metadata import ModelMetadata

    return ModelMetadata(
        num_clusters=model.num_clusters,
        input_size=tuple(input_size),
        mean=tuple(model.mean.flatten().tolist()),
        std=tuple(model.std.flatten().tolist()),
        method="spice",
        resize=resize,
        cluster_names=list(cluster_names or []),
        probs_head="spice",
        calibrated=False,
        backbone=backbone_label(model.backbone) if hasattr(model.backbone, "spec") else "",
        embedding_dim=model.feature_dim,
        train_stats=dict(train_stats or {}),
    )


def spice_train_stats(result: SpiceResult, config: SpiceConfig, n_images: int, pretrained: bool,
                      clusters_choice: dict | None = None) -> dict:
    """What a SPICE model's metadata records about its training (``train_stats``)."""
    conf, pred = result.probs.max(1)
    stats = {"n_images": n_images, "mean_confidence": float(conf.mean()),
             "cluster_sizes": [int(v) for v in pred.bincount(minlength=config.num_clusters).tolist()],
             "best_head": result.heads.best, "head_losses": result.heads.losses.tolist(),
             "reliable": result.reliable_report, "pretrained_backbone": pretrained,
             "config": config.to_dict()}  # ClusteringMethod.load rebuilds the method with it
    if clusters_choice:
        stats["clusters_choice"] = clusters_choice
    return stats


class SpiceMethod(ClusteringMethod):
    """SPICE on the method interface (:mod:`calibclust.train.methods`): :func:`train_spice` with
    ``self.config``. Reports SPICE_s (the best stage-2 head on the frozen backbone) and, when stage 3
    runs, SPICE (the jointly trained model, the one saved and exported)."""

    name = "spice"
    config_class = SpiceConfig

    def __init__(self, n_clusters: int, config: SpiceConfig | None = None, *, view_config: ViewConfig | None = None,
                 **kwargs):
        super().__init__(n_clusters, config, **kwargs)
        self.view_config = view_config
        self.stage2_model: ClusteringModel | None = None  # SPICE_s; set by fit, not saved

    def row_names(self) -> list[str]:
        return ["SPICE_s", "SPICE"] if self.config.joint else ["SPICE_s"]

    def _fit(self, data, backbone, backbone_info, out_dir, eval_data, resume) -> None:
        mean, std = backbone_info["mean"], backbone_info["std"]
        frozen = copy.deepcopy(backbone)  # stage 3 trains `backbone` in place; SPICE_s keeps the start
        result = train_spice(backbone, data.images, self.config, mean=mean, std=std, view_config=self.view_config,
                             progress=self.progress, device=self.device, out_dir=out_dir,
                             resume=resume and out_dir is not None, features_digest=backbone_info.get("features_digest"))
        self.stage2_model = ClusteringModel(frozen, self.n_clusters, self.config.hidden_dim, head_names=("clustering",),
                                            predict_head="clustering", mean=tuple(mean), std=tuple(std),
                                            head_batchnorm=self.config.head_batchnorm).to(self.device).eval()
        self.stage2_model.heads["clustering"].load_state_dict(result.heads.best_head.state_dict())
        self.model = result.model.to(self.device)
        stats = spice_train_stats(result, self.config, data.num_images,
                                  backbone_info.get("pretrained", bool(backbone_info.get("source"))))
        self.metadata = spice_metadata(result.model, data.image_size, train_stats=stats, resize=data.resize)
        self.seconds["SPICE_s"] = result.heads_seconds

    def merge_clusters(self, k: int, data) -> list[int]:
        groups = super().merge_clusters(k, data)
        if self.stage2_model is not None and self.stage2_model is not self.model:
            # SPICE_s: stage 3 trained on its labels, so its cluster j is the model's cluster j
            self.stage2_model.merge_clusters(groups)
        return groups

    def predictions(self, images) -> dict:
        if self.stage2_model is None:  # loaded from disk: only the saved model
            return {self.row_names()[-1]: self.predict_proba(images)}
        out = {"SPICE_s": self.head_probabilities(images, ("clustering",), model=self.stage2_model)["clustering"]}
        if self.config.joint:
            out["SPICE"] = self.predict_proba(images)
        return out
