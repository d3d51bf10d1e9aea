"""Worklist rows for the triage tests, written with the ORM: studies with instances, jobs, results, exports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.results.findings import BreastFindings, ModelIdentity, StudyFindings, ViewFindings
from worklist.models import Export, ExportState, Instance, Job, JobState, Result, Series, Study, StudyState

PATIENT_NAME, PATIENT_ID = "DOE^JANE", "PID-938271"
FOUR = (("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))
T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def findings(uid: str, left: float, right: float, clinical: bool = False) -> dict:
    def probabilities(malignancy: float) -> dict:
        return {"scores": {"malignancy": malignancy, "mass": malignancy / 2, "calcification": 0.1},
                "density": {"A": 0.1, "B": 0.6, "C": 0.2, "D": 0.1}, "birads": {"1": 0.7, "2": 0.1, "3": 0.1,
                                                                              "4": 0.05, "5": 0.05}}
    views = [ViewFindings(**probabilities(left if side == "L" else right), sop_instance_uid=f"{uid}.1.{n}",
                          laterality=side, view=view) for n, (side, view) in enumerate(FOUR)]
    breasts = [BreastFindings(**probabilities(value), laterality=side) for side, value in (("L", left), ("R", right))]
    return StudyFindings(uid, ModelIdentity("Mammo-CLIP zero-shot", "0.1.0", "demo@0123456789ab", clinical),
                         views, breasts).to_dict()


def add_study(sessions: sessionmaker[Session], number: int, state: StudyState, suspicion: float | None = None,
              minutes: float = 0.0, views: tuple[tuple[str, str], ...] = FOUR, error: str | None = None,
              exports: tuple[ExportState, ...] = (), analysable: bool = True) -> str:
    """A study received ``minutes`` after T0 with its instances, and for ANALYSED/FAILED its job (and result)."""
    uid = f"1.2.826.0.1.3680043.10.543.{number}"
    received = T0 + timedelta(minutes=minutes)
    with sessions.begin() as session:
        four_views = {f"{side}{view}" for side, view in views} == {"LCC", "RCC", "LMLO", "RMLO"}
        study = Study(study_instance_uid=uid, accession_number=f"ACC{number}", patient_name=PATIENT_NAME,
                      patient_id=PATIENT_ID, state=state, suspicion=suspicion, first_received_at=received,
                      last_received_at=received, views_complete=state == StudyState.ANALYSED and analysable
                      and suspicion is not None and four_views)
        series = Series(series_instance_uid=f"{uid}.1", modality="MG", study=study)
        for n, (laterality, view) in enumerate(views):
            session.add(Instance(study=study, series=series, sop_instance_uid=f"{uid}.1.{n}", laterality=laterality,
                                 view=view, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2", analysable=analysable,
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"studies/{uid}/{n}.dcm",
                                 size_bytes=1, content_digest="blake3:" + "0" * 64, received_at=received))
        if state in (StudyState.ANALYSED, StudyState.FAILED):
            done = state == StudyState.ANALYSED
            job = Job(study=study, state=JobState.DONE if done else JobState.FAILED, attempts=1, error=error,
                      model_version="demo@0123456789ab" if done else None, created_at=received,
                      started_at=received, finished_at=received + timedelta(seconds=5),
                      timings={"preprocess": 0.2, "model": 1.5} if done else None)
            session.add(job)
            if done:
                session.add(Result(job=job, scores=findings(uid, suspicion, suspicion / 2), suspicion=suspicion))
            for n, export_state in enumerate(exports):
                name = "SR" if n == 0 else f"SEG_{FOUR[n - 1][0]}CC"
                session.add(Export(job=job, destination="pacs", sop_instance_uid=f"{uid}.9.{n}",
                                   path=f"results/{uid}/1/{name}.dcm", state=export_state, attempts=1,
                                   error="refused" if export_state == ExportState.FAILED else None))
        session.add(study)
    return uid
