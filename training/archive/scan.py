"""Reading an archive folder tree: each file is a screening image, a text report, or skipped with a reason."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models.sop_classes import ANALYSABLE_SOP_CLASSES, MAMMOGRAPHY_SOP_CLASSES, SCREENING_VIEWS, view_of
from training.evaluate.metrics import parse_patient_age

SCREENING_VIEW_NAMES = {view for _, view in SCREENING_VIEWS}
TEXT_SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
}

@dataclass(frozen=True)
class ImageEntry:
    """A screening view found in the archive (identifiers as read; the patient is hashed later)."""

    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    accession_number: str | None
    patient_id: str
    study_date: str | None
    laterality: str
    view: str
    manufacturer: str | None
    patient_age: int | None
    rows: int
    columns: int


@dataclass(frozen=True)
class ReportEntry:
    """The text of a report object (text SR) found in the archive."""

    path: Path
    study_instance_uid: str
    accession_number: str | None
    text: str


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def walk_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root``, at any depth, in a stable order; hidden files are left out."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(folder, name)


def _dicom_date(value: object) -> date | None:
    try:
        return datetime.strptime(str(value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> int | None:
    """Age at the study in whole years: PatientAge (``052Y``, ``018M``...), else PatientBirthDate to StudyDate;
    None when neither is usable."""
    years = parse_patient_age(str(ds.get("PatientAge") or "") or None)
    if years is not None:
        return int(years)
    born, studied = _dicom_date(ds.get("PatientBirthDate")), _dicom_date(ds.get("StudyDate"))
    if born is None or studied is None or born > studied:
        return None
    return studied.year - born.year - ((studied.month, studied.day) < (born.month, born.day))


def sr_text(ds: Dataset) -> str:
    """The TEXT items of an SR content tree, in order, each after its concept name as a heading."""
    lines: list[str] = []

    def visit(items: object) -> None:
        for item in items or []:
            if item.get("ValueType") == "TEXT" and item.get("TextValue"):
                name = item.ConceptNameCodeSequence[0].CodeMeaning if item.get("ConceptNameCodeSequence") else ""
                lines.append(f"{str(name).upper()}: {item.TextValue}" if name else str(item.TextValue))
            visit(item.get("ContentSequence"))

    visit(ds.get("ContentSequence"))
    return "\n".join(lines)


def classify(path: Path) -> ImageEntry | ReportEntry | Skipped:
    """Read the header of ``path`` (never its pixels) and say what it is."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError):
        return Skipped(path, "not a readable DICOM file")
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "?")
    if sop_class in TEXT_SR_CLASSES:
        text = sr_text(ds)
        if not text or not ds.get("StudyInstanceUID"):
            return Skipped(path, f"{TEXT_SR_CLASSES[sop_class]} without report text")
        return ReportEntry(path, str(ds.StudyInstanceUID), str(ds.get("AccessionNumber") or "") or None, text)
    if modality != "MG":
        return Skipped(path, f"modality {modality}, not MG")
    if sop_class not in ANALYSABLE_SOP_CLASSES:
        kind = "a For Processing (raw) image" if sop_class in MAMMOGRAPHY_SOP_CLASSES else "not a mammogram image"
        return Skipped(path, f"MG object of SOP class {sop_class}, {kind}")
    laterality, view = view_of(ds)
    if laterality not in ("L", "R") or view not in SCREENING_VIEW_NAMES:
        return Skipped(path, f"not a screening view (laterality {laterality or '?'}, view {view or '?'})")
    if not ds.get("StudyInstanceUID") or not ds.get("SOPInstanceUID") or "Rows" not in ds:
        return Skipped(path, "MG image without Study/SOP Instance UID or Rows")
    return ImageEntry(
        path=path, sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
        accession_number=str(ds.get("AccessionNumber") or "")[:16] or None, patient_id=str(ds.get("PatientID", "")),
        study_date=str(ds.get("StudyDate") or "")[:8] or None, laterality=laterality, view=view,
        manufacturer=str(ds.get("Manufacturer") or "")[:64] or None,
        patient_age=patient_age_years(ds), rows=int(ds.Rows), columns=int(ds.Columns))
