"""SPICE's settings (:class:`SpiceConfig`) and stage 3's named schedules, torch-free:
``calibclust train spice`` builds its options from these fields when the command line is read,
before torch is loaded. Training is :mod:`calibclust.train.spice` (which re-exports ``SpiceConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from calibclust.config import Config


@dataclass
class SpiceConfig(Config):
    """SPICE settings; defaults are the paper's ("SPICE: Semantic Pseudo-Labeling for Image Clustering" §IV-B) unless noted."""

    TITLE: ClassVar[str] = "SPICE configuration"

    num_clusters: int = 10
    # --- stage 2 (SPICE_s, §III-B) ---
    n_heads: int = 10  # heads trained at once; best by minimum loss (§III-B Remark)
    hidden_dim: int = 512  # two-layer head, D → 512 → K (§IV-B)
    # The authors' head has no BatchNorm (D → 512 → ReLU → K). Ours keeps it: held-out SPICE_s ACC
    # (30 epochs, --fast zoo backbones, seeds 0/1), BN vs none: digits 0.842/0.800 vs 0.685/0.713,
    # letters in many fonts 0.543/0.500 vs 0.468/0.528, reframed digits 0.321/0.310 vs 0.296/0.285.
    # Its E-step scores in eval mode; with the authors' M-step (≥ 8 Adam steps per E-step) the
    # running statistics have seen 8 batches since the last E-step, so they are not stale.
    head_batchnorm: bool = True
    batch_size: int = 1000  # M (§IV-B)
    score_batch_size: int | None = None  # authors' code: E-step scores a "big batch" (5,000–10,000); None = M
    top_fraction: float = 1.0  # prototype from top·M/K rows (Eq. 2 = 1.0; authors' code 0.5)
    overlap: bool = True  # overlap assignment (Eq. 4, Fig. 4; preferred in §IV-F2)
    head_lr: float = 0.005  # Adam (§IV-B)
    head_epochs: int = 100  # passes over the data of stage 2
    # Authors' code: after each E-step, num_repeat = 8 passes over the selected rows in sub-batches
    # of train_sub_batch_size = 128, one Adam step each; None = each pass is one step on all of them.
    mstep_batch_size: int | None = 128
    mstep_repeats: int = 8
    # --- stage 3 (SPICE, §III-C) ---
    num_neighbors: int = 100  # N_s (§IV-B)
    reliable_threshold: float = 0.95  # λ (Eq. 7, §IV-B)
    reliable_min_confidence: float | None = None  # authors' code: 0.99
    reliable_balance: bool = False  # authors' code: subsample each cluster to the smallest
    reliable_fallback: str = "top"  # empty cluster: top | none | error (see ReliableSelection)
    joint: bool = True  # run stage 3 at all
    joint_threshold: float = 0.95  # η (Eq. 8, §IV-B)
    joint_lr: float = 0.03  # SGD (§IV-B)
    joint_momentum: float = 0.9  # FixMatch's SGD (Nesterov)
    joint_weight_decay: float = 5e-4  # §IV-B
    joint_steps: int = 2000  # cosine schedule length; the paper's run is far longer, reduce on CPU
    # The model kept is an exponential moving average of the trained weights, as the authors'
    # FixMatch code evaluates (decay 0.999); 0 keeps the last step's weights.
    joint_ema: float = 0.999
    labeled_batch: int = 64  # L per step (FixMatch B)
    unlabeled_ratio: int = 7  # U = ratio · L (FixMatch μ)
    # --- shared ---
    views: int = 4  # cached weak/strong views per image for frozen-feature stage 2
    seed: int = 0

    def problems(self) -> list[str]:
        problems = []
        if self.num_clusters < 2:
            problems.append(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.n_heads < 1 or self.batch_size < self.num_clusters:
            problems.append("n_heads must be >= 1 and batch_size >= num_clusters")
        if (self.mstep_batch_size is not None and self.mstep_batch_size < 2) or self.mstep_repeats < 1:
            problems.append("mstep_batch_size must be >= 2 (BatchNorm) or None, and mstep_repeats >= 1")
        if not 0 < self.top_fraction <= 1:
            problems.append(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if not 0 <= self.reliable_threshold < 1 or not 0 <= self.joint_threshold <= 1:
            problems.append("reliable_threshold must be in [0, 1) and joint_threshold in [0, 1]")
        if not 0 <= self.joint_ema < 1:
            problems.append(f"joint_ema must be in [0, 1), got {self.joint_ema}")
        return problems


# Stage 3's schedule by name. "cpu" (the default) is our reduction: 2,000 steps of 64 reliable +
# 448 unlabelled images, a few minutes of a CPU on small images; "paper" is §IV-B's, 16 reliable +
# 112 unlabelled images per step for 1,048,576 steps (FixMatch's), days of GPU time.
JOINT_SCHEDULES: dict[str, dict[str, int]] = {
    "cpu": {"joint_steps": 2000, "labeled_batch": 64, "unlabeled_ratio": 7},
    "paper": {"joint_steps": 1_048_576, "labeled_batch": 16, "unlabeled_ratio": 7},
}
