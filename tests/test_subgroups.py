"""Subgroup tables (density, age band, manufacturer, view) from the finetune and zero-shot evaluation commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset

import tests.test_finetune as finetune_tests
from dicom_node.cli import main
from training.archive.scan import patient_age_years
from training.evaluate import AGE_BANDS, write_html_report
from training.finetune import ImageRecord, image_subgroups, subgroups_json
from training.synthetic.dicom import MANUFACTURER
from training.zero_shot_eval import zero_shot_evaluation

archive, mass_head = finetune_tests.archive, finetune_tests.mass_head  # the tiny synthetic index, model and head
ATTRIBUTES = ["density", "age band", "manufacturer", "view"]


def check_table(subgroups: dict, image: dict) -> None:
    """Image level, the overall AUC of the image-level metrics, every image in one row of each attribute, the
    synthetic header values, and a reason wherever the AUC is missing."""
    assert subgroups["level"] == "image" and subgroups["overall_auc"] == image["auc"]
    rows = subgroups["rows"]
    assert list(dict.fromkeys(row["attribute"] for row in rows)) == ATTRIBUTES
    for attribute in ATTRIBUTES:
        assert sum(row["n"] for row in rows if row["attribute"] == attribute) == image["n"]
    values = {attribute: {row["value"] for row in rows if row["attribute"] == attribute} for attribute in ATTRIBUTES}
    assert values["view"] == {"CC", "MLO"} and values["manufacturer"] == {MANUFACTURER}
    assert values["density"] <= {"A", "B", "C", "D"} and values["age band"] <= set(AGE_BANDS)
    for row in rows:
        assert (row["auc"] is None) == (row["gap"] is None) == (row["reason"] is not None)
        if row["auc"] is not None:
            assert row["gap"] == pytest.approx(row["auc"] - subgroups["overall_auc"], abs=2e-4)


def test_finetune_writes_the_subgroup_table(mass_head: Path) -> None:
    metrics = json.loads((mass_head / "metrics.json").read_text())
    check_table(metrics["subgroups"], metrics["test"]["image"])
    page = (mass_head / "report.html").read_text()
    assert "<h2>Subgroups</h2>" in page and "<h3>mass</h3>" in page and MANUFACTURER in page
    assert all(f"<td>{attribute}</td>" in page for attribute in ATTRIBUTES)


def test_zero_shot_evaluation_writes_subgroup_tables(archive: dict[str, Path], tmp_path: Path) -> None:
    results = zero_shot_evaluation(archive["index"], archive["tiny"], tmp_path, n_bootstrap=20, progress=False)
    written = json.loads((tmp_path / "metrics.json").read_text())["results"]
    page = (tmp_path / "report.html").read_text()
    scored = [target for target, levels in written.items() if isinstance(levels.get("image"), dict)]
    assert scored
    for target in scored:
        assert results[target]["subgroups"] == written[target]["subgroups"]
        check_table(written[target]["subgroups"], written[target]["image"])
        assert f"<h3>{target}</h3>" in page
    assert "<h2>Subgroups</h2>" in page and MANUFACTURER in page


def test_commands_print_a_compact_table(archive: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner(env={"MAMMO_DATA_DIR": str(tmp_path / "data")})
    trained = runner.invoke(main, ["train", "finetune", str(archive["index"]), str(archive["tiny"]),
                                   str(tmp_path / "head"), "--target", "mass", "--steps", "20", "--synthetic"])
    assert trained.exit_code == 0, trained.output
    overall = json.loads((tmp_path / "head" / "metrics.json").read_text())["subgroups"]["overall_auc"]
    assert f"subgroups (image level), overall AUC {overall:.3f}:" in trained.output
    assert all(f"    {attribute:<13} " in trained.output for attribute in ATTRIBUTES)
    assert f"manufacturer  {MANUFACTURER} n=" in trained.output
    evaluated = runner.invoke(main, ["train", "evaluate", str(archive["index"]), str(archive["tiny"]),
                                     str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.output.count("subgroups (image level)") == sum(
        isinstance(levels.get("image"), dict)
        for levels in json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"].values())


def records(n: int, **metadata: object) -> list[ImageRecord]:
    fields = {"density": None, "patient_age": None, "manufacturer": None} | metadata
    return [ImageRecord(f"{i}.npy", i // 4, "LR"[i // 2 % 2], ("CC", "MLO")[i % 2], 0, **fields) for i in range(n)]


def test_unknown_metadata_small_groups_and_one_class(tmp_path: Path) -> None:
    truth, scores = np.tile([0, 1], 12), np.linspace(0, 1, 24)
    table = image_subgroups(records(24), truth, scores)
    rows = {(row.attribute, row.value): row for row in table.rows}
    assert {value for attribute, value in rows if attribute != "view"} == {"unknown"}
    assert rows["age band", "unknown"].auc == table.overall_auc
    few = image_subgroups(records(8, density="C"), truth[:8], scores[:8])
    assert all(row.auc is None and row.reason == "fewer than 10 cases" for row in few.rows)
    one_class = image_subgroups(records(8), np.zeros(8, dtype=int), scores[:8])
    assert subgroups_json(one_class) == {"level": "image", "unavailable": "only one class (0 positives of 8)"}
    page = write_html_report(tmp_path / "report.html", title="t", model_description="m", dataset_description="d",
                             subgroups={"mass": table, "calcification": few}).read_text()
    assert "<h3>mass</h3>" in page and "<h3>calcification</h3>" in page and "fewer than 10 cases" in page


@pytest.mark.parametrize(("header", "years"), [
    ({"PatientAge": "052Y", "PatientBirthDate": "19000101", "StudyDate": "20240101"}, 52),
    ({"PatientBirthDate": "19700615", "StudyDate": "20240614"}, 53),
    ({"PatientBirthDate": "19700615", "StudyDate": "20240615"}, 54),
    ({"PatientAge": "", "PatientBirthDate": "19700615", "StudyDate": ""}, None),
    ({"PatientBirthDate": "20250101", "StudyDate": "20240101"}, None),
    ({"PatientBirthDate": "19700231", "StudyDate": "20240101"}, None),
    ({}, None)])
def test_patient_age_from_the_header(header: dict[str, str], years: int | None) -> None:
    ds = Dataset()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    assert patient_age_years(ds) == years
