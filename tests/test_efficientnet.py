"""The image tower is the reference's EfficientNet: same keys, same padding, same outputs."""

from __future__ import annotations

import pytest
import torch

from models.efficientnet import EfficientNetEncoder, round_filters


@pytest.mark.parametrize(("variant", "channels", "blocks"), [("efficientnet-b5", 2048, 39),
                                                              ("efficientnet-b2", 1408, 23)])
def test_feature_map_at_reference_resolution(variant: str, channels: int, blocks: int) -> None:
    encoder = EfficientNetEncoder(variant).to("meta")
    feature_map = encoder.forward_features(torch.empty(1, 3, 1520, 912, device="meta"))
    assert feature_map.shape == (1, channels, 48, 29)  # 1392 positions, as the FActOR config says
    assert len(encoder._blocks) == blocks


def test_round_filters_matches_the_reference_table() -> None:
    assert round_filters(1280, 1.6) == 2048
    assert round_filters(1280, 1.1) == 1408
    assert round_filters(32, 1.6) == 48


@pytest.mark.parametrize("variant", ["efficientnet-b2", "efficientnet-b5"])
def test_outputs_equal_lukemelas_reference_implementation(variant: str) -> None:
    """The reference vendors lukemelas' EfficientNet-PyTorch; compare with that package, static padding
    for the nominal size included (an odd-sized input exercises the frozen padding)."""
    lukemelas = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    reference = lukemelas.EfficientNet.from_name(variant, num_classes=1).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("_fc.")}
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("running_mean"):
            value.normal_(0.0, 0.1)
    reference.load_state_dict({**reference.state_dict(), **state})
    ours = EfficientNetEncoder(variant).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 190, 115)
    with torch.no_grad():
        expected = reference.extract_features(x)
        actual = ours.forward_features(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_padding_is_static_not_dynamic() -> None:
    """B5's nominal 456 px gives different padding than timm-style dynamic "same" padding at 1520x912."""
    encoder = EfficientNetEncoder("efficientnet-b5")
    stem = encoder._conv_stem
    assert stem.static_pad == (0, 1, 0, 1)  # 456 is even: pad right/bottom only, whatever the input
    paddings = {block._depthwise_conv.static_pad for block in encoder._blocks}
    assert (1, 2, 1, 2) in paddings and (2, 2, 2, 2) in paddings
