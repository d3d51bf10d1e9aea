"""DICOM/PNG -> model tensor, as the reference prepares images; bad inputs fail clearly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from models.clip import ClipConfig
from models.errors import ImageDecodeError, NotMammographyError
from models.preprocess import (
    PreprocessConfig,
    dicom_to_uint8,
    extract_breast,
    prepare_presentation,
    preprocess_dicom,
    preprocess_file,
    presentation_pixels,
    to_uint8,
)
from models.sop_classes import view_of
from training.synthetic import generate_study

CONFIG = PreprocessConfig(height=128, width=80)


def _views(photometric: str) -> dict[tuple[str, str], pydicom.Dataset]:
    study = generate_study(5, rows=256, cols=160, photometric=photometric)
    return {(v.laterality, v.view): v.dataset for v in study.views}


def test_monochrome1_and_monochrome2_twins_give_the_same_tensor() -> None:
    m1, m2 = _views("MONOCHROME1"), _views("MONOCHROME2")
    assert m1.keys() == m2.keys()
    for key in m1:
        assert m1[key].PhotometricInterpretation == "MONOCHROME1"
        assert not np.array_equal(m1[key].pixel_array, m2[key].pixel_array)
        torch.testing.assert_close(preprocess_dicom(m1[key], CONFIG), preprocess_dicom(m2[key], CONFIG),
                                   rtol=0, atol=1e-6)


def test_output_shape_channels_and_normalization() -> None:
    for ds in _views("MONOCHROME2").values():
        tensor = preprocess_dicom(ds, CONFIG)
        assert tensor.shape == (3, 128, 80) and tensor.dtype == torch.float32
        assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])
        # per-image min-max then (x - mean) / std: the extremes map to -mean/std and (1 - mean)/std
        assert float(tensor.min()) == pytest.approx(-CONFIG.mean / CONFIG.std, abs=1e-5)
        assert float(tensor.max()) == pytest.approx((1 - CONFIG.mean) / CONFIG.std, abs=1e-5)


def _cropped_and_resized(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    breast = extract_breast(image, config.threshold)[0]
    return cv2.resize(breast, (config.width, config.height), interpolation=cv2.INTER_AREA)


def _reference_png(ds: pydicom.Dataset, config: PreprocessConfig) -> np.ndarray:
    """The reference's ``save_imgs`` (preprocess_image_to_png_vindr.py / _kaggle.py): no VOI window or LUT."""
    data = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)[5:-5, 5:-5]
    if ds.PhotometricInterpretation == "MONOCHROME1":
        data = np.amax(data) - data
    data = data - np.min(data)
    data = data / np.max(data)
    return _cropped_and_resized((data * 255).astype(np.uint8), config)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_a_reference_model_sees_the_unwindowed_image_and_a_node_model_its_recorded_windowed_one(
        photometric: str) -> None:
    ds = _views(photometric)[("L", "CC")]
    assert "WindowCenter" in ds and "WindowWidth" in ds
    reference = ClipConfig(input_height=128, input_width=80).preprocess()  # a reference checkpoint's
    node = ClipConfig.from_dict({"input_height": 128, "input_width": 80}).preprocess()  # saved before the flag
    assert not reference.apply_voi and node.apply_voi
    expected = _reference_png(ds, reference)
    assert np.array_equal(dicom_to_uint8(ds, reference), expected)
    windowed = _cropped_and_resized(to_uint8(presentation_pixels(ds)[5:-5, 5:-5]), node)
    assert np.array_equal(dicom_to_uint8(ds, node), windowed)
    assert not np.array_equal(windowed, expected)
    # the node's analysis path: the display pixels are windowed, the model input is each model's own
    for config in (reference, node):
        assert np.array_equal(prepare_presentation(ds, presentation_pixels(ds), config)[0],
                              dicom_to_uint8(ds, config))


def test_a_window_that_blanks_the_display_fails_the_analysed_image_but_not_the_model_input() -> None:
    ds = _views("MONOCHROME2")[("R", "MLO")]
    ds.WindowCenter, ds.WindowWidth = 1e6, 1
    assert dicom_to_uint8(ds, CONFIG).std() > 0  # the reference ignores the window
    with pytest.raises(ImageDecodeError, match=f"{ds.SOPInstanceUID}: its VOI attributes leave a blank image"):
        prepare_presentation(ds, presentation_pixels(ds), CONFIG)


def test_breast_is_bright_and_cropped_to_the_breast() -> None:
    ds = _views("MONOCHROME1")[("R", "CC")]
    image = dicom_to_uint8(ds, PreprocessConfig(height=256, width=160))
    assert image.dtype == np.uint8
    assert image.mean() > 40  # mostly breast after the crop, not dark background


def test_extract_breast_finds_the_longest_nonconstant_run() -> None:
    image = np.zeros((100, 60), np.uint8)
    image[10:90, 5:35] = np.random.default_rng(0).integers(60, 255, (80, 30))
    crop, (top, bottom, left, right) = extract_breast(image)
    assert (left, right) == (5, 35)
    assert 8 <= top <= 12 and 88 <= bottom <= 92
    assert crop.shape == (bottom - top, right - left)


def test_view_of_reads_laterality_and_view() -> None:
    views = _views("MONOCHROME2")
    assert set(map(view_of, views.values())) == {("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}
    # a unit that fills only the View Code Sequence (the MG IOD requires it; View Position is optional), in
    # SNOMED CT or the SNOMED RT codes of older units, and Laterality instead of Image Laterality
    for (laterality, view), code in ((("R", "MLO"), "399368009"), (("L", "CC"), "R-10242")):
        ds = views[(laterality, view)]
        del ds.ViewPosition, ds.ImageLaterality
        ds.Laterality = laterality
        ds.ViewCodeSequence = [Dataset()]
        ds.ViewCodeSequence[0].CodeValue = code
        assert view_of(ds) == (laterality, view)
    ds.ViewCodeSequence[0].CodeValue = "0000"  # a code of no view it knows
    assert view_of(ds) == ("L", "")


def test_png_in_reference_format(tmp_path: Path) -> None:
    ds = _views("MONOCHROME2")[("L", "MLO")]
    png = tmp_path / "image.png"
    cv2.imwrite(str(png), dicom_to_uint8(ds, CONFIG))
    torch.testing.assert_close(preprocess_file(png, CONFIG), preprocess_dicom(ds, CONFIG), rtol=0, atol=1e-6)


def test_a_text_file_is_not_an_image(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.dcm"
    bogus.write_text("this is not DICOM")
    with pytest.raises(ImageDecodeError, match="not a readable DICOM"):
        preprocess_file(bogus, CONFIG)


def test_non_mammography_modality_names_the_sop_instance_uid() -> None:
    ds = _views("MONOCHROME2")[("L", "CC")]
    ds.Modality = "CT"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(NotMammographyError, match=ds.SOPInstanceUID):
        preprocess_dicom(ds, CONFIG)


def test_missing_and_undecodable_pixel_data_name_the_sop_instance_uid() -> None:
    ds = _views("MONOCHROME2")[("R", "MLO")]
    truncated = pydicom.Dataset(ds)
    truncated.PixelData = ds.PixelData[:100]
    with pytest.raises(ImageDecodeError, match=ds.SOPInstanceUID):
        preprocess_dicom(truncated, CONFIG)
    del ds.PixelData
    with pytest.raises(ImageDecodeError, match=f"{ds.SOPInstanceUID} has no pixel data"):
        preprocess_dicom(ds, CONFIG)


def _windowing_case(dtype: str, photometric: str, window: str | None) -> tuple[pydicom.Dataset, np.ndarray]:
    """A dataset header and stored values spanning part of ``dtype``'s range, with a rescale and a window."""
    rng = np.random.default_rng(11)
    info = np.iinfo(dtype)
    low, high = max(info.min, -3000), min(info.max, 4000)
    stored = rng.integers(low + 5, high - 7, size=(64, 48)).astype(dtype)
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation, ds.BitsStored = photometric, 8 * np.dtype(dtype).itemsize
    ds.PixelRepresentation = int(np.dtype(dtype).kind == "i")
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -20.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = (low + high) / 2 * 1.5, (high - low) / 3, window
    return ds, stored


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("window", [None, "LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("voi", [True, False])
def test_windowing_through_a_table_equals_windowing_each_pixel(dtype: str, photometric: str,
                                                               window: str | None, voi: bool) -> None:
    """``_displayed`` maps integer images through a table of their values; each pixel must get exactly what the
    VOI arithmetic gives it alone (``_display_values`` on the pixels, as for a float image)."""
    from models.preprocess import _display_values, _displayed

    ds, stored = _windowing_case(dtype, photometric, window)
    monochrome1 = photometric == "MONOCHROME1"
    with np.errstate(over="ignore", invalid="ignore"):
        expected = _display_values(ds, stored, monochrome1, voi)
    if monochrome1 and (window is None or not voi):
        expected = expected.max() - expected
    values = _displayed(ds, stored, monochrome1, voi)
    assert values.dtype == np.float32 and values.shape == stored.shape
    assert np.array_equal(values, expected.astype(np.float32))


def test_every_node_model_keeps_the_input_it_was_trained_on() -> None:
    """Configs saved before ``apply_voi`` existed (CLIP, detector, four-view model) were trained on windowed
    input and keep it; new ones read the reference's unwindowed pixels; a detector started from a CLIP model
    reads what that model reads; a windowed conversion cache keeps its key (still current)."""
    from dataclasses import asdict

    from models.detector import DetectorConfig
    from models.multiview import MultiViewConfig
    from training.convert import CONVERT_VERSION, cache_key

    for config_class in (ClipConfig, DetectorConfig, MultiViewConfig):
        saved = {name: value for name, value in asdict(config_class()).items() if name != "apply_voi"}
        assert config_class.from_dict(saved).preprocess().apply_voi is True, config_class
        assert config_class().preprocess().apply_voi is False
        assert config_class.from_dict(asdict(config_class())).preprocess().apply_voi is False
    assert cache_key(PreprocessConfig(apply_voi=True)) != cache_key(PreprocessConfig())
    before = {"version": CONVERT_VERSION, **{name: value for name, value in asdict(PreprocessConfig()).items()
                                              if name not in ("mean", "std", "apply_voi")}}
    assert cache_key(PreprocessConfig(apply_voi=True)) == hashlib.sha256(
        json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]  # the key windowed caches were made under
