"""Train / validation / test splits by patient, never by image, stratified by the patient's labels.

Assignments are stored in the index: a patient keeps their split when the archive is indexed again, and
only new patients are assigned, so every later step (training, evaluation) sees the same partition.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Mapping

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}


def patient_key(patient_id: str, salt: str, study_instance_uid: str = "") -> str:
    """A salted hash that groups a patient's studies without keeping the identifier. A study without a Patient ID
    (an anonymised archive) is a patient of its own, keyed by its Study Instance UID: one shared empty ID would
    put every such study into one split."""
    # a Patient ID hashes as it always did (keys already in an index stay valid); NUL is in no Patient ID (LO)
    identity = patient_id if patient_id.strip() else f"\0study:{study_instance_uid}"
    return hashlib.sha256(f"{salt}:{identity}".encode()).hexdigest()[:32]


def stratum_rank(value: str) -> tuple[int, str]:
    """How positive a stratum is, for a patient's most positive study: unlabelled below any labels, then by the
    number of positive flags."""
    return (-1, value) if value == "unlabelled" else (value.count("1"), value)


def stratum(labels: Mapping[str, object] | None) -> str:
    """The label pattern a study is stratified on: malignant, mass and calcification of either breast."""
    if not labels:
        return "unlabelled"
    flags = [any(bool((labels.get(side) or {}).get(name)) for side in ("L", "R"))
             for name in ("malignant", "mass", "calcification")]
    return "".join("1" if flag else "0" for flag in flags)


def assign_splits(patient_strata: Mapping[str, str], existing: Mapping[str, str], seed: int,
                  fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Split for each new patient (``patient_strata``: patient key -> stratum; ``existing``: kept as is).

    Within each stratum, patients are shuffled with ``seed`` and dealt so that each split's share of the
    stratum (counting the patients already assigned) comes as close as possible to its fraction.
    """
    total = sum(fractions.values())
    by_stratum: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    for patient, group in sorted(patient_strata.items()):
        if patient in existing:
            counts[group][existing[patient]] += 1
        else:
            by_stratum[group].append(patient)
    assigned: dict[str, str] = {}
    for group, patients in sorted(by_stratum.items()):
        random.Random(f"{seed}:{group}").shuffle(patients)
        tally = counts[group]
        for patient in patients:
            size = sum(tally.values()) + 1
            split = max(SPLITS, key=lambda name: fractions.get(name, 0.0) / total * size - tally[name])
            tally[split] += 1
            assigned[patient] = split
    return assigned
