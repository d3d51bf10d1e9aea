"""Channels-last training: the same gradients as the default layout, and the model handed back as it was."""

from __future__ import annotations

import torch

from tests.conftest import tiny_model
from training.memory_format import channels_last


def _gradients(encoder: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same drop-connect masks in both layouts
    encoder(images).square().mean().backward()
    return [p.grad.clone() for p in encoder.parameters()]


def test_channels_last_trains_like_the_default_layout_and_restores_it() -> None:
    encoder = tiny_model().image_encoder.train()
    images = torch.randn(4, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    parameters = list(encoder.parameters())
    stem = encoder._conv_stem.weight  # 3x3: its two layouts differ (a 1x1 kernel is contiguous in both)
    expected = _gradients(encoder, images)
    assert stem.is_contiguous() and not stem.is_contiguous(memory_format=torch.channels_last)

    with channels_last(encoder):
        assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        got = _gradients(encoder, images)
        assert stem.grad.is_contiguous(memory_format=torch.channels_last)

    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-6) for g, e in zip(got, expected, strict=True))
    assert list(encoder.parameters()) == parameters  # the same objects: an optimizer built before keeps them
    assert all(p.is_contiguous() for p in encoder.parameters())
    assert stem.is_contiguous() and not stem.is_contiguous(memory_format=torch.channels_last)
