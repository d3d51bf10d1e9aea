"""Report text for training: sections, the reference's cleaning, the negation-aware label parser, label CSVs."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from training.label_text import breast_text
from training.reports import (
    BreastLabels,
    ReportSections,
    clean_report_text,
    parse_labels,
    read_label_csv,
    split_sections,
    synthesize_breast_report,
    training_texts,
)
from training.synthetic import write_studies

ACR_ORDER = (1, 2, 3, 6, 0, 4, 5)


def test_parser_recovers_the_synthetic_ground_truth(tmp_path: Path) -> None:
    manifest = write_studies(tmp_path, 40, seed=100, rows=256, cols=160, progress=False)
    studies: dict[str, dict[str, dict[str, str]]] = {}
    with manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            studies.setdefault(row["accession_number"], {})[row["laterality"]] = row
    misses = []
    for accession, breasts in studies.items():
        parsed = parse_labels((tmp_path / breasts["L"]["report_path"]).read_text())
        # the synthetic report states the study's assessment: the worse breast's
        expected_birads = max((int(breasts[side]["birads"]) for side in "LR"), key=ACR_ORDER.index)
        found = {"density": parsed.density, "birads": parsed.birads, "uncertain": parsed.uncertain,
                 **{f"mass {side}": side in parsed.mass_sides for side in "LR"},
                 **{f"calcification {side}": side in parsed.calcification_sides for side in "LR"}}
        expected = {"density": breasts["L"]["density"], "birads": expected_birads, "uncertain": [],
                    **{f"mass {side}": breasts[side]["mass"] == "1" for side in "LR"},
                    **{f"calcification {side}": breasts[side]["calcification"] == "1" for side in "LR"}}
        if found != expected or parsed.mass is None or parsed.calcification is None:
            misses.append((accession, found, expected))
    assert len(studies) == 40
    assert any(b[s]["mass"] == "1" for b in studies.values() for s in "LR"), "no study with a mass: reseed"
    assert any(b[s]["calcification"] == "1" for b in studies.values() for s in "LR"), "no calcification: reseed"
    assert not misses, misses


def test_a_negation_covers_a_list() -> None:
    parsed = parse_labels("No suspicious masses, calcifications or architectural distortion. BI-RADS 1.")
    assert (parsed.mass, parsed.calcification, parsed.birads) == (False, False, 1)
    parsed = parse_labels("There is no dominant mass, suspicious calcification or architectural distortion.")
    assert (parsed.mass, parsed.calcification) == (False, False)


def test_a_negation_ends_with_its_sentence() -> None:
    parsed = parse_labels("no mass. there is a cluster of suspicious calcifications in the left breast")
    assert (parsed.mass, parsed.calcification, parsed.birads) == (False, True, None)
    assert parsed.calcification_sides == {"L"} and parsed.mass_sides == set()


def test_but_ends_the_negation_scope() -> None:
    parsed = parse_labels("No mass in the right breast, but there is a spiculated mass in the left breast. BI-RADS 5.")
    assert parsed.mass is True and parsed.mass_sides == {"L"}


def test_a_negation_reaches_the_next_finding_and_its_list_only() -> None:
    parsed = parse_labels("No calcifications are seen within the 2 cm spiculated mass in the left breast. BI-RADS 5.")
    assert (parsed.mass, parsed.calcification, parsed.mass_sides) == (True, False, {"L"})
    parsed = parse_labels("Spiculated mass in the left breast, calcifications are not seen. BI-RADS 5.")
    assert (parsed.mass, parsed.calcification, parsed.mass_sides) == (True, False, {"L"})
    parsed = parse_labels("No malignant features within the mass in the right breast. BI-RADS 2.")
    assert (parsed.mass, parsed.mass_sides) == (True, {"R"})  # "within" ends the negation's reach
    parsed = parse_labels("No evidence of architectural distortion or skin thickening around the mass. BI-RADS 4.")
    assert parsed.mass is True  # beyond the five-word window
    for text in ("No suspicious mass or calcifications in the left breast. BI-RADS 1.",
                 "Neither a mass nor calcifications are seen. BI-RADS 1.",
                 "No masses, architectural distortion, or calcifications. BI-RADS 1.",
                 "No mass with associated calcifications. BI-RADS 1.",
                 "Mass and calcifications are not seen. BI-RADS 1."):
        parsed = parse_labels(text)
        assert (parsed.mass, parsed.calcification) == (False, False), text


def test_each_finding_is_on_the_side_named_nearest_to_it() -> None:
    cases = {"Left breast mass and right breast calcifications. BI-RADS 4.": ({"L"}, {"R"}),
             "There is a mass in the left breast, and the right breast is unremarkable.": ({"L"}, set()),
             "Mass measuring 1 cm in the left breast, compared with the right breast.": ({"L"}, set()),
             "There is a mass in the right breast and calcifications in the left breast.": ({"R"}, {"L"}),
             "A mass, 1 cm, is seen in the left breast, and calcifications are noted in the right breast.": (
                 {"L"}, {"R"}),
             "In the left breast, there is a mass with associated calcifications, and the right breast is normal.": (
                 {"L"}, {"L"}),
             "Right breast: a mass and calcifications.": ({"R"}, {"R"}),
             "Masses in the left and right breasts; calcifications in both breasts.": ({"L", "R"}, {"L", "R"}),
             # two sides coordinated for one finding, not a clause of their own
             "Masses in the left breast and in the right breast.": ({"L", "R"}, set()),
             "A mass is present in the right breast and in the left breast.": ({"L", "R"}, set()),
             "Calcifications are seen in both the left and the right breast.": (set(), {"L", "R"}),
             "There is a mass in the left breast and the right breast is unremarkable.": ({"L"}, set())}
    for text, sides in cases.items():
        parsed = parse_labels(text)
        assert (parsed.mass_sides, parsed.calcification_sides) == sides, text


def test_breasts_called_normal() -> None:
    assert parse_labels("Spiculated mass in the left breast; the right breast is normal.").normal_sides == {"R"}
    assert parse_labels("LEFT BREAST: Mass.\nRIGHT BREAST: Negative.").normal_sides == {"R"}
    assert parse_labels("No suspicious findings in the left breast. Mass in the right breast.").normal_sides == {"L"}
    assert parse_labels("Normal lymph node in the left axilla. BI-RADS 1.").normal_sides == set()


def test_benign_calcifications_are_not_suspicious() -> None:
    for text in ("Scattered benign-appearing calcifications. BI-RADS 2.",
                 "Vascular calcifications are noted bilaterally.",
                 "Calcifications are seen in the left breast which appear benign."):
        parsed = parse_labels(text)
        assert parsed.calcification is False and parsed.calcification_sides == set(), text
    parsed = parse_labels("Benign vascular calcifications. Grouped pleomorphic microcalcifications in the R breast.")
    assert parsed.calcification is True and parsed.calcification_sides == {"R"}


def test_bilateral_means_both_breasts() -> None:
    parsed = parse_labels("Bilateral masses.")
    assert parsed.mass is True and parsed.mass_sides == {"L", "R"}
    assert parsed.calcification is None  # not mentioned, and no assessment: an incomplete report


def test_birads_per_breast() -> None:
    for text in ("IMPRESSION: BI-RADS 4 right, BI-RADS 2 left.", "Right breast: BI-RADS 4. Left breast: BIRADS 2.",
                 "Right: BI-RADS category 4\nLeft: BI-RADS 2"):
        parsed = parse_labels(text)
        assert (parsed.birads, parsed.birads_by_side) == (4, {"R": 4, "L": 2}), text
    parsed = parse_labels("BI-RADS 0 right, BI-RADS 2 left.")
    assert parsed.birads == 0  # ACR hierarchy: incomplete (0) outranks benign (2)
    assert parse_labels("Overall assessment: BI-RADS 4A. Bilateral BI-RADS 2.").birads_by_side == {"L": 2, "R": 2}


def test_completeness_decides_unmentioned_findings() -> None:
    assert (parse_labels("No mammographic evidence of malignancy. BI-RADS 1: Negative.").mass) is False
    assert (parse_labels("No mammographic evidence of malignancy.").mass) is None


def test_mentions_that_are_not_findings_of_this_exam() -> None:
    parsed = parse_labels("The breasts are heterogeneously dense, which may obscure small masses. BI-RADS 1.")
    assert (parsed.mass, parsed.density) == (False, "C")
    parsed = parse_labels("HISTORY: 6-month follow-up of a BI-RADS 3 mass in the left breast.\n"
                          "FINDINGS: The mass has resolved. No suspicious calcifications.\nIMPRESSION: BI-RADS 2.")
    assert (parsed.mass, parsed.calcification, parsed.birads) == (False, False, 2)
    parsed = parse_labels("There is no interval change in the 1 cm mass in the left breast. BI-RADS 2.")
    assert parsed.mass is True and parsed.mass_sides == {"L"}


def test_uncertain_sentences_are_listed() -> None:
    parsed = parse_labels("No calcifications. Possible mass in the right breast. BI-RADS 0.")
    assert (parsed.mass, parsed.calcification) == (None, False)
    assert parsed.uncertain == ["Possible mass in the right breast"]


def test_side_headings_give_the_side() -> None:
    parsed = parse_labels("LEFT BREAST: There is a 1 cm irregular mass.\nRIGHT BREAST: No suspicious findings.\n"
                          "BI-RADS 4.")
    assert parsed.mass_sides == {"L"} and parsed.birads_by_side == {}


@pytest.mark.parametrize(("text", "density"), [
    ("The breasts are almost entirely fatty.", "A"),
    ("There are scattered areas of fibroglandular density.", "B"),
    ("Breast composition: heterogeneously dense (ACR C).", "C"),
    ("The breasts are extremely dense.", "D"),
    ("Breast density: B. No mass.", "B"),
    ("DENSITY D", "D"),
    ("Right breast scattered fibroglandular, left heterogeneously dense.", "C"),  # the denser one
    ("There is a density a few mm in size. Composition: a mix of tissues.", None),
])
def test_density(text: str, density: str | None) -> None:
    assert parse_labels(text).density == density


def test_split_sections() -> None:
    report = ("Bilateral screening mammogram.\nHISTORY: screening.\nFindings\nNo mass.\n"
              "impression: BI-RADS 1. Conclusion: negative.\nRECOMMENDATION: annual screening.")
    assert split_sections(report) == ReportSections(
        findings="No mass.", impression="BI-RADS 1.\nnegative.",
        other="Bilateral screening mammogram.\nscreening.\nannual screening.")
    assert split_sections("The breasts are fatty. No mass.\nIMPRESSION: BI-RADS 1.") == ReportSections(
        findings="The breasts are fatty. No mass.", impression="BI-RADS 1.", other="")
    assert split_sections("Findings of note: none") == ReportSections("Findings of note: none", "", "")


def test_clean_report_text_like_the_reference() -> None:
    report = ("FINDINGS\nPatient [**Name**] was seen on ___. A 1.5 cm mass, BI-RADS 4.\n"
              "No calcification.\nIMPRESSION: Suspicious. Biopsy of the café-au-lait lesion.")
    # "No calcification." and "Suspicious." are dropped: the reference keeps sentences of three tokens or more
    assert clean_report_text(report) == (
        "patient was seen on a 1.5 cm mass , birads 4 biopsy of the cafe - au - lait lesion")
    assert training_texts(report) == ["patient was seen on a 1.5 cm mass , birads 4",
                                      "biopsy of the cafe - au - lait lesion"]
    assert training_texts("FINDINGS: no suspicious mass.\nIMPRESSION: No suspicious mass.") == ["no suspicious mass"]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_vindr_finding_annotations(tmp_path: Path) -> None:
    header = ["image_id", "study_id", "series_id", "laterality", "view_position", "breast_birads",
              "breast_density", "finding_categories", "finding_birads", "split"]
    path = _write_csv(tmp_path / "finding_annotations.csv", header, [
        ["i1", "s1", "x", "L", "CC", "BI-RADS 5", "DENSITY C", "['Mass']", "BI-RADS 5", "training"],
        ["i1", "s1", "x", "L", "CC", "BI-RADS 5", "DENSITY C", "['Suspicious Calcification', 'Mass']", "", "training"],
        ["i2", "s1", "x", "L", "MLO", "BI-RADS 5", "DENSITY C", "['Mass']", "BI-RADS 5", "training"],
        ["i3", "s1", "x", "R", "CC", "BI-RADS 1", "DENSITY C", "['No Finding']", "", "training"],
        ["i4", "s2", "x", "R", "MLO", "BI-RADS 2", "DENSITY B", "['Focal Asymmetry']", "", "test"],
    ])
    assert read_label_csv(path) == [
        BreastLabels("s1", "L", ["i1", "i2"], mass=True, calcification=True, malignant=True, density="C", birads=5),
        BreastLabels("s1", "R", ["i3"], mass=False, calcification=False, malignant=False, density="C", birads=1),
        BreastLabels("s2", "R", ["i4"], mass=False, calcification=False, malignant=False, density="B", birads=2)]


def test_read_vindr_breast_level_has_no_findings(tmp_path: Path) -> None:
    header = ["Study_ID", "Series_ID", "Image_ID", "Laterality", "View_Position", "Breast_BIRADS", "Breast_Density"]
    path = _write_csv(tmp_path / "breast-level_annotations.csv", header,
                      [["s1", "x", "i1", "R", "CC", "BI-RADS 4", "DENSITY D"], ["s1", "x", "i2", "R", "MLO", "", ""]])
    assert read_label_csv(path) == [BreastLabels("s1", "R", ["i1", "i2"], None, None, None, "D", 4)]  # 4: unknown


def test_read_rsna_train_csv(tmp_path: Path) -> None:
    header = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive",
              "BIRADS", "implant", "density", "machine_id", "difficult_negative_case"]
    path = _write_csv(tmp_path / "train.csv", header, [
        ["2", "10006", "462822612", "L", "CC", "61.0", "0", "0", "0", "", "0", "", "29", "False"],
        ["2", "10006", "1459541791", "L", "MLO", "61.0", "0", "0", "0", "", "0", "", "29", "False"],
        ["2", "10011", "220375232", "R", "CC", "55.0", "1", "1", "1", "0.0", "0", "C", "21", "True"],
        ["2", "10011", "270344397", "R", "MLO", "55.0", "0", "1", "1", "0.0", "0", "C", "21", "True"],
        ["2", "10012", "1", "L", "CC", "50.0", "0", "0", "0", "1", "0", "B", "21", "False"],
        ["2", "10013", "2", "R", "CC", "50.0", "0", "0", "0", "2", "0", "B", "21", "False"],
    ])
    assert read_label_csv(path) == [  # RSNA's BIRADS 1 "negative for cancer" and 2 "normal" are ACR 1, not 2
        BreastLabels("10006", "L", ["462822612", "1459541791"], None, None, False, None, None),
        BreastLabels("10011", "R", ["220375232", "270344397"], None, None, True, "C", 0),
        BreastLabels("10012", "L", ["1"], None, None, False, "B", 1),
        BreastLabels("10013", "R", ["2"], None, None, False, "B", 1)]


def test_unknown_layouts_are_refused(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "labels.csv", ["accession", "side", "label"], [["a", "L", "1"]])
    with pytest.raises(ValueError, match=r"expected VinDr-Mammo columns study_id, image_id, laterality, "
                                         r"breast_birads, breast_density .* RSNA columns patient_id, image_id, "
                                         r"laterality, cancer .*found accession, side, label"):
        read_label_csv(path)
    path = _write_csv(tmp_path / "rsna.csv", ["patient_id", "image_id", "laterality", "cancer"], [["1", "2", "X", "0"]])
    with pytest.raises(ValueError, match="line 2: laterality 'X' is not L or R"):
        read_label_csv(path)


def test_synthesized_report_uses_the_label_text_phrasing() -> None:
    labels = BreastLabels("s1", "L", ["i1"], mass=True, calcification=False, malignant=True, density="C", birads=4)
    text = synthesize_breast_report(labels, random.Random(7))
    expected = {"mass": 1, "calcification": 0, "malignant": 1, "density": "C", "birads": 4}
    assert text == breast_text(expected, "L", random.Random(7))
    assert "heterogeneously dense" in text and "birads 4 suspicious" in text


@pytest.mark.parametrize("missing", [{"mass": None}, {"malignant": None}, {"density": None}, {"birads": None},
                                     {"birads": 6}])
def test_no_synthesized_report_when_a_label_is_unknown(missing: dict[str, object]) -> None:
    complete = {"mass": False, "calcification": False, "malignant": False, "density": "B", "birads": 1}
    labels = BreastLabels("s1", "R", ["i1"], **{**complete, **missing})
    assert synthesize_breast_report(BreastLabels("s1", "R", ["i1"], **complete), random.Random(0))
    assert synthesize_breast_report(labels, random.Random(0)) is None
