"""Contrastive objectives of Mammo-CLIP training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_clip_loss(image: Tensor, text: Tensor, scale: Tensor, groups: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between L2-normalized image and text embeddings.

    ``groups`` (N,) marks pairs whose texts mean the same thing (equal label keys); those count as
    positives of each other instead of false negatives. Without groups this is the plain CLIP loss.
    """
    logits = scale * image @ text.t()
    if groups is None:
        targets = torch.arange(len(image), device=image.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    targets = group_targets(groups)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def group_targets(groups: Tensor, columns: Tensor | None = None) -> Tensor:
    """(rows, columns) target probabilities: each row's spread evenly over the columns of its group
    (``columns``: the columns' groups, default the rows'), its own among them."""
    columns = groups if columns is None else columns
    same = (groups[:, None] == columns[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)
