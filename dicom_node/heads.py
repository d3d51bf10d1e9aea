"""Trained components served with a model version: heads, each replacing the zero-shot score of its target; the
four-view fusion model, which gives the study score; the lesion detector, whose boxes go into the SR; and the
Mammo-FActOR projectors, whose attribute maps go into the SEGs as their own segments.

A head comes from ``mammo-node train finetune`` (a folder with ``head.json`` and ``head.safetensors``) and is
registered with the version whose encoder it was trained on (``mammo-node model register ... --head DIR``).
A linear head reads the pooled features of the feature maps the analysis already computed, so it costs one
matrix product; an adapter or fully fine-tuned head runs its own encoder pass over the views.

Aggregation follows the head's own ``head.json`` (what its validation thresholds were set on): a binary head's
breast score is the max over the breast's views, a multi-class head's the mean of the views' probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydicom.dataset import Dataset
from torch import Tensor

from dicom_node.results.findings import (
    BIRADS_LABELS,
    DENSITY_LABELS,
    FINDING_TASKS,
    Detection,
    ModelIdentity,
    version_label,
)
from models.checkpoints import file_sha256, read_card
from models.clip import MammoClip
from models.errors import ConfigurationError
from models.heads import load_head, probabilities, score_images
from models.sop_classes import ViewKey

if TYPE_CHECKING:
    from training.registry import ActiveModel

HEAD_TARGETS = (*FINDING_TASKS, "density", "birads")


@dataclass
class ServedHead:
    """A loaded head, the target it scores and the identity the SR gives it."""

    target: str
    head: torch.nn.Module
    identity: ModelIdentity

    @property
    def linear_only(self) -> bool:
        """True when the head works on the model's own, unadapted encoder features."""
        return self.head.encoder is None and self.head.adapters is None

    @property
    def binary(self) -> bool:
        return self.head.linear.out_features == 1


@dataclass
class ServedMultiView:
    """The four-view fusion model of a version (Chen et al.; ``models.multiview``): it gives the study score."""

    model: torch.nn.Module
    identity: ModelIdentity

    def score(self, datasets: Mapping[ViewKey, Dataset]) -> float:
        """P(malignant) of the study from its screening views (any 1 to 4), read from their DICOM datasets."""
        from models.multiview import preprocess_view, study_probability

        views = {key: preprocess_view(ds, self.model.config) for key, ds in datasets.items()}
        return study_probability(self.model, views)


def load_multiview_model(folder: Path, base: ModelIdentity, device: str) -> ServedMultiView:
    """A registered four-view model, with the identity the SR gives its study score."""
    from models.multiview import load_multiview

    model = load_multiview(folder, device=device)
    return ServedMultiView(model, _identity("MV-Mammo-CLIP four-view fusion (Chen 2024)", folder,
                                            getattr(model, "card", {}) or {}, base))


@dataclass
class ServedDetector:
    """The lesion detector of a version (``models.detector``): boxes that the SR writes as image regions."""

    model: torch.nn.Module
    identity: ModelIdentity

    def detect(self, datasets: Mapping[ViewKey, Dataset]) -> list[Detection]:
        """Every detection of every view, in source-image pixels, with the view's SOP Instance UID."""
        from models.detector import detect_datasets

        found = detect_datasets(self.model, datasets)
        return [Detection(str(datasets[key].SOPInstanceUID), key[0], key[1], box.finding, box.score, box.box)
                for key, boxes in found.items() for box in boxes if box.finding in FINDING_TASKS]


@dataclass
class ServedFactor:
    """Mammo-FActOR projectors of a version (``models.factor``): an attribution map per attribute and view."""

    model: torch.nn.Module
    identity: ModelIdentity

    def maps(self, feature_map: Tensor) -> dict[str, np.ndarray]:
        """``factor <attribute>`` -> the attribute's map over the model input (values 0-1)."""
        from models.factor import attribution_maps

        return {f"factor {name}": values for name, values in attribution_maps(self.model, feature_map).items()}


def _identity(name: str, folder: Path, card: Mapping[str, object], base: ModelIdentity) -> ModelIdentity:
    sha = file_sha256(next(Path(folder).glob("*.safetensors")))  # of the weights loaded, not what the card says
    return ModelIdentity(name=name, software_version=base.software_version,
                         model_version=version_label(Path(folder).name, sha[:12]),
                         clinical=bool(card.get("clinical_use")))


def load_detector_model(folder: Path, base: ModelIdentity, device: str) -> ServedDetector:
    from models.detector import load_detector

    return ServedDetector(load_detector(folder, device=device),
                          _identity("Mammo-CLIP lesion detector (RetinaNet)", folder, read_card(folder), base))


def load_factor_model(folder: Path, model: MammoClip, base: ModelIdentity) -> ServedFactor:
    from models.factor import load_factor

    return ServedFactor(load_factor(folder, model, device=model.device),
                        _identity("Mammo-FActOR attribute maps", folder, read_card(folder), base))


def served_components(active: ActiveModel | None, model: MammoClip, base: ModelIdentity,
                      device: str) -> dict[str, Any]:
    """The ``Analyzer`` keyword arguments for what the active version carries besides its weights."""
    if active is None:
        return {}
    return {"heads": load_heads(active.heads, model, base),
            "multiview": load_multiview_model(active.multiview_path, base, device) if active.multiview_path else None,
            "detector": load_detector_model(active.detector_path, base, device) if active.detector_path else None,
            "factor": load_factor_model(active.factor_path, model, base) if active.factor_path else None}


def read_head(folder: Path, model: MammoClip, weights_sha256: str) -> torch.nn.Module:
    """Load a head folder and check that it fits ``model``: a known target, the same encoder, the same input
    size, and (for a head on the model's own encoder) the same encoder weights."""

    head = load_head(folder)
    info = head.info
    where = f"head {folder}"
    if info["target"] not in HEAD_TARGETS:
        raise ConfigurationError(f"{where}: target {info['target']!r} is not one of {', '.join(HEAD_TARGETS)}")
    if info["image_encoder"] != model.config.image_encoder:
        raise ConfigurationError(f"{where} was trained on {info['image_encoder']}, the model is "
                                 f"{model.config.image_encoder}")
    size = (model.config.input_height, model.config.input_width)
    if (info["input_height"], info["input_width"]) != size:
        raise ConfigurationError(f"{where} was trained on {info['input_height']}x{info['input_width']} images, "
                                 f"the model reads {size[0]}x{size[1]}")
    if not info["own_encoder"] and info["base_model_sha256"] and info["base_model_sha256"] != weights_sha256:
        raise ConfigurationError(f"{where} was trained on another model's encoder (weights "
                                 f"{info['base_model_sha256'][:12]}, this version {weights_sha256[:12]})")
    if info["target"] == "density" and tuple(info["classes"]) != DENSITY_LABELS:
        raise ConfigurationError(f"{where}: density classes {info['classes']} are not A-D")
    return head


def load_heads(paths: Mapping[str, str | Path], model: MammoClip, base: ModelIdentity) -> list[ServedHead]:
    """The registered heads of a version, on the model's device, each with its SR identity."""
    served = []
    for target, path in sorted(paths.items()):
        head = read_head(Path(path), model, getattr(model.load_report, "sha256", ""))
        if head.info["target"] != target:
            raise ConfigurationError(f"head {path} scores {head.info['target']}, registered for {target}")
        mode = head.info["mode"]
        identity = ModelIdentity(name=f"Mammo-CLIP {target} head ({mode})", software_version=base.software_version,
                                 model_version=base.model_version,
                                 clinical=base.clinical and bool(read_card(Path(path)).get("clinical_use")))
        served.append(ServedHead(target, head.to(model.device).eval(), identity))
    return served


def head_probabilities(served: ServedHead, model: MammoClip, images: Mapping[ViewKey, Tensor],
                       feature_maps: Mapping[ViewKey, Tensor]) -> dict[ViewKey, Tensor]:
    """Per view: the positive-class probability (0-d) of a binary head, the class probabilities of another."""

    keys = list(images)
    if served.linear_only:
        with torch.inference_mode():
            pooled = model.image_encoder.pool(torch.stack([feature_maps[k] for k in keys]).to(model.device))
            values = probabilities(served.head.linear(pooled.float())).cpu()
    else:
        values = score_images(model, served.head, torch.stack([images[k] for k in keys]), batch_size=1)
    return dict(zip(keys, values, strict=True))


def class_scores(served: ServedHead, probabilities: Tensor) -> dict[str, float]:
    """A multi-class head's probabilities over the SR's categories: density A-D, or BI-RADS 1-5 (a head's
    BI-RADS 0 or 6 has no place in the SR's assessment and is left out, the rest renormalized)."""
    classes = [str(name) for name in served.head.info["classes"]]
    labels = DENSITY_LABELS if served.target == "density" else BIRADS_LABELS
    values = {label: float(probabilities[classes.index(label)]) if label in classes else 0.0 for label in labels}
    total = sum(values.values())
    return {label: value / total for label, value in values.items()} if total > 0 else values
