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

    def _region(self, shape: tuple[int, int] | None) -> tuple[tuple[int, int], slice, slice]:
        """The map's shape (the source's, or ``shape``) and the box's rows and columns in it, scaled with it."""
        rows, cols = shape or self.source_shape
        scale_y, scale_x = rows / self.source_shape[0], cols / self.source_shape[1]
        top, left = min(round(self.top * scale_y), rows - 1), min(round(self.left * scale_x), cols - 1)
        bottom = min(max(round(self.bottom * scale_y), top + 1), rows)  # at least one row and column, inside
        right = min(max(round(self.right * scale_x), left + 1), cols)
        return (rows, cols), slice(top, bottom), slice(left, right)

    def paste(self, values: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Resize a map over the model input (any h x w) back into a zero map of the source's shape, or of
        ``shape`` (the source image scaled, e.g. for display: the box is scaled with it)."""
        size, rows, cols = self._region(shape)
        placed = np.zeros(size, dtype=np.float32)
        placed[rows, cols] = _resized(values.astype(np.float32), rows, cols)
        return placed

    def paste_levels(self, values: np.ndarray, levels: int) -> np.ndarray:
        """``values`` clipped into [0, 1], resized back into the box and rounded to the integers 0..``levels``
        (at most 255, half to even), in a zero uint8 map of the source's shape: a FRACTIONAL SEG frame, made
        without a float map of the source's size. Within one level of ``round(paste(clip(values)) * levels)``."""
        if not 0 < levels <= 255:
            raise ValueError(f"levels must be in 1..255, not {levels}")
        size, rows, cols = self._region(None)
        scaled = np.clip(values.astype(np.float32), 0.0, 1.0) * np.float32(levels)
        placed = np.zeros(size, dtype=np.uint8)
        placed[rows, cols] = cv2.convertScaleAbs(_resized(scaled, rows, cols))  # saturating, rounded half to even
        return placed


def _resized(values: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return cv2.resize(values, (cols.stop - cols.start, rows.stop - rows.start), interpolation=cv2.INTER_LINEAR)
