"""PNG plots people would rather look at than read: training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first


def plot_training_curve(losses: Sequence[float], path: Path, title: str, window: int = 10) -> Path:
    """Loss per step with a moving average, saved as a PNG."""
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(range(1, len(losses) + 1), losses, color="#9ab", linewidth=0.8, label="loss per step")
    if len(losses) >= window:
        smooth = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
        axis.plot(range(window, len(losses) + 1), smooth, color="#135", linewidth=1.6,
                  label=f"moving average ({window} steps)")
    axis.set(xlabel="step", ylabel="contrastive loss", title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
