"""CDC's equations on hand-made tensors, and the trainer's gradient routing, empty selections and
resume on tiny synthetic data ("Towards Calibrated Deep Clustering Network" §3.1–3.3)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from calibclust.metrics import hungarian_accuracy
from calibclust.train.cdc import (
    CDCConfig,
    CDCTrainer,
    calibration_losses,
    clustering_loss,
    minicluster_targets,
    prototype_init,
    separate_prototypes,
)
from calibclust.train.data import TrainingData
from model_fixtures import three_shapes


# Small tensors on a shared 2-core machine: one torch thread (conftest.py restores the default).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --- Eq. 1 / Theorem 1 -----------------------------------------------------------------------------
def test_eq1_targets_are_minicluster_means():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.5, 0.5]])
    assignment = torch.tensor([0, 0, 1, 1, 2])
    t = minicluster_targets(probs, assignment, 4)  # mini-cluster 3 is empty: no row asks for it
    expected = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.3, 0.7], [0.3, 0.7], [0.5, 0.5]])
    assert torch.allclose(t, expected)


def test_theorem1_reliable_region_keeps_confidence_unreliable_region_is_penalised():
    # The calibration example of appendix A.2 (Fig. 6).
    reliable = torch.tensor([[0.98, 0.02], [0.97, 0.03], [0.97, 0.03], [0.96, 0.04]])
    unreliable = torch.tensor([[0.60, 0.40], [0.70, 0.30], [0.20, 0.80], [0.30, 0.70]])
    probs = torch.cat([reliable, unreliable])
    t = minicluster_targets(probs, torch.tensor([0] * 4 + [1] * 4), 2)
    conf_before = probs.max(1).values
    conf_target = t.max(1).values
    # reliable: target confidence == mean member confidence (0.97), no penalty
    assert conf_target[:4].mean().item() == pytest.approx(conf_before[:4].mean().item(), abs=1e-6)
    assert torch.allclose(t[0], torch.tensor([0.97, 0.03]))
    # unreliable: target [0.45, 0.55], confidence 0.55 < members' average 0.70
    assert torch.allclose(t[4], torch.tensor([0.45, 0.55]))
    assert conf_target[4:].mean().item() == pytest.approx(0.55)
    assert conf_before[4:].mean().item() == pytest.approx(0.70)  # mean of the max probs (Fig. 6)
    assert conf_target[4:].mean() < conf_before[4:].mean()


def test_eq1_and_eq2_values():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    l_cal, l_en = calibration_losses(logits, targets)
    logp = F.log_softmax(logits, 1)
    assert l_cal.item() == pytest.approx(-(targets * logp).sum(1).mean().item())
    pbar = logp.exp().mean(0)
    assert l_en.item() == pytest.approx((pbar * pbar.log()).sum().item())
    # L_en is minimal (−log C) for a uniform batch-mean prediction
    _, l_uniform = calibration_losses(torch.zeros(4, 3), torch.full((4, 3), 1 / 3))
    assert l_uniform.item() == pytest.approx(-math.log(3))


def test_eq5_is_cross_entropy_on_the_selected_labels():
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    expected = -(F.log_softmax(logits, 1)[[0, 1], [0, 1]]).mean()
    assert clustering_loss(logits, labels).item() == pytest.approx(expected.item())


# --- §3.3 prototype initialisation -----------------------------------------------------------------
def _blobs(n_per=60, k=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    z = torch.cat([centres[i] + torch.randn(n_per, d, generator=g) for i in range(k)])
    return z.relu(), torch.arange(k).repeat_interleave(n_per)


def test_separation_pushes_prototypes_apart():
    g = torch.Generator().manual_seed(0)
    w = F.normalize(torch.randn(8, 4, generator=g).abs() + 1.0, dim=1)  # crowded: all in one orthant
    before = (w @ w.T - torch.eye(8)).max().item()
    w2 = F.normalize(separate_prototypes(w, steps=300), dim=1)
    after = (w2 @ w2.T - torch.eye(8)).max().item()
    assert after < before - 0.05, (before, after)


def test_proposition1_prototype_init_transfers_kmeans_clusters_to_the_head():
    from calibclust.models.clustering import MLPHead

    z, y = _blobs()
    state = prototype_init(z, hidden_dim=32, num_clusters=4, seed=0, restarts=2, orth_steps=200)
    assert torch.count_nonzero(state["fc1.bias"]) == 0 and torch.count_nonzero(state["fc2.bias"]) == 0
    head = MLPHead(16, 32, 4)
    head.load_state_dict(state)
    head.eval()
    pred = head(z).argmax(1).numpy()
    acc = hungarian_accuracy(y.numpy(), pred).accuracy
    torch.manual_seed(0)
    rand_acc = hungarian_accuracy(y.numpy(), MLPHead(16, 32, 4).eval()(z).argmax(1).numpy()).accuracy
    assert acc > 0.95, f"prototype-initialised head ACC {acc:.3f} on separable blobs"
    assert acc > rand_acc, (acc, rand_acc)


def test_prototype_init_needs_at_least_h_samples():
    from calibclust.errors import InputError

    with pytest.raises(InputError, match="hidden-dim"):
        prototype_init(torch.randn(10, 4), hidden_dim=32, num_clusters=2)


# --- trainer: gradient routing, empty selections, resume --------------------------------------------
def _tiny_data(n=96, size=16, seed=0):
    return three_shapes(n, size, seed)


def _cfg(**kw):
    base = dict(num_clusters=3, epochs=1, batch_size=48, sub_batch_size=24, hidden_dim=16, mini_clusters=6,
                orth_steps=30, init_kmeans_restarts=1, minicluster_restarts=1, num_views=2)
    base.update(kw)
    return CDCConfig(**base)


def _record_grads_at_cal_step(trainer):
    """Wrap opt_cal.step so we see every parameter's gradient when the calibration head steps."""
    seen = []
    original = trainer.opt_cal.step

    def step(*a, **k):
        m = trainer.model
        grads = {
            "backbone": [p.grad for p in m.backbone.parameters()],
            "clustering": [p.grad for p in m.heads["clustering"].parameters()],
            "calibration": [p.grad for p in m.heads["calibration"].parameters()],
        }
        seen.append({k2: [None if g is None else g.detach().clone() for g in v] for k2, v in grads.items()})
        return original(*a, **k)

    trainer.opt_cal.step = step
    return seen


def _is_zero(grads):
    return all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_calibration_loss_updates_only_the_calibration_head():
    """§3.1 Remark (stop gradient), through the real training step with a trainable backbone."""
    trainer = CDCTrainer(_cfg(), _tiny_data(), None, progress=False, log=lambda m: None)
    seen = _record_grads_at_cal_step(trainer)
    before_bb = [p.detach().clone() for p in trainer.model.backbone.parameters()]
    trainer.fit()
    assert seen, "the calibration head never stepped"
    for grads in seen:
        assert _is_zero(grads["backbone"]), "L_cal reached the backbone"
        assert _is_zero(grads["clustering"]), "L_cal reached the clustering head"
        assert not _is_zero(grads["calibration"]), "L_cal did not reach the calibration head"
    # L_clu does train the backbone (so the zero above is the stop-gradient, not a frozen net)
    after_bb = list(trainer.model.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_bb, after_bb))


def test_without_stop_gradient_the_calibration_loss_reaches_backbone_and_clustering_head():
    trainer = CDCTrainer(_cfg(stop_gradient=False), _tiny_data(), None, progress=False, log=lambda m: None)
    seen = _record_grads_at_cal_step(trainer)
    trainer.fit()
    assert seen
    assert not _is_zero(seen[0]["backbone"])
    assert not _is_zero(seen[0]["clustering"])
    assert not _is_zero(seen[0]["calibration"])


def test_frozen_backbone_mode_trains_heads_only_on_cached_views(tmp_path):
    data = _tiny_data()
    trainer = CDCTrainer(_cfg(freeze_backbone=True, epochs=2), data, tmp_path, progress=False, log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    bb = [k for k in before if k.startswith("backbone.")]
    heads = [k for k in before if k.startswith("heads.") and k.endswith("weight")]
    # backbone weights untouched (BN statistics are re-estimated once before caching)
    assert all(torch.equal(before[k], after[k]) for k in bb if not ("running" in k or "num_batches" in k))
    assert any(not torch.equal(before[k], after[k]) for k in heads)
    assert (tmp_path / "features.safetensors").is_file()


def test_empty_selection_is_skipped_not_a_crash(tmp_path):
    # A fixed 0.99 threshold right after random initialisation selects nothing (SCAN's
    # self-labelling crashes there); so does Eq. 4 with TOP size 1 (M = ⌊max p⌋ = 0).
    for name, kw in (("fixed", dict(select="fixed:0.99", init="random")), ("top1", dict(select="cdc:top_size=1"))):
        trainer = CDCTrainer(_cfg(freeze_backbone=True, epochs=2, **kw), _tiny_data(), tmp_path / name,
                             progress=False, log=lambda m: None)
        result = trainer.fit()
        rec = result.history[-1]
        assert rec["selected"]["total"] == 0
        assert rec["selected"]["per_cluster"] == [0, 0, 0]
        assert rec["selected"]["empty_sub_batches"] == 4  # 2 batches × 2 sub-batches
        assert rec["loss_clu"] is None
        assert rec["loss_cal"] is not None and math.isfinite(rec["loss_cal"])
        assert all(math.isfinite(float(v.float().sum())) for v in result.model.state_dict().values())


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    data = _tiny_data()
    full = CDCTrainer(_cfg(freeze_backbone=True, epochs=3), data, tmp_path / "full", progress=False, log=lambda m: None).fit()
    CDCTrainer(_cfg(freeze_backbone=True, epochs=1), data, tmp_path / "parts", progress=False, log=lambda m: None).fit()
    with pytest.raises(Exception, match="--resume"):
        CDCTrainer(_cfg(freeze_backbone=True, epochs=3), data, tmp_path / "parts", progress=False, log=lambda m: None).fit()
    resumed = CDCTrainer(_cfg(freeze_backbone=True, epochs=3), data, tmp_path / "parts", progress=False,
                         log=lambda m: None).fit(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(l) for l in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    # settings that change the run are refused on resume
    from calibclust.errors import InputError

    with pytest.raises(InputError, match="w_en"):
        CDCTrainer(_cfg(freeze_backbone=True, epochs=4, w_en=2.0), data, tmp_path / "parts", progress=False,
                   log=lambda m: None).fit(resume=True)


def test_single_head_modes_have_one_head_and_select_on_it(tmp_path):
    for mode in ("clu", "clu+cal"):
        result = CDCTrainer(_cfg(freeze_backbone=True, heads=mode), _tiny_data(), None, progress=False,
                            log=lambda m: None).fit()
        assert result.model.head_names == ("clustering",)
        assert result.metadata.probs_head == "clustering" and result.metadata.calibrated is False
        rec = result.history[-1]
        assert (rec["loss_cal"] is None) == (mode == "clu")


def test_labels_are_not_used_for_training():
    """A folder without labels trains to exactly the same model as with labels."""
    data = _tiny_data()
    unlabeled = TrainingData(data.images, data.paths, None)
    a = CDCTrainer(_cfg(freeze_backbone=True), data, None, progress=False, log=lambda m: None).fit()
    b = CDCTrainer(_cfg(freeze_backbone=True), unlabeled, None, progress=False, log=lambda m: None).fit()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "acc" in a.history[-1]["heads"]["calibration"] and "acc" not in b.history[-1]["heads"]["calibration"]


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_minicluster_kmeans_sees_rows_normalised_as_configured(tmp_path, monkeypatch, norm):
    """Eq. 1's per-batch K-means runs on the un-augmented embeddings, L2- or (the authors' code)
    L1-normalised per --minicluster-norm."""
    import calibclust.train.cdc as cdc

    seen = []
    real = cdc.kmeans

    def spy(x, k, **kw):
        seen.append(x.detach().clone())
        return real(x, k, **kw)

    monkeypatch.setattr(cdc, "kmeans", spy)
    trainer = CDCTrainer(_cfg(freeze_backbone=True, minicluster_norm=norm, init="random"), _tiny_data(), tmp_path,
                         progress=False, log=lambda m: None)
    trainer.fit()
    order = {"l2": 2, "l1": 1}[norm]
    assert seen and all(len(x) == 48 for x in seen)  # one K-means per batch of B = 48 rows
    for x in seen:
        assert torch.allclose(x.norm(p=order, dim=1), torch.ones(len(x)), atol=1e-5), norm


def test_paper_settings_and_the_hard_rule_set_k_and_the_encoder_lr():
    """§4.1: B and K per benchmark, and the 1e-5 encoder lr of CIFAR-20 / Tiny-ImageNet, one name
    away on the command line; the hard rule (CIFAR-20's B/K = 25) lowers the encoder lr too."""
    import argparse

    from calibclust.train.cli import _config_from_args, register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())

    def config(*extra):
        return _config_from_args(parser.parse_args(["train", "cdc", "f", "--out", "o", "--clusters", "10", *extra]))

    c = config("--paper-setting", "cifar20")
    assert (c.batch_size, c.sub_batch_size, c.resolved_mini_clusters(1000), c.resolved_lr_backbone()) == (1000, 500, 40, 1e-5)
    c = config("--paper-setting", "stl10")
    assert (c.batch_size, c.resolved_mini_clusters(1000), c.resolved_lr_backbone()) == (1000, 150, 5e-5)
    c = config("--paper-setting", "tiny-imagenet", "--lr-backbone", "3e-5")  # an explicit flag wins
    assert (c.batch_size, c.resolved_mini_clusters(5000), c.resolved_lr_backbone()) == (5000, 1000, 3e-5)
    c = config()
    assert (c.batch_size, c.resolved_mini_clusters(1000), c.resolved_lr_backbone()) == (1000, 500, 5e-5)
    c = config("--difficulty", "hard", "--batch-size", "300")
    assert (c.sub_batch_size, c.resolved_mini_clusters(300), c.resolved_lr_backbone()) == (150, 12, 1e-5)
    trainer = CDCTrainer(_cfg(difficulty="hard", mini_clusters=None), _tiny_data(), None, progress=False,
                         log=lambda m: None)
    assert trainer.opt_clu.param_groups[0]["lr"] == 1e-5  # the encoder's group, fine-tuned mode
