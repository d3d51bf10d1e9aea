"""Detections in the SR: one image-region group per lesion, drawn as a closed polyline on its source image."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.results.findings import Detection, ModelIdentity, StudyFindings
from tests.conftest import require_tool
from tests.test_results import assert_valid, make_findings, sources, text_values, write_sr  # noqa: F401  (fixture)

DETECTOR = ModelIdentity(name="Mammo-CLIP detector (RetinaNet)", software_version="0.1.0",
                         model_version="det-test")


def with_detections(datasets: list[pydicom.Dataset]) -> StudyFindings:
    findings = make_findings(datasets)
    first, second = datasets[0], datasets[1]
    findings.detections = [
        Detection(first.SOPInstanceUID, first.ImageLaterality, first.ViewPosition, "mass", 0.87, (20, 30, 60, 75)),
        Detection(second.SOPInstanceUID, second.ImageLaterality, second.ViewPosition, "calcification", 0.41,
                  (10.5, 12.0, 30.25, 40.0))]
    findings.sources["detector"] = DETECTOR
    return findings


def test_detections_are_image_regions_that_validate_and_render(tmp_path: Path,
                                                               sources: list[pydicom.Dataset]) -> None:  # noqa: F811
    findings = with_detections(sources)
    path = write_sr(findings, sources, tmp_path / "sr.dcm")
    assert_valid(path)

    report = hd.sr.srread(path).content
    regions = report.get_planar_roi_measurement_groups()
    assert len(regions) == 2
    for group, detection in zip(regions, findings.detections, strict=True):
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        x0, y0, x1, y1 = detection.box
        assert region.value.tolist() == [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            detection.sop_instance_uid
        (score,) = group.get_measurements()
        assert score.value == pytest.approx(detection.score)
        assert DETECTOR.name in text_values(group[0])

    # +Rd: the SCOORD graphic data in the annex
    html = subprocess.run([require_tool("/usr/bin/dsr2html"), "+Rd", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert html.returncode == 0, html.stderr
    assert html.stdout.count("Polyline") == 2 and "Calcification of breast" in html.stdout
    assert "20/30,60/30,60/75,20/75,20/30" in html.stdout and "10.5/12,30.25/12,30.25/40,10.5/40" in html.stdout
    assert DETECTOR.name in html.stdout


def test_a_detection_must_be_on_an_analysed_image_and_well_formed(sources: list[pydicom.Dataset]) -> None:  # noqa: F811
    findings = make_findings(sources[:2])
    findings.detections = [Detection("1.2.3.4", "L", "CC", "mass", 0.5, (1, 1, 5, 5))]
    with pytest.raises(ValueError, match="no source image"):
        write_sr(findings, sources[:2], Path("/nonexistent/sr.dcm"))
    with pytest.raises(ValueError, match="x0 < x1"):
        Detection("1.2.3", "L", "CC", "mass", 0.5, (5, 1, 5, 9))
    with pytest.raises(ValueError, match="not a finding"):
        Detection("1.2.3", "L", "CC", "density", 0.5, (1, 1, 5, 9))


def test_detections_survive_the_result_row_round_trip(sources: list[pydicom.Dataset]) -> None:  # noqa: F811
    findings = with_detections(sources)
    again = StudyFindings.from_dict(findings.to_dict())
    assert again.detections == findings.detections and again.source("detector") == DETECTOR
