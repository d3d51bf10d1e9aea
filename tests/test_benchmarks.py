"""The benchmarks still run (tiny configurations, no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent


def test_ingest_benchmark_prints_the_table_for_verified_runs() -> None:
    require_tool("/usr/bin/storescu")
    require_tool("/usr/bin/storescp")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ingest.py"), "--studies", "2", "--size", "256x160",
         "--associations", "1", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("8 MG instances")
    header = next(index for index, line in enumerate(lines) if line.startswith("receiver"))
    assert header > 0 and "node/storescp" in lines[header]
    rows = [line.split() for line in lines[header + 1:header + 5]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("storescp", "1", "8"), ("node", "1", "8"), ("storescp", "2", "8"), ("node", "2", "8")]
    assert rows[1][-1].endswith("x") and rows[3][-1].endswith("x")
    assert any(line.startswith("every run verified") for line in lines)
