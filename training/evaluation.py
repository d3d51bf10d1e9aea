"""Metrics of a model on labelled images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from models import MammoClip
from models.zero_shot import TaskScores
from training.evaluate.metrics import calibration as calibration_error
from training.label_text import LABEL_OF_TASK

BINARY_TASKS = {task: LABEL_OF_TASK[task] for task in ("mass", "calcification", "malignancy")}


def embed_batched(model: MammoClip, images: Tensor, batch_size: int = 32) -> Tensor:
    """Image embeddings in inference mode, a batch at a time."""
    with torch.inference_mode():
        return torch.cat([model.encode_images(images[i:i + batch_size].to(model.device)).cpu()
                          for i in range(0, len(images), batch_size)])


def zero_shot_metrics(scores: Mapping[str, TaskScores], labels: Sequence[dict[str, object]]) -> dict[str, float]:
    """Per-image zero-shot AUC for the binary findings, the malignancy probability's expected calibration error
    and accuracy for density, from a ``ZeroShotClassifier``'s scores of the labelled images."""
    metrics: dict[str, float] = {}
    for task, label_name in BINARY_TASKS.items():
        truth = np.array([int(item[label_name]) for item in labels])
        if 0 < truth.sum() < len(truth):
            metrics[f"{task}_auc"] = round(float(roc_auc_score(truth, scores[task].score().numpy())), 4)
            if task == "malignancy":
                metrics["malignancy_ece"] = round(calibration_error(truth, scores[task].score().numpy()).ece, 4)
    density = scores["density"]
    predicted = [density.task.labels[i] for i in density.probabilities.argmax(dim=1).tolist()]
    metrics["density_accuracy"] = round(float(np.mean([p == item["density"] for p, item in
                                                        zip(predicted, labels, strict=True)])), 4)
    metrics["n_images"] = len(labels)
    return metrics
