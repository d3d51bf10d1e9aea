"""The result writer's helper processes build exactly the SR and SEGs the worker would build itself."""

from __future__ import annotations

import copy
import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from dicom_node.results.writer import (
    ResultWriter,
    SegRequest,
    SrRequest,
    without_pixels,
    write_seg,
    write_sr,
)
from models.crop import CropBox
from tests.test_results import MODEL, assert_valid, make_findings


@pytest.fixture(scope="module")
def views(synthetic_root: Path) -> list[pydicom.Dataset]:
    """The four views (256 x 160) of the first synthetic study."""
    study = sorted(path for path in synthetic_root.iterdir() if path.is_dir())[0]
    return [pydicom.dcmread(path) for path in sorted(study.glob("*.dcm"))]


def model_maps(seed: int = 3) -> dict[str, np.ndarray]:
    """Heatmaps over a 48 x 30 model input, as the analysis hands them to the writer."""
    rng = np.random.default_rng(seed)
    return {task: rng.random((48, 30), dtype=np.float32) for task in ("malignancy", "mass", "calcification")}


def crop_of(source: pydicom.Dataset) -> CropBox:
    return CropBox(10, int(source.Rows) - 20, 5, int(source.Columns) - 30, (int(source.Rows), int(source.Columns)))


def requests(sources: list[pydicom.Dataset], folder: Path) -> list[SegRequest | SrRequest]:
    series = generate_uid(entropy_srcs=["seg series"])
    segs = [SegRequest(without_pixels(source), model_maps(), crop_of(source), MODEL, {}, series,
                       generate_uid(entropy_srcs=[source.SOPInstanceUID, "seg"]), number, folder / f"SEG_{number}.dcm")
            for number, source in enumerate(sources, start=1)]
    sr = SrRequest(make_findings(sources), [without_pixels(source) for source in sources],
                   generate_uid(entropy_srcs=["sr series"]), generate_uid(entropy_srcs=["sr"]), folder / "SR.dcm")
    return [*segs, sr]


def write_all(writer: ResultWriter, sources: list[pydicom.Dataset], folder: Path) -> list[Path]:
    return writer.wait([writer.submit(write_sr if isinstance(request, SrRequest) else write_seg, request)
                        for request in requests(sources, folder)])


def test_helper_processes_write_the_objects_the_worker_would(tmp_path: Path, views: list[pydicom.Dataset]) -> None:
    pool = ResultWriter(2)
    try:
        in_helpers = write_all(pool, views, tmp_path / "helpers")
    finally:
        pool.reset()
    in_worker = write_all(ResultWriter(0), views, tmp_path / "worker")
    for helper_path, worker_path, source in zip(in_helpers[:-1], in_worker[:-1], views, strict=True):
        assert_valid(helper_path)
        helper_seg, worker_seg = pydicom.dcmread(helper_path), pydicom.dcmread(worker_path)
        # The maps pasted back over the source (zero outside the crop), in the fractional SEG's 0..255 steps.
        pasted = [crop_of(source).paste(values) for values in model_maps().values()]
        expected = np.around(np.clip(np.stack(pasted), 0.0, 1.0) * 255).astype(np.uint8)
        assert expected[:, :10].max() == 0 and expected.max() > 200
        assert np.array_equal(helper_seg.pixel_array, expected) and np.array_equal(worker_seg.pixel_array, expected)
        assert helper_seg.SOPInstanceUID == worker_seg.SOPInstanceUID
    helper_sr, worker_sr = pydicom.dcmread(in_helpers[-1]), pydicom.dcmread(in_worker[-1])
    assert_valid(in_helpers[-1])
    assert helper_sr.ContentSequence == worker_sr.ContentSequence
    assert helper_sr.CurrentRequestedProcedureEvidenceSequence == worker_sr.CurrentRequestedProcedureEvidenceSequence


def _die(request: SegRequest) -> Path:
    os._exit(3)


def test_a_dead_helper_fails_that_job_and_the_next_job_gets_a_new_pool(tmp_path: Path,
                                                                        views: list[pydicom.Dataset]) -> None:
    pool = ResultWriter(1)
    try:
        seg = next(request for request in requests(views, tmp_path) if isinstance(request, SegRequest))
        with pytest.raises(BrokenProcessPool):
            pool.wait([pool.submit(_die, seg)])
        assert pool.wait([pool.submit(write_seg, seg)]) == [seg.path]
        assert pydicom.dcmread(seg.path).SOPInstanceUID == seg.sop_instance_uid
    finally:
        pool.reset()


def test_start_brings_up_the_helpers_before_the_first_job() -> None:
    pool = ResultWriter(2)
    try:
        helpers = pool.start()
        assert 1 <= len(helpers) <= 2 and os.getpid() not in helpers
        assert all(Path(f"/proc/{pid}").exists() for pid in helpers)
    finally:
        pool.reset()
    assert ResultWriter(0).start() == []


@pytest.mark.parametrize(("character_set", "name", "meaning"), [
    ("ISO-IR 100", "Müller^Anna", "Mammographie bilatérale"),  # misspelt: pydicom reads it as ISO_IR 100
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "マンモグラフィ")])  # Japanese, the default repertoire first
def test_a_seg_in_utf8_keeps_the_senders_text_in_sequences_too(tmp_path: Path, views: list[pydicom.Dataset],
                                                              character_set: str | list[str], name: str,
                                                              meaning: str) -> None:
    """highdicom shares the source's sequences (Procedure Code here) into the SEG: their text, still as the sender
    encoded it, must be read in the sender's character set before the SEG is written in UTF-8."""
    sent = copy.deepcopy(views[0])
    sent.SpecificCharacterSet, sent.PatientName = character_set, name
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "24606-6", "LN", meaning
    sent.ProcedureCodeSequence = [code]
    buffer = DicomBytesIO()
    sent.save_as(buffer, enforce_file_format=True)
    header = without_pixels(pydicom.dcmread(DicomBytesIO(buffer.getvalue())))
    path = write_seg(SegRequest(header, model_maps(), crop_of(sent), MODEL, {}, generate_uid(), generate_uid(), 1,
                                tmp_path / "SEG.dcm"))
    assert_valid(path)
    seg = pydicom.dcmread(path)
    assert (seg.SpecificCharacterSet, str(seg.PatientName)) == ("ISO_IR 192", name)
    assert seg.ProcedureCodeSequence[0].CodeMeaning == meaning
