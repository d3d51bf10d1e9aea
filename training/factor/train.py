"""Train Mammo-FActOR projectors on the archive index with the image encoder frozen.

As the reference's notebook: views with a finding (any attribute positive; ``finding_images_only``), AdamW at
lr 1e-4, batch 8, up to 20 epochs, AMP on CUDA, early stop after 5 epochs without a lower validation loss,
the epoch with the lowest validation loss kept. The encoder's feature maps are computed once and kept in
memory (float16) when they fit in ``feature_cache_mb``, else recomputed for every batch.

    python -m training.factor.train INDEX MODEL OUT [--attributes mass calcification] [--epochs 20] [--all-images]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
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
from models.factor import Factor, build_factor, factor_loss, feature_map_shape, save_factor
from models.preprocess import PreprocessConfig
from training.demo import NOT_CLINICAL
from training.factor.data import FactorRecord, load_factor_records
from training.finetune import load_batch
from training.pretrain import RESEARCH_ONLY

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
HISTORY_FILE = "history.json"
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
    weights in ``factor``; returns the loss per epoch."""
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
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_loss": current})
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
    train_labels, validation_labels = labels_of(data["train"]), labels_of(data["validation"])
    missing = [a for k, a in enumerate(config.attributes) if not train_labels[:, k].any()]
    if missing or not data["validation"]:
        raise ConfigurationError(f"FActOR needs positives of every attribute in train (none for {missing}) and "
                                 "validation images")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train Mammo-FActOR projectors (frozen encoder).")
    parser.add_argument("index", help="archive index folder or database URL (converted at the model's size)")
    parser.add_argument("model", type=Path, help="model version folder or reference .tar")
    parser.add_argument("out", type=Path, help="new folder for the FActOR")
    parser.add_argument("--attributes", nargs="+", default=["mass", "calcification"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--all-images", action="store_true",
                        help="train on views without a finding too (the reference: views with a finding only)")
    parser.add_argument("--synthetic-data", action="store_true", help="the index holds synthetic phantoms")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = FactorTrainConfig(attributes=tuple(args.attributes), epochs=args.epochs, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, top_k=args.top_k,
                               finding_images_only=not args.all_images, seed=args.seed,
                               synthetic_data=args.synthetic_data)
    print(train_factor(args.index, load_model(args.model, device=args.device), args.out, config=config))


if __name__ == "__main__":
    main()
