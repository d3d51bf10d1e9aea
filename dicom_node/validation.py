"""Structural checks on a received dataset, so that a broken or hostile file is refused at C-STORE, not stored.

pydicom decodes leniently: a value cut short by a truncated transfer is read as what is there, a length field
larger than the data is believed, and an unknown VR only fails when the element is used. The Storage SCP would
then answer Success for a file no worker can read. These checks are cheap and never decode pixels:

- ``decode_received`` first walks the element headers of the bytes as received (never the values): every
  length fits in its container, every VR is known, a value of a fixed-size binary VR (US, UL, FD, ...) is a
  whole number of values, sequences nest at most ``MAX_SEQUENCE_DEPTH`` levels, there are at most
  ``MAX_ELEMENTS`` elements, and a deflated dataset inflates to at most ``MAX_INFLATED_BYTES``. pydicom raises
  for a partial binary value when it is used, and in its default validation mode only warns about anything else:
  the walk catches what decoding every element caught, without its ~2 ms per image. A dataset holding an element
  pydicom reads as another VR (UN of a standard tag, an ambiguous implicit VR) is still decoded element by
  element;
- ``check_instance`` checks the image attributes: known photometric interpretation
  consistent with Samples per Pixel, sane bit depths and frame count, at most ``MAX_FRAME_PIXELS`` per frame and
  ``MAX_DECODED_BYTES`` in all (so that a decompression bomb is refused by its declared size, before anything
  decodes it), native pixel data as long as promised, compressed frames whose codestream headers declare the
  dataset's Rows and Columns, and, for MG images, pixel data that is there and grayscale.

``decode_received`` is the bounded replacement of pynetdicom's ``event.dataset`` (which inflates a deflated
dataset without a limit and builds every element before any check): bytes in, structure-checked ``Dataset``
out.
"""

from __future__ import annotations

import math
import struct
import zlib
from io import BytesIO

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, generate_frames
from pydicom.errors import BytesLengthException
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from models.errors import NodeError
from models.sop_classes import MAMMOGRAPHY_SOP_CLASSES

MAX_FRAME_PIXELS = 100_000_000  # Rows x Columns; a 4096 x 3328 mammogram is 13.6 megapixels
MAX_DECODED_BYTES = 4 << 30  # all frames as decoded; a large tomosynthesis volume is ~1.5 GiB
MAX_INFLATED_BYTES = 256 << 20  # a Deflated Explicit VR dataset, inflated; an MG image is < 64 MiB
MAX_SEQUENCE_DEPTH = 32  # nested sequence levels; a TID 1500 SR nests fewer than 10
MAX_ELEMENTS = 250_000  # every element at every level; an MG image has ~150

JPEG_END_OF_IMAGE = b"\xff\xd9"  # ends JPEG, JPEG-LS and JPEG 2000 codestreams
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_2000_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                                "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                                "1.2.840.10008.1.2.4.203"})
JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                           "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
# Samples per Pixel of each photometric interpretation this node accepts (PS3.3 C.7.6.3.1.2)
PHOTOMETRIC_SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3,
                       "YBR_FULL_422": 3, "YBR_PARTIAL_420": 3, "YBR_ICT": 3, "YBR_RCT": 3}
BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})
REQUIRED_IMAGE_ATTRIBUTES = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                             "BitsStored", "PixelRepresentation")
# the image attributes the node decodes or computes with, and their VR (PS3.6): another VR is refused
IMAGE_ATTRIBUTE_VRS = {"SamplesPerPixel": "US", "PhotometricInterpretation": "CS", "PlanarConfiguration": "US",
                       "Rows": "US", "Columns": "US", "BitsAllocated": "US", "BitsStored": "US", "HighBit": "US",
                       "PixelRepresentation": "US", "NumberOfFrames": "IS", "WindowCenter": "DS",
                       "WindowWidth": "DS", "VOILUTFunction": "CS", "RescaleIntercept": "DS", "RescaleSlope": "DS"}

KNOWN_VRS = frozenset(vr.value for vr in VR if len(vr.value) == 2)
VALUE_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8, "US or SS": 2}
LONG_LENGTH_VRS = frozenset(vr.value for vr in EXPLICIT_VR_LENGTH_32)  # a 4-byte length field in explicit VR
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010


class MalformedInstanceError(NodeError, ValueError):
    """The dataset cannot be decoded, or its pixel data does not match its image attributes."""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _judged_by_decoding(tag: int, vr: str | None) -> bool:
    """Whether pydicom reads the element as another VR than the one given: UN of a standard tag (read as its
    dictionary VR), or an implicit VR the dictionary leaves ambiguous ("US or SS", "US or OW", ...; resolved
    from other elements). Pixel data is checked on its own."""
    if tag == PIXEL_DATA or vr is None:
        return False
    if vr == "UN":
        return _implicit_vr(tag) not in (None, "UN")
    return " or " in vr


def _implicit_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:  # private or unknown: only an undefined length says it is a sequence
        return None


class _Walker:
    """Walks the element headers of an encoded dataset, skipping the values, and checks that they hold together."""

    def __init__(self, data: bytes | memoryview, little_endian: bool) -> None:
        self.data = data
        order = "<" if little_endian else ">"
        self.tag, self.u16, self.u32 = struct.Struct(f"{order}HH"), struct.Struct(f"{order}H"), struct.Struct(
            f"{order}I")
        self.elements = 0
        self.native_pixel_data: tuple[str | None, int, int] | None = None  # top level: (VR, value offset, length)
        self.top_level_pixel_data = 0  # how many (7FE0,0010) elements the top level holds, whatever their form
        self.needs_decoding = False  # an element only pydicom's decoding can judge (see ``_judged_by_decoding``)

    def header(self, pos: int, end: int, implicit: bool) -> tuple[int, str | None, int, int]:
        """(tag, VR or None, length, offset of the value) of the element at ``pos``."""
        if end - pos < 8:
            raise MalformedInstanceError(f"the data ends inside an element header at byte {pos} (truncated?)")
        group, number = self.tag.unpack_from(self.data, pos)
        tag = group << 16 | number
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise MalformedInstanceError(f"the dataset holds more than {MAX_ELEMENTS} elements")
        if group == 0xFFFE or implicit:
            vr = None if group == 0xFFFE else _implicit_vr(tag)
            return tag, vr, self.u32.unpack_from(self.data, pos + 4)[0], pos + 8
        vr = str(self.data[pos + 4:pos + 6], "latin-1")
        if vr not in KNOWN_VRS:
            raise MalformedInstanceError(f"element {_tag(tag)} at byte {pos} has an unknown VR {vr!r}")
        if vr not in LONG_LENGTH_VRS:
            return tag, vr, self.u16.unpack_from(self.data, pos + 6)[0], pos + 8
        if end - pos < 12:
            raise MalformedInstanceError(f"the data ends inside an element header at byte {pos} (truncated?)")
        return tag, vr, self.u32.unpack_from(self.data, pos + 8)[0], pos + 12

    def dataset(self, pos: int, end: int, depth: int, implicit: bool, delimited: bool = False) -> int:
        """Check the elements from ``pos`` to ``end``; a ``delimited`` item stops after its item delimiter."""
        while pos < end:
            tag, vr, length, value_at = self.header(pos, end, implicit)
            if tag == PIXEL_DATA and depth == 0:
                self.top_level_pixel_data += 1
            if tag == ITEM_END and delimited:
                return value_at
            if tag in (ITEM_END, SEQUENCE_END) and length == 0 and not delimited:
                pos = value_at  # a stray delimiter some writers leave: skipped, as pydicom and DCMTK do
                continue
            if tag >> 16 == 0xFFFE:
                raise MalformedInstanceError(f"an item tag {_tag(tag)} stands where an element should be, at byte "
                                             f"{pos}")
            if length == UNDEFINED_LENGTH:
                if tag == PIXEL_DATA and vr in (None, "OB", "OW"):
                    pos = self.fragments(value_at, end)
                elif vr in (None, "SQ", "UN"):  # UN of undefined length: a sequence in implicit VR (PS3.5 6.2.2)
                    pos = self.items(value_at, end, depth + 1, implicit or vr == "UN", delimited=True)
                else:
                    raise MalformedInstanceError(f"element {_tag(tag)} ({vr}) has an undefined length")
                continue
            if length > end - value_at:
                raise MalformedInstanceError(f"element {_tag(tag)} at byte {pos} declares {length} bytes but only "
                                             f"{end - value_at} follow (lying length or truncated transfer)")
            size = VALUE_SIZES.get(vr or "", 1)
            if length % size:
                raise MalformedInstanceError(f"element {_tag(tag)} ({vr}) at byte {pos} holds {length} bytes, not a "
                                             f"whole number of {size}-byte values")
            self.needs_decoding = self.needs_decoding or _judged_by_decoding(tag, vr)
            if vr == "SQ":
                self.items(value_at, value_at + length, depth + 1, implicit, delimited=False)
            elif tag == PIXEL_DATA and depth == 0 and (implicit or vr in ("OB", "OW")):
                self.native_pixel_data = None if implicit else vr, value_at, length
            pos = value_at + length
        if delimited:
            raise MalformedInstanceError("an item of undefined length has no item delimiter (truncated?)")
        return pos

    def items(self, pos: int, end: int, depth: int, implicit: bool, delimited: bool) -> int:
        """Check the items of a sequence; a ``delimited`` one stops after its sequence delimiter."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise MalformedInstanceError(f"sequences nest more than {MAX_SEQUENCE_DEPTH} levels deep")
        while pos < end:
            tag, _, length, value_at = self.header(pos, end, implicit)
            if tag == SEQUENCE_END and delimited:
                return value_at
            if tag != ITEM:
                raise MalformedInstanceError(f"a sequence holds {_tag(tag)} where an item should be, at byte {pos}")
            if length == UNDEFINED_LENGTH:
                pos = self.dataset(value_at, end, depth, implicit, delimited=True)
                continue
            if length > end - value_at:
                raise MalformedInstanceError(f"a sequence item at byte {pos} declares {length} bytes but only "
                                             f"{end - value_at} follow (lying length)")
            self.dataset(value_at, value_at + length, depth, implicit)
            pos = value_at + length
        if delimited:
            raise MalformedInstanceError("a sequence of undefined length has no sequence delimiter (truncated?)")
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Check the items of encapsulated pixel data up to its sequence delimiter."""
        while True:
            if end - pos < 8:
                raise MalformedInstanceError("the encapsulated pixel data has no sequence delimiter (truncated?)")
            group, number = self.tag.unpack_from(self.data, pos)
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            if (group, number) == (0xFFFE, 0xE0DD):
                return pos + 8
            if (group, number) != (0xFFFE, 0xE000) or length > end - pos - 8:
                raise MalformedInstanceError(f"a pixel data fragment at byte {pos} is not a well-formed item")
            pos += 8 + length


def inflate(data: bytes, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """The raw deflate stream ``data`` inflated. A stream that would inflate to more than ``limit`` bytes (a deflate
    bomb) is refused after a first pass that keeps no more than 1 MiB; a cut or corrupt stream is refused too."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, data
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, 1 << 20)
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                break
            total += len(chunk)
            if total > limit:
                raise MalformedInstanceError(f"the deflated dataset inflates to more than {limit} bytes "
                                             "(deflate bomb?)")
        if not inflater.eof or len(inflater.unused_data) > 1:  # one NUL may pad the stream to even length
            raise MalformedInstanceError("the deflated dataset is cut short or followed by other data")
        return zlib.decompress(data[:len(data) - len(inflater.unused_data)], -zlib.MAX_WBITS)
    except zlib.error as error:
        raise MalformedInstanceError(f"the deflated dataset does not inflate: {error}") from None


def _walk(data: bytes | memoryview, syntax: UID) -> _Walker:
    walker = _Walker(data, syntax.is_little_endian)
    try:
        walker.dataset(0, len(data), 0, syntax.is_implicit_VR)
    except MalformedInstanceError as error:
        raise MalformedInstanceError(f"the dataset does not decode: {error}") from None
    return walker


def decode_received(stream: bytes | memoryview, transfer_syntax_uid: str) -> Dataset:
    """The dataset of a C-STORE request (as received: bytes, or a view of the memory it was received into),
    structure-checked and inflated with a limit before pydicom builds a single element. Native pixel data is not
    copied: its element holds a ``memoryview`` of ``stream`` (a copy of a 7 MB image cost ~1.5 ms per instance),
    and pydicom reads only the elements before and after it."""
    syntax = UID(transfer_syntax_uid)
    data = inflate(stream) if syntax.is_deflated else stream
    walker = _walk(data, syntax)
    pixel_data = walker.native_pixel_data
    if pixel_data is None or syntax.is_encapsulated or walker.top_level_pixel_data != 1:
        dataset = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    else:
        vr, value_at, length = pixel_data
        element_at = value_at - (8 if syntax.is_implicit_VR else 12)  # (7FE0,0010) OB/OW: a 4-byte length
        dataset = read_dataset(BytesIO(data[:element_at]), syntax.is_implicit_VR, syntax.is_little_endian)
        dataset[PIXEL_DATA] = RawDataElement(Tag(PIXEL_DATA), vr, length,
                                             memoryview(data)[value_at:value_at + length], value_at,
                                             syntax.is_implicit_VR, syntax.is_little_endian, True)
        if value_at + length < len(data):  # elements after the pixel data (trailing padding, private tags)
            rest = read_dataset(BytesIO(data[value_at + length:]), syntax.is_implicit_VR, syntax.is_little_endian,
                                parent_encoding=dataset.original_character_set)  # for the items of its sequences
            for element in rest.elements():
                dataset[element.tag] = element
    if walker.needs_decoding:
        try:
            _decode_all(dataset)
        except (BytesLengthException, NotImplementedError, ValueError, KeyError, EOFError, TypeError,
                AttributeError, RecursionError, OSError, struct.error) as error:
            raise MalformedInstanceError(f"the dataset does not decode: {error}") from None
    return dataset


def _decode_all(dataset: Dataset) -> None:
    """Convert every element, items of sequences included (their depth is bounded by the walk)."""
    for element in dataset:  # iterating converts each raw element: a value of the wrong size raises here
        if isinstance(element.value, Sequence):
            for item in element.value:
                _decode_all(item)


def _check_attribute_vrs(dataset: Dataset) -> None:
    """The image attributes have their standard VR, and their decimal strings are finite numbers."""
    for keyword, expected in IMAGE_ATTRIBUTE_VRS.items():
        if keyword not in dataset:
            continue
        element = dataset[keyword]
        found = str(element.VR)
        if found != expected:
            raise MalformedInstanceError(f"{keyword} has VR {found}, not {expected}")
        if expected == "DS" and element.VM:
            values = element.value if element.VM > 1 else [element.value]
            if not all(value is not None and math.isfinite(float(value)) for value in values):
                raise MalformedInstanceError(f"{keyword} holds a value that is not a finite number")


def _image_attributes(dataset: Dataset) -> tuple[int, int, int, int, int]:
    """(rows, columns, samples per pixel, bits allocated, frames), each checked for a sane value."""
    for keyword in REQUIRED_IMAGE_ATTRIBUTES:  # Type 1 in the Image Pixel module; pixel decoding needs them all
        if keyword not in dataset or dataset[keyword].VM == 0:
            raise MalformedInstanceError(f"the image has pixel data but no {keyword}")
    _check_attribute_vrs(dataset)
    try:
        rows, columns, bits = int(dataset.Rows), int(dataset.Columns), int(dataset.BitsAllocated)
        samples, stored = int(dataset.SamplesPerPixel), int(dataset.BitsStored)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        signed = int(dataset.PixelRepresentation)
        planar = int(dataset.PlanarConfiguration) if samples > 1 else 0
    except (TypeError, ValueError, AttributeError) as error:
        raise MalformedInstanceError(f"an image attribute is missing or not a number: {error}") from None
    if signed not in (0, 1) or planar not in (0, 1):
        raise MalformedInstanceError(f"Pixel Representation {signed} / Planar Configuration {planar} is not 0 or 1")
    photometric = str(dataset.PhotometricInterpretation).strip()
    if PHOTOMETRIC_SAMPLES.get(photometric) != samples:
        raise MalformedInstanceError(f"photometric interpretation {photometric[:32]!r} with {samples} sample(s) "
                                     "per pixel is not an image this node can read")
    if bits not in BITS_ALLOCATED or not 1 <= stored <= bits:
        raise MalformedInstanceError(f"Bits Allocated {bits} / Bits Stored {stored} is not a valid bit depth")
    if rows < 1 or columns < 1 or frames < 1:
        raise MalformedInstanceError(f"the image declares {rows} x {columns} pixels in {frames} frame(s)")
    if rows * columns > MAX_FRAME_PIXELS:
        raise MalformedInstanceError(f"the image declares {rows} x {columns} pixels; at most {MAX_FRAME_PIXELS} "
                                     "per frame are accepted (decompression bomb?)")
    if rows * columns * samples * frames * bits // 8 > MAX_DECODED_BYTES:
        raise MalformedInstanceError(f"the image declares {frames} frame(s) of {rows} x {columns} pixels, more than "
                                     f"{MAX_DECODED_BYTES} bytes once decoded")
    return rows, columns, samples, bits, frames


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG or JPEG-LS start-of-frame segment, or None."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:  # SOFn, SOF55
            if pos + 10 > len(frame):
                return None
            rows, columns = struct.unpack_from(">HH", frame, pos + 5)
            return rows, columns, frame[pos + 9]
        pos += 2 + struct.unpack_from(">H", frame, pos + 2)[0]
    return None


J2K_START = b"\xff\x4f\xff\x51"  # SOC, then the SIZ marker: how every JPEG 2000 codestream begins
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SIZ marker segment of a JPEG 2000 codestream, or None. The codestream
    is the frame, or (a JP2 file, which PS3.5 A.4.4 does not allow but decoders read) the content of its
    ``jp2c`` box: never the first SOC-SIZ bytes found anywhere, which a box before the codestream could hold
    to declare a small image while the decoder reads a huge one."""
    at = _jp2_codestream(frame) if frame.startswith(JP2_SIGNATURE) else 0
    if at is None or frame[at:at + 4] != J2K_START or at + 42 > len(frame):
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack_from(">IIII", frame, at + 8)
    return y_size - y_offset, x_size - x_offset, struct.unpack_from(">H", frame, at + 40)[0]


def _jp2_codestream(frame: bytes) -> int | None:
    """Where the content of a JP2 file's top-level ``jp2c`` box begins, or None."""
    at = 0
    while at + 8 <= len(frame):
        length, kind = struct.unpack_from(">I4s", frame, at)
        header = 8
        if length == 1:  # the length is in the next 8 bytes
            if at + 16 > len(frame):
                return None
            length, header = struct.unpack_from(">Q", frame, at + 8)[0], 16
        if kind == b"jp2c":
            return at + header
        if length == 0 or length < header:  # the last box (to the end), or a lying length
            return None
        at += length
    return None


def _check_frame(frame: bytes, syntax: str, rows: int, columns: int, samples: int, bits: int, index: int) -> None:
    if syntax == RLE_LOSSLESS:
        if len(frame) < 64:
            raise MalformedInstanceError(f"RLE frame {index} has no 64-byte header")
        segments, *offsets = struct.unpack_from("<16I", frame)
        expected = samples * ((bits + 7) // 8)
        if segments != expected or offsets[0] != 64 or \
                any(not offsets[i] < offsets[i + 1] <= len(frame) for i in range(segments - 1)):
            raise MalformedInstanceError(f"RLE frame {index} has {segments} segment(s) (expected {expected}) or "
                                         "bad segment offsets")
        return
    if syntax in JPEG_2000_SYNTAXES:
        size = _j2k_size(frame)
    elif syntax in JPEG_SYNTAXES:
        size = _jpeg_size(frame)
    else:
        return
    if size is None:
        raise MalformedInstanceError(f"compressed frame {index} has no readable codestream header")
    if size != (rows, columns, samples):
        raise MalformedInstanceError(f"compressed frame {index} declares {size[0]} x {size[1]} pixels with {size[2]} "
                                     f"component(s); the dataset says {rows} x {columns} with {samples} "
                                     "(decompression bomb?)")


def _check_pixel_data(dataset: Dataset, transfer_syntax: UID) -> None:
    rows, columns, samples, bits, frames = _image_attributes(dataset)
    data = dataset.PixelData
    if not transfer_syntax.is_encapsulated:
        expected = (rows * columns * samples * frames * bits + 7) // 8
        if str(dataset.PhotometricInterpretation).strip() == "YBR_FULL_422":
            expected = expected * 2 // 3  # two chroma samples per two pixels
        if len(data) < expected:
            raise MalformedInstanceError(f"the pixel data holds {len(data)} bytes; Rows x Columns x bits "
                                         f"promise {expected} (truncated transfer?)")
        return
    try:
        fragments = list(generate_fragments(data))
        extended = None
        if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
            extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
        found = list(generate_frames(data, number_of_frames=frames, extended_offsets=extended)) \
            if fragments else []
    except (ValueError, EOFError, struct.error) as error:
        raise MalformedInstanceError(f"the encapsulated pixel data is not well formed: {error}") from None
    if not fragments or not fragments[-1]:
        raise MalformedInstanceError("the encapsulated pixel data holds no compressed frame")
    if str(transfer_syntax) != RLE_LOSSLESS and JPEG_END_OF_IMAGE not in fragments[-1][-8:]:
        raise MalformedInstanceError("the compressed pixel data has no end-of-image marker (truncated?)")
    if len(found) < frames:
        raise MalformedInstanceError(f"the encapsulated pixel data holds {len(found)} frame(s); the dataset "
                                     f"declares {frames}")
    for index, frame in enumerate(found):
        _check_frame(frame, str(transfer_syntax), rows, columns, samples, bits, index)


def _check_mammogram(dataset: Dataset) -> None:
    """An MG image (PS3.3 A.26, DX Image module) carries one frame of grayscale pixel data."""
    if "PixelData" not in dataset:
        raise MalformedInstanceError("the MG image has no pixel data")
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise MalformedInstanceError(f"an MG image must be MONOCHROME1 or MONOCHROME2, not {photometric[:32]!r}")
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return  # refused with the other image attributes
    if frames != 1:  # the worker would decode every frame before finding it is not one image
        raise MalformedInstanceError(f"an MG image has one frame, not {frames}")


def check_instance(dataset: Dataset, transfer_syntax_uid: str) -> None:
    """Raise ``MalformedInstanceError`` if the image attributes or pixel data of ``dataset`` (from
    ``decode_received``) are inconsistent or too large (see the module docstring). Decodes no pixels."""
    if str(dataset.get("SOPClassUID", "")) in MAMMOGRAPHY_SOP_CLASSES:
        _check_mammogram(dataset)
    if "PixelData" in dataset:
        _check_pixel_data(dataset, UID(transfer_syntax_uid))
