"""Study inference: batched views through the image tower, zero-shot scores per view and per breast."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydicom.dataset import Dataset
from torch import Tensor

from models.clip import MammoClip
from models.preprocess import preprocess_dicom, read_dicom
from models.sop_classes import SCREENING_VIEWS, ViewKey, view_of, view_preference
from models.zero_shot import ZeroShotClassifier, aggregate_breasts

log = logging.getLogger(__name__)


@dataclass
class StudyScores:
    """Zero-shot class probabilities per view and per breast, the views that were missing, and (on request)
    the last feature map of each view."""

    views: dict[ViewKey, dict[str, Tensor]]
    breasts: dict[str, dict[str, Tensor]]
    embeddings: dict[ViewKey, Tensor]
    missing_views: list[ViewKey] = field(default_factory=list)
    feature_maps: dict[ViewKey, Tensor] = field(default_factory=dict)


def encode_views(model: MammoClip, images: Mapping[ViewKey, Tensor], batch_size: int | None = None,
                 cuda_autocast: torch.dtype | None = torch.bfloat16,
                 keep_feature_maps: bool = True) -> tuple[dict[ViewKey, Tensor], dict[ViewKey, Tensor]]:
    """Embeddings and (unless not ``keep_feature_maps``: none, and on CUDA no copy of them to the host) last
    feature maps of the views, in inference mode, channels-last, autocast to ``cuda_autocast`` on CUDA (None:
    float32 throughout; the CPU always runs float32).

    ``batch_size`` defaults to all views at once on CUDA and one view at a time on CPU, where a batch of
    large images runs slower than single images (measured by ``benchmarks/inference.py``). Pass the
    ``models.optimize.inference_copy`` of a model for the folded-BN fast path.
    """
    keys = list(images)
    on_cuda = model.device.type == "cuda"
    step = batch_size or (len(keys) if on_cuda else 1)
    batch = torch.stack([images[k] for k in keys]).to(model.device).contiguous(memory_format=torch.channels_last)
    embeddings, feature_maps = [], []
    autocast = torch.autocast(model.device.type, dtype=cuda_autocast or torch.float32,
                              enabled=on_cuda and cuda_autocast is not None)
    with torch.inference_mode(), autocast:
        for i in range(0, len(keys), step):
            feature_map = model.image_feature_map(batch[i:i + step])
            embeddings.append(model.project_feature_map(feature_map).float().cpu())
            if keep_feature_maps:
                feature_maps.append(feature_map.float().cpu())
    return (dict(zip(keys, torch.cat(embeddings), strict=True)),
            dict(zip(keys, torch.cat(feature_maps), strict=True)) if keep_feature_maps else {})


def embed_views(model: MammoClip, images: Mapping[ViewKey, Tensor], batch_size: int | None = None,
                cuda_autocast: torch.dtype | None = torch.bfloat16) -> dict[ViewKey, Tensor]:
    """L2-normalized embeddings of the views (see ``encode_views``)."""
    return encode_views(model, images, batch_size, cuda_autocast, keep_feature_maps=False)[0]


def score_views(classifier: ZeroShotClassifier, images: Mapping[ViewKey, Tensor],
                keep_feature_maps: bool = False) -> StudyScores:
    """Zero-shot probabilities for each view and each breast of one study."""
    embeddings, feature_maps = encode_views(classifier.model, images, keep_feature_maps=keep_feature_maps)
    keys = list(embeddings)
    results = classifier.classify(torch.stack([embeddings[k] for k in keys]))
    views = {key: {task: scores.probabilities[i] for task, scores in results.items()} for i, key in enumerate(keys)}
    missing = [key for key in SCREENING_VIEWS if key not in views]
    return StudyScores(views, aggregate_breasts(views), embeddings, missing, feature_maps)


def load_study_images(paths: list[Path], model: MammoClip) -> dict[ViewKey, Tensor]:
    """Read and preprocess the screening views (LCC, RCC, LMLO, RMLO) of one study's mammograms, keyed by
    (laterality, view); non-MG files raise. Of several images of one view the one ``view_preference`` ranks first
    is kept (a standard view before a spot or magnified one, then the latest acquired); the others, and images
    of other views, are logged and left out."""
    found: dict[ViewKey, list[tuple[Path, Dataset]]] = {}
    for path in sorted(paths):
        ds = read_dicom(path)
        key = view_of(ds)
        if key not in SCREENING_VIEWS:
            log.info("%s is not a screening view (%s): left out", path.name, "".join(key) or "no view")
            continue
        found.setdefault(key, []).append((path, ds))
    images: dict[ViewKey, Tensor] = {}
    config = model.config.preprocess()
    for key, candidates in found.items():
        *dropped, (chosen, ds) = sorted(candidates, key=lambda candidate: view_preference(candidate[1]))
        for path, _ in dropped:
            log.info("%s: another %s%s than %s (modified or acquired earlier), left out", path.name, *key,
                     chosen.name)
        images[key] = preprocess_dicom(ds, config)
    return images
