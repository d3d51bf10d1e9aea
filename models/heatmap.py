"""Where the image supports a finding: the image logit decomposed over the locations of the feature map.

The image embedding is the normalized projection of the *mean* feature vector, and the projection is linear,
so the zero-shot logit of a binary task (present minus absent) is exactly the mean over locations of

    c(i, j) = scale * (W f(i, j) + b) . (t_present - t_absent) / |mean_ij (W f(i, j) + b)|

When the model version calibrates the task (``models.zero_shot.LogitCalibration``: ``scale * logits + bias``
per class), the map decomposes the calibrated logit instead: ``scale * c(i, j) + (bias_present - bias_absent)``,
whose mean is the calibrated image logit. Locations whose evidence does not outweigh the calibration's prior
then count as absent, and a view the calibration calls likely always has some positive locations.

The map is max(c, 0) scaled to a peak of 1 (CAM-style), times the view's probability for the task, so its
peak equals the probability the SR reports for that view and a negative view gives a faint map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.clip import MammoClip
from models.zero_shot import ZeroShotClassifier


@dataclass(frozen=True)
class TaskDirection:
    """A binary task's present-class minus absent-class text embedding (averaged over templates), and the
    calibration of its logit difference: ``scale * logit + offset`` (1 and 0 when the task is not calibrated)."""

    vector: Tensor
    scale: float = 1.0
    offset: float = 0.0


def task_directions(classifier: ZeroShotClassifier) -> dict[str, TaskDirection]:
    """The direction of each binary task, with the classifier's calibration of it."""
    directions = {}
    for task in classifier.tasks:
        if task.binary:
            text = classifier.text_embeddings[task.name]  # (templates, 2, D)
            vector = (text[:, 1] - text[:, 0]).mean(dim=0)
            calibration = classifier.calibration.get(task.name)
            directions[task.name] = TaskDirection(vector) if calibration is None else TaskDirection(
                vector, calibration.scale, calibration.bias[1] - calibration.bias[0])
    return directions


def location_logits(model: MammoClip, feature_map: Tensor, direction: TaskDirection) -> Tensor:
    """c(i, j) of the module docstring for one view's feature map (C, h, w), calibrated: its mean is the
    (calibrated) image logit."""
    features = feature_map.float().to(model.device).permute(1, 2, 0)  # (h, w, C)
    local = model.image_projection(features)  # (h, w, D); linear, so it commutes with the spatial mean
    norm = local.mean(dim=(0, 1)).norm().clamp(min=1e-12)
    scale = model.logit_scale.exp().clamp(max=100.0)
    logits = (scale * local @ direction.vector.to(local) / norm).cpu()
    return direction.scale * logits + direction.offset


def finding_maps(model: MammoClip, feature_map: Tensor, directions: dict[str, TaskDirection],
                 probabilities: dict[str, float]) -> dict[str, Tensor]:
    """One view's feature map (C, h, w) -> a map in [0, 1] of shape (h, w) for each task in ``directions``."""
    maps = {}
    with torch.inference_mode():
        for name, direction in directions.items():
            evidence = location_logits(model, feature_map, direction).clamp(min=0)
            peak = float(evidence.max())
            maps[name] = evidence / peak * probabilities[name] if peak > 0 else torch.zeros_like(evidence)
    return maps
