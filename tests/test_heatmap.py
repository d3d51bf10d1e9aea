"""Heatmaps: the logit decomposition over locations, and the map placed back on the source geometry."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch

from models.crop import CropBox
from models.heatmap import finding_maps, location_logits, task_directions
from models.preprocess import normalize, prepare_dicom
from models.zero_shot import ZeroShotClassifier
from tests.conftest import tiny_model


def test_location_logits_average_to_the_image_logit(synthetic_root: Path) -> None:
    model = tiny_model()
    classifier = ZeroShotClassifier(model)
    direction = task_directions(classifier)["malignancy"]
    image, _ = prepare_dicom(next(synthetic_root.glob("*/L_CC.dcm")), model.config.preprocess())
    with torch.inference_mode():
        feature_map = model.image_feature_map(normalize(image, model.config.preprocess())[None])[0]
        embedding = model.encode_images(normalize(image, model.config.preprocess())[None])[0]
        logits = location_logits(model, feature_map, direction)
        expected = model.logit_scale.exp().clamp(max=100) * embedding @ direction
    assert logits.shape == feature_map.shape[1:]
    assert abs(float(logits.mean()) - float(expected)) < 1e-4
    maps = finding_maps(model, feature_map, {"malignancy": direction}, {"malignancy": 0.8})
    assert float(maps["malignancy"].min()) >= 0 and abs(float(maps["malignancy"].max()) - 0.8) < 1e-6


def test_crop_box_pastes_a_map_back_inside_the_breast(synthetic_root: Path) -> None:
    path = next(synthetic_root.glob("*/R_MLO.dcm"))
    ds = pydicom.dcmread(path)
    _, box = prepare_dicom(ds)
    placed = box.paste(np.ones((8, 5), dtype=np.float32))
    assert placed.shape == (ds.Rows, ds.Columns)
    inside = placed[box.top:box.bottom, box.left:box.right]
    assert inside.min() == 1.0 and placed.sum() == inside.size  # ones inside the crop, zeros elsewhere
    assert 0 <= box.top < box.bottom <= ds.Rows and 0 <= box.left < box.right <= ds.Columns


@pytest.mark.parametrize("levels", [1, 255])
def test_crop_box_pastes_levels_as_the_rounded_float_paste(levels: int) -> None:
    """``paste_levels`` (a SEG frame) is ``round(paste(clip(values)) * levels)`` but for rounding ties and float
    error: within one level, and exact nearly everywhere; values outside [0, 1] are clipped first."""
    rng = np.random.default_rng(5)
    values = cv2.GaussianBlur(rng.random((60, 37), dtype=np.float32), (0, 0), 2)
    values[:6], values[-6:] = 1.7, -0.4  # outside [0, 1]
    box = CropBox(top=103, bottom=1900, left=7, right=1251, source_shape=(2000, 1600))
    levels_map = box.paste_levels(values, levels)
    expected = np.around(box.paste(np.clip(values, 0.0, 1.0)) * levels)
    assert levels_map.dtype == np.uint8 and levels_map.shape == (2000, 1600)
    difference = np.abs(levels_map.astype(np.float64) - expected)
    assert difference.max() <= 1 and np.count_nonzero(difference) < levels_map.size * 1e-4
    assert levels_map.max() == levels and levels_map[:103].max() == 0 and levels_map[:, 1251:].max() == 0
    with pytest.raises(ValueError, match="levels"):
        box.paste_levels(values, 256)


def test_crop_box_pastes_a_map_at_a_scaled_size_where_the_full_paste_would_land() -> None:
    box = CropBox(top=400, bottom=3600, left=0, right=2000, source_shape=(4000, 3000))
    values = np.zeros((48, 30), dtype=np.float32)
    values[24:, :15] = 1.0  # the lower left quarter of the crop
    shown = box.paste(values, (1000, 750))
    assert shown.shape == (1000, 750)
    assert shown[:100].max() == 0 and shown[900:].max() == 0 and shown[:, 500:].max() == 0  # outside the box
    full = cv2.resize(box.paste(values), (750, 1000), interpolation=cv2.INTER_AREA)
    assert np.abs(shown - full).mean() < 0.01 and np.abs(shown - full).max() <= 0.5
    assert shown[560:880, 20:230].min() > 0.99 and shown[120:420, 20:230].max() < 0.01
