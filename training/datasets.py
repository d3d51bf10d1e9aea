"""Training data from the archive index: one item per breast, two of its views and two phrasings of its report.

Images are the conversion cache (``training.convert``: the model input before normalization), memory-mapped
and normalized by ``models.preprocess.normalize``, the code inference uses. The item layout follows the
reference's ``ImageTextDataset``: CC and MLO of the same breast are the two images (a single view is paired
with a second augmentation of itself), and the two texts are sections of the report (FINDINGS, IMPRESSION)
drawn with replacement, or report-style sentences synthesized from the labels when there is no report.
Every random choice of an item is seeded by (seed, epoch, index), so an item is the same whichever process
loads it and whenever: a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from torch import Tensor
from torch.utils.data import Dataset

from models.preprocess import PreprocessConfig, normalize
from training.archive.store import ArchiveImage, ArchiveStudy, open_index
from training.convert import cache_key
from training.label_text import breast_text, label_key
from training.reports import training_texts

log = logging.getLogger(__name__)

SIDES = ("L", "R")
VIEWS = ("CC", "MLO")
DENSITIES = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Augment:
    """Light image augmentation for training, on the uint8 image before normalization.

    A linear brightness/contrast change would be undone by the per-image min-max of ``normalize``, so the
    intensity jitter is a gamma curve (log-uniform in [1/(1+gamma), 1+gamma]).
    """

    flip: float = 0.5
    rotate: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    gamma: float = 0.25


@dataclass(frozen=True)
class BreastItem:
    """One breast of one study: its cache files per view and what its texts are made from."""

    laterality: str
    views: dict[str, tuple[str, ...]]
    sections: tuple[str, ...]
    labels: dict[str, Any] | None

    @property
    def label_meaning(self) -> int | None:
        """What a text phrased from this breast's labels means (its side and ``label_key``: another phrasing of
        equal labels means the same), a stable 63-bit hash; None for a breast whose texts are its report's
        sections, which are positives of their own breast only, as in the reference."""
        if self.sections or not self.labels:
            return None
        meaning = repr((self.laterality, label_key(self.labels)))
        return int.from_bytes(hashlib.sha256(meaning.encode()).digest()[:8], "big") >> 1


def breast_labels(labels: dict[str, Any] | None, side: str) -> dict[str, Any] | None:
    """The labels ``breast_text`` needs for one breast, or None when any of them is unknown (a missing
    label must not be phrased as a negative finding). The BI-RADS is the breast's own: the study's category
    may be another breast's ("mass in the left breast; the right is normal. BI-RADS 5")."""
    breast = dict((labels or {}).get(side) or {})
    breast["density"] = (labels or {}).get("density")
    complete = all(breast.get(name) is not None for name in ("mass", "calcification", "malignant", "birads"))
    return breast if complete and breast["density"] in DENSITIES else None


def unusable_reason(image: ArchiveImage, key: str, size: str) -> str | None:
    """Why an indexed image cannot be used at this preprocessing (``key``, ``size``), or None."""
    if image.convert_error:
        return "images whose conversion failed"
    if image.cache_path is None or image.cache_key != key:
        return f"images not converted at {size}"
    if not Path(image.cache_path).exists():
        return "images whose cache file is missing"
    return None


def _breast(study: ArchiveStudy, side: str, key: str, size: str, left_out: Counter[str]) -> BreastItem | None:
    views: dict[str, list[str]] = {}
    for image in sorted(study.images, key=lambda image: image.id):
        if image.laterality != side or image.view not in VIEWS:
            continue
        reason = unusable_reason(image, key, size)
        if reason:
            left_out[reason] += 1
        else:
            views.setdefault(image.view, []).append(str(image.cache_path))
    if not views:
        return None
    # A text synthesized from a label table at indexing is one fixed phrasing of both breasts: the labels
    # themselves give new, breast-specific phrasings every step.
    report = None if study.report_synthesized else study.report_text
    item = BreastItem(side, {view: tuple(paths) for view, paths in views.items()},
                      tuple(training_texts(report or "")), breast_labels(study.labels, side))
    if not item.sections and item.labels is None:
        left_out["breasts without a report or complete labels"] += 1
        return None
    return item


def load_breasts(index_location: str | Path, split: str,
                 preprocess: PreprocessConfig) -> tuple[list[BreastItem], Counter[str], int]:
    """The split's breasts that have a usable image and a text, what was left out and why, and the number
    of studies they come from."""
    key, size = cache_key(preprocess), f"{preprocess.height}x{preprocess.width}"
    left_out: Counter[str] = Counter()
    items: list[BreastItem] = []
    studies = 0
    sessions = open_index(index_location, create=False)
    with sessions() as session:
        query = (select(ArchiveStudy).where(ArchiveStudy.split == split).order_by(ArchiveStudy.id)
                 .options(selectinload(ArchiveStudy.images)))
        for study in session.scalars(query):
            found = [item for side in SIDES if (item := _breast(study, side, key, size, left_out)) is not None]
            items += found
            studies += bool(found)
    return items, left_out, studies


def augment_image(image: np.ndarray, rng: np.random.Generator, augment: Augment) -> np.ndarray:
    """Random flip, rotation, scale and shift (one affine warp), then a gamma jitter; uint8 in and out."""
    height, width = image.shape
    if rng.random() < augment.flip:
        image = image[:, ::-1]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-augment.rotate, augment.rotate),
                                     1 + rng.uniform(-augment.scale, augment.scale))
    matrix[:, 2] += rng.uniform(-augment.translate, augment.translate, 2) * (width, height)
    image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (width, height), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    gamma = math.exp(rng.uniform(-1, 1) * math.log1p(augment.gamma))
    table = np.round(255 * (np.arange(256) / 255) ** gamma).astype(np.uint8)
    return cv2.LUT(image, table)


class BreastDataset(Dataset):
    """Breasts of one split as ``{"image", "image_view", "text", "text2", "meaning"}`` (two normalized
    (3, H, W) tensors, two strings, and what they mean: ``BreastItem.label_meaning``, or for a breast with a
    report a negative number of its own). ``augment=None``
    (evaluation): CC then MLO, the first image of each, no augmentation, the report's sections in order."""

    def __init__(self, index_location: str | Path, split: str, preprocess: PreprocessConfig, *,
                 augment: Augment | None = Augment(), seed: int = 0) -> None:
        self.items, self.left_out, self.studies = load_breasts(index_location, split, preprocess)
        self.preprocess, self.augment, self.seed, self.epoch = preprocess, augment, seed, 0
        self.images = sum(len(paths) for item in self.items for paths in item.views.values())
        if self.left_out:
            log.warning("%s split: left out %s", split,
                        ", ".join(f"{count} {reason}" for reason, count in sorted(self.left_out.items())))
        log.info("%s split: %d breasts (%d images) of %d studies", split, len(self.items), self.images,
                 self.studies)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations and texts (call before each epoch's loader is made)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        item = self.items[index]
        first, second = self._pick_images(item, rng)
        text, text2 = self._texts(item, random.Random(int(rng.integers(2**63))))
        meaning = item.label_meaning
        return {"image": self._load(first, rng), "image_view": self._load(second, rng), "text": text,
                "text2": text2, "meaning": -(index + 1) if meaning is None else meaning}  # < 0: its own only

    def _pick_images(self, item: BreastItem, rng: np.random.Generator) -> tuple[str, str]:
        views = [view for view in VIEWS if view in item.views]
        if self.augment is None:
            paths = [item.views[view][0] for view in views]
            return paths[0], paths[-1]
        if len(views) == 2:
            order = rng.permutation(views)
            return str(rng.choice(item.views[order[0]])), str(rng.choice(item.views[order[1]]))
        paths = item.views[views[0]]
        first, second = rng.choice(len(paths), size=2, replace=len(paths) < 2)
        return paths[first], paths[second]

    def _load(self, path: str, rng: np.random.Generator) -> Tensor:
        image = np.load(path, mmap_mode="r")
        if self.augment is not None:
            image = augment_image(image, rng, self.augment)
        return normalize(np.asarray(image), self.preprocess)

    def _texts(self, item: BreastItem, rng: random.Random) -> tuple[str, str]:
        if not item.sections:
            return breast_text(item.labels, item.laterality, rng), breast_text(item.labels, item.laterality, rng)
        if self.augment is None:
            return item.sections[0], item.sections[-1]
        return rng.choice(item.sections), rng.choice(item.sections)
