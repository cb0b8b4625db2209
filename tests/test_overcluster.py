"""Over-clustering: a model trained with more clusters than wanted, merged into K groups by prototype
similarity (calibclust.cluster.merge, MergedHead, ClusteringMethod.merge_clusters, fit --overcluster)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibclust.cluster.merge import cluster_prototypes, merge_groups
from calibclust.errors import InputError
from calibclust.models.clustering import ClusteringModel, MergedHead, load_model, save_model
from model_fixtures import three_shapes

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _split_blobs(seed: int = 0):
    """Three well-separated directions, each cut into two sub-clusters: features (N, D), the
    sub-cluster one-hot probabilities (N, 6) and each sub-cluster's blob (6,)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 10
    offsets = rng.normal(size=(3, 2, 8)) * 1.5
    features, sub = [], []
    for blob in range(3):
        for half in range(2):
            features.append(centres[blob] + offsets[blob, half] + rng.normal(size=(40, 8)) * 0.3)
            sub += [2 * blob + half] * 40
    return np.concatenate(features), np.eye(6)[sub], np.repeat(np.arange(3), 2)


def test_merge_groups_puts_the_halves_of_each_blob_together():
    features, probs, blob_of = _split_blobs()
    groups = np.asarray(merge_groups(features, probs, 3))
    for blob in range(3):
        members = groups[blob_of == blob]
        assert len(set(members)) == 1, f"blob {blob}'s two halves went to groups {members.tolist()}"
    assert sorted(set(groups.tolist())) == [0, 1, 2]
    # unequal masses: the heavier group is numbered first
    probs[:40] *= 0  # the first half of blob 0 loses its images to nothing (soft weights only)
    probs[:40, 2] = 1  # ... and they go to blob 1's first half, which grows
    assert merge_groups(features, probs, 3)[2] == 0


def test_prototypes_are_soft_means_so_an_empty_cluster_still_has_one():
    features, probs, _ = _split_blobs()
    probs = 0.94 * probs + 0.01  # every cluster has some mass everywhere
    probs = np.concatenate([probs, np.full((len(probs), 1), 1e-6)], axis=1)  # a seventh, nearly empty cluster
    prototypes = cluster_prototypes(features, probs)
    assert prototypes.shape == (7, 8) and np.allclose(np.linalg.norm(prototypes, axis=1), 1)
    assert len(merge_groups(features, probs, 3)) == 7


def test_merge_groups_refuses_impossible_counts():
    features, probs, _ = _split_blobs()
    with pytest.raises(InputError, match="cannot merge 6 clusters into 7 groups"):
        merge_groups(features, probs, 7)
    with pytest.raises(InputError, match="into 1 groups"):
        merge_groups(features, probs, 1)
    assert sorted(merge_groups(features, probs, 6)) == list(range(6))  # as many groups as clusters: each alone


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
    """CDC with 6 clusters on three shapes, merged into 3: the three shapes come back whole on images
    it never saw, the metadata says how it was trained, and the exported model gives the merged
    probabilities."""
    pytest.importorskip("onnxruntime")
    from calibclust.export.onnx import export_onnx
    from calibclust.metrics import hungarian_accuracy
    from calibclust.serve.labeler import Labeler
    from calibclust.train.cdc import CDCConfig
    from calibclust.train.methods import ClusteringMethod, get_method

    train, held = three_shapes(120, seed=0), three_shapes(60, seed=1)
    config = CDCConfig(num_clusters=6, epochs=3, batch_size=60, sub_batch_size=30, hidden_dim=16, freeze_backbone=True,
                       num_views=1, orth_steps=10, recalibrate_bn="no")
    method = get_method("cdc")(6, config).fit(train, _model().backbone, {"source": "test"})
    groups = method.merge_clusters(3, train)
    assert len(groups) == 6 and sorted(set(groups)) == [0, 1, 2]
    stats = method.metadata.train_stats
    assert method.metadata.num_clusters == 3 and len(method.metadata.cluster_names) == 3
    assert stats["overcluster"]["trained_clusters"] == 6 and len(stats["cluster_sizes"]) == 3
    rows = method.predictions(held.images)
    assert list(rows) == ["CDC-Clu", "CDC-Cal"] and all(p.shape == (60, 3) for p in rows.values())
    probs = rows["CDC-Cal"]
    acc = hungarian_accuracy(held.labels, probs.argmax(1)).accuracy
    assert acc >= 0.9, f"CDC with 6 clusters merged into 3 on three shapes: held-out ACC {acc:.3f}"

    method.save(tmp_path / "model")
    loaded = ClusteringMethod.load(tmp_path / "model")
    assert loaded.n_clusters == 6 and loaded.model.num_clusters == 3 and loaded.config == method.config
    np.testing.assert_allclose(loaded.predict_proba(held.images), probs, atol=1e-6)
    exported = export_onnx(method.model, method.metadata, train.images, tmp_path / "merged.onnx", log=lambda *a: None)
    out = Labeler(str(exported.path)).predict_all(held.images[:20])
    np.testing.assert_allclose(out["probs"], probs[:20], atol=1e-4)
