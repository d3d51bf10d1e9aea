"""Classification heads on a Mammo-CLIP image encoder, as ``training.finetune`` writes them and the node serves
them: a linear layer on the pooled features, with the fine-tuned encoder (``full``) or bottleneck adapters
after each MBConv block (``adapter``) where the head has them. ``head.json`` + ``head.safetensors`` per folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.clip import MammoClip
from models.efficientnet import EfficientNetEncoder
from models.errors import CheckpointError

HEAD_WEIGHTS = "head.safetensors"
HEAD_FILE = "head.json"


class Adapter(nn.Module):
    """Residual bottleneck on a feature map, ``x + up(silu(down(x)))``; the identity until trained."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, max(4, channels // reduction), 1)
        self.up = nn.Conv2d(self.down.out_channels, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.silu(self.down(x)))


def block_channels(encoder: EfficientNetEncoder) -> list[int]:
    """Output channels of each MBConv block."""
    return [block._bn2.num_features for block in encoder._blocks]


@contextmanager
def adapted(encoder: EfficientNetEncoder, adapters: nn.ModuleList | None) -> Iterator[None]:
    """Inside the block, each of the encoder's blocks passes its output through its adapter (forward hooks,
    removed after, so the model itself is never changed)."""
    handles = [block.register_forward_hook(lambda _module, _inputs, output, adapter=adapter: adapter(output))
               for block, adapter in zip(encoder._blocks, adapters or (), strict=adapters is not None)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Head(nn.Module):
    """A linear layer on the pooled image-encoder features. ``encoder`` is the fine-tuned encoder (``full``),
    ``adapters`` those trained on the model's frozen encoder (``adapter``); with neither, the head works on the
    model's own encoder (``linear``). ``info`` is ``head.json``."""

    def __init__(self, feature_dim: int, outputs: int, encoder: EfficientNetEncoder | None,
                 adapters: nn.ModuleList | None, info: dict[str, Any]) -> None:
        super().__init__()
        self.linear = nn.Linear(feature_dim, outputs)
        self.encoder = encoder
        self.adapters = adapters
        self.info = info

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)


def probabilities(logits: Tensor) -> Tensor:
    """Sigmoid of a single logit column (N,), softmax over several (N, C)."""
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def score_images(model: MammoClip, head: Head, images: Tensor, batch_size: int = 32) -> Tensor:
    """Probabilities of normalized images (N, 3, H, W): (N,) for a binary head, (N, C) for a multi-class one."""
    encoder, info = head.encoder or model.image_encoder, head.info
    if encoder.variant != info["image_encoder"] or head.linear.in_features != encoder.out_dim:
        raise CheckpointError(f"the head was trained on {info['image_encoder']}, not {encoder.variant}")
    weights = getattr(getattr(model, "load_report", None), "sha256", "")
    if head.encoder is None and info["base_model_sha256"] and weights and weights != info["base_model_sha256"]:
        raise CheckpointError("the head was trained on another model's encoder (weights SHA-256 differ)")
    encoder.eval()
    head.to(model.device).eval()
    with torch.inference_mode(), adapted(encoder, head.adapters):
        logits = torch.cat([head(encoder(images[i:i + batch_size].to(model.device)))
                            for i in range(0, len(images), batch_size)])
    return probabilities(logits).cpu()


def save_head(head: Head, folder: Path) -> None:
    state = {name: value.detach().cpu().contiguous() for name, value in head.state_dict().items()}
    save_file(state, str(folder / HEAD_WEIGHTS))
    (folder / HEAD_FILE).write_text(json.dumps(head.info, indent=2))


def load_head(folder: Path | str) -> Head:
    """A head written by ``finetune`` (with its own encoder or its adapters where it has them), in eval mode."""
    folder = Path(folder)
    for name in (HEAD_WEIGHTS, HEAD_FILE):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder} is not a trained head: {name} is missing")
    info = json.loads((folder / HEAD_FILE).read_text())
    encoder = EfficientNetEncoder(info["image_encoder"]) if info["own_encoder"] else None
    adapters = (nn.ModuleList(Adapter(channels, info["adapter_reduction"]) for channels in info["adapter_channels"])
                if info["adapter_channels"] else None)
    head = Head(info["feature_dim"], 1 if len(info["classes"]) == 2 else len(info["classes"]), encoder, adapters,
                info)
    head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return head.eval()
