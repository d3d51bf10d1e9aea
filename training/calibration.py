"""Fit the zero-shot calibration of a model version (``models.zero_shot.LogitCalibration``) on labelled images.

For each task, a temperature and a bias per class are fitted by maximum likelihood (L-BFGS) on the probability
the classifier reports: the template-averaged softmax of the calibrated logits. A small L2 penalty keeps the
bias of a class that the images lack from running off. Tasks whose labels hold a single class are skipped.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from models.zero_shot import LogitCalibration, ZeroShotClassifier
from training.label_text import LABEL_OF_TASK

log = logging.getLogger(__name__)

BIAS_PENALTY = 1e-2


def class_index(task_labels: Sequence[str], value: object) -> int | None:
    """The class index of a label value (``True``/1 -> 1, ``"C"`` -> 2, BI-RADS 4 -> 3), None if it has none
    (a binary label other than 0/1, such as -1 for "uncertain", has none)."""
    if isinstance(value, numbers.Integral) and len(task_labels) == 2:
        return int(value) if int(value) in (0, 1) else None
    text = str(int(value)) if isinstance(value, numbers.Integral) else str(value)
    return task_labels.index(text) if text in task_labels else None


def fit_task(logits: Tensor, targets: Tensor, steps: int = 100) -> LogitCalibration:
    """Scale and biases for logits (templates, N, classes) and class indices (N,)."""
    log_scale = torch.zeros((), requires_grad=True)
    bias = torch.zeros(logits.shape[-1], requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale, bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        probabilities = (log_scale.exp() * logits + bias).softmax(dim=-1).mean(dim=0)
        chosen = probabilities.gather(1, targets[:, None]).squeeze(1).clamp_min(1e-8)
        value = -chosen.log().mean() + BIAS_PENALTY * bias.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return LogitCalibration(float(log_scale.detach().exp()), tuple(float(value) for value in bias.detach()))


def fit_calibration(classifier: ZeroShotClassifier, image_embeddings: Tensor,
                    labels: Sequence[Mapping[str, object]]) -> dict[str, LogitCalibration]:
    """A calibration for every task of ``classifier`` whose labels (one mapping per image) hold two classes."""
    fitted = {}
    for task in classifier.tasks:
        key = LABEL_OF_TASK.get(task.name)
        indices = [class_index(task.labels, item.get(key)) if key else None for item in labels]
        kept = [position for position, index in enumerate(indices) if index is not None]
        targets = torch.tensor([indices[position] for position in kept], dtype=torch.long)
        classes = len(set(targets.tolist()))
        if classes < 2:
            log.info("zero-shot %s not calibrated: its labels hold %d class(es) over %d image(s)", task.name,
                     classes, len(kept))
            continue
        with torch.no_grad():
            logits = classifier.logits(task.name, image_embeddings[kept])
        fitted[task.name] = fit_task(logits, targets)
    return fitted
