"""The analysed images' patient and study attributes, made copyable into the node's SR and SEGs.

highdicom copies the Patient and General Study modules of the source images into each object it builds and parses
their dates, times and sex on the way. A sender's birth date in the old ACR-NEMA form (``1941-03-02``), a time
with colons or a Patient's Sex of ``U`` raised there, failed the whole analysis, and put the value into the job's
error and the log. Such a value is emptied before the objects are built: these attributes are Type 2 in both
modules, where empty means unknown. Names, IDs and the accession number are copied as sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

log = logging.getLogger(__name__)

PARSED: dict[str, Callable[[str], object]] = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}
PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})


def empty_unreadable_values(dataset: Dataset) -> list[str]:
    """Empty, in place, the values of ``PARSED`` that do not parse and a Patient's Sex other than M, F or O;
    returns their keywords (never their values, which may identify the patient)."""
    emptied = [keyword for keyword, parse in PARSED.items() if not _parses(dataset.get(keyword), parse)]
    sex = dataset.get("PatientSex")
    if sex and str(sex).strip() not in PATIENT_SEX_VALUES:
        emptied.append("PatientSex")
    for keyword in emptied:
        setattr(dataset, keyword, "")
    if emptied:
        log.warning("instance %s: %s not readable, left empty in the results", dataset.get("SOPInstanceUID"),
                    ", ".join(emptied))
    return emptied


def _parses(value: object, parse: Callable[[str], object]) -> bool:
    if value is None or value == "":
        return True
    try:
        parse(str(value))
    except (ValueError, TypeError, OverflowError):
        return False
    return True
