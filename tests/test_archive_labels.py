"""`archive index --labels` with VinDr-Mammo and RSNA label CSVs: layout from the header, rows matched to the
indexed studies by image file name, then study folder, and report text synthesized for label-only studies."""

from __future__ import annotations

import csv
import hashlib
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select, text

from dicom_node.cli import main
from models.errors import ConfigurationError
from training.archive.indexer import index_archive
from training.archive.labels import labels_from_report, read_label_table
from training.archive.split import patient_key, stratum, stratum_rank
from training.archive.store import (
    SCHEMA_VERSION,
    SYNTHESIZED_REPORT,
    ArchiveMeta,
    ArchiveStudy,
    IndexBase,
    get_meta,
    open_index,
)
from training.reports import BreastLabels, synthesize_breast_report
from training.synthetic import write_studies
from worklist.db import make_engine

VINDR_BREAST = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                "breast_birads", "breast_density", "split"]
VINDR_FINDING = ["image_id", "study_id", "series_id", "laterality", "view_position", "height", "width",
                 "breast_birads", "breast_density", "finding_categories", "finding_birads", "xmin", "ymin", "xmax",
                 "ymax", "split"]
RSNA = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive", "BIRADS",
        "implant", "density", "machine_id", "difficult_negative_case"]


def _hex(*parts: object) -> str:
    return hashlib.md5(":".join(map(str, parts)).encode()).hexdigest()


def _write(path: Path, header: list[str], rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _breast(row: dict[str, str]) -> BreastLabels:
    """What the VinDr finding annotations of a manifest row say (malignant: VinDr's proxy, ``vindr_malignant``)."""
    malignant = vindr_malignant(row["birads"])
    return BreastLabels("", row["laterality"], mass=row["mass"] == "1", calcification=row["calcification"] == "1",
                        malignant=None if malignant is None else bool(malignant), density=row["density"],
                        birads=int(row["birads"]))


def _categories(row: dict[str, str]) -> str:
    names = (("mass", "Mass"), ("calcification", "Suspicious Calcification"))
    found = [name for flag, name in names if row[flag] == "1"]
    return str(found or ["No Finding"])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """Six synthetic four-view studies and their manifest rows (one per image)."""
    folder = tmp_path_factory.mktemp("synthetic")
    manifest = write_studies(folder, 6, seed=5151, rows=128, cols=96, progress=False)
    return folder, list(csv.DictReader(manifest.open()))


@pytest.fixture(scope="module")
def vindr(source: tuple[Path, list[dict[str, str]]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The VinDr release layout ``images/<study_id>/<image_id>.dicom`` with both annotation files.

    Studies 0-3 are named as in the CSVs; study 4's files are renamed (only its folder names it); study 5 is not
    in the CSVs; the CSVs also label a study that is not in the archive. Study 3 has a report."""
    folder, rows = source
    root = tmp_path_factory.mktemp("vindr")
    studies = sorted({row["study_instance_uid"] for row in rows})
    breast_rows, finding_rows, truth = [], [], {}
    for number, row in enumerate(rows):
        study = studies.index(row["study_instance_uid"])
        study_id, image_id = _hex("study", study), _hex("image", row["sop_instance_uid"])
        (root / "images" / study_id).mkdir(parents=True, exist_ok=True)
        name = f"IMG{number:04d}" if study == 4 else image_id
        shutil.copy(folder / row["path"], root / "images" / study_id / f"{name}.dicom")
        if study == 5:
            continue
        common = {"study_id": study_id, "series_id": _hex("series", study), "image_id": image_id,
                  "laterality": row["laterality"], "view_position": row["view"], "height": 128, "width": 96,
                  "breast_birads": f"BI-RADS {row['birads']}", "breast_density": f"DENSITY {row['density']}",
                  "split": "training"}
        breast_rows.append(common)
        finding_rows.append({**common, "finding_categories": _categories(row), "finding_birads": ""})
        truth[(row["study_instance_uid"], row["laterality"])] = row
    ghost = {"study_id": _hex("ghost"), "series_id": "x", "laterality": "L", "view_position": "CC", "height": 1,
             "width": 1, "breast_birads": "BI-RADS 1", "breast_density": "DENSITY A", "split": "test"}
    breast_rows += [{**ghost, "image_id": _hex("ghost", side), "laterality": side} for side in "LR"]
    finding_rows += [{**ghost, "image_id": _hex("ghost", side), "laterality": side,
                      "finding_categories": "['No Finding']", "finding_birads": ""} for side in "LR"]
    reports = root.parent / f"{root.name}-reports"
    reports.mkdir()
    accession = next(row["accession_number"] for row in rows if row["study_instance_uid"] == studies[3])
    shutil.copy(folder / accession / "report.txt", reports / f"{accession}.txt")
    return {"root": root, "studies": studies, "truth": truth, "reports": reports,
            "breast": _write(root / "breast-level_annotations.csv", VINDR_BREAST, breast_rows),
            "finding": _write(root / "finding_annotations.csv", VINDR_FINDING, finding_rows)}


@pytest.fixture(scope="module")
def rsna(source: tuple[Path, list[dict[str, str]]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The RSNA layout ``train_images/<patient_id>/<image_id>.dcm`` and its train.csv, with one patient too many."""
    folder, rows = source
    root = tmp_path_factory.mktemp("rsna")
    patients = {uid: str(10000 + 6 * number) for number, uid in
                enumerate(sorted({row["study_instance_uid"] for row in rows}))}
    table = []
    for number, row in enumerate(rows):
        patient, image_id = patients[row["study_instance_uid"]], str(462822612 + 7919 * number)
        (root / "train_images" / patient).mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / row["path"], root / "train_images" / patient / f"{image_id}.dcm")
        table.append({"site_id": 2, "patient_id": patient, "image_id": image_id, "laterality": row["laterality"],
                      "view": row["view"], "age": "61.0", "cancer": row["malignant"], "biopsy": row["malignant"],
                      "invasive": 0, "BIRADS": "", "implant": 0, "density": row["density"], "machine_id": 49,
                      "difficult_negative_case": "False"})
    table.append({**table[-1], "patient_id": "99999", "image_id": "1"})
    return {"root": root, "patients": patients, "truth": {(r["study_instance_uid"], r["laterality"]): r for r in rows},
            "labels": _write(root / "train.csv", RSNA, table)}


def _studies(sessions) -> dict[str, ArchiveStudy]:
    with sessions() as session:
        return {study.study_instance_uid: study for study in session.scalars(select(ArchiveStudy))}


def _snapshot(sessions) -> dict[str, tuple[object, ...]]:
    return {uid: (s.labels, s.label_source, s.report_text, s.report_source, s.split)
            for uid, s in _studies(sessions).items()}


def test_vindr_finding_annotations_label_each_breast_and_give_label_only_studies_a_report(
        tmp_path: Path, vindr: dict[str, object]) -> None:
    sessions = open_index(tmp_path / "index")
    summary = index_archive(vindr["root"], sessions, vindr["reports"], vindr["finding"], progress=False)
    assert (summary.images, summary.studies) == (24, 6)
    assert (summary.label_file, summary.label_studies, summary.unmatched_labels, summary.label_breasts) == (
        "finding_annotations.csv", 5, 2, 12)
    assert "labels: 5 studies from finding_annotations.csv, 2 of its 12 labelled breasts matched no indexed study" \
        in summary.lines()
    assert (summary.with_report, summary.synthesized, summary.labelled) == (1, 4, 5)
    studies, uids = _studies(sessions), vindr["studies"]
    for number, uid in enumerate(uids[:5]):  # 0-3 by image_id, 4 by its study folder
        study = studies[uid]
        assert study.label_source == "label table finding_annotations.csv"
        for side in ("L", "R"):
            row = vindr["truth"][(uid, side)]
            assert study.labels[side] == {"mass": int(row["mass"]), "calcification": int(row["calcification"]),
                                          "malignant": vindr_malignant(row["birads"]), "birads": int(row["birads"])}
        assert study.labels["density"] == vindr["truth"][(uid, "L")]["density"]
        if number == 3:  # a real report is kept; the table's labels still win over the ones read from it
            assert study.report_source.endswith(".txt") and "FINDINGS" in study.report_text.upper()
        else:  # right breast then left, phrased by breast_text, seeded by the study: the same text every run
            assert study.report_source == SYNTHESIZED_REPORT + "finding_annotations.csv"
            rng = random.Random(uid)
            texts = (synthesize_breast_report(_breast(vindr["truth"][(uid, side)]), rng) for side in ("R", "L"))
            assert study.report_text == " ".join(text for text in texts if text)  # BI-RADS 4: no text
    assert studies[uids[5]].labels is None and studies[uids[5]].report_text is None  # not in the CSVs

    before = _snapshot(sessions)
    again = index_archive(vindr["root"], sessions, vindr["reports"], vindr["finding"], seed=3, progress=False)
    assert again.new_images == 0 and _snapshot(sessions) == before  # same labels, texts and splits
    assert (again.with_report, again.synthesized, again.label_studies) == (1, 4, 5)
    unlabelled = index_archive(vindr["root"], sessions, None, None, progress=False)
    assert unlabelled.label_file is None and _snapshot(sessions) == before  # nothing given: nothing changes
    assert all("labels:" not in line for line in unlabelled.lines())


def test_a_real_report_replaces_a_synthesized_one(tmp_path: Path, vindr: dict[str, object],
                                                  source: tuple[Path, list[dict[str, str]]]) -> None:
    sessions = open_index(tmp_path / "index")
    index_archive(vindr["root"], sessions, None, vindr["finding"], progress=False)
    uid = vindr["studies"][0]
    assert _studies(sessions)[uid].report_source == SYNTHESIZED_REPORT + "finding_annotations.csv"
    folder, rows = source
    accession = next(row["accession_number"] for row in rows if row["study_instance_uid"] == uid)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / f"{accession}.txt").write_text((folder / accession / "report.txt").read_text())
    summary = index_archive(vindr["root"], sessions, reports, vindr["finding"], progress=False)
    study = _studies(sessions)[uid]
    assert study.report_source == f"{accession}.txt" and study.label_source == "label table finding_annotations.csv"
    assert (summary.with_report, summary.synthesized) == (1, 4)  # 4 = studies 1, 2, 3 and the renamed study 4


def test_vindr_breast_level_file_has_no_findings_so_no_text(tmp_path: Path, vindr: dict[str, object]) -> None:
    sessions = open_index(tmp_path / "index")
    summary = index_archive(vindr["root"], sessions, None, vindr["breast"], progress=False)
    assert (summary.label_studies, summary.unmatched_labels, summary.synthesized) == (5, 2, 0)
    study = _studies(sessions)[vindr["studies"][0]]
    row = vindr["truth"][(vindr["studies"][0], "R")]
    assert study.labels["R"] == {"mass": None, "calcification": None, "malignant": vindr_malignant(row["birads"]),
                                 "birads": int(row["birads"])}
    assert study.report_text is None and study.label_source == "label table breast-level_annotations.csv"


def test_rsna_train_csv_matches_by_image_id_and_gives_cancer(tmp_path: Path, rsna: dict[str, object]) -> None:
    sessions = open_index(tmp_path / "index")
    summary = index_archive(rsna["root"], sessions, None, rsna["labels"], progress=False)
    assert (summary.label_studies, summary.unmatched_labels, summary.label_breasts) == (6, 1, 13)
    assert summary.synthesized == 0  # RSNA has no finding labels: breast_text cannot be made
    for uid, study in _studies(sessions).items():
        for side in ("L", "R"):
            row = rsna["truth"][(uid, side)]
            assert study.labels[side] == {"mass": None, "calcification": None, "malignant": int(row["malignant"]),
                                          "birads": None}
        assert study.labels["density"] == rsna["truth"][(uid, "L")]["density"] and study.report_text is None
        malignant = any(rsna["truth"][(uid, side)]["malignant"] == "1" for side in ("L", "R"))
        assert stratum(study.labels) == ("100" if malignant else "000")  # what the split is stratified on


def test_rsna_by_patient_folder_when_files_are_renamed(tmp_path: Path, rsna: dict[str, object]) -> None:
    root = tmp_path / "renamed"
    shutil.copytree(rsna["root"] / "train_images", root / "train_images")
    for number, path in enumerate(sorted(root.rglob("*.dcm"))):
        path.rename(path.with_name(f"IM{number}.dcm"))
    summary = index_archive(root, open_index(tmp_path / "index"), None, rsna["labels"], progress=False)
    assert (summary.label_studies, summary.unmatched_labels) == (6, 1)


def test_cli_prints_the_label_counts(tmp_path: Path, vindr: dict[str, object]) -> None:
    runner = CliRunner(env={"MAMMO_DATA_DIR": str(tmp_path / "data")})
    result = runner.invoke(main, ["archive", "index", str(vindr["root"]), "--labels", str(vindr["finding"])])
    assert result.exit_code == 0, result.output
    assert "labels: 5 studies from finding_annotations.csv, 2 of its 12 labelled breasts matched no indexed study" \
        in result.output
    assert "0 studies with a report, 5 with one synthesized from labels, 5 labelled" in result.output
    bad = _write(tmp_path / "labels.csv", ["accession", "side", "label"], [{"accession": 1, "side": "L", "label": 1}])
    refused = runner.invoke(main, ["archive", "index", str(vindr["root"]), "--labels", str(bad)])
    assert refused.exit_code != 0 and "unknown label CSV layout" in refused.output


def vindr_malignant(birads: str) -> int | None:
    """VinDr has no pathology: BI-RADS 5 is malignant, 1-3 not, 4 unknown (``training.reports.BreastLabels``)."""
    return None if int(birads) == 4 else int(int(birads) >= 5)


def _side_labels(text: str) -> dict[str, tuple[int | None, int | None, int | None]]:
    labels = labels_from_report(text)
    return {side: (labels[side]["mass"], labels[side]["calcification"], labels[side]["birads"]) for side in "LR"}


def test_an_uncertain_finding_is_unknown_on_its_own_breast_only() -> None:
    assert _side_labels("Possible mass in the right breast. The left breast is unremarkable. BI-RADS 0.") == {
        "L": (0, 0, None), "R": (None, 0, 0)}
    assert _side_labels("Mass in the right breast. Possible mass in the left breast. BI-RADS 4.") == {
        "L": (None, 0, None), "R": (1, 0, 4)}  # the mass on the right no longer says the left is clear
    assert _side_labels("No mass in the left breast. Questionable calcifications on the right.") == {
        "L": (0, None, None), "R": (None, None, None)}  # no BI-RADS: only the negated breast is settled for mass
    assert _side_labels("Possible mass. BI-RADS 0.") == {"L": (None, 0, 0), "R": (None, 0, 0)}  # no side stated


def test_report_labels_give_each_breast_its_findings() -> None:
    assert _side_labels("Left breast mass and right breast calcifications. BI-RADS 4.") == {
        "L": (1, 0, 4), "R": (0, 1, 4)}  # findings in both breasts: the one category applies to both
    assert _side_labels("There is a mass in the left breast, and the right breast is unremarkable. BI-RADS 4.") == {
        "L": (1, 0, 4), "R": (0, 0, None)}
    assert _side_labels("No calcifications are seen within the 2 cm spiculated mass in the left breast. BI-RADS 5.") \
        == {"L": (1, 0, 5), "R": (0, 0, None)}


def test_a_normal_breast_does_not_take_the_reports_birads() -> None:
    assert _side_labels("Spiculated mass in the left breast; the right breast is normal. BI-RADS 5") == {
        "L": (1, 0, 5), "R": (0, 0, None)}
    assert _side_labels("Focal asymmetry in the left breast. The right breast is unremarkable. BI-RADS 0.") == {
        "L": (0, 0, 0), "R": (0, 0, None)}  # no mass or calcification: the breast not called normal has it
    assert _side_labels("Mass in the right breast. Right: BI-RADS 4. Left: BI-RADS 1.") == {
        "L": (0, 0, 1), "R": (1, 0, 4)}
    assert _side_labels("Mass in the right breast. Right breast: BI-RADS 4.")["L"] == (0, 0, None)
    # no side distinguished: the one category applies to both breasts
    assert _side_labels("No suspicious masses, calcifications or architectural distortion. BI-RADS 1.") == {
        "L": (0, 0, 1), "R": (0, 0, 1)}
    assert _side_labels("Bilateral masses. No suspicious calcifications. BI-RADS 2.") == {
        "L": (1, 0, 2), "R": (1, 0, 2)}
    assert _side_labels("No suspicious findings in the left breast. No suspicious findings in the right breast. "
                        "BI-RADS 1.") == {"L": (0, 0, 1), "R": (0, 0, 1)}


def test_unknown_layout_is_a_configuration_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.csv", ["patient_id", "image_id", "laterality"], [])
    with pytest.raises(ConfigurationError, match="unknown label CSV layout"):
        read_label_table(path)


def test_an_index_of_schema_1_is_upgraded_in_place(db_url: str) -> None:
    """Schema 1 kept label_source in VARCHAR(32), too short for "label table breast-level_annotations.csv"."""
    engine = make_engine(db_url)
    IndexBase.metadata.create_all(engine)
    with engine.begin() as connection:
        if engine.dialect.name != "sqlite":
            connection.execute(text("ALTER TABLE archive_study ALTER COLUMN label_source TYPE VARCHAR(32), "
                                    "ALTER COLUMN report_source TYPE VARCHAR(256)"))
        connection.execute(insert(ArchiveMeta).values(key="schema_version", value="1"))
    engine.dispose()
    sessions = open_index(db_url)
    long_source = SYNTHESIZED_REPORT + "x" * 250
    with sessions.begin() as session:
        assert get_meta(session, "schema_version") == SCHEMA_VERSION
        session.add(ArchiveStudy(study_instance_uid="1.2.3", patient_key="p", report_source=long_source,
                                 label_source="label table breast-level_annotations.csv"))
    study = next(iter(_studies(open_index(db_url, create=False)).values()))
    assert (study.label_source, study.report_source) == ("label table breast-level_annotations.csv", long_source)


def test_pretraining_phrases_label_only_studies_from_their_labels(tmp_path: Path, vindr: dict[str, object]) -> None:
    """The stored synthesized text is for people and `archive show`; training draws new phrasings from the
    labels, while a reader's report gives its own sections."""
    from models.preprocess import PreprocessConfig
    from training.archive.split import SPLITS
    from training.convert import convert_archive
    from training.datasets import load_breasts

    sessions = open_index(tmp_path / "index")
    index_archive(vindr["root"], sessions, vindr["reports"], vindr["finding"], progress=False)
    config = PreprocessConfig(height=64, width=48)
    convert_archive(sessions, tmp_path / "cache", config, workers=1, progress=False)
    reported = {uid for uid, study in _studies(sessions).items() if study.report_source
                and not study.report_synthesized}
    items = [item for split in SPLITS for item in load_breasts(tmp_path / "index", split, config)[0]]
    assert sum(1 for item in items if item.sections) == 2 * len(reported)
    assert all(item.labels is not None for item in items if not item.sections)
    # five labelled studies, both breasts, less those without a report whose BI-RADS 4 leaves malignancy unknown
    # (a label missing is never phrased as a negative); the unlabelled study has neither text nor labels
    unknown = [study for uid, study in _studies(sessions).items() if uid not in reported and study.labels
               and any(study.labels[side]["malignant"] is None for side in "LR")]
    assert len(items) == 10 - sum(study.labels[side]["malignant"] is None for study in unknown for side in "LR")


def test_a_patients_most_positive_study_sets_its_stratum() -> None:
    assert max(["unlabelled", "111", "000"], key=stratum_rank) == "111"  # not "unlabelled", which sorts last
    assert max(["unlabelled", "000"], key=stratum_rank) == "000"
    assert max(["100", "011"], key=stratum_rank) == "011"


def test_studies_without_a_patient_id_are_patients_of_their_own() -> None:
    """An anonymised archive (no Patient ID) is split by study, not put into one split as one patient; a
    Patient ID keys as it always did, so the keys already in an index stay valid."""
    import hashlib

    assert patient_key("", "salt", "1.2.3") != patient_key("", "salt", "1.2.4")
    assert patient_key("P1", "salt", "1.2.3") == patient_key("P1", "salt", "1.2.4") == hashlib.sha256(
        b"salt:P1").hexdigest()[:32]


def test_indexing_says_how_many_studies_had_no_patient_id(source: tuple[Path, list[dict[str, str]]],
                                                           tmp_path: Path) -> None:
    import pydicom

    folder, _ = source
    studies = sorted(path for path in folder.iterdir() if path.is_dir())[:2]
    for number, study in enumerate(studies):
        shutil.copytree(study, tmp_path / "archive" / study.name)
        for path in (tmp_path / "archive" / study.name).glob("*.dcm"):
            if number == 0:  # the first study anonymised: no Patient ID
                dataset = pydicom.dcmread(path)
                dataset.PatientID = ""
                dataset.save_as(path)
    summary = index_archive(tmp_path / "archive", open_index(tmp_path / "index"), progress=False)
    assert summary.studies == 2 and summary.without_patient_id == 1
    assert any(line.startswith("1 studies without a Patient ID: each is a patient of its own")
               for line in summary.lines())


def test_a_breast_gets_its_own_birads_never_the_studys() -> None:
    """"Mass in the left breast; the right breast is normal. BI-RADS 5": the right breast's category is
    unknown, so pretraining phrases it from its report, not as "birads 5"."""
    from training.datasets import breast_labels

    labels = {"density": "B", "birads": 5, "L": {"mass": 1, "calcification": 0, "malignant": 1, "birads": 5},
              "R": {"mass": 0, "calcification": 0, "malignant": 0, "birads": None}}
    assert breast_labels(labels, "L")["birads"] == 5 and breast_labels(labels, "R") is None


def test_birads_6_is_phrased_as_a_known_malignancy() -> None:
    from training.label_text import breast_text

    labels = {"mass": 1, "calcification": 0, "malignant": 1, "density": "C"}
    assert "birads 6 known biopsy proven malignancy" in breast_text({**labels, "birads": 6}, "L", random.Random(0))
    assert "birads 0 incomplete" in breast_text({**labels, "birads": 0}, "L", random.Random(0))
