"""Acceptance test of the training subsystem, one command: synthetic archive -> index -> conversion -> short
Mammo-CLIP pretraining from random weights -> linear probes for mass and malignancy on the held-out test split.

The encoder is the demo's (``efficientnet-demo`` at 256x160, text tower frozen). Exits non-zero when the
breast-level test AUCs miss the targets (mass >= 0.90, malignancy >= 0.80; ``--quick`` only smoke-tests).
Synthetic AUCs show that the pipeline works, not that a model is clinical.

    python benchmarks/train_synthetic.py                 # 400 studies, about 6 minutes on 2 CPU cores
    python benchmarks/train_synthetic.py --quick --out /tmp/train-bench
    python benchmarks/train_synthetic.py --json rows.json   # also the summary rows (AUC per target) as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from training.archive.indexer import index_archive
from training.archive.store import open_index
from training.convert import convert_archive
from training.demo import DemoRecipe
from training.finetune import FinetuneConfig, finetune
from training.pretrain import PretrainConfig, pretrain
from training.synthetic import write_studies

TARGETS = {"mass": 0.90, "malignancy": 0.80}
STATEMENT = ("Synthetic AUCs say that the training pipeline works end to end; they say nothing about clinical "
             "performance. The model is NOT a clinical model.")
T = TypeVar("T")


@dataclass
class Stage:
    name: str
    seconds: float
    images: int


def timed(stages: list[Stage], name: str, images: int, function: Callable[[], T]) -> T:
    """Run one stage, record its wall time and image count."""
    start = time.perf_counter()
    result = function()
    stages.append(Stage(name, time.perf_counter() - start, images))
    print(f"{name}: {stages[-1].seconds:.1f} s", flush=True)
    return result


def run(out: Path, studies: int, steps: int, batch_size: int, seed: int, progress: bool,
        mode: str = "linear") -> tuple[dict[str, dict[str, object]], list[Stage]]:
    """All stages; returns the breast-level test metrics per target and the stage timings."""
    recipe = DemoRecipe()
    clip = recipe.clip_config()
    stages: list[Stage] = []
    manifest = timed(stages, "generate", 4 * studies, lambda: write_studies(
        out / "studies", studies, seed=seed, rows=recipe.rows, cols=recipe.cols, progress=progress))
    index = out / "index"
    timed(stages, "index", 4 * studies, lambda: index_archive(out / "studies", open_index(index), None, manifest,
                                                              seed=seed, progress=progress))
    timed(stages, "convert", 4 * studies, lambda: convert_archive(open_index(index), out / "cache", clip.preprocess(),
                                                                  workers=2, progress=progress))
    config = PretrainConfig(model=clip, steps=steps, batch_size=batch_size, learning_rate=2e-3, warmup_fraction=0.1,
                            checkpoint_every=10 * steps, workers=1, seed=seed, synthetic_data=True,
                            progress=progress)
    model = timed(stages, "pretrain", 2 * steps * batch_size,
                  lambda: pretrain(index, out / "pretrain", config=config))
    results = {}
    for target in TARGETS:
        probe = FinetuneConfig(target=target, mode=mode, seed=seed, synthetic_data=True, progress=progress)
        folder = timed(stages, f"{mode} {target}", 4 * studies, lambda probe=probe: finetune(
            index, model, out / f"probe-{probe.target}", config=probe))
        results[target] = json.loads((folder / "metrics.json").read_text())["test"]["breast"]
    return results, stages


def table(results: dict[str, dict[str, object]], stages: list[Stage]) -> str:
    """The printed summary: held-out metrics per target, then time and throughput per stage."""
    lines = [f"{'target':<12}{'test AUC (breast)':<20}{'95% CI':<18}{'sens @ 90% spec':<17}target",
             "-" * 72]
    for target, metrics in results.items():
        ci = metrics["auc_ci"] or (float("nan"), float("nan"))
        point = next(p for p in metrics["operating_points"] if p["target_specificity"] == 0.9)
        lines.append(f"{target:<12}{metrics['auc']:<20.3f}{f'{ci[0]:.3f}-{ci[1]:.3f}':<18}"
                     f"{point['sensitivity']:<17.3f}>= {TARGETS[target]:.2f}")
    lines += ["", f"{'stage':<20}{'wall s':>10}{'images':>10}{'images/s':>10}", "-" * 50]
    for stage in stages:
        lines.append(f"{stage.name:<20}{stage.seconds:>10.1f}{stage.images:>10}{stage.images / stage.seconds:>10.1f}")
    lines.append(f"{'total':<20}{sum(s.seconds for s in stages):>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=400, help="synthetic studies (>= 200 for the acceptance run)")
    parser.add_argument("--steps", type=int, default=240, help="pretraining steps")
    parser.add_argument("--batch-size", type=int, default=16, help="pretraining breasts per step")
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--quick", action="store_true", help="40 studies, 8 steps: a smoke run, no targets")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--mode", choices=("linear", "adapter", "full"), default="linear",
                        help="fine-tuning mode of the heads (the acceptance targets are set for linear probes)")
    parser.add_argument("--json", type=Path, help="write the summary rows (test AUC per target) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.steps, args.batch_size = 40, 8, 16
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.studies} studies, "
          f"{args.steps} pretraining steps of {args.batch_size} breasts, {args.mode} heads", flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="train-synthetic-"))
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty")
    try:
        results, stages = run(out, args.studies, args.steps, args.batch_size, args.seed, args.progress, args.mode)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    print("\n" + table(results, stages) + "\n\n" + STATEMENT)
    missed = [t for t, target in TARGETS.items() if results[t]["auc"] < target]
    if args.json:
        args.json.write_text(json.dumps([{
            "name": f"synthetic training: {target} test AUC (breast, {args.studies} studies)",
            "figure": round(results[target]["auc"], 3), "baseline": None, "unit": "AUC", "ratio": None,
            "target": f">= {TARGETS[target]:.2f}", "met": None if args.quick else target not in missed}
            for target in TARGETS]))
    if missed and not args.quick:
        print(f"FAILED: {', '.join(missed)} below target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
