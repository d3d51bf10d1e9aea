"""Bottleneck adapters for frozen transformer blocks, and a count of what is trained.

An adapter is Houlsby-style and sequential: it takes a sub-layer's output ``z`` (attention or MLP) and returns
``z + up(gelu(down(z)))`` before the block's residual sum. ``up`` starts at zero, so an untrained adapter is the
identity and the adapted model starts exactly as the pre-trained one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


class BottleneckAdapter(nn.Module):
    """``z + up(gelu(down(z)))`` with ``dim -> bottleneck -> dim``; the identity until trained."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.up(F.gelu(self.down(z)))


class BlockAdapters(nn.Module):
    """The two adapters of one transformer block: after its attention and after its MLP."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.attention = BottleneckAdapter(dim, bottleneck)
        self.mlp = BottleneckAdapter(dim, bottleneck)


def adapted_block(layer: nn.Module, adapters: BlockAdapters, x: Tensor, mask: Tensor | None = None,
                  causal: bool = False) -> Tensor:
    """One pre-LN CLIP encoder layer (a ``transformers`` ``CLIPEncoderLayer``, read for its weights only) with
    its adapters. ``mask`` (boolean, True = may attend) broadcasts to (N, heads, queries, keys); ``causal`` is
    the text tower's mask. Same result as the layer's own forward when the adapters are untrained."""
    attention = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = (projection(h).unflatten(-1, (attention.num_heads, attention.head_dim)).transpose(1, 2)
               for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=attention.scale)
    x = x + adapters.attention(attention.out_proj(attended.transpose(1, 2).flatten(2)))
    return x + adapters.mlp(layer.mlp(layer.layer_norm2(x)))


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters of a model."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {"trainable": self.trainable, "total": self.total, "fraction": round(self.fraction, 6)}

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.fraction:.2f}%)"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Parameters with ``requires_grad`` against all parameters (works on the meta device: nothing is read)."""
    parameters = list(model.parameters())
    return ParameterCount(sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters))
