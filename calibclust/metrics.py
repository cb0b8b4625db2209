"""Clustering, calibration, failure-rejection and OOD metrics (numpy, scipy, scikit-learn; no torch).

This is the one metrics module: training logs, ``calibclust evaluate``, the quick start and the
benchmarks all call it. NMI, ARI, ROC, AUROC and average precision are scikit-learn's (imported
when called: ``calibclust label`` starts without it); Hungarian ACC, ECE/MCE, AURC and the
risk–coverage curve, which scikit-learn lacks, are here. Each function's docstring gives the formula and its source. Scores use
the convention of the CDC paper ("Towards Calibrated Deep Clustering Network", §4.1): *confidence* is the max calibrated
probability (higher = more trustworthy), an *OOD score* is higher for more out-of-distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

ECE_BINS = 15  # CDC paper §4.1 follows Naeini et al. (2015); 15 equal-width bins is the common choice.


def _as_labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return y.astype(np.int64, copy=False)


def contingency_matrix(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts ``M[i, j]`` of samples with class ``classes[i]`` and cluster ``clusters[j]``."""
    y_true, y_pred = _as_labels(y_true), _as_labels(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in length")
    classes, t = np.unique(y_true, return_inverse=True)
    clusters, p = np.unique(y_pred, return_inverse=True)
    matrix = np.zeros((len(classes), len(clusters)), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix, classes, clusters


@dataclass
class HungarianResult:
    accuracy: float
    mapping: dict[int, int]  # cluster id -> class id; clusters left unmatched are absent

    def map(self, y_pred, unmatched: int = -1) -> np.ndarray:
        y_pred = _as_labels(y_pred)
        out = np.full_like(y_pred, unmatched)
        for cluster, cls in self.mapping.items():
            out[y_pred == cluster] = cls
        return out


def hungarian_accuracy(y_true, y_pred) -> HungarianResult:
    """Clustering accuracy ACC (Li & Ding, 2006) with the best one-to-one cluster→class map.

    ``ACC = max_m (1/N) Σ_i 1[y_i = m(c_i)]``, ``m`` found by the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment`` on the contingency matrix). With more clusters than
    classes the extra clusters stay unmatched and their samples count as wrong.
    """
    matrix, classes, clusters = contingency_matrix(y_true, y_pred)
    n = matrix.sum()
    if n == 0:
        return HungarianResult(float("nan"), {})
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    mapping = {int(clusters[c]): int(classes[r]) for r, c in zip(rows, cols)}
    return HungarianResult(float(matrix[rows, cols].sum() / n), mapping)


def normalized_mutual_info(y_true, y_pred) -> float:
    """NMI (Strehl & Ghosh, 2002) with the arithmetic-mean normaliser:
    ``NMI = I(Y; C) / ((H(Y) + H(C)) / 2)``; 1.0 when both partitions are a single block.
    scikit-learn's ``normalized_mutual_info_score``."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(_as_labels(y_true), _as_labels(y_pred)))


def adjusted_rand_index(y_true, y_pred) -> float:
    """ARI (Hubert & Arabie, 1985): ``(RI - E[RI]) / (max RI - E[RI])`` from pair counts;
    scikit-learn's ``adjusted_rand_score``."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(_as_labels(y_true), _as_labels(y_pred)))


@dataclass
class CalibrationResult:
    """ECE/MCE and reliability-diagram data. Bin ``b`` covers ``(b/n_bins, (b+1)/n_bins]``
    (confidence exactly 0 falls in bin 0)."""

    ece: float
    mce: float
    n_bins: int
    bin_count: list[int]
    bin_accuracy: list[float | None]  # None for an empty bin
    bin_confidence: list[float | None]

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> CalibrationResult:
    """Expected and maximum calibration error (Naeini et al., 2015; CDC paper §2 and §4.1).

    ``ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|`` and ``MCE = max_b |acc(B_b) − conf(B_b)|`` over
    non-empty equal-width bins of the confidence.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError("confidence and correct must be 1-D arrays of the same length")
    if confidence.size and (confidence.min() < 0 or confidence.max() > 1):
        raise ValueError("confidence must lie in [0, 1]")
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    nonempty = count > 0
    acc = np.where(nonempty, acc_sum / np.maximum(count, 1), np.nan)
    conf = np.where(nonempty, conf_sum / np.maximum(count, 1), np.nan)
    gaps = np.abs(acc - conf)[nonempty]
    n = confidence.size
    ece = float((count[nonempty] / n * gaps).sum()) if n else float("nan")
    mce = float(gaps.max()) if gaps.size else float("nan")

    def listed(values):
        return [None if np.isnan(v) else float(v) for v in values]

    return CalibrationResult(ece, mce, n_bins, count.tolist(), listed(acc), listed(conf))


def _both_classes(positives: np.ndarray) -> bool:
    return bool(positives.any() and (~positives).any())


def _rankable(scores) -> np.ndarray | None:
    """Scores sklearn accepts, in the same order: ±inf become ranks (these metrics depend only on the
    order); None when a score is NaN (the metric is then undefined: NaN, as before sklearn)."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        return None
    if not np.isfinite(scores).all():
        from scipy.stats import rankdata

        return rankdata(scores)
    return scores


def roc_curve_points(scores, positives) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve for "higher score = positive": (fpr, tpr, thresholds), one point per distinct score
    plus the origin (scikit-learn's ``roc_curve`` without dropping collinear points). Ties share one
    point, so the area below is exact for tied scores."""
    from sklearn.metrics import roc_curve

    positives = np.asarray(positives, dtype=bool)
    ranked = _rankable(scores)
    # With one class (or a NaN score) the curve is undefined: the origin only (fpr_at_tpr, the one
    # caller, returns NaN there first).
    if ranked is None or not _both_classes(positives):
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    fpr, tpr, thresholds = roc_curve(positives, ranked, drop_intermediate=False)
    return fpr, tpr, thresholds


def auroc(scores, positives) -> float:
    """Area under the ROC curve, the Mann–Whitney statistic ``P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)``
    (scikit-learn's ``roc_auc_score``); NaN when one class is absent."""
    from sklearn.metrics import roc_auc_score

    positives = np.asarray(positives, dtype=bool)
    ranked = _rankable(scores)
    if ranked is None or not _both_classes(positives):
        return float("nan")
    return float(roc_auc_score(positives, ranked))


def fpr_at_tpr(scores, positives, tpr_level: float = 0.95) -> float:
    """FPR at the first ROC point whose TPR reaches ``tpr_level`` (FPR95; Zhu et al., 2022)."""
    positives = np.asarray(positives, dtype=bool)
    if _rankable(scores) is None or not _both_classes(positives):
        return float("nan")
    fpr, tpr, _ = roc_curve_points(scores, positives)
    return float(fpr[np.argmax(tpr >= tpr_level - 1e-12)])


def average_precision(scores, positives) -> float:
    """AUPR as average precision ``Σ_n (R_n − R_{n−1}) P_n`` over distinct thresholds (step-wise,
    no interpolation): scikit-learn's ``average_precision_score``; NaN without positives."""
    from sklearn.metrics import average_precision_score

    positives = np.asarray(positives, dtype=bool)
    ranked = _rankable(scores)
    if ranked is None or not positives.any():
        return float("nan")
    return float(average_precision_score(positives, ranked))


@dataclass
class RiskCoverage:
    coverage: list[float]  # fraction kept, most confident first
    risk: list[float]  # error rate of the kept samples
    aurc: float


def risk_coverage(confidence, correct) -> RiskCoverage:
    """Risk–coverage curve and AURC (Geifman & El-Yaniv, 2017; CDC paper Fig. 3).

    Samples are accepted in order of decreasing confidence; at coverage ``k/N`` the risk is the
    error rate of the ``k`` accepted samples. ``AURC = (1/N) Σ_k risk(k/N)``. Ties in confidence
    are accepted together (the curve is evaluated at the end of each tie group, and AURC weights
    each group's risk by its size), so the result does not depend on the input order.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    wrong = ~np.asarray(correct, dtype=bool)
    n = confidence.size
    if n == 0:
        return RiskCoverage([], [], float("nan"))
    order = np.argsort(-confidence, kind="mergesort")
    c, w = confidence[order], wrong[order]
    ends = np.r_[np.flatnonzero(np.diff(c)), n - 1]
    errors = np.cumsum(w)[ends]
    kept = ends + 1.0
    risk = errors / kept
    group_sizes = np.diff(np.r_[0, kept])
    aurc = float((risk * group_sizes).sum() / n)
    return RiskCoverage((kept / n).tolist(), risk.tolist(), aurc)


@dataclass
class RejectionResult:
    """How well confidence separates correct from wrong predictions (CDC paper §4.1, Fig. 3)."""

    auroc: float  # correct = positive class, confidence as score
    aurc: float
    fpr95: float  # share of wrong predictions kept when 95% of correct ones are kept
    accuracy: float


def rejection_metrics(confidence, correct) -> RejectionResult:
    correct = np.asarray(correct, dtype=bool)
    return RejectionResult(
        auroc=auroc(confidence, correct),
        aurc=risk_coverage(confidence, correct).aurc,
        fpr95=fpr_at_tpr(confidence, correct, 0.95),
        accuracy=float(correct.mean()) if correct.size else float("nan"),
    )


@dataclass
class OODResult:
    """In-distribution vs OOD separation for a score where higher = more OOD."""

    auroc: float  # OOD = positive
    fpr95: float  # share of OOD samples accepted when 95% of in-distribution ones are accepted
    aupr_out: float  # OOD = positive
    aupr_in: float  # in-distribution = positive, score negated
    n_in: int
    n_out: int


def ood_metrics(score_in, score_out) -> OODResult:
    score_in = np.asarray(score_in, dtype=np.float64)
    score_out = np.asarray(score_out, dtype=np.float64)
    scores = np.r_[score_in, score_out]
    is_out = np.r_[np.zeros(score_in.size, bool), np.ones(score_out.size, bool)]
    return OODResult(
        auroc=auroc(scores, is_out),
        # ID is the positive class of the "accept" decision: accept when -score is high.
        fpr95=fpr_at_tpr(-scores, ~is_out, 0.95),
        aupr_out=average_precision(scores, is_out),
        aupr_in=average_precision(-scores, ~is_out),
        n_in=int(score_in.size),
        n_out=int(score_out.size),
    )


@dataclass
class ClusteringReport:
    """Everything ``calibclust evaluate`` and the training logs report for one set of predictions."""

    n: int
    acc: float
    nmi: float
    ari: float
    mapping: dict[int, int]
    calibration: CalibrationResult
    rejection: RejectionResult
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mapping"] = {str(k): v for k, v in self.mapping.items()}
        return d


def clustering_report(y_true, y_pred, confidence, n_bins: int = ECE_BINS) -> ClusteringReport:
    """ACC/NMI/ARI, and calibration and rejection metrics with correctness judged after the
    Hungarian cluster→class mapping (unsupervised predictions have no other notion of "correct")."""
    y_true, y_pred = _as_labels(y_true), _as_labels(y_pred)
    match = hungarian_accuracy(y_true, y_pred)
    correct = match.map(y_pred) == y_true
    return ClusteringReport(
        n=int(y_true.size),
        acc=match.accuracy,
        nmi=normalized_mutual_info(y_true, y_pred),
        ari=adjusted_rand_index(y_true, y_pred),
        mapping=match.mapping,
        calibration=calibration_error(confidence, correct, n_bins),
        rejection=rejection_metrics(confidence, correct),
    )
