"""Label-free shortcut check: do the clusters follow a trivial image statistic?

A clustering model can latch on a nuisance (ink colour, background colour, size of the drawing)
and still report high confidence; clustering by such a cue is a priori valid ("The Single-Noun
Prior for Image Clustering", Cohen & Hoshen), so no loss can rule it out, but a user must be told.
After training, a simple classifier (standardised multinomial logistic regression, 5-fold
cross-validated, scikit-learn) predicts the cluster ids from each group of trivial statistics
alone: per-channel mean colour, brightness, contrast, foreground area, aspect ratio of the
foreground. Its accuracy is reported chance-corrected, ``(acc - chance) / (1 - chance)`` with
chance the largest cluster's share: 0 is "explains nothing", 1 "predicts every cluster".

Threshold (measured on the data zoo, :mod:`calibclust.zoo`, train splits): clusterings by the true
class score at most 0.13 on every statistic group (digits, reframed digits, colour-nuisance digits,
letters in 268 fonts, emoji), and trained CDC models whose clusters follow the class at most 0.22
(letters: foreground area); on the colour-nuisance digits, CDC models whose clusters are at chance
(ACC 0.17-0.18) score 0.38-0.68 on mean colour, K-means on raw pixels 0.73 (0.85 on the emoji).
:data:`SHORTCUT_THRESHOLD` = 0.3 sits between 0.22 and 0.38.

Torch-free: numpy and scikit-learn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SHORTCUT_THRESHOLD = 0.3
MAX_IMAGES = 4000  # a random subset beyond this: the check stays a few seconds at any folder size
STATS_SIDE = 64  # images are box-filtered down to this side first: the statistics need no detail, and
# 4,000 float copies of 224-px images would take gigabytes
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma weights (the zoo uses them too)

ADVICE = {
    # Measured on the data zoo's nuisance-colour digits (held-out): stronger colour augmentation and
    # the colour presets left the clusters at chance; the gradient input filter reached ACC 0.76.
    "mean colour": "the features respond to colour, not shape; if colour is not what should separate the "
                   "clusters, pretrain again with --input-filter gradient (calibclust fit or pretrain): the "
                   "backbone then sees edges, blind to ink and paper colours",
    "brightness": "the clusters follow how light or dark the images are; if that is not what should separate "
                  "them, pretrain again with --input-filter gradient (blind to brightness by construction; "
                  "measured on colour only) or normalise brightness",
    "contrast": "the clusters follow image contrast; pretrain again with --input-filter gradient (blind to "
                "contrast by construction; measured on colour only) or train with stronger contrast augmentation",
    "foreground area": "the clusters follow how large the object is drawn; train with zoom-out (scale) "
                       "augmentation so that size does not decide the cluster",
    "aspect ratio": "the clusters follow the shape of the object's bounding box; check whether that is the "
                    "distinction you want",
}


def _at_most(images: np.ndarray, side: int) -> np.ndarray:
    """Box-filter uint8 ``(N, H, W, 3)`` images so that neither side exceeds ``side``."""
    n, h, w, _ = images.shape
    if max(h, w) <= side:
        return images
    from PIL import Image

    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(size, Image.BOX)) for im in images])


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Trivial per-image statistics of uint8 ``(N, H, W, 3)`` images, as ``{group: (N, d)}``.

    The foreground is what differs from the median of the border pixels by more than a quarter of
    the image's luma range (works for dark-on-light and light-on-dark)."""
    x = np.asarray(images, np.float32) / 255.0
    luma = x @ LUMA.astype(np.float32)
    border = np.concatenate([luma[:, 0, :], luma[:, -1, :], luma[:, :, 0], luma[:, :, -1]], axis=1)
    background = np.median(border, axis=1)
    spread = luma.max(axis=(1, 2)) - luma.min(axis=(1, 2)) + 1e-6
    foreground = np.abs(luma - background[:, None, None]) > 0.25 * spread[:, None, None]

    def extent(mask: np.ndarray) -> np.ndarray:  # rows (or columns) spanned by the foreground
        any_ = mask.any(axis=1)
        first = np.argmax(mask, axis=1)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        return np.where(any_, last - first + 1, 1)

    height, width = extent(foreground.any(axis=2)), extent(foreground.any(axis=1))
    return {
        "mean colour": x.mean(axis=(1, 2)),
        "brightness": luma.mean(axis=(1, 2))[:, None],
        "contrast": luma.std(axis=(1, 2))[:, None],
        "foreground area": foreground.mean(axis=(1, 2))[:, None],
        "aspect ratio": np.log(height / width)[:, None],
    }


@dataclass
class ShortcutCheck:
    """Chance-corrected cross-validated accuracy of predicting the clusters from each statistic."""

    explained: dict[str, float] = field(default_factory=dict)
    threshold: float = SHORTCUT_THRESHOLD
    n_images: int = 0

    @property
    def strongest(self) -> str | None:
        return max(self.explained, key=self.explained.get) if self.explained else None

    @property
    def fired(self) -> bool:
        return bool(self.explained) and self.explained[self.strongest] >= self.threshold

    @property
    def message(self) -> str | None:
        if not self.fired:
            return None
        name = self.strongest
        return (f"clusters follow {name}: a classifier that sees only each image's {name} predicts the cluster "
                f"(chance-corrected accuracy {self.explained[name]:.2f}, warning from {self.threshold:.2f}); "
                f"{ADVICE[name]}")

    def to_dict(self) -> dict:
        return {**asdict(self), "strongest": self.strongest, "fired": self.fired, "message": self.message}


def stored_shortcut_check(checkpoint) -> dict | None:
    """The check a trained model's checkpoint folder (``config.json``) carries in its metadata
    (CDC stores one; ``{"error": ...}`` when it failed), or None."""
    import json
    from pathlib import Path

    metadata = json.loads((Path(checkpoint) / "config.json").read_text()).get("metadata", {})
    return metadata.get("train_stats", {}).get("shortcut_check")


def shortcut_check(images: np.ndarray, clusters: np.ndarray, seed: int = 0,
                   threshold: float = SHORTCUT_THRESHOLD) -> ShortcutCheck:
    """Check whether ``clusters`` (ids per image) are predictable from trivial statistics of
    ``images``; see the module docstring. Needs no labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clusters = np.asarray(clusters)
    if len(images) > MAX_IMAGES:
        keep = np.sort(np.random.default_rng(seed).choice(len(images), MAX_IMAGES, replace=False))
        images, clusters = images[keep], clusters[keep]
    images = _at_most(images, STATS_SIDE)
    # Clusters too small to appear in every fold are left out (they cannot be cross-validated).
    ids, counts = np.unique(clusters, return_counts=True)
    kept = np.isin(clusters, ids[counts >= 5])
    images, clusters = images[kept], clusters[kept]
    if len(np.unique(clusters)) < 2:
        return ShortcutCheck({}, threshold, int(len(clusters)))
    chance = np.bincount(np.unique(clusters, return_inverse=True)[1]).max() / len(clusters)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    explained = {}
    for name, values in image_statistics(images).items():
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
        accuracy = float(cross_val_score(model, values, clusters, cv=folds).mean())
        explained[name] = round(float((accuracy - chance) / (1.0 - chance)), 4)
    return ShortcutCheck(explained, threshold, int(len(clusters)))
