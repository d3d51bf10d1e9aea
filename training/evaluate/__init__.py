"""Evaluation of a trained model from plain arrays: metrics, figures and a self-contained HTML report."""

from __future__ import annotations

from training.evaluate.html_report import BANNER, write_html_report
from training.evaluate.metrics import (
    AGE_BANDS,
    BinaryMetrics,
    Calibration,
    CalibrationBin,
    MulticlassMetrics,
    OperatingPoint,
    SubgroupRow,
    SubgroupTable,
    age_band,
    aggregate_scores,
    binary_metrics,
    calibration,
    multiclass_metrics,
    one_class_reason,
    parse_patient_age,
    subgroup_table,
)
from training.evaluate.plots import plot_confusion, plot_reliability, plot_roc

__all__ = [
    "AGE_BANDS",
    "BANNER",
    "BinaryMetrics",
    "Calibration",
    "CalibrationBin",
    "MulticlassMetrics",
    "OperatingPoint",
    "SubgroupRow",
    "SubgroupTable",
    "age_band",
    "aggregate_scores",
    "binary_metrics",
    "calibration",
    "multiclass_metrics",
    "one_class_reason",
    "parse_patient_age",
    "plot_confusion",
    "plot_reliability",
    "plot_roc",
    "subgroup_table",
    "write_html_report",
]
