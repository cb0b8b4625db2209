"""SPICE and SPC pseudo-label selection, registered on the seam of :mod:`calibclust.train.selection`.

* ``spice-prototype`` — SPICE's prototype pseudo-labelling ("SPICE: Semantic Pseudo-Labeling for Image Clustering" §III-B, Eq. 2–4,
  Fig. 4): top-T confident rows per cluster on the weak view → prototypes in embedding space →
  the M/K rows nearest (cosine) to each prototype get that cluster's label. With the *overlap*
  assignment (the paper's choice, §IV-F2) one row may carry several labels, so the returned
  :class:`Selection` may hold a row more than once (one entry per (row, label) pair).
* ``spice-reliable`` — SPICE's reliable pseudo-labelling (§III-C, Eq. 6–7): keep rows whose
  predicted label is shared by more than λ of their N_s nearest neighbours; optional authors'-code
  extras (max-probability > 0.99, per-cluster subsampling to the smallest cluster) and a fallback
  for clusters that keep nothing.
* ``agreement`` — SPC's ensemble agreement ("Selective Pseudo-Label Clustering" §3): rows whose label is the same in
  every ensemble member after Hungarian alignment to a reference member.

Importing this module registers the three strategies (``calibclust.train.spice`` imports it).
No strategy sees ground-truth labels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from calibclust.train.selection import Selection, SelectionInputs, register_strategy


class SelectionWarning(UserWarning):
    """A selection strategy had to deviate from its rule (e.g. a cluster kept no sample)."""


def knn_indices(embeddings: torch.Tensor, k: int, chunk_size: int = 4096) -> torch.Tensor:
    """(N, k) indices of each row's k nearest other rows by cosine similarity (self excluded),
    from the shared chunked miner :func:`calibclust.embed.knn_neighbours` (torch backend, so the
    result does not depend on whether faiss is installed)."""
    from calibclust.embed import knn_neighbours

    n = embeddings.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < N={n} neighbours, got k={k}")
    idx, _ = knn_neighbours(embeddings.float(), k, chunk=chunk_size, exclude_self=True, backend="torch", normalize=True)
    return torch.as_tensor(idx, dtype=torch.long, device=embeddings.device)


# --- SPICE prototype pseudo-labelling (Eq. 2–4) ---------------------------------------------------
@dataclass
class PrototypeSelection:
    """SPICE's E-step ("SPICE: Semantic Pseudo-Labeling for Image Clustering" §III-B, Algorithm 1).

    ``per_cluster`` = M/K rows labelled per cluster (None → ⌊N/C⌋ of the batch at hand).
    ``top_fraction``: the prototype of cluster k averages the ``top_fraction``·M/K rows with the
    largest p[:, k] (Eq. 2 uses 1.0; the authors' code uses 0.5 — ``SpiceConfig`` picks).
    ``overlap``: True = overlap assignment (Eq. 4 as in Fig. 4, the paper's choice); False =
    non-overlap, each row gets at most one label and a cluster whose nearest rows were taken
    reaches further out (the dashed circle of Fig. 4).
    Needs ``inputs.embeddings`` (the features f_i of the same rows).
    """

    per_cluster: int | None = None
    top_fraction: float = 1.0
    overlap: bool = True
    name: str = "spice-prototype"

    def __post_init__(self):
        if self.per_cluster is not None and self.per_cluster < 1:
            raise ValueError(f"per_cluster must be >= 1, got {self.per_cluster}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")

    def _sizes(self, n: int, c: int) -> tuple[int, int]:
        m = self.per_cluster if self.per_cluster is not None else n // c
        m = max(1, min(m, n))
        return m, max(1, int(round(self.top_fraction * m)))

    def prototypes(self, probs: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top rows per cluster (C, T) — Eq. 2, prototypes (C, D) — Eq. 3)."""
        _, top = self._sizes(*probs.shape)
        top_idx = torch.argsort(probs, dim=0, descending=True, stable=True)[:top].T  # (C, T)
        protos = embeddings.float()[top_idx].mean(1)  # γ_k = mean of the selected f_i (Eq. 3)
        return top_idx, protos

    def select(self, inputs: SelectionInputs) -> Selection:
        if inputs.embeddings is None:
            raise ValueError("spice-prototype selection needs inputs.embeddings")
        probs, emb = inputs.probs, inputs.embeddings
        n, c = probs.shape
        m, _ = self._sizes(n, c)
        _, protos = self.prototypes(probs, emb)
        sim = F.normalize(emb.float(), dim=1) @ F.normalize(protos, dim=1).T  # (N, C) cosine
        if self.overlap:
            # Eq. 4: each cluster labels its M/K nearest rows, whatever other clusters took.
            near = torch.argsort(sim, dim=0, descending=True, stable=True)[:m].T  # (C, m)
            rows = near.flatten()
            labels = torch.arange(c, device=probs.device).repeat_interleave(m)
            order = torch.argsort(rows * c + labels, stable=True)  # sorted by row, then label
            return Selection(rows[order], labels[order], n, c)
        # Non-overlap: greedy over (row, cluster) pairs by similarity, a row taken once and a
        # cluster filled up to M/K.
        flat = torch.argsort(sim.flatten(), descending=True, stable=True).tolist()
        taken = torch.full((n,), -1, dtype=torch.long)
        filled = [0] * c
        remaining = min(n, m * c)
        for f in flat:
            if remaining == 0:
                break
            row, k = divmod(f, c)
            if taken[row] < 0 and filled[k] < m:
                taken[row] = k
                filled[k] += 1
                remaining -= 1
        taken = taken.to(probs.device)
        return Selection.from_mask(taken >= 0, taken, c)

    def describe(self) -> str:
        m = "⌊N/C⌋" if self.per_cluster is None else str(self.per_cluster)
        mode = "overlap" if self.overlap else "non-overlap"
        return f"spice-prototype (Eq. 2–4, M/K={m}, top fraction {self.top_fraction:g}, {mode})"


# --- SPICE reliable pseudo-labelling (Eq. 6–7) ----------------------------------------------------
@dataclass
class ReliableSelection:
    """SPICE's reliable pseudo-labels ("SPICE: Semantic Pseudo-Labeling for Image Clustering" §III-C; defaults §IV-B).

    y_j^s = argmax p_j; r_j = fraction of the N_s nearest neighbours (cosine, in embedding space)
    with the same label (Eq. 6); keep r_j > λ (Eq. 7).

    The authors' code adds: max p_j > ``min_confidence`` (0.99 there; None = off here, as in the
    paper) and ``balance`` = subsample every cluster to the size of the smallest one. If a cluster
    keeps no row — a failure their users report (empty cluster → crash/collapse in joint
    training) — a :class:`SelectionWarning` says which, and with ``fallback="top"`` the
    ``fallback_count`` rows predicted in that cluster with the highest (r_j, confidence) are kept
    instead (``fallback="none"`` leaves it empty, ``"error"`` raises). ``report`` holds the counts
    of the last call.

    Needs ``inputs.embeddings`` or ``inputs.extra["neighbors"]`` ((N, ≥N_s) neighbour indices,
    e.g. from :func:`knn_indices`). Meant for the whole dataset, not one batch.
    """

    num_neighbors: int = 100  # N_s (§IV-B)
    threshold: float = 0.95  # λ (§IV-B)
    min_confidence: float | None = None
    balance: bool = False
    fallback: str = "top"
    fallback_count: int | None = None  # None → the smallest non-empty cluster's size (≥ 1)
    seed: int = 0
    name: str = "spice-reliable"
    report: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {self.num_neighbors}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold λ must be in [0, 1), got {self.threshold}")
        if self.fallback not in ("top", "none", "error"):
            raise ValueError(f"fallback must be top|none|error, got {self.fallback!r}")

    def ratios(self, labels: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """Eq. 6: r_j for every row, from (N,) labels and (N, N_s) neighbour indices."""
        return (labels[neighbors] == labels[:, None]).float().mean(1)

    def select(self, inputs: SelectionInputs) -> Selection:
        probs = inputs.probs
        n, c = probs.shape
        nbrs = inputs.extra.get("neighbors")
        if nbrs is None:
            if inputs.embeddings is None:
                raise ValueError("spice-reliable selection needs inputs.embeddings or extra['neighbors']")
            nbrs = knn_indices(inputs.embeddings, min(self.num_neighbors, n - 1))
        nbrs = nbrs[:, : self.num_neighbors].to(probs.device)
        conf, labels = probs.max(1)
        r = self.ratios(labels, nbrs)
        keep = r > self.threshold  # Eq. 7
        if self.min_confidence is not None:
            keep &= conf > self.min_confidence
        counts = torch.bincount(labels[keep], minlength=c)
        empty = [k for k in range(c) if counts[k] == 0]
        fallback_used: dict[int, int] = {}
        if empty:
            msg = (
                f"spice-reliable: cluster(s) {empty} kept no reliable sample "
                f"(r > λ={self.threshold:g}, N_s={nbrs.shape[1]}"
                + (f", max prob > {self.min_confidence:g}" if self.min_confidence is not None else "")
                + "); "
            )
            if self.fallback == "error":
                raise ValueError(msg + "lower --reliable-threshold / --neighbors, or use fallback=top")
            if self.fallback == "top":
                nonzero = counts[counts > 0]
                quota = self.fallback_count or (int(nonzero.min()) if nonzero.numel() else 1)
                for k in empty:
                    rows = torch.nonzero(labels == k).flatten()
                    if rows.numel() == 0:
                        continue  # no row is even predicted as k: nothing to fall back on
                    # Rank by r_j, ties by confidence (r is a multiple of 1/N_s, conf < 1).
                    score = r[rows].double() + conf[rows].double() / (nbrs.shape[1] + 1)
                    pick = rows[torch.argsort(score, descending=True, stable=True)[:quota]]
                    keep[pick] = True
                    fallback_used[k] = int(pick.numel())
                still = [k for k in empty if k not in fallback_used]
                msg += f"kept the {quota} most consistent predicted rows of each instead"
                if still:
                    msg += f"; cluster(s) {still} are predicted for no row at all and stay empty"
            else:
                msg += "left empty (fallback=none)"
            warnings.warn(msg, SelectionWarning, stacklevel=2)
        if self.balance:
            keep = self._balance(keep, labels, c)
        sel = Selection.from_mask(keep, labels, c)
        self.report = {
            "ratios": r,
            "kept_per_cluster": sel.counts().tolist(),
            "empty_clusters": empty,
            "fallback": fallback_used,
            "num_selected": len(sel),
        }
        return sel

    def _balance(self, keep: torch.Tensor, labels: torch.Tensor, c: int) -> torch.Tensor:
        counts = torch.bincount(labels[keep], minlength=c)
        nonzero = counts[counts > 0]
        if nonzero.numel() == 0:
            return keep
        size = int(nonzero.min())
        g = torch.Generator().manual_seed(self.seed)
        out = torch.zeros_like(keep)
        for k in range(c):
            rows = torch.nonzero(keep & (labels == k)).flatten()
            if rows.numel():
                out[rows[torch.randperm(rows.numel(), generator=g)[:size].to(rows.device)]] = True
        return out

    def describe(self) -> str:
        extra = f", max prob > {self.min_confidence:g}" if self.min_confidence is not None else ""
        extra += ", balanced" if self.balance else ""
        return f"spice-reliable (Eq. 6–7, N_s={self.num_neighbors}, λ={self.threshold:g}{extra}, fallback {self.fallback})"


# --- SPC ensemble agreement ----------------------------------------------------------------------
def align_labels(reference: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Relabel ``labels`` so they match ``reference`` as well as possible (Hungarian algorithm on
    the C×C co-occurrence counts; "Selective Pseudo-Label Clustering" §3, the "direct" consensus method)."""
    from scipy.optimize import linear_sum_assignment

    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, reference), 1)
    rows, cols = linear_sum_assignment(-counts)
    mapping = np.empty(num_classes, dtype=np.int64)
    mapping[rows] = cols
    return mapping[labels]


@dataclass
class EnsembleAgreement:
    """SPC's selection ("Selective Pseudo-Label Clustering" §3): a row is selected if every ensemble member gives
    it the same cluster after aligning each member's argmax labels to member ``reference`` by the
    Hungarian algorithm; its pseudo label is that (reference-numbered) cluster.
    Needs ``inputs.ensemble_probs`` (M, N, C)."""

    reference: int = 0
    name: str = "agreement"

    def aligned_labels(self, ensemble_probs: torch.Tensor) -> torch.Tensor:
        """(M, N) argmax labels of every member in the reference member's numbering."""
        m, _, c = ensemble_probs.shape
        if not 0 <= self.reference < m:
            raise ValueError(f"reference member {self.reference} out of range for {m} members")
        raw = ensemble_probs.argmax(2).cpu().numpy()
        ref = raw[self.reference]
        out = np.stack([ref if i == self.reference else align_labels(ref, raw[i], c) for i in range(m)])
        return torch.from_numpy(out).to(ensemble_probs.device)

    def select(self, inputs: SelectionInputs) -> Selection:
        ens = inputs.ensemble_probs
        if ens is None:
            raise ValueError("agreement selection needs inputs.ensemble_probs (M, N, C)")
        if ens.ndim != 3 or ens.shape[1:] != inputs.probs.shape:
            raise ValueError(f"ensemble_probs must be (M, N, C) matching probs, got {tuple(ens.shape)}")
        aligned = self.aligned_labels(ens)
        agree = (aligned == aligned[:1]).all(0)
        return Selection.from_mask(agree, aligned[0], ens.shape[2])

    def describe(self) -> str:
        return f"agreement (SPC, Hungarian-aligned to member {self.reference})"


@register_strategy("spice-prototype", "SPICE prototype pseudo-labels (Eq. 2–4); per_cluster=, top_fraction=, overlap=")
def _spice_prototype(per_cluster: int | None = None, top_fraction: float = 1.0, overlap: bool = True) -> PrototypeSelection:
    return PrototypeSelection(per_cluster=per_cluster, top_fraction=float(top_fraction), overlap=bool(overlap))


@register_strategy(
    "spice-reliable",
    "SPICE reliable pseudo-labels (Eq. 6–7); num_neighbors=100, threshold=0.95, min_confidence=, balance=, fallback=top|none|error",
)
def _spice_reliable(
    num_neighbors: int = 100,
    threshold: float = 0.95,
    min_confidence: float | None = None,
    balance: bool = False,
    fallback: str = "top",
    fallback_count: int | None = None,
    seed: int = 0,
) -> ReliableSelection:
    return ReliableSelection(
        num_neighbors=int(num_neighbors),
        threshold=float(threshold),
        min_confidence=None if min_confidence is None else float(min_confidence),
        balance=bool(balance),
        fallback=str(fallback),
        fallback_count=fallback_count,
        seed=int(seed),
    )


@register_strategy("agreement", "SPC ensemble agreement after Hungarian alignment; reference=0")
def _agreement(reference: int = 0) -> EnsembleAgreement:
    return EnsembleAgreement(reference=int(reference))
