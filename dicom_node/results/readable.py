r"""The analysed images' patient and study attributes, made copyable into the node's SR and SEGs.

highdicom copies the Patient and General Study modules of the source images into each object it builds, reads
some of them as plain attributes and parses their dates, times, sex and name on the way. A birth date written
``1941-03-02`` (ISO 8601, not DICOM's ``19410302``), a time with colons, a Patient's Sex of ``U``, a second
Patient's Name value or a missing Accession Number raised there, failed the whole analysis, and put the value into
the job's error and the log. Such a value is emptied (or, when absent, added empty) before the objects are built:
these attributes are Type 2 in both modules, where empty means unknown. A Patient's Name keeps its first value;
names, IDs and the accession number are otherwise copied as sent.

highdicom also copies the Specific Character Set and refuses values that pydicom reads: an empty first value
(``\ISO 2022 IR 87``, Japanese), a single value with code extensions (``ISO 2022 IR 100``), a misspelling
(``ISO-IR 100``) or a Python codec name (``UTF8``). The header's text is then decoded with the sender's character
set as pydicom reads it, and the results are written in UTF-8 (``ISO_IR 192``), which holds any text.

The image geometry highdicom copies or reads is checked too (``drop_unusable_geometry``): a Frame of Reference
UID on a projection image without an Image Position (some vendors put one on 2D views) made a SEG that needs
3D pixel measures it cannot have; a Pixel Spacing of zeros or of one value made an invalid SEG or failed it.
Such attributes are dropped from the job's copy: the results then describe the image as a plain 2D projection.
"""

from __future__ import annotations

import logging
import math
import re

from highdicom.valuerep import _check_specific_character_set
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, TM

log = logging.getLogger(__name__)

# the standard forms only: pydicom also reads the ACR-NEMA ones (1941.03.02, 12:30:00), which are invalid in output
DATE, TIME = re.compile(r"\d{8}"), re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
PARSED = {"PatientBirthDate": (DATE, DA), "StudyDate": (DATE, DA), "StudyTime": (TIME, TM)}
PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})
UTF8 = "ISO_IR 192"
# Type 2 attributes that highdicom reads as plain attributes (an absent one raised AttributeError)
READ_BY_HIGHDICOM = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                     "StudyDate", "StudyTime")


def empty_unreadable_values(dataset: Dataset) -> list[str]:
    """Empty, in ``dataset`` only (its elements are replaced, never changed), the values of ``PARSED`` that are not
    in their standard form and a Patient's Sex other than M, F or O; add the absent ``READ_BY_HIGHDICOM`` empty;
    keep a Patient's Name's first value; write in UTF-8 what highdicom cannot write in the sender's character set.
    Returns the keywords it changed (never their values, which may identify the patient)."""
    recoded = not _copyable_character_set(dataset.get("SpecificCharacterSet"))
    if recoded:
        dataset.walk(lambda *_: None)  # reads every element still raw, in sequences too, as the sender encoded it
        _replace(dataset, "SpecificCharacterSet", UTF8)
    emptied = [keyword for keyword in READ_BY_HIGHDICOM if keyword not in dataset]
    emptied += [keyword for keyword, (form, parse) in PARSED.items()
                if keyword in dataset and not _readable(dataset[keyword].value, form, parse)]
    sex = dataset.get("PatientSex")
    if sex and str(sex) not in PATIENT_SEX_VALUES:
        emptied.append("PatientSex")
    for keyword in emptied:
        _replace(dataset, keyword, "")
    changed = ["SpecificCharacterSet"] * recoded + emptied
    name = dataset.get("PatientName")
    if isinstance(name, MultiValue):
        _replace(dataset, "PatientName", name[0] if name else "")
        changed.append("PatientName")
    if changed:
        log.warning("instance %s: %s absent or not copyable as sent; in the results empty (a name: its first "
                    "value; the character set: %s)", dataset.get("SOPInstanceUID"), ", ".join(changed), UTF8)
    return changed


def drop_unusable_geometry(dataset: Dataset) -> list[str]:
    """Remove, from ``dataset`` only, a Frame of Reference UID without an Image Position (Patient), and a Pixel
    Spacing or Imager Pixel Spacing that is not two positive numbers; empty a Patient Orientation that is not
    two values. Returns the keywords it changed, and logs them with the instance's UID."""
    changed = []
    if "FrameOfReferenceUID" in dataset and "ImagePositionPatient" not in dataset:
        del dataset.FrameOfReferenceUID
        changed.append("FrameOfReferenceUID")
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in dataset and not _spacing(dataset[keyword].value):
            delattr(dataset, keyword)
            changed.append(keyword)
    if "PatientOrientation" in dataset and not describes_orientation(dataset):
        _replace(dataset, "PatientOrientation", "")
        changed.append("PatientOrientation")
    if changed:
        log.warning("instance %s: %s not usable as sent; left out of the results", dataset.get("SOPInstanceUID"),
                    ", ".join(changed))
    return changed


def describes_orientation(dataset: Dataset) -> bool:
    """Whether the image has a Patient Orientation of two values (row and column direction)."""
    value = dataset.get("PatientOrientation")
    return isinstance(value, MultiValue) and len(value) == 2 and all(value)


def _spacing(value: object) -> bool:
    """Two finite positive numbers (row and column spacing, mm)."""
    if not isinstance(value, MultiValue) or len(value) != 2:
        return False
    try:
        return all(math.isfinite(float(v)) and float(v) > 0 for v in value)
    except (TypeError, ValueError):
        return False


def _copyable_character_set(value: object) -> bool:
    """Whether highdicom accepts ``value`` as the results' Specific Character Set (absent: the default)."""
    if value is None:
        return True
    try:
        _check_specific_character_set(list(value) if isinstance(value, MultiValue) else value)
    except (ValueError, TypeError):
        return False
    return True


def _replace(dataset: Dataset, keyword: str, value: object) -> None:
    tag = tag_for_keyword(keyword)
    dataset[tag] = DataElement(tag, dictionary_VR(tag), value)


def _readable(value: object, form: re.Pattern[str], parse: type) -> bool:
    if value is None or value == "":
        return True
    if not isinstance(value, str) or not form.fullmatch(value):
        return False
    try:
        parse(value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True
