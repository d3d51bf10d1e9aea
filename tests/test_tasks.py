"""The analysis task's delivery guarantees that need no model: a job the database cannot claim is retried."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

import worklist.state
from dicom_node import tasks
from dicom_node.settings import Settings
from worklist.db import make_engine, upgrade


def test_a_job_that_cannot_be_claimed_is_retried_not_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    engine.dispose()
    tasks.configure(settings)
    calls = []

    def database_down_once(*args: object) -> None:
        calls.append(args[1])
        if len(calls) == 1:
            raise OperationalError("UPDATE job", {}, ConnectionError("server closed the connection"))
        return None  # back: the job is someone else's or finished, nothing to do

    monkeypatch.setattr(worklist.state, "claim_job", database_down_once)
    result = tasks.analyze_study.apply(args=(42,))  # eager: the retry runs again at once
    assert calls == [42, 42] and result.successful()
