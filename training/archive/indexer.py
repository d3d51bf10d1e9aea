"""``mammo-node archive index``: find the screening images and reports of a site archive and index them.

Indexing is idempotent: a second run over the same tree updates rows in place, keeps every patient's split
and every converted cache file, and adds only what is new.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from tqdm import tqdm

from training.archive.labels import LabelTable, labels_from_report, read_label_table, study_labels, synthesized_report
from training.archive.report_sources import ReportBook, read_reports
from training.archive.scan import ImageEntry, ReportEntry, Skipped, classify, walk_files
from training.archive.split import assign_splits, patient_key, stratum, stratum_rank
from training.archive.store import (
    SYNTHESIZED_REPORT,
    ArchiveImage,
    ArchiveSkip,
    ArchiveStudy,
    get_meta,
    set_meta,
    study_by_uid,
)
from training.reports import BreastLabels

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    """What an indexing run found (counts over the whole index, except ``skipped``: this run's files)."""

    files: int = 0
    images: int = 0
    studies: int = 0
    new_images: int = 0
    with_report: int = 0
    labelled: int = 0
    synthesized: int = 0
    report_objects: int = 0
    label_file: str | None = None
    label_studies: int = 0
    label_breasts: int = 0
    unmatched_labels: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)
    without_patient_id: int = 0  # this run's studies whose images have no Patient ID

    def lines(self) -> list[str]:
        text = [f"{self.files} files read: {self.images} screening images ({self.new_images} new) in "
                f"{self.studies} studies; {self.report_objects} report objects (text SR); {self.with_report} "
                f"studies with a report, {self.synthesized} with one synthesized from labels, {self.labelled} labelled",
                "split by patient: " + ", ".join(f"{name} {count}" for name, count in sorted(self.splits.items()))]
        if self.without_patient_id:
            text.append(f"{self.without_patient_id} studies without a Patient ID: each is a patient of its own for the "
                        "split, so an anonymised patient's prior and current studies may fall into different splits")
        if self.label_file:
            text.append(f"labels: {self.label_studies} studies from {self.label_file}, {self.unmatched_labels} of its "
                        f"{self.label_breasts} labelled breasts matched no indexed study")
        if self.skipped:
            text.append(f"skipped {sum(self.skipped.values())} files:")
            text += [f"  {count:6d}  {reason}" for reason, count in self.skipped.most_common()]
        return text


def _patient_salt(session: Session) -> str:
    salt = get_meta(session, "patient_salt")
    if salt is None:
        salt = secrets.token_hex(16)
        set_meta(session, "patient_salt", salt)
    return salt


def _upsert_image(session: Session, entry: ImageEntry, study: ArchiveStudy) -> bool:
    """Insert or update the image row; True if it is new. A moved file keeps its cache only if unchanged."""
    image = session.scalar(select(ArchiveImage).where(ArchiveImage.sop_instance_uid == entry.sop_instance_uid))
    fields = {"path": str(entry.path.resolve()), "laterality": entry.laterality, "view": entry.view,
              "manufacturer": entry.manufacturer, "patient_age": entry.patient_age, "rows": entry.rows,
              "columns": entry.columns}
    if image is None:
        session.add(ArchiveImage(sop_instance_uid=entry.sop_instance_uid, study=study, **fields))
        return True
    if image.path != fields["path"]:
        image.cache_path = image.cache_key = image.converted_at = None
    for name, value in fields.items():
        setattr(image, name, value)
    return False


def _study(session: Session, entry: ImageEntry, salt: str, cache: dict[str, ArchiveStudy]) -> ArchiveStudy:
    study = cache.get(entry.study_instance_uid) or study_by_uid(session, entry.study_instance_uid)
    if study is None:
        study = ArchiveStudy(study_instance_uid=entry.study_instance_uid, accession_number=entry.accession_number,
                             patient_key=patient_key(entry.patient_id, salt, entry.study_instance_uid),
                             study_date=entry.study_date)
        session.add(study)
    cache[entry.study_instance_uid] = study
    return study


def _record_skip(session: Session, skipped: Skipped) -> None:
    session.merge(ArchiveSkip(path=str(skipped.path.resolve()), reason=skipped.reason))


def _pair_reports_and_labels(session: Session, book: ReportBook, table: LabelTable | None,
                             summary: IndexSummary) -> None:
    """Reports (and the labels read from them) first; then a label table's labels win, and a study they label
    that has no report gets one synthesized from them (replaced as soon as a real report is found)."""
    studies = session.scalars(select(ArchiveStudy).options(selectinload(ArchiveStudy.images))).all()
    matched: dict[str, dict[str, BreastLabels]] = {}
    if table is not None:
        matched, summary.unmatched_labels = table.match(studies)
        summary.label_file, summary.label_studies, summary.label_breasts = table.name, len(matched), len(table.breasts)
    for study in studies:
        found = book.find(study.accession_number, study.study_instance_uid)
        if found is not None:
            study.report_text, study.report_source = found
            study.labels, study.label_source = labels_from_report(study.report_text), "report"
        breasts = matched.get(study.study_instance_uid)
        if table is None or breasts is None:
            continue
        study.labels = study_labels(breasts)
        study.label_source = f"label table {table.name}"
        if study.report_text is None or study.report_synthesized:
            text = synthesized_report(breasts, random.Random(study.study_instance_uid))  # the same text every run
            study.report_text = text
            study.report_source = SYNTHESIZED_REPORT + table.name if text else None


def _assign_splits(session: Session, seed: int) -> None:
    studies = session.scalars(select(ArchiveStudy)).all()
    strata: dict[str, str] = {}
    for study in studies:  # a patient's stratum: the most positive of their studies
        strata[study.patient_key] = max(strata.get(study.patient_key, "unlabelled"), stratum(study.labels),
                                        key=stratum_rank)
    existing = {s.patient_key: s.split for s in studies if s.split}
    assigned = assign_splits(strata, existing, seed)
    for study in studies:
        study.split = existing.get(study.patient_key) or assigned[study.patient_key]


def index_archive(root: Path, sessions: sessionmaker[Session], reports: Path | None = None,
                  label_table: Path | None = None, seed: int = 0, progress: bool = True) -> IndexSummary:
    """Index every file under ``root``; pair studies with reports (``reports`` first, then text SRs found in
    the archive) and labels (``label_table``: a generic, VinDr-Mammo or RSNA label CSV); assign splits to new
    patients. Returns the counts."""
    book = ReportBook()
    if reports is not None:
        read_reports(reports, book)
    table = read_label_table(label_table) if label_table else None
    summary = IndexSummary()
    studies: dict[str, ArchiveStudy] = {}
    unkeyed: set[str] = set()
    with sessions.begin() as session:
        salt = _patient_salt(session)
        if get_meta(session, "split_seed") is None:
            set_meta(session, "split_seed", str(seed))
        for path in tqdm(walk_files(root), desc="indexing", unit="file", disable=not progress):
            summary.files += 1
            found = classify(path)
            if isinstance(found, ImageEntry):
                summary.new_images += _upsert_image(session, found, _study(session, found, salt, studies))
                if not found.patient_id.strip():
                    unkeyed.add(found.study_instance_uid)
            elif isinstance(found, ReportEntry):
                book.add(found.text, str(path.relative_to(root)), found.accession_number, found.study_instance_uid)
                summary.report_objects += 1
            else:
                _record_skip(session, found)
                summary.skipped[found.reason] += 1
        session.flush()
        _pair_reports_and_labels(session, book, table, summary)
        _assign_splits(session, int(get_meta(session, "split_seed") or seed))
        session.flush()
        all_studies = session.scalars(select(ArchiveStudy)).all()
        summary.studies = len(all_studies)
        summary.images = sum(len(s.images) for s in all_studies)
        summary.synthesized = sum(1 for s in all_studies if s.report_synthesized)
        summary.with_report = sum(1 for s in all_studies if s.report_text) - summary.synthesized
        summary.labelled = sum(1 for s in all_studies if s.labels)
        summary.splits = Counter(s.split for s in all_studies)
        summary.without_patient_id = len(unkeyed)
    log.info("indexed %s: %d images in %d studies", root, summary.images, summary.studies)
    return summary
