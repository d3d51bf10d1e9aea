"""DICOM/PNG -> model tensor, as the reference prepares images; bad inputs fail clearly."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset

from models.errors import ImageDecodeError, NotMammographyError
from models.preprocess import (
    PreprocessConfig,
    dicom_to_uint8,
    extract_breast,
    preprocess_dicom,
    preprocess_file,
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


def test_breast_is_bright_after_windowing_and_cropped_to_the_breast() -> None:
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
def test_windowing_through_a_table_equals_windowing_each_pixel(dtype: str, photometric: str,
                                                               window: str | None) -> None:
    """``_displayed`` maps integer images through a table of their values; each pixel must get exactly what the
    VOI arithmetic gives it alone (``_display_values`` on the pixels, as for a float image)."""
    from models.preprocess import _display_values, _displayed

    ds, stored = _windowing_case(dtype, photometric, window)
    monochrome1 = photometric == "MONOCHROME1"
    with np.errstate(over="ignore", invalid="ignore"):
        expected = _display_values(ds, stored, monochrome1)
    if monochrome1 and window is None:
        expected = expected.max() - expected
    values = _displayed(ds, stored, monochrome1)
    assert values.dtype == np.float32 and values.shape == stored.shape
    assert np.array_equal(values, expected.astype(np.float32))
