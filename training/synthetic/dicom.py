"""Digital Mammography X-Ray Image (For Presentation) datasets for the synthetic views (PS3.3 A.26.2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from models.sop_classes import MG_FOR_PRESENTATION

VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
PATIENT_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                       ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"]}
MANUFACTURER = "Mammo-CLIP Node synthetic phantom"


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study attributes shared by the four views (all synthetic)."""

    patient_name: str
    patient_id: str
    birth_date: str
    age: int
    study_uid: str
    study_date: str
    study_time: str
    accession: str


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def build_dataset(identity: StudyIdentity, laterality: str, view: str, stored: np.ndarray, *, bits: int,
                  photometric: str, window: tuple[float, float], pixel_mm: float, series_uid: str,
                  sop_uid: str, instance_number: int) -> Dataset:
    """One complete MG image object; ``stored`` is uint16 already encoded for ``photometric``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = MG_FOR_PRESENTATION, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = identity.study_date, identity.study_time
    # Patient / General Study
    ds.PatientName, ds.PatientID = identity.patient_name, identity.patient_id
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = identity.birth_date, "F", f"{identity.age:03d}Y"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = identity.study_uid, identity.study_date, identity.study_time
    ds.AccessionNumber, ds.StudyID = identity.accession, identity.accession[-8:]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Screening mammography, bilateral (synthetic phantom)"
    # General Series / DX Series
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MG", series_uid, instance_number
    ds.SeriesDescription = f"{laterality}{view} synthetic phantom"
    ds.BodyPartExamined = "BREAST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    # General / Enhanced General Equipment
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, "training.synthetic"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "SYNTH-0001", "1"
    ds.InstitutionName = "Synthetic Phantom Site"
    # General Image / General Acquisition
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = PATIENT_ORIENTATION[(laterality, view)]
    ds.ContentDate, ds.ContentTime = identity.study_date, identity.study_time
    ds.AcquisitionDate, ds.AcquisitionTime = identity.study_date, identity.study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.ImageComments = "SYNTHETIC PHANTOM - not a patient image"
    # Image Pixel / DX Image
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    # VOI LUT
    ds.WindowCenter, ds.WindowWidth = round(window[0], 1), round(window[1], 1)
    ds.VOILUTFunction = "LINEAR"
    ds.WindowCenterWidthExplanation = "BREAST"
    # DX Anatomy Imaged / DX Detector / Mammography Image
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = Sequence([_code("76752008", "Breast")])
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [round(pixel_mm, 5)] * 2
    ds.PixelSpacing = [round(pixel_mm, 5)] * 2
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Detector pitch scaled to the breast support plane"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    view_item = _code(*VIEW_CODES[view])
    view_item.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_item])
    ds.ViewPosition = view
    ds.AcquisitionContextSequence = Sequence()
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds
