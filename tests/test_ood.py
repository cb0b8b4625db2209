"""OOD scores: each pinned on hand-made tensors against its definition, the threshold rule, and the
comparison harness on digits vs noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibclust.export.ood import (
    EnergyScore,
    KNNScore,
    MSPScore,
    PrototypeScore,
    build_ood_score,
    compare_ood_scores,
    fit_threshold,
)

torch.set_num_threads(2)


def _unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)


def test_msp_and_energy_follow_their_definitions():
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, -1.0]])
    probs = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    np.testing.assert_allclose(MSPScore()(logits, None).numpy(), 1 - probs.max(1), atol=1e-6)
    expected = -np.log(np.exp(logits.numpy()).sum(1))  # Liu et al. 2020: E = -logsumexp, T = 1
    np.testing.assert_allclose(EnergyScore()(logits, None).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(EnergyScore(2.0)(logits, None).numpy(), -2 * np.log(np.exp(logits.numpy() / 2).sum(1)), rtol=1e-6)
    # a confident sample scores lower (more in-distribution) than a uniform one on both
    assert MSPScore()(logits, None)[0] < MSPScore()(logits, None)[1]
    assert EnergyScore()(logits, None)[0] < EnergyScore()(logits, None)[1]


def test_prototype_is_cosine_distance_to_nearest_cluster_mean():
    emb = _unit([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0]])  # cluster 2 is empty
    score = PrototypeScore(3, 2).fit(logits, emb, torch.Generator())
    assert score.centroids.shape == (2, 2), "an empty cluster has no prototype"
    c0 = emb[:2].mean(0)
    c0 = c0 / c0.norm()
    query = _unit([[1, 0], [-1, 0]])
    got = score(None, query).numpy()
    assert got[0] == pytest.approx(1 - float(c0[0]), abs=1e-6)
    assert got[1] > 1.0, "opposite direction is farther than any prototype"


def test_knn_is_kth_neighbour_distance_and_leaves_itself_out_when_fitting():
    rng = np.random.default_rng(0)
    emb = _unit(rng.normal(size=(50, 8)))
    score = KNNScore(k=3, bank_size=20).fit(None, emb, torch.Generator().manual_seed(0))
    bank = score.bank.numpy()
    assert bank.shape == (20, 8)
    query = _unit(rng.normal(size=(5, 8))).numpy()
    dists = np.linalg.norm(query[:, None, :] - bank[None], axis=2)
    np.testing.assert_allclose(score(None, torch.from_numpy(query)).numpy(), np.sort(dists, 1)[:, 2], atol=1e-5)
    train = score.training_scores(None, emb).numpy()
    inside = score._bank_index.numpy()
    own = np.linalg.norm(emb.numpy()[inside][:, None, :] - bank[None], axis=2)
    # for bank members the 3rd neighbour other than itself = 4th smallest distance including self (0)
    np.testing.assert_allclose(train[inside], np.sort(own, 1)[:, 3], atol=1e-5)
    assert np.all(train[inside] > 1e-3), "a bank member's own copy must not count as its neighbour"


def test_fit_threshold_accepts_the_requested_share():
    scores = np.arange(1, 101, dtype=float)
    assert fit_threshold(scores, 0.95) == 95.0
    rng = np.random.default_rng(0)
    s = rng.normal(size=997)
    t = fit_threshold(s, 0.95)
    assert np.mean(s <= t) >= 0.95 and np.mean(s < t) < 0.95


def test_build_ood_score_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown OOD score 'mahalanobis'"):
        build_ood_score("mahalanobis", 10, 8)


def test_comparison_harness_on_digits_vs_noise():
    from calibclust.datasets import digits_images, ood_images
    from calibclust.models.backbones import build_backbone
    from calibclust.models.clustering import ClusteringModel

    torch.manual_seed(0)
    model = ClusteringModel(build_backbone("small"), 10, hidden_dim=32).eval()
    images = digits_images(32)[0][:400]
    result = compare_ood_scores(model, images, {"noise": ood_images("noise", 100), "photos": ood_images("photos", 100)},
                                {"msp": {"name": "msp"}, "knn": {"name": "knn", "k": 5, "bank_size": 128}})
    assert result.n_fit == 280 and result.n_test == 120
    knn = result.rows["knn"]["noise"]["auroc"]
    # Even random conv features put uniform/Gaussian noise far from every digit.
    assert knn > 0.9, f"kNN AUROC digits vs noise {knn:.3f}"
    assert "knn" in result.table() and result.best() in ("msp", "knn")
