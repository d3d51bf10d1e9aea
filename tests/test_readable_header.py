"""Patient and study values that highdicom cannot copy are made copyable before the results are built, in the
results' header only, and only their keywords are logged."""

from __future__ import annotations

import logging

import pytest
from pydicom.dataset import Dataset

from dicom_node.results.readable import READ_BY_HIGHDICOM, empty_unreadable_values

READABLE = {"PatientID": "PID-77", "PatientName": "Doe^Jane", "PatientBirthDate": "19410302", "PatientSex": "F",
            "AccessionNumber": "A1", "StudyID": "S1", "StudyDate": "20261130", "StudyTime": "123000.5"}


def _header(**values: object) -> Dataset:
    dataset = Dataset()
    dataset.SOPInstanceUID = "1.2.3.4"
    for keyword, value in {**READABLE, **values}.items():
        setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize(("keyword", "value"), [
    ("PatientBirthDate", "1941-03-02"), ("PatientBirthDate", "1941.03.02"), ("StudyDate", "20261131"),
    ("StudyTime", "12:30:00"), ("StudyTime", "250000"), ("PatientSex", "U"), ("PatientSex", " F")])
def test_an_unreadable_value_is_emptied_and_only_named(caplog: pytest.LogCaptureFixture, keyword: str,
                                                        value: str) -> None:
    dataset = _header(**{keyword: value})
    with caplog.at_level(logging.WARNING):
        assert empty_unreadable_values(dataset) == [keyword]
    assert dataset[keyword].value == ""
    assert all(dataset[other].value == READABLE[other] for other in READABLE if other != keyword)
    assert "1.2.3.4" in caplog.text and value.strip() not in caplog.text


def test_readable_values_are_left_alone() -> None:
    dataset = _header()
    assert empty_unreadable_values(dataset) == []
    assert all(dataset[keyword].value == value for keyword, value in READABLE.items())


def test_absent_attributes_are_added_empty_and_a_name_keeps_its_first_value() -> None:
    dataset = Dataset()
    dataset.PatientName = ["Doe^Jane", "Doe^J"]
    sent = Dataset(dict(dataset.items()))  # shares the elements, as the writer's header copies do
    changed = empty_unreadable_values(dataset)
    assert sorted(changed) == sorted([*(k for k in READ_BY_HIGHDICOM if k != "PatientName"), "PatientName"])
    assert dataset.PatientName == "Doe^Jane" and all(dataset[k].value == "" for k in changed if k != "PatientName")
    assert list(sent.PatientName) == ["Doe^Jane", "Doe^J"]  # the element was replaced, not changed
