"""The Structured Report: a Comprehensive 3D SR with a TID 1500 Measurement Report (the IHE AI Results form).

Measurement groups (TID 1501), each naming the algorithm and model version (TID 4019) and carrying a
tracking identifier:

- per view and per breast, one group per finding (probability of malignancy, mass, calcification) and one
  density group (breast composition A-D); the breast's malignancy group also holds the BI-RADS-style
  category. View groups reference their image, breast groups the images of that breast;
- one image-region group (TID 1410) per detected lesion: its finding type and score, and its box as a closed
  POLYLINE SCOORD on the source image, so a TID 1500 viewer draws it;
- one study group: the suspicion score (the highest breast probability of malignancy), the research-use
  statement and, when the study was incomplete, which screening views were missing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage

from dicom_node.results.codes import (
    ASSESSMENT_CATEGORY,
    BIRADS_VALUES,
    BREAST_COMPOSITION,
    DENSITY_FINDING,
    DENSITY_VALUES,
    FINDING_TYPES,
    LATERALITY,
    MALIGNANT_NEOPLASM_OF_BREAST,
    PROBABILITY_NAMES,
    PROCEDURE_REPORTED,
    UNITLESS,
)
from dicom_node.results.equipment import MANUFACTURER, add_algorithm_equipment, device_uid, software_versions
from dicom_node.results.findings import DISCLAIMER, FINDING_TASKS, Assessment, Detection, StudyFindings
from dicom_node.results.readable import describes_orientation

Group = hd.sr.MeasurementsAndQualitativeEvaluations
RegionGroup = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
SERIES_DESCRIPTION = "AI results - research/triage only"


def missing_views_text(missing: Sequence[str], unreadable: Collection[str] = ()) -> str:
    """The statement a reader sees about the completeness of the analysis (``unreadable``: the missing views
    that were received but whose images could not be read)."""
    if not missing:
        return "All four screening views were analysed."
    named = ", ".join(f"{view} (received, image unreadable)" if view in unreadable else view for view in missing)
    return f"Missing views: {named}. Partial analysis: only the available views were analysed."


class _Groups:
    """Builds the measurement groups of one report (shared algorithm identification and tracking UIDs)."""

    def __init__(self, findings: StudyFindings, sop_instance_uid: str) -> None:
        self.findings = findings
        # The SR's UID is derived from study and job, so tracking UIDs are too: a rerun repeats them.
        self.namespace = [findings.study_instance_uid, sop_instance_uid]

    def algorithm(self, target: str) -> hd.sr.AlgorithmIdentification:
        """TID 4019 for the model that gave ``target``'s scores (zero-shot or a trained head)."""
        model = self.findings.source(target)
        return hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.model_version[:64])

    def _tracking(self, identifier: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[*self.namespace, identifier]),
                                        identifier=identifier)

    def assessment(self, label: str, laterality: str, assessment: Assessment, images: Sequence[Dataset],
                   with_birads: bool) -> list[Group]:
        """One group per finding task and one density group for a view or a breast."""
        sites = [hd.sr.FindingSite(anatomic_location=codes.SCT.Breast, laterality=LATERALITY[laterality])]
        sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(image) for image in images] or None
        common = {"finding_sites": sites, "source_images": sources}
        birads = hd.sr.QualitativeEvaluation(ASSESSMENT_CATEGORY, BIRADS_VALUES[assessment.birads_category])
        # The BI-RADS assessment rides with the malignancy score when one model gave both, else on its own.
        birads_apart = self.findings.source("birads") != self.findings.source("malignancy")
        groups = []
        for task in FINDING_TASKS:
            evaluations = [birads] if task == "malignancy" and with_birads and not birads_apart else None
            measurement = hd.sr.Measurement(name=PROBABILITY_NAMES[task], value=_probability(assessment, task),
                                            unit=UNITLESS)
            groups.append(Group(tracking_identifier=self._tracking(f"{label} {task}"),
                                finding_type=FINDING_TYPES[task], measurements=[measurement],
                                qualitative_evaluations=evaluations, algorithm_id=self.algorithm(task), **common))
        if with_birads and birads_apart:
            groups.append(Group(tracking_identifier=self._tracking(f"{label} BI-RADS"),
                                finding_type=FINDING_TYPES["malignancy"], qualitative_evaluations=[birads],
                                algorithm_id=self.algorithm("birads"), **common))
        density = hd.sr.QualitativeEvaluation(BREAST_COMPOSITION, DENSITY_VALUES[assessment.density_category])
        groups.append(Group(tracking_identifier=self._tracking(f"{label} density"), finding_type=DENSITY_FINDING,
                            qualitative_evaluations=[density], algorithm_id=self.algorithm("density"), **common))
        return groups

    def region(self, number: int, detection: Detection, image: Dataset) -> RegionGroup:
        """A detected lesion: a closed rectangle on its source image, the finding type and the score."""
        x0, y0, x1, y1 = detection.box
        outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=outline,
                                   source_image=hd.sr.SourceImageForRegion.from_source_image(image))
        score = hd.sr.Measurement(name=PROBABILITY_NAMES[detection.finding], value=round(detection.score, 6),
                                  unit=UNITLESS)
        name = f"{detection.laterality}{detection.view}"
        return RegionGroup(
            tracking_identifier=self._tracking(f"{name} {detection.finding} region {number}"),
            referenced_region=region, finding_type=FINDING_TYPES[detection.finding],
            algorithm_id=self.algorithm("detector"), measurements=[score],
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Breast,
                                             laterality=LATERALITY[detection.laterality])])

    def study(self, findings: StudyFindings) -> Group:
        """The suspicion score with the research-use statement, where the score comes from, and the completeness
        statement (TEXT rows)."""
        fused = findings.case_score is not None
        suspicion = hd.sr.Measurement(name=codes.DCM.ProbabilityOfCancer, value=round(findings.suspicion, 6),
                                      unit=UNITLESS, derivation=None if fused else codes.SCT.Maximum)
        group = Group(tracking_identifier=self._tracking("study suspicion"),
                      finding_type=MALIGNANT_NEOPLASM_OF_BREAST,
                      algorithm_id=self.algorithm("case" if fused else "malignancy"),
                      finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Breast)],
                      measurements=[suspicion])
        origin = ("Study score: the four-view fusion model, from the analysed views together." if fused else
                  "Study score: the highest breast probability of malignancy.")
        for text in (DISCLAIMER, origin, missing_views_text(findings.missing_views, findings.unreadable_views)):
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        return group


def _probability(assessment: Assessment, task: str) -> float:
    value = float(assessment.scores[task])
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{task} probability {value} is outside [0, 1]")
    return round(value, 6)


def _earlier_sr(study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    """What the Predecessor Documents Sequence names of an earlier SR of the node's (its UIDs are known)."""
    earlier = Dataset()
    earlier.StudyInstanceUID, earlier.SeriesInstanceUID, earlier.SOPInstanceUID = study_uid, series_uid, sop_uid
    earlier.SOPClassUID = Comprehensive3DSRStorage
    return earlier


def _image_library(sources: Sequence[Dataset]) -> list[Dataset] | None:
    """The images the report's image library (TID 1601/1603) describes: those with the Patient Orientation and
    Imager Pixel Spacing its entries state (Type 1 in MG; an image without them is still the evidence and the
    source of its findings)."""
    return [ds for ds in sources if describes_orientation(ds) and "ImagerPixelSpacing" in ds] or None


def build_sr(findings: StudyFindings, sources: Sequence[Dataset], *, series_instance_uid: str,
             sop_instance_uid: str, series_number: int, instance_number: int,
             institution_name: str | None = None,
             predecessors: Sequence[tuple[str, str]] = ()) -> hd.sr.Comprehensive3DSR:
    """The study's AI result as a TID 1500 report; ``sources`` are the analysed images (all of one study);
    ``predecessors``: (Series, SOP Instance UID) of the node's earlier SRs of the study that this one supersedes
    (its Predecessor Documents Sequence)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    unknown = [view.name for view in findings.views if view.sop_instance_uid not in by_uid]
    if unknown:
        raise ValueError(f"views {unknown} have no source image among the {len(by_uid)} given")
    groups = _Groups(findings, sop_instance_uid)
    measurement_groups: list[Group] = []
    for view in findings.views:
        measurement_groups += groups.assessment(view.name, view.laterality, view, [by_uid[view.sop_instance_uid]],
                                                with_birads=False)
    for breast in findings.breasts:
        images = [by_uid[view.sop_instance_uid] for view in findings.views if view.laterality == breast.laterality]
        measurement_groups += groups.assessment(f"{breast.laterality} breast", breast.laterality, breast, images,
                                                with_birads=True)
    regions = []
    for number, detection in enumerate(findings.detections, start=1):
        if detection.sop_instance_uid not in by_uid:
            raise ValueError(f"a {detection.finding} detection has no source image among the {len(by_uid)} given")
        regions.append(groups.region(number, detection, by_uid[detection.sop_instance_uid]))
    measurement_groups.append(groups.study(findings))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(findings.model), name=findings.model.name[:64], manufacturer_name=MANUFACTURER,
            model_name=findings.model.name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED, imaging_measurements=[*measurement_groups, *regions],
        referenced_images=_image_library(sources))
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources), content=report[0], series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=instance_number,
        manufacturer=MANUFACTURER, institution_name=institution_name, is_complete=True, is_final=False,
        is_verified=False, previous_versions=[_earlier_sr(findings.study_instance_uid, series, sop)
                                              for series, sop in predecessors] or None)
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.ManufacturerModelName = findings.model.name[:64]
    sr.SoftwareVersions = software_versions(findings.model)
    add_algorithm_equipment(sr, findings.model)
    return sr
