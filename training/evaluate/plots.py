"""PNG figures of evaluation results: ROC curves, reliability diagram, confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
import numpy as np
from matplotlib.figure import Figure

from training.evaluate.metrics import EVALUATED_SET, BinaryMetrics, Calibration, MulticlassMetrics

DPI = 120
_MARKERS = "os^Dv*"


def _save(figure: Figure, path: Path | str) -> Path:
    """Write the figure as a PNG and release it."""
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return Path(path)


def _auc_label(task: str, metrics: BinaryMetrics) -> str:
    ci = f" (95% CI {metrics.auc_ci[0]:.3f}–{metrics.auc_ci[1]:.3f})" if metrics.auc_ci else ""
    return f"{task}: AUC {metrics.auc:.3f}{ci}"


def operating_point_label(target: float, thresholds_from: set[str]) -> str:
    """The legend of one operating-point marker: a specificity reached on the plotted cases only when the
    thresholds were fitted on them; thresholds set on another split (validation) may fall short here."""
    if thresholds_from == {EVALUATED_SET}:
        return f"specificity ≥ {target:.0%}"
    where = f" on {next(iter(thresholds_from))}" if len(thresholds_from) == 1 else ""
    return f"threshold for {target:.0%} specificity{where}"


def plot_roc(curves: Mapping[str, BinaryMetrics], path: Path | str, title: str) -> Path:
    """One ROC curve per task on shared axes, with markers at the operating points (thresholds for fixed
    specificities, fitted on these cases or on the split each curve's ``thresholds_from`` names)."""
    figure, axis = plt.subplots(figsize=(5.5, 5.5), dpi=DPI)
    axis.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=0.8, label="chance")
    targets = sorted({point.target_specificity for m in curves.values() for point in m.operating_points})
    markers = {target: _MARKERS[i % len(_MARKERS)] for i, target in enumerate(targets)}
    for task, metrics in curves.items():
        (line,) = axis.plot(metrics.fpr, metrics.tpr, linewidth=1.6, label=_auc_label(task, metrics))
        for point in metrics.operating_points:
            axis.plot(1 - point.specificity, point.sensitivity, marker=markers[point.target_specificity],
                      color=line.get_color(), markeredgecolor="black", linestyle="none")
    for target, marker in markers.items():
        axis.plot([], [], marker=marker, color="#ccc", markeredgecolor="black", linestyle="none",
                  label=operating_point_label(target, {m.thresholds_from for m in curves.values()}))
    axis.set(xlabel="1 − specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axis.set_aspect("equal")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_reliability(calibration: Calibration, path: Path | str, title: str) -> Path:
    """Observed frequency against mean predicted probability per bin, over a histogram of the bin counts."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), dpi=DPI, sharex=True,
                                         gridspec_kw={"height_ratios": (3, 1)})
    filled = [b for b in calibration.bins if b.count]
    top.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=0.8, label="perfect calibration")
    top.plot([b.mean_confidence for b in filled], [b.observed_frequency for b in filled], marker="o",
             color="#135", label="model")
    top.set(ylabel="observed frequency", title=f"{title} (ECE {calibration.ece:.3f})", xlim=(0, 1), ylim=(0, 1))
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    centres = [(b.lower + b.upper) / 2 for b in calibration.bins]
    widths = [0.9 * (b.upper - b.lower) for b in calibration.bins]
    bottom.bar(centres, [b.count for b in calibration.bins], width=widths, color="#9ab")
    bottom.set(xlabel="predicted probability", ylabel="cases")
    return _save(figure, path)


def plot_confusion(multiclass: MulticlassMetrics, path: Path | str, title: str) -> Path:
    """Confusion matrix coloured by the share of each true class, annotated with counts."""
    counts = np.array(multiclass.confusion)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.7 * len(multiclass.class_names)
    figure, axis = plt.subplots(figsize=(size + 1, size), dpi=DPI)
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(counts):
        axis.text(column, row, f"{count}\n{shares[row, column]:.0%}", ha="center", va="center", fontsize="small",
                  color="white" if shares[row, column] > 0.5 else "black")
    ticks = range(len(multiclass.class_names))
    axis.set_xticks(ticks, multiclass.class_names)
    axis.set_yticks(ticks, multiclass.class_names)
    axis.set(xlabel="predicted", ylabel="truth", title=title)
    figure.colorbar(image, ax=axis, label="share of true class")
    return _save(figure, path)
