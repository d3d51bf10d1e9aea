from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from training.evaluate import (
    BANNER,
    age_band,
    aggregate_scores,
    binary_metrics,
    calibration,
    multiclass_metrics,
    parse_patient_age,
    plot_confusion,
    plot_reliability,
    plot_roc,
    subgroup_table,
    write_html_report,
)
from training.evaluate.metrics import EVALUATED_SET
from training.evaluate.plots import DPI, operating_point_label


def shifted_scores(n: int, seed: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with about 30% positives and normal scores, positives shifted up by ``shift``."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < 0.3).astype(int)
    return truth, rng.normal(size=n) + shift * truth


def ci_width(metrics) -> float:
    return metrics.auc_ci[1] - metrics.auc_ci[0]


def test_auc_equals_sklearn_with_tied_scores() -> None:
    truth, score = shifted_scores(400, seed=1)
    score = np.round(score, 1)  # many ties, which count one half
    assert binary_metrics(truth, score, n_bootstrap=0).auc == pytest.approx(roc_auc_score(truth, score), abs=1e-12)


def test_perfect_separator_has_auc_one_and_ci_one() -> None:
    metrics = binary_metrics([0, 0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.9], n_bootstrap=500)
    assert metrics.auc == 1.0
    assert metrics.auc_ci == (1.0, 1.0)
    assert 0 < metrics.bootstrap_resamples < 500  # resamples holding one class only are skipped


def test_random_score_ci_contains_one_half() -> None:
    truth, score = shifted_scores(300, seed=2, shift=0.0)
    low, high = binary_metrics(truth, score, seed=3).auc_ci
    assert low < 0.5 < high
    assert high - low < 0.2


def test_ci_matches_a_plain_bootstrap_with_sklearn() -> None:
    truth, score = shifted_scores(300, seed=4)
    rng = np.random.default_rng(99)
    picks = (rng.integers(0, len(truth), len(truth)) for _ in range(1000))
    aucs = [roc_auc_score(truth[p], score[p]) for p in picks if 0 < truth[p].sum() < len(p)]
    expected = np.percentile(aucs, [2.5, 97.5])
    assert binary_metrics(truth, score, seed=5).auc_ci == pytest.approx(tuple(expected), abs=0.012)


def test_ci_narrows_as_n_grows_and_is_reproducible() -> None:
    small, large = (binary_metrics(*shifted_scores(n, seed=6), seed=7) for n in (100, 2000))
    assert ci_width(large) < 0.5 * ci_width(small)
    truth, score = shifted_scores(100, seed=6)
    assert binary_metrics(truth, score, seed=7).auc_ci == small.auc_ci
    assert binary_metrics(truth, score, seed=8).auc_ci != small.auc_ci


def test_cluster_bootstrap_resamples_patients_with_all_their_cases() -> None:
    """Four identical views per patient add no information: resampling patients gives the CI of one view each,
    resampling the views as independent cases a CI about half as wide."""
    truth, score = shifted_scores(100, seed=9)
    views = {"y_true": np.repeat(truth, 4), "y_score": np.repeat(score, 4), "seed": 10}
    per_patient = binary_metrics(truth, score, seed=10)
    clustered = binary_metrics(**views, clusters=[f"p{i}" for i in np.repeat(np.arange(100), 4)])
    plain = binary_metrics(**views)
    assert clustered.auc_ci == pytest.approx(per_patient.auc_ci, abs=1e-12)
    assert (clustered.bootstrap, clustered.bootstrap_units) == ("cluster", 100)
    assert (plain.bootstrap, plain.bootstrap_units) == ("case", 400)
    assert ci_width(plain) < 0.6 * ci_width(clustered)
    with pytest.raises(ValueError, match="3 clusters for 400 cases"):
        binary_metrics(**views, clusters=["a", "b", "c"])


def test_operating_points_at_thresholds_set_elsewhere() -> None:
    """Given thresholds (from validation) are applied as they are; the ones fitted here are kept as oracle."""
    negatives = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
    truth, score = [0] * 10 + [1] * 5, [*negatives, 0.5, 0.8, 0.9, 0.97, 0.99]
    fitted = binary_metrics(truth, score, n_bootstrap=0)
    assert fitted.thresholds_from == EVALUATED_SET and fitted.oracle_operating_points == ()
    applied = binary_metrics(truth, score, n_bootstrap=0, thresholds={0.9: 0.7, 0.95: float("inf")},
                             thresholds_from="validation")
    at_90, at_95 = applied.operating_points
    # 0.7 calls 0.8, 0.9, 0.97, 0.99 and the 0.75, 0.85, 0.95 negatives: below the 90% the threshold was set for
    assert (at_90.target_specificity, at_90.threshold, at_90.sensitivity, at_90.specificity) == (0.9, 0.7, 0.8, 0.7)
    assert (at_95.sensitivity, at_95.specificity) == (0.0, 1.0)
    assert applied.thresholds_from == "validation" and applied.oracle_operating_points == fitted.operating_points
    assert binary_metrics(truth, score, n_bootstrap=0, thresholds={}).operating_points == ()


def test_sensitivity_at_fixed_specificity_by_hand() -> None:
    negatives = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
    positives = [0.5, 0.8, 0.9, 0.97, 0.99]
    metrics = binary_metrics([0] * 10 + [1] * 5, negatives + positives, n_bootstrap=0)
    at_90, at_95 = metrics.operating_points
    # One false positive (0.95) is allowed at 90%: threshold 0.9 calls 0.9, 0.97, 0.99 and the 0.95 negative.
    assert (at_90.target_specificity, at_90.threshold, at_90.sensitivity, at_90.specificity) == (0.9, 0.9, 0.6, 0.9)
    # None is allowed at 95%: threshold 0.97.
    assert (at_95.threshold, at_95.sensitivity, at_95.specificity) == (0.97, 0.4, 1.0)
    assert metrics.auc_ci is None
    assert metrics.fpr[0] == 0 and metrics.tpr[-1] == 1


def test_specificity_target_reached_exactly_despite_rounding() -> None:
    # 8 of 25 negatives (0.68 ... 0.96) score above the positive; 1 - 8/25 is 0.6799999999999999 in floating point
    metrics = binary_metrics([0] * 25 + [1], [*(np.arange(25) / 25), 0.675], n_bootstrap=0, specificities=[0.68])
    assert metrics.operating_points[0].sensitivity == 1.0


def test_one_class_is_refused() -> None:
    with pytest.raises(ValueError, match="both classes"):
        binary_metrics([1, 1, 1], [0.2, 0.5, 0.9])


def test_to_dict_is_plain_json_with_rounded_floats() -> None:
    metrics = binary_metrics([0, 0, 1, 1, 0], [1 / 3, 0.2, 0.9, 0.8, 0.95], n_bootstrap=50)
    data = json.loads(json.dumps(metrics.to_dict(), allow_nan=False))
    assert data["auc"] == round(metrics.auc, 4) == 0.6667
    assert data["operating_points"][0]["threshold"] is None  # the only point at 90% specificity calls nothing
    assert {"n", "positives", "auc_ci", "bootstrap_resamples", "bootstrap", "bootstrap_units", "thresholds_from",
            "oracle_operating_points", "fpr", "tpr"} <= data.keys()


def test_ece_is_zero_for_perfectly_calibrated_bins() -> None:
    # bin [0.25, 0.5): mean 0.25, 2 of 8 positive; bin [0.75, 1]: mean (4 * 0.75 + 3) / 7 = 6/7, 6 of 7 positive
    prob = [0.25] * 8 + [0.75] * 4 + [1.0] * 3
    truth = [1] * 2 + [0] * 6 + [1] * 3 + [0] + [1] * 3
    result = calibration(truth, prob, n_bins=4)
    assert result.ece == pytest.approx(0.0, abs=1e-12)
    assert [b.count for b in result.bins] == [0, 8, 0, 7]
    assert result.bins[0].mean_confidence is None


def test_ece_by_hand() -> None:
    # bin [0, 0.5): mean 0.2, frequency 2/3, 3 cases; bin [0.5, 1]: mean 0.8, frequency 1, 1 case
    result = calibration([0, 1, 1, 1], [0.1, 0.2, 0.3, 0.8], n_bins=2)
    assert result.ece == pytest.approx(3 / 4 * (2 / 3 - 0.2) + 1 / 4 * 0.2)
    assert [(b.count, b.mean_confidence, b.observed_frequency) for b in result.bins] == [
        pytest.approx((3, 0.2, 2 / 3)), pytest.approx((1, 0.8, 1.0))]


def test_multiclass_matches_sklearn_and_rows_are_truth() -> None:
    rng = np.random.default_rng(10)
    names = ["A", "B", "C", "D"]
    truth = rng.choice(4, size=200, p=[0.1, 0.4, 0.4, 0.1])
    probabilities = rng.dirichlet(np.ones(4), size=200) + 0.5 * np.eye(4)[truth]
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    result = multiclass_metrics([names[i] for i in truth], probabilities, names)
    predicted = probabilities.argmax(axis=1)
    assert result.balanced_accuracy == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert result.accuracy == pytest.approx(np.mean(truth == predicted))
    assert result.macro_auc_ovr == pytest.approx(roc_auc_score(truth, probabilities, multi_class="ovr"))

    small = multiclass_metrics([0, 0, 1], [[0.2, 0.8, 0.0], [0.4, 0.6, 0.0], [0.1, 0.9, 0.0]], ["A", "B", "C"])
    assert small.confusion == ((0, 2, 0), (0, 1, 0), (0, 0, 0))  # two true A predicted B
    assert small.recall == {"A": 0.0, "B": 1.0, "C": None}
    assert small.balanced_accuracy == 0.5
    assert small.macro_auc_ovr is None  # no case of C


def test_subgroups_show_gaps_and_reasons() -> None:
    rng = np.random.default_rng(11)
    truth = np.tile([0, 1], 200)
    score = np.where(np.arange(400) < 200, truth + 0.3 * rng.normal(size=400), rng.random(400))
    site = ["good"] * 200 + ["random"] * 200
    view = ["CC" if i % 4 < 2 else "MLO" for i in range(400)]
    truth[-12:] = 0
    site[-20:] = ["tiny"] * 8 + ["benign-only"] * 12
    view[0] = None
    table = subgroup_table(truth, score, {"site": site, "view": view}, min_cases=10)
    rows = {(row.attribute, row.value): row for row in table.rows}
    assert table.overall_auc == pytest.approx(roc_auc_score(truth, score))
    assert rows["site", "random"].gap < -0.2 < 0.1 < rows["site", "good"].gap
    assert rows["site", "benign-only"].auc is None and "one class" in rows["site", "benign-only"].reason
    assert rows["site", "tiny"].auc is None and rows["site", "tiny"].reason == "fewer than 10 cases"
    assert rows["view", "unknown"].n == 1
    assert [value for attribute, value in rows if attribute == "site"] == ["benign-only", "good", "random", "tiny"]


def test_age_bands_sort_in_age_order() -> None:
    ages = [35, 45, 55, 65, 75, 85, 52, 47, 61, 38, 44, 72]
    bands = [age_band(a) for a in ages]
    table = subgroup_table([0, 1] * 6, np.linspace(0, 1, 12), {"age": bands}, min_cases=1)
    assert [row.value for row in table.rows] == ["<40", "40-49", "50-59", "60-69", "70+"]


@pytest.mark.parametrize(("text", "years"), [
    ("052Y", 52), ("006M", 0.5), ("052W", 364 / 365.25), ("365D", 365 / 365.25), (" 070Y ", 70), ("abc", None),
    ("52", None), ("052X", None), ("", None), (None, None), ("1052Y", None)])
def test_patient_age_parsing(text, years) -> None:
    assert parse_patient_age(text) == (None if years is None else pytest.approx(years))


@pytest.mark.parametrize(("age", "band"), [
    (0.5, "<40"), (39.9, "<40"), (40, "40-49"), (49.99, "40-49"), (50, "50-59"), (69, "60-69"), (70, "70+"),
    (101, "70+"), (None, "unknown")])
def test_age_band(age, band) -> None:
    assert age_band(age) == band


def test_aggregate_scores_by_breast() -> None:
    keys = [("s1", "L"), ("s1", "L"), ("s1", "R"), ("s2", "L"), ("s1", "R")]
    scores = [0.2, 0.6, 0.1, 0.9, 0.3]
    assert aggregate_scores(scores, keys) == {("s1", "L"): 0.6, ("s1", "R"): 0.3, ("s2", "L"): 0.9}
    assert aggregate_scores(scores, keys, how="mean") == pytest.approx({("s1", "L"): 0.4, ("s1", "R"): 0.2,
                                                                        ("s2", "L"): 0.9})
    with pytest.raises(ValueError, match="how"):
        aggregate_scores(scores, keys, how="median")


@pytest.fixture(scope="module")
def results() -> dict[str, object]:
    mass, calcification = shifted_scores(300, seed=12), shifted_scores(300, seed=13, shift=2.0)
    rng = np.random.default_rng(14)
    density = rng.choice(4, size=120)
    site = ["A"] * 150 + ["B"] * 150
    return {
        "binary": {"mass": binary_metrics(*mass, n_bootstrap=200),
                   "calcification": binary_metrics(*calcification, n_bootstrap=200)},
        "multiclass": {"density": multiclass_metrics(density, rng.dirichlet(np.ones(4), size=120) +
                                                     np.eye(4)[density], ["A", "B", "C", "D"])},
        "calibration": {"mass": calibration(mass[0], 1 / (1 + np.exp(-mass[1])))},
        "subgroups": subgroup_table(mass[0], np.r_[mass[1][:150], rng.random(150)], {"site": site}),
    }


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plots_are_png_files(results, tmp_path: Path) -> None:
    roc = plot_roc(results["binary"], tmp_path / "roc.png", "ROC")
    reliability = plot_reliability(results["calibration"]["mass"], tmp_path / "reliability.png", "mass")
    confusion = plot_confusion(results["multiclass"]["density"], tmp_path / "confusion.png", "density")
    assert png_size(roc) == (5.5 * DPI, 5.5 * DPI)
    assert png_size(reliability) == (5.5 * DPI, 6 * DPI)
    width, height = png_size(confusion)
    assert width > height > 300


def test_roc_legend_claims_a_specificity_only_where_its_thresholds_were_fitted() -> None:
    assert operating_point_label(0.9, {EVALUATED_SET}) == "specificity ≥ 90%"
    assert operating_point_label(0.95, {"validation"}) == "threshold for 95% specificity on validation"
    assert operating_point_label(0.9, {"validation", EVALUATED_SET}) == "threshold for 90% specificity"
    assert operating_point_label(0.9, {"validation", "fold 2"}) == "threshold for 90% specificity"


def test_html_report_is_self_contained_and_escaped(results, tmp_path: Path) -> None:
    image = plot_roc(results["binary"], tmp_path / "roc.png", "ROC")
    page_path = write_html_report(
        tmp_path / "report.html", title="<script>alert(1)</script>", model_description="tiny & random",
        dataset_description="300 synthetic cases", binary=results["binary"], multiclass=results["multiclass"],
        calibration=results["calibration"], subgroups=results["subgroups"], images={"ROC curves": image},
        notes=["thresholds from <this> set"])
    page = page_path.read_text(encoding="utf-8")
    assert page.index(BANNER) < page.index("<h1>")
    assert "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode() in page
    assert all(task in page for task in ("mass", "calcification", "density"))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "tiny &amp; random" in page and "&lt;this&gt;" in page
    gap = next(row.gap for row in results["subgroups"].rows if row.value == "B")
    assert f'<td class="gap">{gap:+.3f}</td>' in page
    assert page.count('class="gap"') == sum(abs(row.gap) >= 0.05 for row in results["subgroups"].rows)
