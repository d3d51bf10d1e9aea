"""A seeded corpus of hostile C-STORE inputs, made from valid synthetic MG files (used by tests/test_fuzz.py).

Every case is the dataset exactly as it goes on the wire (``Case.body``) under a transfer syntax, with the
file meta and command UIDs left valid so that the hostile bytes reach the node's handler. The classes of input
and what the node must answer to each are listed in docs/fuzzing.md.
"""

from __future__ import annotations

import copy
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    HTJ2K,
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from training.synthetic import write_studies

REFUSED, STORED, EITHER, NO_CONTEXT = "refused", "stored", "either", "no-context"
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
LONG_LENGTH_VRS = frozenset(vr.value.encode() for vr in EXPLICIT_VR_LENGTH_32)
VRS = [*sorted(vr.value.encode() for vr in VR if len(vr.value) == 2), b"ZZ", b"\x00\x00", b"  ", b"\xff\xff", b"ob"]
HOSTILE_UIDS = ["../../etc", "1.2/../../x", "/etc/passwd", "..", "1.2.840.\u00fc", "1.2.840.\u4e2d",
                "1.2.3\x00/../../x", "1." + "9" * 80, "1." + "1." * 40 + "1", "", "1..2", "01.2", "1.2.",
                "1.2.3\\1.2.4", "C:\\Windows", "1.2.3 ../x", "1.2.3%2F..%2Fx"]
UID_ELEMENTS = {"SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018, "StudyInstanceUID": 0x0020000D,
                "SeriesInstanceUID": 0x0020000E}


@dataclass(frozen=True)
class Case:
    """One C-STORE request: the SOP class, instance and transfer syntax of its context and command, and
    the dataset bytes sent under them."""

    name: str
    kind: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    body: bytes
    expect: str

    def write(self, folder: Path) -> Path:
        """The case as a DICOM file (preamble, file meta, then ``body`` unchanged), for a chunked send."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class
        meta.MediaStorageSOPInstanceUID = self.sop_instance
        meta.TransferSyntaxUID = self.transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        out = DicomBytesIO()
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        path = folder / f"{self.name}.dcm"
        path.write_bytes(out.getvalue() + self.body)
        return path


@dataclass(frozen=True)
class Element:
    """Where one explicit-VR little-endian element sits in a body."""

    tag: int
    vr: bytes
    start: int
    length_at: int
    length_size: int
    value_at: int
    length: int
    end: int


def _element(body: bytes, pos: int) -> Element:
    group, number = struct.unpack_from("<HH", body, pos)
    vr = body[pos + 4:pos + 6]
    if vr in LONG_LENGTH_VRS:
        length, length_at, size = struct.unpack_from("<I", body, pos + 8)[0], pos + 8, 4
    else:
        length, length_at, size = struct.unpack_from("<H", body, pos + 6)[0], pos + 6, 2
    value_at = length_at + size
    end = _skip_undefined(body, value_at) if length == UNDEFINED else value_at + length
    return Element(group << 16 | number, vr, pos, length_at, size, value_at, length, end)


def _skip_undefined(body: bytes, pos: int) -> int:
    """The offset after the sequence delimiter that closes the undefined-length value starting at ``pos``."""
    while pos + 8 <= len(body):
        group, number, length = struct.unpack_from("<HHI", body, pos)
        if (group, number) == (0xFFFE, 0xE0DD):
            return pos + 8
        pos += 8
        if length != UNDEFINED:
            pos += length
            continue
        while struct.unpack_from("<HH", body, pos) != (0xFFFE, 0xE00D):
            pos = _element(body, pos).end
        pos += 8
    raise ValueError("no sequence delimiter")


def elements(body: bytes) -> list[Element]:
    """The top-level elements of a valid explicit-VR little-endian body."""
    found, pos = [], 0
    while pos + 8 <= len(body):
        found.append(_element(body, pos))
        pos = found[-1].end
    return found


def find(body: bytes, tag: int) -> Element:
    return next(element for element in elements(body) if element.tag == tag)


def with_length(body: bytes, element: Element, length: int) -> bytes:
    """``body`` with ``element``'s length field set to ``length`` (nothing else moves)."""
    packed = struct.pack("<I" if element.length_size == 4 else "<H", length % (1 << 8 * element.length_size))
    return body[:element.length_at] + packed + body[element.length_at + element.length_size:]


def with_value(body: bytes, tag: int, value: bytes) -> bytes:
    """``body`` with the value of top-level ``tag`` replaced (length updated, padded to even with NUL)."""
    element = find(body, tag)
    value += b"\x00" * (len(value) % 2)
    if element.length_size == 2 and len(value) > 0xFFFF:
        raise ValueError("value too long for a short-length VR")
    header = body[element.start:element.length_at]
    packed = struct.pack("<I" if element.length_size == 4 else "<H", len(value))
    return body[:element.start] + header + packed + value + body[element.end:]


def encode(dataset: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset's bytes as they go on the wire under ``syntax`` (deflated when it says so)."""
    out = DicomBytesIO()
    out.is_little_endian = syntax != ExplicitVRBigEndian
    out.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(out, dataset)
    if syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return packer.compress(out.getvalue()) + packer.flush()
    return out.getvalue()


def base_datasets(folder: Path, seed: int) -> list[Dataset]:
    """The valid seed files: two synthetic four-view studies at 128 x 96 (MONOCHROME1 and 2, 16-bit)."""
    write_studies(folder, 2, seed=seed, rows=128, cols=96, progress=False)
    return [pydicom.dcmread(path) for path in sorted(folder.glob("*/*.dcm"))]


class Corpus:
    """Builds the cases from the seed datasets with one seeded generator: the same seed, the same bytes."""

    def __init__(self, datasets: list[Dataset], seed: int) -> None:
        self.datasets = datasets
        self.rng = random.Random(seed)
        self.seed = seed
        self.count = 0
        self.serial = 0

    def fresh(self, dataset: Dataset | None = None) -> Dataset:
        """A copy of a seed dataset (a random one if none given) under a new, deterministic SOP Instance UID."""
        ds = copy.deepcopy(dataset if dataset is not None else self.rng.choice(self.datasets))
        self.count += 1
        uid = generate_uid(entropy_srcs=[str(self.seed), str(self.count)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        return ds

    def case(self, kind: str, body: bytes, expect: str, ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> Case:
        self.serial += 1
        return Case(f"{kind}-{self.serial:05d}", kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, body,
                    expect)

    # --- random structural mutations of the bytes (anything may come out: stored if valid, else refused) ---

    def _random_structural(self) -> Case:
        ds = self.fresh()
        body = encode(ds)
        found = elements(body)
        header_end = find(body, PIXEL_DATA).value_at
        kind = self.rng.choice(["truncated", "wrong-vr", "lying-length", "byte-flip", "shifted",
                                "undefined-length", "spliced"])
        element = self.rng.choice(found)
        if kind == "truncated":
            cut = self.rng.randrange(header_end + 16) if self.rng.random() < 0.7 else self.rng.randrange(len(body))
            body = body[:cut]
        elif kind == "wrong-vr":
            body = body[:element.start + 4] + self.rng.choice(VRS) + body[element.start + 6:]
        elif kind == "lying-length":
            extra = self.rng.choice([1, 2, 7, 100, 4096, 1 << 16, 1 << 24, 0x7FFFFFF0])
            body = with_length(body, element, element.length + extra if element.length != UNDEFINED else extra)
        elif kind == "byte-flip":
            data = bytearray(body)
            for _ in range(self.rng.randint(1, 8)):
                data[self.rng.randrange(header_end)] ^= self.rng.randint(1, 255)
            body = bytes(data)
        elif kind == "shifted":
            at = self.rng.randrange(header_end)
            width = self.rng.randint(1, 3)
            body = body[:at] + (self.rng.randbytes(width) if self.rng.random() < 0.5 else b"") + body[at + width:]
        elif kind == "undefined-length":
            body = with_length(body, element, UNDEFINED)
        else:
            start = self.rng.randrange(header_end)
            piece = body[start:start + self.rng.randint(1, 64)]
            at = self.rng.randrange(header_end)
            body = body[:at] + piece + body[at:]
        return self.case(kind, body, EITHER, ds)

    def structural(self, count: int) -> Iterator[Case]:
        for _ in range(count):
            yield self._random_structural()

    # --- deterministic hostile classes, each with the one answer the node must give ---

    def lengths(self) -> Iterator[Case]:
        ds = self.fresh()
        body = encode(ds)
        pixels = find(body, PIXEL_DATA)
        for extra in (2, 1 << 20, 0x7FFFFFF0 - pixels.length):  # the last element: pydicom reads it short
            yield self.case("lying-pixel-length", with_length(body, pixels, pixels.length + extra), REFUSED, ds)
        manufacturer = find(body, 0x00080070)
        yield self.case("lying-header-length", with_length(body, manufacturer, 0xFFFF), REFUSED, ds)
        yield self.case("short-pixel-length", with_length(body, pixels, pixels.length - 2000), REFUSED, ds)
        # a binary value that is not a whole number of values (pydicom raises when it is used), at the top level
        # and inside a sequence item (private elements of group 0009, before Patient's Name), and as UN of a
        # standard US tag (pydicom reads it as US)
        at = find(body, 0x00100010).start
        yield self.case("partial-binary-value", body[:at] + _short(0x00091010, b"LO", b"FUZZ")
                        + _short(0x00091012, b"FD", bytes(4)) + body[at:], REFUSED, ds)
        item = _short(0x00091010, b"LO", b"FUZZ") + _short(0x00091012, b"UL", bytes(2))
        sequence = struct.pack("<HH2sHI", 0x0009, 0x1013, b"SQ", 0, 8 + len(item)) + struct.pack(
            "<HHI", 0xFFFE, 0xE000, len(item)) + item
        yield self.case("partial-binary-value-in-item", body[:at] + _short(0x00091010, b"LO", b"FUZZ") + sequence
                        + body[at:], REFUSED, ds)
        smallest = find(body, PIXEL_DATA).start  # (0028,0106) Smallest Image Pixel Value goes before the pixels
        un = struct.pack("<HH2s2xI", 0x0028, 0x0106, b"UN", 3) + b"\x01\x02\x03"
        yield self.case("partial-binary-value-as-un", body[:smallest] + un + body[smallest:], REFUSED, ds)

    def huge_element(self, megabytes: int) -> Iterator[Case]:
        ds = self.fresh()
        ds.add_new(0x00091010, "LO", "FUZZ")  # private creator of block 0x10 in group 0x0009
        ds.add_new(0x00091011, "OB", bytes(megabytes << 20))
        yield self.case("huge-element", encode(ds), STORED, ds)

    def element_flood(self, count: int) -> Iterator[Case]:
        """``count`` distinct empty private elements: a few bytes each on the wire, far more once decoded."""
        ds = self.fresh()
        body = encode(ds)
        flood = b"".join(struct.pack("<HH2sH", 0x0009 + 2 * (n >> 16), n & 0xFFFF, b"LO", 0) for n in range(count))
        at = find(body, 0x00100010).start  # after group 0008 (elements stay in ascending order)
        yield self.case("element-flood", body[:at] + flood + body[at:], REFUSED, ds)

    def nesting(self) -> Iterator[Case]:
        for depth, defined, expect in ((8, False, STORED), (8, True, STORED), (3000, False, REFUSED),
                                       (300, True, REFUSED)):
            ds = self.fresh()
            body = encode(ds)
            at = find(body, PIXEL_DATA).start
            yield self.case(f"nested-{depth}{'-defined' if defined else ''}",
                            body[:at] + nested_sequence(depth, defined) + body[at:], expect, ds)
        ds = self.fresh()  # an item that claims more bytes than its sequence holds
        body = encode(ds)
        at = find(body, PIXEL_DATA).start
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0x10000) + _short(0x00100020, b"LO", b"X")
        sequence = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
        yield self.case("lying-item-length", body[:at] + sequence + body[at:], REFUSED, ds)

    def pixel_modules(self) -> Iterator[Case]:
        edits: list[tuple[str, Callable[[Dataset], None], str]] = [
            ("missing-pixel-data", lambda ds: delattr(ds, "PixelData"), REFUSED),
            ("missing-rows", lambda ds: delattr(ds, "Rows"), REFUSED),
            ("missing-bits-stored", lambda ds: delattr(ds, "BitsStored"), REFUSED),
            ("missing-pixel-representation", lambda ds: delattr(ds, "PixelRepresentation"), REFUSED),
            ("missing-samples-per-pixel", lambda ds: delattr(ds, "SamplesPerPixel"), REFUSED),
            ("photometric-rgb-one-sample", lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), REFUSED),
            ("photometric-ybr", lambda ds: setattr(ds, "PhotometricInterpretation", "YBR_FULL"), REFUSED),
            ("photometric-palette", lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"), REFUSED),
            ("photometric-unknown", lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME3"), REFUSED),
            ("photometric-empty", lambda ds: setattr(ds, "PhotometricInterpretation", ""), REFUSED),
            ("photometric-missing", lambda ds: delattr(ds, "PhotometricInterpretation"), REFUSED),
            ("rgb-image", _rgb, REFUSED),
            ("declared-1x1", lambda ds: _size(ds, 1, 1, keep_data=True), STORED),
            ("exact-1x1", lambda ds: _size(ds, 1, 1), STORED),
            ("declared-20000x20000", lambda ds: _size(ds, 20000, 20000, keep_data=True), REFUSED),
            ("declared-zero-rows", lambda ds: _size(ds, 0, 96, keep_data=True), REFUSED),
            ("bits-allocated-13", lambda ds: setattr(ds, "BitsAllocated", 13), REFUSED),
            ("bits-allocated-0", lambda ds: setattr(ds, "BitsAllocated", 0), REFUSED),
            ("bits-stored-over-allocated", lambda ds: setattr(ds, "BitsStored", 32), REFUSED),
            ("samples-per-pixel-0", lambda ds: setattr(ds, "SamplesPerPixel", 0), REFUSED),
            ("frames-1e9", lambda ds: setattr(ds, "NumberOfFrames", 1_000_000_000), REFUSED),
            ("frames-negative", lambda ds: setattr(ds, "NumberOfFrames", -3), REFUSED),
            ("two-frames", _two_frames, REFUSED),  # an MG image is one frame
        ]
        for kind, edit, expect in edits:
            ds = self.fresh()
            edit(ds)
            yield self.case(kind, encode(ds), expect, ds)

    def compressed(self) -> Iterator[Case]:
        for syntax, name in ((JPEG2000Lossless, "j2k"), (JPEGLSLossless, "jpegls"), (RLELossless, "rle")):
            ds = self.fresh()
            ds.compress(syntax, generate_instance_uid=False)
            yield self.case(f"valid-{name}", encode(ds), STORED, ds, syntax)
        ds = self.fresh()
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
        bomb = copy.deepcopy(ds)  # the codestream says 20000 x 20000, the dataset 128 x 96
        bomb.PixelData = encapsulate([j2k_with_size(frame, 20000, 20000)])
        yield self.case("j2k-header-bomb", encode(bomb), REFUSED, bomb, JPEG2000Lossless)
        declared = self.fresh(ds)  # a tiny stream under a declared 20000 x 20000 x 16 bits
        declared.Rows = declared.Columns = 20000
        declared.PixelData = encapsulate([j2k_with_size(frame, 20000, 20000)])
        yield self.case("declared-bomb-20000x20000", encode(declared), REFUSED, declared, JPEG2000Lossless)
        edge = self.fresh(ds)
        edge.Rows = edge.Columns = 10000  # exactly 100 megapixels: allowed by size, refused by its header
        yield self.case("declared-10000x10000-header-128x96", encode(edge), REFUSED, edge, JPEG2000Lossless)
        garbage = self.rng.randbytes(4000)
        for syntax, kind in ((JPEGLSLossless, "jpegls-garbage"), (JPEG2000Lossless, "j2k-garbage")):
            ds = self.fresh()
            ds.PixelData = encapsulate([garbage + b"\xff\xd9"])  # well framed, ends like a codestream
            ds["PixelData"].VR = "OB"
            yield self.case(kind, encode(ds), REFUSED, ds, syntax)
        ds = self.fresh()
        yield self.case("jpegls-native-bytes", encode(ds), REFUSED, ds, JPEGLSLossless)  # not encapsulated
        ds = self.fresh()
        ds.compress(RLELossless, generate_instance_uid=False)
        (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
        ds.PixelData = encapsulate([struct.pack("<I", 15) + frame[4:]])  # 15 segments for 16-bit grey
        yield self.case("rle-wrong-segments", encode(ds), REFUSED, ds, RLELossless)
        for syntax in (HTJ2K, JPEGBaseline8Bit):  # not offered by the node: no presentation context
            ds = self.fresh()
            yield self.case("unsupported-syntax", self.rng.randbytes(3000), NO_CONTEXT, ds, syntax)

    def syntaxes(self) -> Iterator[Case]:
        ds = self.fresh()
        yield self.case("valid-deflate", encode(ds, DeflatedExplicitVRLittleEndian), STORED, ds,
                        DeflatedExplicitVRLittleEndian)
        ds = self.fresh()
        yield self.case("deflate-garbage", self.rng.randbytes(5000), REFUSED, ds, DeflatedExplicitVRLittleEndian)
        ds = self.fresh()
        body = encode(ds, DeflatedExplicitVRLittleEndian)
        yield self.case("deflate-truncated", body[:len(body) // 2], REFUSED, ds, DeflatedExplicitVRLittleEndian)
        ds = self.fresh()
        yield self.case("explicit-bytes-as-implicit", encode(ds), REFUSED, ds, ImplicitVRLittleEndian)
        ds = self.fresh()
        yield self.case("little-endian-bytes-as-big", encode(ds), REFUSED, ds, ExplicitVRBigEndian)
        ds = self.fresh()
        yield self.case("valid-implicit", encode(ds, ImplicitVRLittleEndian), STORED, ds, ImplicitVRLittleEndian)

    def uids(self) -> Iterator[Case]:
        for keyword, tag in UID_ELEMENTS.items():
            for value in HOSTILE_UIDS:
                ds = self.fresh()
                body = with_value(encode(ds), tag, value.encode("utf-8"))
                yield self.case(f"uid-{keyword}", body, REFUSED, ds)
        ds = self.fresh()  # a latin-1 byte that is not UTF-8
        yield self.case("uid-SOPInstanceUID", with_value(encode(ds), 0x00080018, b"1.2.840.\xff"), REFUSED, ds)

    def all(self, structural: int, huge_megabytes: int = 32) -> list[Case]:
        """Every deterministic case, then ``structural`` random ones, in a seeded order."""
        cases = [*self.lengths(), *self.huge_element(huge_megabytes), *self.element_flood(260_000), *self.nesting(),
                 *self.pixel_modules(), *self.compressed(), *self.syntaxes(), *self.uids(),
                 *self.structural(structural)]
        self.rng.shuffle(cases)
        return cases


def deflate_bomb(ds: Dataset, size: int) -> bytes:
    """``ds`` deflated with a private OB element of ``size`` zero bytes (a multiple of 1 MiB), built in chunks:
    a few hundred KiB that inflate to ``size``."""
    body = encode(ds)
    at = find(body, 0x00100010).start
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    header = _short(0x00091010, b"LO", b"FUZZ") + struct.pack("<HH2sHI", 0x0009, 0x1011, b"OB", 0, size)
    out = [packer.compress(body[:at] + header)]
    zeros = bytes(1 << 20)
    out += [packer.compress(zeros) for _ in range(size >> 20)]
    return b"".join([*out, packer.compress(body[at:]), packer.flush()])


def _short(tag: int, vr: bytes, value: bytes) -> bytes:
    value += b" " * (len(value) % 2)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def nested_sequence(depth: int, defined: bool) -> bytes:
    """A private sequence nested ``depth`` levels deep, with defined or undefined lengths."""
    inner = _short(0x00091010, b"LO", b"FUZZ")
    for _ in range(depth):
        if defined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            sequence = struct.pack("<HH2sHI", 0x0009, 0x1011, b"SQ", 0, len(item)) + item
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            sequence = (struct.pack("<HH2sHI", 0x0009, 0x1011, b"SQ", 0, UNDEFINED) + item
                        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        inner = _short(0x00091010, b"LO", b"FUZZ") + sequence
    return inner


def j2k_with_size(codestream: bytes, rows: int, columns: int) -> bytes:
    """A JPEG 2000 codestream whose SIZ marker says ``rows`` x ``columns`` (the rest unchanged)."""
    at = codestream.index(b"\xff\x51")
    x_offset, y_offset = struct.unpack_from(">II", codestream, at + 14)
    size = struct.pack(">II", columns + x_offset, rows + y_offset)
    return codestream[:at + 6] + size + codestream[at + 14:]


def _size(ds: Dataset, rows: int, columns: int, keep_data: bool = False) -> None:
    ds.Rows, ds.Columns = rows, columns
    if not keep_data:
        ds.PixelData = ds.PixelData[:rows * columns * 2]


def _rgb(ds: Dataset) -> None:
    grey = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0


def _two_frames(ds: Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def dataset_part(data: bytes) -> bytes:
    """The dataset of a DICOM file's bytes, after its preamble and file meta information."""
    stream = BytesIO(data)
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    return data[stream.tell():]
