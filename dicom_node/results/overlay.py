"""A PNG of a mammogram with a heatmap over it, for people (and the triage page) rather than for viewers."""

from __future__ import annotations

import textwrap
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from pydicom.dataset import Dataset

from dicom_node.results.findings import DISCLAIMER
from dicom_node.storage import atomic_write
from models.preprocess import presentation_pixels

MAX_HEIGHT = 1024
MAX_ALPHA = 0.6


def heatmap_overlay_png(source: Dataset, heatmap: np.ndarray, path: Path, title: str) -> Path:
    """The displayed mammogram in gray, the heatmap (values in [0, 1], the source's shape) in jet colours with
    opacity growing with its value, at most ``MAX_HEIGHT`` pixels high; written atomically."""
    image = presentation_pixels(source)
    if heatmap.shape != image.shape:
        raise ValueError(f"heatmap is {heatmap.shape}, the source image is {image.shape}")
    scale = min(1.0, MAX_HEIGHT / image.shape[0])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))  # (width, height)
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    heat = np.clip(cv2.resize(heatmap.astype(np.float32), size, interpolation=cv2.INTER_AREA), 0.0, 1.0)
    colours = colormaps["jet"](heat)
    colours[..., 3] = MAX_ALPHA * heat
    # The figure is the image at one pixel per pixel, a title band above it and a disclaimer band below,
    # the texts wrapped to the image width (about 6 and 5 pixels per character at 9 and 7 points).
    title_lines = textwrap.wrap(title, max(10, size[0] // 6)) or [""]
    disclaimer_lines = textwrap.wrap(DISCLAIMER, max(20, size[0] // 5))
    dpi, top, bottom = 100, 6 + 14 * len(title_lines), 4 + 11 * len(disclaimer_lines)
    height = size[1] + top + bottom
    figure = Figure(figsize=(size[0] / dpi, height / dpi), dpi=dpi)
    axis = figure.add_axes((0.0, bottom / height, 1.0, size[1] / height))
    axis.imshow(image, cmap="gray", interpolation="nearest")
    axis.imshow(colours, interpolation="nearest")
    axis.set_axis_off()
    figure.text(0.5, 1.0 - 3 / height, "\n".join(title_lines), ha="center", va="top", fontsize=9)
    figure.text(0.5, 2 / height, "\n".join(disclaimer_lines), ha="center", va="bottom", fontsize=7)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)
