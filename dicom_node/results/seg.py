"""One FRACTIONAL (probability) Segmentation per view: one segment per finding heatmap, at the source's geometry.

Mammograms have no Frame of Reference, so each SEG derives from exactly one source image (highdicom allows
that for a single frame, without plane positions) and holds one frame per segment.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, generate_uid

from dicom_node.results.codes import LATERALITY, SEGMENT_CATEGORY, SEGMENT_TYPES
from dicom_node.results.equipment import MANUFACTURER, SERIAL_NUMBER, add_algorithm_equipment, software_versions
from dicom_node.results.findings import ModelIdentity
from dicom_node.results.readable import describes_orientation
from models.sop_classes import view_of

# The SEG's transfer syntax, by the ``seg_compression`` setting. Measured for a 4096 x 3328 SEG of 3 smooth heatmaps
# (one core, 2026-11-29): JPEG-LS Lossless 5.0 MB, 0.78 s to build; JPEG 2000 Lossless 3.8 MB, 1.44 s; uncompressed
# 41 MB, 0.22 s (RLE: 25 MB, 0.73 s). A peer that does not accept the syntax gets the SEG uncompressed
# (``dicom_node.scu``), so JPEG-LS, the fastest compact one, is the default.
SEG_TRANSFER_SYNTAXES = {"jpeg-ls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless, "none": ExplicitVRLittleEndian}
TRANSFER_SYNTAX = SEG_TRANSFER_SYNTAXES["jpeg-ls"]
# pylibjpeg-openjpeg's JPEG 2000 encoder is not thread-safe: two encodes at once in one process crash it
# (SIGSEGV), which killed the embedded worker (two analysis threads) again and again. One SEG encode at a time per
# process, whatever the syntax (the helper processes of dicom_node.results.writer encode in parallel).
_ENCODER = threading.Lock()
SERIES_DESCRIPTION = "AI heatmaps - research/triage only"
CONTENT_DESCRIPTION = "AI heatmap - research/triage only, not for diagnosis"
SEGMENT_COLORS = {"malignancy": (55.0, 75.0, 60.0), "mass": (85.0, -5.0, 80.0), "calcification": (60.0, -30.0, -40.0)}


MAX_FRACTIONAL_VALUE = 255  # a heatmap value v in [0, 1] is stored as the level round(v * 255)
FACTOR_PREFIX = "factor "  # a Mammo-FActOR map: "factor mass", "factor calcification"


class _HeatmapSegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, given the FRACTIONAL stack already as uint8 levels (0..``MAX_FRACTIONAL_VALUE``),
    each segment a contiguous plane.

    highdicom takes a float stack, checks its range by sorting all its values (``np.unique``) and scales, rounds
    and casts each segment: ~0.7 s of the ~1.1 s of CPU a 4096 x 3328 SEG of 3 maps cost, most of it on float
    maps of the source's size. ``models.crop.CropBox.paste_levels`` makes the levels directly, and here they are
    taken as they are: segments overlapping NO for one segment, UNDEFINED for several (highdicom's value for a
    fractional stack). ``tests/test_results.py`` checks that the object is the one highdicom builds from
    ``levels / MAX_FRACTIONAL_VALUE``.
    """

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array: np.ndarray, segment_numbers: np.ndarray,
                                    segmentation_type: hd.seg.SegmentationTypeValues,
                                    dtype: type) -> tuple[np.ndarray, hd.seg.SegmentsOverlapValues]:
        overlap = hd.seg.SegmentsOverlapValues.NO if pixel_array.shape[-1] == 1 else \
            hd.seg.SegmentsOverlapValues.UNDEFINED
        return pixel_array, overlap

    @staticmethod
    def _get_segment_pixel_array(pixel_array: np.ndarray, segment_number: int, described_segment_numbers: np.ndarray,
                                 segmentation_type: hd.seg.SegmentationTypeValues, max_fractional_value: int,
                                 dtype: type) -> np.ndarray:
        return pixel_array[:, :, segment_number - 1]


def _segment_label(name: str) -> str:
    """The SegmentLabel of a heatmap's segment, e.g. ``malignancy heatmap``, ``factor mass heatmap``."""
    return f"{name} heatmap"[:64]


def _finding(name: str) -> str:
    """The finding a heatmap shows: ``mass`` for both the zero-shot ``mass`` and the FActOR ``factor mass``."""
    return name.removeprefix(FACTOR_PREFIX)


def _algorithm(model: ModelIdentity) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=model.name[:64], family=codes.cid7162.ArtificialIntelligence,
                                              version=model.model_version[:64])


def _description(number: int, name: str, view: str, laterality: str, algorithm: hd.AlgorithmIdentificationSequence,
                 sop_instance_uid: str) -> hd.seg.SegmentDescription:
    finding = _finding(name)
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=_segment_label(name), segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=SEGMENT_TYPES[finding], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=f"{view} {name} heatmap"[:64],
        tracking_uid=generate_uid(entropy_srcs=[sop_instance_uid, name]), anatomic_regions=[codes.SCT.Breast],
        display_color=hd.color.CIELabColor(*SEGMENT_COLORS[finding]))
    description.SegmentDescription = (f"FActOR attribution map of {finding} (0-1)" if name != finding else
                                      f"Where the model sees evidence of {name} (probability-like, 0-1)")[:64]
    if laterality in LATERALITY:
        modifier = hd.sr.CodedConcept.from_code(LATERALITY[laterality])
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [modifier]
    return description


def build_heatmap_seg(source: Dataset, heatmaps: Mapping[str, np.ndarray], model: ModelIdentity, *,
                      series_instance_uid: str, sop_instance_uid: str, series_number: int,
                      instance_number: int, segment_models: Mapping[str, ModelIdentity] | None = None,
                      transfer_syntax_uid: str = TRANSFER_SYNTAX) -> hd.seg.Segmentation:
    """A SEG with one probability segment per heatmap (keys of ``SEGMENT_TYPES``: ``malignancy``, ``mass``,
    ``calcification``, or ``factor mass`` etc. for Mammo-FActOR maps); each heatmap is a uint8 map of the source's
    Rows x Columns holding levels 0..``MAX_FRACTIONAL_VALUE`` (``models.crop.CropBox.paste_levels``).
    ``segment_models`` names the algorithm of a segment made by another model than ``model``;
    ``transfer_syntax_uid`` is one of ``SEG_TRANSFER_SYNTAXES``."""
    if not heatmaps:
        raise ValueError("no heatmap to encode")
    shape = (int(source.Rows), int(source.Columns))
    for name, values in heatmaps.items():
        if _finding(name) not in SEGMENT_TYPES:
            raise ValueError(f"no segment code for heatmap {name!r}")
        if values.shape != shape or values.dtype != np.uint8:
            raise ValueError(f"heatmap {name!r} is {values.dtype} {values.shape}, not uint8 levels of the source "
                             f"image's {shape}")
    names = list(heatmaps)
    laterality, position = view_of(source)
    view = f"{laterality}{position}"
    others = segment_models or {}
    descriptions = [_description(number, name, view, laterality, _algorithm(others.get(name, model)),
                                 sop_instance_uid) for number, name in enumerate(names, start=1)]
    # highdicom's (frames, rows, columns, segments) stack, as a view in which each segment is a contiguous plane
    pixels = np.moveaxis(np.stack([heatmaps[name] for name in names]), 0, -1)[np.newaxis]
    with _ENCODER:
        seg = _HeatmapSegmentation(
            source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
            segment_descriptions=descriptions, series_instance_uid=series_instance_uid,
            series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=instance_number,
            manufacturer=MANUFACTURER, manufacturer_model_name=model.name[:64],
            software_versions=software_versions(model), device_serial_number=SERIAL_NUMBER,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=MAX_FRACTIONAL_VALUE, content_label="AI_HEATMAP",
            content_description=CONTENT_DESCRIPTION,
            transfer_syntax_uid=transfer_syntax_uid, omit_empty_frames=False)
    seg.SeriesDescription = SERIES_DESCRIPTION
    if "FrameOfReferenceUID" not in seg:  # General Image: Type 2C when there is no Frame of Reference
        seg.PatientOrientation = source.PatientOrientation if describes_orientation(source) else ""
    add_algorithm_equipment(seg, model)
    return seg


def seg_heatmap_names(seg: Dataset) -> list[str]:
    """The names of the heatmaps of a SEG that ``build_heatmap_seg`` made (``malignancy``, ``factor mass``...), in
    segment order; its header is enough (``stop_before_pixels``)."""
    return [str(item.SegmentLabel).removesuffix(" heatmap") for item in seg.get("SegmentSequence", [])]


def seg_heatmap(seg: Dataset, name: str = "malignancy") -> np.ndarray:
    """The ``name`` heatmap of a SEG that ``build_heatmap_seg`` made, in [0, 1] at the source image's size."""
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    if _segment_label(name) not in numbers:
        raise ValueError(f"the SEG has no {name} heatmap segment")
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        if int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == numbers[_segment_label(name)]:
            return frame.astype(np.float32) / float(seg.get("MaximumFractionalValue", MAX_FRACTIONAL_VALUE))
    raise ValueError(f"the SEG holds no frame of its {name} heatmap segment")
