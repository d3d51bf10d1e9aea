"""The demo model: a small Mammo-CLIP trained on synthetic phantoms, cached under the data directory.

The demo must never show scores from random weights, so the first ``mammo-node demo`` trains this model
(a few minutes on 2 CPU cores) and later runs reuse it. It is trained on synthetic data only and is NOT a
clinical model; its card says so.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models import ClipConfig, MammoClip, new_model, save_model_version
from models.checkpoints import read_card
from models.preprocess import dicom_to_uint8, normalize
from models.zero_shot import CALIBRATION_KEY, ZeroShotClassifier
from training.batch_norm import batch_norm_momentum
from training.calibration import fit_calibration
from training.contrastive import soft_clip_loss
from training.evaluation import embed_batched, zero_shot_metrics
from training.label_text import breast_text, label_key
from training.memory_format import channels_last
from training.plots import plot_training_curve
from training.synthetic import write_studies

log = logging.getLogger(__name__)

NOT_CLINICAL = "Trained on synthetic phantoms only. NOT a clinical model: research and software testing only."
RECIPE_VERSION = 3  # 3: zero-shot calibration fitted on half of the held-out patients


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo model; a cached model is reused only when its recipe matches."""

    studies: int = 300
    rows: int = 384
    cols: int = 240
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 20261123
    holdout_fraction: float = 0.2
    recipe_version: int = RECIPE_VERSION

    def clip_config(self) -> ClipConfig:
        return ClipConfig(image_encoder="efficientnet-demo", input_height=256, input_width=160)


@dataclass
class Sample:
    """One preprocessed image with its breast labels."""

    image: np.ndarray
    laterality: str
    labels: dict[str, object]
    patient_id: str


def load_samples(manifest: Path, model_config: ClipConfig, progress: bool) -> list[Sample]:
    """Preprocess every image of a synthetic manifest once (uint8, model size)."""
    root = manifest.parent
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    samples = []
    for row in tqdm(rows, desc="preprocessing", disable=not progress, unit="image"):
        labels = {"mass": int(row["mass"]), "calcification": int(row["calcification"]),
                  "malignant": int(row["malignant"]), "density": row["density"], "birads": int(row["birads"])}
        image = dicom_to_uint8(root / row["path"], model_config.preprocess())
        samples.append(Sample(image, row["laterality"], labels, row["patient_id"]))
    return samples


def split_by_patient(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out whole patients, never single images."""
    patients = sorted({s.patient_id for s in samples})
    random.Random(seed).shuffle(patients)
    held = set(patients[: max(1, int(len(patients) * fraction))])
    return [s for s in samples if s.patient_id not in held], [s for s in samples if s.patient_id in held]


def calibration_split(held_out: list[Sample], seed: int) -> tuple[list[Sample], list[Sample]]:
    """Half of the held-out patients to fit the zero-shot calibration, half to evaluate; all to evaluate (no
    calibration) when there is a single held-out patient."""
    if len({s.patient_id for s in held_out}) < 2:
        return [], held_out
    return split_by_patient(held_out, 0.5, seed + 1)


def images_tensor(samples: list[Sample], config: ClipConfig) -> Tensor:
    return torch.stack([normalize(s.image, config.preprocess()) for s in samples])


class TextBank:
    """Frozen text-tower outputs of every sentence seen, computed once each."""

    def __init__(self, model: MammoClip) -> None:
        self.model = model
        self.cache: dict[str, Tensor] = {}

    def pooled(self, texts: list[str]) -> Tensor:
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            with torch.inference_mode():
                outputs = self.model.text_encoder(self.model.text_encoder.tokenize(new))
            self.cache.update({t: o.clone() for t, o in zip(new, outputs, strict=True)})
        return torch.stack([self.cache[t] for t in texts])


def train_demo_model(folder: Path, recipe: DemoRecipe = DemoRecipe(), progress: bool = True) -> Path:
    """Generate phantoms, train the demo model, evaluate it on held-out patients, save a model version."""
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    config = recipe.clip_config()
    manifest = write_studies(folder / "synthetic", recipe.studies, seed=recipe.seed, rows=recipe.rows,
                             cols=recipe.cols, progress=progress)
    train, held_out = split_by_patient(load_samples(manifest, config, progress), recipe.holdout_fraction,
                                       recipe.seed)
    model = new_model(config)
    model.text_encoder.requires_grad_(False)
    bank = TextBank(model)
    images = images_tensor(train, config)
    keys = {key: index for index, key in enumerate(sorted({label_key(s.labels) for s in train}, key=str))}
    groups = torch.tensor([keys[label_key(s.labels)] for s in train])
    trainable = [p for name, p in model.named_parameters() if not name.startswith("text_encoder.")]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=1e-4)
    steps = recipe.epochs * ((len(train) + recipe.batch_size - 1) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.learning_rate, total_steps=steps,
                                                    pct_start=0.1)
    history: list[dict[str, float]] = []
    with batch_norm_momentum(model.image_encoder, 0.1), channels_last(model.image_encoder), tqdm(
            total=steps, desc="training demo model (synthetic, not clinical)", disable=not progress) as bar:
        model.train()
        model.text_encoder.eval()
        for epoch in range(recipe.epochs):
            order = torch.randperm(len(train))
            for start in range(0, len(train), recipe.batch_size):
                batch = order[start:start + recipe.batch_size]
                texts = [breast_text(train[i].labels, train[i].laterality, rng) for i in batch.tolist()]
                text_emb = torch.nn.functional.normalize(model.text_projection(bank.pooled(texts)), dim=-1)
                loss = soft_clip_loss(model.encode_images(images[batch]), text_emb, model.logit_scale.exp(),
                                      groups[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                history.append({"epoch": epoch, "loss": loss.item()})
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()
    fitting, evaluation = calibration_split(held_out, recipe.seed)
    uncalibrated = ZeroShotClassifier(model, calibration={})
    calibration = fit_calibration(uncalibrated, embed_batched(model, images_tensor(fitting, config)),
                                  [s.labels for s in fitting]) if fitting else {}
    calibrated = ZeroShotClassifier(model, calibration=calibration)
    evaluation_embeddings = embed_batched(model, images_tensor(evaluation, config))
    evaluation_labels = [s.labels for s in evaluation]
    card = {
        "name": "mammo-clip-demo", "version": f"synthetic-{recipe.seed}",
        "intended_use": NOT_CLINICAL, "clinical_use": False,
        "training_data": f"{recipe.studies} synthetic four-view studies (training.synthetic), "
                         f"{len(train)} training images, {len(fitting)} held-out images to fit the zero-shot "
                         f"calibration, {len(evaluation)} held-out images to evaluate",
        "recipe": asdict(recipe), CALIBRATION_KEY: {task: fitted.to_card() for task, fitted in calibration.items()},
        "metrics_held_out_zero_shot": zero_shot_metrics(calibrated.classify(evaluation_embeddings),
                                                        evaluation_labels),
        "metrics_held_out_zero_shot_uncalibrated": zero_shot_metrics(uncalibrated.classify(evaluation_embeddings),
                                                                     evaluation_labels),
        "final_loss": history[-1]["loss"],
    }
    version = save_model_version(model, folder / "model", card=card)
    plot_training_curve([h["loss"] for h in history], version / "training_curve.png",
                        "Demo model on synthetic phantoms (not clinical)")
    return version


def ensure_demo_model(cache_dir: Path, recipe: DemoRecipe = DemoRecipe(), progress: bool = True) -> Path:
    """The cached demo model version folder, trained first when missing or made by another recipe."""
    folder = cache_dir / "demo-model"
    card = read_card(folder / "model")
    if card.get("recipe") == asdict(recipe):
        return folder / "model"
    log.info("training the demo model on synthetic phantoms (first run only)")
    return train_demo_model(folder, recipe, progress)
