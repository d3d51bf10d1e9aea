"""FActOR data: labelled converted views from the archive index, and ground-truth masks of synthetic phantoms.

Images and labels come through ``training.finetune.load_images`` (one call per attribute, the same filters as
the heads); a view's attribute label is its breast's (density: the study's, C or D counting as "dense"). Only
views labelled for every attribute are kept. Masks are needed only to evaluate localization: the synthetic
generator writes one PNG per finding and view, listed in its ``manifest.csv`` by SOP Instance UID, in
source-image pixels; ``input_masks`` maps them onto the model input with the crop box of the preprocessing.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import select

from models.errors import ConfigurationError
from models.preprocess import PreprocessConfig, prepare_dicom
from training.archive.store import ArchiveImage, open_index
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


def input_masks(source: Path | str, mask_paths: list[Path], preprocess: PreprocessConfig) -> list[np.ndarray]:
    """Source-image masks -> boolean masks over the model input (H, W), through the crop and resize of the
    preprocessing; masks that fall outside the crop are dropped."""
    _, crop = prepare_dicom(Path(source), preprocess)
    mapped = []
    for path in mask_paths:
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != crop.source_shape:
            raise ConfigurationError(f"{path} is not a mask of {source} ({crop.source_shape})")
        inside = (mask[crop.top:crop.bottom, crop.left:crop.right] > 0).astype(np.uint8)
        resized = cv2.resize(inside, (preprocess.width, preprocess.height), interpolation=cv2.INTER_NEAREST) > 0
        if resized.any():
            mapped.append(resized)
    return mapped
