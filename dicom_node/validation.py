"""Structural checks on a received dataset, so that a broken file is refused at C-STORE, not stored.

pydicom decodes leniently: a value cut short by a truncated transfer is read as what is there, and an
unknown VR only fails when the element is used. The Storage SCP would then answer Success for a file no
worker can read. These checks are cheap (no pixel decoding): every element decodes, and the pixel data
holds as many bytes as the image attributes promise (native) or is a well-formed encapsulated stream.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.sequence import Sequence
from pydicom.uid import UID

from models.errors import NodeError

JPEG_END_OF_IMAGE = b"\xff\xd9"  # ends JPEG, JPEG-LS and JPEG 2000 codestreams
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


class MalformedInstanceError(NodeError, ValueError):
    """The dataset cannot be decoded, or its pixel data does not match its image attributes."""


def _decode_all(dataset: Dataset) -> None:
    for element in dataset:  # iterating converts each raw element: an unknown VR or bad length raises here
        if isinstance(element.value, Sequence):
            for item in element.value:
                _decode_all(item)


def _expected_native_length(dataset: Dataset) -> int:
    bits = int(dataset.BitsAllocated)
    pixels = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1)) \
        * int(dataset.get("NumberOfFrames", 1) or 1)
    return (pixels * bits + 7) // 8


def _check_pixel_data(dataset: Dataset, transfer_syntax: UID) -> None:
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in dataset:
            raise MalformedInstanceError(f"the image has pixel data but no {keyword}")
    data = dataset.PixelData
    if not transfer_syntax.is_encapsulated:
        expected = _expected_native_length(dataset)
        if len(data) < expected:
            raise MalformedInstanceError(f"the pixel data holds {len(data)} bytes; Rows x Columns x bits "
                                         f"promise {expected} (truncated transfer?)")
        return
    try:
        fragments = list(generate_fragments(data))
    except (ValueError, EOFError) as error:
        raise MalformedInstanceError(f"the encapsulated pixel data is not well formed: {error}") from None
    if not fragments or not fragments[-1]:
        raise MalformedInstanceError("the encapsulated pixel data holds no compressed frame")
    if str(transfer_syntax) != RLE_LOSSLESS and JPEG_END_OF_IMAGE not in fragments[-1][-8:]:
        raise MalformedInstanceError("the compressed pixel data has no end-of-image marker (truncated?)")


def check_instance(dataset: Dataset, transfer_syntax_uid: str) -> None:
    """Raise ``MalformedInstanceError`` if ``dataset`` does not fully decode or its pixel data is short."""
    try:
        _decode_all(dataset)
    except (NotImplementedError, ValueError, KeyError, EOFError, TypeError) as error:
        raise MalformedInstanceError(f"the dataset does not decode: {error}") from None
    if "PixelData" in dataset:
        _check_pixel_data(dataset, UID(transfer_syntax_uid))
