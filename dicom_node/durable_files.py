"""Files that are either absent, the old version, or the complete new one: staged under a temporary name,
fsynced, renamed into place, their folder fsynced.

A large file is written with direct I/O (``O_DIRECT``) in ``DIRECT_CHUNK`` writes, from page-aligned memory:
the memory it was received into (``AlignedImage``), as it is, or else a pooled buffer it is copied into. The
data goes from there to the disk, without a copy into the page cache and without the kernel's later write-back
of it. For a received 6.8 MB image this took the machine's CPU per file (process and kernel write-back
together) from 4-10 ms to ~2 ms, and the process's system time from 3-20 ms (it swung with the state of the
VM's memory) to a steady 0.4-0.9 ms. A file system that refuses direct I/O (``fcntl`` answers EINVAL, or a
direct write does) gets the page-cache path, in ``WRITE_SLICE`` writes. Either way the file is fsynced before
it is returned: direct I/O skips the page cache, not the disk's volatile cache.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

WRITE_SLICE = 64 << 10  # bytes per write() through the page cache (see _write_paged)
DIRECT_MIN = 1 << 20  # files from this size are written with direct I/O
DIRECT_CHUNK = 4 << 20  # bytes per direct write, and the size of each pooled buffer
DIRECT_ALIGN = 4096  # offsets, lengths and buffer addresses of direct writes are multiples of this
POOLED_BUFFERS = 8  # idle direct-write buffers kept for reuse (a fresh one costs page faults)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux; the module names it from Python 3.13


class AlignedMemoryPool:
    """Page-aligned anonymous memory maps of ``size`` bytes (private: a forked child never shares them), taken by
    one user at a time and given back for reuse; at most ``pooled`` idle ones are kept, with at most ``retained``
    touched bytes each (the rest go back to the kernel). The others are unmapped when the last view of them goes:
    never closed here, since a failed write's traceback may still hold a view, and closing would replace its
    error with a ``BufferError``. ``reserve_only`` maps only reserve address space (``MAP_NORESERVE``): their
    pages are used once touched."""

    def __init__(self, size: int, pooled: int, retained: int | None = None, reserve_only: bool = False) -> None:
        self.size, self.pooled, self.retained = size, pooled, size if retained is None else retained
        self._flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (_MAP_NORESERVE if reserve_only else 0)
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return mmap.mmap(-1, self.size, flags=self._flags)

    def give(self, buffer: mmap.mmap, used: int) -> None:
        """Take back ``buffer``, of which the first ``used`` bytes were touched."""
        if used > self.retained:
            buffer.madvise(mmap.MADV_DONTNEED, self.retained, used - self.retained)  # both page multiples
        with self._lock:
            if len(self._idle) < self.pooled:
                self._idle.append(buffer)

    @contextmanager
    def lend(self) -> Iterator[memoryview]:
        buffer = self.take()
        try:
            yield memoryview(buffer)
        finally:
            self.give(buffer, self.size)


_BUFFERS = AlignedMemoryPool(DIRECT_CHUNK, POOLED_BUFFERS)
_REFUSING_DEVICES: set[int] = set()  # devices whose file system refused a direct write


class AlignedImage(NamedTuple):
    """A file's ``size`` bytes at the start of page-aligned ``memory``, which is a multiple of ``DIRECT_ALIGN``
    long and zero after them: written with direct I/O as it is, without a copy."""

    memory: memoryview
    size: int

    @property
    def data(self) -> memoryview:
        return self.memory[:self.size]


FileData = bytes | Sequence[bytes] | AlignedImage


def stage_file(path: Path, data: FileData) -> Path:
    """Write ``data`` (bytes, parts written one after the other, or an ``AlignedImage``) into a new fsynced file
    next to ``path``; returns it for ``publish`` (the caller removes it if it is not published)."""
    parts = data_views(data)
    make_folders(path.parent)
    staged = path.parent / f".{uuid.uuid4().hex}.part"
    try:
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            size = sum(map(len, parts))
            direct = data if isinstance(data, AlignedImage) else parts
            if not (size >= DIRECT_MIN and _direct_io(descriptor) and _written_directly(descriptor, direct, size)):
                _write_paged(descriptor, parts)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def make_folders(folder: Path, mode: int = 0o750) -> None:
    """Create ``folder`` and its missing parents, each new folder's name made durable (its parent fsynced) before
    anything is written in it: a file fsynced in a folder whose own entry is not on disk can be lost with it. A
    folder that another thread or process created meanwhile has its parent fsynced too (its creator may not have
    done so yet). An existing folder costs one ``stat``."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=mode)
        except FileExistsError:
            if not new.is_dir():
                raise
        fsync_folder(new.parent)


def data_views(data: FileData) -> list[memoryview]:
    """``data`` as the byte views written one after the other."""
    if isinstance(data, AlignedImage):
        return [data.data]
    return [memoryview(part).cast("B") for part in
            ((data,) if isinstance(data, bytes | bytearray | memoryview) else data)]


def _direct_io(descriptor: int) -> bool:
    """Switch an open file to direct I/O; False where its file system does not allow it (tmpfs before Linux
    6.6, some network and FUSE file systems) or refused a direct write before."""
    if os.fstat(descriptor).st_dev in _REFUSING_DEVICES:
        return False
    try:
        _set_direct_io(descriptor, True)
    except OSError:
        return False
    return True


def _set_direct_io(descriptor: int, direct: bool) -> None:
    flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
    fcntl.fcntl(descriptor, fcntl.F_SETFL, flags | os.O_DIRECT if direct else flags & ~os.O_DIRECT)


def _written_directly(descriptor: int, parts: Sequence[memoryview] | AlignedImage, size: int) -> bool:
    """``_write_direct``; False, with the file emptied and back on the page cache, where a direct write was
    refused (EINVAL: a file system that took the flag but not the write, as overlayfs on tmpfs before Linux
    6.6, or a short write that left the next one unaligned). Its device is not asked again."""
    try:
        _write_direct(descriptor, parts, size)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        device = os.fstat(descriptor).st_dev
        log.warning("direct I/O refused on device %#x: writing through the page cache", device)
        _REFUSING_DEVICES.add(device)
        _set_direct_io(descriptor, False)
        os.ftruncate(descriptor, 0)
        os.lseek(descriptor, 0, os.SEEK_SET)
        return False
    return True


def _write_paged(descriptor: int, parts: Sequence[memoryview]) -> None:
    """Write through the page cache in ``WRITE_SLICE`` slices: Linux (6.18, ext4) fills the page cache of a
    large write with large folios, and on these VMs a 7 MB image written at once cost 10-15 ms of system time,
    against 2-3 ms in 64 KiB slices."""
    for part in parts:
        for start in range(0, len(part), WRITE_SLICE):
            _write_all(descriptor, part[start:start + WRITE_SLICE])


def _write_direct(descriptor: int, parts: Sequence[memoryview] | AlignedImage, size: int) -> None:
    """Write an ``AlignedImage`` as it is, or copy the parts into an aligned buffer and write it out each time it
    is full; the last chunk is padded with zeros to ``DIRECT_ALIGN`` and the file then cut to ``size``."""
    if isinstance(parts, AlignedImage):
        padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        for start in range(0, padded, DIRECT_CHUNK):
            _write_all(descriptor, parts.memory[start:min(start + DIRECT_CHUNK, padded)])
    else:
        _write_copied(descriptor, parts)
    if size % DIRECT_ALIGN:
        os.ftruncate(descriptor, size)


def _write_copied(descriptor: int, parts: Sequence[memoryview]) -> None:
    with _BUFFERS.lend() as buffer:
        filled = 0
        for part in parts:
            taken = 0
            while taken < len(part):
                count = min(DIRECT_CHUNK - filled, len(part) - taken)
                buffer[filled:filled + count] = part[taken:taken + count]
                filled, taken = filled + count, taken + count
                if filled == DIRECT_CHUNK:
                    _write_all(descriptor, buffer)
                    filled = 0
        if filled:
            padded = -(-filled // DIRECT_ALIGN) * DIRECT_ALIGN
            buffer[filled:padded] = bytes(padded - filled)
            _write_all(descriptor, buffer[:padded])


def _write_all(descriptor: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.write(descriptor, data[written:])


def publish(staged: Path, path: Path) -> None:
    """Rename a staged file onto ``path`` and fsync the folder: ``path`` is then the complete new file."""
    place(staged, path)
    fsync_folder(path.parent)


def place(staged: Path, path: Path) -> None:
    """Rename a staged file onto ``path``: visible at once, durable once its folder is fsynced."""
    staged.replace(path)


def fsync_folder(folder_path: Path) -> None:
    """Make the renames and new names in ``folder_path`` durable."""
    folder = os.open(folder_path, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write(path: Path, data: FileData) -> None:
    """Write ``data`` so that ``path`` is either absent, the old file, or the complete new file."""
    staged = stage_file(path, data)
    try:
        publish(staged, path)
    finally:
        staged.unlink(missing_ok=True)  # only left when the rename failed
