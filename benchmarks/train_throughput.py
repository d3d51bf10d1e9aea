"""Training throughput: does the pretraining data loader outrun the training step?

Measures, on one machine with one batch size and image size, (a) the images/s of the real pretraining
DataLoader (``PretrainRun``'s: memory-mapped uint8 cache, augmentation, normalization, collation, pinned memory
on CUDA; its workers) iterated to exhaustion without any model work, and (b) the images/s of the pretraining
step alone (``PretrainRun._train_step``: tokenization, forward, multi-view contrastive loss, backward, AdamW
step; AMP and the deterministic kernels as training uses them) fed one batch already in host memory, as
the loader delivers it (pinned on CUDA: the copy to the device is part of the step, as in training). Warm-up
batches and steps are not timed. The input is a synthetic archive indexed and converted with the project's
own code. A loader slower than the step means the accelerator waits for data. (The private ``PretrainRun``
methods are used on purpose: the benchmark must time training's own loader and step, not copies of them.)

    python benchmarks/train_throughput.py                # efficientnet-b0 at 512x304, batches of 8 breasts
    python benchmarks/train_throughput.py --quick        # tiny encoder at 64x48: a few seconds
    python benchmarks/train_throughput.py --device cuda --encoder efficientnet-b5 --size 1520x912 --workers 8
    python benchmarks/train_throughput.py --quick --json rows.json   # also the summary row as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models import ClipConfig
from models.efficientnet import EFFICIENTNET_SPECS
from training.archive.indexer import index_archive
from training.archive.split import DEFAULT_FRACTIONS
from training.archive.store import open_index
from training.convert import convert_archive
from training.pretrain import PretrainConfig, PretrainRun, deterministic_algorithms
from training.synthetic import write_studies

SEED = 20261129
TRAIN_BREASTS_PER_STUDY = 2 * DEFAULT_FRACTIONS["train"]  # two breasts a study, the train split's share


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration (``loader_batches`` and ``steps`` are timed, warm-ups are not)."""

    encoder: str
    height: int
    width: int
    batch_size: int
    workers: int
    loader_batches: int
    loader_warmup: int
    steps: int
    step_warmup: int


DEFAULT = Setup("efficientnet-b0", 512, 304, 8, PretrainConfig.workers, loader_batches=24, loader_warmup=3,
                steps=4, step_warmup=1)
QUICK = Setup("efficientnet-test", 64, 48, 4, PretrainConfig.workers, loader_batches=4, loader_warmup=2,
              steps=3, step_warmup=1)


@dataclass(frozen=True)
class Timing:
    """Timed batches (loader) or steps, the images they held and their wall time."""

    count: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


class FixedBatchRun(PretrainRun):
    """A pretraining run whose every step gets the same in-memory batch: the step without the loader."""

    batch: dict[str, Any]

    def _next_batch(self) -> dict[str, Any]:
        return self.batch


def build_archive(work: Path, setup: Setup, progress: bool) -> Path:
    """A synthetic archive with enough training breasts for the loader's batches, indexed and converted
    at the model's input size; returns the index folder."""
    breasts = (setup.loader_warmup + setup.loader_batches) * setup.batch_size
    studies = math.ceil(1.1 * breasts / TRAIN_BREASTS_PER_STUDY) + 2
    manifest = write_studies(work / "studies", studies, seed=SEED, rows=max(setup.height, 256),
                             cols=max(setup.width, 160), progress=progress)
    index = work / "index"
    index_archive(work / "studies", open_index(index), None, manifest, seed=SEED, progress=progress)
    clip = ClipConfig(image_encoder=setup.encoder, input_height=setup.height, input_width=setup.width)
    # one process: a spawned pool pays a torch import per worker, longer than converting a small archive
    convert_archive(open_index(index), work / "cache", clip.preprocess(), workers=1, progress=progress)
    return index


def measure_loader(run: PretrainRun, warmup: int) -> tuple[Timing, float, dict[str, Any]]:
    """Iterate the run's DataLoader to exhaustion; the timing after ``warmup`` batches, the seconds to the
    end of the warm-up (worker start included) and the first batch."""
    started = time.perf_counter()
    batches = iter(run._loader())
    first = next(batches)
    for _ in range(warmup - 1):
        next(batches)
    start = time.perf_counter()
    count = sum(1 for _ in tqdm(batches, total=len(batches) - warmup, desc="loader", unit="batch", disable=None))
    seconds = time.perf_counter() - start
    return Timing(count, 2 * run.config.batch_size * count, seconds), start - started, first


def measure_step(run: FixedBatchRun, warmup: int, steps: int) -> Timing:
    """``warmup`` untimed steps, then ``steps`` timed ones (synchronized on CUDA)."""
    sync = torch.cuda.synchronize if run.device.type == "cuda" else lambda: None
    with deterministic_algorithms(run.config.deterministic), run._train_mode():
        for _ in tqdm(range(warmup), desc="step warm-up", unit="step", disable=None):
            run._train_step()
        sync()
        start = time.perf_counter()
        for _ in tqdm(range(steps), desc="step", unit="step", disable=None):
            run._train_step()
        sync()
        seconds = time.perf_counter() - start
    return Timing(steps, 2 * run.config.batch_size * steps, seconds)


def measure(setup: Setup, work: Path, progress: bool) -> dict[str, Any]:
    """Build the archive and the run, time the loader, then the step; the figures as JSON-ready values."""
    index = build_archive(work, setup, progress)
    config = PretrainConfig(
        model=ClipConfig(image_encoder=setup.encoder, input_height=setup.height, input_width=setup.width),
        steps=setup.step_warmup + setup.steps, batch_size=setup.batch_size, workers=setup.workers, seed=SEED,
        synthetic_data=True, progress=False, checkpoint_every=setup.step_warmup + setup.steps + 1)
    run = FixedBatchRun(index, work / "run", config=config)
    available = len(run.dataset) // setup.batch_size - setup.loader_warmup
    if available < 1:
        raise SystemExit(f"{len(run.dataset)} training breasts: too few for {setup.loader_warmup} warm-up "
                         f"batches of {setup.batch_size}")
    loader, startup, run.batch = measure_loader(run, setup.loader_warmup)
    step = measure_step(run, setup.step_warmup, setup.steps)
    ratio = loader.images_per_s / step.images_per_s
    per_worker = loader.images_per_s / max(setup.workers, 1)
    return {
        "setup": {**asdict(setup), "device": run.device.type, "amp": config.amp_dtype if run.amp else "off",
                  "pin_memory": run.device.type == "cuda", "deterministic": config.deterministic,
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                  "training_breasts": len(run.dataset)},
        "loader": {**asdict(loader), "images_per_s": loader.images_per_s, "warmup_seconds": startup,
                   "images_per_s_per_worker": per_worker},
        "step": {**asdict(step), "images_per_s": step.images_per_s},
        "ratio_loader_to_step": ratio,
        "loader_outruns_step": ratio > 1,
        "workers_needed": math.ceil(step.images_per_s / per_worker),
    }


def report(figures: dict[str, Any]) -> str:
    """The printed table, the ratio and the verdict."""
    setup, loader, step = figures["setup"], figures["loader"], figures["step"]
    lines = [f"{setup['encoder']} at {setup['height']}x{setup['width']}, {setup['batch_size']} breasts "
             f"({2 * setup['batch_size']} images) per batch, {setup['device']}, torch {setup['torch']}, "
             f"{setup['threads']} threads, {setup['cpus']} CPUs",
             "", f"{'measured':<34}{'count':>7}{'images':>8}{'seconds':>9}{'images/s':>10}", "-" * 68]
    rows = [(f"loader ({setup['workers']} workers, pin {'on' if setup['pin_memory'] else 'off'})", loader),
            (f"step (AMP {setup['amp']})", step)]
    lines += [f"{name:<34}{row['count']:>7}{row['images']:>8}{row['seconds']:>9.2f}{row['images_per_s']:>10.1f}"
              for name, row in rows]
    lines += ["", f"ratio loader/step: {figures['ratio_loader_to_step']:.2f}"]
    if figures["loader_outruns_step"]:
        lines.append("VERDICT: the loader outruns the step; the step never waits for data.")
    else:
        lines.append(f"VERDICT: the loader is SLOWER than the step; training waits for data. At "
                     f"{loader['images_per_s_per_worker']:.1f} images/s per worker it needs about "
                     f"{figures['workers_needed']} workers (--workers), CPU cores permitting.")
    if setup["device"] == "cpu":
        lines.append("On CPU the loader workers and the step share the same cores: measured apart, their "
                     "rates do not add up to a training run's.")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(n) for n in text.lower().split("x"))
    return height, width


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny encoder at 64x48, a few batches and steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--batch-size", type=int, help="breasts (two images each) per batch")
    parser.add_argument("--size", type=parse_size, help="input HxW")
    parser.add_argument("--encoder", choices=sorted(EFFICIENTNET_SPECS), help="image encoder")
    parser.add_argument("--workers", type=int, help=f"DataLoader workers (training's default: {DEFAULT.workers})")
    parser.add_argument("--out", type=Path, help="folder for throughput.json (default: a new temporary one)")
    parser.add_argument("--json", type=Path, help="write the summary row (loader against step) here")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the run picks CUDA whenever it sees it
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    setup = QUICK if args.quick else DEFAULT
    changes = {"encoder": args.encoder, "batch_size": args.batch_size, "workers": args.workers}
    setup = replace(setup, **{k: v for k, v in changes.items() if v is not None})
    if args.size:
        setup = replace(setup, height=args.size[0], width=args.size[1])
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as work:
        figures = measure(setup, Path(work), progress=sys.stderr.isatty())
    out = args.out or Path(tempfile.mkdtemp(prefix="train-throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(report(figures) + f"\n\nfigures: {out / 'throughput.json'}")
    if args.json:
        setup = figures["setup"]
        args.json.write_text(json.dumps([{
            "name": f"training loader vs step ({setup['encoder']} {setup['height']}x{setup['width']}, "
                    f"{setup['device']})", "figure": round(figures["loader"]["images_per_s"], 1),
            "baseline": round(figures["step"]["images_per_s"], 2), "unit": "images/s",
            "ratio": round(figures["ratio_loader_to_step"], 1), "target": "> 1x (loader outruns step)",
            "met": figures["loader_outruns_step"]}]))


if __name__ == "__main__":
    main()
