"""Zero-shot scoring: probabilities, template averaging, per-breast aggregation, missing views, calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.inference import SCREENING_VIEWS, score_views
from models.prompts import PROMPT_TASKS
from models.zero_shot import CALIBRATION_KEY, LogitCalibration, ZeroShotClassifier, aggregate_breasts
from training.calibration import class_index, fit_task


def test_the_reference_prompt_set_scores_as_the_reference_evaluator(model) -> None:
    """The reference's own prompts (configs/zs_clip.yaml), one per class, scored as softmax(cosine similarity):
    no logit scale and no calibration, whatever the card says."""
    model.card = {CALIBRATION_KEY: {"mass": {"scale": 0.5, "bias": [0.0, -1.0]}}}
    try:
        classifier = ZeroShotClassifier(model, tasks=["mass", "calcification", "malignancy"], prompt_set="reference")
    finally:
        del model.card
    assert [task.classes for task in classifier.tasks] == [
        ("no mass", "mass"), ("no suspicious calcification", "suspicious calcification"),
        ("no malignancy", "malignancy")]
    assert classifier.scale == 1.0 and classifier.calibration == {}
    images = torch.nn.functional.normalize(torch.randn(4, model.config.projection_dim), dim=-1)
    with torch.inference_mode():
        text = torch.nn.functional.normalize(model.encode_texts(["no mass", "mass"]).float(), dim=-1)
    expected = torch.softmax(images @ text.T, dim=-1)[:, 1]
    torch.testing.assert_close(classifier.classify(images)["mass"].score(), expected, rtol=1e-4, atol=1e-5)


def test_probabilities_are_distributions_over_each_task(model) -> None:
    classifier = ZeroShotClassifier(model)
    images = torch.nn.functional.normalize(torch.randn(3, model.config.projection_dim), dim=-1)
    results = classifier.classify(images)
    assert set(results) == set(PROMPT_TASKS)
    for name, scores in results.items():
        assert scores.probabilities.shape == (3, len(PROMPT_TASKS[name].classes))
        torch.testing.assert_close(scores.probabilities.sum(dim=1), torch.ones(3))


def test_scores_are_template_averaged_softmax_of_scaled_similarities(model) -> None:
    """With known prompt embeddings the probabilities are exactly softmax(scale * cos), averaged."""
    classifier = ZeroShotClassifier(model, tasks=["mass"])
    dim = model.config.projection_dim
    templates = classifier.text_embeddings["mass"].shape[0]
    negative, positive = torch.eye(dim)[0], torch.eye(dim)[1]
    classifier.text_embeddings["mass"] = torch.stack([torch.stack([negative, positive])] * templates)
    scores = classifier.classify(torch.stack([positive, negative]))["mass"].score()
    expected = torch.softmax(torch.tensor([0.0, classifier.scale]), dim=0)[1]
    torch.testing.assert_close(scores, torch.stack([expected, 1 - expected]))
    assert scores[0] > 0.5 > scores[1]


def test_breast_aggregation_averages_views() -> None:
    views = {("L", "CC"): {"mass": torch.tensor([0.8, 0.2])}, ("L", "MLO"): {"mass": torch.tensor([0.4, 0.6])},
             ("R", "CC"): {"mass": torch.tensor([1.0, 0.0])}}
    breasts = aggregate_breasts(views)
    torch.testing.assert_close(breasts["L"]["mass"], torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(breasts["R"]["mass"], torch.tensor([1.0, 0.0]))


def test_study_with_a_missing_view_is_scored_and_reports_it(model) -> None:
    images = {key: torch.randn(3, 64, 48) for key in SCREENING_VIEWS if key != ("R", "MLO")}
    result = score_views(ZeroShotClassifier(model), images)
    assert result.missing_views == [("R", "MLO")]
    assert set(result.views) == set(images) and set(result.breasts) == {"L", "R"}
    assert result.feature_maps == {}  # none kept, nor copied off a GPU, unless asked for
    kept = score_views(ZeroShotClassifier(model), images, keep_feature_maps=True)
    assert set(kept.feature_maps) == set(images)
    assert all(m.shape == (model.image_encoder.out_dim, 2, 1) for m in kept.feature_maps.values())  # 64x48 / 32
    assert all(torch.equal(kept.embeddings[key], result.embeddings[key]) for key in images)


def test_a_card_calibration_maps_each_templates_logits_before_the_softmax(model) -> None:
    images = torch.nn.functional.normalize(torch.randn(4, model.config.projection_dim), dim=-1)
    model.card = {CALIBRATION_KEY: {"malignancy": {"scale": 1e-9, "bias": [0.0, 2.0]}}}
    try:
        calibrated = ZeroShotClassifier(model, tasks=["malignancy", "mass"]).classify(images)
    finally:
        del model.card
    # a scale of ~0: every template's logits are the biases alone, whatever the image
    torch.testing.assert_close(calibrated["malignancy"].score(), torch.sigmoid(torch.tensor(2.0)).repeat(4))
    plain = ZeroShotClassifier(model, tasks=["mass"]).classify(images)["mass"].probabilities
    torch.testing.assert_close(calibrated["mass"].probabilities, plain)  # a task without one is left alone
    with pytest.raises(ValueError, match="2 biases for 4 classes"):
        ZeroShotClassifier(model, calibration={"density": LogitCalibration(1.0, (0.0, 1.0))})


def test_the_fitted_calibration_recovers_the_map_that_made_the_labels() -> None:
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 4000, 2, generator=generator) * 6  # a sharp zero-shot softmax
    truth = (0.25 * logits + torch.tensor([0.0, -1.0])).softmax(dim=-1)[0, :, 1]
    targets = (torch.rand(4000, generator=generator) < truth).long()
    fitted = fit_task(logits, targets)
    assert abs(fitted.scale - 0.25) < 0.05
    assert abs((fitted.bias[1] - fitted.bias[0]) - (-1.0)) < 0.25


def test_labels_become_class_indices_of_each_task() -> None:
    assert class_index(PROMPT_TASKS["malignancy"].labels, 1) == 1 and class_index(("absent", "present"), False) == 0
    assert class_index(PROMPT_TASKS["density"].labels, "C") == 2
    assert class_index(PROMPT_TASKS["birads"].labels, 4) == 3 and class_index(PROMPT_TASKS["birads"].labels, 0) is None
    assert class_index(("absent", "present"), np.int64(1)) == 1 and class_index(("absent", "present"), -1) is None
    assert class_index(PROMPT_TASKS["birads"].labels, np.int64(5)) == 4


def test_a_calibration_that_would_reverse_the_scores_is_refused() -> None:
    with pytest.raises(ValueError, match="positive finite scale"):
        LogitCalibration.from_card({"scale": -1.0, "bias": [0.0, 0.0]})
    with pytest.raises(ValueError, match="positive finite scale"):
        LogitCalibration.from_card({"scale": 1.0, "bias": [0.0, float("nan")]})


def test_the_model_version_names_the_calibration(model) -> None:
    from dicom_node.serving import model_identity

    model.card = {"name": "v", "weights_sha256": "0123456789abcdef"}
    try:
        assert model_identity(model).model_version == "v@0123456789ab"
        model.card[CALIBRATION_KEY] = {"mass": {"scale": 0.5, "bias": [0.0, -1.0]}}
        calibrated = model_identity(model).model_version
        model.card[CALIBRATION_KEY]["mass"]["scale"] = 0.6
        assert calibrated.startswith("v@0123456789ab+cal") and model_identity(model).model_version != calibrated
    finally:
        del model.card


def test_a_long_version_name_keeps_its_digest_in_the_results(model) -> None:
    """A registry name of any length still names the weights' and calibration's digest, whole, in the model
    version that the SR, the SEG and Software Versions carry (LO: 64 characters)."""
    from dicom_node.results.equipment import software_versions
    from dicom_node.serving import model_identity

    model.card = {"weights_sha256": "0123456789abcdef", CALIBRATION_KEY: {"mass": {"scale": 0.5, "bias": [0, 1]}}}
    try:
        identity = model_identity(model, "site-finetune-" + "x" * 80)
        digest = model_identity(model, "v").model_version.removeprefix("v@")
        assert identity.model_version.endswith("@" + digest) and identity.model_version.startswith("site-finetune-")
        assert all(len(value) <= 64 for value in software_versions(identity))
        assert software_versions(identity)[1] == f"model {identity.model_version}"
    finally:
        del model.card
