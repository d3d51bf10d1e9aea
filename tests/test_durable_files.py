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
from dicom_node.durable_files import (
    DIRECT_ALIGN,
    DIRECT_CHUNK,
    DIRECT_MIN,
    POOLED_BUFFERS,
    AlignedImage,
    AlignedMemoryPool,
    atomic_write,
    stage_file,
)


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


def test_new_folders_are_made_durable_before_a_file_is_written_in_them(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    original = durable_files.fsync_folder
    monkeypatch.setattr(durable_files, "fsync_folder", lambda folder: (synced.append(Path(folder)), original(folder)))
    root = tmp_path / "studies"
    root.mkdir()
    atomic_write(root / "1.2" / "1.2.3" / "1.2.3.4.dcm", b"first")  # a new study and series folder
    assert synced == [root, root / "1.2", root / "1.2" / "1.2.3"]  # each new name's parent, then the file's folder
    synced.clear()
    atomic_write(root / "1.2" / "1.2.3" / "1.2.3.5.dcm", b"second")
    atomic_write(root / "1.2" / "1.2.4" / "1.2.4.1.dcm", b"third")  # a new series of the same study
    assert synced == [root / "1.2" / "1.2.3", root / "1.2", root / "1.2" / "1.2.4"]
    (root / "1.3").write_bytes(b"a file where a folder should be")
    with pytest.raises(FileExistsError):
        atomic_write(root / "1.3" / "1.3.1" / "1.3.1.1.dcm", b"refused")


@pytest.fixture
def direct_io_folder(tmp_path: Path) -> Path:
    """``tmp_path``, where its file system takes direct I/O (ext4 and XFS do; this project's machines have ext4)."""
    probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.fcntl(probe, fcntl.F_SETFL, fcntl.fcntl(probe, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    finally:
        os.close(probe)
        (tmp_path / "probe").unlink()
    return tmp_path


@pytest.mark.parametrize("size", [DIRECT_MIN, DIRECT_CHUNK, DIRECT_CHUNK + 1, 2 * DIRECT_CHUNK + DIRECT_ALIGN - 1])
def test_large_files_are_written_directly_and_exactly(direct_io_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                      size: int) -> None:
    direct, paged = _spy(monkeypatch, "_write_direct"), _spy(monkeypatch, "_write_paged")
    data = np.random.default_rng(size).integers(0, 1 << 16, size // 2 + 1, dtype=np.uint16).tobytes()[:size]
    # parts as the SCP hands them over: a short header, then views of other formats and lengths
    parts = [data[:132], memoryview(np.frombuffer(data[132:132 + 2 * 1000], np.uint16)), memoryview(data)[2132:]]
    target = direct_io_folder / "big.dcm"
    atomic_write(target, parts)
    assert target.read_bytes() == data  # size exact: the padding of the last direct write is cut off
    assert (direct, paged) == ([1], [])


@pytest.mark.parametrize("size", [DIRECT_MIN + 1, DIRECT_CHUNK, 2 * DIRECT_CHUNK + 7])
def test_an_aligned_image_is_written_from_its_own_memory(direct_io_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                         size: int) -> None:
    copied, paged = _spy(monkeypatch, "_write_copied"), _spy(monkeypatch, "_write_paged")
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    memory = AlignedMemoryPool(padded + DIRECT_ALIGN, 0).take()
    data = os.urandom(size)
    memory[:size] = data
    atomic_write(direct_io_folder / "image.dcm", AlignedImage(memoryview(memory)[:padded], size))
    assert (direct_io_folder / "image.dcm").read_bytes() == data
    assert (copied, paged) == ([], [])


def test_an_aligned_image_falls_back_to_the_page_cache_where_direct_io_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable_files, "_direct_io", lambda descriptor: False)
    memory = AlignedMemoryPool(2 * DIRECT_CHUNK, 0).take()
    data = os.urandom(DIRECT_CHUNK + 3)
    memory[:len(data)] = data
    atomic_write(tmp_path / "image.dcm", AlignedImage(memoryview(memory)[:DIRECT_CHUNK + DIRECT_ALIGN], len(data)))
    assert (tmp_path / "image.dcm").read_bytes() == data


def test_an_idle_map_keeps_at_most_its_retained_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = AlignedMemoryPool(64 * DIRECT_ALIGN, 1, retained=16 * DIRECT_ALIGN)
    memory = pool.take()
    memory[:] = b"\xff" * len(memory)
    pool.give(memory, len(memory))
    assert pool.take() is memory  # reused
    assert memory[:16 * DIRECT_ALIGN] == b"\xff" * 16 * DIRECT_ALIGN  # retained, as it was
    assert memory[16 * DIRECT_ALIGN:] == bytes(48 * DIRECT_ALIGN)  # given back to the kernel: zero pages
    pool.give(memory, 0)
    pool.give(AlignedMemoryPool(64 * DIRECT_ALIGN, 0).take(), 0)  # a second idle map is let go: one is kept
    assert pool._idle == [memory]


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


def test_a_direct_write_refused_after_the_flag_was_taken_falls_back_to_the_page_cache(
        direct_io_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems take O_DIRECT and refuse the write (overlayfs on tmpfs before Linux 6.6): the file is
    written again through the page cache, and the device is not asked again."""
    monkeypatch.setattr(durable_files, "_REFUSING_DEVICES", set())
    write, writes = os.write, []

    def refusing(descriptor: int, data: memoryview) -> int:
        writes.append(bool(fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_DIRECT))
        if writes[-1] and len(writes) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return write(descriptor, data)

    monkeypatch.setattr(os, "write", refusing)
    data = os.urandom(DIRECT_CHUNK + 5)
    atomic_write(direct_io_folder / "first", data)
    assert (direct_io_folder / "first").read_bytes() == data  # the direct chunk before the refusal is gone
    assert writes[:2] == [True, True] and not any(writes[2:])
    writes.clear()
    atomic_write(direct_io_folder / "second", data)
    assert writes and not any(writes)  # straight to the page cache
    assert {direct_io_folder.stat().st_dev} == durable_files._REFUSING_DEVICES


@pytest.mark.parametrize("kept", [POOLED_BUFFERS, 0])
def test_a_failed_direct_write_leaves_no_file_and_keeps_its_error(direct_io_folder: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, kept: int) -> None:
    """ENOSPC stays ENOSPC (the SCP answers 0xA700, the sender retries), whether the buffer goes back to the
    pool or, the pool being full, is let go while the error's traceback still holds a view of it."""
    pool = AlignedMemoryPool(DIRECT_CHUNK, kept)
    monkeypatch.setattr(durable_files, "_BUFFERS", pool)
    write, writes = os.write, []

    def filling_up(descriptor: int, data: memoryview) -> int:
        writes.append(len(data))
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(descriptor, data)

    monkeypatch.setattr(os, "write", filling_up)
    with pytest.raises(OSError) as raised:
        stage_file(direct_io_folder / "x.dcm", os.urandom(DIRECT_CHUNK + 1))
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and writes == [DIRECT_CHUNK, DIRECT_ALIGN]
    assert list(direct_io_folder.iterdir()) == []
    assert len(pool._idle) == min(kept, 1)  # given back, or let go


def test_concurrent_writers_each_get_their_own_buffer(direct_io_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct = _spy(monkeypatch, "_write_direct")
    payloads = [os.urandom(DIRECT_MIN + index * 4099) for index in range(2 * POOLED_BUFFERS)]
    start = threading.Barrier(len(payloads))

    def write(index: int) -> None:
        start.wait()
        atomic_write(direct_io_folder / f"{index}.dcm", payloads[index])

    threads = [threading.Thread(target=write, args=(index,)) for index in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [(direct_io_folder / f"{index}.dcm").read_bytes() == payload for index, payload in enumerate(payloads)] \
        == [True] * len(payloads)
    assert len(direct) == len(payloads) and len(durable_files._BUFFERS._idle) <= POOLED_BUFFERS
