"""Drawing one mammographic view: breast outline, skin, fibroglandular texture, pectoral muscle, lesions.

Values are attenuation-like in 0..1 (bright = dense, the MONOCHROME2 sense) before they are stored.
"""

from __future__ import annotations

import cv2
import numpy as np

from training.synthetic.findings import Finding, draw_calcifications, draw_mass
from training.synthetic.geometry import ViewGrid

GLANDULAR_FRACTION = {"A": 0.08, "B": 0.3, "C": 0.55, "D": 0.8}
CLUTTER = {"A": 0.6, "B": 1.0, "C": 1.3, "D": 1.5}


def fibroglandular_texture(rng: np.random.Generator, shape: tuple[int, int], density: str,
                           radius: np.ndarray) -> np.ndarray:
    """Soft 0..1 map of glandular tissue: band-limited noise thresholded to the density's share,
    concentrated behind the nipple and thinning towards the skin."""
    rows, cols = shape
    small = (max(rows // 4, 32), max(cols // 4, 20))
    field = np.zeros(small, np.float32)
    for sigma, weight in ((small[0] / 14, 1.0), (small[0] / 40, 0.6), (small[0] / 120, 0.35)):
        noise = cv2.GaussianBlur(rng.normal(size=small).astype(np.float32), (0, 0), max(sigma, 0.6))
        field += weight * noise / noise.std()
    field = cv2.resize(field, (cols, rows), interpolation=cv2.INTER_CUBIC)
    field += 1.4 * (1 - np.clip(radius, 0, 1))  # more glandular tissue centrally
    inside = radius < 1
    threshold = np.quantile(field[inside], 1 - GLANDULAR_FRACTION[density]) if inside.any() else 0.0
    return 1.0 / (1.0 + np.exp(-(field - threshold) * 1.8)) * inside


def render_view(grid: ViewGrid, density: str, findings: list[Finding], positions: list[tuple[float, float]],
                pixel_mm: float, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The view's image (float32 0..1) and one boolean mask per finding (in the order given)."""
    rng = np.random.default_rng(seed)
    shape = (grid.rows, grid.cols)
    radius = grid.radius()
    inside = radius < 1.0
    thickness = np.sqrt(np.clip(1.0 - radius**2, 0.0, 1.0))
    glandular = fibroglandular_texture(rng, shape, density, radius)
    image = np.where(inside, 0.28 * (0.35 + 0.65 * thickness), 0.02).astype(np.float32)
    image += 0.26 * glandular * np.sqrt(thickness) * CLUTTER[density] / 1.3
    image += 0.06 * np.exp(-(((1.0 - radius) / 0.012) ** 2)) * (radius < 1.03)  # skin line
    u, w = grid.axes()
    image += 0.08 * np.exp(-(((u - 0.985) / 0.02) ** 2 + (w / 0.05) ** 2))  # nipple
    pectoral = grid.pectoral()
    image = np.where(pectoral, np.maximum(image, 0.55 + 0.05 * thickness), image)
    masks = []
    for finding, center in zip(findings, positions, strict=True):
        draw = draw_mass if finding.kind == "mass" else draw_calcifications
        added, mask = draw(finding, center, pixel_mm, shape)
        gain = 0.2 if finding.kind == "mass" else 0.5
        image += gain * added * inside
        masks.append(mask & inside)
    image += rng.normal(0.0, 0.006, shape).astype(np.float32) * (0.5 + inside)
    image[:3, :] = 0.9  # detector/collimator edge artefacts (the reference crops a 5-px border)
    image[-3:, :] = 0.9
    return np.clip(image, 0.0, 1.0), masks
