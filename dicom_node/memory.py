"""Keep freed memory mapped in the analysis and Storage SCP processes, so that each study (each received
instance) does not fault its pages in again.

A 4096 x 3328 view passes through arrays of 13-54 MB. glibc serves each allocation over 32 MB (and, after a
trim, smaller ones) with fresh pages from the kernel and hands them back when freed, so every study faults
hundreds of MB in again: ~2 us a page on a VM, and with transparent huge pages a compaction stall now and then.
That was most of the preprocessing and SEG encoding time at clinical size (``docs/performance.md``). With
``mallopt`` no allocation is mmapped and the heap is never trimmed: after the first study the pages stay, and the
process's resident size stays at its peak (1.7 GB for the worker at 4096 x 3328, flat over 30 studies). The SCP
receives each 7 MB mammogram into fresh buffers in the same way (its message buffer grows 52 times per instance):
kept, its system time per instance fell from 11 to 6 ms.
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # bytes free at the top of the heap before it is trimmed: the largest value it takes


def retain_freed_memory() -> bool:
    """Have glibc keep what this process frees for its next allocations; False (logged) where the C library is
    not glibc or refuses a setting."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("freed memory is returned to the OS: this C library has no mallopt")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1:
        return True
    log.warning("the C library refused the malloc settings: freed memory may be returned to the OS")
    return False


def freeze_startup_objects() -> None:
    """Leave the objects a server process holds once it has started (its modules, ~95,000 objects for the
    Storage SCP) out of every later garbage collection: a full collection walked them all (~29 ms) several times
    a second under load, 7% of the machine's CPU during an 8-association ingest. Call it once, when started and
    before serving (what is garbage by then is collected first, not kept for ever)."""
    gc.collect()
    gc.freeze()
