"""Evaluation numbers from plain arrays: AUC with a bootstrap CI, screening operating points, calibration, subgroups.

Bootstrap: cases are resampled with replacement from the whole set (not stratified by class), so the prevalence
varies between resamples as it would between samples of the screening population; resamples that happen to hold
one class only have no AUC and are skipped (``BinaryMetrics.bootstrap_resamples`` counts the ones used). Given
``clusters`` (a patient key per case), whole clusters are resampled with all their cases, since the views, breasts
and studies of one patient are not independent; without, each case is its own cluster (``BinaryMetrics.bootstrap``
says which).

Operating points: fitted on the evaluated set they are the best possible there, an optimistic figure; given
``thresholds`` set on other data (a validation split), the operating points are those thresholds applied to the
evaluated set, and the fitted ones are kept apart as ``oracle_operating_points``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

AGE_BANDS = ("<40", "40-49", "50-59", "60-69", "70+")
_TOLERANCE = 1e-9  # specificity 9/10 computed as 1 - 1/10 must still reach a 0.90 target
_BOOTSTRAP_CELLS = 1_000_000  # resampled cases held in memory at once
_AGE_UNITS_IN_YEARS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
EVALUATED_SET = "evaluated set"  # ``BinaryMetrics.thresholds_from`` when the operating points are fitted on it


def _jsonable(value: object) -> object:
    """Plain Python containers and numbers, floats rounded to 4 digits, non-finite floats as None."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(item) for item in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return round(float(value), 4) if math.isfinite(value) else None
    return value


class _Serialisable:
    """``to_dict()`` for the result dataclasses."""

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable fields (floats rounded to 4 digits, infinities as None)."""
        return cast(dict[str, object], _jsonable(dataclasses.asdict(self)))  # type: ignore[call-overload]


@dataclass(frozen=True)
class OperatingPoint(_Serialisable):
    """Sensitivity and specificity of calling score >= ``threshold`` positive, for the threshold that reaches
    ``target_specificity`` with the highest sensitivity on the set it was fitted on (``specificity`` may fall short
    of the target on another set).

    ``threshold`` is infinite when only "call nothing positive" reaches the target.
    """

    target_specificity: float
    threshold: float
    sensitivity: float
    specificity: float


@dataclass(frozen=True)
class BinaryMetrics(_Serialisable):
    """AUC with its percentile bootstrap 95% CI (None without usable resamples), operating points, ROC points.

    ``bootstrap``: "cluster" (``bootstrap_units`` clusters resampled with their cases) or "case" (each case alone).
    ``thresholds_from``: where the thresholds of ``operating_points`` were set, ``EVALUATED_SET`` when on these
    cases; otherwise ``oracle_operating_points`` are the ones fitted on these cases (empty when they are the main).
    """

    n: int
    positives: int
    auc: float
    auc_ci: tuple[float, float] | None
    bootstrap_resamples: int
    bootstrap: Literal["case", "cluster"]
    bootstrap_units: int
    operating_points: tuple[OperatingPoint, ...]
    thresholds_from: str
    oracle_operating_points: tuple[OperatingPoint, ...]
    fpr: tuple[float, ...]
    tpr: tuple[float, ...]


@dataclass(frozen=True)
class MulticlassMetrics(_Serialisable):
    """Accuracy figures, confusion matrix (rows = truth, columns = prediction), one-vs-rest AUCs (None if undefined)."""

    class_names: tuple[str, ...]
    n: int
    accuracy: float
    balanced_accuracy: float
    confusion: tuple[tuple[int, ...], ...]
    recall: dict[str, float | None]
    auc_ovr: dict[str, float | None]
    macro_auc_ovr: float | None


@dataclass(frozen=True)
class CalibrationBin(_Serialisable):
    """One equal-width probability bin; the means are None for an empty bin."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    observed_frequency: float | None


@dataclass(frozen=True)
class Calibration(_Serialisable):
    """Expected calibration error over equal-width bins, weighted by bin count."""

    n: int
    ece: float
    bins: tuple[CalibrationBin, ...]


@dataclass(frozen=True)
class SubgroupRow(_Serialisable):
    """One attribute value; ``auc`` and ``gap`` (AUC minus overall AUC) are None with ``reason`` when undefined."""

    attribute: str
    value: str
    n: int
    positives: int
    auc: float | None
    gap: float | None
    reason: str | None


@dataclass(frozen=True)
class SubgroupTable(_Serialisable):
    """Per-subgroup AUCs against the overall AUC."""

    overall_auc: float
    min_cases: int
    rows: tuple[SubgroupRow, ...]


def _binary_inputs(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray) -> tuple[
        np.ndarray, np.ndarray]:
    """Labels as 0/1 integers and finite float scores of the same length, or ValueError."""
    truth, score = np.asarray(y_true), np.asarray(y_score, dtype=float)
    if truth.ndim != 1 or truth.shape != score.shape:
        raise ValueError(f"y_true and y_score must be 1-D of one length, got shapes {truth.shape} and {score.shape}")
    if not np.isin(truth, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1")
    if not np.isfinite(score).all():
        raise ValueError("y_score must be finite")
    return truth.astype(int), score


def one_class_reason(truth: np.ndarray) -> str | None:
    """Why no AUC can be computed for these labels, or None when both classes are present."""
    positives = int(truth.sum())
    if positives in (0, len(truth)):
        return f"only one class ({positives} positives of {len(truth)})"
    return None


def _level_counts(levels: np.ndarray, truth: np.ndarray, n_levels: int,
                  weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per score level for each row of ``weights`` (rows x cases: how often each case
    counts)."""
    rows = weights.shape[0]
    flat = (levels[None] + n_levels * np.arange(rows)[:, None]).ravel()
    positives = np.bincount(flat, weights=(weights * truth).ravel(), minlength=rows * n_levels)
    totals = np.bincount(flat, weights=weights.ravel(), minlength=rows * n_levels)
    return positives.reshape(rows, n_levels), (totals - positives).reshape(rows, n_levels)


def _auc_from_counts(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """AUC per row from counts per score level in ascending order (ties count one half); NaN for one class."""
    below = np.cumsum(negatives, axis=1) - negatives
    pairs = positives.sum(axis=1) * negatives.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (positives * (below + 0.5 * negatives)).sum(axis=1) / pairs


def _score_levels(score: np.ndarray) -> tuple[np.ndarray, int]:
    """Rank of each score among the distinct scores, and the number of distinct scores."""
    distinct, levels = np.unique(score, return_inverse=True)
    return levels, len(distinct)


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney with ties as one half)."""
    levels, n_levels = _score_levels(score)
    return float(_auc_from_counts(*_level_counts(levels, truth, n_levels, np.ones((1, len(truth)))))[0])


def _cluster_indices(clusters: Sequence[Hashable] | None, n: int) -> np.ndarray:
    """Each case's cluster as an index from 0 in order of first appearance; each case its own without clusters."""
    if clusters is None:
        return np.arange(n)
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} clusters for {n} cases")
    positions: dict[Hashable, int] = {}
    return np.array([positions.setdefault(key, len(positions)) for key in clusters], dtype=int)


def _bootstrap_aucs(truth: np.ndarray, score: np.ndarray, cluster: np.ndarray, n_bootstrap: int,
                    rng: np.random.Generator) -> np.ndarray:
    """AUCs of resamples of the clusters with replacement (each drawn cluster brings all its cases), leaving out
    resamples with one class."""
    levels, n_levels = _score_levels(score)
    n_clusters = int(cluster.max()) + 1
    chunk = max(1, _BOOTSTRAP_CELLS // len(truth))
    aucs = [np.empty(0)]
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        picks = rng.integers(0, n_clusters, size=(rows, n_clusters)) + n_clusters * np.arange(rows)[:, None]
        drawn = np.bincount(picks.ravel(), minlength=rows * n_clusters).reshape(rows, n_clusters)
        aucs.append(_auc_from_counts(*_level_counts(levels, truth, n_levels, drawn[:, cluster])))
    resampled = np.concatenate(aucs)
    return resampled[~np.isnan(resampled)]


def _operating_points(truth: np.ndarray, score: np.ndarray, specificities: Iterable[float]) -> tuple[
        OperatingPoint, ...]:
    """For each target, the ROC point with the highest sensitivity whose specificity reaches it."""
    fpr, tpr, thresholds = roc_curve(truth, score, drop_intermediate=False)
    points = []
    for target in specificities:
        if not 0 <= target <= 1:
            raise ValueError(f"specificity targets must lie in [0, 1], got {target}")
        best = np.flatnonzero(1 - fpr >= target - _TOLERANCE)[-1]  # fpr and tpr never decrease along the curve
        points.append(OperatingPoint(float(target), float(thresholds[best]), float(tpr[best]), float(1 - fpr[best])))
    return tuple(points)


def _points_at(truth: np.ndarray, score: np.ndarray, thresholds: Mapping[float, float]) -> tuple[
        OperatingPoint, ...]:
    """Sensitivity and specificity at thresholds set elsewhere (target specificity -> threshold)."""
    points = []
    for target, threshold in thresholds.items():
        called = score >= threshold
        points.append(OperatingPoint(float(target), float(threshold), float(called[truth == 1].mean()),
                                     float(1 - called[truth == 0].mean())))
    return tuple(points)


def binary_metrics(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray, *,
                   n_bootstrap: int = 1000, seed: int = 0, specificities: Sequence[float] = (0.90, 0.95),
                   thresholds: Mapping[float, float] | None = None, thresholds_from: str = "other data",
                   clusters: Sequence[Hashable] | None = None) -> BinaryMetrics:
    """AUC with a percentile bootstrap 95% CI (over ``clusters`` when given), the ROC curve and the operating
    points: ``thresholds`` (target specificity -> threshold, set on ``thresholds_from``) applied to these cases,
    else the ones fitted here at ``specificities``."""
    truth, score = _binary_inputs(y_true, y_score)
    reason = one_class_reason(truth)
    if reason is not None:
        raise ValueError(f"binary metrics need both classes: {reason}")
    cluster = _cluster_indices(clusters, len(truth))
    resampled = _bootstrap_aucs(truth, score, cluster, n_bootstrap, np.random.default_rng(seed))
    ci = (float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))) if len(resampled) else None
    fpr, tpr, _ = roc_curve(truth, score)
    fitted = _operating_points(truth, score, specificities)
    return BinaryMetrics(n=len(truth), positives=int(truth.sum()), auc=_auc(truth, score), auc_ci=ci,
                         bootstrap_resamples=len(resampled), bootstrap="case" if clusters is None else "cluster",
                         bootstrap_units=int(cluster.max()) + 1,
                         operating_points=fitted if thresholds is None else _points_at(truth, score, thresholds),
                         thresholds_from=EVALUATED_SET if thresholds is None else thresholds_from,
                         oracle_operating_points=() if thresholds is None else fitted,
                         fpr=tuple(fpr.tolist()), tpr=tuple(tpr.tolist()))


def _class_indices(labels: Sequence[str] | Sequence[int] | np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Labels given as class names or as integer indices, as indices into ``class_names``."""
    positions = {name: i for i, name in enumerate(class_names)}
    indices = [int(label) if isinstance(label, int | np.integer) else positions.get(label, -1) for label in labels]
    if not indices or any(not 0 <= i < len(class_names) for i in indices):
        raise ValueError(f"labels must be a non-empty list of class names or indices of {list(class_names)}")
    return np.array(indices, dtype=int)


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def multiclass_metrics(y_true_labels: Sequence[str] | Sequence[int] | np.ndarray,
                       probabilities: Sequence[Sequence[float]] | np.ndarray,
                       class_names: Sequence[str]) -> MulticlassMetrics:
    """Accuracy, balanced accuracy, confusion matrix and one-vs-rest AUCs of argmax predictions."""
    truth = _class_indices(y_true_labels, class_names)
    probs = np.asarray(probabilities, dtype=float)
    if probs.shape != (len(truth), len(class_names)):
        raise ValueError(f"probabilities must have shape ({len(truth)}, {len(class_names)}), got {probs.shape}")
    matrix = confusion_matrix(truth, probs.argmax(axis=1), labels=range(len(class_names)))
    recall = [_ratio(matrix[k, k], matrix[k].sum()) for k in range(len(class_names))]
    auc_ovr = [None if one_class_reason(truth == k) else _auc((truth == k).astype(int), probs[:, k])
               for k in range(len(class_names))]
    defined = [value for value in recall if value is not None]
    return MulticlassMetrics(
        class_names=tuple(class_names), n=len(truth), accuracy=float(np.trace(matrix) / len(truth)),
        balanced_accuracy=float(np.mean(defined)), confusion=tuple(tuple(int(c) for c in row) for row in matrix),
        recall=dict(zip(class_names, recall, strict=True)), auc_ovr=dict(zip(class_names, auc_ovr, strict=True)),
        macro_auc_ovr=None if None in auc_ovr else float(np.mean(cast(list[float], auc_ovr))))


def calibration(y_true: Sequence[int] | np.ndarray, y_prob: Sequence[float] | np.ndarray,
                n_bins: int = 10) -> Calibration:
    """Expected calibration error over ``n_bins`` equal-width bins of [0, 1] (1.0 falls in the last bin)."""
    truth, prob = _binary_inputs(y_true, y_prob)
    if not ((prob >= 0) & (prob <= 1)).all():
        raise ValueError("y_prob must lie in [0, 1]")
    which = np.minimum((prob * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = which == b
        count = int(inside.sum())
        bins.append(CalibrationBin(lower=b / n_bins, upper=(b + 1) / n_bins, count=count,
                                   mean_confidence=float(prob[inside].mean()) if count else None,
                                   observed_frequency=float(truth[inside].mean()) if count else None))
    ece = sum(b.count * abs(b.mean_confidence - b.observed_frequency) for b in bins if b.count) / len(truth)
    return Calibration(n=len(truth), ece=float(ece), bins=tuple(bins))


def _value_order(value: str) -> tuple[int, str]:
    """Sort key: age bands in age order, then everything else alphabetically."""
    return (AGE_BANDS.index(value) if value in AGE_BANDS else len(AGE_BANDS), value)


def _subgroup_row(attribute: str, value: str, truth: np.ndarray, score: np.ndarray, overall: float,
                  min_cases: int) -> SubgroupRow:
    reason = f"fewer than {min_cases} cases" if len(truth) < min_cases else one_class_reason(truth)
    auc = None if reason else _auc(truth, score)
    return SubgroupRow(attribute=attribute, value=value, n=len(truth), positives=int(truth.sum()), auc=auc,
                       gap=None if auc is None else auc - overall, reason=reason)


def subgroup_table(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
                   groups: Mapping[str, Sequence[str | None]], min_cases: int = 10) -> SubgroupTable:
    """AUC per value of each attribute (density, age band, manufacturer, view...); a missing value is "unknown"."""
    truth, score = _binary_inputs(y_true, y_score)
    reason = one_class_reason(truth)
    if reason is not None:
        raise ValueError(f"subgroup AUCs need both classes overall: {reason}")
    overall = _auc(truth, score)
    rows = []
    for attribute, values in groups.items():
        if len(values) != len(truth):
            raise ValueError(f"{attribute!r} has {len(values)} values for {len(truth)} cases")
        labels = np.array(["unknown" if v is None else str(v) for v in values])
        for value in sorted(set(labels.tolist()), key=_value_order):
            inside = labels == value
            rows.append(_subgroup_row(attribute, value, truth[inside], score[inside], overall, min_cases))
    return SubgroupTable(overall_auc=overall, min_cases=min_cases, rows=tuple(rows))


def parse_patient_age(value: str | None) -> float | None:
    """Age in years from a DICOM Age String ("052Y", "006M", "010W", "021D"); None when absent or malformed."""
    match = re.fullmatch(r"(\d{1,3})([DWMY])", (value or "").strip().upper())
    return int(match[1]) * _AGE_UNITS_IN_YEARS[match[2]] if match else None


def age_band(age_years: float | None) -> str:
    """Screening age band: "<40", "40-49", "50-59", "60-69", "70+"; "unknown" without an age."""
    if age_years is None:
        return "unknown"
    if age_years < 0:
        raise ValueError(f"age must not be negative, got {age_years}")
    decade = int(age_years // 10)
    return AGE_BANDS[0] if decade < 4 else AGE_BANDS[-1] if decade >= 7 else f"{decade}0-{decade}9"


def aggregate_scores(view_scores: Sequence[float] | np.ndarray, keys: Sequence[Hashable],
                     how: Literal["max", "mean"] = "max") -> dict[Hashable, float]:
    """View-level scores combined per key (breast or study), in order of first appearance; labels aggregate alike."""
    if how not in ("max", "mean"):
        raise ValueError(f"how must be 'max' or 'mean', got {how!r}")
    if len(view_scores) != len(keys):
        raise ValueError(f"{len(view_scores)} scores for {len(keys)} keys")
    grouped: dict[Hashable, list[float]] = {}
    for key, score in zip(keys, view_scores, strict=True):
        grouped.setdefault(key, []).append(float(score))
    combine = max if how == "max" else lambda scores: sum(scores) / len(scores)
    return {key: combine(scores) for key, scores in grouped.items()}
