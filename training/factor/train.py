"""Train Mammo-FActOR projectors on the archive index with the image encoder frozen.

As the reference's notebook: views with a finding (any attribute positive; ``finding_images_only``), AdamW at
lr 1e-4, batch 8, up to 20 epochs, AMP on CUDA, early stop after 5 epochs without a lower validation loss,
the epoch with the lowest validation loss kept. The encoder's feature maps are computed once and kept in
memory (float16) when they fit in ``feature_cache_mb``, else recomputed for every batch. ``run_factor`` then
scores localization (IoU@0.25/0.5, pointing game) on the test split's positive views against ground-truth lesions
(``GroundTruth``), beside a random map and the zero-shot CAM.

    mammo-node train factor INDEX MODEL OUT [--masks manifest.csv | --boxes CSV] [--all-images] [--epochs 20]
    python -m training.factor.train INDEX MODEL OUT ...      (the same program)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models import MammoClip, load_model
from models.errors import ConfigurationError
from models.factor import Factor, build_factor, factor_loss, feature_map_shape, load_factor, save_factor
from models.preprocess import PreprocessConfig
from training.demo import NOT_CLINICAL
from training.factor.data import FactorRecord, GroundTruth, load_factor_records, positive_truths
from training.factor.localization import (
    LocalizationScore,
    cam_method,
    evaluate_localization,
    factor_method,
    random_method,
    table,
)
from training.finetune import load_batch
from training.pretrain import RESEARCH_ONLY

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
NO_GROUND_TRUTH = ("not scored: no ground truth; give --masks manifest.csv (synthetic) or --boxes CSV (VinDr-style) "
                   "for IoU@0.25/0.5 and the pointing game")
FeatureSource = Callable[[Sequence[int]], Tensor]  # record positions -> feature maps (B, C, h, w)


@dataclass(frozen=True)
class FactorTrainConfig:
    """Everything that decides a FActOR training run (defaults: the reference's)."""

    attributes: tuple[str, ...] = ("mass", "calcification")
    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 5
    top_k: int = 3
    quantile: float = 0.95
    weighting: str = "softmax"
    finding_images_only: bool = True
    feature_cache_mb: int = 2048
    seed: int = 0
    synthetic_data: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if self.epochs < 1 or self.batch_size < 2 or self.patience < 1:
            raise ConfigurationError("epochs and patience must be at least 1 and batch_size at least 2")


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """float16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


def encode(model: MammoClip, records: Sequence[FactorRecord], preprocess: PreprocessConfig) -> Tensor:
    """The frozen encoder's feature maps of ``records`` (float32, on the model's device)."""
    images = load_batch(records, preprocess).to(model.device)
    with torch.no_grad(), autocast(model.device):  # not inference_mode: streamed maps enter autograd
        return model.image_feature_map(images).float()


def feature_source(model: MammoClip, records: Sequence[FactorRecord], preprocess: PreprocessConfig,
                   config: FactorTrainConfig, description: str) -> FeatureSource:
    """Cached feature maps when they fit in ``feature_cache_mb`` (float16 on the CPU), else encoded per batch."""
    channels, height, width = feature_map_shape(model)
    if len(records) * channels * height * width * 2 > config.feature_cache_mb * 2**20:
        log.info("%s: feature maps over %d MiB, encoding every batch", description, config.feature_cache_mb)
        return lambda positions: encode(model, [records[i] for i in positions], preprocess)
    chunks = [encode(model, records[start:start + 32], preprocess).half().cpu()
              for start in tqdm(range(0, len(records), 32), desc=description, unit="batch",
                                disable=not config.progress)]
    cached = torch.cat(chunks) if chunks else torch.empty(0, channels, height, width, dtype=torch.float16)
    return lambda positions: cached[list(positions)]


def labels_of(records: Sequence[FactorRecord]) -> Tensor:
    """0/1 labels (N, K)."""
    return torch.tensor([record.labels for record in records], dtype=torch.float32).reshape(len(records), -1)


def batch_loss(factor: Factor, features: Tensor, labels: Tensor, device: torch.device) -> Tensor:
    with autocast(device):
        scores = factor(features.to(device))
    return factor_loss(scores, labels.to(device), factor.config.temperature)


def validation_loss(factor: Factor, features: FeatureSource, labels: Tensor, batch_size: int,
                    device: torch.device) -> float:
    """Mean FActOR loss over fixed consecutive batches."""
    factor.eval()
    losses = []
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            positions = list(range(start, min(start + batch_size, len(labels))))
            losses.append(batch_loss(factor, features(positions), labels[positions], device).item())
    return float(np.mean(losses)) if losses else float("nan")


def fit_factor(factor: Factor, train: FeatureSource, train_labels: Tensor, validation: FeatureSource,
               validation_labels: Tensor, config: FactorTrainConfig, device: torch.device) -> list[dict[str, float]]:
    """Train the projectors (AdamW, AMP on CUDA), stop early on the validation loss and keep the best epoch's
    weights in ``factor``; returns the losses per epoch (numbered from 1)."""
    factor.to(device)
    optimizer = torch.optim.AdamW(factor.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed)
    best, best_state, waited, history = float("inf"), copy.deepcopy(factor.state_dict()), 0, []
    bar = tqdm(range(config.epochs), desc="FActOR epochs", disable=not config.progress)
    for epoch in bar:
        factor.train()
        order = torch.randperm(len(train_labels), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), config.batch_size):
            positions = order[start:start + config.batch_size]
            loss = batch_loss(factor, train(positions), train_labels[positions], device)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        current = validation_loss(factor, validation, validation_labels, config.batch_size, device)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "validation_loss": current})
        bar.set_postfix(train=f"{history[-1]['train_loss']:.3f}", validation=f"{current:.3f}")
        if current < best:
            best, best_state, waited = current, copy.deepcopy(factor.state_dict()), 0
        else:
            waited += 1
            if waited >= config.patience:
                break
    factor.load_state_dict(best_state)
    return history


def split_records(index_location: str | Path, split: str, preprocess: PreprocessConfig,
                  config: FactorTrainConfig) -> list[FactorRecord]:
    """The split's records; only views with a finding when ``finding_images_only`` (train and validation)."""
    records, left_out = load_factor_records(index_location, split, preprocess, config.attributes)
    if left_out:
        log.info("%s: left out %s", split, dict(left_out))
    return [r for r in records if any(r.labels)] if config.finding_images_only else records


def counts(records: Sequence[FactorRecord], attributes: Sequence[str]) -> dict[str, int]:
    labels = labels_of(records)
    return {"images": len(records), **{a: int(labels[:, k].sum()) for k, a in enumerate(attributes)}}


def train_factor(index_location: str | Path, model: MammoClip | Path | str, out_folder: Path | str, *,
                 config: FactorTrainConfig = FactorTrainConfig()) -> Path:
    """Train a FActOR for ``model`` on the index's train split (validation split for early stopping) and
    write the FActOR folder (``factor.safetensors``, ``factor.json``), ``history.json`` and ``card.json``."""
    out = Path(out_folder)
    if (out / "factor.json").exists():
        raise ConfigurationError(f"{out} already holds a FActOR: choose another folder")
    torch.manual_seed(config.seed)
    model = load_model(model) if isinstance(model, Path | str) else model.eval()
    model.requires_grad_(False)
    preprocess = model.config.preprocess()
    data = {split: split_records(index_location, split, preprocess, config) for split in ("train", "validation")}
    if not data["train"] or not data["validation"]:
        raise ConfigurationError(f"FActOR needs train and validation images: the index has {len(data['train'])} and "
                                 f"{len(data['validation'])} (converted at {preprocess.height}x{preprocess.width}"
                                 + (", with a finding" if config.finding_images_only else "") + ")")
    train_labels, validation_labels = labels_of(data["train"]), labels_of(data["validation"])
    missing = [a for k, a in enumerate(config.attributes) if not train_labels[:, k].any()]
    if missing:
        raise ConfigurationError(f"FActOR needs positives of every attribute in train (none for {missing})")
    factor = build_factor(model, config.attributes, top_k=config.top_k, quantile=config.quantile,
                          weighting=config.weighting)
    history = fit_factor(factor, feature_source(model, data["train"], preprocess, config, "features (train)"),
                         train_labels,
                         feature_source(model, data["validation"], preprocess, config, "features (validation)"),
                         validation_labels, config, model.device)
    save_factor(factor.cpu(), out)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    best = min(history, key=lambda h: h["validation_loss"])
    card = {"name": "mammo-factor", "intended_use": NOT_CLINICAL if config.synthetic_data else RESEARCH_ONLY,
            "clinical_use": False, "base_model": getattr(model, "card", {}).get("name", "model"),
            "base_model_sha256": factor.config.base_model_sha256, "config": asdict(config),
            "data": {split: counts(records, config.attributes) for split, records in data.items()},
            "best_epoch": best["epoch"], "best_validation_loss": best["validation_loss"]}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    log.info("FActOR written to %s (best epoch %d, validation loss %.4f)", out, best["epoch"],
             best["validation_loss"])
    return out


# ------------------------------------------------------------------------------------ localization and runs


@dataclass(frozen=True)
class FactorEvaluation:
    """Localization on one split's positive views with ground truth: a row per attribute and method (FActOR, a
    random map, the zero-shot CAM, the ceiling of a perfect map at the feature-map size), the views scored, the
    pointing tolerance in pixels and each lesion's share of the model input."""

    split: str
    scores: list[LocalizationScore]
    images: int
    tolerance: int
    lesion_fractions: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN, for an attribute without views, becomes None)."""
        rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(s).items()}
                for s in self.scores]
        return {"split": self.split, "images": self.images, "pointing_tolerance_px": self.tolerance, "scores": rows}


def evaluate_factor(model: MammoClip, factor: Factor, index_location: str | Path, truth: GroundTruth,
                    config: FactorTrainConfig, split: str = "test") -> FactorEvaluation:
    """IoU@0.25/0.5 and the pointing game (strict, and within half a feature-map cell) of ``factor``'s maps on
    the split's views positive for an attribute that ``truth`` has lesions of, beside the baselines."""
    preprocess, c = model.config.preprocess(), factor.config
    records, _ = load_factor_records(index_location, split, preprocess, c.attributes)
    positives, truths = positive_truths(records, c.attributes, truth, preprocess)
    tolerance = c.input_height // c.map_height // 2
    methods = {"FActOR": factor_method(factor), "random map": random_method(factor, config.seed),
               "zero-shot CAM": cam_method(model, factor)}
    features = feature_source(model, positives, preprocess, config, f"features ({split})")
    scores = evaluate_localization(methods, features, truths, c.attributes, c.quantile, tolerance=tolerance,
                                   ceiling=(c.map_height, c.map_width))
    fractions = [float(mask.mean()) for found in truths for masks in found.values() for mask in masks]
    return FactorEvaluation(split, scores, len(positives), tolerance, fractions)


@dataclass(frozen=True)
class FactorRun:
    """A finished run: the FActOR folder, the loss per epoch, the localization (None: no ground truth)."""

    folder: Path
    history: list[dict[str, float]]
    evaluation: FactorEvaluation | None
    synthetic: bool


def run_factor(index_location: str | Path, model: MammoClip, out_folder: Path | str, *,
               config: FactorTrainConfig = FactorTrainConfig(), truth: GroundTruth | None = None) -> FactorRun:
    """``train_factor``, then localization on the test split when ``truth`` is given; adds ``metrics.json``
    (best epoch, localization rows or why there are none) to the FActOR folder."""
    folder = train_factor(index_location, model, out_folder, config=config)
    history = json.loads((folder / HISTORY_FILE).read_text())
    evaluation = None
    if truth is not None:
        evaluation = evaluate_factor(model, load_factor(folder, model, device=model.device), index_location,
                                     truth, config)
    best = min(history, key=lambda h: h["validation_loss"])
    metrics = {"best_epoch": best["epoch"], "best_validation_loss": best["validation_loss"],
               "localization": evaluation.to_dict() if evaluation else NO_GROUND_TRUTH}
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return FactorRun(folder, history, evaluation, config.synthetic_data)


def summary_lines(run: FactorRun, base: Path | str | None = None) -> list[str]:
    """What a run printed at its end: the best epoch, the localization table, where it is, how to serve it."""
    best = min(run.history, key=lambda h: h["validation_loss"])
    lines = [f"best epoch {best['epoch']} of {len(run.history)}: validation loss {best['validation_loss']:.4f}"]
    if run.evaluation is None:
        lines.append(f"localization {NO_GROUND_TRUTH}")
    else:
        e = run.evaluation
        lines += [f"localization on the {e.split} split, {e.images} positive views with ground truth (pointing±"
                  f"{e.tolerance}px: a lesion pixel within half a feature-map cell of the map's maximum):",
                  table(e.scores)]
    lines += [f"FActOR written to {run.folder} (factor.safetensors, factor.json, card.json, history.json, "
              f"{METRICS_FILE})", f"serve it: mammo-node model register {base or 'MODEL'} --factor {run.folder}"]
    if run.synthetic:
        lines.append("trained on synthetic phantoms: NOT a clinical model")
    return lines


DESCRIPTION = """\
Train Mammo-FActOR projectors (one per attribute) on a frozen Mammo-CLIP encoder from the site's indexed archive,
and score where their maps point: IoU@0.25, IoU@0.5 and the pointing game per attribute.

data:
  INDEX  an archive index (`mammo-node archive index`, then `mammo-node archive convert --size HxW` at MODEL's
         input size) with mass/calcification labels. Trains on its train split (views with a finding, as the
         reference; --all-images adds the others), stops early on the validation split, scores the test split.
  MODEL  the model version folder, or reference .tar with --text-encoder, whose encoder stays frozen.
  localization ground truth, one of (optional: without it nothing is scored):
    --masks manifest.csv  synthetic phantoms (`mammo-node synth`): the finding mask PNGs
    --boxes CSV           a VinDr-style box CSV (image_id = the DICOM file's name; boxes in source pixels)

writes OUT: the FActOR folder (factor.safetensors, factor.json), history.json, card.json and metrics.json
(localization per attribute and method, beside a random map, the zero-shot CAM and the ceiling of a perfect map
at the feature-map size). Serve it with the same MODEL (its weights are checked when registering):
  mammo-node model register MODEL --name site-v1-factor --factor OUT && mammo-node model activate site-v1-factor

A FActOR trained on synthetic phantoms is NOT a clinical model: its numbers only show that the pipeline works."""

EXAMPLES = """\
examples:
  mammo-node synth phantoms --studies 240 --size 384x240 --finding-prevalence 1
  mammo-node archive index phantoms --labels phantoms/manifest.csv && mammo-node archive convert --size 256x160
  mammo-node train factor mammo-data/archive mammo-data/demo-model runs/factor-1 --masks phantoms/manifest.csv \\
      --all-images --synthetic-data
  mammo-node train factor mammo-data/archive b5.tar runs/factor-b5 --text-encoder BERT_DIR \\
      --boxes finding_annotations.csv"""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", help="archive index folder or database URL (converted at the model's size)")
    parser.add_argument("model", type=Path, help="model version folder or reference .tar")
    parser.add_argument("out", type=Path, help="new folder for the FActOR")
    truth = parser.add_mutually_exclusive_group()
    truth.add_argument("--masks", type=Path, metavar="CSV",
                       help="synthetic manifest.csv: score localization on its mask PNGs")
    truth.add_argument("--boxes", type=Path, metavar="CSV", help="VinDr-style box CSV: score localization on its boxes")
    parser.add_argument("--text-encoder", type=Path, metavar="DIR",
                        help="local text-encoder directory, for a reference .tar")
    parser.add_argument("--attributes", nargs="+", default=["mass", "calcification"],
                        help="mass, calcification, dense (dense has no ground truth: trained, not scored)")
    parser.add_argument("--epochs", type=int, default=20, help="at most (early stop after 5 without improvement)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--top-k", type=int, default=3, help="channels combined into a map")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--all-images", action="store_true",
                        help="train on views without a finding too (the reference: views with a finding only)")
    parser.add_argument("--synthetic-data", action="store_true", help="the index holds synthetic phantoms")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m training.factor.train") -> None:
    """Train, score and print the summary (``mammo-node train factor`` runs this too)."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = FactorTrainConfig(attributes=tuple(args.attributes), epochs=args.epochs, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, top_k=args.top_k,
                               finding_images_only=not args.all_images, seed=args.seed,
                               synthetic_data=args.synthetic_data, progress=not args.no_progress)
    truth = GroundTruth.read(args.masks, args.boxes) if args.masks or args.boxes else None
    model = load_model(args.model, text_encoder=args.text_encoder, device=args.device)
    run = run_factor(args.index, model, args.out, config=config, truth=truth)
    print("\n".join(summary_lines(run, args.model)))


if __name__ == "__main__":
    main()
