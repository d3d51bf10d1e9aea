"""The serving copy computes what the trained model computes: batch-norm folded, padding done by the convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.clip import MammoClip
from models.efficientnet import StaticSameConv2d
from models.optimize import inference_copy
from tests.conftest import tiny_model


def trained_like(seed: int = 2) -> MammoClip:
    """A B0 model with batch-norm statistics and affine terms away from their initial values."""
    model = tiny_model("efficientnet-b0", 190, 115, seed=seed)
    for module in model.image_encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
    return model


def test_the_serving_copy_gives_the_models_feature_maps_and_embeddings() -> None:
    model = trained_like()
    fast = inference_copy(model)
    x = torch.randn(2, 3, 190, 115)  # odd sizes: the frozen padding of the nominal size applies
    with torch.inference_mode():
        torch.testing.assert_close(fast.image_feature_map(x.contiguous(memory_format=torch.channels_last)),
                                   model.image_feature_map(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(fast.encode_images(x), model.encode_images(x), rtol=0, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.image_encoder.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.image_encoder.modules()), "the model is untouched"


def test_only_one_sided_paddings_are_left_to_a_separate_pad(monkeypatch: pytest.MonkeyPatch) -> None:
    model = trained_like()
    fast = inference_copy(model)
    convs = [m for m in fast.image_encoder.modules() if isinstance(m, StaticSameConv2d)]
    kept = [c.static_pad for c in convs if any(c.static_pad)]
    assert kept and all(left != right and top != bottom for left, right, top, bottom in kept), \
        "stride-2 pads of an even nominal size stay"
    assert any(c.padding != (0, 0) for c in convs), "symmetric pads moved into the convolutions"
    assert all(any(c.static_pad) for c in model.image_encoder.modules()
               if isinstance(c, StaticSameConv2d) and c.kernel_size != (1, 1)), "the model keeps its own"
    pads: list[tuple[int, ...]] = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda x, pad, *a, **k: pads.append(tuple(pad)) or real_pad(x, pad, *a, **k))
    with torch.inference_mode():
        fast.image_feature_map(torch.randn(1, 3, 64, 48))
    assert sorted(pads) == sorted(kept)
