"""Classification heads on a synthetic archive: linear probe outputs, reload, few-shot, multi-class, learnability."""

from __future__ import annotations

import csv
import html
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import cast

import click
import numpy as np
import pytest
import torch

from dicom_node.cli_train import _device
from dicom_node.settings import Settings
from models import load_model, save_model_version
from models.errors import CheckpointError
from models.heads import load_head, probabilities, score_images
from models.preprocess import PreprocessConfig
from tests.conftest import tiny_model
from training.archive.indexer import index_archive
from training.archive.store import open_index
from training.convert import convert_archive
from training.evaluate import BinaryMetrics, binary_metrics
from training.evaluate.metrics import EVALUATED_SET
from training.finetune import (
    LEVELS,
    FinetuneConfig,
    ImageRecord,
    aggregate,
    evaluate,
    evaluation_notes,
    few_shot,
    finetune,
    load_batch,
    load_images,
    train_linear,
    weighted_loss,
)
from training.provenance import TRAINED_ON_FILE, fingerprint, seen_note, study_uids, write_trained_on
from training.synthetic import write_studies

INPUT = PreprocessConfig(height=64, width=48)
QUICK = FinetuneConfig(target="mass", steps=60, evaluate_every=5, n_bootstrap=200, synthetic_data=True,
                       progress=False)
OUTPUTS = ["card.json", "head.json", "head.safetensors", "metrics.json", "report.html", "roc.png", "trained_on.json"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 synthetic studies indexed with their manifest as label table, converted at 64x48, and a tiny model."""
    root = tmp_path_factory.mktemp("finetune")
    manifest = write_studies(root / "studies", 40, seed=7, rows=256, cols=160, progress=False)
    index_archive(root / "studies", open_index(root / "index"), None, manifest, seed=3, progress=False)
    convert_archive(open_index(root / "index"), root / "cache", INPUT, workers=1, progress=False)
    save_model_version(tiny_model(seed=1), root / "tiny", card={"name": "tiny-test-model"})
    return {"root": root, "index": root / "index", "manifest": manifest, "tiny": root / "tiny"}


@pytest.fixture(scope="module")
def mass_head(archive: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune(archive["index"], archive["tiny"], tmp_path_factory.mktemp("mass") / "head", config=QUICK)


def _rescored_auc(archive: dict[str, Path], folder: Path) -> tuple[float, torch.Tensor]:
    """Image-level test AUC of the reloaded head, scored through ``score_images`` as the node would."""
    model, head = load_model(archive["tiny"]), load_head(folder)
    records, _ = load_images(archive["index"], "test", INPUT, head.info["target"])
    scores = score_images(model, head, load_batch(records, INPUT), batch_size=7)
    return binary_metrics([int(r.label) for r in records], scores.numpy(), n_bootstrap=0).auc, scores


def test_linear_probe_writes_every_output(mass_head: Path, archive: dict[str, Path]) -> None:
    assert sorted(p.name for p in mass_head.iterdir()) == OUTPUTS
    metrics = json.loads((mass_head / "metrics.json").read_text())
    breast = metrics["test"]["breast"]
    assert 0 <= breast["auc"] <= 1 and breast["auc_ci"][0] <= breast["auc"] <= breast["auc_ci"][1]
    counts = metrics["counts"]
    assert counts["test"]["breasts"] == breast["n"] == metrics["test"]["image"]["n"] / 2
    assert counts["test"]["studies"] == metrics["test"]["study"]["n"]
    assert sum(counts[s]["studies"] for s in ("train", "validation", "test")) == 40
    assert breast["bootstrap"] == "cluster" and 0 < breast["bootstrap_units"] <= counts["test"]["studies"]
    head = json.loads((mass_head / "head.json").read_text())
    assert head["target"] == "mass" and head["classes"] == ["no mass", "mass"] and head["mode"] == "linear"
    assert head["feature_dim"] == tiny_model().image_encoder.out_dim and not head["own_encoder"]
    assert head["thresholds"]["split"] == "validation"
    points = breast["operating_points"]  # head.json's validation thresholds applied to test
    assert [p["target_specificity"] for p in points] == [0.9, 0.95] and breast["thresholds_from"] == "validation"
    assert [p["threshold"] for p in points] == [head["thresholds"][f"specificity_{p['target_specificity']:.2f}"][
        "threshold"] for p in points]
    assert all(0 <= p["sensitivity"] <= 1 and 0 <= p["specificity"] <= 1 for p in points)
    assert all(p["specificity"] >= 0.9 for p in breast["oracle_operating_points"])  # fitted on test
    assert (mass_head / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (mass_head / "report.html").read_text()
    assert "data:image/png;base64," in page and "oracle (fitted on test)" in page
    assert "cluster bootstrap over patients" in page
    card = json.loads((mass_head / "card.json").read_text())
    assert card["clinical_use"] is False and "NOT a clinical model" in card["intended_use"]
    assert card["data"]["train"]["images"] == counts["train"]["images"] and card["base_model"] == "tiny-test-model"
    with archive["manifest"].open() as handle:
        rows = list(csv.DictReader(handle))
    identifiers = {row[name] for row in rows for name in ("patient_id", "accession_number", "study_instance_uid",
                                                          "sop_instance_uid")}
    written = "".join((mass_head / name).read_text() for name in ("card.json", "head.json", "metrics.json",
                                                                  "report.html", "trained_on.json"))
    assert not [value for value in identifiers if value in written] and str(archive["root"]) not in written


def test_a_head_records_the_studies_it_learned_from(mass_head: Path, archive: dict[str, Path]) -> None:
    record = json.loads((mass_head / TRAINED_ON_FILE).read_text())
    learned = study_uids(archive["index"], ("train", "validation"))
    assert record["count"] == len(learned) == len(record["studies"]) and record["base"] == "unknown"
    assert set(record["studies"]) == {fingerprint(uid) for uid in learned.values()}
    assert json.loads((mass_head / "card.json").read_text())["data"]["studies_sha256"] == record["sha256"]
    seen = json.loads((mass_head / "metrics.json").read_text())["test_studies_seen"]
    assert seen.startswith("None of the ") and "base model's training data is unknown" in seen
    assert html.escape(seen) in (mass_head / "report.html").read_text()


def test_an_evaluation_of_studies_the_model_learned_from_warns(archive: dict[str, Path], tmp_path: Path) -> None:
    train, test = (study_uids(archive["index"], (split,)).values() for split in ("train", "test"))
    assert "training data is unknown" in seen_note(archive["tiny"], test, "the test split")
    version = tmp_path / "version"
    write_trained_on(version, archive["index"], ("train",), None)
    assert json.loads((version / TRAINED_ON_FILE).read_text())["base"] == "none"
    assert seen_note(version, train, "the train split") == (
        f"WARNING: {len(train)} of the {len(train)} studies of the train split were used to train this model: "
        "these figures are optimistic.")
    assert seen_note(version, test, "the test split") == (
        f"None of the {len(test)} studies of the test split was used to train this model.")
    head = tmp_path / "head"  # trained on validation from that version: it carries the version's studies
    write_trained_on(head, archive["index"], ("validation",), version)
    assert "WARNING" in seen_note(head, train, "the train split")
    assert json.loads((head / TRAINED_ON_FILE).read_text())["base"] == "included"


def test_reloaded_head_scores_as_evaluated(mass_head: Path, archive: dict[str, Path], tmp_path: Path) -> None:
    auc, scores = _rescored_auc(archive, mass_head)
    assert auc == pytest.approx(json.loads((mass_head / "metrics.json").read_text())["test"]["image"]["auc"],
                                abs=1e-4)
    assert torch.equal(scores, _rescored_auc(archive, mass_head)[1])
    assert ((scores > 0) & (scores < 1)).all()
    other = load_model(save_model_version(tiny_model(seed=2), tmp_path / "other"))
    with pytest.raises(CheckpointError, match="another model's encoder"):
        score_images(other, load_head(mass_head), torch.zeros(1, 3, 64, 48))


def test_few_shot_takes_exactly_k_per_class(archive: dict[str, Path], tmp_path: Path) -> None:
    records, _ = load_images(archive["index"], "train", INPUT, "calcification")
    truth = np.array([int(r.label) for r in records])
    chosen = few_shot(records, truth, 4, seed=1)
    assert np.bincount(truth[chosen]).tolist() == [4, 4]
    assert chosen == few_shot(records, truth, 4, seed=1) and chosen != few_shot(records, truth, 4, seed=2)
    folder = finetune(archive["index"], archive["tiny"], tmp_path / "head",
                      config=replace(QUICK, target="calcification", k_shot=4))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["k_shot"] == 4
    assert metrics["counts"]["train"]["images_per_class"] == {"no calcification": 4, "calcification": 4}


def test_density_head_reports_a_confusion_matrix(archive: dict[str, Path], tmp_path: Path) -> None:
    folder = finetune(archive["index"], archive["tiny"], tmp_path / "head", config=replace(QUICK, target="density"))
    assert (folder / "confusion.png").exists() and not (folder / "roc.png").exists()
    metrics = json.loads((folder / "metrics.json").read_text())
    breast = metrics["test"]["breast"]
    assert breast["class_names"] == ["A", "B", "C", "D"]
    assert np.array(breast["confusion"]).shape == (4, 4) and np.sum(breast["confusion"]) == breast["n"]
    assert 0 <= breast["balanced_accuracy"] <= 1
    head = load_head(folder)
    assert head.linear.out_features == 4 and head.info["thresholds"]["unavailable"] == "multi-class head"
    model = load_model(archive["tiny"])
    records, _ = load_images(archive["index"], "test", INPUT, "density")
    probs = score_images(model, head, load_batch(records[:6], INPUT))
    assert probs.shape == (6, 4) and torch.allclose(probs.sum(1), torch.ones(6))


@pytest.mark.parametrize("mode", ["full", "adapter"])
def test_image_modes_save_what_they_trained(mode: str, archive: dict[str, Path], tmp_path: Path) -> None:
    """``full`` saves its own encoder; ``adapter`` saves adapters and leaves the model's encoder as it was."""
    folder = finetune(archive["index"], archive["tiny"], tmp_path / "head",
                      config=replace(QUICK, mode=mode, epochs=1, batch_size=32, learning_rate=1e-3))
    head = load_head(folder)
    base = load_model(archive["tiny"]).image_encoder.state_dict()
    if mode == "full":
        assert head.info["own_encoder"] and head.encoder is not None and head.adapters is None
        tuned = head.encoder.state_dict()
        assert not all(torch.equal(base[k], tuned[k]) for k in base)
    else:
        assert not head.info["own_encoder"] and head.encoder is None
        assert len(head.adapters) == len(head.info["adapter_channels"]) > 0
        assert any(p.abs().sum() > 0 for name, p in head.adapters.named_parameters() if ".up." in name)
    auc, _ = _rescored_auc(archive, folder)
    assert auc == pytest.approx(json.loads((folder / "metrics.json").read_text())["test"]["image"]["auc"], abs=1e-4)
    model = load_model(archive["tiny"])
    records, _ = load_images(archive["index"], "test", INPUT, "mass")
    images = load_batch(records[:4], INPUT)
    with torch.inference_mode():
        plain = model.image_encoder(images)
    score_images(model, head, images)
    with torch.inference_mode():
        assert torch.equal(model.image_encoder(images), plain)  # no adapter stays attached to the model


def test_linear_probe_learns_separable_features() -> None:
    """Features whose first dimensions carry the label, on very different scales: the probe must find them."""
    rng = np.random.default_rng(0)

    def features(n: int) -> tuple[torch.Tensor, np.ndarray]:
        labels = (rng.random(n) < 0.2).astype(int)
        x = rng.normal(size=(n, 64))
        x[:, :4] += 2.0 * labels[:, None]
        scales, offsets = np.geomspace(0.01, 100, 64), np.linspace(-50, 50, 64)
        return torch.tensor(x * scales + offsets, dtype=torch.float32), labels

    (train, y), (validation, y_val), (test, y_test) = features(400), features(100), features(300)
    layer, history = train_linear(train, torch.as_tensor(y), validation, y_val, 1,
                                  replace(QUICK, steps=200, evaluate_every=10))
    assert len(history) == 20 and history[-1]["loss"] < history[0]["loss"]
    with torch.no_grad():
        auc = binary_metrics(y_test, probabilities(layer(test)).numpy(), n_bootstrap=0).auc
    assert auc > 0.95


def synthetic_records(patients: list[str | None]) -> list[ImageRecord]:
    """One study of two breasts of two views per entry of ``patients``."""
    return [ImageRecord(f"{study}{side}{view}.npy", study, side, view, 0, None, None, None, patient)
            for study, patient in enumerate(patients) for side in "LR" for view in ("CC", "MLO")]


def test_breast_and_study_scores_aggregate_as_the_node_serves_them() -> None:
    """A head's breast takes the max of its views, zero-shot the mean (``models.zero_shot.aggregate_breasts``);
    a study takes the max of its breasts either way."""
    records = synthetic_records(["p1", "p2"])  # views in order L CC, L MLO, R CC, R MLO per study
    truth = np.array([0, 0, 0, 0, 0, 1, 1, 0])
    scores = np.array([0.9, 0.1, 0.4, 0.4, 0.2, 0.6, 0.7, 0.3])
    labels, breast_max = aggregate(records, truth, scores, "breast")
    assert labels.tolist() == [0, 0, 1, 1] and breast_max.tolist() == [0.9, 0.4, 0.6, 0.7]
    assert aggregate(records, truth, scores, "breast", "mean")[1].tolist() == pytest.approx([0.5, 0.4, 0.4, 0.5])
    assert aggregate(records, truth, scores, "study")[1].tolist() == [0.9, 0.7]
    labels, study_mean = aggregate(records, truth, scores, "study", "mean")
    assert labels.tolist() == [0, 1] and study_mean.tolist() == pytest.approx([0.5, 0.5])


def test_test_operating_points_apply_the_validation_thresholds_and_cis_resample_patients() -> None:
    rng = np.random.default_rng(3)
    config, classes = replace(QUICK, n_bootstrap=20), ("no mass", "mass")

    def split(patients: list[str | None]) -> tuple[list[ImageRecord], np.ndarray, np.ndarray]:
        records = synthetic_records(patients)
        truth = (rng.random(len(records)) < 0.3).astype(int)
        return records, truth, rng.normal(size=len(records)) + truth

    validation = evaluate(*split([f"v{i // 2}" for i in range(40)]), classes, config)
    records, truth, scores = split([f"t{i // 2}" for i in range(40)])  # 20 patients of two studies each
    test = evaluate(records, truth, scores, classes, config, validation)
    for level in LEVELS:
        fitted, applied = validation[level], test[level]
        assert isinstance(fitted, BinaryMetrics) and isinstance(applied, BinaryMetrics)
        assert fitted.thresholds_from == EVALUATED_SET and applied.thresholds_from == "validation"
        assert [p.threshold for p in applied.operating_points] == [p.threshold for p in fitted.operating_points]
        labels, level_scores = aggregate(records, truth, scores, level)
        for point in applied.operating_points:
            called = level_scores >= point.threshold
            assert point.sensitivity == called[labels == 1].mean()
            assert point.specificity == 1 - called[labels == 0].mean()
        assert applied.oracle_operating_points == binary_metrics(labels, level_scores, n_bootstrap=0).operating_points
        assert (applied.bootstrap, applied.bootstrap_units) == ("cluster", 20)
    assert "oracle (fitted on test)" in evaluation_notes(test)[1]
    left = np.array([int(record.side == "L") for record in synthetic_records([None] * 10)])
    studies_one_class = evaluate(synthetic_records([f"w{i}" for i in range(10)]), left, left + 0.0, classes, config)
    partly = evaluate(records, truth, scores, classes, config, studies_one_class)  # no study-level thresholds
    assert [cast(BinaryMetrics, partly[level]).thresholds_from for level in LEVELS] == [
        "validation", "validation", EVALUATED_SET]
    assert cast(BinaryMetrics, partly["study"]).operating_points
    assert evaluation_notes(partly)[-1].startswith("No validation thresholds at the study level")
    unknown = evaluate(synthetic_records([None] * 40), truth, scores, classes, config)
    assert [(m.bootstrap, m.bootstrap_units) for m in unknown.values() if isinstance(m, BinaryMetrics)] == [
        ("case", 160), ("case", 80), ("case", 40)]


def test_loss_weights_follow_the_logits_device() -> None:
    """The class weights come from the targets on the CPU and go to the logits' device (the meta device stands
    in for a GPU here)."""
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    multiclass = weighted_loss(targets, 3, binary=False)(torch.zeros(6, 3, device="meta"), targets.to("meta"))
    binary = weighted_loss(targets.clamp(max=1), 2, binary=True)(torch.zeros(6, 1, device="meta"),
                                                                  targets.clamp(max=1).to("meta"))
    assert multiclass.device.type == binary.device.type == "meta"


def test_device_option_resolves_auto_and_refuses_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(device="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(settings, None) == _device(settings, "auto") == "cpu"
    with pytest.raises(click.UsageError, match="no CUDA device"):
        _device(settings, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device(settings, None) == _device(settings, "cuda") == "cuda"
    assert _device(settings, "cpu") == _device(Settings(device="cpu"), None) == "cpu"


def test_train_finetune_command(archive: dict[str, Path], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "finetune", str(archive["index"]),
                             str(archive["tiny"]), str(tmp_path / "head"), "--target", "mass", "--steps", "20",
                             "--synthetic", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MAMMO_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report.html" in result.stdout and (tmp_path / "head" / "report.html").exists()
    refused = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "finetune", str(archive["index"]),
                              str(archive["tiny"]), str(tmp_path / "head"), "--target", "mass"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "already holds a trained head" in refused.stderr  # never overwritten


def test_train_evaluate_command_zero_shot(archive: dict[str, Path], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "evaluate", str(archive["index"]),
                             str(archive["tiny"]), str(tmp_path / "eval"), "--device", "cpu", "--prompts",
                             "reference"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "MAMMO_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"malignancy", "mass", "calcification"} and metrics["split"] == "test"
    assert metrics["prompts"] == "reference"
    scored = {target: levels["breast"] for target, levels in metrics["results"].items()
              if isinstance(levels.get("breast"), dict)}
    assert scored and (tmp_path / "eval" / "roc.png").exists()
    for target, breast in scored.items():
        assert 0.0 <= breast["auc"] <= 1.0 and f"{target:<14} breast level: AUC" in result.stdout
        assert breast["thresholds_from"] == EVALUATED_SET and breast["bootstrap"] == "cluster"
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("Zero-shot") >= 1 and "fitted on the evaluated split itself" in page
    assert "the reference&#x27;s own" in page or "the reference's own" in page
    assert metrics["studies_seen"] in result.stdout and "training data is unknown" in metrics["studies_seen"]
