"""DCCM ("Deep Comprehensive Correlation Mining for Image Clustering"): the equations on hand-made
inputs, the network's shapes, and a short fit that saves, loads, exports and labels like any method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibclust.config import ConfigError
from calibclust.errors import InputError
from calibclust.train.dccm import (
    DCCMConfig,
    LocalDiscriminator,
    fold_logit_norm,
    graph_loss,
    jsd_mutual_information,
    label_loss,
    pseudo_graph,
    pseudo_labels,
    sample_pairs,
    shallow_features,
    triplet_mi_loss,
)

from model_fixtures import assert_exports_and_labels, assert_round_trips

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _backbone(size: int = 16):
    from calibclust.models.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("small", input_size=size).eval()


# --- Eq. 2–3: pseudo-graph and its pairwise BCE --------------------------------------------------
def test_pseudo_graph_links_pairs_whose_softmax_cosine_reaches_the_threshold():
    z = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]], dtype=torch.float64)
    s, w = pseudo_graph(z, 0.95)
    cos01 = (0.72 + 0.02) / math.sqrt(0.82 * 0.68)  # 0.991
    cos02 = (0.09 + 0.09) / 0.82  # 0.220
    cos12 = (0.08 + 0.18) / math.sqrt(0.68 * 0.82)  # 0.348
    np.testing.assert_allclose(s.numpy(), [[1, cos01, cos02], [cos01, 1, cos12], [cos02, cos12, 1]], atol=1e-12)
    assert w.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    # Eq. 2 writes S_ij ≥ thres_1: a pair exactly at the threshold is linked, one just below it is not.
    assert pseudo_graph(z, float(s[0, 1]))[1][0, 1] == 1
    assert pseudo_graph(z, float(np.nextafter(s[0, 1].item(), 2.0)))[1][0, 1] == 0


def test_graph_loss_is_the_binary_cross_entropy_of_the_cosines_against_the_graph():
    z = torch.tensor([[1.0, 0.0], [0.5, 0.5]], requires_grad=True)  # cosine 1/√2
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Mean over the 4 pairs; the diagonal (S = W = 1) costs nothing (−log(1 − 1e-6) after the clamp).
    assert graph_loss(z, apart).item() == pytest.approx(0.5 * -math.log(1 - 1 / math.sqrt(2)), abs=1e-5)
    assert graph_loss(z, torch.ones(2, 2)).item() == pytest.approx(0.5 * -math.log(1 / math.sqrt(2)), abs=1e-5)
    # Two identical one-hot rows that the graph calls unlinked: S rounds to 1, which BCE would charge
    # its log cap of 100 for; the clamp charges −log(1e-6) ≈ 13.8 per off-diagonal pair.
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert graph_loss(same, apart).item() == pytest.approx(0.5 * -math.log(1e-6), rel=1e-3)
    graph_loss(z, apart).backward()  # unlinked: the loss pulls the two rows apart
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


# --- Eq. 7–9: pseudo-labels ---------------------------------------------------------------------------
def test_pseudo_label_mask_uses_greater_or_equal_at_the_threshold_and_the_loss_is_masked_ce():
    probs = torch.tensor([[0.75, 0.25], [0.4, 0.6], [0.25, 0.75 - 2**-20]])
    labels, mask = pseudo_labels(probs, 0.75)
    assert labels.tolist() == [0, 1, 1]
    assert mask.tolist() == [1.0, 0.0, 0.0]  # exactly 0.75 is in (Eq. 8: p_i ≥ thres_2), just below is out
    # Σ V_i CE(z_i, y_i) / B: only the first row counts.
    assert label_loss(probs.log(), labels, mask).item() == pytest.approx(-math.log(0.75) / 3, rel=1e-6)


# --- §3.4: pairs from the graph, discriminator, JSD estimator ---------------------------------------
SIMILARITY = torch.tensor([
    [1.00, 0.97, 0.99, 0.10, 0.20],
    [0.97, 1.00, 0.90, 0.30, 0.10],
    [0.99, 0.90, 1.00, 0.20, 0.20],
    [0.10, 0.30, 0.20, 1.00, 0.50],
    [0.20, 0.10, 0.20, 0.50, 1.00],
])
GRAPH = (SIMILARITY >= 0.95).float()  # 0–1 and 0–2 linked; 3 and 4 alone


def test_positive_is_the_nearest_linked_sample_and_negatives_are_drawn_uniformly_from_the_unlinked():
    draws = {i: [] for i in range(5)}
    for seed in range(300):
        positive, negative, valid = sample_pairs(SIMILARITY, GRAPH, 2, torch.Generator().manual_seed(seed))
        assert positive.tolist() == [2, 0, 0, 3, 4]  # nearest W=1 neighbour; alone: itself
        assert valid.all()  # every anchor has at least 2 unlinked samples
        for i in range(5):
            row = negative[i].tolist()
            assert len(set(row)) == 2 and all(GRAPH[i, j] == 0 for j in row)
            draws[i] += row
    unlinked = {i: {j for j in range(5) if GRAPH[i, j] == 0} for i in range(5)}
    assert {i: set(d) for i, d in draws.items()} == unlinked
    counts = np.bincount(draws[3], minlength=5)  # 2 of 4 candidates per draw: each in half of them
    assert counts[3] == 0 and all(120 <= counts[j] <= 180 for j in (0, 1, 2, 4)), counts
    # More negatives asked than there are: the unlinked ones, each once, the rest marked invalid.
    _, negative, valid = sample_pairs(SIMILARITY, GRAPH, 5, torch.Generator().manual_seed(0))
    assert [set(negative[i][valid[i]].tolist()) for i in range(5)] == [unlinked[i] for i in range(5)]


def test_jsd_mutual_information_on_hand_computed_scores():
    log3 = math.log(3.0)
    joint, marginal = torch.tensor([0.0, log3]), torch.tensor([0.0, -log3])
    # E_J[−sp(−T)] = −(log 2 + log 4/3)/2 and E_M[sp(T)] = (log 2 + log 4/3)/2 → MI = −log 8/3.
    assert jsd_mutual_information(joint, marginal).item() == pytest.approx(-math.log(8 / 3), rel=1e-6)
    assert jsd_mutual_information(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(-2 * math.log(2), rel=1e-6)
    separated = jsd_mutual_information(torch.full((3,), 20.0), torch.full((3,), -20.0)).item()
    assert -1e-6 < separated < 0  # the bound's maximum, 0, when T tells the pairs apart


def test_discriminator_is_three_1x1_convolutions_on_shallow_map_and_replicated_deep_feature():
    torch.manual_seed(0)
    disc = LocalDiscriminator(shallow_channels=5, deep_dim=3, channels=7)
    deep, shallow = torch.randn(4, 3), torch.randn(4, 5, 6, 6)
    di, si = torch.tensor([0, 1, 3]), torch.tensor([2, 1, 0])
    scores = disc(deep, shallow, di, si)
    cat = torch.cat([shallow[si], deep[di][:, :, None, None].expand(-1, -1, 6, 6)], 1)
    naive = disc.c2(torch.relu(disc.c1(torch.relu(disc.c0(cat)))))[:, 0]
    assert scores.shape == (3, 6, 6)
    torch.testing.assert_close(scores, naive, rtol=1e-5, atol=1e-5)
    positive, negative, valid = sample_pairs(SIMILARITY[:4, :4], GRAPH[:4, :4], 2, torch.Generator().manual_seed(0))
    loss = triplet_mi_loss(disc, deep, shallow, positive, negative, valid)
    anchors = torch.arange(4)
    other = positive != anchors
    assert other.tolist() == [True, True, True, False], positive  # anchor 3 has no positive but itself
    # Its own pair counts once, like every anchor's; the others add their positive's pair.
    t_joint = disc(deep, shallow, torch.cat([anchors, anchors[other]]), torch.cat([anchors, positive[other]]))
    rows, cols = torch.nonzero(valid, as_tuple=True)
    t_marg = disc(deep, shallow, rows, negative[rows, cols])
    assert loss.item() == pytest.approx(-(-F.softplus(-t_joint).mean() + -F.softplus(t_marg).mean()).item(), rel=1e-6)


# --- the network ------------------------------------------------------------------------------------
def test_shallow_map_comes_from_a_hook_that_leaves_the_backbone_as_it_was():
    backbone = _backbone()
    keys = list(backbone.state_dict())
    with shallow_features(backbone, "layer1") as store:
        z = backbone(torch.randn(3, 3, 16, 16))
        assert z.shape == (3, 128) and store["s"].shape == (3, 32, 8, 8)  # stride-2 stem, first stage
    assert not backbone.layer1._forward_hooks and list(backbone.state_dict()) == keys
    with pytest.raises(InputError, match="no module 'conv9'.*stem, layer1, layer2, layer3, pool"):
        with shallow_features(backbone, "conv9"):
            pass


def test_logit_batchnorm_folds_into_the_last_linear_layer():
    from calibclust.models.clustering import MLPHead

    torch.manual_seed(0)
    head, norm = MLPHead(8, 6, 4).eval(), torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(var)
    z = torch.randn(10, 8)
    expected = norm.eval()(head(z))
    fold_logit_norm(head, norm, mean, var)
    torch.testing.assert_close(head(z), expected, rtol=1e-5, atol=1e-5)


def test_config_is_strict_collects_problems_and_puts_the_paper_one_value_away():
    cpu, paper = DCCMConfig(), DCCMConfig(profile="paper")
    assert (paper.alpha, paper.beta, paper.graph_threshold, paper.label_threshold) == (5.0, 0.1, 0.95, 0.9)
    assert [paper.setting(k) for k in ("lr", "batch_size", "disc_channels", "epochs")] == [1e-4, 32, 512, 4000]
    assert [cpu.setting(k) for k in ("lr", "batch_size", "disc_channels")] == [1e-3, 64, 64]
    assert DCCMConfig(profile="paper", epochs=3).setting("epochs") == 3
    assert DCCMConfig.from_dict(DCCMConfig(views={"flip_p": 0.0}).to_dict()) == DCCMConfig(views={"flip_p": 0.0})
    with pytest.raises(ConfigError, match="unknown setting.*thres1"):
        DCCMConfig.from_dict({"thres1": 0.9})
    with pytest.raises(ConfigError) as err:
        DCCMConfig(profile="gpu", graph_threshold=1.5, transform="blur", views={"flip_p": 2.0})
    assert len(err.value.problems) == 4 and "views.flip_p" in str(err.value)


# --- end to end -------------------------------------------------------------------------------------
def test_dccm_fits_saves_loads_exports_and_labels_like_any_method(digits_folder, tmp_path):
    """A short fit on 200 real digits from a random small backbone: the loss falls, the head gives
    probabilities, and the model goes through save/load, ONNX export and `calibclust label`."""
    pytest.importorskip("onnxruntime")
    from calibclust.train.data import TrainingData
    from calibclust.train.methods import get_method

    data = TrainingData.from_folder(digits_folder, 32, progress=False)
    backbone = _backbone(32)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    config = DCCMConfig(num_clusters=10, epochs=6, batch_size=50)
    method = get_method("dccm")(10, config).fit(data, backbone, {"source": "test"}, out_dir=tmp_path / "run")
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items()), "fit changed the given backbone"
    stats = method.metadata.train_stats
    first, last = stats["first_epoch"], stats["last_epoch"]
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    assert (tmp_path / "run" / "history.json").is_file() and stats["config"] == config.to_dict()
    meta = method.metadata
    assert (meta.method, meta.calibrated, meta.probs_head, meta.backbone) == ("dccm", False, "clustering", "small")
    probs = method.predict_proba(data.images)
    assert probs.shape == (200, 10) and (probs >= 0).all() and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert len(np.unique(probs.argmax(1))) >= 3, "collapsed to fewer than 3 clusters"
    assert method.row_names() == ["DCCM"] and method.seconds["DCCM"] > 0

    assert_round_trips(method, data.images, tmp_path / "model")

    assert_exports_and_labels(method, data.images, data.paths, digits_folder, tmp_path / "onnx")
