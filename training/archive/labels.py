"""Study labels for training: read from the report text, or from a label table that wins over it.

Labels are stored per breast: ``{"L": {"mass": 1, "calcification": 0, "malignant": None, "birads": 2},
"R": {...}, "density": "C", "birads": 2}``. ``None`` means unknown (a report states BI-RADS, not pathology:
malignancy comes only from a label table). A label table is a CSV in any layout ``training.reports.read_label_csv``
reads (the project's generic one, VinDr-Mammo's, RSNA's); ``LabelTable.match`` finds the indexed studies its rows
are about, and a study with labels but no report gets a report synthesized from them.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ConfigurationError
from training.archive.store import ArchiveStudy
from training.reports import (
    BreastLabels,
    ReportLabels,
    birads_rank,
    parse_labels,
    read_label_csv,
    synthesize_breast_report,
)

SIDES = ("L", "R")


def labels_from_report(text: str | None) -> dict[str, Any] | None:
    """Per-breast labels parsed from a report (negation-aware); None when nothing could be read. A breast's
    BI-RADS is ``_side_birads``."""
    if not text:
        return None
    parsed = parse_labels(text)
    labels: dict[str, Any] = {"density": parsed.density, "birads": parsed.birads}
    for side in SIDES:
        labels[side] = {
            "mass": _flag(parsed.finding_on("mass", side)),
            "calcification": _flag(parsed.finding_on("calcification", side)),
            "malignant": None, "birads": _side_birads(parsed, side)}
    known = [labels["density"], labels["birads"], *(labels[s][f] for s in SIDES for f in ("mass", "calcification"))]
    return labels if any(value is not None for value in known) else None


def _side_birads(parsed: ReportLabels, side: str) -> int | None:
    """The category stated for this breast when the report states any per breast; else the report's one
    category when it applies to this breast: to the breasts with a mass or calcification, or, with none, to
    those the report does not call normal (both when it calls both or neither normal). "Mass in the left
    breast; the right breast is normal. BI-RADS 5": the right breast's category is unknown, not 5."""
    if parsed.birads_by_side:
        return parsed.birads_by_side.get(side)
    applies = (parsed.mass_sides | parsed.calcification_sides) or (set(SIDES) - parsed.normal_sides) or set(SIDES)
    return parsed.birads if side in applies else None


def _flag(present: bool | None) -> int | None:
    return None if present is None else int(present)


@dataclass
class LabelTable:
    """The labelled breasts of a label CSV (``training.reports.read_label_csv``) and the file's name."""

    name: str
    breasts: list[BreastLabels]

    def match(self, studies: Iterable[ArchiveStudy]) -> tuple[dict[str, dict[str, BreastLabels]], int]:
        """Each study's labelled breasts (by StudyInstanceUID, then side) and the number of the table's breasts
        that matched no study. A breast matches the studies with an image whose file name (without extension)
        is one of its ``image_ids`` (VinDr ``images/<study_id>/<image_id>.dicom``, RSNA
        ``train_images/<patient_id>/<image_id>.dcm``); failing that, those with an image in a folder named
        ``study`` (VinDr's study_id, RSNA's patient_id); failing that, the study of that StudyInstanceUID, or
        of its ``accession_number``."""
        by_image: defaultdict[str, set[str]] = defaultdict(set)
        by_folder: defaultdict[str, set[str]] = defaultdict(set)
        by_uid: defaultdict[str, set[str]] = defaultdict(set)
        by_accession: defaultdict[str, set[str]] = defaultdict(set)
        for study in studies:
            uid = study.study_instance_uid
            by_uid[uid].add(uid)
            if study.accession_number:
                by_accession[study.accession_number].add(uid)
            for image in study.images:
                by_image[Path(image.path).stem].add(uid)
                by_folder[Path(image.path).parent.name].add(uid)
        matched: dict[str, dict[str, BreastLabels]] = {}
        unmatched = 0
        for breast in self.breasts:
            tries = ((by_image, breast.image_ids), (by_folder, [breast.study]), (by_uid, [breast.study]),
                     (by_accession, [breast.accession_number]))
            uids = next((found for index, names in tries if (found := _lookup(index, names))), set())
            unmatched += not uids
            for uid in uids:
                sides = matched.setdefault(uid, {})
                sides.setdefault(breast.laterality, BreastLabels(uid, breast.laterality)).merge(breast)
        return matched, unmatched


def _lookup(index: Mapping[str, set[str]], names: Iterable[str | None]) -> set[str]:
    return set().union(*(index.get(name, set()) for name in names if name))


def _as_int(flag: bool | None) -> int | None:
    return None if flag is None else int(flag)


def study_labels(breasts: Mapping[str, BreastLabels]) -> dict[str, Any]:
    """A study's labels as stored, from its labelled breasts: the study's density is the densest breast's,
    its BI-RADS the most severe (ACR hierarchy)."""
    labels: dict[str, Any] = {
        side: {"mass": _as_int(breast.mass), "calcification": _as_int(breast.calcification),
               "malignant": _as_int(breast.malignant), "birads": breast.birads} for side, breast in breasts.items()}
    labels["density"] = max((breast.density for breast in breasts.values() if breast.density), default=None)
    labels["birads"] = max((breast.birads for breast in breasts.values() if breast.birads is not None),
                           key=birads_rank, default=None)
    return labels


def synthesized_report(breasts: Mapping[str, BreastLabels], rng: random.Random) -> str | None:
    """Report-style text of a study that has labels but no report: ``synthesize_breast_report`` of the right
    breast, then of the left, joined with a space as the reference joins the sentences it makes from labels
    (``generate_report_from_labels``); None when no breast has complete labels."""
    texts = (synthesize_breast_report(breasts[side], rng) for side in ("R", "L") if side in breasts)
    return " ".join(text for text in texts if text) or None


def read_label_table(path: Path) -> LabelTable:
    """The label CSV at ``path``, in any layout ``read_label_csv`` tells from the header: the generic one
    (study_instance_uid/accession_number, laterality, flags), VinDr-Mammo's or RSNA's."""
    try:
        return LabelTable(path.name, read_label_csv(path))
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
