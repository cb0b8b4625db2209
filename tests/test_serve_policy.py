"""Decision policies: thresholds against brute force, and label-free risk control on synthetic
calibrated confidences (correct ~ Bernoulli(confidence))."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibclust.errors import InputError
from calibclust.serve.policy import (
    Policy,
    accuracy_coverage_curve,
    coverage_threshold,
    decide,
    fit_thresholds,
    target_accuracy_threshold,
)


def _brute_force_target(conf: np.ndarray, target: float) -> float:
    best = math.inf
    for t in np.unique(conf):
        sel = conf >= t
        if conf[sel].mean() >= target - 1e-12:
            best = min(best, t)
    return best


def test_target_accuracy_threshold_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(30):
        conf = np.round(rng.beta(5, 2, rng.integers(1, 60)), 2)  # rounding makes ties
        for target in (0.5, 0.7, 0.8, 0.9, 0.99):
            assert target_accuracy_threshold(conf, target) == _brute_force_target(conf, target), (trial, target)


def test_target_accuracy_hand_made():
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.6, 0.3])
    # running means: .99, .97, .9467, .91, .848, .7567
    assert target_accuracy_threshold(conf, 0.9) == 0.8
    assert target_accuracy_threshold(conf, 0.95) == 0.95
    assert target_accuracy_threshold(conf, 0.75) == 0.3
    assert target_accuracy_threshold(conf, 0.995) == math.inf
    assert target_accuracy_threshold(np.array([]), 0.9) == math.inf


def test_coverage_threshold_hand_made():
    conf = np.array([0.2, 0.9, 0.5, 0.7, 0.8, 0.6, 0.3, 0.4, 0.1, 0.95])
    assert coverage_threshold(conf, 0.3) == 0.8  # the 3 most confident
    assert coverage_threshold(conf, 0.25) == 0.8  # ceil(2.5) = 3
    assert coverage_threshold(conf, 1.0) == 0.1
    assert coverage_threshold(conf, 0.01) == 0.95  # at least one image


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_target_accuracy_is_met_on_calibrated_confidences(target):
    """With calibrated confidences the accepted set's realised accuracy lands on the target."""
    rng = np.random.default_rng(int(target * 100))
    n = 40_000
    conf = rng.beta(6, 1.5, n).clip(1e-3, 1 - 1e-6)
    correct = rng.random(n) < conf  # calibrated by construction: P(correct | c) = c
    th = fit_thresholds(conf, np.zeros(n), np.ones(n, bool), Policy("target_accuracy", target), 0.5, None)
    accepted = conf >= th.confidence_threshold
    realised = correct[accepted].mean()
    assert th.estimated_accuracy >= target
    assert abs(realised - target) < 0.015, (
        f"target {target}: realised accuracy {realised:.4f}, estimated {th.estimated_accuracy:.4f}, "
        f"coverage {th.coverage:.3f}")
    # Largest set: one more image (the next most confident) would drop the estimate below target.
    nxt = np.sort(conf[~accepted])[-1]
    assert conf[conf >= nxt].mean() < target
    assert th.coverage == pytest.approx(accepted.mean())


def test_overconfident_model_misses_target_and_warns():
    """What calibration buys: the same policy on over-confident scores over-promises."""
    rng = np.random.default_rng(1)
    n = 40_000
    true_p = rng.beta(4, 2, n)
    correct = rng.random(n) < true_p
    overconfident = true_p ** 0.3  # same ranking, inflated values
    th = fit_thresholds(overconfident, np.zeros(n), np.ones(n, bool), Policy("target_accuracy", 0.9), 0.5, None,
                        calibrated=False)
    realised = correct[overconfident >= th.confidence_threshold].mean()
    assert realised < 0.85, f"realised {realised:.3f} (estimated {th.estimated_accuracy:.3f})"
    assert any("not calibrated" in w for w in th.warnings)


def test_unreachable_target_accepts_nothing_with_warning():
    conf = np.array([0.6, 0.7])
    th = fit_thresholds(conf, np.zeros(2), np.ones(2, bool), Policy("target_accuracy", 0.9), 0.5, None)
    assert th.n_accepted == 0 and math.isinf(th.confidence_threshold)
    assert "nothing is accepted" in th.warnings[0]
    assert th.to_dict()["confidence_threshold"] is None and th.to_dict()["estimated_accuracy"] is None


def test_decide_precedence_and_ood_defaults():
    conf = np.array([0.9, 0.2, 0.9, 0.2, np.nan])
    ood = np.array([0.1, 0.1, 0.8, 0.8, np.nan])
    readable = np.array([True, True, True, True, False])
    th = fit_thresholds(conf, ood, readable, Policy(), model_confidence_threshold=0.5, model_ood_threshold=0.5)
    assert decide(conf, ood, readable, th).tolist() == ["accepted", "rejected", "ood", "ood", "error"]
    assert th.n_images == 4 and th.n_in_distribution == 2 and th.coverage == 0.25
    # Explicit values override the model's; inf disables OOD flags.
    th2 = fit_thresholds(conf, ood, readable, Policy("min_confidence", 0.1, math.inf), 0.5, 0.5)
    assert th2.ood_threshold is None
    assert decide(conf, ood, readable, th2).tolist() == ["accepted"] * 4 + ["error"]
    # Coverage is fitted on in-distribution images only.
    th3 = fit_thresholds(conf, ood, readable, Policy("coverage", 0.5), 0.5, 0.5)
    assert th3.confidence_threshold == 0.9 and th3.coverage_in_distribution == 0.5


def test_policy_validation():
    with pytest.raises(InputError, match="needs a value"):
        Policy("coverage")
    with pytest.raises(InputError, match=r"must be in \[0, 1\]"):
        Policy("target_accuracy", 1.5)
    with pytest.raises(InputError, match="coverage must be > 0"):
        Policy("coverage", 0.0)
    with pytest.raises(InputError, match="policy must be one of"):
        Policy("magic", 0.5)


def test_accuracy_coverage_curve_is_running_mean():
    conf = np.array([0.9, 0.5, 0.7, 0.8])
    curve = accuracy_coverage_curve(conf, points=5)
    np.testing.assert_allclose(curve["coverage"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve["estimated_accuracy"], [0.9, 0.85, 0.8, 0.725])
