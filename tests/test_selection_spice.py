"""SPICE prototype / reliable selection ("SPICE: Semantic Pseudo-Labeling for Image Clustering" Eq. 2–4, 6–7, Fig. 4) and SPC agreement."""

import math
import warnings

import pytest
import torch

from calibclust.train.selection import SelectionInputs, available_strategies, build_strategy
from calibclust.train.selection_spice import (
    EnsembleAgreement,
    PrototypeSelection,
    ReliableSelection,
    SelectionWarning,
    knn_indices,
)


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def fig4_toy():
    """10 samples, 3 clusters, 3 per cluster (Fig. 4). Row 9 (165°) is among the top-3 confident
    rows of clusters 1 and 2 and ends up nearest to both prototypes."""
    angles = [0, 20, -20, 100, 120, 60, 300, 200, 220, 165]
    feats = torch.tensor([_unit(a) for a in angles], dtype=torch.float32) * 3.0  # scale: cosine ignores it
    probs = torch.tensor(
        [
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.7, 0.15, 0.15],
            [0.1, 0.8, 0.1],
            [0.1, 0.85, 0.05],
            [0.4, 0.3, 0.3],
            [0.4, 0.3, 0.3],
            [0.05, 0.05, 0.9],
            [0.1, 0.1, 0.8],
            [0.1, 0.45, 0.45],
        ]
    )
    return probs, feats


def test_eq2_eq3_top_rows_and_prototypes():
    probs, feats = fig4_toy()
    top, protos = PrototypeSelection(per_cluster=3).prototypes(probs, feats)
    assert [sorted(r) for r in top.tolist()] == [[0, 1, 2], [3, 4, 9], [7, 8, 9]]  # Eq. 2
    for k in range(3):
        assert torch.allclose(protos[k], feats[top[k]].mean(0))  # Eq. 3: γ_k = K/M Σ f_i


def test_fig4_overlap_assignment():
    probs, feats = fig4_toy()
    sel = PrototypeSelection(per_cluster=3, overlap=True).select(SelectionInputs(probs, embeddings=feats))
    pairs = sorted(zip(sel.indices.tolist(), sel.labels.tolist()))
    assert pairs == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (7, 2), (8, 2), (9, 1), (9, 2)]
    assert sel.mask().tolist() == [True] * 5 + [False, False] + [True] * 3  # rows 5, 6 → -1
    assert sel.counts().tolist() == [3, 3, 3]


def test_fig4_non_overlap_assignment_reaches_further_out():
    probs, feats = fig4_toy()
    sel = PrototypeSelection(per_cluster=3, overlap=False).select(SelectionInputs(probs, embeddings=feats))
    # Row 9 goes to the nearer prototype (cluster 2); cluster 1 takes row 5 at 60° instead
    # (Fig. 4's dashed circle), row 6 stays unlabelled.
    assert sel.dense_labels().tolist() == [0, 0, 0, 1, 1, 1, -1, 2, 2, 2]
    assert len(sel) == 9


def test_prototype_top_fraction_and_default_size():
    probs, feats = fig4_toy()
    top, _ = PrototypeSelection(per_cluster=4, top_fraction=0.5).prototypes(probs, feats)
    assert top.shape == (3, 2)  # 0.5 · M/K rows per prototype (authors' code)
    sel = PrototypeSelection().select(SelectionInputs(probs, embeddings=feats))
    assert sel.counts().tolist() == [3, 3, 3]  # M/K = ⌊10/3⌋
    with pytest.raises(ValueError, match="embeddings"):
        PrototypeSelection().select(SelectionInputs(probs))


def test_eq6_eq7_ratios_and_threshold():
    probs = torch.eye(2)[[0, 0, 0, 1, 1, 1]].float() * 0.9 + 0.05
    neighbors = torch.tensor([[1, 2, 3], [0, 2, 4], [0, 1, 5], [4, 5, 0], [3, 5, 2], [3, 4, 1]])
    strat = ReliableSelection(num_neighbors=3, threshold=0.5)
    labels = probs.argmax(1)
    r = strat.ratios(labels, neighbors)
    assert torch.allclose(r, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]))
    sel = strat.select(SelectionInputs(probs, extra={"neighbors": neighbors}))
    assert sel.mask().all() and sel.labels.tolist() == labels.tolist()
    neighbors2 = torch.tensor([[1, 2, 3], [0, 2, 4], [0, 1, 5], [4, 5, 0], [3, 5, 2], [3, 4, 1]])
    neighbors2[0] = torch.tensor([3, 4, 1])  # row 0: 1 of 3 neighbours agrees
    sel = ReliableSelection(num_neighbors=3, threshold=0.5).select(SelectionInputs(probs, extra={"neighbors": neighbors2}))
    assert sel.indices.tolist() == [1, 2, 3, 4, 5]
    # r_j > λ is strict (Eq. 7): r = 2/3 is not > 2/3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionWarning)
        sel = ReliableSelection(num_neighbors=3, threshold=2 / 3, fallback="none").select(
            SelectionInputs(probs, extra={"neighbors": neighbors})
        )
    assert len(sel) == 0


def test_reliable_min_confidence_and_balance():
    # cluster 0: rows 0-3 all consistent; cluster 1: rows 4-5 consistent
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    probs = torch.nn.functional.one_hot(labels, 2).float() * 0.995 + 0.0025
    probs[1] = torch.tensor([0.98, 0.02])  # below the authors' 0.99
    neighbors = torch.tensor([[1, 2], [0, 2], [0, 3], [0, 1], [5, 5], [4, 4]])
    base = SelectionInputs(probs, extra={"neighbors": neighbors})
    assert ReliableSelection(num_neighbors=2, threshold=0.9).select(base).indices.tolist() == [0, 1, 2, 3, 4, 5]
    sel = ReliableSelection(num_neighbors=2, threshold=0.9, min_confidence=0.99).select(base)
    assert sel.indices.tolist() == [0, 2, 3, 4, 5]
    sel = ReliableSelection(num_neighbors=2, threshold=0.9, balance=True).select(base)
    assert sel.counts().tolist() == [2, 2]  # subsampled to the smallest cluster
    assert set(sel.indices.tolist()) >= {4, 5}


def test_reliable_empty_cluster_message_and_fallback():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    probs = torch.nn.functional.one_hot(labels, 4).float() * 0.9 + 0.025  # cluster 3 predicted nowhere
    # rows 5, 6 (cluster 2) have neighbours of other clusters; row 6 slightly more consistent
    neighbors = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 4], [3, 3], [0, 1], [6, 1]])
    neighbors[6] = torch.tensor([5, 0])
    strat = ReliableSelection(num_neighbors=2, threshold=0.9)
    with pytest.warns(SelectionWarning, match=r"cluster\(s\) \[2, 3\] kept no reliable sample") as rec:
        sel = strat.select(SelectionInputs(probs, extra={"neighbors": neighbors}))
    assert "predicted for no row at all" in str(rec[0].message)
    assert sel.counts().tolist() == [3, 2, 2, 0]  # fallback: top-2 (smallest kept cluster) rows of cluster 2
    assert strat.report["fallback"] == {2: 2} and strat.report["empty_clusters"] == [2, 3]
    with pytest.raises(ValueError, match="kept no reliable sample"):
        ReliableSelection(num_neighbors=2, threshold=0.9, fallback="error").select(
            SelectionInputs(probs, extra={"neighbors": neighbors})
        )
    with pytest.warns(SelectionWarning):
        sel = ReliableSelection(num_neighbors=2, threshold=0.9, fallback="top", fallback_count=1).select(
            SelectionInputs(probs, extra={"neighbors": neighbors})
        )
    assert sel.dense_labels().tolist() == [0, 0, 0, 1, 1, -1, 2]  # row 6 has r = 1/2 > row 5's 0


def test_knn_indices_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 8, generator=g)
    got = knn_indices(z, 5, chunk_size=7)
    zn = torch.nn.functional.normalize(z, dim=1)
    sim = zn @ zn.T
    sim.fill_diagonal_(-float("inf"))
    assert torch.equal(got, sim.topk(5, dim=1).indices)
    sel = ReliableSelection(num_neighbors=5, threshold=0.0).select(
        SelectionInputs(torch.softmax(torch.randn(50, 3, generator=g), 1), embeddings=z)
    )
    assert len(sel) > 0


def test_ensemble_agreement_after_hungarian_alignment():
    ref = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    perm = torch.tensor([2, 0, 1])  # member 2 numbers cluster c as perm[c]
    other = perm[ref].clone()
    other[6] = perm[1]  # disagreement on row 6
    third = ref.clone()
    third[3] = 2  # disagreement on row 3
    ens = torch.stack([torch.nn.functional.one_hot(x, 3).float() for x in (ref, other, third)])
    sel = EnsembleAgreement().select(SelectionInputs(ens[0], ensemble_probs=ens))
    assert sel.indices.tolist() == [0, 1, 2, 4, 5]
    assert sel.labels.tolist() == [0, 0, 1, 2, 2]
    assert EnsembleAgreement().aligned_labels(ens)[1].tolist() == [0, 0, 1, 1, 2, 2, 1]
    with pytest.raises(ValueError, match="ensemble_probs"):
        EnsembleAgreement().select(SelectionInputs(ens[0]))


def test_registered_on_the_seam():
    names = available_strategies()
    assert {"spice-prototype", "spice-reliable", "agreement", "cdc", "fixed"} <= set(names)
    s = build_strategy("spice-reliable:num_neighbors=20,threshold=0.9,min_confidence=0.99,balance=true")
    assert (s.num_neighbors, s.threshold, s.min_confidence, s.balance) == (20, 0.9, 0.99, True)
    p = build_strategy("spice-prototype:top_fraction=0.5,overlap=false", per_cluster=100)
    assert (p.per_cluster, p.top_fraction, p.overlap) == (100, 0.5, False)
    assert isinstance(build_strategy("agreement"), EnsembleAgreement)
