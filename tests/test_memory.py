"""The analysis processes keep freed memory mapped (``dicom_node.memory``), so that the next study does not
fault it in again."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.memory import freeze_startup_objects
from dicom_node.results.writer import ResultWriter

ROOT = Path(__file__).resolve().parents[1]
IN_A_NEW_PROCESS = """
import sys
from dicom_node.memory import retain_freed_memory
from tests.test_memory import _growth_after_free

if sys.argv[1] == "retain":
    assert retain_freed_memory()
print(_growth_after_free(None))
"""


def _resident_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _growth_after_free(_: object) -> int:
    """How much resident memory this process still holds after allocating, touching and freeing 64 MiB (run in
    a new process, or in a result-writer helper)."""
    before = _resident_kib()
    array = np.ones(64 << 20, dtype=np.uint8)
    del array
    return _resident_kib() - before


def resident_growth_kib(mode: str) -> int:
    """``_growth_after_free`` in a new Python process, ``retain``ing freed memory or not."""
    result = subprocess.run([sys.executable, "-c", IN_A_NEW_PROCESS, mode], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_memory_stays_mapped_only_when_retained() -> None:
    assert resident_growth_kib("default") < 8 * 1024  # glibc's default: a 64 MiB block is unmapped when freed
    assert resident_growth_kib("retain") > 60 * 1024  # kept for the next allocation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
@pytest.mark.parametrize("retain", [False, True])
def test_result_writer_helpers_retain_memory_when_asked(retain: bool) -> None:
    writer = ResultWriter(1, retain_memory=retain)
    try:
        growth = writer.wait([writer.submit(_growth_after_free, None)])[0]
    finally:
        writer.reset()
    assert growth > 60 * 1024 if retain else growth < 8 * 1024


def test_startup_objects_are_left_out_of_garbage_collections() -> None:
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 10_000  # every module's objects, not walked by the collector any more
    finally:
        gc.unfreeze()
