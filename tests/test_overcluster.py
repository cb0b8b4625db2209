"""Over-clustering: a model trained with more clusters than wanted, merged into K groups by how its
head shares images between clusters (calibclust.cluster.merge, MergedHead,
ClusteringMethod.merge_clusters, fit --overcluster)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibclust.cluster.merge import coassignment_similarity, merge_groups
from calibclust.errors import InputError
from calibclust.models.clustering import ClusteringModel, MergedHead, load_model, save_model
from model_fixtures import three_shapes

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _paired_clusters(seed: int = 0):
    """Probabilities (N, 6) of a head that spreads each image of look b over clusters 2b and 2b+1 (in
    varying proportions) and puts a little noise elsewhere, and the look of each cluster (6,)."""
    rng = np.random.default_rng(seed)
    rows = []
    for look in range(3):
        share = rng.uniform(0.05, 0.95, size=60)
        row = rng.uniform(0, 0.02, size=(60, 6))
        row[:, 2 * look] += share
        row[:, 2 * look + 1] += 1 - share
        rows.append(row)
    probs = np.concatenate(rows)
    return probs / probs.sum(1, keepdims=True), np.repeat(np.arange(3), 2)


def test_merge_groups_puts_together_the_clusters_that_share_images():
    probs, look_of = _paired_clusters()
    similarity = coassignment_similarity(probs)
    assert np.allclose(np.diag(similarity), 1) and similarity[0, 1] > 0.5 > similarity[0, 2]
    groups = np.asarray(merge_groups(probs, 3))
    for look in range(3):
        members = groups[look_of == look]
        assert len(set(members)) == 1, f"look {look}'s two clusters went to groups {members.tolist()}"
    assert sorted(set(groups.tolist())) == [0, 1, 2]
    heavier = np.concatenate([probs, probs[:60]])  # look 0 has twice the images: its group is numbered first
    assert merge_groups(heavier, 3)[0] == 0 and merge_groups(heavier[:, ::-1], 3)[-1] == 0
    empty = np.concatenate([probs, np.zeros((len(probs), 1))], axis=1)  # a cluster no image has any share of
    with_empty = np.asarray(merge_groups(empty, 3))
    assert all(len(set(with_empty[:6][look_of == look])) == 1 for look in range(3)), with_empty.tolist()
    assert len(set(with_empty[:6])) == 3, f"the empty cluster took a group of its own: {with_empty.tolist()}"


def test_merge_groups_refuses_impossible_counts():
    probs, _ = _paired_clusters()
    with pytest.raises(InputError, match="cannot merge 6 clusters into 7 groups"):
        merge_groups(probs, 7)
    with pytest.raises(InputError, match="into 1 groups"):
        merge_groups(probs, 1)
    assert sorted(merge_groups(probs, 6)) == list(range(6))  # as many groups as clusters: each alone


def test_merged_head_sums_member_probabilities_and_keeps_the_energy():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 6)
    groups = [1, 0, 1, 2, 0, 2]
    merged = MergedHead(head, groups)
    z = torch.randn(32, 5) * 4
    logits, merged_logits = head(z), merged(z)
    membership = torch.nn.functional.one_hot(torch.tensor(groups), 3).float()
    torch.testing.assert_close(torch.softmax(merged_logits, 1), torch.softmax(logits, 1) @ membership)
    torch.testing.assert_close(torch.logsumexp(merged_logits, 1), torch.logsumexp(logits, 1))
    with pytest.raises(ValueError, match="every group 0..2"):
        MergedHead(head, [0, 0, 2, 2, 0, 2])


def _model(clusters: int = 6) -> ClusteringModel:
    from calibclust.models.backbones import build_backbone

    torch.manual_seed(0)  # default initialisation: logits of a few units, as a trained head has
    return ClusteringModel(build_backbone("small", input_size=16), clusters, hidden_dim=16).eval()


def test_a_merged_model_saves_loads_and_predicts_the_same(tmp_path):
    from calibclust.metadata import ModelMetadata

    model = _model()
    x = model.preprocess(torch.from_numpy(three_shapes(12).images))
    before = torch.softmax(model(x), 1)
    model.merge_clusters([0, 1, 2, 0, 1, 2])
    assert model.num_clusters == 3 and model.trained_clusters == 6
    after = torch.softmax(model(x), 1)
    torch.testing.assert_close(after, before[:, :3] + before[:, 3:])
    with pytest.raises(ValueError, match="merged already"):
        model.merge_clusters([0, 1, 2])
    save_model(model, tmp_path, ModelMetadata(num_clusters=3, input_size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3))
    loaded, metadata = load_model(tmp_path)
    assert loaded.merged_groups == [0, 1, 2, 0, 1, 2] and metadata.num_clusters == 3
    torch.testing.assert_close(torch.softmax(loaded(x), 1), after)


def test_a_method_merges_exports_and_labels_like_any_model(tmp_path):
    """CDC with 6 clusters on three shapes, merged into 3: each head's merged probabilities are the
    sums of its members' on images it never saw, the metadata says how it was trained, the model
    saves and loads as merged, and the exported model gives the merged probabilities. (Quality is
    the zoo's measurement, in the README: on a random backbone the merge has little to go on.)"""
    pytest.importorskip("onnxruntime")
    from calibclust.export.onnx import export_onnx
    from calibclust.serve.labeler import Labeler
    from calibclust.train.cdc import CDCConfig
    from calibclust.train.methods import ClusteringMethod, get_method

    train, held = three_shapes(120, seed=0), three_shapes(60, seed=1)
    config = CDCConfig(num_clusters=6, epochs=3, batch_size=60, sub_batch_size=30, hidden_dim=16, freeze_backbone=True,
                       num_views=1, orth_steps=10, recalibrate_bn="no")
    method = get_method("cdc")(6, config).fit(train, _model().backbone, {"source": "test"})
    before = method.predictions(held.images)
    groups = method.merge_clusters(3, train)
    assert len(groups) == 6 and sorted(set(groups)) == [0, 1, 2]
    stats = method.metadata.train_stats
    assert method.metadata.num_clusters == 3 and len(method.metadata.cluster_names) == 3
    assert stats["overcluster"]["trained_clusters"] == 6 and stats["overcluster"]["groups"] == groups
    assert len(stats["cluster_sizes"]) == 3 and sum(stats["cluster_sizes"]) == 120
    rows = method.predictions(held.images)
    assert list(rows) == ["CDC-Clu", "CDC-Cal"]
    membership = np.eye(3)[groups]
    for name, probs in rows.items():
        np.testing.assert_allclose(probs, before[name] @ membership, atol=1e-5, err_msg=name)
    probs = rows["CDC-Cal"]

    method.save(tmp_path / "model")
    loaded = ClusteringMethod.load(tmp_path / "model")
    assert loaded.n_clusters == 6 and loaded.model.num_clusters == 3 and loaded.config == method.config
    np.testing.assert_allclose(loaded.predict_proba(held.images), probs, atol=1e-6)
    exported = export_onnx(method.model, method.metadata, train.images, tmp_path / "merged.onnx", log=lambda *a: None)
    out = Labeler(str(exported.path)).predict_all(held.images[:20])
    np.testing.assert_allclose(out["probs"], probs[:20], atol=1e-4)

    # INT8 quantises the backbone only: not the merged head's Add of two computed tensors (top + log).
    import onnx

    from calibclust.export.int8 import backbone_nodes

    proto = onnx.load(str(exported.path))
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"n{i}"
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    merge_adds = [n.name for n in proto.graph.node
                  if n.op_type == "Add" and {producer.get(x) for x in n.input} >= {"ReduceMax", "Log"}]
    assert merge_adds, "the merged head's top + log(...) is not in the graph"
    assert not set(merge_adds) & set(backbone_nodes(proto)), "INT8 would quantise the merged head"
