"""Patient and study values that highdicom cannot parse are emptied before the results are built, and only their
keywords are logged."""

from __future__ import annotations

import logging

import pytest
from pydicom.dataset import Dataset

from dicom_node.results.readable import empty_unreadable_values


def _header(**values: str) -> Dataset:
    dataset = Dataset()
    dataset.SOPInstanceUID = "1.2.3.4"
    dataset.PatientName, dataset.PatientID = "Doe^Jane", "PID-77"
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


def test_unreadable_dates_times_and_sex_are_emptied_and_only_named(caplog: pytest.LogCaptureFixture) -> None:
    dataset = _header(PatientBirthDate="1941-03-02", StudyDate="20261130", StudyTime="12:30:00", PatientSex="U")
    with caplog.at_level(logging.WARNING):
        emptied = empty_unreadable_values(dataset)
    assert emptied == ["PatientBirthDate", "StudyTime", "PatientSex"]
    assert (dataset.PatientBirthDate, dataset.StudyDate, dataset.StudyTime, dataset.PatientSex) == ("", "20261130",
                                                                                                   "", "")
    assert (dataset.PatientName, dataset.PatientID) == ("Doe^Jane", "PID-77")  # identifiers as sent
    assert "1.2.3.4" in caplog.text and "1941" not in caplog.text and "12:30" not in caplog.text


def test_readable_and_absent_values_are_left_alone() -> None:
    dataset = _header(PatientBirthDate="19410302", StudyTime="123000.5", PatientSex="F")
    assert empty_unreadable_values(dataset) == []
    assert (dataset.PatientBirthDate, dataset.StudyTime, dataset.PatientSex) == ("19410302", "123000.5", "F")
    assert "StudyDate" not in dataset
