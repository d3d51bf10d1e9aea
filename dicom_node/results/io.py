"""Writing a built DICOM object to disk atomically, as a Part 10 file; where a job's per-view files go."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicom_node.durable_files import atomic_write


def save_dataset(dataset: Dataset, path: Path) -> Path:
    """Encode ``dataset`` as a DICOM file and write it with ``atomic_write`` (temp file, fsync, rename)."""
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def seg_file(folder: Path, view: str) -> Path:
    """Where a job's SEG of ``view`` (``LCC``, ``RCC``, ``LMLO``, ``RMLO``) is written in its folder."""
    return Path(folder) / f"SEG_{view}.dcm"


def overlay_name(view: str, attribute: str | None = None) -> str:
    """The file name of a job's overlay PNG of ``view``: its malignancy overlay, or with ``attribute`` (``mass``,
    ``calcification``, ``dense``) the overlay of that Mammo-FActOR map. The triage API serves it by this name."""
    return f"overlay_{view}.png" if attribute is None else f"overlay_factor_{attribute}_{view}.png"


def overlay_file(folder: Path, view: str, attribute: str | None = None) -> Path:
    """Where ``overlay_name(view, attribute)`` is written in a job's folder."""
    return Path(folder) / overlay_name(view, attribute)
