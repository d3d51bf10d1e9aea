"""The training-throughput benchmark runs (--quick) and reports positive figures (no timing assertions)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_reports_loader_and_step_throughput(tmp_path, capsys) -> None:
    main = runpy.run_path(str(ROOT / "benchmarks" / "train_throughput.py"))["main"]
    main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    figures = json.loads((tmp_path / "throughput.json").read_text())
    setup, loader, step = figures["setup"], figures["loader"], figures["step"]
    assert (setup["encoder"], setup["height"], setup["width"]) == ("efficientnet-test", 64, 48)
    assert setup["training_breasts"] >= (setup["loader_warmup"] + setup["loader_batches"]) * setup["batch_size"]
    assert loader["count"] >= setup["loader_batches"] and step["count"] == setup["steps"]
    for timing in (loader, step):
        assert timing["images"] == 2 * setup["batch_size"] * timing["count"]
        assert timing["seconds"] > 0 and timing["images_per_s"] > 0
    assert loader["warmup_seconds"] > 0 and loader["images_per_s_per_worker"] > 0
    assert figures["ratio_loader_to_step"] > 0 and figures["workers_needed"] >= 1
    assert isinstance(figures["loader_outruns_step"], bool)
    assert "ratio loader/step" in printed and "VERDICT" in printed
    assert any(line.startswith("loader (") for line in printed.splitlines())
    assert any(line.startswith("step (") for line in printed.splitlines())
