"""The analysis processes keep freed memory mapped (``dicom_node.memory``), so that the next study does not
fault it in again."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.results.writer import ResultWriter

ROUND_TRIP = """
import re, sys
import numpy as np
from dicom_node.memory import retain_freed_memory

def resident_kib() -> int:
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

if sys.argv[1] == "retain":
    assert retain_freed_memory()
before = resident_kib()
array = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, every page touched
del array
print(resident_kib() - before)
"""


def resident_growth_kib(mode: str) -> int:
    """How much resident memory a process still holds after allocating, touching and freeing 64 MiB."""
    result = subprocess.run([sys.executable, "-c", ROUND_TRIP, mode], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_memory_stays_mapped_only_when_retained() -> None:
    assert resident_growth_kib("default") < 8 * 1024  # glibc's default: a 64 MiB block is unmapped when freed
    assert resident_growth_kib("retain") > 60 * 1024  # kept for the next allocation


def _resident_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _growth_after_free(_: object) -> int:
    """Run in a result-writer helper: the resident growth after allocating and freeing 64 MiB."""
    before = _resident_kib()
    array = np.ones(64 << 20, dtype=np.uint8)
    del array
    return _resident_kib() - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
@pytest.mark.parametrize("retain", [False, True])
def test_result_writer_helpers_retain_memory_when_asked(retain: bool) -> None:
    writer = ResultWriter(1, retain_memory=retain)
    try:
        growth = writer.wait([writer.submit(_growth_after_free, None)])[0]
    finally:
        writer.reset()
    assert growth > 60 * 1024 if retain else growth < 8 * 1024
