"""Where a model input came from in its source image, and how a map over that input goes back (numpy and
OpenCV only: the result writer's helper processes use it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class CropBox:
    """Where the model input came from in the source image: rows ``top:bottom``, columns ``left:right``."""

    top: int
    bottom: int
    left: int
    right: int
    source_shape: tuple[int, int]

    def paste(self, values: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Resize a map over the model input (any h x w) back into a zero map of the source's shape, or of
        ``shape`` (the source image scaled, e.g. for display: the box is scaled with it)."""
        rows, cols = shape or self.source_shape
        scale_y, scale_x = rows / self.source_shape[0], cols / self.source_shape[1]
        top, left = min(round(self.top * scale_y), rows - 1), min(round(self.left * scale_x), cols - 1)
        bottom = min(max(round(self.bottom * scale_y), top + 1), rows)  # at least one row and column, inside
        right = min(max(round(self.right * scale_x), left + 1), cols)
        placed = np.zeros((rows, cols), dtype=np.float32)
        placed[top:bottom, left:right] = cv2.resize(values.astype(np.float32), (right - left, bottom - top),
                                                    interpolation=cv2.INTER_LINEAR)
        return placed
