"""Mammo-FActOR: per-attribute projectors that localize findings with a frozen Mammo-CLIP image encoder.

Every channel of the encoder's last feature map (N, C, h, w) is one "region": its flattened spatial map
z_c (h*w values). For each attribute k (mass, calcification...) a projector
pi_k = Linear(h*w, h*w) -> ReLU -> Linear(h*w, D) maps each region into the shared text space, where it is
compared with t_k, the L2-normalized mean of many attribute sentences encoded by the frozen text tower and
text projection. Training (``factor_loss``) pulls the best-matching channel of positive images towards t_k
and pushes that of negatives away. The attribution map of k combines the channel maps that match t_k best.

h*w depends on the input size, so a FActOR is built for one model input size and refuses any other.
Reference: ``batmanlab/Mammo-CLIP`` notebook ``Mammo-Factor.ipynb`` (training only; the map recipe is ours,
see docs/factor.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.clip import MammoClip
from models.errors import CheckpointError, ConfigurationError
from models.preprocess import CropBox

log = logging.getLogger(__name__)

FACTOR_WEIGHTS = "factor.safetensors"
FACTOR_CONFIG = "factor.json"
FORMAT = "mammo-factor/1"
WEIGHTINGS = ("softmax", "positive")

_LOCATIONS = ("upper", "lower", "inner", "outer", "upper outer", "upper inner", "lower outer", "lower inner",
              "central", "subareolar", "retroareolar", "axillary tail")
_SIDES = ("left", "right")
_DEPTHS = ("anterior", "mid", "posterior")
_FINDING_TEMPLATES = {
    "mass": ("there is a suspicious mass in the {place}", "there is an irregular mass in the {place}",
             "a spiculated mass is seen in the {place}", "there is a new oval mass in the {place}",
             "there is a circumscribed round mass in the {place}", "there is a focal mass in the {place}"),
    "calcification": ("there are suspicious calcifications in the {place}",
                      "there are suspicious new calcifications in the {place}",
                      "there are questionable linear calcifications in the {place}",
                      "there are pleomorphic calcifications in the {place}",
                      "there are amorphous calcifications in the {place}",
                      "there are grouped punctate calcifications in the {place}",
                      "there is a cluster of microcalcifications in the {place}",
                      "there are fine linear branching calcifications in the {place}"),
}
_DENSE_SENTENCES = ("the breast tissue is heterogeneously dense, which may obscure small masses",
                    "the breast tissue is extremely dense, which lowers the sensitivity of mammography",
                    "the {side} breast is heterogeneously dense", "the {side} breast is extremely dense",
                    "there is dense fibroglandular tissue in the {location} {side} breast",
                    "the {side} breast shows extensive dense fibroglandular tissue")
ATTRIBUTES = (*_FINDING_TEMPLATES, "dense")


class FactorSizeError(ConfigurationError):
    """A feature map or image whose size is not the one the FActOR was built for."""


def attribute_sentences(attribute: str) -> list[str]:
    """The templated report sentences of one attribute (``ATTRIBUTES``), as the reference's prompt lists:
    finding x quadrant x side x depth, e.g. "there is a suspicious mass in the upper outer left breast at mid
    depth"; density: dense-tissue sentences by side and location."""
    if attribute == "dense":
        return sorted({text.format(side=side, location=location) for text in _DENSE_SENTENCES
                       for side in _SIDES for location in _LOCATIONS})
    if attribute not in _FINDING_TEMPLATES:
        raise ConfigurationError(f"unknown FActOR attribute {attribute!r}; known: {list(ATTRIBUTES)}")
    return [template.format(place=f"{location} {side} breast at {depth} depth")
            for template in _FINDING_TEMPLATES[attribute]
            for location in _LOCATIONS for side in _SIDES for depth in _DEPTHS]


@dataclass(frozen=True)
class FactorConfig:
    """What a FActOR was built for (stored as ``factor.json``) and how its maps are made.

    ``top_k`` channel maps are combined with ``weighting`` ("softmax": softmax of their scores over
    ``temperature``; "positive": their positive scores, normalized), and ``quantile`` thresholds the map into
    regions.
    """

    attributes: tuple[str, ...]
    input_height: int
    input_width: int
    map_height: int
    map_width: int
    channels: int
    embed_dim: int
    base_model_sha256: str = ""
    top_k: int = 3
    quantile: float = 0.95
    weighting: str = "softmax"
    temperature: float = 0.07

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if not self.attributes or unknown or len(set(self.attributes)) != len(self.attributes):
            raise ConfigurationError(f"FActOR attributes must be distinct names from {list(ATTRIBUTES)}, "
                                     f"got {list(self.attributes)}")
        if not 1 <= self.top_k <= self.channels:
            raise ConfigurationError(f"top_k must be between 1 and {self.channels} channels, got {self.top_k}")
        if not 0.0 < self.quantile < 1.0:
            raise ConfigurationError(f"quantile must be in (0, 1), got {self.quantile}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigurationError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")

    @property
    def region_dim(self) -> int:
        """Length of one region vector: the feature map's h * w."""
        return self.map_height * self.map_width

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_height, self.input_width

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "attributes": list(self.attributes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactorConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def projector(region_dim: int, embed_dim: int) -> nn.Sequential:
    """pi_k: Linear(h*w, h*w) -> ReLU -> Linear(h*w, D)."""
    return nn.Sequential(nn.Linear(region_dim, region_dim), nn.ReLU(), nn.Linear(region_dim, embed_dim))


class Factor(nn.Module):
    """The per-attribute projectors and their attribute text embeddings (buffer ``text_embeddings``, (K, D))."""

    def __init__(self, config: FactorConfig, text_embeddings: Tensor) -> None:
        super().__init__()
        if tuple(text_embeddings.shape) != (len(config.attributes), config.embed_dim):
            raise ConfigurationError(f"text embeddings of shape {tuple(text_embeddings.shape)} do not match "
                                     f"{len(config.attributes)} attributes x {config.embed_dim}")
        self.config = config
        self.projectors = nn.ModuleDict({a: projector(config.region_dim, config.embed_dim) for a in config.attributes})
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.float(), dim=-1))

    def check_feature_map(self, feature_map: Tensor) -> None:
        """Refuse a feature map that is not (N, C, h, w) of the size this FActOR was built for."""
        c = self.config
        expected = (c.channels, c.map_height, c.map_width)
        if feature_map.ndim != 4 or tuple(feature_map.shape[1:]) != expected:
            raise FactorSizeError(
                f"this FActOR was built for {c.input_height}x{c.input_width} inputs, whose feature maps are "
                f"(N, {c.channels}, {c.map_height}, {c.map_width}); got {tuple(feature_map.shape)}. The projectors "
                "take h*w inputs, so a FActOR serves only its model's input size: train one for this size.")

    def region_embeddings(self, feature_map: Tensor) -> Tensor:
        """(N, C, h, w) -> L2-normalized region embeddings (N, K, C, D): attribute k, channel c.

        Each channel's map is projected on its own. (The reference concatenates the per-attribute outputs
        (N, C, D) along dim 1, the channel axis, then views them as (-1, K, D), which interleaves channels and
        attributes: a porting bug from ViLLA's 2-D regions. The right axis is the last one; stacking on a new
        attribute axis here is that fix.)
        """
        self.check_feature_map(feature_map)
        regions = feature_map.flatten(2).to(self.text_embeddings.dtype)  # (N, C, h*w)
        projected = [self.projectors[a](regions) for a in self.config.attributes]  # K x (N, C, D)
        return F.normalize(torch.stack(projected, dim=1), dim=-1)

    def channel_scores(self, feature_map: Tensor) -> Tensor:
        """cos(pi_k(z_c), t_k) for every channel: (N, K, C)."""
        regions = self.region_embeddings(feature_map)
        return torch.einsum("nkcd,kd->nkc", regions, self.text_embeddings.to(regions.dtype))

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.channel_scores(feature_map)

    def attribution(self, feature_map: Tensor) -> Tensor:
        """Attribution maps at the model input size, (N, K, H, W), each scaled to a peak of 1."""
        scores = self.channel_scores(feature_map)
        combined = combine_channels(feature_map.float(), scores.float(), self.config.top_k,
                                    self.config.weighting, self.config.temperature)
        return upsample(combined, self.config.input_size)


def factor_loss(scores: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """The reference's FActOR loss on channel scores (N, K, C) and 0/1 labels (N, K).

    s_ik = max_c cos(pi_k(z_ic), t_k) / tau, and over the positive pairs (i, k)

        loss = mean -log[ exp(s_ik) / (exp(s_ik) + sum_j exp(s_jk * (1 - y_jk))) ]

    where j runs over the whole batch (i included): a negative contributes exp(s_jk), a positive exp(0) = 1.
    Computed in float32 with log-sum-exp. A batch without positives gives a zero loss.
    """
    s = scores.float().amax(dim=2) / temperature
    y = labels.to(s.dtype)
    background = torch.logsumexp(s * (1 - y), dim=0, keepdim=True)  # log sum_j exp(s_jk (1 - y_jk)), (1, K)
    terms = torch.logaddexp(s, background) - s
    positive = y > 0.5
    if not bool(positive.any()):
        return s.sum() * 0.0
    return terms[positive].mean()


def combine_channels(feature_map: Tensor, scores: Tensor, top_k: int, weighting: str,
                     temperature: float) -> Tensor:
    """Weighted sum of the ``top_k`` best-scoring channel maps per image and attribute: (N, K, h, w).

    Each channel map is clamped at zero and scaled to a peak of 1 before weighting, so the weights alone
    decide each channel's share (our choice; the paper's recipe is not published).
    """
    n, _, h, w = feature_map.shape
    maps = feature_map.clamp(min=0).flatten(2)
    maps = maps / maps.amax(dim=2, keepdim=True).clamp(min=1e-12)  # (N, C, h*w)
    top, index = scores.topk(top_k, dim=2)  # (N, K, top_k)
    if weighting == "softmax":
        weights = (top / temperature).softmax(dim=2)
    else:
        positive = top.clamp(min=0)
        total = positive.sum(dim=2, keepdim=True)
        weights = torch.where(total > 0, positive / total.clamp(min=1e-12), torch.full_like(top, 1.0 / top_k))
    chosen = torch.stack([maps[i, index[i]] for i in range(n)])  # (N, K, top_k, h*w)
    return (weights.unsqueeze(-1) * chosen).sum(dim=2).view(n, -1, h, w)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (N, K, h, w) maps to ``size``, each scaled to a peak of 1 (zero stays zero)."""
    up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False).clamp(min=0)
    return up / up.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class Region:
    """A connected region of a thresholded map: its box (x0, y0, x1, y1; x1 and y1 exclusive), pixel
    count and the map's peak inside it."""

    box: tuple[int, int, int, int]
    area: int
    peak: float


def threshold_map(heatmap: np.ndarray, quantile: float) -> np.ndarray:
    """Pixels above the map's ``quantile`` (the paper's 95%); at or above it when none is strictly above."""
    level = float(np.quantile(heatmap, quantile))
    mask = heatmap > level
    return mask if mask.any() else heatmap >= level


def regions(heatmap: np.ndarray, quantile: float) -> list[Region]:
    """Connected regions (8-connectivity) of the thresholded map, highest peak first."""
    mask = threshold_map(heatmap, quantile).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        found.append(Region((x, y, x + w, y + h), area, float(heatmap[labels == label].max())))
    return sorted(found, key=lambda region: -region.peak)


def box_to_source(box: tuple[int, int, int, int], crop: CropBox, input_size: tuple[int, int]) -> tuple[
        int, int, int, int]:
    """A box over the model input (H, W) -> the same box in source-image pixels (the inverse of the crop
    and resize that ``models.preprocess.prepare_dicom`` applied)."""
    sy = (crop.bottom - crop.top) / input_size[0]
    sx = (crop.right - crop.left) / input_size[1]
    x0, y0, x1, y1 = box
    return (crop.left + round(x0 * sx), crop.top + round(y0 * sy), crop.left + round(x1 * sx),
            crop.top + round(y1 * sy))


@dataclass
class ViewLocalization:
    """One view's FActOR output in source-image coordinates: a [0, 1] map and regions per attribute."""

    maps: dict[str, np.ndarray]
    regions: dict[str, list[Region]]


def attribution_maps(factor: Factor, feature_map: Tensor) -> dict[str, np.ndarray]:
    """One view's feature map (C, h, w) -> a [0, 1] map per attribute at the model input size."""
    with torch.inference_mode():
        maps = factor.attribution(feature_map.unsqueeze(0).to(factor.text_embeddings.device))[0].cpu().numpy()
    return dict(zip(factor.config.attributes, maps, strict=True))


def localize_view(factor: Factor, feature_map: Tensor, crop: CropBox) -> ViewLocalization:
    """One view's feature map (C, h, w) -> maps and regions per attribute, pasted into the source image.

    Regions are found on the map at the model input size (as the paper thresholds at 1520x912) and their
    boxes mapped back to source pixels.
    """
    maps = attribution_maps(factor, feature_map)
    size = factor.config.input_size
    found = {a: [Region(box_to_source(r.box, crop, size), r.area, r.peak) for r in regions(m, factor.config.quantile)]
             for a, m in maps.items()}
    return ViewLocalization({a: crop.paste(m) for a, m in maps.items()}, found)


# ---------------------------------------------------------------------------------------------- building


def feature_map_shape(model: MammoClip) -> tuple[int, int, int]:
    """(C, h, w) of the model's last feature map at its configured input size."""
    x = torch.zeros(1, 3, model.config.input_height, model.config.input_width, device=model.device)
    with torch.inference_mode():
        return tuple(model.image_feature_map(x).shape[1:])  # type: ignore[return-value]


def attribute_embeddings(model: MammoClip, attributes: tuple[str, ...], batch_size: int = 64) -> Tensor:
    """t_k per attribute (K, D): its sentences through the frozen text tower and text projection, averaged,
    then L2-normalized (as the reference's ``generate_attribute_embs``)."""
    rows = []
    with torch.inference_mode():
        for attribute in attributes:
            sentences = attribute_sentences(attribute)
            total = torch.zeros(model.config.projection_dim, device=model.device)
            for start in range(0, len(sentences), batch_size):
                tokens = model.text_encoder.tokenize(sentences[start:start + batch_size])
                tokens = {k: v.to(model.device) for k, v in tokens.items()}
                total += model.text_projection(model.text_encoder(tokens)).float().sum(dim=0)
            rows.append(F.normalize(total / len(sentences), dim=0))
    return torch.stack(rows).cpu()


def base_model_sha256(model: MammoClip) -> str:
    """The SHA-256 of the weights the model was loaded from; empty for a model never loaded from disk."""
    return getattr(getattr(model, "load_report", None), "sha256", "") or ""


def build_factor(model: MammoClip, attributes: tuple[str, ...] = ("mass", "calcification"), *, top_k: int = 3,
                 quantile: float = 0.95, weighting: str = "softmax") -> Factor:
    """A FActOR with fresh projectors for ``model`` at its input size and the attribute embeddings."""
    channels, height, width = feature_map_shape(model)
    config = FactorConfig(tuple(attributes), model.config.input_height, model.config.input_width, height, width,
                          channels, model.config.projection_dim, base_model_sha256(model), top_k, quantile,
                          weighting, model.config.temperature)
    return Factor(config, attribute_embeddings(model, config.attributes))


def check_compatible(config: FactorConfig, model: MammoClip) -> None:
    """Refuse a model whose input size, channels or weights are not the ones the FActOR was trained on."""
    if (model.config.input_height, model.config.input_width) != config.input_size:
        raise FactorSizeError(f"the FActOR was built for {config.input_height}x{config.input_width} inputs; the "
                              f"model takes {model.config.input_height}x{model.config.input_width}")
    if model.image_encoder.out_dim != config.channels or model.config.projection_dim != config.embed_dim:
        raise CheckpointError(f"the FActOR expects {config.channels} channels and {config.embed_dim}-d embeddings; "
                              f"the model has {model.image_encoder.out_dim} and {model.config.projection_dim}")
    sha = base_model_sha256(model)
    if config.base_model_sha256 and sha and sha != config.base_model_sha256:
        raise CheckpointError(f"the FActOR was trained on model weights {config.base_model_sha256[:12]}, not on "
                              f"{sha[:12]}: train it again for this model")
    if not (config.base_model_sha256 and sha):
        log.warning("FActOR base model weights unknown on one side: the weights check was skipped")


def save_factor(factor: Factor, folder: Path | str) -> Path:
    """Write ``factor.safetensors`` (projectors and attribute embeddings) and ``factor.json`` (config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in factor.state_dict().items()},
              str(folder / FACTOR_WEIGHTS))
    (folder / FACTOR_CONFIG).write_text(json.dumps({"format": FORMAT, **factor.config.to_dict()}, indent=2))
    return folder


def load_factor(folder: Path | str, model: MammoClip | None = None, device: str | torch.device = "cpu") -> Factor:
    """A FActOR folder written by ``save_factor``; checked against ``model`` when one is given."""
    folder = Path(folder)
    for name in (FACTOR_WEIGHTS, FACTOR_CONFIG):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder} is not a FActOR folder: {name} is missing")
    data = json.loads((folder / FACTOR_CONFIG).read_text())
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{folder / FACTOR_CONFIG} has format {data.get('format')!r}, not {FORMAT!r}")
    config = FactorConfig.from_dict(data)
    state = load_file(str(folder / FACTOR_WEIGHTS))
    factor = Factor(config, state["text_embeddings"])
    try:
        factor.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{folder} weights do not match its config: {error}") from error
    if model is not None:
        check_compatible(config, model)
    return factor.to(device).eval()
