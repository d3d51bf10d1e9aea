"""Patient and study values that highdicom cannot copy are made copyable before the results are built, in the
results' header only, and only their keywords are logged."""

from __future__ import annotations

import logging

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from dicom_node.results.readable import READ_BY_HIGHDICOM, empty_unreadable_values
from dicom_node.results.writer import without_pixels

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


def _as_received(character_set: str | list[str], name: str) -> Dataset:
    """The writer's copy of a header (``without_pixels``) as a sender wrote it in ``character_set`` (pydicom encodes
    the text with the codec it reads that term as): its text is decoded from the sent bytes when accessed, with the
    copy's Specific Character Set."""
    dataset = _header(PatientName=name)
    dataset.SpecificCharacterSet = character_set
    buffer = DicomBytesIO()
    dcmwrite(buffer, dataset, implicit_vr=False, little_endian=True)
    return without_pixels(dcmread(DicomBytesIO(buffer.getvalue()), force=True))


@pytest.mark.parametrize(("character_set", "name"), [
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # valid: the default repertoire first
    ("ISO 2022 IR 100", "Müller^Anna"),  # valid in DICOM, a single value with code extensions
    ("ISO-IR 100", "Müller^Anna"),  # misspelt: pydicom reads it as ISO_IR 100
    ("UTF8", "Ødegård^Åse"),  # a Python codec's name: pydicom reads it as UTF-8
    ("ISO_IR 100", "Müller^Anna"),  # accepted: left as sent
])
def test_a_character_set_highdicom_refuses_becomes_utf8_with_the_text_as_sent(character_set: str | list[str],
                                                                             name: str) -> None:
    dataset = _as_received(character_set, name)
    sent = Dataset(dict(dataset.items()))
    changed = empty_unreadable_values(dataset)
    assert changed == ([] if character_set == "ISO_IR 100" else ["SpecificCharacterSet"])
    assert dataset.SpecificCharacterSet == ("ISO_IR 192" if changed else "ISO_IR 100")
    assert str(dataset.PatientName) == name
    assert sent.SpecificCharacterSet == character_set  # the element was replaced, not changed
