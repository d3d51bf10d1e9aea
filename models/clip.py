"""The Mammo-CLIP dual encoder: EfficientNet image tower, BERT text tower, linear projections to a shared space."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.efficientnet import EFFICIENTNET_SPECS, EfficientNetEncoder
from models.errors import CheckpointError
from models.preprocess import PreprocessConfig
from models.text_encoder import TextEncoder

REFERENCE_MEAN = 0.3089279
REFERENCE_STD = 0.25053555408335154


@dataclass(frozen=True)
class ClipConfig:
    """Architecture and input contract of one model (stored in a model version's ``config.json``)."""

    image_encoder: str = "efficientnet-b5"
    projection_dim: int = 512
    input_height: int = 1520
    input_width: int = 912
    pixel_mean: float = REFERENCE_MEAN
    pixel_std: float = REFERENCE_STD
    text_max_length: int = 256
    temperature: float = 0.07
    apply_voi: bool = False  # True: the input starts from VOI-windowed pixels (see ``PreprocessConfig``)

    def __post_init__(self) -> None:
        if self.image_encoder not in EFFICIENTNET_SPECS:
            raise CheckpointError(f"image_encoder {self.image_encoder!r} is not one of {sorted(EFFICIENTNET_SPECS)}")
        if self.input_height < 32 or self.input_width < 32:
            raise CheckpointError("input_height and input_width must be at least 32 pixels")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipConfig:
        """A saved config; one saved before ``apply_voi`` existed is a model trained on VOI-windowed input."""
        known = {f.name for f in fields(cls)}
        return cls(**{"apply_voi": True, **{k: v for k, v in data.items() if k in known}})

    def preprocess(self) -> PreprocessConfig:
        """The image preprocessing this model expects."""
        return PreprocessConfig(height=self.input_height, width=self.input_width,
                                mean=self.pixel_mean, std=self.pixel_std, apply_voi=self.apply_voi)


class LinearProjection(nn.Module):
    """A single linear layer (attribute ``projection``, as in the reference's ``LinearProjectionHead``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(x)


class MammoClip(nn.Module):
    """Image and text encoders aligned in one L2-normalized embedding space.

    Submodule names equal the reference's ``BreastClip`` (``image_encoder``, ``text_encoder``,
    ``image_projection``, ``text_projection``, ``logit_scale``) so its checkpoints load key for key.
    """

    def __init__(self, config: ClipConfig, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = EfficientNetEncoder(config.image_encoder)
        self.text_encoder = text_encoder
        self.image_projection = LinearProjection(self.image_encoder.out_dim, config.projection_dim)
        self.text_projection = LinearProjection(text_encoder.out_dim, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def image_feature_map(self, x: Tensor) -> Tensor:
        """The image encoder's last feature map (N, C, h, w), before pooling."""
        return self.image_encoder.forward_features(x)

    def project_feature_map(self, feature_map: Tensor) -> Tensor:
        """Pool a feature map and project it to the shared space (L2-normalized)."""
        return F.normalize(self.image_projection(self.image_encoder.pool(feature_map)), dim=-1)

    def encode_images(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) -> L2-normalized embeddings (N, projection_dim)."""
        return self.project_feature_map(self.image_feature_map(x))

    def encode_tokens(self, tokens: dict[str, Tensor]) -> Tensor:
        """Tokenized texts -> L2-normalized embeddings."""
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return F.normalize(self.text_projection(self.text_encoder(tokens)), dim=-1)

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Texts -> L2-normalized embeddings (N, projection_dim)."""
        if not texts:
            raise ValueError("encode_texts needs at least one text")
        return self.encode_tokens(self.text_encoder.tokenize(list(texts)))

    def forward(self, images: Tensor, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Training forward: image embeddings, text embeddings and the (unclamped) logit scale."""
        return self.encode_images(images), self.encode_tokens(tokens), self.logit_scale.exp()
