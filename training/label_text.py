"""Report-style text synthesized from breast-level labels (the reference's "dataset augmentation").

Used for datasets that carry labels but no reports. Phrases follow ``models.prompts`` so that zero-shot
prompts and training text share a vocabulary; sentences are lower case without periods, like the
reference's ``wo_period`` report text.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from models.prompts import PROMPT_TASKS

SIDE_WORDS = {"L": "left", "R": "right"}
# The breast label that answers each prompt task (``models.prompts``): mass, calcification, malignant (0/1),
# density ("A".."D"), birads (0..5).
LABEL_OF_TASK = {"mass": "mass", "calcification": "calcification", "malignancy": "malignant",
                 "density": "density", "birads": "birads"}

POSITIVE = {
    "mass": ("there is a mass in the {side} breast", "a mass is seen in the {side} breast", "{side} breast mass"),
    "calcification": ("there are suspicious calcifications in the {side} breast",
                      "suspicious calcifications in the {side} breast", "a cluster of suspicious calcifications"),
    "malignancy": ("findings suspicious for malignancy", "highly suspicious for malignancy"),
}
NEGATIVE = {
    "mass": ("there is no mass", "no mass in the {side} breast", "no dominant mass"),
    "calcification": ("no suspicious calcification", "there are no suspicious calcifications"),
    "malignancy": ("no malignancy", "no evidence of malignancy"),
}


def label_key(labels: Mapping[str, object]) -> tuple[object, ...]:
    """Labels that decide the text's meaning: texts with equal keys are positives of each other."""
    return tuple(labels[name] for name in LABEL_OF_TASK.values())


# The categories outside the BI-RADS prompt task (1-5)
OTHER_BIRADS = {0: "birads 0 incomplete need additional imaging evaluation",
                6: "birads 6 known biopsy proven malignancy"}


def breast_text(labels: Mapping[str, object], laterality: str, rng: random.Random) -> str:
    """One randomly phrased report for a breast with labels mass, calcification, malignant (0/1),
    density ("A".."D") and birads (0..6)."""
    side = SIDE_WORDS.get(laterality, "")
    parts = []
    for finding, flag in (("mass", labels["mass"]), ("calcification", labels["calcification"]),
                          ("malignancy", labels["malignant"])):
        parts.append(rng.choice((POSITIVE if flag else NEGATIVE)[finding]).format(side=side))
    density_task = PROMPT_TASKS["density"]
    phrase = density_task.classes[density_task.labels.index(str(labels["density"]))]
    parts.append(rng.choice(density_task.templates).format(phrase))
    birads = int(labels["birads"])
    birads_task = PROMPT_TASKS["birads"]
    if str(birads) in birads_task.labels:
        parts.append(birads_task.classes[birads_task.labels.index(str(birads))])
    else:
        parts.append(OTHER_BIRADS[birads])
    rng.shuffle(parts)
    return " ".join(parts)
