"""The lesion detector: backbone taps, torchvision RetinaNet wiring, training, mAP, source coordinates, loading."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.detector import (
    DetectorConfig,
    MammoDetector,
    detect_views,
    detector_from_clip,
    feature_layout,
    load_detector,
    load_reference_detector,
    reference_key,
    save_detector,
    to_model_boxes,
    to_source_boxes,
    view_detections,
)
from models.errors import CheckpointError, ConfigurationError
from models.preprocess import CropBox
from tests.conftest import tiny_model
from training import detector_train
from training.detector_train import (
    BoxAnnotation,
    DetectorData,
    DetectorTrainConfig,
    annotations_from_box_csv,
    annotations_from_manifest,
    class_average_precision,
    evaluate,
    flip,
    main,
    mask_box,
    mean_average_precision,
    parse_categories,
    prepare_samples,
    run_detector,
    summary_lines,
    train_detector,
    validation_split,
)
from training.provenance import TRAINED_ON_FILE, fingerprint, seen_note
from training.synthetic import write_studies

TINY = DetectorConfig(image_encoder="efficientnet-test", input_height=96, input_width=64, fpn_channels=16,
                      anchor_size=8.0)


def tiny_detector(seed: int = 0, **overrides: object) -> MammoDetector:
    torch.manual_seed(seed)
    config = DetectorConfig(**{**TINY.to_dict(), **overrides})
    return MammoDetector(config).eval()


@pytest.fixture(scope="module")
def lesion_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic studies that both carry a finding."""
    root = tmp_path_factory.mktemp("detector-synthetic")
    return write_studies(root, 2, seed=5, rows=256, cols=160, finding_prevalence=1.0, progress=False)


@pytest.fixture(scope="module")
def three_patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic patients (one study each) that all carry a finding."""
    root = tmp_path_factory.mktemp("detector-three")
    return write_studies(root, 3, seed=5, rows=256, cols=160, finding_prevalence=1.0, progress=False)


@pytest.fixture(scope="module")
def lesion_samples(lesion_manifest: Path) -> list:
    """The prepared views of ``lesion_manifest`` with their mask boxes."""
    return prepare_samples(annotations_from_manifest(lesion_manifest), TINY, progress=False)


def test_feature_layout_reproduces_the_reference_indices() -> None:
    assert feature_layout("efficientnet-b5").indices == (26, 37)
    assert feature_layout("efficientnet-b5").channels == (176, 512, 2048)
    assert feature_layout("efficientnet-b2").indices == (15, 21)
    assert feature_layout("efficientnet-b2").channels == (120, 352, 1408)
    assert feature_layout("efficientnet-test").indices == (4, 5)  # one block per stage


def test_backbone_feature_shapes() -> None:
    detector = tiny_detector()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        c3, c4, c5 = detector.backbone.features(x)
        pyramid = detector.backbone(x)
    assert (c3.shape, c4.shape, c5.shape) == ((2, 32, 6, 4), (2, 48, 3, 2), (2, 320, 3, 2))
    assert list(pyramid) == ["p3", "p4", "p5", "p6", "p7"]
    assert [tuple(p.shape[-2:]) for p in pyramid.values()] == [(12, 8), (6, 4), (3, 2), (2, 1), (1, 1)]
    assert {p.shape[1] for p in pyramid.values()} == {16}


def test_torchvision_transform_is_neutral() -> None:
    detector = tiny_detector()
    images = [torch.randn(3, 96, 64), torch.randn(3, 96, 64)]
    batched, _ = detector.transform(images)
    assert torch.equal(batched.tensors, torch.stack(images))
    assert batched.image_sizes == [(96, 64), (96, 64)]


def test_forward_in_train_and_eval_mode() -> None:
    detector = tiny_detector().train()
    images = list(torch.randn(2, 3, 96, 64))
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = detector(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in losses.values())
    outputs = detector.predict(images, score_threshold=0.0)
    assert detector.training  # predict restores the mode
    assert len(outputs) == 2
    for output in outputs:
        boxes = output["boxes"]
        assert boxes.shape[1] == 4 and len(boxes) == len(output["scores"]) <= TINY.detections_per_image
        assert set(output["labels"].tolist()) <= {0, 1}
        assert boxes[:, [0, 2]].max() <= 64 and boxes[:, [1, 3]].max() <= 96 and boxes.min() >= 0


def test_masks_give_boxes_in_model_coordinates(lesion_samples: list) -> None:
    mask = np.zeros((10, 8), dtype=bool)
    mask[2:5, 3:7] = True
    assert mask_box(mask) == (3.0, 2.0, 7.0, 5.0)
    assert mask_box(np.zeros((4, 4))) is None
    with_boxes = [s for s in lesion_samples if len(s.labels)]
    assert len(with_boxes) >= 4 and set(np.concatenate([s.labels for s in with_boxes]).tolist()) <= {0, 1}
    for sample in with_boxes:
        source = to_source_boxes(sample.boxes, sample.crop, TINY.input_size)
        kept = np.array([b for b, f in zip(sample.annotation.boxes, sample.annotation.findings, strict=True)
                         if f in TINY.classes])
        np.testing.assert_allclose(source, kept, atol=1e-3)  # lesions lie inside the breast crop


def test_a_few_training_steps_reduce_the_loss(lesion_samples: list) -> None:
    samples = [s for s in lesion_samples if len(s.labels)][:4]
    detector = tiny_detector(seed=1)
    config = DetectorTrainConfig(epochs=8, batch_size=len(samples), learning_rate=1e-3, grad_clip=10.0,
                                 augment=False, seed=0, progress=False)
    history = train_detector(detector, samples, config)
    assert len(history.losses) == 8
    assert np.mean(history.losses[-2:]) < 0.75 * history.losses[0]  # measured 0.45-0.6 (detector seeds 1-3)
    assert not detector.training


def test_frozen_backbone_stays_fixed(lesion_samples: list) -> None:
    detector = tiny_detector(seed=2)
    encoder = {k: v.clone() for k, v in detector.backbone.encoder.state_dict().items()}
    head = detector.head.classification_head.cls_logits.weight.clone()
    config = DetectorTrainConfig(epochs=1, batch_size=2, freeze_backbone=True, learning_rate=1e-3, progress=False)
    train_detector(detector, lesion_samples[:2], config)
    assert all(torch.equal(v, detector.backbone.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not torch.equal(head, detector.head.classification_head.cls_logits.weight)


def test_map_matches_hand_computed_values() -> None:
    truth = [{"boxes": np.array([[0, 0, 10, 10]]), "labels": np.array([0])},
             {"boxes": np.array([[20, 20, 30, 30], [0, 0, 5, 5]]), "labels": np.array([0, 1])}]

    def prediction(boxes: list, scores: list, labels: list) -> dict:
        return {"boxes": np.array(boxes, dtype=float).reshape(-1, 4), "scores": np.array(scores),
                "labels": np.array(labels)}

    perfect = [prediction([[0, 0, 10, 10]], [0.9], [0]),
               prediction([[20, 20, 30, 30], [0, 0, 5, 5]], [0.8, 0.7], [0, 1])]
    metrics = mean_average_precision(perfect, truth, ("mass", "calcification"))
    assert metrics.average_precision == {"mass": 1.0, "calcification": 1.0} and metrics.mean_average_precision == 1.0
    nothing = [prediction([], [], []), prediction([], [], [])]
    assert mean_average_precision(nothing, truth, ("mass", "calcification")).mean_average_precision == 0.0
    # mass: TP 0.9, FP 0.8 (a duplicate of the matched box), TP 0.7 -> P/R (1, .5), (.5, .5), (.667, 1)
    # -> AP = 0.5 * 1 + 0.5 * 2/3; the calcification is missed (AP 0); a class without ground truth is left out
    partial = [prediction([[0, 0, 10, 10], [1, 1, 10, 10]], [0.9, 0.8], [0, 0]),
               prediction([[20, 20, 30, 30]], [0.7], [0])]
    metrics = mean_average_precision(partial, truth, ("mass", "calcification", "distortion"))
    assert metrics.average_precision["mass"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert metrics.average_precision["calcification"] == 0.0 and metrics.average_precision["distortion"] is None
    assert metrics.ground_truth_boxes == {"mass": 2, "calcification": 1, "distortion": 0}
    assert metrics.mean_average_precision == pytest.approx((0.5 + 0.5 * 2 / 3) / 2)
    assert class_average_precision([(np.array([0.5]), np.array([[0, 0, 1, 1]]))], [np.zeros((0, 4))]) is None
    # a box at IoU < 0.5 is a false positive: [0, 0, 10, 4] covers 40% of [0, 0, 10, 10]
    missed = [(np.array([0.9]), np.array([[0, 0, 10, 4]]))]
    assert class_average_precision(missed, [np.array([[0, 0, 10, 10]])]) == 0.0


def test_command_line_trains_evaluates_and_saves(lesion_manifest: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "det"
    assert main(["--manifest", str(lesion_manifest), "--variant", "efficientnet-test", "--input-size", "96", "64",
                 "--fpn-channels", "16", "--anchor-size", "8", "--epochs", "1", "--holdout", "0.5",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["held_out"]["average_precision"]) == {"mass", "calcification"}
    assert metrics["data"]["train"]["images"] == metrics["data"]["held_out"]["images"] == 4
    # one training patient: none can be set aside to choose the epoch, so the last is kept, and said so
    selection = {"epoch": 1, "chosen_on": "last epoch", "reason": "fewer than two training groups: none can be "
                                                                 "set aside"}
    assert metrics["epoch_selection"] == selection and metrics["data"]["validation"]["images"] == 0
    card = json.loads((out / "card.json").read_text())
    assert card["clinical_use"] is False and card["evaluation"]["epoch_selection"] == selection
    assert card["evaluation"]["mAP_on"] == "held_out (0.5 of the groups, seed 0)"
    assert "epoch 1 kept, the last: no usable validation set" in capsys.readouterr().out
    assert load_detector(out).config.input_size == (96, 64)


def test_the_epoch_is_chosen_on_training_groups_and_held_out_images_are_scored_once(
        three_patients: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One patient held out, one of the two training patients set aside for validation: every epoch is scored on
    the validation patient, the held-out one only once, after training."""
    scored: list[set[str]] = []

    def spy(detector: MammoDetector, samples: list, **kwargs: object) -> object:
        scored.append({s.annotation.group for s in samples})
        return evaluate(detector, samples, **kwargs)

    monkeypatch.setattr(detector_train, "evaluate", spy)
    data = DetectorData(manifest=three_patients, holdout=0.34, validation=0.5)
    config = DetectorTrainConfig(epochs=2, batch_size=4, augment=False, progress=False)
    run = run_detector(data, tiny_detector(), tmp_path / "det", config)
    validation, held = scored[0], scored[-1]
    assert len(scored) == 3 and scored[1] == validation and len(validation) == len(held) == 1
    assert not validation & held
    train = {group for group in {"SYN00000005", "SYN00000006", "SYN00000007"} - validation - held}
    assert len(train) == 1 and run.data["train"]["images"] == run.data["validation"]["images"] == 4
    assert run.metrics is not None and run.metrics.images == 4
    assert run.selection.to_dict() == {"epoch": run.history.best_epoch, "chosen_on": "validation", "reason": None}
    metrics = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert metrics["epoch_selection"]["chosen_on"] == "validation"
    assert metrics["mAP_on"] == "held_out (0.34 of the groups, seed 0)"
    assert metrics["data"]["held_out_studies_seen"] == ("None of the 1 studies of the held-out images was seen in "
                                                        "training: the model starts from random weights.")
    held_out = [a for a in annotations_from_manifest(three_patients) if a.group in held]
    base = tmp_path / "base"  # a backbone's version that learned from every study, the held-out one too
    base.mkdir()
    with three_patients.open() as handle:
        studies = sorted({fingerprint(row["study_instance_uid"]) for row in csv.DictReader(handle)})
    (base / TRAINED_ON_FILE).write_text(json.dumps({"base": "none", "studies": studies}))
    assert seen_note(base, detector_train._study_uids(held_out), "the held-out images").startswith(
        "WARNING: 1 of the 1 studies of the held-out images were used to train this model")
    assert [set(epoch["validation"]) >= {"mean_average_precision"} for epoch in metrics["history"]] == [True, True]
    assert summary_lines(run)[0].endswith("best mAP on the validation images (groups set aside from training)")


def test_validation_is_drawn_by_group() -> None:
    def annotation(group: str) -> BoxAnnotation:
        return BoxAnnotation(f"{group}.dcm", ("L", "CC"), (), (), group)

    train = [annotation(group) for group in "aabbccdddd"]
    fit, validation = validation_split(train, 0.25, seed=1)
    assert len({a.group for a in validation}) == 1  # round(4 groups * 0.25)
    assert not {a.group for a in fit} & {a.group for a in validation} and len(fit) + len(validation) == 10
    assert validation_split(train, 0.0, seed=1) == (train, [])
    assert validation_split(train[:2], 0.5, seed=1) == (train[:2], [])  # one group: nothing to set aside
    _, most = validation_split(train, 0.99, seed=1)
    assert len({a.group for a in most}) == 3  # one group is always left to train on


def test_evaluate_runs_the_detector(lesion_samples: list) -> None:
    metrics = evaluate(tiny_detector(), lesion_samples[:3], score_threshold=0.0)
    assert set(metrics.average_precision) == {"mass", "calcification"} and metrics.images == 3
    assert metrics.mean_average_precision is None or 0.0 <= metrics.mean_average_precision <= 1.0


def test_boxes_map_to_source_coordinates() -> None:
    crop = CropBox(top=10, bottom=110, left=20, right=70, source_shape=(200, 100))
    input_size = (50, 25)  # (height, width): 2 source pixels per model pixel on both axes
    model_boxes = np.array([[0, 0, 25, 50], [5, 10, 10, 20]], dtype=float)
    expected = np.array([[20, 10, 70, 110], [30, 30, 40, 50]], dtype=float)
    np.testing.assert_allclose(to_source_boxes(model_boxes, crop, input_size), expected)
    np.testing.assert_allclose(to_model_boxes(expected, crop, input_size), model_boxes)
    # the same mapping as CropBox.paste, which places the heatmaps
    model_mask = np.zeros(input_size, dtype=np.float32)
    model_mask[10:20, 5:10] = 1.0
    rows, cols = np.nonzero(crop.paste(model_mask) > 0.5)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (30, 30, 40, 50)
    config = DetectorConfig(classes=("mass", "calcification"), input_height=64, input_width=64)
    output = {"boxes": torch.tensor([[0.0, 0.0, 32.0, 64.0], [3.0, 3.0, 3.0, 9.0]]),
              "scores": torch.tensor([0.4, 0.9]), "labels": torch.tensor([1, 0])}
    square = CropBox(top=100, bottom=228, left=50, right=114, source_shape=(300, 200))
    [detection] = view_detections(output, square, config)  # the box without width is dropped
    assert (detection.finding, detection.box) == ("calcification", (50.0, 100.0, 82.0, 228.0))
    assert detection.score == pytest.approx(0.4)


def test_detect_views_gives_source_coordinates_per_view() -> None:
    detector = tiny_detector()
    with torch.no_grad():
        detector.head.classification_head.cls_logits.bias.fill_(2.0)  # every anchor scores 0.88
    crop = CropBox(top=4, bottom=260, left=8, right=200, source_shape=(300, 220))
    found = detect_views(detector, {("L", "CC"): torch.randn(3, 96, 64)}, {("L", "CC"): crop})
    detections = found[("L", "CC")]
    assert detections and all(d.finding in TINY.classes for d in detections)
    boxes = np.array([d.box for d in detections])
    assert boxes[:, [0, 2]].min() >= 8 and boxes[:, [0, 2]].max() <= 200
    assert boxes[:, [1, 3]].min() >= 4 and boxes[:, [1, 3]].max() <= 260


def test_save_and_load_give_identical_outputs(tmp_path: Path) -> None:
    detector = tiny_detector(base_model_sha256="ab" * 32)
    save_detector(detector, tmp_path / "det", {"note": "test"})
    loaded = load_detector(tmp_path / "det")
    assert loaded.config == detector.config
    x = torch.randn(2, 3, 96, 64)
    for a, b in zip(detector.predict(x, score_threshold=0.0), loaded.predict(x, score_threshold=0.0), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    with pytest.raises(CheckpointError, match="not a detector folder"):
        load_detector(tmp_path)


def test_detector_from_clip_takes_the_image_encoder() -> None:
    clip = tiny_model()
    detector = detector_from_clip(clip, input_height=96, input_width=64, fpn_channels=16)
    assert detector.config.image_encoder == clip.config.image_encoder
    assert detector.config.classes == ("mass", "calcification")
    for key, value in clip.image_encoder.state_dict().items():
        assert torch.equal(value, detector.backbone.encoder.state_dict()[key])


def _reference_name(key: str) -> str:
    """Our key -> the reference's ``Detectors/retinanet`` name (written out independently of the loader)."""
    fpn = {"lateral": "_1", "output": "_2"}
    if key.startswith("backbone.encoder."):
        return "efficientnet." + key.removeprefix("backbone.encoder.")
    if key.startswith("backbone.fpn."):
        name, rest = key.removeprefix("backbone.fpn.").split(".", 1)
        if name in ("p6", "p7"):
            return f"fpn.{'P6' if name == 'p6' else 'P7_2'}.{rest}"
        return f"fpn.P{name[-1]}{fpn[name[:-1]]}.{rest}"
    part = "regressionModel" if "regression_head" in key else "classificationModel"
    tail = key.split("_head.", 1)[1]
    if tail.startswith("conv."):
        index, _, rest = tail.removeprefix("conv.").split(".", 2)
        return f"{part}.conv{int(index) + 1}.{rest}"
    return f"{part}.output.{tail.split('.', 1)[1]}"


def test_reference_checkpoint_maps_key_for_key(tmp_path: Path) -> None:
    source = tiny_detector(seed=3, classes=("mass",), padding="nominal")
    state = {_reference_name(k): v for k, v in source.state_dict().items()}
    assert all(reference_key(k) == ours for k, ours in zip(state, source.state_dict(), strict=True))
    state["efficientnet._fc.weight"], state["efficientnet._fc.bias"] = torch.zeros(1, 320), torch.zeros(1)
    torch.save({"state_dict": state, "MAP": 0.4}, tmp_path / "mass.pth")
    loaded = load_reference_detector(tmp_path / "mass.pth", ("mass",))
    assert loaded.load_report.ignored == ["efficientnet._fc.weight", "efficientnet._fc.bias"]
    assert loaded.config.padding == "nominal" and loaded.config.input_size == (512, 512)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        expected, got = source.head(list(source.backbone(x).values())), loaded.head(list(loaded.backbone(x).values()))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(CheckpointError, match="2 named"):
        load_reference_detector(tmp_path / "mass.pth", ("mass", "calcification"))
    torch.save({"state_dict": {**state, "fpn.extra.weight": torch.zeros(1)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=re.escape("fpn.extra.weight")):
        load_reference_detector(tmp_path / "odd.pth", ("mass",))
    del state["fpn.P6.bias"]
    torch.save({"state_dict": state}, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=re.escape("backbone.fpn.p6.bias")):
        load_reference_detector(tmp_path / "short.pth", ("mass",))


BOX_HEADER = ["image_id", "laterality", "view_position", "finding_categories", "xmin", "ymin", "xmax", "ymax"]


def write_box_csv(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_box_csv_rows_become_annotations(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for study, image in (("s1", "a"), ("s1", "b"), ("s2", "c")):
        (images / study).mkdir(parents=True, exist_ok=True)
        (images / study / f"{image}.dicom").write_bytes(b"")
    rows = [("s1", "a", "L", "CC", "['Mass']", "10", "20", "50", "60", "training"),
            ("s1", "a", "L", "CC", "['Mass', 'Suspicious Calcification']", "5", "5", "9", "9", "training"),
            ("s1", "b", "L", "MLO", "['No Finding']", "", "", "", "", "training"),
            ("s2", "c", "R", "CC", "['Architectural Distortion']", "1", "1", "4", "4", "test"),
            ("s9", "zz", "R", "CC", "['Mass']", "1", "1", "4", "4", "test")]
    path = write_box_csv(tmp_path / "boxes.csv", ["study_id", *BOX_HEADER, "split"], rows)
    annotations = {Path(a.source).stem: a for a in annotations_from_box_csv(path, images)}
    assert set(annotations) == {"a", "b", "c"}
    assert annotations["a"].boxes == ((10, 20, 50, 60), (5, 5, 9, 9), (5, 5, 9, 9))
    assert annotations["a"].findings == ("mass", "mass", "calcification")
    assert (annotations["a"].view, annotations["a"].group, annotations["a"].split) == (("L", "CC"), "s1", "train")
    assert annotations["b"].boxes == () and annotations["c"].boxes == () and annotations["c"].split == "test"
    assert parse_categories("['Suspicious Calcification', 'Asymmetry']") == ["calcification"]


def test_box_csv_images_are_grouped_by_patient_else_study_never_by_image(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"")
    (tmp_path / "b.dcm").write_bytes(b"")
    views = [("a", "L", "CC", "['Mass']", "1", "1", "4", "4"), ("b", "L", "MLO", "['Mass']", "1", "1", "4", "4")]
    both = write_box_csv(tmp_path / "both.csv", ["patient_id", "study_id", *BOX_HEADER],
                         [("p1", "s1", *views[0]), ("p1", "s2", *views[1])])
    assert {a.group for a in annotations_from_box_csv(both, tmp_path)} == {"p1"}  # two studies, one patient
    study = write_box_csv(tmp_path / "study.csv", ["study_id", *BOX_HEADER], [("s1", *v) for v in views])
    assert {a.group for a in annotations_from_box_csv(study, tmp_path)} == {"s1"}
    neither = write_box_csv(tmp_path / "neither.csv", BOX_HEADER, views)
    with pytest.raises(ConfigurationError, match="neither a patient_id nor a study_id column"):
        annotations_from_box_csv(neither, tmp_path)
    blank = write_box_csv(tmp_path / "blank.csv", ["study_id", *BOX_HEADER], [("s1", *views[0]), (" ", *views[1])])
    with pytest.raises(ConfigurationError, match=r"1 image\(s\) of .* have no study_id \(first: \['b'\]\)"):
        annotations_from_box_csv(blank, tmp_path)


def test_flips_move_boxes_with_the_image() -> None:
    image = np.zeros((12, 8), dtype=np.uint8)
    image[2:5, 1:4] = 255
    box = np.array([[1.0, 2.0, 4.0, 5.0]])
    for horizontal in (True, False):
        flipped, moved = flip(image, box, horizontal)
        assert mask_box(flipped) == tuple(moved[0])


def test_the_prepared_image_cache_keeps_differently_prepared_images_apart(lesion_manifest: Path,
                                                                          tmp_path: Path) -> None:
    """A cache folder shared by detectors prepared differently (here only the VOI window differs) must not hand
    one the other's images: the file is named by every preprocessing setting."""
    annotation = annotations_from_manifest(lesion_manifest)[0]
    windowed = DetectorConfig(**{**TINY.to_dict(), "apply_voi": True})
    plain, _ = detector_train._prepared(annotation, TINY, tmp_path)
    voi, _ = detector_train._prepared(annotation, windowed, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    np.testing.assert_array_equal(voi, detector_train._prepared(annotation, windowed, None)[0])
    np.testing.assert_array_equal(plain, detector_train._prepared(annotation, TINY, None)[0])
