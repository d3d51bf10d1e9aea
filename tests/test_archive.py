"""Archive indexing and conversion on a real folder tree of synthetic studies, reports and junk files."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from models.preprocess import PreprocessConfig, dicom_to_uint8
from training.archive.indexer import index_archive
from training.archive.store import ArchiveImage, ArchiveSkip, ArchiveStudy, open_index
from training.convert import convert_archive
from training.synthetic import write_studies

CONFIG = PreprocessConfig(height=64, width=48)
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _text_sr(source: Path, text: str, path: Path) -> None:
    """A Basic Text SR carrying the study's report, as a RIS might archive it beside the images."""
    image = pydicom.dcmread(source, stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.StudyInstanceUID, ds.AccessionNumber = "SR", image.StudyInstanceUID, image.AccessionNumber
    ds.SeriesInstanceUID, ds.ValueType = generate_uid(), "CONTAINER"
    item = Dataset()
    item.ValueType, item.TextValue = "TEXT", text
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = [concept]
    ds.ContentSequence = [item]
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PACS-export-like tree: studies nested by year, reports in three forms, and files to skip."""
    source = tmp_path_factory.mktemp("synthetic")
    manifest = write_studies(source, 12, seed=4242, rows=256, cols=160, progress=False)
    rows = list(csv.DictReader(manifest.open()))
    root = tmp_path_factory.mktemp("archive")
    accessions = sorted({row["accession_number"] for row in rows})
    reports = root.parent / f"{root.name}-reports"
    reports.mkdir()
    table = []
    for number, accession in enumerate(accessions):
        folder = root / str(2020 + number % 3) / f"study{number:03d}"
        folder.mkdir(parents=True)
        for path in sorted((source / accession).glob("*.dcm")):
            shutil.copy(path, folder / f"IM{path.stem}")  # no extension, as PACS exports often are
        text = (source / accession / "report.txt").read_text()
        if number < 4:
            _text_sr(next(folder.iterdir()), text, folder / "SR0001")
        elif number < 8:
            table.append({"AccessionNumber": accession, "Report": text})
        else:
            (reports / f"{accession}.txt").write_text(text)
    with (reports / "ris.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["AccessionNumber", "Report"])
        writer.writeheader()
        writer.writerows(table)
    other = pydicom.dcmread(next((root / "2020").rglob("IM*")))
    other.Modality, other.SOPInstanceUID = "CT", generate_uid()
    other.save_as(root / "2020" / "ct_slice")
    (root / "2021" / "notes.txt").write_text("not dicom")
    (root / ".hidden").write_text("ignored")
    return {"root": root, "reports": reports, "manifest": manifest, "source": source}


def _index(tmp_path: Path, archive: dict[str, Path], reports: Path | None, labels: Path | None = None):
    sessions = open_index(tmp_path / "index")
    return sessions, index_archive(archive["root"], sessions, reports, labels, seed=7, progress=False)


def test_index_finds_images_pairs_reports_and_says_what_it_skipped(tmp_path: Path, archive: dict[str, Path]) -> None:
    sessions, summary = _index(tmp_path, archive, archive["reports"] / "ris.csv")
    assert (summary.images, summary.studies, summary.new_images) == (48, 12, 48)
    assert summary.report_objects == 4
    assert summary.skipped == {"modality CT, not MG": 1, "not a readable DICOM file": 1}
    assert summary.with_report == 8  # 4 text SRs in the archive + 4 rows of the CSV; the .txt folder not given
    with sessions() as session:
        skipped = {Path(row.path).name: row.reason for row in session.scalars(select(ArchiveSkip))}
        studies = session.scalars(select(ArchiveStudy)).all()
        assert {len(study.images) for study in studies} == {4}
        views = {(image.laterality, image.view) for study in studies for image in study.images}
    assert skipped == {"ct_slice": "modality CT, not MG", "notes.txt": "not a readable DICOM file"}
    assert views == {("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}
    manifest = list(csv.DictReader(archive["manifest"].open()))
    truth = {(row["study_instance_uid"], row["laterality"]): row for row in manifest}
    reported = [study for study in studies if study.report_text]
    assert len(reported) == 8 and all(study.label_source == "report" for study in reported)
    for study in reported:  # labels read from the report text agree with the phantom's ground truth
        assert study.labels["density"] == truth[(study.study_instance_uid, "L")]["density"]
        for side in ("L", "R"):
            row = truth[(study.study_instance_uid, side)]
            assert study.labels[side]["mass"] == int(row["mass"]), (study.report_text, side)
            assert study.labels[side]["calcification"] == int(row["calcification"]), (study.report_text, side)
            assert study.labels[side]["malignant"] is None  # a report states BI-RADS, not pathology
    assert all(len(study.patient_key) == 32 for study in studies)
    assert not {row["patient_id"] for row in manifest} & {study.patient_key for study in studies}  # hashed


def test_reports_from_a_folder_of_text_files_and_labels_from_a_label_table(
        tmp_path: Path, archive: dict[str, Path]) -> None:
    sessions, summary = _index(tmp_path, archive, archive["reports"], archive["manifest"])
    assert summary.with_report == 8 and summary.labelled == 12  # 4 SRs + 4 text files; the table labels all
    truth = {(row["study_instance_uid"], row["laterality"]): row for row in csv.DictReader(archive["manifest"].open())}
    with sessions() as session:
        for study in session.scalars(select(ArchiveStudy)):
            assert study.label_source == "label table manifest.csv"
            for side in ("L", "R"):
                row = truth[(study.study_instance_uid, side)]
                assert study.labels[side]["mass"] == int(row["mass"])
                assert study.labels[side]["malignant"] == int(row["malignant"])
                assert study.labels[side]["birads"] == int(row["birads"])
            assert study.labels["density"] == truth[(study.study_instance_uid, "L")]["density"]


def test_split_is_by_patient_and_survives_reindexing(tmp_path: Path, archive: dict[str, Path]) -> None:
    sessions, summary = _index(tmp_path, archive, None, archive["manifest"])
    assert sum(summary.splits.values()) == 12 and set(summary.splits) <= {"train", "validation", "test"}
    with sessions() as session:
        first = {s.study_instance_uid: (s.patient_key, s.split) for s in session.scalars(select(ArchiveStudy))}
    by_patient: dict[str, set[str]] = {}
    for patient, split in first.values():
        by_patient.setdefault(patient, set()).add(split)
    assert all(len(splits) == 1 for splits in by_patient.values())
    again = index_archive(archive["root"], sessions, None, archive["manifest"], seed=99, progress=False)
    assert again.new_images == 0 and again.images == 48
    with sessions() as session:
        second = {s.study_instance_uid: (s.patient_key, s.split) for s in session.scalars(select(ArchiveStudy))}
    assert second == first  # same salt, same split seed (fixed at the first run), same assignments


def test_convert_uses_the_inference_preprocessing_and_resumes(tmp_path: Path, archive: dict[str, Path]) -> None:
    sessions, _ = _index(tmp_path, archive, None)
    with sessions.begin() as session:  # one image is broken after indexing: its conversion fails, named
        broken = session.scalars(select(ArchiveImage).order_by(ArchiveImage.id)).first()
        broken_copy = tmp_path / "broken.dcm"
        broken_copy.write_bytes(Path(broken.path).read_bytes()[:2000])
        broken.path = str(broken_copy)
    first = convert_archive(sessions, tmp_path / "cache", CONFIG, workers=2, progress=False)
    assert (first.converted, first.failed, first.already_current) == (47, 1, 0)
    with sessions() as session:
        images = session.scalars(select(ArchiveImage).where(ArchiveImage.cache_path.is_not(None))).all()
        failed = session.scalars(select(ArchiveImage).where(ArchiveImage.convert_error.is_not(None))).one()
    assert "ImageDecodeError" in failed.convert_error or "Error" in failed.convert_error
    sample = images[3]
    cached = np.load(sample.cache_path, mmap_mode="r")
    assert cached.dtype == np.uint8 and cached.shape == (64, 48)
    np.testing.assert_array_equal(cached, dicom_to_uint8(Path(sample.path), CONFIG))
    second = convert_archive(sessions, tmp_path / "cache", CONFIG, workers=1, progress=False)
    assert (second.converted, second.failed, second.already_current) == (0, 0, 48)
    bigger = convert_archive(sessions, tmp_path / "cache", PreprocessConfig(height=96, width=64), workers=1,
                             progress=False)
    assert bigger.converted == 47 and bigger.cache_folder != first.cache_folder  # a new size: a new folder
    back = convert_archive(sessions, tmp_path / "cache", CONFIG, workers=1, progress=False)
    assert (back.converted, back.reused, back.already_current) == (0, 47, 1)  # the first size's files, re-pointed
    with sessions() as session:
        assert np.array_equal(np.load(session.get(ArchiveImage, sample.id).cache_path), cached)
    touched = Path(sample.path)  # a source changed after its conversion is converted again, not reused
    os.utime(touched, ns=(time.time_ns() + 10**9,) * 2)
    again = convert_archive(sessions, tmp_path / "cache", PreprocessConfig(height=96, width=64), workers=1,
                            progress=False)
    assert (again.converted, again.reused) == (1, 46)


def test_cli_index_convert_show(tmp_path: Path, archive: dict[str, Path]) -> None:
    env = {"MAMMO_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "archive", *args], capture_output=True,
                              text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parent.parent)

    indexed = run("index", str(archive["root"]), "--labels", str(archive["manifest"]))
    assert indexed.returncode == 0, indexed.stderr
    assert "48 screening images (48 new) in 12 studies" in indexed.stdout and "modality CT, not MG" in indexed.stdout
    converted = run("convert", "--size", "64x64", "--workers", "1")
    assert converted.returncode == 0 and "converted 48, failed 0" in converted.stdout, converted.stderr
    shown = run("show")
    assert "12 studies of 12 patients, 48 images" in shown.stdout and "converted: 48" in shown.stdout
    missing = run("show", "--index", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "run `mammo-node archive index` first" in missing.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,hello\n")
    refused = run("index", str(archive["root"]), "--reports", str(bad), "--index", str(tmp_path / "other"))
    assert refused.returncode != 0 and "expected a key column" in refused.stderr
