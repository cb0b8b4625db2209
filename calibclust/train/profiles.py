"""The CPU profile: the settings ``calibclust fit``, the quick start and the benchmarks train with.

The configs' own defaults follow the papers (GPU scale: MoCo-v2's 4096-wide projector at batch 256,
CDC's 100 epochs at batch 1,000); this profile is what 2 CPU cores learn from in minutes, measured on
digits (the quick start) and the data zoo. One place, so ``fit`` and the benches that report its
figures cannot drift apart. Nothing here imports torch at module level.
"""

from __future__ import annotations

import hashlib

import numpy as np

# MoCo-v2 on the small backbone: small batches and a narrow projector learn in a few epochs; the
# paper's 4096-wide projector at batch 256 barely moves in that time.
PRETRAIN_BATCH, PRETRAIN_LR, PROJ_HIDDEN_DIM, PROJ_DIM = 64, 0.06, 512, 128
# CDC on the frozen backbone (measured on digits: ACC ~0.8, CDC-Cal ECE ~0.05 on its training images).
CDC_EPOCHS, CDC_BATCH, CDC_VIEWS, CDC_ORTH_STEPS, CDC_HIDDEN = 40, 300, 8, 500, 512
# CDC on a frozen backbone caches the features of its views (2 × views × images × D floats). Above
# 10,000 images fewer views per image keep that cache at ~80,000 views of each kind (D = 128: 80 MB):
# a large folder brings its variety in images rather than in views. Not measured at that scale.
MAX_CACHED_VIEWS = 80_000
# SPICE: `train compare`'s CPU example (batch 300, 20 neighbours), stage 2 shortened to
# SPICE_HEAD_EPOCHS passes (the paper's 100 took ~7 min for 1,610 digits on 2 cores with the authors'
# M-step schedule) and stage 3 to SPICE_JOINT_STEPS steps.
SPICE_HEAD_EPOCHS, SPICE_JOINT_STEPS, SPICE_NEIGHBORS = 30, 300, 20
# The share the quick start and the data zoo hold out, twice fit's default: ECE is a mean over 15
# confidence bins, and a set of ~1,800 images leaves ~180 at fit's 10 %, a handful per bin.
FIGURES_HELDOUT_FRACTION = 0.2


def heldout_by_path_hash(paths: list[str], fraction: float) -> np.ndarray:
    """True for the held-out files: a hash of each relative path below ``fraction`` (stable across
    runs, listing order and added files; about ``fraction`` of any folder). ``fit`` and the data
    zoo split by this one rule."""
    def unit(path: str) -> float:
        return int.from_bytes(hashlib.sha1(path.encode("utf-8")).digest()[:8], "big") / 2.0**64

    return np.array([unit(p) < fraction for p in paths], dtype=bool)


def pretrain_batch(n_train: int) -> int:
    return int(min(PRETRAIN_BATCH, max(2, n_train // 2)))


def cdc_batch(n_train: int) -> int:
    return int(min(CDC_BATCH, n_train))


def cdc_hidden(n_train: int) -> int:
    # Eq. 6's K-means over H prototypes needs at least H images; Tab. 6's H = 512 when there are.
    return int(min(CDC_HIDDEN, 2 ** int(np.log2(n_train))))


def cdc_views(n_train: int) -> int:
    return int(min(CDC_VIEWS, max(1, MAX_CACHED_VIEWS // max(1, n_train))))


def moco_config(epochs: int, n_train: int, seed: int = 0, device: str = "auto", backbone: str = "small",
                input_size: int = 32, batch_size: int | None = None, input_filter: str = "none"):
    """MoCo-v2 pretraining of the profile (``batch_size`` None: :func:`pretrain_batch`)."""
    from calibclust.pretrain import MoCoConfig

    return MoCoConfig(backbone=backbone, input_size=input_size, epochs=epochs, input_filter=input_filter,
                      batch_size=batch_size or pretrain_batch(n_train), lr=PRETRAIN_LR, proj_hidden_dim=PROJ_HIDDEN_DIM,
                      proj_dim=PROJ_DIM, seed=seed, device=device)


def cdc_config(clusters: int, n_train: int, seed: int = 0, batch_size: int | None = None, hidden_dim: int | None = None,
               num_views: int | None = None, epochs: int = CDC_EPOCHS):
    """CDC on the frozen backbone, sized to ``n_train`` images (or the sizes a saved plan fixed)."""
    from calibclust.augment.view_config import ViewConfig
    from calibclust.train.cdc_config import CDCConfig
    from calibclust.train.paper_settings import LR_BACKBONE

    batch = batch_size or cdc_batch(n_train)
    # Flips off: a mirrored image is not always the same class (digits, letters), and the
    # measurements behind these settings were made without them.
    return CDCConfig(num_clusters=clusters, epochs=epochs, batch_size=batch, sub_batch_size=max(2, batch // 2),
                     hidden_dim=hidden_dim or cdc_hidden(n_train), freeze_backbone=True,
                     num_views=num_views or cdc_views(n_train), orth_steps=CDC_ORTH_STEPS, lr_backbone=LR_BACKBONE["easy"],
                     views=ViewConfig(flip_p=0.0), seed=seed)


def spice_config(clusters: int, n_train: int, seed: int = 0, batch_size: int | None = None, num_views: int | None = None):
    """SPICE with the profile's shortened stages; no more cached views than CDC would keep."""
    from calibclust.train.spice_config import SpiceConfig

    return SpiceConfig(num_clusters=clusters, batch_size=batch_size or cdc_batch(n_train), num_neighbors=SPICE_NEIGHBORS,
                       head_epochs=SPICE_HEAD_EPOCHS, joint_steps=SPICE_JOINT_STEPS,
                       views=min(SpiceConfig.views, num_views or cdc_views(n_train)), seed=seed)


def dccm_config(clusters: int, seed: int = 0, views=None):
    """DCCM's CPU profile with the profile's views (``views`` None): no flips, as for CDC (DCCM's
    transformed copies are supervised with the originals' pseudo-labels, Eq. 12, so a mirrored digit
    would be taught to be the same digit); ``train compare`` passes the views its options chose."""
    from calibclust.augment.view_config import ViewConfig
    from calibclust.train.dccm import DCCMConfig

    return DCCMConfig(num_clusters=clusters, views=views if views is not None else ViewConfig(flip_p=0.0), seed=seed)
