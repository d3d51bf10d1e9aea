"""Inference-only speed-ups that keep the outputs: batch-norm folded into the preceding convolution, and symmetric
"same" padding done by the convolution itself instead of a separate copy of its input."""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.clip import MammoClip
from models.efficientnet import EfficientNetEncoder, MBConvBlock, StaticSameConv2d


def _fold(conv: StaticSameConv2d, norm: nn.BatchNorm2d) -> None:
    """Merge ``norm`` (eval statistics) into ``conv`` in place: w' = w * g / s, b' = beta - mean * g / s."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    conv.weight.data = conv.weight.data * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias.data if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.bias = nn.Parameter(norm.bias + (bias - norm.running_mean) * scale)


def fold_batch_norms(encoder: EfficientNetEncoder) -> EfficientNetEncoder:
    """Fold every conv+BN pair of an EfficientNet in place and replace the BNs by identities."""
    pairs: list[tuple[nn.Module, str, str]] = [(encoder, "_conv_stem", "_bn0"), (encoder, "_conv_head", "_bn1")]
    for block in encoder._blocks:
        assert isinstance(block, MBConvBlock)
        if block.expands:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv_name, norm_name in pairs:
            _fold(getattr(owner, conv_name), getattr(owner, norm_name))
            setattr(owner, norm_name, nn.Identity())
    return encoder


def pad_in_convolutions(encoder: EfficientNetEncoder) -> EfficientNetEncoder:
    """Give every static "same" padding that is the same on both sides (all stride-1 convolutions) to the
    convolution, in place: the same zeros, without ``F.pad`` writing a padded copy of each input. The one-sided
    paddings of stride-2 convolutions at an even nominal size stay."""
    for conv in encoder.modules():
        if isinstance(conv, StaticSameConv2d) and any(conv.static_pad):
            left, right, top, bottom = conv.static_pad  # F.pad's order
            if top == bottom and left == right:
                conv.padding = (top, left)
                conv.static_pad = (0, 0, 0, 0)
    return encoder


def inference_copy(model: MammoClip) -> MammoClip:
    """A frozen eval-mode copy for serving: BN folded, padding in the convolutions, channels-last weights. Never
    train or save it."""
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    fold_batch_norms(fast.image_encoder)
    pad_in_convolutions(fast.image_encoder)
    fast.image_encoder.to(memory_format=torch.channels_last)
    return fast
