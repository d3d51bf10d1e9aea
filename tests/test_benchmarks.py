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


def test_train_synthetic_quick_runs_every_stage(tmp_path) -> None:
    """The smoke size (--quick) does not check the AUC targets; the full run does (see the README)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_synthetic.py"), "--quick", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = [line.split()[0] for line in result.stdout.splitlines() if line.split()[:1] and
              line.split()[0] in ("generate", "index", "convert", "pretrain", "total")]
    assert stages == ["generate", "index", "convert", "pretrain", "total"]
    assert "NOT a clinical model" in result.stdout
    assert (tmp_path / "run").exists()
