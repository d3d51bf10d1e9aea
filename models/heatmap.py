"""Where the image supports a finding: the image logit decomposed over the locations of the feature map.

The image embedding is the normalized projection of the *mean* feature vector, and the projection is linear,
so the zero-shot logit of a binary task (present minus absent) is exactly the mean over locations of

    c(i, j) = scale * (W f(i, j) + b) . (t_present - t_absent) / |mean_ij (W f(i, j) + b)|

The map is max(c, 0) scaled to a peak of 1 (CAM-style), times the view's probability for the task, so its
peak equals the probability the SR reports for that view and a negative view gives a faint map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.clip import MammoClip
from models.zero_shot import ZeroShotClassifier


def task_directions(classifier: ZeroShotClassifier) -> dict[str, Tensor]:
    """For each binary task: present-class minus absent-class text embedding, averaged over templates."""
    directions = {}
    for task in classifier.tasks:
        if task.binary:
            text = classifier.text_embeddings[task.name]  # (templates, 2, D)
            directions[task.name] = (text[:, 1] - text[:, 0]).mean(dim=0)
    return directions


def location_logits(model: MammoClip, feature_map: Tensor, direction: Tensor) -> Tensor:
    """c(i, j) of the module docstring for one view's feature map (C, h, w): its mean is the image logit."""
    features = feature_map.float().to(model.device).permute(1, 2, 0)  # (h, w, C)
    local = model.image_projection(features)  # (h, w, D); linear, so it commutes with the spatial mean
    norm = local.mean(dim=(0, 1)).norm().clamp(min=1e-12)
    scale = model.logit_scale.exp().clamp(max=100.0)
    return (scale * local @ direction.to(local) / norm).cpu()


def finding_maps(model: MammoClip, feature_map: Tensor, directions: dict[str, Tensor],
                 probabilities: dict[str, float]) -> dict[str, Tensor]:
    """One view's feature map (C, h, w) -> a map in [0, 1] of shape (h, w) for each task in ``directions``."""
    maps = {}
    with torch.inference_mode():
        for name, direction in directions.items():
            evidence = location_logits(model, feature_map, direction).clamp(min=0)
            peak = float(evidence.max())
            maps[name] = evidence / peak * probabilities[name] if peak > 0 else torch.zeros_like(evidence)
    return maps
