"""DCCM ("Deep Comprehensive Correlation Mining for Image Clustering", Wu, Long, Wang, Qian, Li, Lin, Zha).

The network is trained end to end (a copy of the backbone ``fit`` is given, plus a softmax head over
K clusters) on the paper's objective, Eq. 15::

    L_DCCM = (L_PG + L'_PG) + α (L_PL + L'_PL) + β L_MI

per mini-batch (Algorithm 1), from the batch's softmax outputs z (Eq. 1) on the **original** images:

* **pseudo-graph** (§3.1): S = cosine similarity of the z rows, W_ij = 1 if S_ij ≥ thres_1 else 0
  (Eq. 2, :func:`pseudo_graph`); L_PG = ℓ_g over all pairs (Eq. 3) with ℓ_g the binary
  cross-entropy of S against W (footnote 2, as DAC; :func:`graph_loss`);
* **pseudo-labels** (§3.2): y_i = argmax z_i (Eq. 7), V_i = 1 if max z_i ≥ thres_2 (Eq. 8,
  :func:`pseudo_labels`); L_PL = Σ V_i · CE(z_i, y_i) (Eq. 9, :func:`label_loss`);
* **local robustness** (§3.3): the same W, y, V supervise a transformed copy x' = G·x of the batch
  (Eq. 12: L'_PG, L'_PL); G is a view of :mod:`calibclust.augment.views` (``transform``);
* **triplet mutual information** (§3.4): deep features d (the head's hidden layer, Tab. 4's "D")
  against a shallow feature map s of the backbone (Tab. 4's "S", read by a forward hook, so no
  backbone changes), scored by a discriminator T of three 1×1 convolutions on [s; d replicated]
  (as Deep InfoMax's local discriminator, :class:`LocalDiscriminator`); L_MI = −MI^(JSD) (Eq. 13–14,
  :func:`jsd_mutual_information`) with joint pairs (d_i, s_i) and (d_i, s_p), p the nearest positive
  of i in W, and marginal pairs (d_i, s_n), n random negatives of i in W (§6.6 Tab. 6 strategy V1,
  :func:`sample_pairs`).

Defaults are the paper's (§4 "Implementation Details"): α = 5, β = 0.1, thres_1 = 0.95,
thres_2 = 0.9, RMSprop, a 64-wide deep feature (Tab. 4). The schedule is a **profile**
(:data:`PROFILES`), so the paper's settings are one config value away:

* ``DCCMConfig(profile="paper")``: lr 1e-4, batches of 32, a 512-wide discriminator (Deep InfoMax's),
  4,000 passes over the images (the authors' code: 200 epochs, each image drawn 10 times in 2
  transformed copies);
* ``profile="cpu"`` (the default, so ``train compare`` and ``calibclust train dccm`` finish on a
  CPU): 30 passes in batches of 64, a 64-wide discriminator and lr 1e-3. With the paper's 1e-4 the
  few hundred steps of a CPU run barely move the fresh head: on the digits below, 20 passes at 1e-4
  reached held-out ACC 0.63 (below K-means' 0.74 on the same backbone), 15 passes at 1e-3 0.93.
  Measured with ``train compare`` on the 1,797 sklearn digits at 32 px (1,442 training images, 355
  held out) from a small MoCo-v2 backbone: with ``--no-flip`` (what ``fit`` uses, through
  :func:`calibclust.train.profiles.dccm_config`) 257 s of training on 2 idle cores, held-out ACC
  0.930 / ECE 0.039; with this config's default flips 0.913 / 0.048 (197 s on one thread of shared
  cores); K-means on the same features 0.735.

Where this differs from the paper, and why:

* The network starts from the pretrained backbone ``fit`` is given (the paper starts from random
  weights, Algorithm 1 line 1): calibclust's methods all cluster a pretrained representation. The
  backbone is calibclust's, not Tab. 4's shallow AlexNet; the shallow map is the output of its first
  residual stage (``shallow_layer``: 16×16×32 for the small backbone at 32 px).
* Logit BatchNorm: the authors' network normalises the logits with BatchNorm before the softmax
  (their ``cifar_C4_L2``; Tab. 4 does not show it). It is trained here too (on the digits, 5 passes
  without it: held-out ACC 0.60 and an empty cluster; with it 0.90), and when training ends its
  statistics over the training images are folded into the head's last linear layer
  (:func:`fold_logit_norm`), so the model is a plain softmax head that exports like any other (the
  authors' BatchNorm keeps using batch statistics at test time, which a single image has not).
* The original and transformed copies go through the network as one batch (BatchNorm statistics
  over both); the authors' code computes the graph in a separate no-gradient pass on 1,000 images
  and trains only the transformed copies' terms.
* ℓ_l is the cross-entropy the paper names (§3.2); the authors' code uses a binary cross-entropy
  against the one-hot label. Eq. 11's ℓ2 term is not in Eq. 15 and not used.
* The MI term is computed on the transformed copy, as the authors' code does; their "nearest"
  positive takes the first positive it finds, here the most similar one (Tab. 6's wording); an
  anchor with no positive but itself keeps only its own pair (Eq. 13's instance-level MI).

DCCM keeps no checkpoints (``fit(resume=True)`` starts over): its CPU profile runs for minutes.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclust.augment.views import ViewConfig, strong_view, weak_view
from calibclust.config import Config
from calibclust.errors import InputError
from calibclust.models.clustering import ClusteringModel, MLPHead
from calibclust.train.methods import ClusteringMethod

# The settings a profile decides (the fields left None). "paper": §4 and the authors' code
# (cfgs/cifar10.yaml: 200 epochs, each image drawn `repeated` = 10 times in 2 transformed copies, in
# batches of small_bs = 32; RMSprop lr 1e-4; Deep InfoMax's 512-wide discriminator). "cpu": minutes on
# 2 cores (see the module docstring for what it measured).
PROFILES: dict[str, dict[str, float]] = {
    "paper": {"epochs": 4000, "batch_size": 32, "lr": 1e-4, "disc_channels": 512},
    "cpu": {"epochs": 30, "batch_size": 64, "lr": 1e-3, "disc_channels": 64},
}
TRANSFORMS = ("weak", "strong")


@dataclass
class DCCMConfig(Config):
    """DCCM settings; defaults are the paper's (§4 "Implementation Details") unless noted."""

    TITLE: ClassVar[str] = "DCCM configuration"
    PROFILES: ClassVar[dict] = PROFILES

    num_clusters: int = 10
    profile: str = "cpu"  # "cpu" | "paper": the values of epochs, batch_size, lr, disc_channels left None
    epochs: int | None = None  # passes over the images, one transformed copy each (PROFILES)
    batch_size: int | None = None  # mini-batch of Algorithm 1; the pseudo-graph is built within it (PROFILES)
    graph_threshold: float = 0.95  # thres_1 (Eq. 2)
    label_threshold: float = 0.9  # thres_2 (Eq. 8)
    alpha: float = 5.0  # α, pseudo-label weight (Eq. 10, 12, 15)
    beta: float = 0.1  # β, mutual-information weight (Eq. 15)
    lr: float | None = None  # RMSprop's learning rate (PROFILES; §4: 1e-4, as DAC)
    rmsprop_alpha: float = 0.9  # RMSprop's smoothing constant in the authors' code (torch's default: 0.99)
    hidden_dim: int = 64  # deep feature d: Linear(·, 64) BN ReLU (Tab. 4, 32 px)
    logit_batchnorm: bool = True  # BatchNorm on the logits while training (authors' code), folded in at the end
    shallow_layer: str = "layer1"  # backbone module whose output is the shallow map s (Tab. 4's "S")
    disc_channels: int | None = None  # width of the discriminator's 1×1 convolutions (PROFILES; DIM: 512)
    negatives: int = 2  # random negatives per anchor (authors' code)
    transform: str = "weak"  # G (§3.3): "weak" = flip + shift crop, "strong" = + RandAugment + Cutout
    views: ViewConfig = field(default_factory=ViewConfig)
    seed: int = 0

    def _coerce(self) -> None:
        self.alpha, self.beta = float(self.alpha), float(self.beta)
        if self.lr is not None:
            self.lr = float(self.lr)

    def problems(self) -> list[str]:
        problems = []
        if self.num_clusters < 2:
            problems.append(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.profile not in PROFILES:
            problems.append(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        for name in ("epochs", "disc_channels", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if self.batch_size is not None and self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (BatchNorm, pairs), got {self.batch_size}")
        for name in ("graph_threshold", "label_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.alpha < 0 or self.beta < 0:
            problems.append(f"alpha and beta must be >= 0, got {self.alpha} and {self.beta}")
        if (self.lr is not None and self.lr <= 0) or not 0.0 < self.rmsprop_alpha < 1.0:
            problems.append("lr must be > 0 and rmsprop_alpha in (0, 1)")
        if self.negatives < 1:
            problems.append(f"negatives must be >= 1, got {self.negatives}")
        if self.transform not in TRANSFORMS:
            problems.append(f"transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")
        if not self.shallow_layer:
            problems.append("shallow_layer must name a backbone module")
        return problems


# --- §3.1–3.2: pseudo-graph and pseudo-labels ---------------------------------------------------
def cosine_similarity(probs: torch.Tensor) -> torch.Tensor:
    """S_ij = z_i · z_j / (‖z_i‖ ‖z_j‖) of the softmax outputs (N, K) → (N, N) (§3.1)."""
    unit = F.normalize(probs, dim=1)
    return unit @ unit.T


@torch.no_grad()
def pseudo_graph(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, W): the similarities and the pseudo-graph W_ij = 1 if S_ij ≥ thres_1 else 0 (Eq. 2), float."""
    similarity = cosine_similarity(probs.detach())
    return similarity, (similarity >= threshold).float()


@torch.no_grad()
def pseudo_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, V): y_i = argmax_k z_ik (Eq. 7), V_i = 1 if p_i = max_k z_ik ≥ thres_2 else 0 (Eq. 8), float."""
    confidence, labels = probs.detach().max(1)
    return labels, (confidence >= threshold).float()


def graph_loss(probs: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """Eq. 3 with ℓ_g = binary cross-entropy of S_ij against W_ij (footnote 2, DAC's), averaged over
    all N² pairs (the authors' ``nn.BCELoss`` on the matrix). S of non-negative vectors lies in
    [0, 1]; the clamp keeps it off 0 and 1, where float rounding would make a pair that trains nothing
    (no gradient through the saturated softmax) count the log cap of 100 in the reported loss."""
    eps = 1e-6
    return F.binary_cross_entropy(cosine_similarity(probs).clamp(eps, 1.0 - eps), graph)


def label_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 9 with ℓ_l = cross-entropy: Σ_i V_i · CE(z_i, y_i), divided by the batch size."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (mask * ce).sum() / max(1, logits.shape[0])


# --- §3.4: triplet mutual information --------------------------------------------------------------
@torch.no_grad()
def sample_pairs(similarity: torch.Tensor, graph: torch.Tensor, negatives: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs for the triplet MI from the pseudo-graph (§3.4; §6.6 Tab. 6, V1 "nearest pos + random*
    neg"). Returns ``(positive (N,), negative (N, R), valid (N, R))``:

    * positive[i] = the j ≠ i with W_ij = 1 and the largest S_ij; i itself when it has no other;
    * negative[i] = R distinct j drawn uniformly among those with W_ij = 0 (as many as there are;
      ``valid`` marks the drawn ones)."""
    n = similarity.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
    linked = (graph > 0) & ~eye
    nearest = torch.where(linked, similarity, torch.full_like(similarity, -math.inf)).argmax(1)
    positive = torch.where(linked.any(1), nearest, torch.arange(n, device=similarity.device))
    scores = torch.rand(n, n, generator=generator).to(similarity.device)
    scores = torch.where((graph > 0) | eye, torch.full_like(scores, -1.0), scores)
    r = min(negatives, n)
    top, negative = scores.topk(r, dim=1)
    return positive, negative, top >= 0


class LocalDiscriminator(nn.Module):
    """T(d, s): three 1×1 convolutions on the concatenation [s; d replicated over s's positions]
    (§4: "three 1×1 convolutional layers, same to [Deep InfoMax]"; no biases, as the authors' code).
    Returns one score per pair and position, (P, H, W).

    The first convolution is linear in the concatenation, so it is applied to s and to d apart
    (its weight split in two) and summed per pair: the same scores without building P replicated
    maps."""

    def __init__(self, shallow_channels: int, deep_dim: int, channels: int = 512):
        super().__init__()
        self.shallow_channels = shallow_channels
        self.c0 = nn.Conv2d(shallow_channels + deep_dim, channels, 1, bias=False)
        self.c1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.c2 = nn.Conv2d(channels, 1, 1, bias=False)

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor, deep_idx: torch.Tensor,
                shallow_idx: torch.Tensor) -> torch.Tensor:
        """Scores of the pairs (deep[deep_idx[p]], shallow[shallow_idx[p]])."""
        w = self.c0.weight[:, :, 0, 0]
        from_s = F.conv2d(shallow, w[:, : self.shallow_channels, None, None])  # (N, C, H, W)
        from_d = deep @ w[:, self.shallow_channels :].T  # (N, C)
        h = torch.relu(from_s[shallow_idx] + from_d[deep_idx][:, :, None, None])
        return self.c2(torch.relu(self.c1(h)))[:, 0]


def jsd_mutual_information(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """MI^(JSD) = E_J[−sp(−T(d, s))] − E_M[sp(T(d, s))], sp(z) = log(1 + e^z) (Eq. 13), the
    expectations being means over the joint and the marginal scores given (every position of each
    pair). No marginal scores: that term is 0."""
    joint = -F.softplus(-t_joint).mean()
    marginal = F.softplus(t_marginal).mean() if t_marginal.numel() else t_joint.sum() * 0.0
    return joint - marginal


def triplet_mi_loss(disc: LocalDiscriminator, deep: torch.Tensor, shallow: torch.Tensor, positive: torch.Tensor,
                    negative: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_MI = −MI^(JSD)_set (Eq. 14): joint pairs (d_i, s_i) and (d_i, s_positive[i]) for anchors with a
    positive other than themselves (one without keeps its own pair once), marginal pairs
    (d_i, s_negative[i, r]) where valid."""
    n = deep.shape[0]
    anchors = torch.arange(n, device=deep.device)
    other = positive != anchors
    joint = disc(deep, shallow, torch.cat([anchors, anchors[other]]), torch.cat([anchors, positive[other]]))
    rows, cols = torch.nonzero(valid, as_tuple=True)
    marginal = disc(deep, shallow, rows, negative[rows, cols])
    return -jsd_mutual_information(joint, marginal)


# --- the network -----------------------------------------------------------------------------------
def shallow_module(backbone: nn.Module, name: str) -> nn.Module:
    """The backbone module named ``name`` (or ending in ``.name``, e.g. inside an L2-normalising wrapper)."""
    modules = dict(backbone.named_modules())
    if name in modules:
        return modules[name]
    ending = [m for n, m in modules.items() if n.endswith("." + name)]
    if len(ending) == 1:
        return ending[0]
    children = ", ".join(n for n, _ in backbone.named_children())
    raise InputError(f"DCCM: the backbone has no module {name!r} for the shallow feature map (shallow_layer); "
                     f"its top-level modules: {children}")


@contextmanager
def shallow_features(backbone: nn.Module, name: str):
    """Keeps the output of the backbone's ``name`` module in ``store["s"]`` on every forward, for as
    long as the context lasts (a forward hook, removed after: the backbone itself is unchanged)."""
    store: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        store["s"] = output

    handle = shallow_module(backbone, name).register_forward_hook(keep)
    try:
        yield store
    finally:
        handle.remove()


@dataclass
class Outputs:
    logits: torch.Tensor  # (N, K), after the logit BatchNorm when there is one
    probs: torch.Tensor  # z (Eq. 1)
    deep: torch.Tensor  # d: the head's hidden layer (N, hidden_dim)
    shallow: torch.Tensor  # s: the shallow map (N, C, H, W)

    def rows(self, part: slice) -> "Outputs":
        return Outputs(self.logits[part], self.probs[part], self.deep[part], self.shallow[part])


def forward(model: ClusteringModel, logit_norm: nn.Module | None, x: torch.Tensor, store: dict) -> Outputs:
    head: MLPHead = model.heads[model.predict_head]
    deep = head.hidden(model.embed(x))
    logits = head.fc2(deep)
    if logit_norm is not None:
        logits = logit_norm(logits)
    return Outputs(logits, torch.softmax(logits, 1), deep, store["s"])


def dccm_loss(out: Outputs, out_t: Outputs, disc: LocalDiscriminator, config: DCCMConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Eq. 15 on one batch: ``out`` of the originals, ``out_t`` of their transformed copies."""
    similarity, graph = pseudo_graph(out.probs, config.graph_threshold)  # Eq. 2
    labels, mask = pseudo_labels(out.probs, config.label_threshold)  # Eq. 7–8
    pg = graph_loss(out.probs, graph) + graph_loss(out_t.probs, graph)  # L_PG + L'_PG (Eq. 3, 12)
    pl = label_loss(out.logits, labels, mask) + label_loss(out_t.logits, labels, mask)  # L_PL + L'_PL (Eq. 9, 12)
    positive, negative, valid = sample_pairs(similarity, graph, config.negatives, generator)
    mi = triplet_mi_loss(disc, out_t.deep, out_t.shallow, positive, negative, valid)  # Eq. 14
    loss = pg + config.alpha * pl + config.beta * mi
    n = graph.shape[0]
    linked = float(graph.sum() - graph.diagonal().sum())
    parts = {"loss": float(loss.detach()), "graph": float(pg.detach()), "label": float(pl.detach()),
             "mi": float(mi.detach()), "graph_density": linked / max(1, n * (n - 1)),
             "confident": float(mask.mean())}
    return loss, parts


@torch.no_grad()
def fold_logit_norm(head: MLPHead, norm: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Fold the affine normalisation γ (l − μ)/√(σ² + ε) + β of the logits l = W h + b into the
    head's last layer: W ← diag(γ/√(σ² + ε)) W, b ← γ (b − μ)/√(σ² + ε) + β."""
    scale = norm.weight / torch.sqrt(var + norm.eps)
    head.fc2.weight.mul_(scale[:, None])
    head.fc2.bias.copy_((head.fc2.bias - mean) * scale + norm.bias)


@torch.no_grad()
def logit_statistics(model: ClusteringModel, images, batch_size: int = 512, device: str = "cpu"):
    """Mean and (biased) variance over ``images`` of the eval-mode logits, before any normalisation."""
    from calibclust.train.data import embed_images

    was = model.training
    model.eval()
    head = model.heads[model.predict_head]
    logits = head.fc2(head.hidden(embed_images(model, images, batch_size, device)))
    model.train(was)
    return logits.mean(0), logits.var(0, unbiased=False)


# --- training --------------------------------------------------------------------------------------
@dataclass
class DCCMResult:
    model: ClusteringModel
    history: list[dict]  # one row per epoch: mean of each loss part
    seconds: float


def train_dccm(backbone: nn.Module, images, config: DCCMConfig, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
               device: str = "cpu", progress: bool = False, log=None, eval_data=None) -> DCCMResult:
    """Algorithm 1 on uint8 images (N, H, W, 3): trains ``backbone`` (in place) with a softmax head and
    returns the model whose head gives the probabilities (logit normalisation folded in).
    ``eval_data`` (TrainingData with labels) is scored after every epoch into the history, never trained on."""
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(config.seed)
    k = config.num_clusters
    model = ClusteringModel(backbone, k, config.hidden_dim, head_names=("clustering",), predict_head="clustering",
                            mean=tuple(mean), std=tuple(std)).to(device)
    logit_norm = nn.BatchNorm1d(k).to(device) if config.logit_batchnorm else None
    n = len(images)
    batch = min(int(config.setting("batch_size")), n)
    epochs = int(config.setting("epochs"))
    g = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    with shallow_features(model.backbone, config.shallow_layer) as store:
        with torch.no_grad():  # the shallow map's channels size the discriminator
            model.eval()
            model.embed(model.preprocess(torch.from_numpy(np.asarray(images[:2])).to(device)))
            shallow_channels = store["s"].shape[1]
        disc = LocalDiscriminator(shallow_channels, config.hidden_dim, int(config.setting("disc_channels"))).to(device)
        params = list(model.parameters()) + list(disc.parameters())
        if logit_norm is not None:
            params += list(logit_norm.parameters())
        opt = torch.optim.RMSprop(params, lr=float(config.setting("lr")), alpha=config.rmsprop_alpha)
        view = weak_view if config.transform == "weak" else strong_view
        steps_per_epoch = max(1, n // batch)
        bar = tqdm(total=epochs * steps_per_epoch, desc="DCCM", unit="step", disable=not progress)
        model.train()
        disc.train()
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=g)
            sums: dict[str, float] = {}
            for step in range(steps_per_epoch):
                idx = perm[step * batch : (step + 1) * batch].sort().values.numpy()
                x = torch.from_numpy(np.asarray(images[idx])).to(device)
                xt = view(x, g, config.views)  # x' = G·x (§3.3)
                # One pass over both copies; the halves are split after.
                both = forward(model, logit_norm, model.preprocess(torch.cat([x, xt])), store)
                loss, parts = dccm_loss(both.rows(slice(0, len(x))), both.rows(slice(len(x), None)), disc, config, g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.3f}", W=f"{parts['graph_density']:.2f}",
                                V=f"{parts['confident']:.2f}")
            row = {"epoch": epoch + 1, **{key: value / steps_per_epoch for key, value in sums.items()}}
            if eval_data is not None and eval_data.labels is not None:
                row.update(_score(model, logit_norm, eval_data, device))
                model.train()
            history.append(row)
            if log is not None:
                log(row)
        bar.close()
    model.eval()
    if logit_norm is not None:
        # The authors' logit BatchNorm keeps batch statistics at test time; here the statistics of all
        # training images (eval mode) are folded into the head, so one image is scored as in a batch.
        mu, var = logit_statistics(model, images, device=device)
        fold_logit_norm(model.heads["clustering"], logit_norm, mu, var)
    return DCCMResult(model.cpu().eval(), history, time.time() - t0)


@torch.no_grad()
def _score(model: ClusteringModel, logit_norm: nn.Module | None, data, device: str) -> dict:
    """Held-out figures of the model as it stands (eval mode, the logit normalisation's running statistics)."""
    from calibclust.train.data import embed_images, heldout_figures

    model.eval()
    head = model.heads[model.predict_head]
    logits = head.fc2(head.hidden(embed_images(model, data.images, device=device)))
    if logit_norm is not None:
        logit_norm.eval()
        logits = logit_norm(logits)
        logit_norm.train()
    return heldout_figures(torch.softmax(logits, 1).cpu(), data.labels)


class DCCMMethod(ClusteringMethod):
    """DCCM on the method interface: :func:`train_dccm` with ``self.config`` on a copy of the backbone."""

    name = "dccm"
    config_class = DCCMConfig

    def row_names(self) -> list[str]:
        return ["DCCM"]

    def _fit(self, data, backbone, backbone_info, out_dir, eval_data, resume) -> None:
        mean, std = backbone_info["mean"], backbone_info["std"]
        with self._forked_rng():  # train_dccm seeds torch from the config
            result = train_dccm(backbone, data.images, self.config, mean=mean, std=std, device=self.device,
                                progress=self.progress, eval_data=eval_data)
        self.model = result.model.to(self.device).eval()
        self.metadata = self._single_head_metadata(
            data, backbone_info, {"seconds": result.seconds, "first_epoch": result.history[0],
                                  "last_epoch": result.history[-1]}, out_dir, result.history)
