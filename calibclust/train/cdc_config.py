"""CDC's settings (:class:`CDCConfig`), torch-free: ``calibclust train cdc`` builds its options
from these fields when the command line is read, before torch is loaded. Training is
:mod:`calibclust.train.cdc` (which exports the same class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from calibclust.augment.view_config import ViewConfig
from calibclust.config import Config
from calibclust.train.paper_settings import BATCH_PER_MINICLUSTER, LR_BACKBONE

HEAD_MODES = ("dual", "clu", "clu+cal")
INIT_MODES = ("prototype", "random")
DIFFICULTIES = ("easy", "hard")
MINICLUSTER_NORMS = ("l2", "l1")


@dataclass
class CDCConfig(Config):
    """CDC hyper-parameters; defaults are the paper's (section / equation in each comment)."""

    TITLE: ClassVar[str] = "CDC configuration"
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"epochs"})  # a finished run can be extended

    num_clusters: int = 10  # C, predefined number of clusters (§3 "Notation")
    epochs: int = 100  # §4.1 "Implementation Details"
    batch_size: int = 1000  # B (§4.1: 1,000 for CIFAR-10/20 and STL-10)
    sub_batch_size: int = 500  # B_s (Algorithm 1; authors' configs: 500 for B = 1,000)
    mini_clusters: int | None = None  # K (Eq. 1); None → B // BATCH_PER_MINICLUSTER[difficulty]
    difficulty: str = "easy"  # rule of thumb for K (Tab. 5, appendix B.5)
    top_size: int | None = None  # |TOP(c)| in Eq. 4; None → ⌊B/C⌋ (authors' configs)
    hidden_dim: int = 512  # H (Tab. 6)
    lr_backbone: float | None = None  # Adam, encoder (§4.1); None → LR_BACKBONE[difficulty]
    lr_heads: float = 1e-4  # Adam, MLP heads (§4.1)
    weight_decay: float = 0.0  # authors' configs
    w_en: float = 1.0  # weight of L_en (Eq. 3)
    select: str = "cdc"  # pseudo-label selection: "cdc" (Eq. 4) | "fixed:T" (Tab. 2-II)
    heads: str = "dual"  # "dual" | "clu" (Tab. 2-III) | "clu+cal" (Tab. 2-IV)
    stop_gradient: bool = True  # §3.1 Remark; False = Tab. 2-V
    init: str = "prototype"  # §3.3 prototype initialisation | "random" (Tab. 2-I "w/o Init")
    init_kmeans_restarts: int = 3  # K-means restarts for Eq. 6 (k-means++ seeding)
    orth_steps: int = 2000  # prototype separation steps (authors' orth_train: 2,000 SGD steps)
    orth_scale: float = 5.0  # cosine-logit scale in the separation loss (authors' code)
    orth_lr: float = 0.1  # SGD lr (momentum 0.9, wd 1e-4, cosine schedule; authors' code)
    minicluster_restarts: int = 3  # K-means restarts for the mini-clusters of Eq. 1
    minicluster_norm: str = "l2"  # features' normalisation before that K-means: "l2" | "l1" (authors' code)
    minicluster_iters: int = 50
    freeze_backbone: bool = False  # train heads only, on cached view features
    num_views: int = 8  # frozen mode: cached weak and strong views per image
    recalibrate_bn: str = "auto"  # "auto" (random-init backbones only) | "yes" | "no"
    views: ViewConfig = field(default_factory=ViewConfig)
    seed: int = 0
    eval_batch_size: int = 512

    def problems(self) -> list[str]:
        problems = []
        if self.num_clusters < 2:
            problems.append(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2 or self.sub_batch_size < 2:
            problems.append("batch_size and sub_batch_size must be >= 2 (BatchNorm needs two samples)")
        if self.sub_batch_size > self.batch_size:
            problems.append(f"sub_batch_size {self.sub_batch_size} exceeds batch_size {self.batch_size}")
        if self.heads not in HEAD_MODES:
            problems.append(f"heads must be one of {HEAD_MODES}, got {self.heads!r}")
        if self.init not in INIT_MODES:
            problems.append(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.difficulty not in DIFFICULTIES:
            problems.append(f"difficulty must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        if self.minicluster_norm not in MINICLUSTER_NORMS:
            problems.append(f"minicluster_norm must be one of {MINICLUSTER_NORMS}, got {self.minicluster_norm!r}")
        if self.recalibrate_bn not in ("auto", "yes", "no"):
            problems.append(f"recalibrate_bn must be auto, yes or no, got {self.recalibrate_bn!r}")
        if self.mini_clusters is not None and not 1 <= self.mini_clusters <= self.batch_size:
            problems.append(f"mini_clusters must be in [1, batch_size], got {self.mini_clusters}")
        if self.num_views < 1:
            problems.append(f"num_views must be >= 1, got {self.num_views}")
        from calibclust.train.selection import build_strategy  # imports torch: only when a config is built

        try:
            build_strategy(self.select)
        except ValueError as exc:
            problems.append(str(exc))
        return problems

    # Values that depend on the data size are resolved against the effective batch size.
    def effective_batch_size(self, n_images: int) -> int:
        return max(2, min(self.batch_size, n_images))

    def resolved_mini_clusters(self, batch: int) -> int:
        if self.mini_clusters is not None:
            return min(self.mini_clusters, batch)
        return max(1, min(batch, batch // BATCH_PER_MINICLUSTER[self.difficulty]))

    def resolved_lr_backbone(self) -> float:
        return self.lr_backbone if self.lr_backbone is not None else LR_BACKBONE[self.difficulty]

    def resolved_top_size(self, batch: int) -> int:
        return self.top_size if self.top_size is not None else max(1, batch // self.num_clusters)
