"""EfficientNet with the parameter names and static "same" padding of the Mammo-CLIP reference encoder.

The reference vendors lukemelas' EfficientNet-PyTorch: convolutions pad as TensorFlow's "SAME" would for
the *nominal* resolution of the variant (456 px for B5, 260 px for B2), and that padding is frozen at build
time. At 1520x912 this differs from dynamic "same" padding, so the released checkpoints only reproduce their
outputs when the padding is computed the same way. This module builds that network from scratch (no hub,
no downloads) so that ``state_dict`` keys match the checkpoints exactly (``_conv_stem``, ``_blocks.{i}``...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Batch-norm settings of the reference (TensorFlow momentum 0.99 -> PyTorch 0.01).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
DEPTH_DIVISOR = 8


@dataclass(frozen=True)
class StageSpec:
    """One stage of the EfficientNet-B0 baseline, before width/depth scaling."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    se_ratio: float = 0.25


B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class EfficientNetSpec:
    """Compound-scaling parameters of one variant."""

    width: float
    depth: float
    nominal_size: int
    dropout: float
    drop_connect: float = 0.2


# The lukemelas table, plus tiny variants for tests and the synthetic demo model.
EFFICIENTNET_SPECS: dict[str, EfficientNetSpec] = {
    "efficientnet-b0": EfficientNetSpec(1.0, 1.0, 224, 0.2),
    "efficientnet-b1": EfficientNetSpec(1.0, 1.1, 240, 0.2),
    "efficientnet-b2": EfficientNetSpec(1.1, 1.2, 260, 0.3),
    "efficientnet-b3": EfficientNetSpec(1.2, 1.4, 300, 0.3),
    "efficientnet-b4": EfficientNetSpec(1.4, 1.8, 380, 0.4),
    "efficientnet-b5": EfficientNetSpec(1.6, 2.2, 456, 0.4),
    "efficientnet-demo": EfficientNetSpec(0.5, 0.5, 224, 0.2),
    "efficientnet-test": EfficientNetSpec(0.25, 0.25, 64, 0.2),
}


def round_filters(filters: int, width: float) -> int:
    """Scale a channel count by ``width`` and round to a multiple of 8, never dropping below 90%."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return rounded


def round_repeats(repeats: int, depth: float) -> int:
    """Scale the number of blocks of a stage by ``depth`` (ceiling)."""
    return math.ceil(depth * repeats)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StaticSameConv2d(nn.Conv2d):
    """A convolution whose TF-"SAME" zero padding is fixed for one nominal input size.

    The padding is a plain function of (nominal size, kernel, stride) and is applied whatever the real
    input size is, exactly like the reference's ``Conv2dStaticSamePadding``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, nominal_size: int,
                 stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias)
        top, bottom = _same_padding(nominal_size, kernel_size, stride)
        self.static_pad = (top, bottom, top, bottom)  # square nominal size: same on both axes

    def forward(self, x: Tensor) -> Tensor:
        if any(self.static_pad):
            x = F.pad(x, self.static_pad)
        return super().forward(x)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (reference attribute names)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int, stride: int, expand_ratio: int,
                 se_ratio: float, nominal_size: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expands = expand_ratio != 1
        self.has_skip = stride == 1 and in_channels == out_channels
        if self.expands:
            self._expand_conv = StaticSameConv2d(in_channels, hidden, 1, nominal_size=nominal_size)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = StaticSameConv2d(hidden, hidden, kernel, nominal_size=nominal_size,
                                                stride=stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        squeezed = max(1, int(in_channels * se_ratio))
        self._se_reduce = nn.Conv2d(hidden, squeezed, 1)
        self._se_expand = nn.Conv2d(squeezed, hidden, 1)
        self._project_conv = StaticSameConv2d(hidden, out_channels, 1, nominal_size=nominal_size)
        self._bn2 = _batch_norm(out_channels)

    def forward(self, inputs: Tensor, drop_connect_rate: float = 0.0) -> Tensor:
        x = inputs
        if self.expands:
            x = F.silu(self._bn0(self._expand_conv(x)))
        x = F.silu(self._bn1(self._depthwise_conv(x)))
        squeeze = F.adaptive_avg_pool2d(x, 1)
        squeeze = self._se_expand(F.silu(self._se_reduce(squeeze)))
        x = torch.sigmoid(squeeze) * x
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            if self.training and drop_connect_rate > 0:
                keep = 1.0 - drop_connect_rate
                mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < keep
                x = x * mask / keep
            x = x + inputs
        return x


class EfficientNetEncoder(nn.Module):
    """EfficientNet feature extractor: ``forward_features`` gives the last map, ``forward`` the pooled vector.

    There is no classifier (``_fc``): the reference checkpoints have none.
    """

    def __init__(self, variant: str) -> None:
        super().__init__()
        if variant not in EFFICIENTNET_SPECS:
            raise ValueError(f"Unknown EfficientNet variant {variant!r}. Available: {sorted(EFFICIENTNET_SPECS)}")
        spec = EFFICIENTNET_SPECS[variant]
        self.variant = variant
        size = spec.nominal_size
        stem_channels = round_filters(32, spec.width)
        self._conv_stem = StaticSameConv2d(3, stem_channels, 3, nominal_size=size, stride=2)
        self._bn0 = _batch_norm(stem_channels)
        size = math.ceil(size / 2)
        blocks: list[MBConvBlock] = []
        for stage in B0_STAGES:
            in_ch = round_filters(stage.in_channels, spec.width)
            out_ch = round_filters(stage.out_channels, spec.width)
            for index in range(round_repeats(stage.repeats, spec.depth)):
                stride = stage.stride if index == 0 else 1
                blocks.append(MBConvBlock(in_ch if index == 0 else out_ch, out_ch, kernel=stage.kernel,
                                          stride=stride, expand_ratio=stage.expand_ratio,
                                          se_ratio=stage.se_ratio, nominal_size=size))
                size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self.out_dim = round_filters(1280, spec.width)
        self._conv_head = StaticSameConv2d(out_ch, self.out_dim, 1, nominal_size=size)
        self._bn1 = _batch_norm(self.out_dim)
        self._dropout = nn.Dropout(spec.dropout)
        self.drop_connect_rate = spec.drop_connect

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map (N, out_dim, h, w), before pooling."""
        x = F.silu(self._bn0(self._conv_stem(x)))
        count = len(self._blocks)
        for index, block in enumerate(self._blocks):
            x = block(x, self.drop_connect_rate * index / count)
        return F.silu(self._bn1(self._conv_head(x)))

    def pool(self, feature_map: Tensor) -> Tensor:
        """Global average pooling and dropout, as the reference applies them."""
        return self._dropout(torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_features(x))
