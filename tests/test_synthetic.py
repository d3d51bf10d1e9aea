"""Synthetic screening studies: valid MG objects, consistent findings, masks, reports, determinism."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.conftest import require_tool
from training.synthetic import VIEWS, generate_study, write_studies

SIZE = {"rows": 256, "cols": 160}
VIEW_CODE = {"CC": "399162004", "MLO": "399368009"}
ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"], ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"]}


def _study_with_findings(kind: str, malignant: bool | None = None, start: int = 0):
    for seed in range(start, start + 300):
        study = generate_study(seed, finding_prevalence=1.0, **SIZE)
        if any(f.kind == kind and (malignant is None or f.malignant == malignant) for f in study.findings):
            return study
    raise AssertionError(f"no study with a {kind} in 300 seeds")


def test_four_views_with_real_mg_attributes() -> None:
    study = generate_study(1, **SIZE)
    assert [(v.laterality, v.view) for v in study.views] == list(VIEWS)
    for view in study.views:
        ds = view.dataset
        assert ds.Modality == "MG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
        assert ds.ImageLaterality == view.laterality and ds.ViewPosition == view.view
        assert ds.ViewCodeSequence[0].CodeValue == VIEW_CODE[view.view]
        assert list(ds.PatientOrientation) == ORIENTATION[(view.laterality, view.view)]
        assert ds.PresentationIntentType == "FOR PRESENTATION" and 12 <= ds.BitsStored <= 14
        assert ds.pixel_array.shape == (256, 160) and int(ds.pixel_array.max()) < 2**ds.BitsStored
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert "synthetic" in ds.StudyDescription.lower()
    assert len({v.dataset.SOPInstanceUID for v in study.views}) == 4


def _presentation(ds: pydicom.Dataset) -> np.ndarray:
    pixels = ds.pixel_array.astype(np.float64)
    return (2**ds.BitsStored - 1) - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels


def test_masses_are_denser_than_their_surroundings_and_seen_in_both_views() -> None:
    study = _study_with_findings("mass")
    index = next(i for i, f in enumerate(study.findings) if f.kind == "mass")
    side = study.findings[index].laterality
    views = [v for v in study.views if v.laterality == side]
    assert len(views) == 2
    from scipy import ndimage

    for view in views:
        mask = view.masks[view.findings_in_view.index(index)]
        assert mask.sum() > 4
        ring = ndimage.binary_dilation(mask, iterations=4) & ~mask
        pixels = _presentation(view.dataset)
        assert pixels[mask].mean() > pixels[ring].mean()
    other = [v for v in study.views if v.laterality != side]
    assert all(index not in v.findings_in_view for v in other)


def test_calcification_masks_cover_bright_specks() -> None:
    from scipy import ndimage

    study = _study_with_findings("calcification")
    for view in study.views:
        for index, mask in zip(view.findings_in_view, view.masks, strict=True):
            if study.findings[index].kind == "calcification":
                pixels = _presentation(view.dataset)
                ring = ndimage.binary_dilation(mask, iterations=6) & ~mask
                assert pixels[mask].max() > np.percentile(pixels[ring], 99)


def test_same_seed_same_study_and_other_seed_differs() -> None:
    a, b, c = generate_study(3, **SIZE), generate_study(3, **SIZE), generate_study(4, **SIZE)
    assert a.study_instance_uid == b.study_instance_uid != c.study_instance_uid
    assert a.views[0].dataset.PixelData == b.views[0].dataset.PixelData != c.views[0].dataset.PixelData
    assert a.report == b.report


def test_monochrome1_twin_stores_the_complement() -> None:
    m1 = generate_study(8, photometric="MONOCHROME1", **SIZE)
    m2 = generate_study(8, photometric="MONOCHROME2", **SIZE)
    for v1, v2 in zip(m1.views, m2.views, strict=True):
        top = 2**v1.dataset.BitsStored - 1
        np.testing.assert_array_equal(v1.dataset.pixel_array, top - v2.dataset.pixel_array.astype(np.int32))
        assert float(v1.dataset.WindowCenter) == pytest.approx(top - float(v2.dataset.WindowCenter), abs=0.1)
        assert v1.dataset.PresentationLUTShape == "INVERSE"


def test_reports_agree_with_labels() -> None:
    density_words = {"A": "fatty", "B": "scattered", "C": "heterogeneously dense", "D": "extremely dense"}
    for seed in range(20):
        study = generate_study(seed, **SIZE)
        assert density_words[study.density] in study.report
        assert re.search(rf"BI-RADS {study.birads}\b", study.report)
        for finding in study.findings:
            side = {"L": "left", "R": "right"}[finding.laterality]
            assert f"{side} breast" in study.report
        if not study.findings:
            assert study.birads == 1
        if any(f.malignant for f in study.findings):
            assert study.birads in (0, 4, 5)


def test_write_studies_manifest_and_files(tmp_path: Path) -> None:
    manifest = write_studies(tmp_path, 3, seed=20, progress=False, **SIZE)
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    for row in rows:
        ds = pydicom.dcmread(tmp_path / row["path"])
        assert ds.SOPInstanceUID == row["sop_instance_uid"] and ds.ImageLaterality == row["laterality"]
        assert (tmp_path / row["report_path"]).exists()
        masks = [p for p in row["mask_paths"].split(";") if p]
        assert len(masks) == int(row["n_findings"])
        assert all((tmp_path / p).exists() for p in masks)
        if int(row["mass"]) or int(row["calcification"]):
            assert masks
    again = write_studies(tmp_path / "again", 3, seed=20, progress=False, **SIZE)
    assert again.read_text() == manifest.read_text()


def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    dciodvfy = require_tool("/usr/bin/dciodvfy")
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        study = generate_study(2, photometric=photometric, finding_prevalence=1.0, **SIZE)
        for view in study.views:
            path = tmp_path / f"{photometric}_{view.laterality}{view.view}.dcm"
            view.dataset.save_as(path, enforce_file_format=True)
            output = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True).stderr
            errors = [line for line in output.splitlines() if line.startswith("Error")]
            assert errors == [], output
            assert "MammographyImageForPresentation" in output
