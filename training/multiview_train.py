"""Train the four-view CLIP (``models.multiview``) on the archive index: adapters only, prompt classification.

A training item is a study: its LCC, RCC, LMLO and RMLO cache files (``training.convert``; any missing view is
masked) and a case label, malignant when either breast is malignant and benign when both are known benign. The
loss is cross-entropy over the two CLIP logits (case embedding against the benign and malignant prompts). Only
the adapters, the side/view embeddings and the logit scale are trained (AdamW; bf16 autocast on CUDA).

Protocols (Chen et al.): ``cv``, K-fold cross-validation over every labelled study of the index with folds by
patient (stratified by label), AUC per fold and mean ± SD (sample SD), one version folder per fold; ``split``,
train on the index's train split (the epoch with the best validation AUC is kept) and evaluate on test.
``k_shot`` keeps K training studies per class (seeded) in either protocol.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedGroupKFold
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from models.errors import ConfigurationError
from models.multiview import (
    CLASSES,
    MAX_LOGIT_SCALE,
    VIEW_NAMES,
    MultiViewClip,
    MultiViewConfig,
    build_multiview,
    clip_pixels,
    save_multiview,
    trained_state,
    view_index,
)
from models.preprocess import PreprocessConfig
from training.archive.store import ArchiveStudy, open_index
from training.convert import cache_key
from training.datasets import SIDES, VIEWS, Augment, augment_image, unusable_reason
from training.demo import NOT_CLINICAL
from training.evaluate import BinaryMetrics, binary_metrics, one_class_reason, plot_roc
from training.finetune import few_shot, target_value
from training.pretrain import RESEARCH_ONLY

log = logging.getLogger(__name__)

PROTOCOLS = ("split", "cv")
METRICS_FILE = "metrics.json"
NO_FLIP = Augment(flip=0.0)  # a flip would make a left breast look like a right one


@dataclass(frozen=True)
class MultiviewTrainConfig:
    """How to train: protocol, folds, few-shot K, optimization, data and seed. ``cache_height``/``cache_width``
    name the conversion cache to read (default: the model's input size; another size is resized at load)."""

    protocol: str = "cv"
    folds: int = 5
    k_shot: int | None = None
    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    cache_height: int | None = None
    cache_width: int | None = None
    augment: bool = True
    n_bootstrap: int = 1000
    seed: int = 0
    device: str = "auto"
    synthetic_data: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigurationError(f"protocol {self.protocol!r} is not one of {list(PROTOCOLS)}")
        if self.folds < 2:
            raise ConfigurationError(f"folds must be at least 2, got {self.folds}")
        if self.k_shot is not None and self.k_shot < 1:
            raise ConfigurationError(f"k_shot must be at least 1, got {self.k_shot}")

    def cache_preprocess(self, model: MultiViewConfig) -> PreprocessConfig:
        return PreprocessConfig(height=self.cache_height or model.input_height,
                                width=self.cache_width or model.input_width, apply_voi=model.apply_voi)


@dataclass(frozen=True)
class StudyRecord:
    """One labelled study: index row id and patient hash (never DICOM identifiers), split, case label (1:
    malignant) and its cache file per view in ``VIEW_NAMES`` order (None: absent or unusable)."""

    study: int
    patient: str
    split: str | None
    label: int
    paths: tuple[str | None, ...]


# ------------------------------------------------------------------------------------------------- data


def case_label(labels: dict[str, Any] | None) -> int | None:
    """1 when a breast is malignant, 0 when both are known not to be, None otherwise."""
    values = [target_value(labels, side, "malignancy") for side in SIDES]
    if 1 in values:
        return 1
    return 0 if values == [0, 0] else None


def _view_paths(study: ArchiveStudy, key: str, size: str, left_out: Counter[str]) -> tuple[str | None, ...]:
    """The first usable cache file of each view (by index row id)."""
    paths: list[str | None] = [None] * len(VIEW_NAMES)
    for image in sorted(study.images, key=lambda image: image.id):
        if image.laterality not in SIDES or image.view not in VIEWS:
            continue
        reason = unusable_reason(image, key, size)
        index = view_index((image.laterality, image.view))
        if reason:
            left_out[reason] += 1
        elif paths[index] is None:
            paths[index] = str(image.cache_path)
    return tuple(paths)


def load_studies(index_location: str | Path, preprocess: PreprocessConfig) -> tuple[list[StudyRecord], Counter[str]]:
    """Every study of the index with a case label and at least one converted view, and what was left out."""
    key, size = cache_key(preprocess), f"{preprocess.height}x{preprocess.width}"
    left_out: Counter[str] = Counter()
    records: list[StudyRecord] = []
    with open_index(index_location, create=False)() as session:
        query = select(ArchiveStudy).order_by(ArchiveStudy.id).options(selectinload(ArchiveStudy.images))
        for study in session.scalars(query):
            label = case_label(study.labels)
            paths = _view_paths(study, key, size, left_out)
            if label is None:
                left_out["studies without a case malignancy label"] += 1
            elif not any(paths):
                left_out["studies without a usable view"] += 1
            else:
                records.append(StudyRecord(study.id, study.patient_key, study.split, label, paths))
    return records, left_out


def load_study_batch(studies: Sequence[StudyRecord], config: MultiViewConfig,
                     rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP inputs (B, 4, 3, H, W), zeros for absent views, and the views present (B, 4); augmented (no flip)
    when ``rng`` is given."""
    pixels = torch.zeros(len(studies), len(VIEW_NAMES), 3, config.input_height, config.input_width)
    present = torch.zeros(len(studies), len(VIEW_NAMES), dtype=torch.bool)
    for row, study in enumerate(studies):
        for column, path in enumerate(study.paths):
            if path is None:
                continue
            image = np.load(path, mmap_mode="r")
            if rng is not None:
                image = augment_image(np.asarray(image), rng, NO_FLIP)
            pixels[row, column], present[row, column] = clip_pixels(image, config), True
    return pixels, present


def data_summary(studies: Sequence[StudyRecord]) -> dict[str, Any]:
    """Counts (no identifiers): studies, patients, studies per class and per number of views present."""
    views = Counter(sum(path is not None for path in study.paths) for study in studies)
    return {"studies": len(studies), "patients": len({study.patient for study in studies}),
            "studies_per_class": {name: sum(study.label == k for study in studies) for k, name in enumerate(CLASSES)},
            "studies_by_views_present": {str(n): views[n] for n in sorted(views)}}


def patient_folds(studies: Sequence[StudyRecord], folds: int, seed: int) -> list[np.ndarray]:
    """Test positions of each fold: no patient in two folds, class balance kept where the patients allow."""
    patients = [study.patient for study in studies]
    if len(set(patients)) < folds:
        raise ConfigurationError(f"{folds}-fold cross-validation needs at least {folds} patients, "
                                 f"the index has {len(set(patients))}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = [study.label for study in studies]
    return [test for _, test in splitter.split(np.zeros(len(studies)), labels, groups=patients)]


def take_few_shot(studies: list[StudyRecord], k: int | None, seed: int) -> list[StudyRecord]:
    """K studies per class (all of a smaller class), seeded; every study when ``k`` is None."""
    if k is None:
        return studies
    return [studies[i] for i in few_shot(studies, np.array([s.label for s in studies]), k, seed)]


# --------------------------------------------------------------------------------------------- training


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16 (with a gradient scaler); None (fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def batches(items: Sequence[StudyRecord], size: int) -> Iterator[Sequence[StudyRecord]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def score_studies(model: MultiViewClip, studies: Sequence[StudyRecord], batch_size: int) -> np.ndarray:
    """P(malignant) per study, in order."""
    model.eval()
    with torch.inference_mode(), autocast(model.device):
        classes = model.class_embeddings()
        scores = [model.malignancy_probability(*load_study_batch(chunk, model.config), class_embeddings=classes)
                  for chunk in batches(studies, batch_size)]
    return torch.cat(scores).float().cpu().numpy()


def auc_or_none(studies: Sequence[StudyRecord], scores: np.ndarray) -> float | None:
    """Study-level AUC without bootstrap; None when the studies hold one class."""
    truth = np.array([study.label for study in studies])
    if not len(truth) or one_class_reason(truth) is not None:
        return None
    return binary_metrics(truth, scores, n_bootstrap=0).auc


def train_step(model: MultiViewClip, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               pixels: torch.Tensor, present: torch.Tensor, labels: torch.Tensor) -> float:
    """One optimizer step of the prompt-classification loss; the logit scale is kept in CLIP's range."""
    with autocast(model.device):
        loss = F.cross_entropy(model(pixels, present).float(), labels.to(model.device))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    return loss.item()


def fit(model: MultiViewClip, train: Sequence[StudyRecord], validation: Sequence[StudyRecord],
        config: MultiviewTrainConfig, desc: str) -> list[dict[str, Any]]:
    """Train the adapters for ``config.epochs``; with a two-class ``validation`` the best epoch's weights are
    kept (ties favour the later epoch), otherwise the last. Returns the loss and validation AUC per epoch."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(model.device.type, enabled=amp_dtype(model.device) == torch.float16)
    rng = np.random.default_rng(config.seed)
    best, best_state, history = -math.inf, None, []
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        losses = []
        for start in tqdm(range(0, len(order), config.batch_size), desc=f"{desc} epoch {epoch}", unit="batch",
                          disable=not config.progress):
            chunk = [train[i] for i in order[start:start + config.batch_size]]
            pixels, present = load_study_batch(chunk, model.config, rng if config.augment else None)
            losses.append(train_step(model, optimizer, scaler, pixels, present,
                                     torch.tensor([study.label for study in chunk])))
        auc = auc_or_none(validation, score_studies(model, validation, config.batch_size)) if validation else None
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 5),
                        "validation_auc": None if auc is None else round(auc, 5)})
        if auc is not None and auc >= best:
            best, best_state = auc, trained_state(model)
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return history


def fresh_model(base: MultiViewClip, seed: int) -> MultiViewClip:
    """Untrained adapters (seeded) on ``base``'s frozen CLIP, which is shared, not copied."""
    torch.manual_seed(seed)
    model = MultiViewClip(base.clip, base.tokenizer, base.config)
    model.backbone = base.backbone
    return model.to(base.device)


def announce(model: MultiViewClip, config: MultiviewTrainConfig) -> None:
    """Print and log the trainable parameter count at the start of training."""
    message = f"multi-view CLIP: {model.parameter_count()} (adapters, side/view embeddings, logit scale)"
    log.info(message)
    if config.progress:
        tqdm.write(message)


# ------------------------------------------------------------------------------------------ random backbone


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer without merges (every byte is a token: 514 ids), for random-weight CLIP directories."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[])


def write_random_clip(folder: Path | str, *, hidden: int = 64, layers: int = 2, image_size: int = 32,
                      patch_size: int = 8, seed: int = 0) -> Path:
    """A random-weight CLIP saved as a local Hugging Face directory (weights, config, byte-level tokenizer), for
    smoke runs and synthetic benchmarks where no pre-trained CLIP is available. Not a meaningful backbone."""
    tokenizer = byte_level_tokenizer()
    shape = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
             "num_attention_heads": max(1, hidden // 16)}
    text = {**shape, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**shape, "image_size": image_size,
                                                                  "patch_size": patch_size},
                                projection_dim=hidden // 2))
    clip.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


# ------------------------------------------------------------------------------------------------ the run


def card_for(config: MultiviewTrainConfig, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The card of a trained version folder (``save_multiview`` adds the parameter count)."""
    return {"name": "multiview-clip", "intended_use": NOT_CLINICAL if config.synthetic_data else RESEARCH_ONLY,
            "clinical_use": False, "output": "P(malignant) per study (four views, missing views masked)",
            "training": asdict(config), "data": {"source": "synthetic phantoms" if config.synthetic_data
                                                 else "archive index", **data}, **extra}


def evaluate(studies: Sequence[StudyRecord], scores: np.ndarray, config: MultiviewTrainConfig) -> BinaryMetrics:
    return binary_metrics([study.label for study in studies], scores, n_bootstrap=config.n_bootstrap,
                          seed=config.seed, clusters=[study.patient for study in studies])


def fold_summary(aucs: Sequence[float]) -> dict[str, float]:
    """Mean and sample SD (ddof 1) of the fold AUCs."""
    values = np.array(aucs, dtype=float)
    return {"auc_mean": round(float(values.mean()), 4), "auc_sd": round(float(values.std(ddof=1)), 4)}


def cross_validate(base: MultiViewClip, studies: list[StudyRecord], out: Path,
                   config: MultiviewTrainConfig) -> dict[str, Any]:
    """K-fold patient-level cross-validation; a version folder per fold and out-of-fold scores."""
    folds, out_of_fold, rows = patient_folds(studies, config.folds, config.seed), np.zeros(len(studies)), []
    for number, test_positions in enumerate(folds, start=1):
        held_out = set(test_positions.tolist())
        train = take_few_shot([s for i, s in enumerate(studies) if i not in held_out], config.k_shot,
                              config.seed + number)
        test = [studies[i] for i in test_positions]
        model = fresh_model(base, config.seed + number)
        history = fit(model, train, [], config, f"fold {number}/{config.folds}")
        scores = score_studies(model, test, config.batch_size)
        out_of_fold[test_positions] = scores
        metrics = evaluate(test, scores, config)
        rows.append({"fold": number, "train": data_summary(train), "test": data_summary(test),
                     "auc": round(metrics.auc, 4), "auc_ci": metrics.to_dict()["auc_ci"], "history": history})
        save_multiview(model, out / f"fold-{number}", card_for(config, {"train": data_summary(train)}, fold=number,
                                                                test_auc=round(metrics.auc, 4)))
        log.info("fold %d: AUC %.3f on %d studies", number, metrics.auc, len(test))
    pooled = evaluate(studies, out_of_fold, config)
    plot_roc({"out of fold": pooled}, out / "roc.png", f"{config.folds}-fold cross-validation, study level")
    return {"folds": rows, **fold_summary([row["auc"] for row in rows]), "out_of_fold": pooled.to_dict()}


def split_protocol(base: MultiViewClip, studies: list[StudyRecord], out: Path,
                   config: MultiviewTrainConfig) -> dict[str, Any]:
    """Train on the train split (best validation epoch), evaluate once on test; one version folder."""
    by_split = {name: [s for s in studies if s.split == name] for name in ("train", "validation", "test")}
    train = take_few_shot(by_split["train"], config.k_shot, config.seed)
    if len({s.label for s in train}) < 2 or one_class_reason(np.array([s.label for s in by_split["test"]])):
        raise ConfigurationError("the train and test splits both need malignant and benign studies")
    model = fresh_model(base, config.seed)
    history = fit(model, train, by_split["validation"], config, "train")
    metrics = evaluate(by_split["test"], score_studies(model, by_split["test"], config.batch_size), config)
    counts = {"train": data_summary(train), "validation": data_summary(by_split["validation"]),
              "test": data_summary(by_split["test"])}
    save_multiview(model, out / "model", card_for(config, counts, test_auc=round(metrics.auc, 4)))
    plot_roc({"test": metrics}, out / "roc.png", "test split, study level")
    return {"counts": counts, "test": metrics.to_dict(), "history": history}


def train_multiview(index_location: str | Path, clip_dir: str | Path, out_folder: str | Path, *,
                    model_config: MultiViewConfig | None = None,
                    config: MultiviewTrainConfig = MultiviewTrainConfig()) -> Path:
    """Train and evaluate under ``config.protocol`` (``model_config`` None: the defaults); writes version
    folder(s), ``metrics.json`` and ``roc.png``."""
    out = Path(out_folder)
    if (out / METRICS_FILE).exists():
        raise ConfigurationError(f"{out} already holds a training run: choose another folder")
    torch.manual_seed(config.seed)
    base = build_multiview(clip_dir, model_config or MultiViewConfig(), resolve_device(config.device))
    cache = config.cache_preprocess(base.config)
    studies, left_out = load_studies(index_location, cache)
    if len({s.label for s in studies}) < 2:
        raise ConfigurationError("the index needs converted malignant and benign studies "
                                 f"(mammo-node archive convert --size {cache.height}x{cache.width})")
    announce(base, config)
    out.mkdir(parents=True, exist_ok=True)
    run = cross_validate if config.protocol == "cv" else split_protocol
    results = run(base, studies, out, config)
    metrics = {"protocol": config.protocol, "k_shot": config.k_shot, "unit": "study",
               "parameters": base.parameter_count().to_dict(), "data": data_summary(studies),
               "left_out": dict(left_out), **results}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return out


def _size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m training.multiview_train INDEX CLIP_DIR OUT [--protocol cv|split] [--k-shot K] ...``"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("index", "clip_dir", "out"):
        parser.add_argument(name)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="cv")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--k-shot", type=int)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-local", type=int, help="local blocks per view (default: half the image layers)")
    parser.add_argument("--size", type=_size, default=(448, 288), help="model input HxW (default 448x288)")
    parser.add_argument("--cache-size", type=_size, help="size of the conversion cache to read (default --size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--synthetic-data", action="store_true", help="the index holds synthetic phantoms")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache = args.cache_size or (None, None)
    config = MultiviewTrainConfig(protocol=args.protocol, folds=args.folds, k_shot=args.k_shot, epochs=args.epochs,
                                  batch_size=args.batch_size, learning_rate=args.lr, cache_height=cache[0],
                                  cache_width=cache[1], seed=args.seed, device=args.device,
                                  synthetic_data=args.synthetic_data)
    model_config = MultiViewConfig(n_local=args.n_local, input_height=args.size[0], input_width=args.size[1])
    out = train_multiview(args.index, args.clip_dir, args.out, model_config=model_config, config=config)
    metrics = json.loads((out / METRICS_FILE).read_text())
    if config.protocol == "cv":
        print(f"AUC per fold {[row['auc'] for row in metrics['folds']]}: {metrics['auc_mean']} ± {metrics['auc_sd']}")
    else:
        print(f"test AUC {metrics['test']['auc']} (95% CI {metrics['test']['auc_ci']})")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
