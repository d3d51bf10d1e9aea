"""Which studies a model learned from, kept as fingerprints, so that an evaluation can say when it scores
studies the model has seen (its figures are then optimistic).

A trained folder holds ``trained_on.json``: the SHA-256 of the StudyInstanceUID of every study in the index
splits it learned from (train, and validation where epochs or thresholds were chosen on it), with its base
model's, sorted, and the digest of that list (the card's ``training_data.studies_sha256``: two models with the
same digest learned from the same studies). UIDs are hashed so that a model folder shared between sites names
no study. A model without the file (a reference checkpoint, a folder trained before it existed) has unknown
training data: evaluations say so.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from training.archive.store import ArchiveStudy, open_index

TRAINED_ON_FILE = "trained_on.json"
FINGERPRINT = "sha256 of the StudyInstanceUID"


def fingerprint(study_uid: str) -> str:
    return hashlib.sha256(study_uid.encode()).hexdigest()


def study_uids(index_location: str | Path, splits: Sequence[str]) -> dict[int, str]:
    """Index row id -> StudyInstanceUID of every study in ``splits``."""
    with open_index(index_location, create=False)() as session:
        rows = session.execute(select(ArchiveStudy.id, ArchiveStudy.study_instance_uid)
                               .where(ArchiveStudy.split.in_(splits)))
        return {row_id: uid for row_id, uid in rows}


def digest(fingerprints: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(fingerprints)).encode()).hexdigest()


def read_record(model_path: Path | str | None) -> dict[str, Any] | None:
    """The ``trained_on.json`` of the model folder at ``model_path``; None without one (or for a file)."""
    record = Path(model_path) / TRAINED_ON_FILE if model_path is not None else None
    return json.loads(record.read_text()) if record is not None and record.is_file() else None


def write_trained_on(folder: Path, index_location: str | Path, splits: Sequence[str],
                     base: Path | str | None) -> str:
    """Record in ``folder`` the studies of ``splits`` with those ``base`` learned from (``base``: the model
    training started from, None for none); returns the digest."""
    base_record = read_record(base)
    studies = {fingerprint(uid) for uid in study_uids(index_location, splits).values()}
    studies |= set(base_record["studies"]) if base_record else set()
    base_data = "none" if base is None else "included" if base_record and base_record["base"] != "unknown" \
        else "unknown"
    record = {"fingerprint": FINGERPRINT, "splits": list(splits), "base": base_data, "count": len(studies),
              "sha256": digest(studies), "studies": sorted(studies)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAINED_ON_FILE).write_text(json.dumps(record, indent=1))
    return record["sha256"]


def seen_note(model_path: Path | str | None, evaluated_uids: Iterable[str], what: str) -> str:
    """One line for an evaluation report: how many of the evaluated studies the model at ``model_path`` (None:
    random weights) learned from."""
    evaluated = {fingerprint(uid) for uid in evaluated_uids}
    if model_path is None:
        return f"None of the {len(evaluated)} studies of {what} was seen in training: the model starts from random " \
               "weights."
    record = read_record(model_path)
    if record is None:
        return f"The model's training data is unknown (no {TRAINED_ON_FILE}): {what} may overlap it."
    seen = len(evaluated & set(record["studies"]))
    if seen:
        return (f"WARNING: {seen} of the {len(evaluated)} studies of {what} were used to train this model: these "
                "figures are optimistic.")
    unknown = " (its base model's training data is unknown)" if record["base"] == "unknown" else ""
    return f"None of the {len(evaluated)} studies of {what} was used to train this model{unknown}."
