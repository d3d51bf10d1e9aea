"""ORM tables of the worklist (SQLAlchemy 2). Every state change is a committed transaction."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every worklist table."""


class StudyState(enum.StrEnum):
    """Where a study stands: receiving instances, ready for (or in) analysis, analysed, or failed."""

    RECEIVING = "RECEIVING"
    READY = "READY"
    ANALYSED = "ANALYSED"
    FAILED = "FAILED"


class JobState(enum.StrEnum):
    """UPS-like job states: RECEIVING -> READY -> QUEUED -> RUNNING -> DONE / FAILED."""

    READY = "READY"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class ExportState(enum.StrEnum):
    """SUPERSEDED: not sent (or not again) because a newer analysis of the study replaced the object."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    SUPERSEDED = "SUPERSEDED"


def _enum(kind: type[enum.Enum]) -> Enum:
    return Enum(kind, native_enum=False, length=16, validate_strings=True)


class Study(Base):
    __tablename__ = "study"
    # the triage sections' filters and the ranked order (worklist.triage; migration 0008)
    __table_args__ = (Index("ix_study_triage", "state", "views_complete", text("suspicion DESC"), "last_received_at",
                            "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(13))  # HHMMSS.FFFFFF (dicom_node.study_time; 0012)
    dicom_study_id: Mapped[str | None] = mapped_column(String(16))  # Study ID (0020,0010); not a row id
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING, index=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    suspicion: Mapped[float | None] = mapped_column(Float, index=True)
    # the last analysis gave a suspicion score on the four screening views: the study is ranked, not listed
    # apart as incomplete (set when the study is settled ANALYSED)
    views_complete: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # + 1 with every new or changed analysable instance (migration 0011): a job analysed the revision it was
    # promoted at (``Job.study_revision``); a later one means the study must be analysed again
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    instances: Mapped[list[Instance]] = relationship(back_populates="study", cascade="all, delete-orphan")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    # the four-view check of each study, read from the index alone (worklist.triage; migration 0005)
    __table_args__ = (Index("ix_instance_views", "study_id", "analysable", "laterality", "view"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    laterality: Mapped[str | None] = mapped_column(String(2))
    view: Mapped[str | None] = mapped_column(String(16))
    analysable: Mapped[bool] = mapped_column(Boolean, default=False)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_digest: Mapped[str] = mapped_column(String(71))  # "blake3:<hex>" ("sha256:<hex>" before 0010)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")
    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.READY, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(128))
    lease: Mapped[str | None] = mapped_column(String(32))
    worker: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    # peak CUDA memory allocated during the analysis, model weights included (NULL off CUDA; migration 0009)
    gpu_memory_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    study_revision: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))  # Study.revision

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job", cascade="all, delete-orphan")
    exports: Mapped[list[Export]] = relationship(back_populates="job", cascade="all, delete-orphan")


class Result(Base):
    __tablename__ = "result"
    __table_args__ = (UniqueConstraint("job_id", name="uq_result_job"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    scores: Mapped[dict[str, Any]] = mapped_column(JSON)
    suspicion: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")


class Export(Base):
    __tablename__ = "export"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid", name="uq_export_object"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[ExportState] = mapped_column(_enum(ExportState), default=ExportState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="exports")


class ModelVersion(Base):
    """A registered model version; at most one is active (served by the workers)."""

    __tablename__ = "model_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    text_encoder_path: Mapped[str | None] = mapped_column(Text)
    heads: Mapped[dict[str, str] | None] = mapped_column(JSON)  # target -> trained head folder
    multiview_path: Mapped[str | None] = mapped_column(Text)  # four-view fusion model: the study score
    detector_path: Mapped[str | None] = mapped_column(Text)  # lesion detector: boxes in the SR
    factor_path: Mapped[str | None] = mapped_column(Text)  # Mammo-FActOR: attribute maps in the SEGs
    # role ("text encoder", "mass head", ...) -> sha256 of its folder at registration (0014; None before)
    component_sha256: Mapped[dict[str, str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rolled_back_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # a rollback retired it
