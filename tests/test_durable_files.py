"""Staged, fsynced, atomically published files: direct I/O for large ones, the page cache otherwise."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from dicom_node import durable_files
from dicom_node.durable_files import DIRECT_ALIGN, DIRECT_CHUNK, DIRECT_MIN, POOLED_BUFFERS, atomic_write, stage_file


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(durable_files, name)

    def spying(*args: object) -> object:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(durable_files, name, spying)
    return calls


def test_atomic_write_never_leaves_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "1.2.3.dcm"
    atomic_write(target, b"first")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["1.2.3.dcm"]
    assert target.stat().st_mode & 0o007 == 0  # never world-readable


@pytest.mark.parametrize("size", [DIRECT_MIN, DIRECT_CHUNK, DIRECT_CHUNK + 1, 2 * DIRECT_CHUNK + DIRECT_ALIGN - 1])
def test_large_files_are_written_directly_and_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      size: int) -> None:
    direct, paged = _spy(monkeypatch, "_write_direct"), _spy(monkeypatch, "_write_paged")
    data = np.random.default_rng(size).integers(0, 1 << 16, size // 2 + 1, dtype=np.uint16).tobytes()[:size]
    # parts as the SCP hands them over: a short header, then views of other formats and lengths
    parts = [data[:132], memoryview(np.frombuffer(data[132:132 + 2 * 1000], np.uint16)), memoryview(data)[2132:]]
    target = tmp_path / "big.dcm"
    atomic_write(target, parts)
    assert target.read_bytes() == data  # size exact: the padding of the last direct write is cut off
    assert (direct, paged) == ([1], [])  # this project's disks (ext4) allow direct I/O


def test_small_files_and_file_systems_without_direct_io_use_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct, paged = _spy(monkeypatch, "_write_direct"), _spy(monkeypatch, "_write_paged")
    atomic_write(tmp_path / "small", b"x" * (DIRECT_MIN - 1))
    assert (direct, paged) == ([], [1])
    set_flags = fcntl.fcntl

    def refusing_direct_io(descriptor: int, command: int, argument: int = 0) -> int:
        if command == fcntl.F_SETFL and argument & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what Linux answers for such a file system
        return set_flags(descriptor, command, argument)

    monkeypatch.setattr(durable_files.fcntl, "fcntl", refusing_direct_io)
    data = os.urandom(DIRECT_MIN + 5)
    atomic_write(tmp_path / "large", data)
    assert (tmp_path / "large").read_bytes() == data
    assert (direct, paged) == ([], [1, 1])


def test_a_failed_direct_write_leaves_no_file_and_returns_its_buffer(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write, writes = os.write, []

    def filling_up(descriptor: int, data: memoryview) -> int:
        writes.append(len(data))
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(descriptor, data)

    idle = len(durable_files._BUFFERS._idle)
    monkeypatch.setattr(os, "write", filling_up)
    with pytest.raises(OSError, match="No space"):
        stage_file(tmp_path / "x.dcm", os.urandom(DIRECT_CHUNK + 1))
    monkeypatch.undo()
    assert writes == [DIRECT_CHUNK, DIRECT_ALIGN]
    assert list(tmp_path.iterdir()) == []
    assert len(durable_files._BUFFERS._idle) == max(idle, 1)  # lent and given back, not leaked


def test_concurrent_writers_each_get_their_own_buffer(tmp_path: Path) -> None:
    payloads = [os.urandom(DIRECT_MIN + index * 4099) for index in range(2 * POOLED_BUFFERS)]
    start = threading.Barrier(len(payloads))

    def write(index: int) -> None:
        start.wait()
        atomic_write(tmp_path / f"{index}.dcm", payloads[index])

    threads = [threading.Thread(target=write, args=(index,)) for index in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [(tmp_path / f"{index}.dcm").read_bytes() == payload for index, payload in enumerate(payloads)] \
        == [True] * len(payloads)
    assert len(durable_files._BUFFERS._idle) <= POOLED_BUFFERS
