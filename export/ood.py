"""Out-of-distribution scores computed inside the exported graph (higher = more OOD).

Four post-hoc scores, each an ``nn.Module`` mapping ``(logits (N, C), embedding (N, D) L2-normalised)``
to ``score (N,)`` so that the ONNX exporter traces it together with the model:

* ``msp`` – 1 − max softmax probability (Hendrycks & Gimpel, ICLR 2017, the baseline; the CDC paper
  uses the calibrated confidence for OOD detection, "Towards Calibrated Deep Clustering Network" appendix C.5).
* ``energy`` – −T·logsumexp(logits / T), T = 1 (Liu et al., NeurIPS 2020, Eq. 2 negated so that
  higher = OOD as everywhere here).
* ``prototype`` – 1 − max_c cos(z, μ_c): cosine distance of the embedding to the nearest cluster
  centroid μ_c (mean L2-normalised training embedding of the images predicted as c, re-normalised),
  carried in the graph as a (C, D) initializer.
* ``knn`` – Euclidean distance of the normalised embedding to its k-th nearest neighbour in a bank
  of normalised training embeddings (Sun et al., ICML 2022, "Deep nearest neighbors", §3), the bank
  a seeded random subsample of ``bank_size`` rows carried as an (M, D) initializer.

Which one is the export default was decided by :func:`compare_ood_scores` on digits (in-distribution)
versus letters / photo patches / noise (``calibclust export ood-compare``). Measured here with the
small backbone self-labelled on digits (:func:`calibclust.export.selflabel.pseudo_label_digits_model`,
150 steps, seed 0; fitted on 1,258 digits, tested on the 539 held-out digits vs 500 images of each
kind; AUROC / FPR@95%TPR):

==================  ===============  ===============  ===============  ==========
score               letters          photos           noise            mean AUROC
==================  ===============  ===============  ===============  ==========
msp                 0.5639 / 0.992   0.7308 / 0.862   0.2827 / 1.000   0.5258
energy              0.5956 / 0.998   0.6822 / 0.848   0.1225 / 1.000   0.4668
prototype           0.9968 / 0.002   0.9997 / 0.000   1.0000 / 0.000   0.9988
knn k=1             1.0000 / 0.000   1.0000 / 0.000   1.0000 / 0.000   1.0000
knn k=5 (default)   0.9999 / 0.000   1.0000 / 0.000   1.0000 / 0.000   1.0000
knn k=10            0.9999 / 0.000   1.0000 / 0.000   1.0000 / 0.000   1.0000
knn k=5, M=256      0.9985 / 0.002   1.0000 / 0.000   1.0000 / 0.000   0.9995
==================  ===============  ===============  ===============  ==========

Re-measured on a real CDC model (``calibclust train cdc`` on the digits folder, frozen random small
backbone with data BatchNorm statistics, 30 epochs, batch 500, 4 views, no flips; CDC-Cal ACC 52.8%,
ECE 8.4% — reported only): msp 0.5472 / 0.5117 / 0.3147 (mean 0.4579), energy 0.3740 / 0.3230 /
0.1507 (0.2826), prototype 1.0000 on all three, knn k=5 1.0000 on all three (k=1: photos 0.999996),
kNN with a 256-row bank 1.0000 (AUROC letters / photos / noise).

So ``knn`` (k = 5, bank 1,024) is the default (best on the self-labelled model, tied with
``prototype`` on the CDC model); ``prototype`` is nearly as good with a file ten times
smaller. Caveats: these OOD sets are easy for feature-space scores (the digits are upscaled 8×8
scans, the letters crisp font renders, so even the "near" set differs in style), and the logit-based
scores are only as good as the model's confidence — on this briefly trained model they are poor
(noise even gets *higher* confidence than digits). Re-measure on your model with
``calibclust export ood-compare --model MODEL_DIR``.

The threshold stored in the metadata is the score's 95th percentile over the training images
(95% in-distribution acceptance, "TPR" in the OOD literature); for ``knn`` each training image that
sits in the bank is scored against the bank without itself (leave-one-out), so its own copy does
not pull the threshold to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

OOD_SCORES = ("msp", "energy", "prototype", "knn")
DEFAULT_OOD_SCORE = "knn"


class OODScore(nn.Module):
    """Base: ``fit`` on training logits/embeddings, ``forward`` inside the graph."""

    name = ""

    def fit(self, logits: torch.Tensor, embedding: torch.Tensor, generator: torch.Generator) -> "OODScore":
        return self

    def params(self) -> dict:
        return {}

    def training_scores(self, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Scores of the images ``fit`` saw, for the threshold (overridden where self-matches bias it)."""
        return self(logits, embedding)


class MSPScore(OODScore):
    name = "msp"

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.softmax(logits, dim=1).amax(dim=1)


class EnergyScore(OODScore):
    name = "energy"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return -t * torch.logsumexp(logits / t, dim=1)

    def params(self) -> dict:
        return {"temperature": self.temperature}


class PrototypeScore(OODScore):
    name = "prototype"

    def __init__(self, num_clusters: int = 1, dim: int = 1):
        super().__init__()
        self.register_buffer("centroids", torch.zeros(num_clusters, dim))

    def fit(self, logits, embedding, generator):
        labels = logits.argmax(1)
        rows = []
        for c in range(logits.shape[1]):
            members = embedding[labels == c]
            if len(members):  # a cluster nobody falls into has no prototype (and cannot be nearest)
                rows.append(members.mean(0))
        centroids = torch.stack(rows)
        self.centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self

    def forward(self, logits, embedding):  # (N, D) @ (D, C') -> (N,)
        return 1.0 - (embedding @ self.centroids.T).amax(dim=1)

    def params(self) -> dict:
        return {"num_prototypes": int(self.centroids.shape[0])}


class KNNScore(OODScore):
    name = "knn"

    def __init__(self, k: int = 5, bank_size: int = 1024, dim: int = 1):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.bank_size = int(k), int(bank_size)
        self.register_buffer("bank", torch.zeros(max(k, 1), dim))
        self._bank_index: torch.Tensor | None = None

    def fit(self, logits, embedding, generator):
        n = embedding.shape[0]
        if n <= self.k:
            raise ValueError(f"kNN OOD score with k={self.k} needs more than {self.k} training images, got {n}")
        size = min(self.bank_size, n)
        self._bank_index = torch.randperm(n, generator=generator)[:size].sort().values
        self.bank = embedding[self._bank_index].clone()
        return self

    def _kth_distance(self, embedding: torch.Tensor, k: int) -> torch.Tensor:
        sim = embedding @ self.bank.T  # (N, M) cosine similarities of unit vectors
        kth = torch.topk(sim, k, dim=1).values[:, k - 1]
        # ||a - b|| = sqrt(2 - 2 cos) for unit vectors; clamp keeps rounding from going negative.
        return torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))

    def forward(self, logits, embedding):
        return self._kth_distance(embedding, min(self.k, self.bank.shape[0]))

    def training_scores(self, logits, embedding):
        scores = self._kth_distance(embedding, min(self.k, self.bank.shape[0]))
        if self._bank_index is not None and len(self._bank_index) > self.k:
            # Leave-one-out for bank members: their nearest "neighbour" is themselves.
            inside = self._bank_index
            scores[inside] = self._kth_distance(embedding[inside], self.k + 1)
        return scores

    def params(self) -> dict:
        return {"k": self.k, "bank_size": int(self.bank.shape[0])}


def build_ood_score(name: str, num_clusters: int, dim: int, k: int = 5, bank_size: int = 1024, temperature: float = 1.0) -> OODScore:
    if name == "msp":
        return MSPScore()
    if name == "energy":
        return EnergyScore(temperature)
    if name == "prototype":
        return PrototypeScore(num_clusters, dim)
    if name == "knn":
        return KNNScore(k, bank_size, dim)
    raise ValueError(f"unknown OOD score {name!r}; choose from {', '.join(OOD_SCORES)}")


def fit_threshold(training_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Smallest observed score that accepts at least ``tpr`` of the training images (score ≤ t)."""
    scores = np.sort(np.asarray(training_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no training scores to fit an OOD threshold on")
    index = min(scores.size - 1, int(np.ceil(tpr * scores.size)) - 1)
    return float(scores[max(index, 0)])


# --- running a model over uint8 batches --------------------------------------------------------
@torch.inference_mode()
def logits_and_embeddings(model, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicting-head logits (N, C) and L2-normalised embeddings (N, D) of uint8 NHWC images."""
    model.eval()
    logits, embeddings = [], []
    for start in range(0, len(images), batch_size):
        x = model.preprocess(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))
        z = model.embed(x)
        logits.append(model.head_logits(z))
        embeddings.append(nn.functional.normalize(z, dim=1))
    return torch.cat(logits), torch.cat(embeddings)


# --- measuring the scores ------------------------------------------------------------------------
@dataclass
class OODComparison:
    """AUROC / FPR@95%TPR of every score against every OOD set (ID test images held out from fitting)."""

    rows: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # score -> ood kind -> metrics
    n_fit: int = 0
    n_test: int = 0

    def mean_auroc(self, score: str) -> float:
        return float(np.mean([m["auroc"] for m in self.rows[score].values()]))

    def best(self) -> str:
        return max(self.rows, key=self.mean_auroc)

    def table(self) -> str:
        kinds = list(next(iter(self.rows.values())))
        head = f"{'score':<14}" + "".join(f"{k + ' AUROC/FPR95':>24}" for k in kinds) + f"{'mean AUROC':>12}"
        lines = [head, "-" * len(head)]
        for score, per_kind in self.rows.items():
            cells = "".join(f"{per_kind[k]['auroc']:>15.4f} / {per_kind[k]['fpr95']:<6.3f}" for k in kinds)
            lines.append(f"{score:<14}{cells}{self.mean_auroc(score):>12.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "n_fit": self.n_fit, "n_test": self.n_test, "best": self.best()}


def compare_ood_scores(
    model,
    id_images: np.ndarray,
    ood_sets: dict[str, np.ndarray],
    variants: dict[str, dict] | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> OODComparison:
    """Fit every score on part of the in-distribution images, evaluate on the rest vs each OOD set.

    ``variants`` maps a row name to ``build_ood_score`` keyword arguments (``name`` required), so
    several k / bank sizes can be compared; by default the four scores with their export defaults.
    """
    from calibclust.metrics import ood_metrics

    variants = variants or {name: {"name": name} for name in OOD_SCORES}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(id_images))
    n_test = int(round(test_fraction * len(id_images)))
    test_idx, fit_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    logits, emb = logits_and_embeddings(model, id_images)
    ood_outputs = {kind: logits_and_embeddings(model, imgs) for kind, imgs in ood_sets.items()}
    result = OODComparison(n_fit=len(fit_idx), n_test=len(test_idx))
    for row, kwargs in variants.items():
        kwargs = dict(kwargs)
        scorer = build_ood_score(kwargs.pop("name"), logits.shape[1], emb.shape[1], **kwargs)
        scorer.fit(logits[fit_idx], emb[fit_idx], torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            s_in = scorer(logits[test_idx], emb[test_idx]).numpy()
            result.rows[row] = {}
            for kind, (lo, em) in ood_outputs.items():
                m = ood_metrics(s_in, scorer(lo, em).numpy())
                result.rows[row][kind] = {"auroc": m.auroc, "fpr95": m.fpr95, "aupr_out": m.aupr_out}
    return result
