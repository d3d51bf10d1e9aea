"""Mammo-FActOR localization on synthetic phantoms, one command: synthetic archive -> index -> conversion ->
FActOR training on the frozen demo encoder -> IoU@0.25, IoU@0.5 and pointing game on the test split's positive
views, against a random map and the node's zero-shot CAM heatmap (``models.heatmap``) in the same run, with the
ceiling of a perfect map at the feature-map resolution.

FActOR trains here on every view, those without a finding included (the reference: views with a finding only;
on the phantoms the views without one, the other breast, are the negatives that make it learn).

The encoder is the demo model (``training.demo.ensure_demo_model``, cached under ``--cache``; its first
training takes a few minutes more) unless ``--model`` names another version. ``--quick`` uses an untrained
encoder of the demo architecture and tiny sizes: a smoke run whose numbers mean nothing. Synthetic numbers
show that the pipeline works; they say nothing about clinical localization.

    python benchmarks/factor_localization.py                  # 240 studies, about 5 minutes on 2 CPU cores
    python benchmarks/factor_localization.py --quick --out /tmp/factor-bench
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from models import MammoClip, load_model, new_model, save_model_version
from models.factor import load_factor
from training.archive.indexer import index_archive
from training.archive.store import open_index
from training.convert import convert_archive
from training.demo import DemoRecipe, ensure_demo_model
from training.factor.data import GroundTruth
from training.factor.localization import LocalizationScore, table
from training.factor.train import FactorTrainConfig, evaluate_factor, train_factor
from training.synthetic import write_studies

STATEMENT = ("Synthetic localization numbers say that the FActOR pipeline works end to end; they say nothing "
             "about clinical localization. The model is NOT a clinical model.")
SEED = 31_000_000  # far from the demo model's training seeds: every benchmark phantom is new to the encoder
T = TypeVar("T")


def timed(stages: list[tuple[str, float]], name: str, function: Callable[[], T]) -> T:
    """Run one stage and record its wall time."""
    start = time.perf_counter()
    result = function()
    stages.append((name, time.perf_counter() - start))
    print(f"{name}: {stages[-1][1]:.1f} s", flush=True)
    return result


def encoder(args: argparse.Namespace, out: Path) -> MammoClip:
    """The frozen encoder: ``--model``, the untrained demo architecture (``--quick``) or the demo model."""
    if args.model:
        return load_model(args.model)
    if args.quick:
        torch.manual_seed(args.seed)
        return load_model(save_model_version(new_model(DemoRecipe().clip_config()), out / "untrained-model"))
    return load_model(ensure_demo_model(args.cache, progress=args.progress))


def run(args: argparse.Namespace, out: Path) -> tuple[list[LocalizationScore], list[tuple[str, float]], str]:
    """All stages; returns the scores, the stage timings and lines about the trained FActOR and the lesions."""
    stages: list[tuple[str, float]] = []
    model = timed(stages, "encoder", lambda: encoder(args, out))
    preprocess = model.config.preprocess()
    manifest = timed(stages, "generate", lambda: write_studies(
        out / "studies", args.studies, seed=SEED + args.seed, rows=args.rows, cols=args.cols, finding_prevalence=1.0,
        progress=args.progress))
    index = out / "index"
    timed(stages, "index", lambda: index_archive(out / "studies", open_index(index), None, manifest, seed=args.seed,
                                                 progress=args.progress))
    timed(stages, "convert", lambda: convert_archive(open_index(index), out / "cache", preprocess, workers=1,
                                                     progress=args.progress))
    config = FactorTrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                               top_k=args.top_k, finding_images_only=False, seed=args.seed, synthetic_data=True,
                               progress=args.progress)
    folder = timed(stages, "train FActOR", lambda: train_factor(index, model, out / "factor", config=config))
    factor = load_factor(folder, model)

    c = factor.config
    evaluation = timed(stages, "evaluate", lambda: evaluate_factor(model, factor, index, GroundTruth.read(manifest),
                                                                   config))
    sizes, tolerance, scores = evaluation.lesion_fractions, evaluation.tolerance, evaluation.scores
    median = float(np.median(sizes)) if sizes else float("nan")
    ratio = median / (1 - c.quantile)
    about = (f"FActOR: {c.channels} channel regions of {c.map_height}x{c.map_width} at {c.input_height}x"
             f"{c.input_width}, top-{c.top_k} {c.weighting} weighting, {c.quantile:.0%} quantile; pointing±"
             f"{tolerance}px: a mask pixel within half a feature-map cell of the maximum.\nLesion masks cover a median "
             f"{median:.2%} of the model input, the {c.quantile:.0%} quantile keeps {1 - c.quantile:.0%}, so a "
             f"region's box reaches an IoU of about {ratio:.2f} at best"
             + (": IoU@0.25 is out of reach on these phantoms for every method." if ratio < 0.25 else "."))
    return scores, stages, about


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=240, help="synthetic studies (all with a finding)")
    parser.add_argument("--size", default="384x240", help="phantom rows x columns (the demo model's)")
    parser.add_argument("--epochs", type=int, default=30, help="at most (early stop: 5 epochs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="encoder model version (default: the demo model)")
    parser.add_argument("--cache", type=Path, default=Path("mammo-data"), help="where the demo model is cached")
    parser.add_argument("--threads", type=int, help="torch threads (1 is often faster on a busy machine)")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--quick", action="store_true", help="24 small studies, untrained encoder: a smoke run")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    args.rows, args.cols = (int(v) for v in args.size.lower().split("x"))
    if args.quick:
        args.studies, args.rows, args.cols, args.epochs = 24, 256, 160, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.studies} studies at "
          f"{args.rows}x{args.cols}, {args.epochs} epochs", flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="factor-localization-"))
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty")
    try:
        scores, stages, about = run(args, out)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    timing = "\n".join(f"{name:<16}{seconds:>8.1f} s" for name, seconds in stages)
    print(f"\n{about}\n\n{table(scores)}\n\n{timing}\n{'total':<16}{sum(s for _, s in stages):>8.1f} s\n\n"
          f"{STATEMENT}" + ("\n--quick: untrained encoder, the numbers mean nothing." if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
