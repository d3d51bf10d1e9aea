"""Small PNG thumbnails of received mammograms, rendered once and cached under ``data_dir/cache/thumbnails``.

Rendered with the inference preprocessing's display pixels (``models.preprocess.presentation_pixels``:
VOI window, MONOCHROME1 inverted), scaled to ``THUMBNAIL_HEIGHT`` rows. The cache file is named by the
instance's SHA-256, so an instance received again with new content gets a new thumbnail.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from dicom_node.durable_files import atomic_write
from dicom_node.storage import validated_uid

THUMBNAIL_HEIGHT = 256


def render_thumbnail(source: Path, height: int = THUMBNAIL_HEIGHT) -> bytes:
    """PNG bytes of a DICOM image, ``height`` rows high (never enlarged)."""
    import pydicom
    from PIL import Image

    from models.preprocess import presentation_pixels, to_uint8

    image = Image.fromarray(to_uint8(presentation_pixels(pydicom.dcmread(source))))
    scale = min(1.0, height / image.height)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    buffer = BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def cached_thumbnail(cache_dir: Path, source: Path, sop_instance_uid: str, content_digest: str) -> Path:
    """The cached thumbnail of ``source`` (its instance row's ``content_digest``), rendered first if missing."""
    digest = content_digest.rpartition(":")[2]
    path = Path(cache_dir) / f"{validated_uid(sop_instance_uid, 'SOPInstanceUID')}_{digest[:16]}.png"
    if not path.exists():
        atomic_write(path, render_thumbnail(source))
    return path
