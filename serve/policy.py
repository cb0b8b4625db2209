"""Per-image decisions and the threshold policies that set them. numpy only.

Decisions, in order of precedence:

* ``error``    – the file could not be read (no prediction at all);
* ``ood``      – ``ood_score`` above the OOD threshold (default: the one fitted at export and stored
  in the model's metadata, ``ood.threshold``); an OOD image is not a confident member of any
  cluster, whatever its confidence;
* ``rejected`` – confidence below the confidence threshold;
* ``accepted`` – everything else.

The confidence threshold comes from one of three policies, fitted on the *in-distribution*
images of the run (readable and not flagged OOD):

* ``min_confidence T`` – a fixed threshold (default: the model's ``confidence_threshold``);
* ``coverage F`` – accept the most confident fraction F: t = the ⌈F·n⌉-th largest confidence;
* ``target_accuracy A`` – label-free risk control: accept the largest set {confidence ≥ t} whose
  mean confidence is ≥ A. For a calibrated model, P(correct | confidence = c) ≈ c, so the mean
  confidence of a set estimates its accuracy (CDC, "Towards Calibrated Deep Clustering Network" §1 and §4.1: a calibrated
  confidence is what makes selective prediction meaningful); that estimate and the coverage are
  reported. It is only an estimate: on a model whose metadata says it is not calibrated the figure
  means little and a warning says so.

Thresholds are "≥ t" rules on the confidence, so the same image always gets the same decision for a
given threshold, independent of batch or order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from calibclust.errors import InputError

POLICIES = ("min_confidence", "coverage", "target_accuracy")
ACCEPTED, REJECTED, OOD, ERROR = "accepted", "rejected", "ood", "error"


@dataclass(frozen=True)
class Policy:
    """How to decide. ``value`` None means "the model's default" (only for ``min_confidence``).

    ``ood_threshold``: None = the model's fitted threshold; ``math.inf`` disables OOD flags.
    """

    kind: str = "min_confidence"
    value: float | None = None
    ood_threshold: float | None = None

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise InputError(f"policy must be one of {POLICIES}, got {self.kind!r}")
        if self.value is None and self.kind != "min_confidence":
            raise InputError(f"policy {self.kind} needs a value")
        if self.value is not None:
            v = float(self.value)
            if math.isnan(v) or not 0.0 <= v <= 1.0:
                raise InputError(f"--{self.kind.replace('_', '-')} must be in [0, 1], got {self.value}")
            if self.kind == "coverage" and v == 0.0:
                raise InputError("--coverage must be > 0 (coverage 0 accepts nothing)")

    @classmethod
    def choose(cls, target_accuracy: float | None = None, coverage: float | None = None,
               confidence_threshold: float | None = None, ood_threshold: float | None = None) -> "Policy":
        """The policy of at most one of ``--target-accuracy``, ``--coverage`` and
        ``--confidence-threshold`` (none: the model's default confidence threshold)."""
        chosen = [(kind, value) for kind, value in (("target_accuracy", target_accuracy), ("coverage", coverage),
                                                    ("min_confidence", confidence_threshold)) if value is not None]
        if len(chosen) > 1:
            raise InputError(f"choose one rejection policy, got {', '.join(kind for kind, _ in chosen)}")
        kind, value = chosen[0] if chosen else ("min_confidence", None)
        return cls(kind, value, ood_threshold)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Thresholds:
    """What a policy resolved to on one set of predictions, plus the label-free estimates."""

    policy: str
    policy_value: float | None
    confidence_threshold: float  # accept confidence >= this (inf = accept nothing)
    ood_threshold: float | None  # flag ood_score > this (None = no OOD flags)
    n_images: int = 0  # readable images
    n_in_distribution: int = 0  # readable and not OOD
    n_accepted: int = 0
    coverage: float = float("nan")  # accepted / readable
    coverage_in_distribution: float = float("nan")  # accepted / in-distribution
    estimated_accuracy: float = float("nan")  # mean confidence of the accepted set
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def ood_threshold_for(policy: Policy, model_threshold: float | None) -> float | None:
    if policy.ood_threshold is not None:
        return None if math.isinf(policy.ood_threshold) else float(policy.ood_threshold)
    return None if model_threshold is None else float(model_threshold)


def ood_mask(ood_score: np.ndarray, threshold: float | None) -> np.ndarray:
    if threshold is None:
        return np.zeros(len(ood_score), bool)
    return np.asarray(ood_score, np.float64) > threshold  # NaN (error rows) compares False


def coverage_threshold(confidence: np.ndarray, fraction: float) -> float:
    """Smallest t such that {c ≥ t} holds the ⌈F·n⌉ most confident images (more only on ties)."""
    c = np.sort(np.asarray(confidence, np.float64))[::-1]
    if len(c) == 0:
        return math.inf
    k = min(len(c), max(1, math.ceil(fraction * len(c) - 1e-9)))
    return float(c[k - 1])


def target_accuracy_threshold(confidence: np.ndarray, target: float) -> float:
    """Smallest t such that mean{c : c ≥ t} ≥ target; inf when even the top image misses it.

    Sorting descending, the running mean of the top-k confidences never increases with k, so the
    largest admissible set is the last prefix whose running mean is still ≥ target. Only prefixes
    that end at a change of value are thresholds (ties go in or out together).
    """
    c = np.sort(np.asarray(confidence, np.float64))[::-1]
    if len(c) == 0:
        return math.inf
    running_mean = np.cumsum(c) / np.arange(1, len(c) + 1)
    boundary = np.append(c[1:] < c[:-1], True)  # prefix k ends where the next value is smaller
    ok = np.flatnonzero(boundary & (running_mean >= target - 1e-12))
    if len(ok) == 0:
        return math.inf
    return float(c[ok[-1]])


def fit_thresholds(
    confidence: np.ndarray,
    ood_score: np.ndarray,
    readable: np.ndarray,
    policy: Policy,
    model_confidence_threshold: float,
    model_ood_threshold: float | None,
    calibrated: bool = True,
) -> Thresholds:
    """Resolve ``policy`` on a whole run's predictions (error rows: ``readable`` False)."""
    confidence = np.asarray(confidence, np.float64)
    readable = np.asarray(readable, bool)
    ood_thr = ood_threshold_for(policy, model_ood_threshold)
    in_dist = in_distribution(ood_score, readable, ood_thr)
    conf_in = confidence[in_dist]
    warnings = []
    if policy.kind == "min_confidence":
        thr = model_confidence_threshold if policy.value is None else float(policy.value)
    elif policy.kind == "coverage":
        thr = coverage_threshold(conf_in, float(policy.value))
    else:
        thr = target_accuracy_threshold(conf_in, float(policy.value))
        if math.isinf(thr) and len(conf_in):
            warnings.append(
                f"no set of images reaches an estimated accuracy of {policy.value:.3f} "
                f"(the most confident image has confidence {conf_in.max():.3f}); nothing is accepted"
            )
    if policy.kind == "target_accuracy" and not calibrated:
        warnings.append(
            "the model's metadata says its probabilities are not calibrated: mean confidence is not a "
            "reliable estimate of accuracy, so --target-accuracy may miss its target"
        )
    accepted = in_dist & (confidence >= thr)
    n_readable, n_in, n_acc = int(readable.sum()), int(in_dist.sum()), int(accepted.sum())
    return Thresholds(
        policy=policy.kind,
        policy_value=None if policy.value is None else float(policy.value),
        confidence_threshold=float(thr),
        ood_threshold=ood_thr,
        n_images=n_readable,
        n_in_distribution=n_in,
        n_accepted=n_acc,
        coverage=n_acc / n_readable if n_readable else float("nan"),
        coverage_in_distribution=n_acc / n_in if n_in else float("nan"),
        estimated_accuracy=float(confidence[accepted].mean()) if n_acc else float("nan"),
        warnings=warnings,
    )


def in_distribution(ood_score: np.ndarray, readable: np.ndarray, ood_threshold: float | None) -> np.ndarray:
    """Readable rows not flagged OOD: the population the confidence threshold, the coverage and the
    report's accuracy-vs-coverage curve are about."""
    return np.asarray(readable, bool) & ~ood_mask(ood_score, ood_threshold)


def decide(
    confidence: np.ndarray, ood_score: np.ndarray, readable: np.ndarray, thresholds: Thresholds
) -> np.ndarray:
    """Decision strings (object array) for rows, given resolved thresholds."""
    confidence = np.asarray(confidence, np.float64)
    readable = np.asarray(readable, bool)
    out = np.full(len(confidence), ERROR, dtype=object)
    is_ood = readable & ood_mask(ood_score, thresholds.ood_threshold)
    out[is_ood] = OOD
    rest = readable & ~is_ood
    out[rest & (confidence >= thresholds.confidence_threshold)] = ACCEPTED
    out[rest & ~(confidence >= thresholds.confidence_threshold)] = REJECTED
    return out


def accuracy_coverage_curve(confidence: np.ndarray, points: int = 101) -> dict[str, np.ndarray]:
    """Label-free estimated accuracy (mean confidence of the accepted set) vs coverage when
    accepting the most confident fraction, for the report's curve."""
    c = np.sort(np.asarray(confidence, np.float64))[::-1]
    if len(c) == 0:
        return {"coverage": np.zeros(0), "estimated_accuracy": np.zeros(0)}
    k = np.unique(np.clip(np.round(np.linspace(1 / len(c), 1.0, points) * len(c)).astype(int), 1, len(c)))
    running_mean = np.cumsum(c) / np.arange(1, len(c) + 1)
    return {"coverage": k / len(c), "estimated_accuracy": running_mean[k - 1], "threshold": c[k - 1]}
