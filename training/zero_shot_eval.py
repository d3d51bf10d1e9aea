"""Zero-shot evaluation of any model on an indexed archive split, as the reference's evaluator does: each
image is scored against the task prompts (``models.zero_shot``), views are aggregated as the node serves zero-shot
scores (a breast: the mean of its views, ``models.zero_shot.aggregate_breasts``; a study: the max of its breasts),
and the metrics, ROC curves, image-level subgroup tables and an HTML report are written. With no
validation split, the operating points are fitted on the evaluated split itself (optimistic); the AUC CIs resample
patients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import load_model
from models.zero_shot import ZeroShotClassifier
from training.evaluate import BinaryMetrics, SubgroupTable, plot_roc, write_html_report
from training.finetune import (
    BINARY_TARGETS,
    SUBGROUP_NOTE,
    FinetuneConfig,
    evaluate,
    evaluation_notes,
    image_subgroups,
    load_batch,
    load_images,
    subgroups_json,
)
from training.provenance import seen_note, study_uids

NOTE = ("Zero-shot scores: prompts only, no head trained on this site's data. Breast score: the mean of its "
        "views' (as the node serves it); study score: the max of its breasts'.")
PROMPTS_NOTES = {"node": "Prompts: the node's (several templates per class, the model's logit scale, the card's "
                         "calibration when it has one).",
                 "reference": "Prompts: the reference's own (configs/zs_clip.yaml: one phrase per class), scored as "
                              "its evaluator does (softmax of the cosine similarities)."}


def zero_shot_evaluation(index_location: str | Path, model_path: Path | str, out: Path, *, split: str = "test",
                         text_encoder: Path | None = None, batch_size: int = 16, n_bootstrap: int = 1000,
                         progress: bool = True, device: str = "cpu", prompts: str = "node") -> dict[str, dict]:
    """Metrics per binary target and level, and its image-level subgroup table, on ``split``, the model on
    ``device``, with the ``prompts`` set (``models.prompts.PROMPT_SETS``: the node's, or the reference's own to
    reproduce its figures); writes ``metrics.json``, ``roc.png`` and ``report.html`` into ``out``. Targets without
    both classes in the split are reported with the reason."""
    model = load_model(model_path, text_encoder=text_encoder, device=device).eval()
    classifier = ZeroShotClassifier(model, BINARY_TARGETS, prompt_set=prompts)
    preprocess = model.config.preprocess()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    breast_curves: dict[str, BinaryMetrics] = {}
    tables: dict[str, SubgroupTable] = {}
    notes = [NOTE, PROMPTS_NOTES[prompts]]
    evaluated: set[int] = set()
    for target in BINARY_TARGETS:
        records, left_out = load_images(index_location, split, preprocess, target)
        evaluated |= {record.study for record in records}
        if not records:
            results[target] = {"unavailable": f"no {split} image has a {target} label", "left_out": dict(left_out)}
            continue
        scores = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(records), batch_size), desc=f"zero-shot {target}", disable=not progress):
                embeddings = model.encode_images(load_batch(records[start:start + batch_size], preprocess).to(
                    model.device))
                scores.append(classifier.classify(embeddings)[target].score())
        truth, image_scores = np.array([record.label for record in records], dtype=int), torch.cat(scores).numpy()
        metrics = evaluate(records, truth, image_scores, ("negative", target),
                           FinetuneConfig(target=target, n_bootstrap=n_bootstrap), views="mean")
        subgroups = image_subgroups(records, truth, image_scores)
        notes += [note for note in evaluation_notes(metrics) if note not in notes]
        results[target] = {level: value if isinstance(value, str) else value.to_dict()
                           for level, value in metrics.items()} | {"subgroups": subgroups_json(subgroups),
                                                                   "left_out": dict(left_out)}
        if isinstance(metrics["breast"], BinaryMetrics):
            breast_curves[target] = metrics["breast"]
        if isinstance(subgroups, SubgroupTable):
            tables[target] = subgroups
    uids = study_uids(index_location, (split,))
    seen = seen_note(model_path, {uids[study] for study in evaluated}, f"the {split} split")
    notes.insert(0, seen)
    (out / "metrics.json").write_text(json.dumps({"split": split, "model": str(model_path), "prompts": prompts,
                                                  "studies_seen": seen, "results": results}, indent=2))
    images = {"ROC, breast level": plot_roc(breast_curves, out / "roc.png", f"Zero-shot, {split} split")} \
        if breast_curves else {}
    write_html_report(out / "report.html", title="Zero-shot evaluation", model_description=str(model_path),
                      dataset_description=f"archive index {index_location}, {split} split",
                      binary=breast_curves, subgroups=tables, images=images, notes=[*notes, SUBGROUP_NOTE])
    return results
