"""A PNG of a mammogram with a heatmap over it, for people (and the triage page) rather than for viewers.

Drawn with OpenCV and Pillow (about 20x faster than a matplotlib figure), because it is written for every
view of every study (by the worker, once the study's results are recorded and on their way).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.durable_files import atomic_write
from dicom_node.results.findings import DISCLAIMER
from dicom_node.results.seg import seg_heatmap
from models.preprocess import presentation_pixels

MAX_HEIGHT = 1024
MAX_ALPHA = 0.6
TITLE_POINTS, DISCLAIMER_POINTS = 13, 10


@dataclass(frozen=True)
class DisplayImage:
    """A source image decoded once for display: uint8 gray, at most ``MAX_HEIGHT`` rows, and its source shape."""

    gray: np.ndarray
    source_shape: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of ``gray``, as OpenCV takes sizes."""
        return self.gray.shape[1], self.gray.shape[0]


def display_image(source: Dataset) -> DisplayImage:
    """Decode ``source`` for display once; every overlay of that image can then reuse it."""
    return display_pixels(presentation_pixels(source))


def display_pixels(image: np.ndarray) -> DisplayImage:
    """``display_image`` from the source's ``presentation_pixels``."""
    scale = min(1.0, MAX_HEIGHT / image.shape[0])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))  # (width, height)
    resized = cv2.resize(image.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    low, high = float(resized.min()), float(resized.max())
    gray = ((resized - low) * (255.0 / (high - low)) if high > low else np.zeros_like(resized)).astype(np.uint8)
    return DisplayImage(gray, (int(image.shape[0]), int(image.shape[1])))


def _display_heat(image: DisplayImage, heatmap: np.ndarray) -> np.ndarray:
    """The heatmap at the displayed image's size: as given when it has that size, else resized from the source's."""
    if heatmap.shape == image.gray.shape:
        return np.clip(heatmap.astype(np.float32, copy=False), 0.0, 1.0)
    if heatmap.shape != image.source_shape:
        raise ValueError(f"heatmap is {heatmap.shape}, the source image is {image.source_shape} and its display "
                         f"{image.gray.shape}")
    return np.clip(cv2.resize(heatmap.astype(np.float32), image.size, interpolation=cv2.INTER_AREA), 0.0, 1.0)


def _blend(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Gray image under the heatmap in jet colours, opacity growing with the heat value (RGB uint8); OpenCV's
    per-pixel blend, 6x faster than the same sum in NumPy floats (which it matches to within 1 grey level)."""
    colours = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = heat.astype(np.float32) * np.float32(MAX_ALPHA)
    return cv2.blendLinear(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), colours, 1.0 - alpha, alpha)


def _text_band(lines: list[str], width: int, points: int) -> Image.Image:
    font = ImageFont.load_default(size=points)
    line_height = points + 3
    band = Image.new("RGB", (width, 6 + line_height * len(lines)), "white")
    draw = ImageDraw.Draw(band)
    for number, line in enumerate(lines):
        draw.text((width / 2, 3 + number * line_height), line, fill="black", font=font, anchor="ma")
    return band


def heatmap_overlay_png(source: Dataset | DisplayImage, heatmap: np.ndarray, path: Path, title: str) -> Path:
    """The displayed mammogram in gray, the heatmap (values in [0, 1], the source's shape or, for a
    ``DisplayImage``, its displayed shape) in jet colours with opacity growing with its value, at most
    ``MAX_HEIGHT`` pixels high, a title above and the research-use statement below; written atomically. Pass
    ``display_image(source)`` to draw several overlays of one image."""
    shown = source if isinstance(source, DisplayImage) else display_image(source)
    gray, heat = shown.gray, _display_heat(shown, heatmap)
    width = gray.shape[1]
    title_band = _text_band(textwrap.wrap(title, max(10, width // 7)) or [""], width, TITLE_POINTS)
    disclaimer_band = _text_band(textwrap.wrap(DISCLAIMER, max(20, width // 5)), width, DISCLAIMER_POINTS)
    picture = Image.fromarray(_blend(gray, heat))
    canvas = Image.new("RGB", (width, title_band.height + picture.height + disclaimer_band.height), "white")
    canvas.paste(title_band, (0, 0))
    canvas.paste(picture, (0, title_band.height))
    canvas.paste(disclaimer_band, (0, title_band.height + picture.height))
    buffer = BytesIO()
    canvas.save(buffer, format="PNG", compress_level=1)  # 1.4x faster than 3, 2% larger
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def malignancy_title(view: str, score: float) -> str:
    """The title of a view's malignancy overlay, e.g. ``LCC malignancy 0.42``."""
    return f"{view} malignancy {score:.2f}"


def factor_title(view: str, attribute: str) -> str:
    """The title of a view's Mammo-FActOR overlay, e.g. ``LCC FActOR mass``."""
    return f"{view} FActOR {attribute}"


def redraw_overlay(seg_path: Path, source_path: Path, path: Path, title: str, heatmap: str = "malignancy") -> Path:
    """A view's overlay of its ``heatmap`` (``malignancy``, or a FActOR map such as ``factor mass``) drawn again
    from its SEG and source image (for a job whose worker stopped between recording its results and drawing the
    overlays, or an overlay deleted since)."""
    return heatmap_overlay_png(dcmread(source_path), seg_heatmap(dcmread(seg_path), heatmap), path, title)
