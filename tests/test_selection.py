"""Pseudo-label selection strategies (calibclust.train.selection) on hand-made probabilities."""

import pytest
import torch

from calibclust.train.selection import (
    CalibratedPerClass,
    FixedThreshold,
    Selection,
    SelectionInputs,
    available_strategies,
    build_strategy,
    parse_spec,
    register_strategy,
)

# Five samples, two clusters. Column 0 ranks r0 > r1 > r4 > r2 > r3, column 1 ranks r3 > r2 > r4.
PROBS = torch.tensor(
    [
        [0.95, 0.05],  # r0
        [0.90, 0.10],  # r1
        [0.60, 0.40],  # r2
        [0.30, 0.70],  # r3
        [0.85, 0.15],  # r4
    ]
)


def test_eq4_follows_the_authors_code_max_probability_sum_and_argmax_label():
    sel = CalibratedPerClass(top_size=3).select(SelectionInputs(PROBS))
    # TOP(0) = {r0, r1, r4}: Σ max p = 0.95 + 0.90 + 0.85 = 2.70 → M(0) = 2 → r0, r1.
    # TOP(1) = {r3, r2, r4}: Σ max p = 0.70 + 0.60 + 0.85 = 2.15 → M(1) = 2 → r3, r2.
    # (The paper's literal Σ p[:, 1] = 1.25 would give M(1) = 1 and leave r2 out.)
    # r2 was picked by cluster 1 but keeps its argmax label 0.
    assert sel.indices.tolist() == [0, 1, 2, 3]
    assert sel.labels.tolist() == [0, 0, 0, 1]
    order, m = CalibratedPerClass(top_size=3).per_class_quota(PROBS)
    assert m.tolist() == [2, 2]
    assert order.tolist() == [[0, 1, 4], [3, 2, 4]]


def test_eq4_sample_picked_by_two_clusters_is_selected_once():
    probs = torch.tensor([[0.50, 0.49, 0.01], [0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]])
    # top 2 per cluster: c0 {r1, r0}, c1 {r2, r0}, c2 {r3, r0}; M = ⌊0.98 + 0.50⌋ = 1 each:
    # only the first of each TOP is kept → r1, r2, r3. With top 3, M = ⌊0.98+0.5+0.98⌋ = 2 and
    # r0 is in every kept set: selected once, label argmax = 0.
    sel = CalibratedPerClass(top_size=2).select(SelectionInputs(probs))
    assert sel.indices.tolist() == [1, 2, 3] and sel.labels.tolist() == [0, 1, 2]
    sel = CalibratedPerClass(top_size=3).select(SelectionInputs(probs))
    assert sel.indices.tolist() == [0, 1, 2, 3]
    assert sel.labels.tolist() == [0, 0, 1, 2]
    assert len(set(sel.indices.tolist())) == len(sel)


def test_eq4_floor_is_not_moved_by_float32_rounding():
    # 0.7 + 0.7 + 0.6 is 2 exactly in real numbers but 1.9999999 in float32 sums.
    probs = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.6, 0.4], [0.1, 0.9]], dtype=torch.float32)
    _, m = CalibratedPerClass(top_size=3).per_class_quota(probs)
    assert m[0].item() == 2


def test_eq4_default_top_size_is_batch_over_clusters():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(103, 4) * 3, 1)
    order, _ = CalibratedPerClass().per_class_quota(probs)
    assert order.shape == (4, 103 // 4)


def test_eq4_quota_zero_gives_empty_cluster_and_possibly_empty_selection():
    probs = torch.tensor([[0.6, 0.4], [0.55, 0.45], [0.4, 0.6]])
    sel = CalibratedPerClass(top_size=1).select(SelectionInputs(probs))  # M = ⌊0.6⌋ = 0
    assert len(sel) == 0
    assert sel.counts().tolist() == [0, 0]
    assert sel.mask().tolist() == [False, False, False]
    assert sel.dense_labels().tolist() == [-1, -1, -1]


def test_eq4_confident_cluster_gets_more_samples_than_an_uncertain_one():
    # Cluster 0 is learned (confident), cluster 1 is not: the dynamic quota follows confidence.
    probs = torch.tensor([[0.99, 0.01]] * 10 + [[0.45, 0.55]] * 10)
    sel = CalibratedPerClass(top_size=10).select(SelectionInputs(probs))
    counts = sel.counts().tolist()
    assert counts == [9, 5], counts  # ⌊9.9⌋ = 9, ⌊5.5⌋ = 5


def test_fixed_threshold_is_strict_and_can_select_nothing():
    sel = FixedThreshold(0.9).select(SelectionInputs(PROBS))
    assert sel.indices.tolist() == [0]  # 0.90 is not > 0.90
    assert sel.labels.tolist() == [0]
    empty = FixedThreshold(0.99).select(SelectionInputs(PROBS))
    assert len(empty) == 0 and empty.counts().tolist() == [0, 0]


def test_selection_helpers_are_consistent():
    sel = Selection.from_mask(torch.tensor([True, False, True]), torch.tensor([2, 0, 1]), 3)
    assert sel.indices.tolist() == [0, 2]
    assert sel.labels.tolist() == [2, 1]
    assert sel.dense_labels().tolist() == [2, -1, 1]
    assert sel.counts().tolist() == [0, 1, 1]


def test_registry_builds_from_spec_strings():
    assert parse_spec("fixed:0.95") == ("fixed", [0.95], {})
    assert parse_spec("cdc:top_size=50") == ("cdc", [], {"top_size": 50})
    s = build_strategy("fixed:0.8")
    assert isinstance(s, FixedThreshold) and s.threshold == 0.8
    assert build_strategy("cdc", top_size=7).top_size == 7  # trainer default fills in
    assert build_strategy("cdc:top_size=3", top_size=7).top_size == 3  # spec wins
    assert build_strategy("fixed:0.9", top_size=7).threshold == 0.9  # irrelevant default ignored
    with pytest.raises(ValueError, match="unknown selection strategy"):
        build_strategy("nope")
    with pytest.raises(ValueError):
        build_strategy("fixed:1.5")
    assert {"cdc", "fixed"} <= set(available_strategies())


def test_a_new_strategy_plugs_into_the_same_seam():
    # What the SPICE module will do: register a strategy that uses embeddings.
    @register_strategy("test-nearest-first", "test only")
    def _factory(k: int = 1):
        class NearestFirst:
            name = "test-nearest-first"

            def select(self, inputs):
                d = inputs.embeddings.norm(dim=1)
                idx = torch.argsort(d)[:k].sort().values
                return Selection(idx, inputs.probs[idx].argmax(1), inputs.num_samples, inputs.num_classes)

            def describe(self):
                return "nearest first"

        return NearestFirst()

    s = build_strategy("test-nearest-first:2")
    emb = torch.tensor([[3.0], [1.0], [2.0], [0.5]])
    sel = s.select(SelectionInputs(PROBS[:4], embeddings=emb))
    assert sel.indices.tolist() == [1, 3]
    assert sel.labels.tolist() == [0, 1]
