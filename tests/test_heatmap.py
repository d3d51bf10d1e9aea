"""Heatmaps: the logit decomposition over locations, and the map placed back on the source geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import torch

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
