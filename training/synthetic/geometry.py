"""Breast geometry in a view-independent frame, and its mapping to CC and MLO pixel grids.

A point of the breast is described by ``depth`` (0 at the chest wall, 1 at the nipple) and ``offset``
(-1..1 across the breast: lateral(+)/medial(-) in CC, superior(+)/inferior(-) in MLO). The same finding
therefore lands at the same depth in both views of its breast, as it does on real mammograms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BreastShape:
    """Size of one breast as projected, in fractions of the image."""

    depth: float        # nipple distance from the chest wall, fraction of image width
    half_height: float  # half extent along the chest wall, fraction of image height
    center: float       # vertical centre on the chest wall, fraction of image height
    pectoral_width: float = 0.0   # MLO only: pectoral muscle base along the top edge, fraction of width
    pectoral_height: float = 0.0  # MLO only: pectoral muscle extent down the chest wall, fraction of height


@dataclass(frozen=True)
class ViewGrid:
    """Per-pixel coordinates of one view: distance from chest wall (px) and normalized breast frame."""

    rows: int
    cols: int
    chest_wall_right: bool
    shape: BreastShape

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """``u`` (0 at chest wall, 1 at nipple depth) and ``w`` (-1..1 across, + is up) for every pixel."""
        y = (np.arange(self.rows, dtype=np.float32) + 0.5) / self.rows
        x = (np.arange(self.cols, dtype=np.float32) + 0.5) / self.cols
        distance = (1.0 - x) if self.chest_wall_right else x
        u = distance[None, :] / self.shape.depth
        w = (self.shape.center - y[:, None]) / self.shape.half_height
        return np.broadcast_to(u, (self.rows, self.cols)), np.broadcast_to(w, (self.rows, self.cols))

    def radius(self) -> np.ndarray:
        """Normalized elliptic radius: < 1 inside the breast."""
        u, w = self.axes()
        return np.sqrt(u**2 + w**2)

    def pectoral(self) -> np.ndarray:
        """Boolean mask of the pectoral muscle triangle (top of the chest-wall side), empty on CC."""
        if self.shape.pectoral_width <= 0:
            return np.zeros((self.rows, self.cols), bool)
        y = (np.arange(self.rows, dtype=np.float32) + 0.5) / self.rows
        x = (np.arange(self.cols, dtype=np.float32) + 0.5) / self.cols
        distance = (1.0 - x) if self.chest_wall_right else x
        edge = self.shape.pectoral_width * (1.0 - y / self.shape.pectoral_height)
        return distance[None, :] < edge[:, None]

    def to_pixel(self, depth: float, offset: float) -> tuple[float, float]:
        """Breast-frame point -> (row, col) in pixels."""
        local_half = np.sqrt(max(1.0 - depth**2, 0.05))
        row = (self.shape.center - offset * local_half * self.shape.half_height) * self.rows
        distance = depth * self.shape.depth * self.cols
        col = self.cols - distance if self.chest_wall_right else distance
        return row, col
