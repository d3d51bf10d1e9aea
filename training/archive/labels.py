"""Study labels for training: read from the report text, or from a label table that wins over it.

Labels are stored per breast: ``{"L": {"mass": 1, "calcification": 0, "malignant": None, "birads": 2},
"R": {...}, "density": "C", "birads": 2}``. ``None`` means unknown (a report states BI-RADS, not pathology:
malignancy comes only from a label table).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import ConfigurationError
from training.archive.store import ArchiveStudy

SIDES = ("L", "R")
FLAGS = ("mass", "calcification", "malignant")
GENERIC_KEYS = ("study_instance_uid", "accession_number")


def labels_from_report(text: str | None) -> dict[str, Any] | None:
    """Per-breast labels parsed from a report (negation-aware); None when nothing could be read."""
    from training.reports import parse_labels

    if not text:
        return None
    parsed = parse_labels(text)
    labels: dict[str, Any] = {"density": parsed.density, "birads": parsed.birads}
    for side in SIDES:
        labels[side] = {
            "mass": _side_flag(parsed.mass, parsed.mass_sides, side),
            "calcification": _side_flag(parsed.calcification, parsed.calcification_sides, side),
            "malignant": None, "birads": parsed.birads_by_side.get(side, parsed.birads)}
    known = [labels["density"], labels["birads"], *(labels[s][f] for s in SIDES for f in ("mass", "calcification"))]
    return labels if any(value is not None for value in known) else None


def _side_flag(present: bool | None, sides: set[str], side: str) -> int | None:
    if present is None:
        return None
    if not present:
        return 0
    return int(side in sides) if sides else None  # a finding on an unstated side: unknown for each breast


def _flag(value: object) -> int | None:
    text = str(value if value is not None else "").strip().lower()
    if text in ("1", "true", "yes", "y", "1.0"):
        return 1
    if text in ("0", "false", "no", "n", "0.0"):
        return 0
    return None


@dataclass
class LabelTable:
    """Breast labels keyed by study UID or accession number (the project's own manifest layout)."""

    by_study: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_accession: dict[str, dict[str, Any]] = field(default_factory=dict)

    def labels_for(self, study: ArchiveStudy) -> dict[str, Any] | None:
        return self.by_study.get(study.study_instance_uid) or (
            self.by_accession.get(study.accession_number) if study.accession_number else None)


def _merge_row(labels: dict[str, Any], row: Mapping[str, str], columns: Mapping[str, str]) -> None:
    side = str(row[columns["laterality"]]).strip().upper()[:1]
    if side not in SIDES:
        return
    breast = labels.setdefault(side, {})
    for name in FLAGS:
        if name in columns:
            value = _flag(row[columns[name]])
            breast[name] = value if breast.get(name) is None else max(breast[name], value or 0)
    if "birads" in columns and str(row[columns["birads"]]).strip().isdigit():
        breast["birads"] = int(row[columns["birads"]])
        labels["birads"] = max(labels.get("birads") or 0, breast["birads"])
    if "density" in columns and str(row[columns["density"]]).strip().upper() in ("A", "B", "C", "D"):
        labels["density"] = str(row[columns["density"]]).strip().upper()


def read_label_table(path: Path) -> LabelTable:
    """A CSV with ``study_instance_uid`` or ``accession_number``, ``laterality`` and any of mass,
    calcification, malignant (0/1), density (A-D), birads (0-6); one row per image or per breast."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        rows = list(reader)
    keys = [key for key in GENERIC_KEYS if key in columns]
    if not keys or "laterality" not in columns or not {*FLAGS, "density", "birads"} & set(columns):
        raise ConfigurationError(
            f"{path}: a label table needs study_instance_uid or accession_number, laterality, and any of "
            f"{', '.join(FLAGS)}, density, birads; found {', '.join(columns) or 'no header'}")
    table = LabelTable()
    for row in rows:
        for key, target in (("study_instance_uid", table.by_study), ("accession_number", table.by_accession)):
            if key in columns and row[columns[key]]:
                _merge_row(target.setdefault(row[columns[key]].strip(), {}), row, columns)
    return table
