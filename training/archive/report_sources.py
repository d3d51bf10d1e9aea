"""Reports from the RIS, as a site exports them: a CSV or JSON-lines table, or a folder of text files.

Each report is keyed by AccessionNumber or StudyInstanceUID; ``ReportBook.find`` tries both.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import ConfigurationError

KEY_COLUMNS = {"accession": ("accession_number", "accessionnumber", "accession", "acc"),
               "study": ("study_instance_uid", "studyinstanceuid", "study_uid")}
TEXT_COLUMNS = ("report", "report_text", "text", "findings")
SECTION_COLUMNS = ("findings", "impression")


@dataclass
class ReportBook:
    """Report texts by accession number and by study UID, each with where it came from."""

    by_accession: dict[str, tuple[str, str]] = field(default_factory=dict)
    by_study: dict[str, tuple[str, str]] = field(default_factory=dict)

    def add(self, text: str, source: str, accession: str | None = None, study_uid: str | None = None) -> None:
        if accession:
            self.by_accession.setdefault(accession.strip(), (text, source))
        if study_uid:
            self.by_study.setdefault(study_uid.strip(), (text, source))

    def find(self, accession: str | None, study_uid: str) -> tuple[str, str] | None:
        """(text, source) of the study's report, by accession first, then by study UID."""
        return (self.by_accession.get(accession or "") if accession else None) or self.by_study.get(study_uid)

    def __len__(self) -> int:
        return len(self.by_accession) + len(self.by_study)


def _pick(columns: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((columns[name] for name in names if name in columns), None)


def _row_text(row: dict[str, object], columns: dict[str, str]) -> str:
    text_column = _pick(columns, TEXT_COLUMNS[:3])
    if text_column:
        return str(row.get(text_column) or "")
    # Findings and impression in their own columns: rebuild the sections with headings.
    return "\n".join(f"{name.upper()}: {row[columns[name]]}" for name in SECTION_COLUMNS
                     if name in columns and row.get(columns[name]))


def _read_table(path: Path) -> list[dict[str, object]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle))
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ConfigurationError(f"{path}:{number} is not a JSON object: {error.msg}") from None
    return rows


def read_report_table(path: Path, book: ReportBook) -> int:
    """Add the reports of a CSV or JSON-lines file to ``book``; returns how many rows had text."""
    rows = _read_table(path)
    if not rows:
        return 0
    columns = {str(name).strip().lower(): str(name) for name in rows[0]}
    accession_column = _pick(columns, KEY_COLUMNS["accession"])
    study_column = _pick(columns, KEY_COLUMNS["study"])
    if not (accession_column or study_column) or not (_pick(columns, TEXT_COLUMNS) or "impression" in columns):
        raise ConfigurationError(
            f"{path}: expected a key column ({', '.join(KEY_COLUMNS['accession'] + KEY_COLUMNS['study'])}) and "
            f"a text column ({', '.join((*TEXT_COLUMNS, 'impression'))}); found {', '.join(columns)}")
    count = 0
    for row in rows:
        text = _row_text(row, columns).strip()
        if text:
            book.add(text, path.name, str(row.get(accession_column) or "") if accession_column else None,
                     str(row.get(study_column) or "") if study_column else None)
            count += 1
    return count


def read_report_folder(folder: Path, book: ReportBook) -> int:
    """Add every ``<accession>.txt`` under ``folder`` to ``book``; returns how many."""
    count = 0
    for path in sorted(folder.rglob("*.txt")):
        book.add(path.read_text(encoding="utf-8", errors="replace"), path.name, accession=path.stem)
        count += 1
    return count


def read_reports(location: Path, book: ReportBook) -> int:
    """Reports from a table file or a folder of text files."""
    if location.is_dir():
        return read_report_folder(location, book)
    if location.suffix.lower() in (".csv", ".jsonl", ".json", ".ndjson"):
        return read_report_table(location, book)
    raise ConfigurationError(f"{location}: reports must be a .csv, a .jsonl file or a folder of <accession>.txt")
