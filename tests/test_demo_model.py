"""The demo model's training recipe, in miniature: it trains, is cached, and says it is not clinical."""

from __future__ import annotations

from pathlib import Path

import torch

from models import load_model
from training.contrastive import soft_clip_loss
from training.demo import DemoRecipe, ensure_demo_model

TINY = DemoRecipe(studies=10, rows=256, cols=160, epochs=1, batch_size=8)


def test_demo_model_trains_once_and_is_reused(tmp_path: Path) -> None:
    folder = ensure_demo_model(tmp_path, TINY, progress=False)
    model = load_model(folder)
    assert model.card["clinical_use"] is False and "NOT a clinical model" in model.card["intended_use"]
    assert model.card["recipe"]["studies"] == 10
    assert "density_accuracy" in model.card["metrics_held_out_zero_shot"]
    assert "density_accuracy" in model.card["metrics_held_out_zero_shot_uncalibrated"]
    # two held-out patients: one fits the calibration (of the tasks its labels vary on), one evaluates
    assert set(model.card["zero_shot_calibration"]) <= {"mass", "calcification", "malignancy", "density", "birads"}
    assert "4 held-out images to fit the zero-shot calibration, 4 held-out images to evaluate" in model.card[
        "training_data"]
    assert (folder / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (folder / "weights.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(tmp_path, TINY, progress=False) == folder
    assert (folder / "weights.safetensors").stat().st_mtime_ns == stamp


def test_soft_clip_loss_treats_same_label_pairs_as_positives() -> None:
    """Image 0 matching the text of image 1 is a false negative for plain CLIP, fine when both share labels."""
    eye = torch.eye(3)
    image, text = eye, eye[[1, 0, 2]]
    scale = torch.tensor(10.0)
    grouped = soft_clip_loss(image, text, scale, torch.tensor([0, 0, 1]))
    plain = soft_clip_loss(image, text, scale)
    assert grouped < plain - 1.0
    assert soft_clip_loss(eye, eye, scale) < plain  # the plain loss itself prefers the diagonal
