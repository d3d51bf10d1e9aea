"""Received C-STORE data sets held as the file they are stored as (``dicom_node.dataset_spool``)."""

from __future__ import annotations

import os

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node import dataset_spool
from dicom_node.dataset_spool import DatasetSpool, file_header
from dicom_node.durable_files import DIRECT_ALIGN, AlignedMemoryPool

MG = "1.2.840.10008.5.1.4.1.1.1.2"


@pytest.fixture
def small_maps(monkeypatch: pytest.MonkeyPatch) -> AlignedMemoryPool:
    """Maps of 64 KiB, one kept idle, so that growth and reuse show with small data."""
    pool = AlignedMemoryPool(1 << 16, 1, retained=1 << 15, reserve_only=True)
    monkeypatch.setattr(dataset_spool, "_MAPS", pool)
    return pool


def _header() -> bytes:
    return file_header(MG, "1.2.3.4", ExplicitVRLittleEndian)


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45", "2.25." + "9" * 59])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless])
def test_the_file_header_is_byte_for_byte_pynetdicoms(sop_instance_uid: str, syntax: str) -> None:
    """pynetdicom's encoding with the node's frozen implementation UID and version name (pynetdicom 3.0.4's: a
    newer pynetdicom must not change the bytes, whose digest tells a resend from changed content)."""
    meta = create_file_meta(sop_class_uid=UID(MG), sop_instance_uid=UID(sop_instance_uid), transfer_syntax=UID(syntax),
                            implementation_uid=UID(dataset_spool.IMPLEMENTATION_CLASS_UID),
                            implementation_version=dataset_spool.IMPLEMENTATION_VERSION_NAME)
    assert file_header(MG, sop_instance_uid, syntax) == bytes(128) + b"DICM" + encode_file_meta(meta)


def test_fragments_land_after_the_file_header_and_read_back_as_pynetdicoms_bytesio(small_maps: AlignedMemoryPool
                                                                                  ) -> None:
    header = _header()
    assert header[128:132] == b"DICM" and header[:128] == bytes(128)
    spool = DatasetSpool(header)
    spool.write(b"abc")
    spool.room(10)[:4] = b"defg"  # as the upper layer reads from a socket: filled, then advanced over
    spool.advance(4)
    spool.write(memoryview(b"hi"))
    assert bytes(spool.dataset) == spool.getvalue() == b"abcdefghi"
    assert spool.read(2) == b"ab" and spool.tell() == 2 and spool.seek(0) == 0 and spool.read() == b"abcdefghi"
    image = spool.image()
    assert image.size == len(header) + 9 and bytes(image.data) == header + b"abcdefghi"
    assert len(image.memory) % DIRECT_ALIGN == 0 and bytes(image.memory[image.size:]) == bytes(
        len(image.memory) - image.size)  # zero padding, whatever the memory held before


def test_a_data_set_larger_than_its_map_moves_to_a_larger_one(small_maps: AlignedMemoryPool) -> None:
    spool = DatasetSpool(_header())
    data = os.urandom(3 * (1 << 16) + 5)
    for start in range(0, len(data), 40_000):
        spool.write(data[start:start + 40_000])
    assert spool.getvalue() == data
    assert bytes(spool.image().data) == _header() + data
    assert len(small_maps._idle) == 1  # the first map went back to the pool when it was outgrown
    spool.release()
    assert len(small_maps._idle) == 1  # the larger one is not pooled


def test_a_released_spool_gives_its_map_to_the_next_one_and_refuses_more_data(small_maps: AlignedMemoryPool) -> None:
    first = DatasetSpool(_header())
    first.write(b"\xff" * 50_000)
    first.release()
    assert len(small_maps._idle) == 1
    second = DatasetSpool(_header())
    assert not small_maps._idle  # the same map, taken again
    assert second.getvalue() == b""
    with pytest.raises(ValueError, match="released"):
        first.write(b"x")
