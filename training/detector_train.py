"""Training and evaluation of the lesion detector (``models.detector``), as the reference's
``train_detector.py`` (§5.4 of the reference notes): Adam, gradient-norm clipping (0.1), focal loss, mAP@0.5.

Boxes come from the synthetic generator's masks (``manifest.csv``: each mask's bounding box) or from a
VinDr-style CSV (``image_id, laterality, view_position, finding_categories, xmin, ymin, xmax, ymax`` in
source-image pixels, ``patient_id`` or ``study_id`` to group the images; optional ``split``). Images of one
group (patient, else study) are never split apart. The epoch is chosen on validation groups carved from the
training part; the reported mAP is scored once, at the end, on the held-out images. Each image is prepared once
by ``models.preprocess.prepare_dicom`` and its boxes are mapped into model-input pixels through the crop box.
Training augments with random horizontal and vertical flips (the reference's affine and elastic transforms
are not applied). mAP is VOC-style: per class, detections sorted by score are matched greedily to unmatched
ground-truth boxes of the same image at IoU >= 0.5, and AP is the area under the all-point interpolated
precision-recall curve; the mean runs over the classes that have ground-truth boxes.

    mammo-node train detector --manifest synthetic/manifest.csv --model mammo-data/demo-model --out det
    python -m training.detector_train --boxes finding_annotations.csv --images vindr/images --model b5.tar \
        --out det-b5 --input-size 512 512
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import torch
from torch import Tensor
from tqdm import tqdm

from models import load_model
from models.detector import DetectorConfig, MammoDetector, detector_from_clip, save_detector, to_model_boxes
from models.errors import ConfigurationError
from models.preprocess import CropBox, normalize, prepare_dicom
from models.sop_classes import ViewKey
from training.batch_norm import batch_norm_momentum
from training.convert import cache_key
from training.demo import NOT_CLINICAL
from training.pretrain import RESEARCH_ONLY
from training.provenance import seen_note

log = logging.getLogger(__name__)

# VinDr-Mammo finding categories (lower case) -> detector classes
CATEGORY_CLASSES = {"mass": "mass", "suspicious calcification": "calcification", "calcification": "calcification"}
SPLIT_NAMES = {"training": "train", "train": "train", "test": "test", "validation": "test", "val": "test"}
BOX_COLUMNS = ("image_id", "laterality", "view_position", "finding_categories", "xmin", "ymin", "xmax", "ymax")
GROUP_COLUMNS = ("patient_id", "study_id")  # the first a box CSV has groups its images (VinDr: study_id)
DICOM_SUFFIXES = ("", ".dcm", ".dicom")
METRICS_FILE = "metrics.json"


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class BoxAnnotation:
    """One image and its lesion boxes in source-image pixels (x0, y0, x1, y1); ``group`` (patient or study)
    is never split between training and evaluation; ``split`` is the CSV's, normalized to train/test."""

    source: str
    view: ViewKey
    boxes: tuple[tuple[float, float, float, float], ...]
    findings: tuple[str, ...]
    group: str
    split: str | None = None


@dataclass(frozen=True)
class DetectionSample:
    """A prepared image (uint8 at the model input size) with its boxes in model-input pixels and class indices."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crop: CropBox
    annotation: BoxAnnotation


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The bounding box (x0, y0, x1, y1, pixel edges) of a mask's non-zero pixels; None when it is empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def annotations_from_manifest(manifest: Path | str) -> list[BoxAnnotation]:
    """Every view of a synthetic ``manifest.csv``, with one box per finding mask (``*_<kind>.png``)."""
    manifest = Path(manifest)
    annotations = []
    with manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            boxes, findings = [], []
            for relative in filter(None, row["mask_paths"].split(";")):
                box = mask_box(cv2.imread(str(manifest.parent / relative), cv2.IMREAD_GRAYSCALE))
                if box is not None:
                    boxes.append(box)
                    findings.append(Path(relative).stem.rsplit("_", 1)[1])
            annotations.append(BoxAnnotation(str(manifest.parent / row["path"]), (row["laterality"], row["view"]),
                                             tuple(boxes), tuple(findings), row["patient_id"]))
    return annotations


def parse_categories(text: str) -> list[str]:
    """``"['Mass', 'Suspicious Calcification']"`` -> the detector classes it names (others dropped)."""
    names = (part.strip().strip("'\"").lower() for part in text.strip().strip("[]").split(","))
    return [CATEGORY_CLASSES[name] for name in names if name in CATEGORY_CLASSES]


def _finite_box(row: Mapping[str, str]) -> tuple[float, float, float, float] | None:
    try:
        box = tuple(float(row[name]) for name in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box


def _find_images(root: Path) -> dict[str, Path]:
    """Image files under ``root`` by name without suffix (VinDr: ``images/<study_id>/<image_id>.dicom``)."""
    return {path.stem: path for path in sorted(root.rglob("*")) if path.is_file() and path.suffix in DICOM_SUFFIXES}


def box_csv_rows(csv_path: Path | str) -> dict[str, list[Mapping[str, str]]]:
    """The rows of a VinDr-style box CSV grouped by ``image_id``, after checking its columns."""
    with Path(csv_path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing_columns = [c for c in BOX_COLUMNS if rows and c not in rows[0]]
    if not rows or missing_columns:
        raise ConfigurationError(f"{csv_path} has no rows or lacks columns {missing_columns}")
    by_image: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for row in rows:
        by_image[row["image_id"]].append(row)
    return by_image


def image_boxes(rows: Sequence[Mapping[str, str]]) -> tuple[tuple[tuple[float, float, float, float], ...],
                                                            tuple[str, ...]]:
    """One image's boxes (source pixels) and their detector classes; one box per class a row names."""
    boxes, findings = [], []
    for row in rows:
        box = _finite_box(row)
        for finding in parse_categories(row["finding_categories"]) if box else []:
            boxes.append(box)
            findings.append(finding)
    return tuple(boxes), tuple(findings)


def group_column(csv_path: Path | str, columns: Sequence[str]) -> str:
    """The column that groups a box CSV's images (``GROUP_COLUMNS``, patient first); a ``ConfigurationError``
    without one: grouping by image would put the CC and MLO of one breast on both sides of a split."""
    found = next((name for name in GROUP_COLUMNS if name in columns), None)
    if found is None:
        raise ConfigurationError(f"{csv_path} has neither a patient_id nor a study_id column: without one the "
                                 "views of a breast could land in both training and evaluation")
    return found


def annotations_from_box_csv(csv_path: Path | str, image_root: Path | str) -> list[BoxAnnotation]:
    """Images of a VinDr-style box CSV (one row per box; 'No Finding' rows give images without boxes), grouped by
    ``group_column``; every image needs a value there."""
    by_image = box_csv_rows(csv_path)
    group = group_column(csv_path, list(next(iter(by_image.values()))[0]))
    ungrouped = [image_id for image_id, image_rows in by_image.items() if not (image_rows[0][group] or "").strip()]
    if ungrouped:
        raise ConfigurationError(f"{len(ungrouped)} image(s) of {csv_path} have no {group} (first: {ungrouped[:3]})")
    files = _find_images(Path(image_root))
    annotations, unresolved = [], []
    for image_id, image_rows in by_image.items():
        if image_id not in files:
            unresolved.append(image_id)
            continue
        boxes, findings = image_boxes(image_rows)
        first = image_rows[0]
        split = SPLIT_NAMES.get(str(first.get("split", "")).strip().lower())
        annotations.append(BoxAnnotation(str(files[image_id]), (first["laterality"], first["view_position"]),
                                         boxes, findings, first[group].strip(), split))
    if unresolved:
        log.warning("%d image id(s) of %s have no file under %s (first: %s)", len(unresolved), csv_path, image_root,
                    unresolved[:3])
    if not annotations:
        raise ConfigurationError(f"no image of {csv_path} was found under {image_root}")
    return annotations


def csv_split(annotations: Sequence[BoxAnnotation]) -> bool:
    """Whether every image has the CSV's split (then it decides what is held out)."""
    return all(a.split for a in annotations)


def _without_groups(annotations: Sequence[BoxAnnotation],
                    taken: set[str]) -> tuple[list[BoxAnnotation], list[BoxAnnotation]]:
    return [a for a in annotations if a.group not in taken], [a for a in annotations if a.group in taken]


def split_annotations(annotations: Sequence[BoxAnnotation], holdout: float,
                      seed: int) -> tuple[list[BoxAnnotation], list[BoxAnnotation]]:
    """The CSV's train/test split when every image has one, else ``holdout`` of the groups drawn with ``seed``."""
    if csv_split(annotations):
        return [a for a in annotations if a.split == "train"], [a for a in annotations if a.split != "train"]
    groups = sorted({a.group for a in annotations})
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(groups)[:max(1, round(len(groups) * holdout))].tolist()) if holdout > 0 else set()
    return _without_groups(annotations, held)


def validation_split(train: Sequence[BoxAnnotation], share: float,
                     seed: int) -> tuple[list[BoxAnnotation], list[BoxAnnotation]]:
    """(fit, validation): ``share`` of the training part's groups drawn with ``seed``, at least one, always leaving
    one to train on; no validation when ``share`` is 0 or there are fewer than two groups."""
    groups = sorted({a.group for a in train})
    if share <= 0 or len(groups) < 2:
        return list(train), []
    count = min(len(groups) - 1, max(1, round(len(groups) * share)))
    return _without_groups(train, set(np.random.default_rng(seed).permutation(groups)[:count].tolist()))


def _prepared(annotation: BoxAnnotation, config: DetectorConfig, cache_dir: Path | None) -> tuple[np.ndarray, CropBox]:
    """``prepare_dicom`` once; with ``cache_dir`` the result is kept as ``.npy`` (memory-mapped) and ``.json``,
    named by the source and every preprocessing setting (``training.convert.cache_key``), so that detectors
    prepared differently (another size, VOI window, border or threshold) never share a file."""
    if cache_dir is None:
        return prepare_dicom(Path(annotation.source), config.preprocess())
    name = hashlib.sha1(f"{annotation.source}|{cache_key(config.preprocess())}".encode()).hexdigest()
    image_path, crop_path = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    if image_path.exists() and crop_path.exists():
        crop = json.loads(crop_path.read_text())
        return np.load(image_path, mmap_mode="r"), CropBox(**{**crop, "source_shape": tuple(crop["source_shape"])})
    image, crop = prepare_dicom(Path(annotation.source), config.preprocess())
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(image_path, image)
    crop_path.write_text(json.dumps(asdict(crop)))
    return image, crop


def prepare_samples(annotations: Sequence[BoxAnnotation], config: DetectorConfig, *, cache_dir: Path | None = None,
                    progress: bool = True) -> list[DetectionSample]:
    """Prepare each image and map its boxes of ``config.classes`` into model-input pixels (empty boxes dropped)."""
    samples = []
    for annotation in tqdm(annotations, desc="preparing images", unit="image", disable=not progress):
        image, crop = _prepared(annotation, config, cache_dir)
        wanted = [i for i, f in enumerate(annotation.findings) if f in config.classes]
        boxes = to_model_boxes(np.array([annotation.boxes[i] for i in wanted]).reshape(-1, 4), crop,
                               config.input_size).astype(np.float32)
        labels = np.array([config.classes.index(annotation.findings[i]) for i in wanted], dtype=np.int64)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        samples.append(DetectionSample(image, boxes[keep], labels[keep], crop, annotation))
    return samples


def flip(image: np.ndarray, boxes: np.ndarray, horizontal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an image and its boxes left-right (``horizontal``) or top-bottom."""
    height, width = image.shape
    if horizontal:
        return image[:, ::-1], np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return image[::-1], np.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], 1)


def make_batch(samples: Sequence[DetectionSample], config: DetectorConfig,
               rng: np.random.Generator | None = None) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Normalized images (N, 3, H, W) and torchvision targets; random flips when ``rng`` is given."""
    preprocess = config.preprocess()
    images, targets = [], []
    for sample in samples:
        image, boxes = np.asarray(sample.image), sample.boxes.reshape(-1, 4)
        for horizontal in (True, False):
            if rng is not None and rng.random() < 0.5:
                image, boxes = flip(image, boxes, horizontal)
        images.append(normalize(np.ascontiguousarray(image), preprocess))
        targets.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.as_tensor(sample.labels, dtype=torch.int64)})
    return torch.stack(images), targets


# -------------------------------------------------------------------------------------------- metrics


@dataclass
class DetectionMetrics:
    """mAP@IoU (VOC all-point AP) over images: per class (None: no ground-truth box) and their mean."""

    average_precision: dict[str, float | None]
    mean_average_precision: float | None
    ground_truth_boxes: dict[str, int]
    detections: dict[str, int]
    images: int
    iou_threshold: float
    score_threshold: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (n, m) of x0, y0, x1, y1 boxes."""
    a, b = a.reshape(-1, 4)[:, None, :], b.reshape(-1, 4)[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(union - inter, np.finfo(np.float64).eps)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (all-point interpolation, VOC 2010+)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def class_average_precision(detections: Sequence[tuple[np.ndarray, np.ndarray]], truths: Sequence[np.ndarray],
                            iou_threshold: float = 0.5) -> float | None:
    """AP of one class: per image (scores (k,), boxes (k, 4)) and ground-truth boxes (m, 4); None when m = 0."""
    n_truth = sum(len(t) for t in truths)
    if n_truth == 0:
        return None
    scored: list[tuple[float, bool]] = []
    for (scores, boxes), truth in zip(detections, truths, strict=True):
        taken = np.zeros(len(truth), dtype=bool)
        overlaps = box_iou(boxes, truth) if len(truth) else np.zeros((len(boxes), 0))
        for index in np.argsort(-scores, kind="stable"):
            best = int(np.argmax(overlaps[index])) if len(truth) else -1
            hit = best >= 0 and overlaps[index, best] >= iou_threshold and not taken[best]
            if hit:
                taken[best] = True
            scored.append((float(scores[index]), hit))
    scored.sort(key=lambda item: -item[0])
    hits = np.array([hit for _, hit in scored], dtype=np.float64)
    true_positives, false_positives = np.cumsum(hits), np.cumsum(1 - hits)
    precision = true_positives / np.maximum(true_positives + false_positives, np.finfo(np.float64).eps)
    return voc_ap(true_positives / n_truth, precision)


def mean_average_precision(predictions: Sequence[Mapping[str, np.ndarray]], truths: Sequence[Mapping[str, np.ndarray]],
                           classes: Sequence[str], iou_threshold: float = 0.5,
                           score_threshold: float = 0.0) -> DetectionMetrics:
    """mAP over images: ``predictions`` hold ``boxes``, ``scores``, ``labels``; ``truths`` ``boxes``, ``labels``."""
    aps: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    found: dict[str, int] = {}
    for index, name in enumerate(classes):
        per_image, per_truth = [], []
        for prediction, truth in zip(predictions, truths, strict=True):
            scores, boxes = np.asarray(prediction["scores"]), np.asarray(prediction["boxes"]).reshape(-1, 4)
            mine = (np.asarray(prediction["labels"]) == index) & (scores >= score_threshold)
            per_image.append((scores[mine], boxes[mine]))
            per_truth.append(np.asarray(truth["boxes"]).reshape(-1, 4)[np.asarray(truth["labels"]) == index])
        aps[name] = class_average_precision(per_image, per_truth, iou_threshold)
        counts[name], found[name] = sum(len(t) for t in per_truth), sum(len(s) for s, _ in per_image)
    values = [ap for ap in aps.values() if ap is not None]
    return DetectionMetrics(aps, float(np.mean(values)) if values else None, counts, found, len(truths),
                            iou_threshold, score_threshold)


def evaluate(detector: MammoDetector, samples: Sequence[DetectionSample], *, score_threshold: float | None = None,
             iou_threshold: float = 0.5, batch_size: int = 4) -> DetectionMetrics:
    """mAP@``iou_threshold`` of the detector on prepared samples, in model-input pixels (as the reference).

    ``score_threshold`` defaults to the detector's (0.2, the reference's evaluation threshold).
    """
    threshold = detector.config.score_threshold if score_threshold is None else score_threshold
    predictions = []
    for start in range(0, len(samples), batch_size):
        images, _ = make_batch(samples[start:start + batch_size], detector.config)
        predictions += [{k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in out.items()}
                        for out in detector.predict(images, score_threshold=threshold)]
    truths = [{"boxes": s.boxes, "labels": s.labels} for s in samples]
    return mean_average_precision(predictions, truths, detector.config.classes, iou_threshold, threshold)


# ------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Optimization of one detector run (reference: Adam 5e-5, clip 0.1, batch 7, focal alpha 0.25 gamma 2).

    ``batch_norm_momentum`` (e.g. 0.1) is used during training for the encoder's batch norms (None: keep the
    checkpoint's 0.01); ``freeze_backbone`` keeps the encoder fixed and in eval mode (FPN and heads train).
    """

    epochs: int = 20
    batch_size: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 0.1
    freeze_backbone: bool = False
    batch_norm_momentum: float | None = None
    augment: bool = True
    amp: bool = True
    amp_dtype: str = "bfloat16"
    eval_score_threshold: float | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class TrainingHistory:
    """Loss per optimizer step and the validation metrics after each epoch."""

    losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None


class _Stepper:
    """One optimizer step with optional autocast / gradient scaling and norm clipping."""

    def __init__(self, detector: MammoDetector, config: DetectorTrainConfig) -> None:
        self.detector, self.config = detector, config
        self.params = [p for p in detector.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.amp = config.amp and detector.device.type == "cuda"
        self.dtype = getattr(torch, config.amp_dtype)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.dtype == torch.float16)

    def __call__(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, float]:
        device = self.detector.device
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast("cuda", dtype=self.dtype) if self.amp else nullcontext():
            losses = self.detector(list(images.to(device)), targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": float(loss.detach()), **{name: float(value.detach()) for name, value in losses.items()}}


def _train_mode(detector: MammoDetector, frozen: bool) -> None:
    detector.train()
    if frozen:
        detector.backbone.encoder.eval()


def train_detector(detector: MammoDetector, train: Sequence[DetectionSample], config: DetectorTrainConfig,
                   validation: Sequence[DetectionSample] = (), checkpoint: Path | None = None) -> TrainingHistory:
    """Train in place; with ``validation`` the epoch of best mAP (the latest among ties) is kept.

    ``checkpoint``: a folder rewritten by ``save_detector`` after every epoch (the latest weights).
    """
    if not train:
        raise ConfigurationError("no training images")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    detector.backbone.encoder.requires_grad_(not config.freeze_backbone)
    step = _Stepper(detector, config)
    history, best_state, best_map = TrainingHistory(), None, -1.0
    momentum = (batch_norm_momentum(detector.backbone.encoder, config.batch_norm_momentum)
                if config.batch_norm_momentum is not None and not config.freeze_backbone else nullcontext())
    batches = math.ceil(len(train) / config.batch_size)
    with momentum, tqdm(total=config.epochs * batches, desc="training detector", unit="step",
                        disable=not config.progress) as bar:
        for epoch in range(config.epochs):
            _train_mode(detector, config.freeze_backbone)
            order = rng.permutation(len(train))
            for start in range(0, len(train), config.batch_size):
                chosen = [train[i] for i in order[start:start + config.batch_size]]
                images, targets = make_batch(chosen, detector.config, rng if config.augment else None)
                losses = step(images, targets)
                history.losses.append(losses["loss"])
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses['loss']:.4f}")
                bar.update()
            record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(history.losses[-batches:]))}
            if validation:
                metrics = evaluate(detector, validation, score_threshold=config.eval_score_threshold)
                record["validation"] = metrics.to_dict()
                current = metrics.mean_average_precision or 0.0
                if current >= best_map:  # ties: the later epoch
                    best_map, history.best_epoch = current, epoch + 1
                    best_state = copy.deepcopy(detector.state_dict())
            history.epochs.append(record)
            log.info("detector epoch %d: %s", epoch + 1, {k: v for k, v in record.items() if k != "validation"})
            if checkpoint is not None:
                save_detector(detector, checkpoint, {"epoch": epoch + 1, "partial": True})
    if best_state is not None:
        detector.load_state_dict(best_state)
    detector.eval()
    return history


# ------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class DetectorData:
    """Where the boxes come from: a synthetic ``manifest.csv`` (boxes of the finding masks) or a VinDr-style box
    CSV and the folder of its images; without a CSV split, ``holdout`` of the groups is held out. ``validation``
    of the training part's groups choose the epoch (0: the last epoch is kept)."""

    manifest: Path | None = None
    boxes: Path | None = None
    images: Path | None = None
    holdout: float = 0.2
    cache_dir: Path | None = None
    validation: float = 0.1

    def __post_init__(self) -> None:
        if (self.manifest is None) == (self.boxes is None):
            raise ConfigurationError("give either a synthetic manifest.csv (--manifest) or a box CSV (--boxes)")
        if self.boxes is not None and self.images is None:
            raise ConfigurationError("--boxes needs --images (the folder holding the CSV's images)")
        if not 0 <= self.validation < 1:
            raise ConfigurationError(f"--validation must be in [0, 1), not {self.validation}")

    @property
    def synthetic(self) -> bool:
        return self.manifest is not None

    def annotations(self) -> list[BoxAnnotation]:
        if self.boxes is not None and self.images is not None:
            return annotations_from_box_csv(self.boxes, self.images)
        return annotations_from_manifest(Path(str(self.manifest)))


@dataclass(frozen=True)
class EpochSelection:
    """The epoch a run kept: the best mAP on the validation groups (carved from the training part; the held-out
    images never choose it) or, without a usable validation set, the last epoch, ``reason`` saying why."""

    epoch: int
    reason: str | None = None

    @property
    def chosen_on(self) -> str:
        return "validation" if self.reason is None else "last epoch"

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "chosen_on": self.chosen_on, "reason": self.reason}

    def describe(self) -> str:
        if self.reason is None:
            return f"epoch {self.epoch} kept: best mAP on the validation images (groups set aside from training)"
        return f"epoch {self.epoch} kept, the last: no usable validation set ({self.reason})"


@dataclass(frozen=True)
class DetectorRun:
    """A finished run: the detector folder, held-out metrics (None: nothing held out), history, data counts and
    how the kept epoch was chosen."""

    folder: Path
    metrics: DetectionMetrics | None
    history: TrainingHistory
    data: dict[str, Any]
    synthetic: bool
    selection: EpochSelection


def build_detector(model: Path | None, classes: Sequence[str], *, variant: str = "efficientnet-b5",
                   input_size: tuple[int, int] | None = None, anchor_size: float = 32.0,
                   fpn_channels: int = 256) -> MammoDetector:
    """A detector on the image encoder of ``model`` (Mammo-CLIP checkpoint or version; its input size unless
    ``input_size``), else on a random ``variant``."""
    overrides: dict[str, Any] = {"anchor_size": anchor_size, "fpn_channels": fpn_channels}
    if input_size:
        overrides.update(input_height=input_size[0], input_width=input_size[1])
    if model:
        return detector_from_clip(load_model(model), classes, **overrides)
    return MammoDetector(replace(DetectorConfig(classes=tuple(classes), image_encoder=variant), **overrides))


def _counts(samples: Sequence[DetectionSample], classes: Sequence[str]) -> dict[str, int]:
    return {"images": len(samples), "with_boxes": sum(len(s.labels) > 0 for s in samples),
            **{f"{name}_boxes": int(sum((s.labels == i).sum() for s in samples)) for i, name in enumerate(classes)}}


def write_outputs(out: Path, detector: MammoDetector, run: DetectorRun, config: DetectorTrainConfig) -> None:
    """The detector folder (weights, config, card) and ``metrics.json`` (held-out mAP per class, how the epoch
    was chosen, history); both say which images chose the epoch and which gave the mAP."""
    evaluation = {"mAP_on": f"held_out ({run.data['held_out_from']})", "epoch_selection": run.selection.to_dict()}
    figures = {"held_out": run.metrics.to_dict() if run.metrics else None, **evaluation,
               "best_epoch": run.history.best_epoch, "data": run.data, "history": run.history.epochs}
    card = {"name": "lesion-detector", "intended_use": NOT_CLINICAL if run.synthetic else RESEARCH_ONLY,
            "clinical_use": False, "train_config": asdict(config), "data": run.data,
            "mAP@0.5": run.metrics.mean_average_precision if run.metrics else None, "evaluation": evaluation}
    save_detector(detector, out, card)
    (out / METRICS_FILE).write_text(json.dumps(figures, indent=2))


def _no_validation(share: float, validation: Sequence[DetectionSample]) -> str | None:
    """Why the validation set cannot choose the epoch; None when it can."""
    if share <= 0:
        return "validation share 0"
    if not validation:
        return "fewer than two training groups: none can be set aside"
    if not any(len(s.labels) for s in validation):
        return "the validation images hold no box of the detector's classes"
    return None


def run_detector(data: DetectorData, detector: MammoDetector, out: Path | str,
                 config: DetectorTrainConfig, base: Path | str | None = None) -> DetectorRun:
    """Split by group, prepare, train (the epoch chosen on validation groups of the training part, else the last;
    ``out/last`` the latest), score mAP@0.5 once on the held-out images and write the detector folder with
    ``metrics.json``, which says how many held-out studies the backbone's model (``base``) learned from
    (``training.provenance``). ``out`` must not hold a run yet."""
    out = Path(out)
    if (out / METRICS_FILE).exists():
        raise ConfigurationError(f"{out} already holds a training run: choose another folder")
    annotations = data.annotations()
    train_part, held_part = split_annotations(annotations, data.holdout, config.seed)
    fit_part, validation_part = validation_split(train_part, data.validation, config.seed + 1)
    train, validation, held = (prepare_samples(part, detector.config, cache_dir=data.cache_dir,
                                               progress=config.progress)
                               for part in (fit_part, validation_part, held_part))
    reason = _no_validation(data.validation, validation)
    if reason is not None:
        log.warning("no usable validation set (%s): the last epoch is kept", reason)
        train, validation = [*train, *validation], []
    history = train_detector(detector, train, config, validation, checkpoint=out / "last")
    metrics = evaluate(detector, held, score_threshold=config.eval_score_threshold) if held else None
    classes = detector.config.classes
    held_from = ("the CSV's test/validation rows" if csv_split(annotations)
                 else f"{data.holdout:g} of the groups, seed {config.seed}")
    counts = {"source": str(data.manifest or data.boxes), "train": _counts(train, classes),
              "validation": _counts(validation, classes), "held_out": _counts(held, classes),
              "held_out_from": held_from,
              "held_out_studies_seen": seen_note(base, _study_uids(held_part), "the held-out images")}
    run = DetectorRun(out, metrics, history, counts, data.synthetic,
                      EpochSelection(history.best_epoch or config.epochs, reason))
    write_outputs(out, detector, run, config)
    return run


def _study_uids(annotations: Sequence[BoxAnnotation]) -> set[str]:
    """The StudyInstanceUIDs of the annotations' images (their headers only)."""
    return {str(pydicom.dcmread(a.source, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                .get("StudyInstanceUID", "")) for a in annotations} - {""}


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_lines(run: DetectorRun, base: Path | str | None = None) -> list[str]:
    """What a run printed at its end: how the epoch was chosen, held-out AP per class and mAP, where it is, how to
    serve it."""
    lines = [run.selection.describe()]
    if run.metrics is None:
        lines.append("no held-out images: mAP not computed")
    else:
        m = run.metrics
        lines.append(f"held-out mAP@{m.iou_threshold:g} {_figure(m.mean_average_precision)} on {m.images} images "
                     f"({run.data['held_out_from']}; score >= {m.score_threshold:g}); AP per class:")
        lines += [f"  {name:<14} AP@{m.iou_threshold:g} {_figure(ap):>5}  ({m.ground_truth_boxes[name]} boxes, "
                  f"{m.detections[name]} detections)" for name, ap in m.average_precision.items()]
        lines.append(run.data["held_out_studies_seen"])
    lines += [f"detector written to {run.folder} (metrics.json; the latest epoch in {run.folder / 'last'})",
              f"serve it: mammo-node model register {base or 'BASE'} --detector {run.folder}"]
    if run.synthetic:
        lines.append("trained on synthetic phantoms: NOT a clinical model")
    return lines


DESCRIPTION = """\
Train the lesion detector (a RetinaNet on the Mammo-CLIP image encoder that boxes masses and calcifications)
and report its mAP@0.5 per class on held-out images.

data, one of:
  --manifest manifest.csv    synthetic phantoms (`mammo-node synth`): one box per finding mask
  --boxes CSV --images DIR   a VinDr-style box CSV (image_id, laterality, view_position, finding_categories,
                             xmin, ymin, xmax, ymax in source-image pixels; patient_id or study_id, which
                             groups the images; optional split) and the folder holding its images as
                             <image_id>, <image_id>.dicom or <image_id>.dcm
Images of one patient (else study) stay on one side of every split. The CSV's split column (training/test) is
used when every image has one; otherwise --holdout of the groups is held out. --validation of the training
groups are set aside and scored after every epoch: the best epoch is kept (without them, the last). The
held-out images are scored once, at the end: that is the reported mAP.

writes OUT: the detector folder (weights.safetensors, config.json, card.json), metrics.json (held-out AP per
class, mAP, which epoch was kept and on which images, per-epoch history) and OUT/last (the latest epoch).
Serve it with the version whose encoder it was trained on (--model):
  mammo-node model register BASE --name site-v1-det --detector OUT && mammo-node model activate site-v1-det

A detector trained on synthetic phantoms is NOT a clinical model: its mAP only shows that the pipeline learns."""

EXAMPLES = """\
examples:
  mammo-node synth phantoms --studies 40 --size 512x320
  mammo-node train detector --manifest phantoms/manifest.csv --model mammo-data/demo-model --out runs/det-1
  mammo-node train detector --boxes finding_annotations.csv --images vindr/images --model b5.tar \\
      --input-size 512 512 --cache-dir /scratch/det-cache --out runs/det-b5"""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", type=Path, metavar="CSV",
                      help="synthetic manifest.csv (boxes from the finding masks)")
    data.add_argument("--boxes", type=Path, metavar="CSV", help="VinDr-style box CSV (needs --images)")
    parser.add_argument("--images", type=Path, metavar="DIR",
                        help="folder holding the CSV's images as <image_id>[.dicom|.dcm]")
    parser.add_argument("--model", type=Path, metavar="PATH", help="Mammo-CLIP checkpoint or model version whose "
                                                                   "image encoder is the backbone (default: random)")
    parser.add_argument("--variant", default="efficientnet-b5", help="encoder when there is no --model (random)")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the detector")
    parser.add_argument("--classes", nargs="+", default=["mass", "calcification"])
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="detector input (default: the model's; the reference detectors use 512 512)")
    parser.add_argument("--anchor-size", type=float, default=32.0, help="side of the smallest (P3) anchor")
    parser.add_argument("--fpn-channels", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--grad-clip", type=float, default=0.1)
    parser.add_argument("--bn-momentum", type=float, default=None, help="encoder batch-norm momentum in training")
    parser.add_argument("--freeze-backbone", action="store_true", help="train the FPN and heads only")
    parser.add_argument("--no-augment", action="store_true", help="no random flips")
    parser.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    parser.add_argument("--eval-score-threshold", type=float, default=None,
                        help="score threshold of the mAP (default: the detector's 0.2)")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of groups held out (no CSV split)")
    parser.add_argument("--validation", type=float, default=0.1,
                        help="share of the training groups that choose the epoch (0: keep the last epoch)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR", help="keep prepared images here (.npy, memory-mapped)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m training.detector_train") -> int:
    """Train a detector from masks or a box CSV, evaluate mAP@0.5 on the held-out images, save the folder and
    print the summary (``mammo-node train detector`` runs this too)."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    data = DetectorData(args.manifest, args.boxes, args.images, args.holdout, args.cache_dir, args.validation)
    torch.manual_seed(args.seed)
    detector = build_detector(args.model, args.classes, variant=args.variant, input_size=args.input_size,
                              anchor_size=args.anchor_size, fpn_channels=args.fpn_channels).to(args.device)
    config = DetectorTrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                 grad_clip=args.grad_clip, freeze_backbone=args.freeze_backbone,
                                 batch_norm_momentum=args.bn_momentum, augment=not args.no_augment,
                                 amp=not args.no_amp, eval_score_threshold=args.eval_score_threshold, seed=args.seed,
                                 progress=not args.no_progress)
    run = run_detector(data, detector, args.out, config, base=args.model)
    print("\n".join(summary_lines(run, args.model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
