"""GCC ("GCC: Generative Calibration Clustering", Xia, Huang, Ding): a clustering network fine-tuned
on images that a class-conditional diffusion model generates for each of its clusters.

The paper's training flow (§3.4), and where each piece lives here:

1. **Stage I, clustering cornerstone.** The feature extractor F is pretrained contrastively (Eq. 1:
   the MoCo-v2 backbone ``fit`` / ``train compare`` hand every method); K-means on its features
   gives pseudo-labels, on which the clustering head C (two fully-connected layers) is trained
   with cross-entropy while F is frozen (Eq. 2) — :func:`train_head_on_kmeans`.
2. **Conditional diffusion** (§3.2.3): a DDPM ε_G(x_t, ŷ, t) conditioned on ŷ, the one-hot argmax
   of the clustering branch, trained on the real images with Eq. 6 —
   :mod:`calibclust.models.diffusion` (U-Net, noise schedule, sampler), :func:`train_diffusion`.
3. **Stage II, GCC** (§3.3): with G frozen, the clustering network (F and C) is fine-tuned on
   Eq. 12, L_d + L_cwm + L_ml, each batch of B real images X_i paired with B generated images
   X̃_j conditioned on the real batch's labels ŷ_j (the round's labels, see below):

   * L_d (Eq. 9, :func:`cluster_mmd`): per cluster k, the squared kernel MMD between the features
     of the real and the generated images of cluster k (Eq. 7–8);
   * L_cwm (Eq. 10, :func:`category_matching_loss`): mean cosine similarity of generated images
     of different clusters minus that of the same cluster;
   * L_ml (Eq. 11, :func:`reliable_metric_loss`): Σ_k [p̃_ik > p̃_ij] (p̃_ik − p̃_ij)², j the
     cluster X̃_i was generated for.

   Then G is fine-tuned on the real images under the improved labels (Eq. 6), and "the
   collaborative updating of two branches will be repeated for many rounds" (§3.4) —
   :func:`train_gcc`.

Where this differs from the paper, and why:

* **Eq. 9's normalisers.** As printed, the fractions of Eq. 9 divide each sum of kernel values by
  sums over other pairs (d_r^k's denominator holds generated pairs); that reads as a typesetting
  slip. Here each of d_r^k, d_g^k, d_rg^k is the mean kernel value over its pairs of cluster k, so
  d_r^k + d_g^k − 2 d_rg^k is the squared RKHS distance between the cluster's two mean embeddings,
  Eq. 7–8's quantity (Gretton et al.'s biased MMD²). The kernel (the paper names none) is a
  Gaussian on L2-normalised features with the median-distance bandwidth of each batch.
* **Generated images come from a pool.** G is frozen during Stage II, so its samples for a
  cluster are i.i.d. whenever they are drawn; each round draws ``pool_per_cluster`` images per
  cluster up front and pairs every real image with a random pool image of its cluster (T network
  passes per sample make fresh samples per batch unaffordable on a CPU).
* **ŷ is fixed for a round.** The real images' labels are the clustering branch's argmax at the
  start of the round — the labels G was just trained with (§3.2.3: "given the frozen clustering
  branch") — not recomputed per batch by the network being fine-tuned. With per-batch labels Eq. 12
  rewards collapse: once every real image of a batch falls in one cluster, L_cwm has no
  between-cluster pair and reaches its minimum −1, and L_d and L_ml reach 0. Fixed labels remove
  that trivial minimum (they do not make a weak G helpful; see below).
* **L_ml is averaged over the batch** (Eq. 11 sums over it), so Eq. 12's unit weights balance at
  any batch size, and p̃ is C's softmax (the paper writes p̃ = C(F(X̃)) and calls p "logits" at
  Eq. 2; on raw logits the hinge would have no scale).
* **BatchNorm statistics stay frozen in Stage II**: batches mix real and generated images, whose
  statistics differ (the paper's Fig. 4c: "obvious differences ... on color and resolution");
  the network keeps the real images' statistics, so a real image is scored at test time as in
  training. Weights and BatchNorm affines still train.
* **Scale.** The paper trains a DDPM-sized U-Net 300 epochs and the head 100, then alternates 5
  clustering and 2 diffusion epochs per round, on a GPU. :data:`PROFILES` holds those settings as
  ``profile="paper"`` and a CPU profile (the default) with a 16-wide U-Net at T = 100 steps, 100
  diffusion epochs, two rounds and a tenth of the paper's Stage II learning rate.
* The diffusion runs at ``diffusion_size`` px (32, the paper's CIFAR size); other input sizes are
  resized to it for G and its samples back to the model's size.

What the CPU profile reaches (the data zoo's digits: 1,455 training images, 342 held out by path
hash, a 200-epoch MoCo-v2 small backbone pretrained on the training split; 2 idle CPU cores). G is
the weak link: the share of its samples that the Stage I network puts in the cluster they were
drawn for rose from 0.23 after 30 diffusion epochs (660 steps) to 0.48-0.53 after 100 (2,200 steps,
about 5 minutes) — the paper's G trains about 100 times more steps. With samples that unfaithful,
one round of Stage II (5 epochs) moves the network *away* from the real clusters. Held-out ACC of
the head after Stage I: 0.728 (K-means on the features 0.735); after Stage II, head (K-means refitted
on the fine-tuned features):

* L_d + L_cwm + L_ml at the paper's lr 1e-4: 0.42 (0.72) after 1 epoch, 0.21 (0.48) after 5;
* the same at lr 1e-5 (the CPU profile): 0.72 (0.76) after 1 epoch, 0.49 (0.71) after 5;
* L_d alone, lr 1e-4: one cluster (0.15) after 2 epochs; L_cwm alone: 0.65 after 1, 0.15 after 4;
  L_ml alone: 0.63-0.74 (K-means 0.64-0.76) — the losses that move F (L_d, L_cwm) do the damage.

So the paper's ordering (GCC well above K-means and above its own Stage I, Table 1) needs a
generator this profile cannot train on a CPU; ``profile="paper"`` is the setting to try on a GPU.

GCC keeps no checkpoints (``fit(resume=True)`` starts over); ``out_dir`` receives the history and a
grid of generated images per round (the paper's Fig. 4c).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibclust.config import Config
from calibclust.models.clustering import ClusteringModel
from calibclust.models.diffusion import ConditionalUNet, NoiseSchedule, denoising_loss, sample
from calibclust.precision import backward_and_step
from calibclust.train.methods import ClusteringMethod

# The settings a profile decides (the fields left None). "paper": §4.1 (Adam 1e-4 for the clustering
# branch and 2e-4 for the U-Net, 100 head and 300 diffusion epochs, then 5 + 2 epochs per round) and
# the widths and depths of DDPM's CIFAR-10 U-Net (128 channels, multipliers 1-2-2-2, 2 blocks per
# level: 16 residual blocks down and up, as §4.1 counts them; T = 1000), without its attention
# layers. The paper gives no round count and no batch size: ours. "cpu": minutes on 2 cores (the
# module docstring says what it measured).
LOSS_TERMS = ("d", "cwm", "ml")  # L_d (Eq. 9), L_cwm (Eq. 10), L_ml (Eq. 11)
PROFILES: dict[str, dict] = {
    "paper": {"unet_channels": 128, "unet_multipliers": (1, 2, 2, 2), "unet_blocks": 2, "diffusion_steps": 1000,
              "diffusion_epochs": 300, "diffusion_lr": 2e-4, "cluster_lr": 1e-4, "rounds": 10, "pool_per_cluster": 256},
    "cpu": {"unet_channels": 16, "unet_multipliers": (1, 2, 2), "unet_blocks": 1, "diffusion_steps": 100,
            "diffusion_epochs": 100, "diffusion_lr": 1e-3, "cluster_lr": 1e-5, "rounds": 2, "pool_per_cluster": 32},
}


@dataclass
class GCCConfig(Config):
    """GCC settings: the paper's (§4.1) unless marked ours; the fields left None come from the profile."""

    TITLE: ClassVar[str] = "GCC configuration"
    PROFILES: ClassVar[dict] = PROFILES

    num_clusters: int = 10
    profile: str = "cpu"  # "cpu" | "paper": the values of the fields left None (PROFILES)
    head_hidden_dim: int = 512  # C: two fully-connected layers (§4.1), D → 512 → BN → ReLU → K
    head_epochs: int = 100  # Eq. 2 on the frozen features (§4.1: about 100 epochs)
    head_lr: float = 1e-4  # Adam, the clustering branch (§4.1)
    kmeans_restarts: int = 3  # K-means for Stage I's pseudo-labels (ours)
    cluster_lr: float | None = None  # Adam for F and C in Stage II (§4.1: 1e-4; PROFILES)
    cluster_epochs: int = 5  # Stage II epochs per round (§4.1)
    diffusion_round_epochs: int = 2  # G's epochs per round (§4.1)
    batch_size: int = 64  # real images per batch, each paired with one generated image (ours)
    diffusion_batch_size: int = 64  # (ours)
    diffusion_size: int = 32  # G's image side (the paper's 32 px CIFAR)
    unet_channels: int | None = None
    unet_multipliers: tuple[int, ...] | None = None
    unet_blocks: int | None = None
    unet_dropout: float = 0.1  # DDPM's CIFAR-10 dropout
    diffusion_steps: int | None = None  # T of the noise schedule
    diffusion_epochs: int | None = None  # G's epochs before Stage II (§4.1: 300)
    diffusion_lr: float | None = None
    rounds: int | None = None  # Stage II + diffusion fine-tuning rounds (§3.4: "many")
    # Eq. 12's terms; leaving one out gives the paper's ablations GCC-d, GCC-cwm, GCC-ml (Fig. 2a).
    losses: tuple[str, ...] = LOSS_TERMS
    pool_per_cluster: int | None = None  # generated images per cluster and round (module docstring)
    mixed_precision: bool = True  # autocast for G: bf16 where the device has it natively, fp16 + loss scaling on older GPUs
    seed: int = 0

    def _coerce(self) -> None:
        self.losses = tuple(self.losses)
        if self.unet_multipliers is not None:
            self.unet_multipliers = tuple(int(m) for m in self.unet_multipliers)
        self.head_lr = float(self.head_lr)
        for name in ("cluster_lr", "diffusion_lr"):
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))

    def problems(self) -> list[str]:
        problems = []
        if self.num_clusters < 2:
            problems.append(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.profile not in PROFILES:
            problems.append(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
            return problems
        for name in ("head_hidden_dim", "kmeans_restarts", "unet_channels", "unet_blocks", "diffusion_steps",
                     "pool_per_cluster"):
            value = self.setting(name)
            if value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        for name in ("head_epochs", "cluster_epochs", "diffusion_round_epochs", "diffusion_epochs", "rounds"):
            value = self.setting(name)
            if value < 0:
                problems.append(f"{name} must be >= 0, got {value}")
        for name in ("batch_size", "diffusion_batch_size"):
            if getattr(self, name) < 2:
                problems.append(f"{name} must be >= 2 (BatchNorm, pairs), got {getattr(self, name)}")
        for name in ("head_lr", "cluster_lr", "diffusion_lr"):
            if not self.setting(name) > 0:
                problems.append(f"{name} must be > 0, got {self.setting(name)}")
        multipliers = self.setting("unet_multipliers")
        if not multipliers or any(m < 1 for m in multipliers):
            problems.append(f"unet_multipliers must be positive integers, got {multipliers}")
        elif self.diffusion_size < 4 or self.diffusion_size % 2 ** (len(multipliers) - 1):
            problems.append(f"diffusion_size must be divisible by 2^(levels - 1) = {2 ** (len(multipliers) - 1)}, "
                            f"got {self.diffusion_size}")
        if not self.losses or set(self.losses) - set(LOSS_TERMS) or len(set(self.losses)) != len(self.losses):
            problems.append(f"losses must name distinct terms of Eq. 12 among {', '.join(LOSS_TERMS)}, got {self.losses}")
        if not 0.0 <= self.unet_dropout < 1.0:
            problems.append(f"unet_dropout must be in [0, 1), got {self.unet_dropout}")
        return problems


# --- Stage II's losses (Eq. 9-11) ------------------------------------------------------------------
def median_bandwidth(x: torch.Tensor) -> torch.Tensor:
    """σ² of the Gaussian kernel: the median squared distance between distinct rows (no gradient)."""
    with torch.no_grad():
        d = torch.cdist(x.float(), x.float()).pow(2)
        off = d[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
        return off.median().clamp_min(1e-6) if off.numel() else torch.ones((), device=x.device)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """K(a_i, b_j) = exp(−‖a_i − b_j‖² / σ²)."""
    return torch.exp(-torch.cdist(a, b).pow(2) / bandwidth)


def cluster_mmd(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
                num_clusters: int, bandwidth: torch.Tensor | None = None) -> torch.Tensor:
    """L_d (Eq. 9): Σ_k d_r^k + d_g^k − 2 d_rg^k, the mean kernel value over real–real, generated–
    generated and real–generated pairs of cluster k (the squared RKHS distance of Eq. 8 between the
    cluster's mean embeddings); clusters missing from either side add nothing. Features are
    L2-normalised first; ``bandwidth`` None: the median heuristic on both sets together."""
    real, fake = F.normalize(real.float(), dim=1), F.normalize(fake.float(), dim=1)
    if bandwidth is None:
        bandwidth = median_bandwidth(torch.cat([real, fake]))
    r = F.one_hot(real_labels, num_clusters).to(real.dtype)  # (B, K) indicator I(ŷ_i → k)
    g = F.one_hot(fake_labels, num_clusters).to(real.dtype)
    nr, ng = r.sum(0), g.sum(0)
    present = (nr > 0) & (ng > 0)
    rw, gw = r / nr.clamp_min(1), g / ng.clamp_min(1)  # each column averages over its cluster's rows
    d_r = (rw * (gaussian_kernel(real, real, bandwidth) @ rw)).sum(0)
    d_g = (gw * (gaussian_kernel(fake, fake, bandwidth) @ gw)).sum(0)
    d_rg = (rw * (gaussian_kernel(real, fake, bandwidth) @ gw)).sum(0)
    return ((d_r + d_g - 2.0 * d_rg) * present).sum()


def category_matching_loss(fake: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cwm (Eq. 10): mean cosine similarity over the pairs (i, j) of different labels minus the
    mean over pairs of the same label (i = j included, as the sums are written)."""
    z = F.normalize(fake.float(), dim=1)
    sim = z @ z.T
    same = labels[:, None] == labels[None, :]
    between = sim[~same].mean() if bool((~same).any()) else sim.new_zeros(())
    return between - sim[same].mean()


def reliable_metric_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_ml (Eq. 11), per image: Σ_k [p̃_ik > p̃_ij] (p̃_ik − p̃_ij)², j = the image's generation label;
    averaged over the batch (the module docstring says why)."""
    target = probs.gather(1, labels[:, None])
    return (probs - target).clamp_min(0.0).pow(2).sum(1).mean()


def gcc_loss(real_feat, real_labels, fake_feat, fake_logits, fake_labels, num_clusters,
             terms: tuple[str, ...] = LOSS_TERMS) -> tuple[torch.Tensor, dict]:
    """Eq. 12 on one batch: the sum of ``terms`` of L_d + L_cwm + L_ml, and every part's value."""
    parts = {"d": cluster_mmd(real_feat, real_labels, fake_feat, fake_labels, num_clusters),
             "cwm": category_matching_loss(fake_feat, fake_labels),
             "ml": reliable_metric_loss(torch.softmax(fake_logits.float(), 1), fake_labels)}
    return sum(parts[t] for t in terms), {f"l_{name}": float(value.detach()) for name, value in parts.items()}


# --- images between the uint8 folder and G's [-1, 1] -------------------------------------------------
def to_diffusion(images_uint8: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, side, side) in [−1, 1]."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x


def from_diffusion(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """G's [−1, 1] (N, 3, S, S) → uint8 (N, H, W, 3) for ``size`` = (H, W), as a real image of the folder is."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# --- the stages -------------------------------------------------------------------------------------
def train_head_on_kmeans(model: ClusteringModel, features: torch.Tensor, config: GCCConfig,
                         generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Stage I (§3.2.2): K-means pseudo-labels y_i on the frozen features, then Eq. 2 (cross-entropy
    of C's logits against them); returns the pseudo-labels and the last epoch's loss."""
    from calibclust.cluster.kmeans import kmeans
    from calibclust.train.data import fit_head_to_targets

    pseudo = kmeans(F.normalize(features, dim=1), config.num_clusters, n_init=config.kmeans_restarts,
                    seed=config.seed).labels.to(features.device)
    last = fit_head_to_targets(model.heads[model.predict_head], features, pseudo, config.head_epochs, config.head_lr,
                               config.batch_size, generator)
    return pseudo, last


@torch.no_grad()
def cluster_labels(model: ClusteringModel, images, device: str) -> torch.Tensor:
    """ŷ_i: the argmax of the clustering branch on every real image (eval mode)."""
    from calibclust.train.data import embed_images, head_probabilities

    return head_probabilities(model, embed_images(model, images, device=device), model.predict_head).argmax(1)


def train_diffusion(net: ConditionalUNet, opt, schedule: NoiseSchedule, images, labels: torch.Tensor, epochs: int,
                    config: GCCConfig, generator: torch.Generator, precision, device: str, bar=None) -> float:
    """Eq. 6 for ``epochs`` passes over the real images under labels ŷ; the last epoch's mean loss."""
    n, batch, last = len(images), min(config.diffusion_batch_size, len(images)), float("nan")
    scaler = torch.amp.GradScaler(torch.device(device).type) if precision.grad_scaler else None  # fp16 GPUs
    net.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).numpy()
        total, seen = 0.0, 0
        for start in range(0, n - batch + 1, batch):  # full batches only: a last one of 3 images is noise
            idx = np.sort(order[start : start + batch])
            x0 = to_diffusion(torch.from_numpy(np.asarray(images[idx])), config.diffusion_size).to(device)
            with precision.autocast(torch.device(device)):
                loss = denoising_loss(net, schedule, x0, labels[idx].to(device), generator)
            opt.zero_grad(set_to_none=True)
            backward_and_step(loss, opt, scaler)
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            if bar is not None:
                bar.update(1)
        last = total / max(1, seen)
    net.eval()
    return last


def generate_pool(net: ConditionalUNet, schedule: NoiseSchedule, config: GCCConfig, image_size: tuple[int, int],
                  clusters: torch.Tensor, generator: torch.Generator, precision, device: str,
                  batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``pool_per_cluster`` generated images of each of ``clusters`` (the ones real images fall in:
    only those are ever paired) at the model's input size: uint8 (P, H, W, 3) and their labels (P,)."""
    per = int(config.setting("pool_per_cluster"))
    labels = clusters.cpu().repeat_interleave(per)
    images = []
    for start in range(0, len(labels), batch):
        part = labels[start : start + batch].to(device)
        x = sample(net, schedule, part, config.diffusion_size, generator,
                   autocast=lambda: precision.autocast(torch.device(device)))
        images.append(from_diffusion(x.cpu(), image_size))
    return torch.cat(images).numpy(), labels.numpy()


def pool_indices(pool_labels: np.ndarray, wanted: torch.Tensor, generator: torch.Generator) -> np.ndarray:
    """For each wanted label, a random pool image generated for it (with replacement)."""
    wanted = wanted.cpu().numpy()
    out = np.empty(len(wanted), dtype=np.int64)
    for k in np.unique(wanted):
        members = np.flatnonzero(pool_labels == k)
        rows = np.flatnonzero(wanted == k)
        out[rows] = members[torch.randint(0, len(members), (len(rows),), generator=generator).numpy()]
    return out


def stage_two_epoch(model: ClusteringModel, opt, images, labels: torch.Tensor, pool: np.ndarray,
                    pool_labels: np.ndarray, config: GCCConfig, generator: torch.Generator, device: str) -> dict:
    """One epoch of Eq. 12 over the real images under the round's labels ŷ (N,) (BatchNorm
    statistics frozen: eval mode; see the module docstring for both); the mean of each loss part."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    head = model.heads[model.predict_head]
    n, batch = len(images), min(config.batch_size, len(images))
    order = torch.randperm(n, generator=generator).numpy()
    sums: dict[str, float] = {}
    steps = 0
    for start in range(0, n - batch + 1, batch):
        idx = np.sort(order[start : start + batch])
        real = model.preprocess(torch.from_numpy(np.asarray(images[idx])).to(device))
        batch_labels = labels[idx].to(device)
        fake_idx = pool_indices(pool_labels, batch_labels, generator)
        fake = model.preprocess(torch.from_numpy(pool[fake_idx]).to(device))
        feats = model.embed(torch.cat([real, fake]))
        real_feat, fake_feat = feats[: len(idx)], feats[len(idx) :]
        loss, parts = gcc_loss(real_feat, batch_labels, fake_feat, head(fake_feat), batch_labels, config.num_clusters,
                               config.losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0)  # a safety net, rarely active: MMD gradients spike on tiny clusters
        opt.step()
        parts["loss"] = float(loss.detach())
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value
        steps += 1
    return {key: value / max(1, steps) for key, value in sums.items()}


def save_grid(images: np.ndarray, labels: np.ndarray, num_clusters: int, path, per_row: int = 10) -> None:
    """One row of generated images per cluster (the paper's Fig. 4c)."""
    from PIL import Image

    h, w = images.shape[1:3]
    grid = np.full((num_clusters * h, per_row * w, 3), 255, dtype=np.uint8)
    for k in range(num_clusters):
        rows = images[labels == k][:per_row]
        for j, image in enumerate(rows):
            grid[k * h : (k + 1) * h, j * w : (j + 1) * w] = image
    Image.fromarray(grid).save(path)


@dataclass
class GCCResult:
    model: ClusteringModel
    history: list[dict]  # one row per stage / round, with held-out figures when eval_data has labels
    seconds: dict[str, float]  # by stage
    pseudo_label_sizes: list[int] = field(default_factory=list)


def train_gcc(backbone: nn.Module, images, config: GCCConfig, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
              device: str = "cpu", progress: bool = False, eval_data=None, out_dir=None, log=None) -> GCCResult:
    """§3.4's flow on uint8 images (N, H, W, 3): trains ``backbone`` (in place) and a clustering head;
    ``eval_data`` (TrainingData with labels) is scored after each stage, never trained on."""
    from tqdm.auto import tqdm

    from calibclust.precision import training_precision
    from calibclust.train.data import embed_images, head_probabilities

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    seconds: dict[str, float] = {}
    history: list[dict] = []
    image_size = (int(images.shape[1]), int(images.shape[2]))
    model = ClusteringModel(backbone, config.num_clusters, config.head_hidden_dim, head_names=("clustering",),
                            predict_head="clustering", mean=tuple(mean), std=tuple(std)).to(device).eval()

    def record(stage: str, **values) -> None:
        row = {"stage": stage, **values}
        if eval_data is not None and eval_data.labels is not None:
            row.update(_score(model, eval_data, device))
        history.append(row)
        if log is not None:
            log(row)

    t0 = time.perf_counter()
    features = embed_images(model, images, device=device)
    pseudo, head_loss = train_head_on_kmeans(model, features, config, generator)
    seconds["stage1_head"] = time.perf_counter() - t0
    record("stage1", head_loss=head_loss)

    precision = training_precision(torch.device(device), amp=config.mixed_precision)
    schedule = NoiseSchedule.linear(int(config.setting("diffusion_steps")))
    net = ConditionalUNet(config.num_clusters, int(config.setting("unet_channels")), config.setting("unet_multipliers"),
                          int(config.setting("unet_blocks")), config.unet_dropout).to(device)
    g_opt = torch.optim.Adam(net.parameters(), lr=float(config.setting("diffusion_lr")))
    c_opt = torch.optim.Adam(model.parameters(), lr=float(config.setting("cluster_lr")))
    rounds = int(config.setting("rounds"))
    # G serves Stage II only: no rounds, no diffusion; the last round's labels train no later G.
    g_epochs = int(config.setting("diffusion_epochs")) if rounds else 0
    n_batches = max(1, len(images) // min(config.diffusion_batch_size, len(images)))
    bar = tqdm(total=n_batches * (g_epochs + max(0, rounds - 1) * config.diffusion_round_epochs),
               desc="GCC diffusion", unit="step", disable=not progress)
    seconds.update(diffusion=0.0, sampling=0.0, stage2=0.0)
    # ŷ for G: the backbone is as it was when ``features`` were computed, so no second pass.
    labels = head_probabilities(model, features, model.predict_head).argmax(1)
    if rounds:
        t0 = time.perf_counter()
        g_loss = train_diffusion(net, g_opt, schedule, images, labels, g_epochs, config, generator, precision, device,
                                 bar)
        seconds["diffusion"] = time.perf_counter() - t0
        record("diffusion", diffusion_loss=g_loss, precision=precision.label)
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        pool, pool_labels = generate_pool(net, schedule, config, image_size, labels.unique(), generator, precision,
                                          device)
        seconds["sampling"] += time.perf_counter() - t0
        if out_dir is not None:
            save_grid(pool, pool_labels, config.num_clusters, out_dir / f"generated_round{r}.png")
        # How often the clustering network puts a generated image in the cluster G drew it for.
        agreement_before = float((cluster_labels(model, pool, device).numpy() == pool_labels).mean())
        t0 = time.perf_counter()
        for epoch in range(config.cluster_epochs):
            parts = stage_two_epoch(model, c_opt, images, labels, pool, pool_labels, config, generator, device)
        seconds["stage2"] += time.perf_counter() - t0
        pool_agreement = float((cluster_labels(model, pool, device).numpy() == pool_labels).mean())
        row = {**(parts if config.cluster_epochs else {}), "pool_agreement_before": agreement_before,
               "pool_agreement": pool_agreement}
        if r < rounds:  # §3.4: G fine-tuned on the real images under the improved labels
            t0 = time.perf_counter()
            labels = cluster_labels(model, images, device)
            row["diffusion_loss"] = train_diffusion(net, g_opt, schedule, images, labels, config.diffusion_round_epochs,
                                                    config, generator, precision, device, bar)
            seconds["diffusion"] += time.perf_counter() - t0
        record(f"round{r}", **row)
    bar.close()
    model.eval()
    return GCCResult(model.cpu(), history, seconds, torch.bincount(pseudo.cpu(), minlength=config.num_clusters).tolist())


@torch.no_grad()
def _score(model: ClusteringModel, data, device: str) -> dict:
    from calibclust.train.data import embed_images, head_probabilities, heldout_figures

    probs = head_probabilities(model, embed_images(model, data.images, device=device), model.predict_head)
    return heldout_figures(probs, data.labels)


class GCCMethod(ClusteringMethod):
    """GCC on the method interface: :func:`train_gcc` with ``self.config`` on a copy of the backbone."""

    name = "gcc"
    config_class = GCCConfig

    def row_names(self) -> list[str]:
        return ["GCC"]

    def _fit(self, data, backbone, backbone_info, out_dir, eval_data, resume) -> None:
        mean, std = backbone_info["mean"], backbone_info["std"]
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)  # the generated images' grids go there while training
        with self._forked_rng():  # train_gcc seeds torch from the config
            result = train_gcc(backbone, data.images, self.config, mean=mean, std=std, device=self.device,
                               progress=self.progress, eval_data=eval_data, out_dir=out_dir)
        self.model = result.model.to(self.device).eval()
        self.metadata = self._single_head_metadata(
            data, backbone_info, {"kmeans_sizes": result.pseudo_label_sizes, "seconds": result.seconds,
                                  "history": result.history}, out_dir, result.history)
