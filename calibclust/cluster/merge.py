"""Merging over-clustered heads into K groups by prototype similarity (``fit --overcluster F``).

A method trained with ⌈F·K⌉ clusters has a prototype per cluster: the mean of the L2-normalised
backbone features of the images it assigns to that cluster (argmax), or for a cluster no image is
assigned to, the mean weighted by its probabilities. Hard and not soft weights first: a soft head
(K-means' Student-t assignment spreads ~1/K everywhere) would give every cluster nearly the same
mean. The prototypes are grouped into K by agglomerative clustering with average linkage on
cosine distance, the merge SCAN's users apply to over-clustered heads ("SCAN: Learning to Classify
Images without Labels", §4.3 over-clustering, where the merge is done with labels; here it is the
prototypes, so no label is read). Agglomerative and not k-means on the prototypes: with F·K points,
k-means' result depends on its start, while average linkage is deterministic and merges the closest
pairs first.
"""

from __future__ import annotations

import numpy as np

from calibclust.errors import InputError


def cluster_prototypes(features: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C, D) L2-normalised prototypes of the L2-normalised ``features`` (N, D) with ``probs`` (N, C)
    the head's cluster probabilities: each cluster's mean over the images assigned to it, or its
    probability-weighted mean when none is."""
    features = np.asarray(features, dtype=np.float64)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    probs = np.asarray(probs, dtype=np.float64)
    assigned = np.eye(probs.shape[1])[probs.argmax(axis=1)]
    empty = assigned.sum(axis=0) == 0
    weights = np.where(empty[None, :], probs, assigned)
    weights = weights / np.maximum(weights.sum(axis=0, keepdims=True), 1e-12)
    prototypes = weights.T @ features
    return prototypes / np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)


def merge_groups(features: np.ndarray, probs: np.ndarray, k: int) -> list[int]:
    """The group (0..k-1) of each of the C = ``probs.shape[1]`` clusters: their prototypes
    (:func:`cluster_prototypes`) grouped into ``k`` by average-linkage agglomerative clustering on
    cosine distance. Groups are numbered by their share of the probability mass, largest first, so
    the numbering does not depend on the linkage's order."""
    from sklearn.cluster import AgglomerativeClustering

    n_clusters = np.asarray(probs).shape[1]
    if not 2 <= k <= n_clusters:
        raise InputError(f"cannot merge {n_clusters} clusters into {k} groups (need 2 <= groups <= clusters)")
    prototypes = cluster_prototypes(features, probs)
    if k == n_clusters:
        groups = np.arange(n_clusters)
    else:
        # Cosine distances given whole: a cluster without mass has a zero prototype, which sklearn's
        # own cosine metric refuses; here it is at distance 1 from every other.
        distances = np.clip(1.0 - prototypes @ prototypes.T, 0.0, 2.0)
        np.fill_diagonal(distances, 0.0)
        groups = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distances)
    mass = np.asarray(probs, dtype=np.float64).sum(axis=0)
    group_mass = [mass[groups == g].sum() for g in range(k)]
    order = np.argsort(-np.asarray(group_mass), kind="stable")
    renumber = np.empty(k, dtype=np.int64)
    renumber[order] = np.arange(k)
    return [int(renumber[g]) for g in groups]
