"""Writing a built DICOM object to disk atomically, as a Part 10 file."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicom_node.storage import atomic_write


def save_dataset(dataset: Dataset, path: Path) -> Path:
    """Encode ``dataset`` as a DICOM file and write it with ``atomic_write`` (temp file, fsync, rename)."""
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)
