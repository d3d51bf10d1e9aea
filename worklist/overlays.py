"""The heatmap overlays of a study's shown result: which there are, and where each PNG is.

The worker draws them into the result's job folder once the results are recorded: per view its malignancy
overlay and one PNG per Mammo-FActOR map (``dicom_node.analysis``), from the maps its SEG holds. A job whose
worker stopped in between has its SEGs but not all its PNGs: the study page offers what each view's SEG holds,
and the API draws a missing PNG again from the SEG when asked for it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydicom import dcmread

from dicom_node.results.io import overlay_file, overlay_name, seg_file
from dicom_node.results.seg import FACTOR_PREFIX, seg_heatmap_names

# FActOR attributes served by name: their names go into file names and URLs
SERVED_ATTRIBUTE = re.compile(r"[A-Za-z0-9-]{1,64}")


def malignancy_overlay(folder: Path, view: str) -> Path | None:
    """The view's malignancy overlay PNG in a result ``folder``, or where it goes when only the view's SEG is
    there; None when the result has neither."""
    path = overlay_file(folder, view)
    return path if path.is_file() or seg_file(folder, view).is_file() else None


def factor_attributes(folder: Path, view: str) -> list[str]:
    """The attributes of the view's FActOR maps in a result ``folder``, sorted: those of its SEG's segments (each
    overlay can be drawn from it), or of the FActOR PNGs drawn when the SEG cannot be read. A name that could not
    be served safely (``SERVED_ATTRIBUTE``) is left out."""
    try:
        seg = dcmread(seg_file(folder, view), stop_before_pixels=True)
        names = [name.removeprefix(FACTOR_PREFIX) for name in seg_heatmap_names(seg) if name.startswith(FACTOR_PREFIX)]
    except Exception:  # a missing or damaged SEG (the page must still show): what was drawn
        pattern = overlay_name(view, "*")
        prefix, suffix = pattern.split("*")
        names = [path.name[len(prefix):-len(suffix)] for path in folder.glob(pattern)]
    return sorted(name for name in names if SERVED_ATTRIBUTE.fullmatch(name))
