"""The benchmarks still run (tiny configurations, no timing assertions)."""

from __future__ import annotations

import json
import os
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
    rows = [line.split() for line in lines[header + 1:header + 7]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("storescp", "1", "8"), ("disk", "1", "8"), ("node", "1", "8"),
        ("storescp", "2", "8"), ("disk", "2", "8"), ("node", "2", "8")]
    assert all(rows[index][-1].endswith("x") for index in (1, 2, 4, 5))
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


def _quick(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A training benchmark at its smoke size, on one torch thread (faster than two contending on a busy VM)."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_multiview_synthetic_quick_prints_the_fold_aucs(tmp_path) -> None:
    """Random-weight CLIP: the AUCs are not checked, only that every stage ran and the folds were scored."""
    result = _quick("multiview_synthetic.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert summary["studies"] == 20 and len(summary["fold_aucs"]) == 2 and "auc_mean" in summary
    assert set(summary["seconds"]) == {"synthetic studies", "index and conversion", "cross-validation"}
    assert "NOT a clinical model" in result.stdout
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"metrics.json", "fold-1", "fold-2"}


def test_detector_synthetic_quick_prints_ap_per_class(tmp_path) -> None:
    """Untrained and trained detector rows with AP per class and mAP (one epoch: the values are not checked)."""
    result = _quick("detector_synthetic.py", "--no-progress", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["detector", "mass", "calcification", "mAP@0.5"]
    assert [line[:24].strip() for line in lines[1:4]] == [
        "untrained (score >= 0)", "trained (score >= 0)", "trained (score >= 0.2)"]
    assert "NOT a clinical model" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_images"] == 16 and summary["test_images"] == 8


def _run_all_module():
    """benchmarks/run_all.py as a module (benchmarks/ is not a package)."""
    import runpy

    return runpy.run_path(str(ROOT / "benchmarks" / "run_all.py"), run_name="run_all")


def test_run_all_table_shows_a_failed_benchmark_and_returns_non_zero() -> None:
    module = _run_all_module()
    outcome = module["Outcome"]
    good = outcome("inference", 0, 12.0, [{"name": "inference B2", "figure": 1.5, "baseline": 4.0, "unit": "s/study",
                                           "ratio": 2.67, "target": ">= 2x", "met": True}])
    missed = outcome("ingest", 0, 30.0, [{"name": "ingest 8", "figure": 20.0, "baseline": 120.0, "unit": "inst/s",
                                          "ratio": 0.17, "target": ">= 0.5x", "met": False}])
    delta = outcome("inference", 0, 12.0, [{"name": "max |delta|", "figure": 4.5e-08, "baseline": None, "unit": "",
                                            "ratio": None, "target": "< 1e-4", "met": True}])
    smoke = outcome("detector_synthetic", 0, 40.0, expects_rows=False)
    text, status = module["table"]([good, missed, delta, smoke])
    assert status == 0  # a target not met is a figure, not a failure
    assert "| inference B2 | 1.5 s/study | 4 s/study | 2.67x | >= 2x | met |" in text
    assert "| ingest 8 | 20 inst/s | 120 inst/s | 0.17x | >= 0.5x | NOT met |" in text
    assert "| max \\|delta\\| | 4.5e-08 | - | - | < 1e-4 | met |" in text  # a | in a cell is escaped
    assert "| detector_synthetic | ran in 40 s" in text

    crashed = outcome("latency", 1, 5.0, tail="Traceback ...")
    silent = outcome("triage_query", 0, 5.0)  # exit 0 but no summary rows
    hung = outcome("scaling", None, 3600.0)
    text, status = module["table"]([good, crashed, silent, hung])
    assert status == 1
    assert "| latency | FAILED (exit 1) | - | - | - | FAILED |" in text
    assert "| triage_query | FAILED (no summary rows) |" in text
    assert "| scaling | FAILED (timed out) |" in text
    assert "inference B2" in text  # the others are still reported


def test_run_all_runs_benchmarks_as_subprocesses_and_keeps_going_after_a_failure(tmp_path) -> None:
    """Two cheap benchmarks made to fail (an unknown --db-url scheme): the second still runs after the first."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only", "drift_query", "triage_query",
         "--db-url", "nosuchdb://nowhere/none", "--logs", str(tmp_path)], capture_output=True, text=True,
        timeout=300, cwd=ROOT)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| triage_query | FAILED (exit 1) |" in result.stdout
    assert "| drift_query | FAILED (exit 1) |" in result.stdout
    assert (tmp_path / "summary.md").exists() and (tmp_path / "drift_query.log").exists()
    assert "machine: " in (tmp_path / "summary.md").read_text()
