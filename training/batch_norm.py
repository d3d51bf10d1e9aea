"""Batch-norm momentum for short training runs.

The reference EfficientNet keeps TensorFlow's running-statistics momentum (0.99, i.e. PyTorch 0.01). That suits
long fine-tuning from converged weights, but in a short run from scratch the running statistics trail the
weights so far that eval-mode outputs are meaningless (measured on the demo recipe: held-out AUC ~0.5 with
0.01, 0.85 with 0.1 after three epochs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def batch_norm_momentum(module: nn.Module, momentum: float) -> Iterator[None]:
    """Use ``momentum`` for every BatchNorm of ``module`` inside the block, then restore the old values."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = momentum
    try:
        yield
    finally:
        for norm, value in zip(norms, saved, strict=True):
            norm.momentum = value
