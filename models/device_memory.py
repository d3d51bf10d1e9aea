"""The peak CUDA memory of a block of work (the worker records it per analysis job)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class PeakMemory:
    """``bytes``: the peak allocated on the CUDA device, set when the block exits; None off CUDA."""

    bytes: int | None = None


@contextmanager
def peak_cuda_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Measure the peak memory torch allocates on ``device`` during the block, including what was already
    allocated when it began (the model's weights). On CPU or MPS, torch.cuda is not touched and it stays None."""
    device = torch.device(device)
    peak = PeakMemory()
    if device.type != "cuda":
        yield peak
        return
    torch.cuda.reset_peak_memory_stats(device)
    yield peak
    peak.bytes = int(torch.cuda.max_memory_allocated(device))
