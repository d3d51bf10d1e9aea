"""Who made a result object: the node's equipment attributes and the IHE AIR algorithm item."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicom_node.results.codes import PROCESSING_ALGORITHM
from dicom_node.results.findings import ModelIdentity

MANUFACTURER = "Mammo-CLIP Node"
SERIAL_NUMBER = "0"


def device_uid(model: ModelIdentity) -> str:
    """A UID that names this algorithm and model version (the same for every object it makes)."""
    return generate_uid(entropy_srcs=[model.name, model.model_version])


def software_versions(model: ModelIdentity) -> list[str]:
    """Software Versions (LO, multi-valued): the node software, then the model weights."""
    return [f"node {model.software_version}"[:64], f"model {model.model_version}"]


def add_algorithm_equipment(dataset: Dataset, model: ModelIdentity) -> None:
    """Append the IHE AI Results Contributing Equipment item (Purpose of Reference: Processing Algorithm).

    highdicom's ``ContributingEquipment`` accepts only the standard DCM purposes, so the item is written here.
    """
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
    purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = model.name[:64]
    item.SoftwareVersions = software_versions(model)
    item.DeviceUID = device_uid(model)
    existing = list(dataset.get("ContributingEquipmentSequence", []))
    dataset.ContributingEquipmentSequence = DicomSequence([*existing, item])
