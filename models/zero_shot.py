"""Zero-shot scores from image-text similarity, per view and aggregated per breast."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from models.clip import MammoClip
from models.prompts import PROMPT_TASKS, PromptTask


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


class ZeroShotClassifier:
    """Text embeddings of every prompt, computed once; softmax over classes, averaged over templates."""

    def __init__(self, model: MammoClip, tasks: Iterable[str] = tuple(PROMPT_TASKS)) -> None:
        self.model = model
        self.tasks = [PROMPT_TASKS[name] for name in tasks]
        with torch.inference_mode():
            self.text_embeddings = {
                task.name: torch.stack([model.encode_texts(row) for row in task.prompts()]).float().cpu()
                for task in self.tasks
            }
            self.scale = float(model.logit_scale.exp().clamp(max=100.0))

    def classify(self, image_embeddings: Tensor) -> dict[str, TaskScores]:
        """Image embeddings (N, D) -> per-task class probabilities."""
        images = image_embeddings.float().cpu()
        results = {}
        for task in self.tasks:
            text = self.text_embeddings[task.name]  # (templates, classes, D)
            logits = self.scale * torch.einsum("nd,tcd->tnc", images, text)
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
