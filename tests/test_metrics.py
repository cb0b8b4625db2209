"""Every metric against an independent implementation (sklearn, brute force, or a loop written
differently here), on random and hand-made cases including the edge cases of issue 2 item 4."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn import metrics as skm

from calibclust import metrics as M

TOL = 1e-9
ECE_TOL = 1e-6


# ----------------------------------------------------------------------------- references


def brute_force_acc(y_true, y_pred) -> float:
    """Best accuracy over every injective matching between clusters and classes."""
    classes, clusters = np.unique(y_true), np.unique(y_pred)
    best = 0
    if len(clusters) <= len(classes):
        for image in itertools.permutations(classes, len(clusters)):
            m = dict(zip(clusters, image))
            best = max(best, sum(m[p] == t for t, p in zip(y_true, y_pred)))
    else:  # more clusters than classes: choose which cluster each class gets
        for chosen in itertools.permutations(clusters, len(classes)):
            m = dict(zip(chosen, classes))
            best = max(best, sum(m.get(p, None) == t for t, p in zip(y_true, y_pred)))
    return best / len(y_true)


def loop_ece(confidence, correct, n_bins=15):
    """ECE/MCE written as a plain loop over bins (b/n, (b+1)/n], the first bin also taking 0."""
    n = len(confidence)
    ece, mce = 0.0, 0.0
    counts, accs = [], []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(n) if (lo < confidence[i] <= hi) or (b == 0 and confidence[i] == 0)]
        counts.append(len(members))
        if not members:
            accs.append(None)
            continue
        acc = sum(correct[i] for i in members) / len(members)
        conf = sum(confidence[i] for i in members) / len(members)
        accs.append(acc)
        ece += len(members) / n * abs(acc - conf)
        mce = max(mce, abs(acc - conf))
    return ece, mce, counts, accs


def loop_aurc(confidence, correct):
    """AURC = mean over k of the error rate among samples at least as confident as the k-th most
    confident one (ties accepted together)."""
    order = sorted(confidence, reverse=True)
    total = 0.0
    for k in range(len(order)):
        kept = [i for i in range(len(confidence)) if confidence[i] >= order[k]]
        total += sum(1 - correct[i] for i in kept) / len(kept)
    return total / len(order)


def sk_fpr_at_tpr(positives, scores, level=0.95):
    fpr, tpr, _ = skm.roc_curve(positives, scores, drop_intermediate=False)
    return float(fpr[np.flatnonzero(tpr >= level)[0]])


# ----------------------------------------------------------------------------- cases


def clustering_cases():
    rng = np.random.default_rng(0)
    cases = {
        "perfect_permuted": (np.array([0, 0, 1, 1, 2, 2]), np.array([5, 5, 3, 3, 4, 4])),
        "one_cluster": (np.array([0, 1, 2, 0, 1, 2, 2]), np.zeros(7, int)),
        "one_class_one_cluster": (np.zeros(5, int), np.full(5, 7)),
        "more_clusters_than_classes": (np.array([0, 0, 0, 1, 1, 1, 1, 0]), np.array([0, 1, 2, 3, 3, 4, 3, 2])),
        "more_classes_than_clusters": (np.array([0, 1, 2, 3, 4, 0, 1, 2]), np.array([0, 0, 1, 1, 1, 0, 1, 1])),
        "all_singletons": (np.arange(6), np.arange(6)[::-1].copy()),
        "two_samples": (np.array([0, 1]), np.array([1, 1])),
    }
    for seed in range(8):
        n = int(rng.integers(5, 60))
        k_true, k_pred = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        y = rng.integers(0, k_true, n)
        noisy = np.where(rng.random(n) < 0.6, y % k_pred, rng.integers(0, k_pred, n))
        cases[f"random_{seed}"] = (y, noisy + 10)  # cluster ids need not start at 0
    return cases


CLUSTERING = clustering_cases()


@pytest.mark.parametrize("name", list(CLUSTERING))
def test_acc_equals_brute_force_and_mapping_achieves_it(name):
    y_true, y_pred = CLUSTERING[name]
    result = M.hungarian_accuracy(y_true, y_pred)
    expected = brute_force_acc(y_true, y_pred)
    assert abs(result.accuracy - expected) < TOL, f"{name}: ACC {result.accuracy} vs brute force {expected}"
    assert len(set(result.mapping.values())) == len(result.mapping), "mapping is one-to-one"
    mapped = result.map(y_pred)
    assert abs((mapped == y_true).mean() - result.accuracy) < TOL
    assert len(result.mapping) == min(len(np.unique(y_true)), len(np.unique(y_pred)))


@pytest.mark.parametrize("name", list(CLUSTERING))
def test_nmi_and_ari_equal_sklearn(name):
    y_true, y_pred = CLUSTERING[name]
    nmi, ari = M.normalized_mutual_info(y_true, y_pred), M.adjusted_rand_index(y_true, y_pred)
    sk_nmi, sk_ari = skm.normalized_mutual_info_score(y_true, y_pred), skm.adjusted_rand_score(y_true, y_pred)
    assert abs(nmi - sk_nmi) < TOL, f"{name}: NMI {nmi} vs sklearn {sk_nmi}"
    assert abs(ari - sk_ari) < TOL, f"{name}: ARI {ari} vs sklearn {sk_ari}"


def test_hand_made_acc_values():
    # 8 samples, clusters 0,1,2 for classes 0,0,0,1,1,1,1,0; best: 3->1 (3 hits) + one of 0/1/2 -> 0 ... = 5/8
    y_true = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    y_pred = np.array([0, 1, 2, 3, 3, 4, 3, 2])
    assert M.hungarian_accuracy(y_true, y_pred).accuracy == pytest.approx(5 / 8, abs=TOL)
    assert M.hungarian_accuracy([0, 1, 2], [0, 0, 0]).accuracy == pytest.approx(1 / 3, abs=TOL)


# ----------------------------------------------------------------------------- scores


def score_cases():
    rng = np.random.default_rng(1)
    cases = {
        "hand_made": (np.array([0.9, 0.8, 0.8, 0.7, 0.3, 0.2, 0.2, 0.1]), np.array([1, 1, 0, 1, 0, 1, 0, 0], bool)),
        "perfect_separation": (np.array([0.9, 0.8, 0.7, 0.2, 0.1]), np.array([1, 1, 1, 0, 0], bool)),
        "all_tied": (np.full(6, 0.5), np.array([1, 0, 1, 0, 1, 1], bool)),
        "inverted": (np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0], bool)),
    }
    for seed in range(6):
        n = int(rng.integers(20, 400))
        labels = rng.random(n) < rng.uniform(0.2, 0.8)
        scores = rng.normal(labels * rng.uniform(0, 2), 1.0)
        if seed % 2:  # many ties
            scores = np.round(scores, 1)
        cases[f"random_{seed}"] = (scores, labels)
    return cases


SCORES = score_cases()


@pytest.mark.parametrize("name", list(SCORES))
def test_auroc_aupr_fpr95_equal_sklearn(name):
    scores, pos = SCORES[name]
    assert abs(M.auroc(scores, pos) - skm.roc_auc_score(pos, scores)) < TOL
    assert abs(M.average_precision(scores, pos) - skm.average_precision_score(pos, scores)) < TOL
    assert abs(M.fpr_at_tpr(scores, pos) - sk_fpr_at_tpr(pos, scores)) < TOL
    fpr, tpr, _ = M.roc_curve_points(scores, pos)
    sk_fpr, sk_tpr, _ = skm.roc_curve(pos, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=TOL)
    np.testing.assert_allclose(tpr, sk_tpr, atol=TOL)


@pytest.mark.parametrize("name", list(SCORES))
def test_ood_metrics_equal_sklearn(name):
    scores, is_out = SCORES[name]
    result = M.ood_metrics(scores[~is_out], scores[is_out])
    ordered_out = np.r_[np.zeros((~is_out).sum(), bool), np.ones(is_out.sum(), bool)]
    ordered = np.r_[scores[~is_out], scores[is_out]]
    assert abs(result.auroc - skm.roc_auc_score(ordered_out, ordered)) < TOL
    assert abs(result.aupr_out - skm.average_precision_score(ordered_out, ordered)) < TOL
    assert abs(result.aupr_in - skm.average_precision_score(~ordered_out, -ordered)) < TOL
    # FPR95: share of OOD samples accepted at the threshold that accepts 95% of in-distribution ones
    assert abs(result.fpr95 - sk_fpr_at_tpr(~ordered_out, -ordered)) < TOL
    assert (result.n_in, result.n_out) == ((~is_out).sum(), is_out.sum())


def test_ood_fpr95_hand_made():
    # 20 ID scores 0..19 (accept low scores): 95% of ID accepted at threshold 18 -> OOD scores <= 18
    # are accepted too: 3 of the 4 OOD samples (5, 10, 18; not 30).
    result = M.ood_metrics(np.arange(20.0), np.array([5.0, 10.0, 18.0, 30.0]))
    assert result.fpr95 == pytest.approx(3 / 4, abs=TOL)


@pytest.mark.parametrize("name", list(SCORES))
def test_rejection_metrics_equal_references(name):
    scores, correct = SCORES[name]
    conf = 1 / (1 + np.exp(-scores))  # squash to (0, 1) like a confidence
    result = M.rejection_metrics(conf, correct)
    assert abs(result.auroc - skm.roc_auc_score(correct, conf)) < TOL
    assert abs(result.fpr95 - sk_fpr_at_tpr(correct, conf)) < TOL
    assert abs(result.aurc - loop_aurc(conf.tolist(), correct.astype(int).tolist())) < TOL
    assert abs(result.accuracy - correct.mean()) < TOL


def test_auroc_nan_when_one_class_missing():
    assert np.isnan(M.auroc([0.1, 0.2], [True, True]))
    assert np.isnan(M.fpr_at_tpr([0.1, 0.2], [False, False]))


# ----------------------------------------------------------------------------- AURC / risk-coverage


def test_risk_coverage_curve_matches_direct_loop():
    rng = np.random.default_rng(3)
    for trial in range(10):
        n = int(rng.integers(1, 80))
        conf = np.round(rng.uniform(0, 1, n), 1 if trial % 2 else 6)
        correct = rng.random(n) < conf
        curve = M.risk_coverage(conf, correct)
        assert abs(curve.aurc - loop_aurc(conf.tolist(), correct.astype(int).tolist())) < TOL
        for cov, risk in zip(curve.coverage, curve.risk):
            threshold = np.sort(conf)[::-1][int(round(cov * n)) - 1]
            kept = conf >= threshold
            assert abs(kept.mean() - cov) < TOL and abs((~correct[kept]).mean() - risk) < TOL
        assert curve.coverage[-1] == pytest.approx(1.0, abs=TOL)


def test_aurc_hand_made():
    # most confident first: wrong, right, right, wrong -> risks 1, 1/2, 1/3, 2/4
    curve = M.risk_coverage([0.9, 0.8, 0.7, 0.6], [False, True, True, False])
    assert curve.aurc == pytest.approx((1 + 1 / 2 + 1 / 3 + 2 / 4) / 4, abs=TOL)
    assert curve.risk == pytest.approx([1, 1 / 2, 1 / 3, 1 / 2], abs=TOL)
    assert M.risk_coverage([0.5, 0.5], [True, False]).aurc == pytest.approx(0.5, abs=TOL), "ties accepted together"


# ----------------------------------------------------------------------------- ECE


def ece_cases():
    rng = np.random.default_rng(2)
    edges = np.arange(16) / 15
    cases = {
        "hand_made": ([0.95, 0.95, 0.55, 0.55, 0.25], [1, 0, 1, 1, 0]),
        "bin_edges_exactly": (edges.tolist(), [1, 0] * 8),
        "decimal_values": ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [1, 0, 1, 0, 1, 1, 0, 1, 1, 1]),
        "zero_and_one": ([0.0, 0.0, 1.0, 1.0], [0, 1, 1, 1]),
        "single_sample": ([0.42], [1]),
        "mostly_empty_bins": ([0.99] * 10 + [0.51] * 3, [1] * 9 + [0] + [1, 0, 0]),
        "all_correct_confident": ([1.0] * 5, [1] * 5),
    }
    for seed in range(6):
        n = int(rng.integers(10, 500))
        conf = rng.beta(5, 2, n) if seed % 2 else rng.uniform(0, 1, n)
        if seed == 4:
            conf = np.round(conf, 2)
        cases[f"random_{seed}"] = (conf.tolist(), (rng.random(n) < conf).astype(int).tolist())
    return cases


ECE_CASES = ece_cases()


@pytest.mark.parametrize("name", list(ECE_CASES))
@pytest.mark.parametrize("n_bins", [15, 10, 1])
def test_ece_equals_loop_implementation(name, n_bins):
    conf, correct = ECE_CASES[name]
    result = M.calibration_error(np.array(conf), np.array(correct), n_bins=n_bins)
    ece, mce, counts, accs = loop_ece(conf, correct, n_bins)
    assert result.n_bins == n_bins
    assert abs(result.ece - ece) < ECE_TOL, f"{name}/{n_bins}: ECE {result.ece} vs loop {ece}"
    assert abs(result.mce - mce) < ECE_TOL
    assert result.bin_count == counts
    for a, b in zip(result.bin_accuracy, accs):
        assert (a is None and b is None) or abs(a - b) < ECE_TOL


def test_ece_hand_made_value():
    # bin (14/15, 1]: conf .95, acc .5 -> gap .45 (2 samples); bin (8/15, 9/15]: conf .55, acc 1 -> .45 (2);
    # bin (3/15, 4/15]: conf .25, acc 0 -> .25 (1). ECE = (2*.45 + 2*.45 + .25) / 5 = 0.41, MCE = 0.45
    result = M.calibration_error(np.array([0.95, 0.95, 0.55, 0.55, 0.25]), np.array([1, 0, 1, 1, 0]))
    assert result.ece == pytest.approx(0.41, abs=ECE_TOL)
    assert result.mce == pytest.approx(0.45, abs=ECE_TOL)
    assert sum(c > 0 for c in result.bin_count) == 3 and result.bin_accuracy[0] is None


def test_ece_rejects_confidence_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.calibration_error(np.array([1.2]), np.array([1]))


# ----------------------------------------------------------------------------- report


def test_clustering_report_combines_the_pieces():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, (y + 1) % 5, rng.integers(0, 5, 200))  # 5 clusters, 4 classes
    conf = rng.uniform(0.2, 1.0, 200)
    report = M.clustering_report(y, pred, conf)
    match = M.hungarian_accuracy(y, pred)
    correct = match.map(pred) == y
    assert report.n == 200 and report.acc == match.accuracy and report.mapping == match.mapping
    assert abs(report.nmi - skm.normalized_mutual_info_score(y, pred)) < TOL
    assert abs(report.ari - skm.adjusted_rand_score(y, pred)) < TOL
    ece, *_ = loop_ece(conf.tolist(), correct.astype(int).tolist())
    assert abs(report.calibration.ece - ece) < ECE_TOL
    assert abs(report.rejection.auroc - skm.roc_auc_score(correct, conf)) < TOL
    assert abs(report.rejection.accuracy - report.acc) < TOL
    d = report.to_dict()
    assert set(d["mapping"]) == {str(k) for k in match.mapping} and d["calibration"]["n_bins"] == 15


def test_rank_metrics_with_infinite_and_nan_scores():
    """±inf scores rank as the extremes (only the order matters); a NaN score makes them undefined."""
    pos = np.array([True, True, False, False])
    assert M.auroc(np.array([np.inf, 3.0, 1.0, -np.inf]), pos) == 1.0
    assert M.average_precision(np.array([np.inf, 3.0, 1.0, -np.inf]), pos) == 1.0
    assert M.fpr_at_tpr(np.array([np.inf, 3.0, 1.0, -np.inf]), pos) == 0.0
    for metric in (M.auroc, M.average_precision, M.fpr_at_tpr):
        assert np.isnan(metric(np.array([np.nan, 3.0, 1.0, 0.0]), pos)), metric.__name__
