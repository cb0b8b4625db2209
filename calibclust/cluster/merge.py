"""Merging over-clustered heads into K groups (``fit --overcluster F``).

A method trained with ⌈F·K⌉ clusters is merged into K by how the head itself shares images between
its clusters: two clusters are similar when the head gives the same images probability in both (the
cosine similarity of the clusters' probability columns over the training images, PᵀP normalised),
and the clusters are grouped by agglomerative clustering with average linkage on 1 − similarity.
No label is read. SCAN ("SCAN: Learning to Classify Images without Labels", §4.3) over-clusters
and maps the extra clusters with labels; this is the label-free merge.

Why co-assignment and not prototypes (mean backbone features per cluster): measured on the data
zoo's letters in 250 fonts (CDC trained with 20 clusters on the frozen 100-epoch backbone, merged into
10, held-out images), prototype similarity merged into ACC 0.49–0.56 (average / complete / Ward
linkage, weighted k-means, spectral), about what training at K = 10 directly gives (0.54);
co-assignment gave 0.65 (average linkage) against 0.68 for the label-majority merge; on digits
prototypes 0.67, co-assignment 0.86 (as the label-majority merge). The features are what put two
letters together in the first place; the head, trained on views of each image, knows which of its
clusters the same images fall between.
"""

from __future__ import annotations

import numpy as np

from calibclust.errors import InputError


def coassignment_similarity(probs: np.ndarray) -> np.ndarray:
    """(C, C) cosine similarity of the clusters' probability columns of ``probs`` (N, C): high for two
    clusters the head spreads the same images over (1 on the diagonal, 0 for a column of zeros)."""
    probs = np.asarray(probs, dtype=np.float64)
    gram = probs.T @ probs
    norms = np.sqrt(np.maximum(np.diag(gram), 1e-300))
    return gram / np.outer(norms, norms)


def merge_groups(probs: np.ndarray, k: int) -> list[int]:
    """The group (0..k-1) of each of the C = ``probs.shape[1]`` clusters of a head whose probabilities
    on the training images are ``probs`` (N, C): average-linkage agglomerative clustering on
    1 − :func:`coassignment_similarity`. A cluster without any probability (a column of zeros, which
    a softmax never gives) is put in the largest group rather than left to take a group of its own.
    Groups are numbered by their share of the probability mass, largest first, so the numbering does
    not depend on the linkage's order."""
    from sklearn.cluster import AgglomerativeClustering

    probs = np.asarray(probs, dtype=np.float64)
    n_clusters = probs.shape[1]
    if not 2 <= k <= n_clusters:
        raise InputError(f"cannot merge {n_clusters} clusters into {k} groups (need 2 <= groups <= clusters)")
    mass = probs.sum(axis=0)
    live = np.flatnonzero(mass > 0) if np.count_nonzero(mass > 0) >= k else np.arange(n_clusters)
    if len(live) == k:
        live_groups = np.arange(k)
    else:
        distances = np.clip(1.0 - coassignment_similarity(probs[:, live]), 0.0, 1.0)
        np.fill_diagonal(distances, 0.0)
        live_groups = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distances)
    groups = np.full(n_clusters, -1)
    groups[live] = live_groups
    heaviest = max(range(k), key=lambda g: mass[live[live_groups == g]].sum())
    groups[groups < 0] = heaviest
    group_mass = [mass[groups == g].sum() for g in range(k)]
    order = np.argsort(-np.asarray(group_mass), kind="stable")
    renumber = np.empty(k, dtype=np.int64)
    renumber[order] = np.arange(k)
    return [int(renumber[g]) for g in groups]
