"""Zero-shot scores from image-text similarity, per view and aggregated per breast.

A CLIP's zero-shot softmax is sharp and knows nothing of how common each class is: a model that has learnt
"a finding is there" calls most breasts with any finding malignant at ~0.95. A model version can carry a
calibration per task in its card (``zero_shot_calibration``: a temperature and a bias per class, fitted on
held-out images by ``training.calibration``); the classifier then applies it to each template's logits before the
softmax. The probabilities then match the class frequencies of the images it was fitted on; the order of images
within a task barely moves (a binary task's scale and bias are monotonic for each template).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from models.clip import MammoClip
from models.prompts import PROMPT_SETS, PROMPT_TASKS, PromptTask


@dataclass
class TaskScores:
    """Class probabilities of one task for a batch of images (N, C)."""

    task: PromptTask
    probabilities: Tensor

    def score(self) -> Tensor:
        """Positive-class probability for binary tasks, expected class index otherwise."""
        if self.task.binary:
            return self.probabilities[:, 1]
        classes = torch.arange(len(self.task.classes), dtype=self.probabilities.dtype)
        return self.probabilities @ classes


CALIBRATION_KEY = "zero_shot_calibration"


@dataclass(frozen=True)
class LogitCalibration:
    """An affine map of one task's logits: ``scale * logits + bias`` (a temperature and a bias per class)."""

    scale: float
    bias: tuple[float, ...]

    @classmethod
    def from_card(cls, entry: Mapping[str, Any]) -> LogitCalibration:
        """From a card entry; a scale that is not a positive finite number (it would reverse or erase the order
        of the scores) or a bias that is not finite is refused."""
        scale, bias = float(entry["scale"]), tuple(float(value) for value in entry["bias"])
        if not (math.isfinite(scale) and scale > 0 and all(map(math.isfinite, bias))):
            raise ValueError(f"a zero-shot calibration needs a positive finite scale and finite biases, not "
                             f"{scale} and {bias}")
        return cls(scale, bias)

    def to_card(self) -> dict[str, object]:
        return {"scale": round(self.scale, 6), "bias": [round(value, 6) for value in self.bias]}


def card_calibration(model: MammoClip) -> dict[str, LogitCalibration]:
    """The per-task calibration in the card of ``model``'s version (none for a bare checkpoint)."""
    entries = (getattr(model, "card", None) or {}).get(CALIBRATION_KEY) or {}
    return {task: LogitCalibration.from_card(entry) for task, entry in entries.items()}


class ZeroShotClassifier:
    """Text embeddings of every prompt, computed once; softmax over classes, averaged over templates; each task's
    logits calibrated first when ``calibration`` (default: the model card's) has it.

    ``prompt_set``: ``node`` (``PROMPT_TASKS``, logits scaled by the model's logit scale) or ``reference`` (the
    reference's own prompts, scored as its evaluator does: softmax of the cosine similarities, no scale, no
    calibration)."""

    def __init__(self, model: MammoClip, tasks: Iterable[str] = tuple(PROMPT_TASKS),
                 calibration: Mapping[str, LogitCalibration] | None = None, prompt_set: str = "node") -> None:
        self.model = model
        prompts = PROMPT_SETS[prompt_set]
        self.tasks = [prompts[name] for name in tasks]
        reference = prompt_set == "reference"
        self.calibration = {} if reference else dict(card_calibration(model) if calibration is None else calibration)
        for name, entry in self.calibration.items():
            if name in PROMPT_TASKS and len(entry.bias) != len(PROMPT_TASKS[name].classes):
                raise ValueError(f"the {name} calibration has {len(entry.bias)} biases for "
                                 f"{len(PROMPT_TASKS[name].classes)} classes")
        with torch.inference_mode():
            self.text_embeddings = {
                task.name: torch.stack([model.encode_texts(row) for row in task.prompts()]).float().cpu()
                for task in self.tasks
            }
            self.scale = 1.0 if reference else float(model.logit_scale.exp().clamp(max=100.0))

    def logits(self, task: str, image_embeddings: Tensor) -> Tensor:
        """Uncalibrated logits of one task (templates, N, classes)."""
        text = self.text_embeddings[task]  # (templates, classes, D)
        return self.scale * torch.einsum("nd,tcd->tnc", image_embeddings.float().cpu(), text)

    def classify(self, image_embeddings: Tensor) -> dict[str, TaskScores]:
        """Image embeddings (N, D) -> per-task class probabilities."""
        images = image_embeddings.float().cpu()  # once, not per task (``logits`` then has nothing to convert)
        results = {}
        for task in self.tasks:
            logits = self.logits(task.name, images)
            calibration = self.calibration.get(task.name)
            if calibration is not None:
                logits = calibration.scale * logits + torch.tensor(calibration.bias, dtype=logits.dtype)
            results[task.name] = TaskScores(task, logits.softmax(dim=-1).mean(dim=0))
        return results


def aggregate_breasts(view_scores: Mapping[tuple[str, str], dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Average the class probabilities of the views of each breast (the reference's per-breast mean)."""
    by_side: dict[str, list[dict[str, Tensor]]] = {}
    for (laterality, _view), scores in view_scores.items():
        by_side.setdefault(laterality, []).append(scores)
    return {
        side: {task: torch.stack([view[task] for view in views]).mean(dim=0) for task in views[0]}
        for side, views in by_side.items()
    }
