"""Zero-shot scoring: probabilities, template averaging, per-breast aggregation, missing views."""

from __future__ import annotations

import torch

from models.inference import SCREENING_VIEWS, score_views
from models.prompts import PROMPT_TASKS
from models.zero_shot import ZeroShotClassifier, aggregate_breasts


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
