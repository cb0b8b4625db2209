"""calibclust.train.calibration: the label-free estimates of ECE and the bench's rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from calibclust.metrics import calibration_error
from calibclust.train.calibration import (
    aligned_agreement,
    calibration_rows,
    estimate_rank_correlations,
    estimated_ece,
    knn_agreement,
    minicluster_purity,
    spearman,
    table_rows,
    COLUMNS,
)
from model_fixtures import three_shapes


def test_estimated_ece_is_the_ece_formula_with_agreement_for_correctness():
    conf = np.array([0.9, 0.9, 0.6, 0.6, 0.3])
    assert estimated_ece(conf, np.ones(5)) == pytest.approx(np.mean(1 - conf))
    correct = np.array([1, 0, 1, 1, 0], float)
    assert estimated_ece(conf, correct) == pytest.approx(calibration_error(conf, correct).ece)
    # fractional agreement: a bin at 0.9 confidence agreeing 0.5 of the time is 0.4 off
    assert estimated_ece(np.full(4, 0.9), np.full(4, 0.5)) == pytest.approx(0.4)


def test_aligned_agreement_ignores_cluster_names():
    pred = np.array([0, 0, 1, 1, 2, 2])
    assert aligned_agreement(pred, np.array([2, 2, 0, 0, 1, 1])).tolist() == [1.0] * 6
    got = aligned_agreement(pred, np.array([2, 2, 0, 1, 1, 1]))
    assert got.tolist() == [1, 1, 1, 0, 1, 1], got


def test_knn_agreement_on_separated_and_mixed_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:2] * 10
    z = torch.cat([centres[0] + torch.randn(50, 8, generator=g), centres[1] + torch.randn(50, 8, generator=g)])
    truth = np.repeat([0, 1], 50)
    assert knn_agreement(z, truth).mean() == pytest.approx(1.0)
    shuffled = np.random.default_rng(0).permutation(truth)
    mixed = knn_agreement(z, shuffled).mean()
    assert 0.35 < mixed < 0.65, f"random clusters should agree with about half their neighbours, got {mixed:.3f}"


def test_spearman_and_rank_correlation_over_cdc_rows():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 2], [1, 2]))
    rows = [{"method": "K-means", "ece": 0.5}] + [
        {"method": f"CDC-Cal {i}", "ece": e, "estimates": {"seeds": e, "kNN": -e, "views": 0.1}}
        for i, e in enumerate([0.05, 0.1, 0.2])]
    rho = estimate_rank_correlations(rows)
    assert rho["seeds"] == pytest.approx(1.0) and rho["kNN"] == pytest.approx(-1.0), rho
    assert np.isnan(rho["views"])  # constant estimate: no ranking


def test_minicluster_purity_is_one_on_separated_classes():
    from calibclust.train.cdc import CDCConfig

    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.eye(16)[c] * 5 + 0.05 * torch.randn(40, 16, generator=g) for c in range(4)]).abs()
    labels = np.repeat(np.arange(4), 40)
    for norm in ("l2", "l1"):
        cfg = CDCConfig(num_clusters=4, batch_size=160, sub_batch_size=80, mini_clusters=4, minicluster_norm=norm)
        assert minicluster_purity(z, labels, cfg) == pytest.approx(1.0), norm


def test_cdc_rows_start_from_fits_cpu_profile():
    """The bench's CDC is what `calibclust fit` trains (the profile, sized to the train split), with
    BatchNorm statistics kept so every row scores the same frozen features; overrides apply last."""
    from calibclust.train import profiles
    from calibclust.train.calibration import base_cdc_config

    n_train = 1440
    base = base_cdc_config(10, n_train, seed=3)
    fit = profiles.cdc_config(10, n_train, seed=3)
    assert base.recalibrate_bn == "no" and fit.recalibrate_bn != "no"
    assert dataclasses.replace(base, recalibrate_bn=fit.recalibrate_bn) == fit
    assert (base.epochs, base.batch_size, base.num_views, base.hidden_dim) == (
        profiles.CDC_EPOCHS, profiles.cdc_batch(n_train), profiles.cdc_views(n_train), profiles.cdc_hidden(n_train))
    assert base.freeze_backbone and base.views.flip_p == 0.0 and base.seed == 3
    assert base_cdc_config(10, n_train, overrides={"hidden_dim": 16}).hidden_dim == 16


def test_calibration_rows_on_three_shapes():
    from calibclust.models.backbones import build_backbone

    data = three_shapes(n=120, size=16)
    data.class_names = ["bars", "block", "noise"]
    train_idx, held_idx = np.arange(120) % 5 != 0, np.arange(120) % 5 == 0
    train = dataclasses.replace(data, images=data.images[train_idx], labels=data.labels[train_idx],
                                paths=[p for p, k in zip(data.paths, train_idx) if k])
    held = dataclasses.replace(data, images=data.images[held_idx], labels=data.labels[held_idx],
                               paths=[p for p, k in zip(data.paths, held_idx) if k])
    torch.manual_seed(0)
    backbone = build_backbone("small", input_size=16)
    small = {"hidden_dim": 16, "epochs": 3, "batch_size": 48, "sub_batch_size": 24, "num_views": 2, "orth_steps": 20}
    rows = calibration_rows(train, held, backbone, {}, seed=0, log=lambda m: None,
                            cdc_overrides=small, spice_overrides={"head_epochs": 5, "n_heads": 2})
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["K-means (Student-t)", "SPICE_s"]
    assert len(methods) == 2 + 2 * 3 and all(m.startswith(("CDC-Clu", "CDC-Cal")) for m in methods[2:]), methods
    for r in rows:
        assert 0 <= r["ece"] <= 1 and 1 / 3 - 1e-9 <= r["acc"] <= 1, r
    cdc = [r for r in rows if r.get("estimates")]
    assert {r["mini_clusters"] for r in cdc} == {24, 1}, "K = B/2 and B/25 of the 48-image batch"
    for r in cdc:
        assert set(r["estimates"]) == {"seeds", "kNN", "views"} and all(0 <= v <= 1 for v in r["estimates"].values()), r
        assert 1 / 3 <= r["purity"] <= 1
    assert len(table_rows(rows)[0]) == len(COLUMNS)
