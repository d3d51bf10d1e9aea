"""FActOR data: labelled converted views from the archive index, and ground-truth masks of synthetic phantoms.

Images and labels come through ``training.finetune.load_images`` (one call per attribute, the same filters as
the heads); a view's attribute label is its breast's (density: the study's, C or D counting as "dense"). Only
views labelled for every attribute are kept. Lesions are needed only to evaluate localization (``GroundTruth``):
the synthetic generator writes one mask PNG per finding and view, listed in its ``manifest.csv`` by SOP Instance
UID; a VinDr-style box CSV gives boxes by ``image_id``, the DICOM file's name without suffix. Both are in
source-image pixels; ``input_masks`` maps them onto the model input with the crop box of the preprocessing.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select

from models.errors import ConfigurationError
from models.preprocess import CropBox, PreprocessConfig, prepare_dicom
from training.archive.store import ArchiveImage, open_index
from training.detector_train import box_csv_rows, image_boxes
from training.finetune import ImageRecord, load_images

ATTRIBUTE_TARGETS = {"mass": "mass", "calcification": "calcification", "dense": "density"}
DENSE = ("C", "D")


@dataclass(frozen=True)
class FactorRecord:
    """One converted view: its cache file, index study id, side and view, 0/1 label per attribute, and
    its source DICOM (file and SOP Instance UID)."""

    path: str
    study: int
    side: str
    view: str
    labels: tuple[int, ...]
    sop_instance_uid: str
    source: str


def attribute_label(record: ImageRecord, attribute: str) -> int:
    """The 0/1 attribute label of a view from its ``load_images`` record."""
    return int(record.label in DENSE) if attribute == "dense" else int(record.label)


def _sources(index_location: str | Path) -> dict[str, tuple[str, str]]:
    """Cache file -> (SOP Instance UID, DICOM path) of every converted image of the index."""
    with open_index(index_location, create=False)() as session:
        rows = session.execute(select(ArchiveImage.cache_path, ArchiveImage.sop_instance_uid, ArchiveImage.path)
                               .where(ArchiveImage.cache_path.is_not(None)))
        return {cache: (sop, path) for cache, sop, path in rows}


def load_factor_records(index_location: str | Path, split: str, preprocess: PreprocessConfig,
                        attributes: tuple[str, ...]) -> tuple[list[FactorRecord], Counter[str]]:
    """The split's converted views labelled for every attribute, and the counts of what was left out."""
    unknown = [a for a in attributes if a not in ATTRIBUTE_TARGETS]
    if unknown:
        raise ConfigurationError(f"the archive index has no labels for {unknown}; FActOR can train on "
                                 f"{list(ATTRIBUTE_TARGETS)}")
    left_out: Counter[str] = Counter()
    labelled: dict[str, dict[str, ImageRecord]] = {}
    for attribute in attributes:
        records, skipped = load_images(index_location, split, preprocess, ATTRIBUTE_TARGETS[attribute])
        left_out |= skipped
        labelled[attribute] = {record.path: record for record in records}
    first = labelled[attributes[0]]
    paths = [path for path in first if all(path in labelled[a] for a in attributes)]
    if len(paths) < len(first):
        left_out["images without a label for every attribute"] += len(first) - len(paths)
    sources = _sources(index_location)
    records = []
    for path in paths:
        base = first[path]
        sop, source = sources[path]
        labels = tuple(attribute_label(labelled[a][path], a) for a in attributes)
        records.append(FactorRecord(path, base.study, base.side, base.view, labels, sop, source))
    return records, left_out


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in source-image pixels
Lesion = Path | Box  # a mask PNG or a box
Lesions = Mapping[str, Mapping[str, Sequence[Lesion]]]  # image key -> finding kind -> its lesions


def synthetic_masks(manifest: Path) -> dict[str, dict[str, list[Path]]]:
    """SOP Instance UID -> finding kind ("mass", "calcification") -> its mask PNGs, from a synthetic
    ``manifest.csv`` (mask files are named ``<view>_f<n>_<kind>.png``)."""
    root = Path(manifest).parent
    masks: dict[str, dict[str, list[Path]]] = {}
    with Path(manifest).open(newline="") as handle:
        for row in csv.DictReader(handle):
            kinds = masks.setdefault(row["sop_instance_uid"], {})
            for relative in filter(None, row["mask_paths"].split(";")):
                kind = Path(relative).stem.rsplit("_", 1)[1]
                kinds.setdefault(kind, []).append(root / relative)
    return masks


def csv_boxes(csv_path: Path) -> dict[str, dict[str, list[Box]]]:
    """``image_id`` -> finding kind -> its boxes, from a VinDr-style box CSV (``training.detector_train``'s
    reading: 'Mass' and 'Suspicious Calcification' rows with finite coordinates)."""
    lesions: dict[str, dict[str, list[Box]]] = {}
    for image_id, rows in box_csv_rows(csv_path).items():
        boxes, findings = image_boxes(rows)
        kinds = lesions.setdefault(image_id, {})
        for box, kind in zip(boxes, findings, strict=True):
            kinds.setdefault(kind, []).append(box)
    return lesions


@dataclass(frozen=True)
class GroundTruth:
    """Lesions to score localization against: by SOP Instance UID (a synthetic manifest) or by the DICOM file
    name without suffix (a VinDr-style box CSV, whose ``image_id`` names the file)."""

    lesions: Lesions
    by_file_name: bool = False

    @classmethod
    def read(cls, manifest: Path | None = None, boxes: Path | None = None) -> GroundTruth:
        """From a synthetic ``manifest.csv`` or a box CSV (exactly one)."""
        if manifest is not None and boxes is None:
            return cls(synthetic_masks(manifest))
        if boxes is not None and manifest is None:
            return cls(csv_boxes(boxes), by_file_name=True)
        raise ConfigurationError("localization ground truth is a synthetic manifest.csv or a box CSV (one of them)")

    def of(self, record: FactorRecord) -> Mapping[str, Sequence[Lesion]]:
        """The view's lesions by finding kind (empty when it has none)."""
        return self.lesions.get(Path(record.source).stem if self.by_file_name else record.sop_instance_uid, {})


def _source_mask(lesion: Lesion, shape: tuple[int, int], source: Path | str) -> np.ndarray:
    """A lesion as a mask over the source image: the PNG as read, or the box's pixels."""
    if isinstance(lesion, Path):
        mask = cv2.imread(str(lesion), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != shape:
            raise ConfigurationError(f"{lesion} is not a mask of {source} ({shape})")
        return mask
    mask = np.zeros(shape, np.uint8)
    x0, y0, x1, y1 = lesion
    mask[max(0, math.floor(y0)):math.ceil(y1), max(0, math.floor(x0)):math.ceil(x1)] = 1
    return mask


def _on_input(crop: CropBox, lesions: Sequence[Lesion], preprocess: PreprocessConfig,
              source: Path | str) -> list[np.ndarray]:
    """Lesions -> boolean model-input masks through ``crop``; those outside the crop are dropped."""
    mapped = []
    for lesion in lesions:
        mask = _source_mask(lesion, crop.source_shape, source)
        inside = (mask[crop.top:crop.bottom, crop.left:crop.right] > 0).astype(np.uint8)
        resized = cv2.resize(inside, (preprocess.width, preprocess.height), interpolation=cv2.INTER_NEAREST) > 0
        if resized.any():
            mapped.append(resized)
    return mapped


def input_masks(source: Path | str, lesions: Sequence[Lesion], preprocess: PreprocessConfig) -> list[np.ndarray]:
    """Source-image masks (PNG paths) or boxes -> boolean masks over the model input (H, W), through the crop and
    resize of the preprocessing; lesions that fall outside the crop are dropped."""
    return _on_input(prepare_dicom(Path(source), preprocess)[1], lesions, preprocess, source)


def positive_truths(records: Sequence[FactorRecord], attributes: Sequence[str], truth: GroundTruth,
                    preprocess: PreprocessConfig) -> tuple[list[FactorRecord], list[dict[int, list[np.ndarray]]]]:
    """The views positive for an attribute that have lesions of it inside the crop, and per view its model-input
    masks by attribute index (the form ``localization.evaluate_localization`` takes)."""
    positives, truths = [], []
    for record in records:
        kinds = truth.of(record)
        wanted = [(k, kinds[a]) for k, a in enumerate(attributes) if record.labels[k] and kinds.get(a)]
        if not wanted:
            continue
        crop = prepare_dicom(Path(record.source), preprocess)[1]
        found = {k: masks for k, lesions in wanted if (masks := _on_input(crop, lesions, preprocess, record.source))}
        if found:
            positives.append(record)
            truths.append(found)
    return positives, truths
