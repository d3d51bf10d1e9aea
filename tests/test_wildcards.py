"""DICOM wildcard matching in SQL (``worklist.wildcards``), on SQLite and PostgreSQL."""

from __future__ import annotations

import fnmatch
import random

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from worklist.models import Study
from worklist.wildcards import matches, wildcard_matches

STUDIES = {"1.2.1": ("ÖSTER^EVA", "ACC1"), "1.2.2": ("DOE^JANE", "100%_A[1]"), "1.2.3": ("A" * 64, "1000xA")}


@pytest.fixture
def studies(sessions: sessionmaker) -> sessionmaker:
    with sessions.begin() as session:
        session.add_all(Study(study_instance_uid=uid, patient_name=name, accession_number=accession)
                        for uid, (name, accession) in STUDIES.items())
    return sessions


def _matching(sessions: sessionmaker, column, value: str, ignore_case: bool = False) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(Study.study_instance_uid).where(matches(column, value, ignore_case))))


@pytest.mark.parametrize(("column", "value", "ignore_case", "expected"), [
    ("patient_name", "öster*", True, {"1.2.1"}),  # person names: any case, beyond ASCII too
    ("patient_name", "d?e^*", True, {"1.2.2"}),
    ("patient_name", "öster*", False, set()),
    ("accession_number", "acc*", False, set()),  # other VRs: case-sensitive
    ("accession_number", "100%_*", False, {"1.2.2"}),  # % and _ are characters, not SQL wildcards
    ("accession_number", "100??A*", False, {"1.2.2", "1.2.3"}),
    ("accession_number", "*[1]", False, {"1.2.2"}),  # [ ] are characters, not a GLOB class
    ("accession_number", "1000?A", False, {"1.2.3"}),
    ("accession_number", "A**1", False, {"1.2.1"}),
    # A regular expression backtracked on this for minutes per row, with the interpreter lock held.
    ("patient_name", "*A" * 30 + "!", True, set()),
])
def test_wildcards_match_in_sql(studies: sessionmaker, column: str, value: str, ignore_case: bool,
                                expected: set[str]) -> None:
    assert _matching(studies, getattr(Study, column), value, ignore_case) == expected


def test_wildcards_match_in_python_as_fnmatch_does_without_its_classes() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        value = "".join(rng.choice("ab*?") for _ in range(rng.randint(0, 6)))
        text = "".join(rng.choice("ab*?") for _ in range(rng.randint(0, 7)))
        assert wildcard_matches(value, text) == fnmatch.fnmatchcase(text, value), (value, text)
    assert not wildcard_matches("*A" * 30 + "!", "A" * 64)
