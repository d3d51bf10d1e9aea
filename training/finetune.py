"""Classification heads on a Mammo-CLIP image encoder (linear probe, full fine-tune, adapters), as the
reference's ``train_classifier.py`` (§5.3 of the reference notes), on the archive index.

Training is per image with its breast's label (density: the study's label); a breast's score is the maximum
over its views (multi-class: the mean of the class probabilities) and a study's the maximum over its breasts.
Modes: ``linear`` extracts the frozen encoder's pooled features once and trains one linear layer on them
(features standardized with the training statistics, folded into the layer when saved); ``full`` trains the
encoder and the layer together on augmented images; ``adapter`` keeps the encoder frozen (eval mode) and trains
a bottleneck adapter after each of its blocks (1x1 convolutions C -> C/r -> C, residual, zero-initialized so
training starts from the frozen model) with the layer. The loss is weighted by the training-set class counts
(``pos_weight`` = negatives / positives; multi-class: inverse frequency). The step (linear) or epoch
(full, adapter) with the best validation AUC (multi-class: balanced accuracy) is kept; the test split is
scored once, at the end: its operating points are the validation thresholds of each level applied to it (the ones
fitted on test are kept apart as oracle figures), and its AUC CIs resample patients, not images or breasts.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from torch import Tensor, nn
from tqdm import tqdm

from models import MammoClip, load_model
from models.efficientnet import EfficientNetEncoder
from models.errors import ConfigurationError
from models.heads import HEAD_FILE, Adapter, Head, adapted, block_channels, probabilities, save_head
from models.preprocess import PreprocessConfig, normalize
from training.archive.split import SPLITS
from training.archive.store import ArchiveStudy, open_index
from training.batch_norm import batch_norm_momentum
from training.convert import cache_key
from training.datasets import DENSITIES, SIDES, VIEWS, Augment, augment_image, unusable_reason
from training.demo import NOT_CLINICAL
from training.evaluate import (
    BinaryMetrics,
    MulticlassMetrics,
    SubgroupTable,
    age_band,
    aggregate_scores,
    binary_metrics,
    multiclass_metrics,
    one_class_reason,
    plot_confusion,
    plot_roc,
    subgroup_table,
    write_html_report,
)
from training.evaluate.metrics import EVALUATED_SET
from training.label_text import LABEL_OF_TASK
from training.memory_format import channels_last
from training.pretrain import RESEARCH_ONLY
from training.provenance import seen_note, study_uids, write_trained_on

log = logging.getLogger(__name__)

BINARY_TARGETS = {target: LABEL_OF_TASK[target] for target in ("malignancy", "mass", "calcification")}
TARGETS = (*BINARY_TARGETS, "density", "birads")
MODES = ("linear", "full", "adapter")
LEVELS = ("image", "breast", "study")
SPECIFICITIES = (0.90, 0.95)
METRICS_FILE = "metrics.json"
CARD_FILE = "card.json"
REPORT_FILE = "report.html"
SUBGROUP_NOTE = ("Subgroups: image-level AUC per study density label, age band (DICOM PatientAge, else birth date "
                 "to study date), DICOM Manufacturer and view; gap = subgroup AUC minus overall image-level AUC.")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides a head: target, mode, optimization, few-shot and seed.

    ``steps`` are full-batch optimizer steps on the features (``linear``); ``epochs`` passes over the training
    images (``full``, ``adapter``). ``k_shot`` keeps K training images per class (seeded).
    ``batch_norm_momentum`` 0.1 suits short full fine-tunes (``training.batch_norm``); None keeps the
    checkpoint's. ``adapter_reduction`` is the adapters' bottleneck ratio C / hidden.
    """

    target: str = "malignancy"
    mode: str = "linear"
    k_shot: int | None = None
    steps: int = 500
    epochs: int = 5
    batch_size: int = 16
    learning_rate: float | None = None  # None: 1e-2 linear, 5e-5 full (the reference's), 1e-3 adapter
    weight_decay: float = 1e-4
    evaluate_every: int = 10
    batch_norm_momentum: float | None = 0.1
    adapter_reduction: int = 4
    augment: bool = True
    n_bootstrap: int = 1000
    seed: int = 0
    synthetic_data: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigurationError(f"target {self.target!r} is not one of {list(TARGETS)}")
        if self.mode not in MODES:
            raise ConfigurationError(f"mode {self.mode!r} is not one of {list(MODES)}")
        if self.k_shot is not None and self.k_shot < 1:
            raise ConfigurationError(f"k_shot must be at least 1, got {self.k_shot}")

    @property
    def binary(self) -> bool:
        return self.target in BINARY_TARGETS

    @property
    def lr(self) -> float:
        return self.learning_rate or {"linear": 1e-2, "full": 5e-5, "adapter": 1e-3}[self.mode]


@dataclass(frozen=True)
class ImageRecord:
    """One converted view with its target label (``study`` is the index row id, never a DICOM identifier),
    what the subgroup table splits by: the study's density letter, the patient's age in years at the study and
    the equipment manufacturer (None when unknown), and the index's salted patient key (None when unknown), which
    the bootstrap resamples by."""

    path: str
    study: int
    side: str
    view: str
    label: int | str
    density: str | None
    patient_age: int | None
    manufacturer: str | None
    patient: str | None = None


# ------------------------------------------------------------------------------------------------- data


def target_value(labels: dict[str, Any] | None, side: str, target: str) -> int | str | None:
    """The label of ``target`` for one breast: a 0/1 finding, the study's density letter or a BI-RADS
    category (the breast's, else the study's); None when unknown."""
    labels = labels or {}
    breast = labels.get(side) or {}
    if target == "density":
        return labels["density"] if labels.get("density") in DENSITIES else None
    if target == "birads":
        value = breast.get("birads", labels.get("birads"))
        return None if value is None else int(value)
    value = breast.get(BINARY_TARGETS[target])
    return None if value is None else int(bool(value))


def load_images(index_location: str | Path, split: str, preprocess: PreprocessConfig,
                target: str) -> tuple[list[ImageRecord], Counter[str]]:
    """The split's converted screening views whose breast has a ``target`` label, and what was left out."""
    key, size = cache_key(preprocess), f"{preprocess.height}x{preprocess.width}"
    left_out: Counter[str] = Counter()
    records: list[ImageRecord] = []
    with open_index(index_location, create=False)() as session:
        query = (select(ArchiveStudy).where(ArchiveStudy.split == split).order_by(ArchiveStudy.id)
                 .options(selectinload(ArchiveStudy.images)))
        for study in session.scalars(query):
            for image in sorted(study.images, key=lambda image: image.id):
                if image.laterality not in SIDES or image.view not in VIEWS:
                    continue
                label = target_value(study.labels, image.laterality, target)
                reason = unusable_reason(image, key, size) or (f"images without a {target} label" if label is None
                                                         else None)
                if reason:
                    left_out[reason] += 1
                else:
                    records.append(ImageRecord(str(image.cache_path), study.id, image.laterality, image.view,
                                               label, target_value(study.labels, image.laterality, "density"),
                                               image.patient_age, image.manufacturer, study.patient_key))
    return records, left_out


def class_names(target: str, train: Sequence[ImageRecord]) -> tuple[str, ...]:
    """Binary: negative and the target; density: A-D; BI-RADS: the categories the training split holds."""
    if target in BINARY_TARGETS:
        return (f"no {target}", target)
    if target == "density":
        return DENSITIES
    return tuple(str(value) for value in sorted({int(record.label) for record in train}))


def class_index(record: ImageRecord, classes: Sequence[str], binary: bool) -> int | None:
    """The record's class position, or None for a category outside ``classes``."""
    if binary:
        return int(record.label)
    name = str(record.label)
    return classes.index(name) if name in classes else None


def few_shot(records: Sequence[ImageRecord], targets: np.ndarray, k: int, seed: int) -> list[int]:
    """Positions of K images per class (all of a class with fewer), drawn with ``seed``, in original order."""
    rng = random.Random(seed)
    chosen: list[int] = []
    for value in sorted(set(targets.tolist())):
        members = [i for i in range(len(records)) if targets[i] == value]
        chosen += rng.sample(members, min(k, len(members)))
    return sorted(chosen)


def load_batch(records: Sequence[ImageRecord], preprocess: PreprocessConfig,
               rng: np.random.Generator | None = None) -> Tensor:
    """Normalized (N, 3, H, W) images from the cache, augmented when ``rng`` is given."""
    images = []
    for record in records:
        image = np.load(record.path, mmap_mode="r")
        if rng is not None:
            image = augment_image(image, rng, Augment())
        images.append(normalize(np.asarray(image), preprocess))
    return torch.stack(images)


# --------------------------------------------------------------------------------------------- training


def weighted_loss(targets: Tensor, n_classes: int, binary: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """BCE with ``pos_weight`` = negatives / positives, or cross-entropy with inverse-frequency class weights,
    from the training targets; the weights go to the logits' device."""
    counts = torch.bincount(targets, minlength=n_classes).float()
    if binary:
        pos_weight = counts[0] / counts[1].clamp(min=1)
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits[:, 0], y.float(),
                                                                    pos_weight=pos_weight.to(logits.device))
    weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), 0.0)
    return lambda logits, y: F.cross_entropy(logits, y, weight=weights.to(logits.device))


def selection_score(truth: np.ndarray, scores: np.ndarray, binary: bool) -> float:
    """Validation criterion: AUC (binary) or balanced accuracy; -inf when it is undefined."""
    if binary:
        if truth.min() == truth.max():
            return -math.inf
        return binary_metrics(truth, scores, n_bootstrap=0).auc
    present = np.unique(truth)
    predicted = scores.argmax(axis=1)
    return float(np.mean([(predicted[truth == k] == k).mean() for k in present]))


def _finite(score: float) -> float | None:
    """A validation score for the JSON history: rounded, None when undefined."""
    return round(score, 5) if math.isfinite(score) else None


def extract_features(encoder: nn.Module, records: Sequence[ImageRecord], preprocess: PreprocessConfig,
                     batch_size: int, progress: bool, desc: str) -> Tensor:
    """Pooled encoder features (N, D) in inference mode."""
    encoder.eval()
    device = next(encoder.parameters()).device
    parts = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", disable=not progress):
            parts.append(encoder(load_batch(records[start:start + batch_size], preprocess).to(device)).cpu())
    return torch.cat(parts)


def train_linear(train: Tensor, targets: Tensor, validation: Tensor, validation_truth: np.ndarray,
                 outputs: int, config: FinetuneConfig) -> tuple[nn.Linear, list[dict[str, float]]]:
    """Full-batch AdamW on standardized features; the best validation step, with the standardization folded
    into the returned layer (so it takes raw features)."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    layer = nn.Linear(train.shape[1], outputs)
    loss_fn = weighted_loss(targets, max(outputs, 2), config.binary)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    x, x_val = (train - mean) / std, (validation - mean) / std
    best, best_state, history = -math.inf, copy.deepcopy(layer.state_dict()), []
    for step in tqdm(range(1, config.steps + 1), desc=f"linear probe ({config.target})", disable=not config.progress):
        loss = loss_fn(layer(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.evaluate_every == 0 or step == config.steps:
            with torch.no_grad():
                scores = probabilities(layer(x_val)).numpy()
            score = selection_score(validation_truth, scores, config.binary)
            history.append({"step": step, "loss": round(loss.item(), 5), "validation": _finite(score)})
            if score >= best:  # ties (and a validation split of one class) favour the later step
                best, best_state = score, copy.deepcopy(layer.state_dict())
    layer.load_state_dict(best_state)
    with torch.no_grad():
        weight = layer.weight / std
        layer.bias -= weight @ mean
        layer.weight.copy_(weight)
    return layer, history


def train_images(model: MammoClip, train: Sequence[ImageRecord], targets: Tensor, validation: Sequence[ImageRecord],
                 validation_truth: np.ndarray, outputs: int, config: FinetuneConfig) -> tuple[
        EfficientNetEncoder, nn.ModuleList | None, nn.Linear, list[dict[str, float]]]:
    """``full``: a copy of the encoder and the layer trained on (augmented) images; ``adapter``: adapters on
    the frozen encoder (eval mode) and the layer. The state of the best validation epoch."""
    preprocess = model.config.preprocess()
    if config.mode == "adapter":
        encoder = model.image_encoder.requires_grad_(False).eval()
        adapters = nn.ModuleList(Adapter(c, config.adapter_reduction) for c in block_channels(encoder))
        tuned: nn.Module = adapters.to(model.device)
    else:
        encoder = tuned = copy.deepcopy(model.image_encoder).requires_grad_(True)
        adapters = None
    layer = nn.Linear(encoder.out_dim, outputs).to(model.device)
    loss_fn = weighted_loss(targets, max(outputs, 2), config.binary)
    optimizer = torch.optim.AdamW([*tuned.parameters(), *layer.parameters()], lr=config.lr,
                                  weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    best, best_state, history = -math.inf, ({}, {}), []
    momentum = config.batch_norm_momentum if adapters is None else None
    with channels_last(encoder):
        for epoch in range(1, config.epochs + 1):
            order = rng.permutation(len(train))
            tuned.train()
            with (batch_norm_momentum(encoder, momentum) if momentum is not None else nullcontext(),
                  adapted(encoder, adapters)):
                for start in tqdm(range(0, len(order), config.batch_size), desc=f"fine-tune epoch {epoch}",
                                  disable=not config.progress):
                    batch = order[start:start + config.batch_size]
                    images = load_batch([train[i] for i in batch], preprocess, rng if config.augment else None)
                    loss = loss_fn(layer(encoder(images.to(model.device))), targets[batch].to(model.device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                features = extract_features(encoder, validation, preprocess, config.batch_size, False,
                                            "validation")
            with torch.no_grad():
                score = selection_score(validation_truth,
                                        probabilities(layer(features.to(model.device))).cpu().numpy(), config.binary)
            history.append({"epoch": epoch, "loss": round(loss.item(), 5), "validation": _finite(score)})
            if score >= best:
                best, best_state = score, copy.deepcopy((tuned.state_dict(), layer.state_dict()))
    tuned.load_state_dict(best_state[0])
    layer.load_state_dict(best_state[1])
    return encoder.eval(), adapters, layer, history


# ------------------------------------------------------------------------------------------- evaluation


def level_keys(records: Sequence[ImageRecord], level: str) -> list[Hashable]:
    return [(r.study, r.side, r.path) if level == "image" else (r.study, r.side) if level == "breast" else r.study
            for r in records]


def aggregate(records: Sequence[ImageRecord], truth: np.ndarray, scores: np.ndarray, level: str,
              views: Literal["max", "mean"] = "max") -> tuple[np.ndarray, np.ndarray]:
    """Labels (max) and scores per image, breast or study: a breast's score is its views' ``views``, a study's
    the max of its breasts' (as the node serves them: a head's breast takes the max of its views, zero-shot
    the mean); multi-class: mean probabilities."""
    keys = level_keys(records, level)
    labels = np.array(list(aggregate_scores(truth, keys, "max").values()), dtype=int)
    if scores.ndim == 1 and level == "study" and views != "max":
        breasts = aggregate_scores(scores, level_keys(records, "breast"), views)
        return labels, np.array(list(aggregate_scores(list(breasts.values()), [key[0] for key in breasts]).values()))
    if scores.ndim == 1:
        return labels, np.array(list(aggregate_scores(scores, keys, views).values()))
    columns = [list(aggregate_scores(scores[:, k], keys, "mean").values()) for k in range(scores.shape[1])]
    return labels, np.array(columns).T


def level_patients(records: Sequence[ImageRecord], level: str) -> list[Hashable] | None:
    """The patient key of each image, breast or study in ``aggregate``'s order; None when a record has none."""
    if any(record.patient is None for record in records):
        return None
    return list(dict(zip(level_keys(records, level), [r.patient for r in records], strict=True)).values())


def validation_thresholds(validation: BinaryMetrics | MulticlassMetrics | str) -> dict[float, float] | None:
    """Target specificity -> threshold fitted on the validation split at one level; None without binary metrics."""
    if not isinstance(validation, BinaryMetrics):
        return None
    return {point.target_specificity: point.threshold for point in validation.operating_points}


def evaluate(records: Sequence[ImageRecord], truth: np.ndarray, scores: np.ndarray, classes: Sequence[str],
             config: FinetuneConfig,
             validation: dict[str, BinaryMetrics | MulticlassMetrics | str] | None = None,
             views: Literal["max", "mean"] = "max") -> dict[str, BinaryMetrics | MulticlassMetrics | str]:
    """Metrics per level (``aggregate``: a breast scored by its views' ``views``); a level with one class only
    has its reason instead of binary metrics. The operating
    points are each level's thresholds in the ``validation`` results applied to ``records`` (the ones fitted on
    ``records`` as oracle), else, without validation thresholds at that level, fitted on ``records``; the AUC CIs
    resample patients where every record has one."""
    results: dict[str, BinaryMetrics | MulticlassMetrics | str] = {}
    for level in LEVELS:
        labels, level_scores = aggregate(records, truth, scores, level, views)
        if not config.binary:
            results[level] = multiclass_metrics(labels, level_scores, classes)
        elif (reason := one_class_reason(labels)) is not None:
            results[level] = reason
        else:
            results[level] = binary_metrics(
                labels, level_scores, n_bootstrap=config.n_bootstrap, seed=config.seed, specificities=SPECIFICITIES,
                thresholds=None if validation is None else validation_thresholds(validation[level]),
                thresholds_from="validation", clusters=level_patients(records, level))
    return results


def evaluation_notes(results: dict[str, BinaryMetrics | MulticlassMetrics | str]) -> list[str]:
    """Report notes on how the binary metrics were made: the bootstrap, and where the thresholds were set."""
    binary = {level: value for level, value in results.items() if isinstance(value, BinaryMetrics)}
    if not binary:
        return []
    clustered = {metrics.bootstrap for metrics in binary.values()} == {"cluster"}
    notes = ["95% CIs: cluster bootstrap over patients (all of a patient's images, breasts and studies drawn "
             "together)." if clustered else "95% CIs: plain bootstrap over cases (no patient key for every image): "
             "a patient's correlated images, breasts or studies count as independent, so the CIs are too narrow."]
    fitted = [level for level, metrics in binary.items() if metrics.thresholds_from == EVALUATED_SET]
    if len(fitted) == len(binary):
        return [*notes, "Operating points: thresholds fitted on the evaluated split itself (no validation "
                        "thresholds), the best possible there: optimistic."]
    notes.append("Operating points: each level's thresholds set on the validation split (breast level: head.json's) "
                 "applied to the test split; metrics.json also holds oracle_operating_points, oracle (fitted on "
                 "test): the best possible there, optimistic.")
    if fitted:
        notes.append(f"No validation thresholds at the {', '.join(fitted)} level (one class there): its operating "
                     "points are oracle (fitted on test), optimistic.")
    return notes


def image_subgroups(records: Sequence[ImageRecord], truth: np.ndarray, scores: np.ndarray) -> SubgroupTable | str:
    """Binary image-level AUC per density, age band, manufacturer and view against the overall image-level AUC;
    the reason instead when the images hold one class."""
    reason = one_class_reason(truth)
    if reason is not None:
        return reason
    return subgroup_table(truth, scores, {"density": [r.density for r in records],
                                          "age band": [age_band(r.patient_age) for r in records],
                                          "manufacturer": [r.manufacturer for r in records],
                                          "view": [r.view for r in records]})


def subgroups_json(subgroups: SubgroupTable | str) -> dict[str, Any]:
    """The table for ``metrics.json``, or why there is none, marked as image level."""
    return {"level": "image",
            **(subgroups.to_dict() if isinstance(subgroups, SubgroupTable) else {"unavailable": subgroups})}


def _as_json(results: dict[str, Any]) -> dict[str, Any]:
    return {level: value if isinstance(value, str) else value.to_dict() for level, value in results.items()}


def thresholds(validation: dict[str, Any]) -> dict[str, Any]:
    """Breast-level probability thresholds at 90/95% specificity on the validation split."""
    breast = validation["breast"]
    if not isinstance(breast, BinaryMetrics):
        reason = breast if isinstance(breast, str) else "multi-class head"
        return {"level": "breast", "split": "validation", "unavailable": reason}
    return {"level": "breast", "split": "validation",
            **{f"specificity_{p.target_specificity:.2f}": {k: v for k, v in p.to_dict().items()
                                                             if k != "target_specificity"}
               for p in breast.operating_points}}


# ------------------------------------------------------------------------------------------------ the run


def split_counts(records: Sequence[ImageRecord], truth: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Counts of one split's data: images, breasts, studies and images per class (no identifiers)."""
    return {"images": len(records), "breasts": len(set(level_keys(records, "breast"))),
            "studies": len({r.study for r in records}),
            "images_per_class": {name: int((truth == k).sum()) for k, name in enumerate(classes)}}


def _labelled(records: list[ImageRecord], classes: Sequence[str], binary: bool,
              left_out: Counter[str]) -> tuple[list[ImageRecord], np.ndarray]:
    indices = [class_index(record, classes, binary) for record in records]
    if None in indices:
        left_out["images of a class the training split lacks"] += indices.count(None)
    kept = [(record, i) for record, i in zip(records, indices, strict=True) if i is not None]
    return [record for record, _ in kept], np.array([i for _, i in kept], dtype=int)


def finetune(index_location: str | Path, model_path: Path | str, out_folder: Path | str, *,
             config: FinetuneConfig = FinetuneConfig(), device: str = "cpu") -> Path:
    """Train a head for ``config.target`` on the index's train split on ``device``, select it on validation,
    evaluate it on test and write the head, ``head.json``, ``metrics.json``, figures, report and card into
    ``out_folder``."""
    out = Path(out_folder)
    if (out / HEAD_FILE).exists():
        raise ConfigurationError(f"{out} already holds a trained head: choose another folder")
    torch.manual_seed(config.seed)
    model = load_model(model_path, device=device)
    preprocess = model.config.preprocess()
    loaded = {split: load_images(index_location, split, preprocess, config.target) for split in SPLITS}
    classes = class_names(config.target, loaded["train"][0])
    data = {split: _labelled(records, classes, config.binary, left_out)
            for split, (records, left_out) in loaded.items()}
    train, train_truth = data["train"]
    if config.k_shot is not None:
        chosen = few_shot(train, train_truth, config.k_shot, config.seed)
        train, train_truth = [train[i] for i in chosen], train_truth[chosen]
    if len(set(train_truth.tolist())) < 2 or not data["validation"][0] or not data["test"][0]:
        raise ConfigurationError(f"{config.target}: the training split needs two classes and validation and test "
                                 "need images")
    outputs = 1 if config.binary else len(classes)
    targets = torch.as_tensor(train_truth)
    (validation, validation_truth), (test, test_truth) = data["validation"], data["test"]
    if config.mode == "linear":
        encoder = model.image_encoder
        features = {name: extract_features(encoder, records, preprocess, config.batch_size, config.progress,
                                           f"features ({name})")
                    for name, records in (("train", train), ("validation", validation), ("test", test))}
        layer, history = train_linear(features["train"], targets, features["validation"], validation_truth,
                                      outputs, config)
        adapters = None
    else:
        encoder, adapters, layer, history = train_images(model, train, targets, validation, validation_truth,
                                                         outputs, config)
        with adapted(encoder, adapters):
            features = {name: extract_features(encoder, records, preprocess, config.batch_size, config.progress,
                                               f"features ({name})")
                        for name, records in (("validation", validation), ("test", test))}
    with torch.no_grad():
        scores = {name: probabilities(layer.cpu()(features[name])).numpy() for name in ("validation", "test")}
    validated = evaluate(validation, validation_truth, scores["validation"], classes, config)
    results = {"validation": validated, "test": evaluate(test, test_truth, scores["test"], classes, config, validated)}
    subgroups = image_subgroups(test, test_truth, scores["test"]) if config.binary else "binary targets only"
    counts = {"train": split_counts(train, train_truth, classes),
              "validation": split_counts(validation, validation_truth, classes),
              "test": split_counts(test, test_truth, classes)}
    info = {"target": config.target, "classes": list(classes), "mode": config.mode,
            "image_encoder": encoder.variant, "feature_dim": encoder.out_dim, "own_encoder": config.mode == "full",
            "adapter_channels": block_channels(encoder) if adapters else [],
            "adapter_reduction": config.adapter_reduction,
            "input_height": preprocess.height, "input_width": preprocess.width,
            "base_model_sha256": getattr(getattr(model, "load_report", None), "sha256", ""),
            "output": "sigmoid probability of the target" if config.binary else "softmax over classes",
            "aggregation": {"breast": "max over views" if config.binary else "mean of probabilities",
                            "study": "max over breasts" if config.binary else "mean of probabilities"},
            "thresholds": thresholds(results["validation"])}
    head = Head(encoder.out_dim, outputs, encoder if config.mode == "full" else None, adapters, info)
    head.linear.load_state_dict(layer.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    save_head(head, out)
    studies = write_trained_on(out, index_location, ("train", "validation"), model_path)
    test_uids = study_uids(index_location, ("test",))
    seen = seen_note(out, {test_uids[record.study] for record in test}, "the test split")
    write_outputs(out, config, model, results, subgroups, counts, loaded, history, (studies, seen))
    return out


def write_outputs(out: Path, config: FinetuneConfig, model: MammoClip, results: dict[str, dict[str, Any]],
                  subgroups: SubgroupTable | str, counts: dict[str, Any], loaded: dict[str, Any],
                  history: list[dict[str, float]], provenance: tuple[str, str]) -> None:
    """``metrics.json``, the ROC (or confusion) figure, the HTML report and the card; ``subgroups`` are the
    test split's (or why there are none); ``provenance``: the digest of the studies the head learned from and
    the note on how many of the test split's it saw (``training.provenance``)."""
    studies_sha256, seen = provenance
    test = results["test"]
    metrics = {"target": config.target, "mode": config.mode, "k_shot": config.k_shot, "counts": counts,
               "validation": _as_json(results["validation"]), "test": _as_json(test),
               "subgroups": subgroups_json(subgroups), "history": history, "test_studies_seen": seen}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    title = f"{config.target} head ({config.mode}{f', {config.k_shot}-shot' if config.k_shot else ''})"
    binary = {level: value for level, value in test.items() if isinstance(value, BinaryMetrics)}
    multiclass = {level: value for level, value in test.items() if isinstance(value, MulticlassMetrics)}
    if binary:
        figure = plot_roc(binary, out / "roc.png", f"{title}: test split")
    else:
        figure = plot_confusion(multiclass["breast"], out / "confusion.png", f"{title}: test split, breasts")
    synthetic = " on synthetic phantoms (not clinical)" if config.synthetic_data else ""
    base = getattr(model, "card", {}).get("name", "model")
    described = ", ".join(f"{split} {c['images']} images / {c['breasts']} breasts / {c['studies']} studies"
                          for split, c in counts.items())
    write_html_report(out / REPORT_FILE, title=f"{title}{synthetic}",
                      model_description=f"{base} ({model.config.image_encoder}), {config.mode} head",
                      dataset_description=described, binary=binary, multiclass=multiclass,
                      subgroups={config.target: subgroups} if isinstance(subgroups, SubgroupTable) else {},
                      images={figure.stem: figure},
                      notes=[f"{level}: {value}" for level, value in test.items() if isinstance(value, str)]
                      + [seen, "Breast score: max over views; study score: max over breasts (multi-class: mean).",
                         "Thresholds in head.json are set on the validation split at breast level.",
                         *evaluation_notes(test),
                         SUBGROUP_NOTE if isinstance(subgroups, SubgroupTable) else f"subgroups: {subgroups}"])
    card = {"name": f"{config.target}-head", "intended_use": NOT_CLINICAL if config.synthetic_data else RESEARCH_ONLY,
            "clinical_use": False, "base_model": base, "config": asdict(config),
            "data": {"source": "synthetic phantoms" if config.synthetic_data else "archive index", **counts,
                     "left_out": {split: dict(left_out) for split, (_, left_out) in loaded.items()},
                     "studies_sha256": studies_sha256}}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
    log.info("%s head written to %s (%s)", config.target, out, ", ".join(
        f"{level} AUC {m.auc:.3f}" for level, m in binary.items()) or "multi-class")
