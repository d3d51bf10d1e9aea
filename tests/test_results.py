"""Result objects: the TID 1500 SR, the fractional SEG and the overlay PNG, checked with dciodvfy, dsr2html,
highdicom/pydicom read-back and a real DCMTK storescp."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.datadict import keyword_for_tag
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage

from dicom_node.results import build_heatmap_seg, build_sr, save_dataset
from dicom_node.results import seg as seg_module
from dicom_node.results.codes import PROCESSING_ALGORITHM
from dicom_node.results.findings import (
    BIRADS_LABELS,
    DENSITY_LABELS,
    DISCLAIMER,
    FINDING_TASKS,
    BreastFindings,
    ModelIdentity,
    StudyFindings,
    ViewFindings,
)
from dicom_node.results.overlay import heatmap_overlay_png
from dicom_node.results.seg import MAX_FRACTIONAL_VALUE, SEG_TRANSFER_SYNTAXES, TRANSFER_SYNTAX, seg_heatmap
from models.crop import CropBox
from tests.conftest import require_tool
from tests.peers import Orthanc, StoreSCP

MODEL = ModelIdentity(name="Mammo-CLIP test", software_version="0.1.0", model_version="test-2026.11")


@pytest.fixture(scope="module")
def sources(synthetic_root: Path) -> list[pydicom.Dataset]:
    """The four views (256 x 160) of the first synthetic study."""
    study = sorted(path for path in synthetic_root.iterdir() if path.is_dir())[0]
    return [pydicom.dcmread(path) for path in sorted(study.glob("*.dcm"))]


def _assessment(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    return {"scores": {task: round(float(rng.uniform(0.05, 0.95)), 6) for task in FINDING_TASKS},
            "density": dict(zip(DENSITY_LABELS, rng.dirichlet(np.ones(4)).tolist(), strict=True)),
            "birads": dict(zip(BIRADS_LABELS, rng.dirichlet(np.ones(5)).tolist(), strict=True))}


def make_findings(datasets: list[pydicom.Dataset], missing: list[str] | None = None) -> StudyFindings:
    rng = np.random.default_rng(5)
    views = [ViewFindings(**_assessment(rng), sop_instance_uid=ds.SOPInstanceUID, laterality=ds.ImageLaterality,
                          view=ds.ViewPosition) for ds in datasets]
    breasts = [BreastFindings(**_assessment(rng), laterality=side) for side in ("L", "R")]
    return StudyFindings(datasets[0].StudyInstanceUID, MODEL, views, breasts, missing or [])


def write_sr(findings: StudyFindings, datasets: list[pydicom.Dataset], path: Path) -> Path:
    sr = build_sr(findings, datasets, series_instance_uid=generate_uid(entropy_srcs=["sr series"]),
                  sop_instance_uid=generate_uid(entropy_srcs=[findings.study_instance_uid, "sr"]),
                  series_number=9000, instance_number=1)
    return save_dataset(sr, path)


def heatmaps_for(source: pydicom.Dataset, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {task: rng.random((source.Rows, source.Columns), dtype=np.float32) for task in FINDING_TASKS}


def levels_of(heatmaps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Heatmaps in [0, 1] as the uint8 levels a SEG stores."""
    return {name: np.around(values * MAX_FRACTIONAL_VALUE).astype(np.uint8) for name, values in heatmaps.items()}


def write_seg(source: pydicom.Dataset, heatmaps: dict[str, np.ndarray], path: Path,
              transfer_syntax_uid: str = TRANSFER_SYNTAX) -> Path:
    seg = build_heatmap_seg(source, levels_of(heatmaps), MODEL,
                            series_instance_uid=generate_uid(entropy_srcs=["seg series"]),
                            sop_instance_uid=generate_uid(entropy_srcs=[source.SOPInstanceUID, "seg"]),
                            series_number=9001, instance_number=1, transfer_syntax_uid=transfer_syntax_uid)
    return save_dataset(seg, path)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Errors and warnings of dicom3tools' IOD validator."""
    result = subprocess.run([require_tool("/usr/bin/dciodvfy"), str(path)], capture_output=True, text=True,
                            timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warn")]


def assert_valid(path: Path) -> None:
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    # The only warning: Device UID in the IHE AIR Contributing Equipment item, unknown to this dciodvfy.
    assert all("Device UID" in line or "Standard Extended SOP Class" in line for line in warnings), warnings


def text_values(dataset: pydicom.Dataset) -> list[str]:
    """Every TEXT content item value of an SR, depth first."""
    values = []
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            values.append(str(item.TextValue))
        values += text_values(item)
    return values


def test_sr_of_four_views_is_valid_renders_and_reads_back(tmp_path: Path, sources: list[pydicom.Dataset]) -> None:
    findings = make_findings(sources)
    path = write_sr(findings, sources, tmp_path / "sr.dcm")
    assert_valid(path)

    html = subprocess.run([require_tool("/usr/bin/dsr2html"), str(path)], capture_output=True, text=True,
                          timeout=60)
    assert html.returncode == 0, html.stderr
    malignancy = findings.views[0].scores["malignancy"]
    assert f"{malignancy:g}" in html.stdout and f"{findings.suspicion:g}" in html.stdout
    assert DISCLAIMER in html.stdout

    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == Comprehensive3DSRStorage and sr.SeriesDescription == "AI results - research/triage only"
    assert (sr.PatientID, sr.StudyInstanceUID) == (sources[0].PatientID, sources[0].StudyInstanceUID)
    report = sr.content
    for view in findings.views:
        groups = report.get_image_measurement_groups(referenced_sop_instance_uid=view.sop_instance_uid)
        by_id = {group.tracking_identifier: group for group in groups}
        for task in FINDING_TASKS:
            (measurement,) = by_id[f"{view.name} {task}"].get_measurements()
            assert measurement.value == pytest.approx(view.scores[task], abs=1e-6)
            assert measurement.unit.value == "1"
        (density,) = by_id[f"{view.name} density"].get_qualitative_evaluations()
        assert density.name == codes.SCT.BreastComposition
    breast = findings.breasts[0]
    (malignant,) = [g for g in report.get_image_measurement_groups() if g.tracking_identifier == "L breast malignancy"]
    (birads,) = malignant.get_qualitative_evaluations()
    assert birads.value.value == {"1": "397140005", "2": "397141009", "3": "397143007", "4": "397144001",
                                  "5": "397145000"}[breast.birads_category]

    library = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028")
    referenced = {image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for group in library.ContentSequence for image in group.ContentSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    assert DISCLAIMER in text_values(sr) and "All four screening views were analysed." in text_values(sr)

    (equipment,) = [item for item in sr.ContributingEquipmentSequence
                    if item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert equipment.ManufacturerModelName == MODEL.name and list(equipment.SoftwareVersions) == [
        "node 0.1.0", "model test-2026.11"]
    assert equipment.DeviceUID == generate_uid(entropy_srcs=[MODEL.name, MODEL.model_version])


def test_sr_of_a_partial_study_states_the_missing_view(tmp_path: Path, sources: list[pydicom.Dataset]) -> None:
    present = [ds for ds in sources if (ds.ImageLaterality, ds.ViewPosition) != ("L", "MLO")]
    assert len(present) == 3
    findings = make_findings(present, missing=["LMLO"])
    path = write_sr(findings, present, tmp_path / "sr.dcm")
    assert_valid(path)
    html = subprocess.run([require_tool("/usr/bin/dsr2html"), str(path)], capture_output=True, text=True,
                          timeout=60)
    assert html.returncode == 0 and "Missing views: LMLO" in html.stdout

    sr = hd.sr.srread(path)
    statements = [text for text in text_values(sr) if text.startswith("Missing views")]
    assert statements == ["Missing views: LMLO. Partial analysis: only the available views were analysed."]
    identifiers = {group.tracking_identifier for group in sr.content.get_image_measurement_groups()}
    assert "LCC malignancy" in identifiers and not any(name.startswith("LMLO") for name in identifiers)
    (left,) = [g for g in sr.content.get_image_measurement_groups() if g.tracking_identifier == "L breast mass"]
    assert [image.referenced_sop_instance_uid for image in left.source_images] == [
        ds.SOPInstanceUID for ds in present if ds.ImageLaterality == "L"]


def test_an_sr_of_a_new_analysis_names_the_earlier_ones(tmp_path: Path, sources: list[pydicom.Dataset]) -> None:
    findings = make_findings(sources)
    earlier = [(generate_uid(), generate_uid()), (generate_uid(), generate_uid())]
    sr = build_sr(findings, sources, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                  series_number=9000, instance_number=1, predecessors=earlier)
    assert_valid(save_dataset(sr, tmp_path / "sr.dcm"))
    (item,) = sr.PredecessorDocumentsSequence
    assert item.StudyInstanceUID == findings.study_instance_uid
    assert [(series.SeriesInstanceUID, series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for series in item.ReferencedSeriesSequence] == earlier


def test_sr_rejects_a_view_without_its_source(sources: list[pydicom.Dataset]) -> None:
    with pytest.raises(ValueError, match="no source image"):
        build_sr(make_findings(sources), sources[:3], series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4",
                 series_number=1, instance_number=1)


@pytest.mark.parametrize("compression", sorted(SEG_TRANSFER_SYNTAXES))
def test_seg_is_valid_and_round_trips_the_heatmaps(tmp_path: Path, sources: list[pydicom.Dataset],
                                                   compression: str) -> None:
    source = sources[0]
    heatmaps = heatmaps_for(source)
    path = write_seg(source, heatmaps, tmp_path / "seg.dcm", SEG_TRANSFER_SYNTAXES[compression])
    assert_valid(path)

    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.file_meta.TransferSyntaxUID == SEG_TRANSFER_SYNTAXES[compression]
    assert (seg.SegmentationType, seg.SegmentationFractionalType, seg.MaximumFractionalValue) == (
        "FRACTIONAL", "PROBABILITY", 255)
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns) and seg.NumberOfFrames == len(FINDING_TASKS)
    assert "research/triage only" in seg.SeriesDescription and "not for diagnosis" in seg.ContentDescription
    labels = {item.SegmentNumber: item.SegmentLabel for item in seg.SegmentSequence}
    assert labels == {number: f"{task} heatmap" for number, task in enumerate(FINDING_TASKS, start=1)}
    region = seg.SegmentSequence[0].AnatomicRegionSequence[0]
    assert region.CodeValue == "76752008"
    assert region.AnatomicRegionModifierSequence[0].CodeMeaning == {"L": "Left", "R": "Right"}[source.ImageLaterality]
    referenced = {ref.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for ref in series.ReferencedInstanceSequence}
    assert referenced == {source.SOPInstanceUID}

    frames = seg.pixel_array
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        expected = heatmaps[FINDING_TASKS[number - 1]]
        assert np.abs(frame.astype(np.float32) / 255.0 - expected).max() <= 1 / 255
        derivation = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert derivation.ReferencedSOPInstanceUID == source.SOPInstanceUID
    for task in FINDING_TASKS:  # what the study page redraws an overlay from
        assert np.abs(seg_heatmap(seg, task) - heatmaps[task]).max() <= 1 / 255
    with pytest.raises(ValueError, match="no density heatmap"):
        seg_heatmap(seg, "density")


@pytest.mark.parametrize("tasks", [FINDING_TASKS[:1], FINDING_TASKS])
def test_seg_is_the_object_highdicom_builds(monkeypatch: pytest.MonkeyPatch, sources: list[pydicom.Dataset],
                                           tasks: tuple[str, ...]) -> None:
    """The SEG takes uint8 levels where highdicom takes floats (``seg._HeatmapSegmentation``), nothing else."""
    source = sources[1]
    heatmaps = {task: heatmap for task, heatmap in heatmaps_for(source, seed=9).items() if task in tasks}
    heatmaps[tasks[0]][:5] = 0.0  # exact 0 and 1 values too
    heatmaps[tasks[0]][-5:] = 1.0
    arguments = {"series_instance_uid": "1.2.3", "sop_instance_uid": "1.2.3.4", "series_number": 1,
                 "instance_number": 1}
    ours = build_heatmap_seg(source, levels_of(heatmaps), MODEL, **arguments)

    def highdicom_from_floats(*, pixel_array: np.ndarray, **kwargs: object) -> hd.seg.Segmentation:
        return hd.seg.Segmentation(pixel_array=pixel_array.astype(np.float32) / MAX_FRACTIONAL_VALUE, **kwargs)

    monkeypatch.setattr(seg_module, "_HeatmapSegmentation", highdicom_from_floats)
    theirs = build_heatmap_seg(source, levels_of(heatmaps), MODEL, **arguments)
    assert type(theirs) is hd.seg.Segmentation and type(ours) is not hd.seg.Segmentation
    assert ours.SegmentsOverlap == theirs.SegmentsOverlap == ("NO" if len(tasks) == 1 else "UNDEFINED")
    assert ours.PixelData == theirs.PixelData
    # what differs between any two builds: creation times (also in the contributing equipment) and the
    # dimension organization UID highdicom generates
    per_build = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
                 "ContributingEquipmentSequence", "DimensionOrganizationSequence", "DimensionIndexSequence"}

    def fixed(dataset: pydicom.Dataset) -> dict[str, object]:
        return {tag: value for tag, value in dataset.to_json_dict().items()
                if keyword_for_tag(int(tag, 16)) not in per_build}

    assert fixed(ours) == fixed(theirs)


def test_seg_rejects_heatmaps_of_the_wrong_shape_or_kind(sources: list[pydicom.Dataset]) -> None:
    source = sources[0]
    arguments = {"series_instance_uid": "1.2.3", "sop_instance_uid": "1.2.3.4", "series_number": 1,
                 "instance_number": 1}
    with pytest.raises(ValueError, match="not uint8 levels of the source image"):
        build_heatmap_seg(source, {"mass": np.zeros((10, 10), np.uint8)}, MODEL, **arguments)
    with pytest.raises(ValueError, match="not uint8 levels of the source image"):
        build_heatmap_seg(source, {"mass": np.zeros((source.Rows, source.Columns), np.float32)}, MODEL, **arguments)
    with pytest.raises(ValueError, match="no segment code"):
        build_heatmap_seg(source, {"density": np.zeros((source.Rows, source.Columns), np.uint8)}, MODEL,
                          **arguments)


@pytest.fixture
def result_files(tmp_path: Path, sources: list[pydicom.Dataset]) -> list[Path]:
    """An SR of the four views and the (JPEG-LS) SEG of the first, as the node writes them."""
    return [write_sr(make_findings(sources), sources, tmp_path / "sr.dcm"),
            write_seg(sources[0], heatmaps_for(sources[0]), tmp_path / "seg.dcm")]


def test_storescp_accepts_the_sr_and_the_seg(tmp_path: Path, result_files: list[Path]) -> None:
    pacs = StoreSCP(tmp_path / "received").start()
    try:
        ae = AE(ae_title="MAMMO_AI")
        ae.add_requested_context(Comprehensive3DSRStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(SegmentationStorage, TRANSFER_SYNTAX)
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title="PACS")
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in result_files]
        finally:
            assoc.release()
    finally:
        pacs.stop()
    assert statuses == [0, 0]
    received = {ds.SOPInstanceUID for ds in pacs.received()}
    assert received == {pydicom.dcmread(path).SOPInstanceUID for path in result_files}


def test_orthanc_accepts_the_sr_and_the_seg_from_the_export_path(tmp_path: Path, result_files: list[Path]) -> None:
    from dicom_node.scu import send_files
    from dicom_node.settings import Destination

    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        outcomes = send_files(Destination(name="orthanc", ae_title="ORTHANC", host="127.0.0.1",
                                          port=orthanc.dicom_port), result_files, "MAMMO_AI")
        stored = orthanc.stored()
    finally:
        orthanc.stop()
    assert [outcome.status for outcome in outcomes] == [0, 0]
    sr, seg = (pydicom.dcmread(path) for path in result_files)
    assert set(stored) == {sr.SOPInstanceUID, seg.SOPInstanceUID}
    assert stored[sr.SOPInstanceUID]["SOPClassUID"] == Comprehensive3DSRStorage
    assert stored[seg.SOPInstanceUID]["SOPClassUID"] == SegmentationStorage
    assert stored[seg.SOPInstanceUID]["SegmentationType"] == "FRACTIONAL"
    assert stored[seg.SOPInstanceUID]["TransferSyntax"] == str(TRANSFER_SYNTAX)  # taken as sent, no fallback
    assert stored[sr.SOPInstanceUID]["StudyInstanceUID"] == sr.StudyInstanceUID


def test_overlay_png_is_written_at_display_size(tmp_path: Path, sources: list[pydicom.Dataset]) -> None:
    source = sources[0]
    path = heatmap_overlay_png(source, heatmaps_for(source)["malignancy"], tmp_path / "png" / "LCC.png", "LCC 0.42")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width == source.Columns and source.Rows < image.height < source.Rows + 120


def test_overlay_png_of_a_large_image_is_at_most_1024_pixels_high(tmp_path: Path,
                                                                   sources: list[pydicom.Dataset]) -> None:
    large = pydicom.dcmread(sources[0].filename)  # 256 x 160 upscaled 5 times: 1280 x 800
    pixels = np.repeat(np.repeat(large.pixel_array, 5, axis=0), 5, axis=1)
    large.Rows, large.Columns = pixels.shape
    large.PixelData = pixels.tobytes()
    heatmap = np.zeros(pixels.shape, np.float32)
    heatmap[400:600, 300:500] = 0.9
    path = heatmap_overlay_png(large, heatmap, tmp_path / "large.png", "LCC malignancy 0.90")
    with Image.open(path) as image:
        assert image.width == 640 and 1024 < image.height <= 1024 + 120
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    red_minus_blue = rgb[..., 0] - rgb[..., 2]
    assert red_minus_blue.max() > 100  # the hot spot is drawn in red over the gray mammogram


def test_a_compressed_seg_is_sent_uncompressed_to_a_peer_without_that_syntax(
        tmp_path: Path, sources: list[pydicom.Dataset]) -> None:
    from dicom_node.demo import LocalReceiver
    from dicom_node.scu import send_files
    from dicom_node.settings import Destination

    path = write_seg(sources[0], heatmaps_for(sources[0]), tmp_path / "seg.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == TRANSFER_SYNTAX  # compressed on disk
    receiver = LocalReceiver(tmp_path / "pacs", compressed=False)  # accepts uncompressed syntaxes only
    port = receiver.start()
    try:
        (outcome,) = send_files(Destination(name="p", ae_title="DEMO_PACS", host="127.0.0.1", port=port),
                                [path], "MAMMO_AI")
    finally:
        receiver.stop()
    assert outcome.stored
    (received,) = (tmp_path / "pacs").glob("*.dcm")
    ds = pydicom.dcmread(received)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    # Lossless decompression keeps the instance: the worklist tracks delivery by this UID.
    assert ds.SOPInstanceUID == outcome.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(path).pixel_array)


def test_unparseable_patient_values_are_left_empty_and_the_sr_still_validates(
        tmp_path: Path, sources: list[pydicom.Dataset]) -> None:
    """A sender's ACR-NEMA birth date, a time with colons and a sex of U failed highdicom before: the writer's
    path empties them (Type 2) and the SR passes dciodvfy."""
    from dicom_node.results.writer import SrRequest, without_pixels
    from dicom_node.results.writer import write_sr as write_request

    headers = [copy.deepcopy(without_pixels(source)) for source in sources]  # setting a value changes its element
    for header in headers:
        header.PatientBirthDate, header.StudyTime, header.PatientSex = "1941-03-02", "12:30:00", "U"
    findings = make_findings(sources)
    path = write_request(SrRequest(findings, headers, generate_uid(), generate_uid(), tmp_path / "sr.dcm"))
    errors, warnings = dciodvfy(path)
    assert errors == [], errors  # and one more warning than assert_valid allows: an empty Study Time
    assert [line for line in warnings if "Device UID" not in line and "Standard Extended SOP Class" not in line] == [
        "Warning - Missing attribute or value that would be needed to build DICOMDIR - Study Time"]
    sr = pydicom.dcmread(path)
    assert (sr.PatientBirthDate, sr.StudyTime, sr.PatientSex) == ("", "", "")
    assert (sr.PatientID, sr.PatientName) == (sources[0].PatientID, sources[0].PatientName)


def _geometry(header: pydicom.Dataset, variant: str) -> None:
    if variant == "frame of reference on a 2D view":
        header.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    elif variant == "pixel spacing of zeros":
        header.PixelSpacing = ["0", "0"]
    elif variant == "pixel spacing of one value":
        header.PixelSpacing = "0.1"
    elif variant == "imager pixel spacing absent":
        del header.ImagerPixelSpacing
    elif variant == "patient orientation of one value":
        header.PatientOrientation = "A"
    else:
        del header.PatientOrientation


@pytest.mark.parametrize("variant", ["frame of reference on a 2D view", "pixel spacing of zeros",
                                     "pixel spacing of one value", "imager pixel spacing absent",
                                     "patient orientation of one value", "patient orientation absent"])
def test_unusable_image_geometry_is_left_out_and_the_results_still_validate(
        tmp_path: Path, sources: list[pydicom.Dataset], variant: str) -> None:
    """Geometry highdicom copies or reads as sent failed the whole analysis (the SR's image library read two
    values of Patient Orientation and Imager Pixel Spacing) or made a SEG dciodvfy refuses."""
    from dicom_node.results.writer import SegRequest, SrRequest, without_pixels
    from dicom_node.results.writer import write_seg as write_seg_request
    from dicom_node.results.writer import write_sr as write_sr_request

    headers = [copy.deepcopy(without_pixels(source)) for source in sources]
    for header in headers:
        _geometry(header, variant)
    sr = write_sr_request(SrRequest(make_findings(sources), headers, generate_uid(), generate_uid(),
                                    tmp_path / "sr.dcm"))
    assert dciodvfy(sr)[0] == []
    source = headers[0]
    box = CropBox(0, int(source.Rows), 0, int(source.Columns), (int(source.Rows), int(source.Columns)))
    maps = {task: np.full((32, 24), 0.5, dtype=np.float32) for task in FINDING_TASKS}
    seg = write_seg_request(SegRequest(source, maps, box, MODEL, {}, generate_uid(), generate_uid(), 1,
                                       tmp_path / "seg.dcm"))
    assert dciodvfy(seg)[0] == []
    written = pydicom.dcmread(seg, stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in written and len(written.PatientOrientation or []) in (0, 2)


def test_a_character_set_highdicom_refuses_is_written_as_utf8_with_the_names_as_sent(
        tmp_path: Path, sources: list[pydicom.Dataset]) -> None:
    """Japanese with the default repertoire first (a valid empty first value) failed highdicom's check before."""
    from dicom_node.results.writer import SrRequest, without_pixels
    from dicom_node.results.writer import write_sr as write_request

    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    headers = [copy.deepcopy(without_pixels(source)) for source in sources]  # setting a value changes its element
    for header in headers:
        header.SpecificCharacterSet, header.PatientName = ["", "ISO 2022 IR 87"], name
    path = write_request(SrRequest(make_findings(sources), headers, generate_uid(), generate_uid(),
                                   tmp_path / "sr.dcm"))
    assert_valid(path)
    sr = pydicom.dcmread(path)
    assert (sr.SpecificCharacterSet, str(sr.PatientName)) == ("ISO_IR 192", name)


def test_an_export_the_pacs_cannot_take_fails_visibly_and_the_rest_is_delivered_once(
        tmp_path: Path, result_files: list[Path]) -> None:
    """A PACS that stores SRs but not Segmentation Storage, and a result file that has gone: the SR is
    delivered once, the SEG and the missing file fail with their reason (FAILED once the attempts are spent);
    nothing stays PENDING under its claim, and the delivered SR is not sent again."""
    from datetime import timedelta

    from sqlalchemy import select, update

    from dicom_node import tasks
    from dicom_node.demo import LocalReceiver
    from dicom_node.settings import Destination, Settings
    from tests.test_worklist_state import ready_job
    from worklist.db import make_engine, session_factory, upgrade
    from worklist.models import Export, ExportState, utcnow
    from worklist.state import claim_job, complete_job

    receiver = LocalReceiver(tmp_path / "pacs")
    receiver.ae.remove_supported_context(SegmentationStorage)
    received: list[str] = []
    store = receiver._store
    receiver._store = lambda event: (received.append(str(event.request.AffectedSOPInstanceUID)), store(event))[1]
    port = receiver.start()
    settings = Settings(data_dir=tmp_path / "node", export_max_attempts=2, destinations=[
        Destination(name="pacs", ae_title=receiver.ae.ae_title, host="127.0.0.1", port=port)])
    settings.data_dir.mkdir()
    engine = make_engine(settings.database_url())
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        job_id = ready_job(sessions, "1.2.3.99")
        claim = claim_job(sessions, job_id, "host:1", timedelta(seconds=60))
        sr_uid, seg_uid = (str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in result_files)
        complete_job(sessions, claim, {}, 0.5, {}, "m", [("pacs", sr_uid, str(result_files[0])),
                                                         ("pacs", seg_uid, str(result_files[1])),
                                                         ("pacs", "1.2.9.9", str(tmp_path / "gone.dcm"))])

        def exports() -> dict[str, Export]:
            with sessions() as session:
                return {row.sop_instance_uid: row for row in session.scalars(select(Export))}

        tasks.configure(settings)
        tasks.export_results.apply(args=(job_id,))
        first = exports()
        assert first[sr_uid].state == ExportState.DELIVERED and received == [sr_uid]
        assert first[seg_uid].state == ExportState.PENDING and first[seg_uid].attempts == 1
        assert "accepted no presentation context for Segmentation Storage" in first[seg_uid].error
        assert first["1.2.9.9"].state == ExportState.PENDING and "cannot be read" in first["1.2.9.9"].error
        with sessions.begin() as session:  # their backoff has passed
            session.execute(update(Export).where(Export.state == ExportState.PENDING)
                            .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        tasks.export_results.apply(args=(job_id,))
        second = exports()
        assert {uid: row.state for uid, row in second.items()} == {
            sr_uid: ExportState.DELIVERED, seg_uid: ExportState.FAILED, "1.2.9.9": ExportState.FAILED}
        assert second[seg_uid].attempts == 2 and received == [sr_uid]  # the SR was not sent again
    finally:
        receiver.stop()
        engine.dispose()


def test_the_warning_statuses_of_c_store_mean_stored() -> None:
    from dicom_node.scu import NOT_SENT, SendOutcome

    def outcome(status: int, problem: str | None = None) -> SendOutcome:
        return SendOutcome(Path("SR.dcm"), "1.2.3", status, problem)

    assert all(outcome(status).stored for status in (0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB007))
    assert not any(outcome(status).stored for status in (0xA700, 0xA900, 0xC000, 0x0122, NOT_SENT))
    assert (outcome(0xA700).describe(), outcome(NOT_SENT).describe()) == ("status 0xA700", "no answer")
    assert outcome(NOT_SENT, "not sent: its file cannot be read").describe() == "not sent: its file cannot be read"


def test_a_result_is_clinical_only_when_every_model_behind_it_is(sources: list[pydicom.Dataset]) -> None:
    """A research head (finetune marks its card not clinical) on a clinical base model: the study's scores are
    not clinical, and the triage page says so."""
    import dataclasses

    from worklist.triage import result_is_clinical

    findings = make_findings(sources)
    findings.model = dataclasses.replace(MODEL, clinical=True)
    assert findings.clinical and result_is_clinical(findings.to_dict()) is True
    findings.sources["malignancy"] = dataclasses.replace(MODEL, name="Mammo-CLIP malignancy head", clinical=False)
    assert not findings.clinical and result_is_clinical(findings.to_dict()) is False
    legacy = {key: value for key, value in findings.to_dict().items() if key != "clinical"}
    assert result_is_clinical(legacy) is True  # a result recorded before: the base model's flag
