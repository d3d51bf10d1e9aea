"""The archive index: which studies, images and reports a site archive holds, their labels and split.

A real database (SQLite file by default, or PostgreSQL by URL) through the worklist's DB layer, separate
from the node's worklist. Patients are kept only as a salted hash: the split needs to group a patient's
studies, nothing needs their identity.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, inspect, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from models.errors import ConfigurationError
from worklist.db import make_engine, session_factory
from worklist.models import utcnow

SCHEMA_VERSION = "2"
INDEX_FILE = "archive.sqlite"
# Older schema versions upgraded in place by ``open_index``. Version 1 had VARCHAR(32) label_source and
# VARCHAR(256) report_source, too short for "label table breast-level_annotations.csv" or a deep archive path;
# SQLite does not enforce lengths, so there only the version changes.
UPGRADES = {"1": "ALTER TABLE archive_study ALTER COLUMN label_source TYPE TEXT, "
                 "ALTER COLUMN report_source TYPE TEXT"}
SYNTHESIZED_REPORT = "synthesized from labels in "  # report_source of a report made from a label table's labels


class IndexBase(DeclarativeBase):
    """Declarative base of the archive index tables."""


class ArchiveMeta(IndexBase):
    __tablename__ = "archive_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ArchiveStudy(IndexBase):
    """One study of the archive, its report (if any), its labels and its split."""

    __tablename__ = "archive_study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    patient_key: Mapped[str] = mapped_column(String(32), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    report_text: Mapped[str | None] = mapped_column(Text)
    report_source: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    label_source: Mapped[str | None] = mapped_column(Text)
    split: Mapped[str | None] = mapped_column(String(16), index=True)
    images: Mapped[list[ArchiveImage]] = relationship(back_populates="study", cascade="all, delete-orphan")

    @property
    def report_synthesized(self) -> bool:
        """Whether ``report_text`` was synthesized from a label table's labels rather than written by a reader."""
        return (self.report_source or "").startswith(SYNTHESIZED_REPORT)


class ArchiveImage(IndexBase):
    """One screening view image, where it lies, and its converted cache file."""

    __tablename__ = "archive_image"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("archive_study.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    laterality: Mapped[str] = mapped_column(String(1))
    view: Mapped[str] = mapped_column(String(8))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    patient_age: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    cache_path: Mapped[str | None] = mapped_column(Text)
    cache_key: Mapped[str | None] = mapped_column(String(16))
    convert_error: Mapped[str | None] = mapped_column(Text)
    converted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    study: Mapped[ArchiveStudy] = relationship(back_populates="images")


class ArchiveSkip(IndexBase):
    """A file under the archive root that is not a screening image, and why."""

    __tablename__ = "archive_skip"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    reason: Mapped[str] = mapped_column(String(128), index=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def index_url(location: str | Path) -> str:
    """A database URL as given, or the SQLite index file in (or at) a folder path."""
    text = str(location)
    if "://" in text:
        return text
    path = Path(text)
    if path.suffix not in (".sqlite", ".db"):
        path = path / INDEX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def open_index(location: str | Path, create: bool = True) -> sessionmaker[Session]:
    """Sessions on the index at ``location`` (created if ``create``); upgrades an index of an older schema
    (``UPGRADES``), refuses one of another."""
    engine = make_engine(index_url(location))
    if not create and not inspect(engine).has_table(ArchiveMeta.__tablename__):
        raise ConfigurationError(f"no archive index at {location}: run `mammo-node archive index` first")
    IndexBase.metadata.create_all(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        version = get_meta(session, "schema_version")
        if version in UPGRADES and engine.dialect.name != "sqlite":
            session.execute(text(UPGRADES[version]))
        if version is None or version in UPGRADES:
            set_meta(session, "schema_version", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise ConfigurationError(f"the archive index at {location} has schema {version}; this version reads "
                                     f"{SCHEMA_VERSION}: index the archive again into a new location")
    return sessions


def get_meta(session: Session, key: str) -> str | None:
    row = session.get(ArchiveMeta, key)
    return row.value if row else None


def set_meta(session: Session, key: str, value: str) -> None:
    row = session.get(ArchiveMeta, key)
    if row is None:
        session.add(ArchiveMeta(key=key, value=value))
    else:
        row.value = value


def study_by_uid(session: Session, uid: str) -> ArchiveStudy | None:
    return session.scalar(select(ArchiveStudy).where(ArchiveStudy.study_instance_uid == uid))
