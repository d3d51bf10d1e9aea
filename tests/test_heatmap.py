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
from models.zero_shot import LogitCalibration, ZeroShotClassifier
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
        expected = model.logit_scale.exp().clamp(max=100) * embedding @ direction.vector
    assert logits.shape == feature_map.shape[1:]
    assert abs(float(logits.mean()) - float(expected)) < 1e-4
    maps = finding_maps(model, feature_map, {"malignancy": direction}, {"malignancy": 0.8})
    assert float(maps["malignancy"].min()) >= 0 and abs(float(maps["malignancy"].max()) - 0.8) < 1e-6


def test_a_calibrated_task_maps_its_calibrated_logit(synthetic_root: Path) -> None:
    """The map decomposes the logit the calibrated probability comes from: its locations average to the
    calibrated logit difference, so a prior pushed far towards "present" shows evidence everywhere and one
    pushed far towards "absent" shows none."""
    model = tiny_model()
    image, _ = prepare_dicom(next(synthetic_root.glob("*/L_CC.dcm")), model.config.preprocess())
    with torch.inference_mode():
        feature_map = model.image_feature_map(normalize(image, model.config.preprocess())[None])[0]
        embedding = model.encode_images(normalize(image, model.config.preprocess())[None])
        raw = location_logits(model, feature_map, task_directions(ZeroShotClassifier(model, ["malignancy"]))[
            "malignancy"])
        for offset, positive in ((-5.0, 0), (5.0, raw.numel())):
            calibration = {"malignancy": LogitCalibration(0.5, (1.0, 1.0 + offset))}
            classifier = ZeroShotClassifier(model, ["malignancy"], calibration)
            direction = task_directions(classifier)["malignancy"]
            assert (direction.scale, direction.offset) == (0.5, offset)
            calibrated = location_logits(model, feature_map, direction)
            assert torch.allclose(calibrated, 0.5 * raw + offset, atol=1e-5)
            logit = classifier.logits("malignancy", embedding).mean(dim=0)[0]  # uncalibrated, template mean
            assert abs(float(calibrated.mean()) - float(0.5 * (logit[1] - logit[0]) + offset)) < 1e-4
            probability = float(classifier.classify(embedding)["malignancy"].score()[0])
            maps = finding_maps(model, feature_map, {"malignancy": direction}, {"malignancy": probability})
            assert int((maps["malignancy"] > 0).sum()) == positive  # the tiny model's logits are far below 5


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
