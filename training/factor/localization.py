"""Localization metrics of attribution maps against ground-truth masks, as the paper's FActOR table.

For each positive image with a ground-truth mask: the map is thresholded at its quantile (95%) and split into
connected regions (``models.factor.regions``); the image's IoU is the best IoU between any predicted box and
any ground-truth box (one box per finding mask). IoU@t is the fraction of images whose IoU is at least t.
The pointing game scores a hit when the map's maximum (first one in row-major order) lies inside one of the
image's masks; its tolerant form (as Zhang et al.'s pointing game, which allows 15 pixels) when a mask pixel
lies within ``tolerance`` pixels (a square window) of it. The ceiling row scores the ground-truth masks
themselves, averaged onto the feature-map grid and upsampled like the maps: what a perfect map at that
resolution would reach.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.clip import MammoClip
from models.factor import Factor, regions, upsample
from models.heatmap import finding_maps, task_directions
from models.zero_shot import ZeroShotClassifier

IOU_THRESHOLDS = (0.25, 0.5)
# FActOR attribute -> zero-shot task of models.prompts whose CAM heatmap is the baseline.
CAM_TASKS = {"mass": "mass", "calcification": "calcification"}

MapMethod = Callable[[Tensor], Tensor]  # feature maps (N, C, h, w) -> maps (N, K, H, W) in the attribute order


@dataclass(frozen=True)
class LocalizationScore:
    """One method on one attribute: images scored, IoU@0.25, IoU@0.5, pointing-game accuracy (strict and
    within ``tolerance`` pixels), mean IoU."""

    method: str
    attribute: str
    images: int
    iou_25: float
    iou_50: float
    pointing: float
    pointing_near: float
    tolerance: int
    mean_iou: float


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1; exclusive ends) of a non-empty boolean mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two boxes with exclusive ends."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_iou(heatmap: np.ndarray, truth: Sequence[np.ndarray], quantile: float) -> float:
    """The best IoU between a predicted region's box and a ground-truth mask's box."""
    boxes = [mask_box(mask) for mask in truth]
    return max((box_iou(r.box, b) for r in regions(heatmap, quantile) for b in boxes), default=0.0)


def pointing_hit(heatmap: np.ndarray, truth: Sequence[np.ndarray], tolerance: int = 0) -> bool:
    """Whether the map's maximum falls inside one of the masks (or within ``tolerance`` pixels of one)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    window = (slice(max(0, y - tolerance), y + tolerance + 1), slice(max(0, x - tolerance), x + tolerance + 1))
    return any(bool(mask[window].any()) for mask in truth)


def score(method: str, attribute: str, heatmaps: Sequence[np.ndarray], truths: Sequence[Sequence[np.ndarray]],
          quantile: float, tolerance: int = 0) -> LocalizationScore:
    """The metrics of one method's maps on one attribute's positive images."""
    pairs = list(zip(heatmaps, truths, strict=True))
    if not pairs:
        nan = float("nan")
        return LocalizationScore(method, attribute, 0, nan, nan, nan, nan, tolerance, nan)
    ious = np.array([best_iou(m, t, quantile) for m, t in pairs])
    hits = np.array([pointing_hit(m, t) for m, t in pairs])
    near = np.array([pointing_hit(m, t, tolerance) for m, t in pairs])
    return LocalizationScore(method, attribute, len(pairs), float((ious >= 0.25).mean()), float((ious >= 0.5).mean()),
                             float(hits.mean()), float(near.mean()), tolerance, float(ious.mean()))


def ceiling_map(truth: Sequence[np.ndarray], map_size: tuple[int, int]) -> np.ndarray:
    """The union of the masks averaged onto the (h, w) feature-map grid and upsampled like the maps."""
    union = torch.from_numpy(np.logical_or.reduce(list(truth)).astype(np.float32))[None, None]
    return upsample(F.adaptive_avg_pool2d(union, map_size), tuple(union.shape[2:]))[0, 0].numpy()


def factor_method(factor: Factor) -> MapMethod:
    """FActOR attribution maps."""
    def maps(features: Tensor) -> Tensor:
        with torch.inference_mode():
            return factor.attribution(features.to(factor.text_embeddings.device)).cpu()
    return maps


def random_method(factor: Factor, seed: int) -> MapMethod:
    """Uniform noise at the feature-map resolution, upsampled like the FActOR maps (the chance baseline)."""
    generator = torch.Generator().manual_seed(seed)

    def maps(features: Tensor) -> Tensor:
        n, k, c = len(features), len(factor.config.attributes), factor.config
        return upsample(torch.rand(n, k, c.map_height, c.map_width, generator=generator), c.input_size)
    return maps


def cam_method(model: MammoClip, factor: Factor) -> MapMethod:
    """The node's zero-shot CAM heatmap (``models.heatmap.finding_maps``) of each attribute's task, upsampled
    like the FActOR maps; attributes without a zero-shot task get a zero map."""
    tasks = [CAM_TASKS.get(a) for a in factor.config.attributes]
    classifier = ZeroShotClassifier(model, [t for t in tasks if t])
    directions = task_directions(classifier)
    ones = dict.fromkeys(directions, 1.0)

    def maps(features: Tensor) -> Tensor:
        rows = []
        for feature_map in features:
            found = finding_maps(model, feature_map.float(), directions, ones)
            zero = torch.zeros(feature_map.shape[1:])
            rows.append(torch.stack([found[t] if t else zero for t in tasks]))
        return upsample(torch.stack(rows), factor.config.input_size)
    return maps


def evaluate_localization(methods: dict[str, MapMethod], features: Callable[[Sequence[int]], Tensor],
                          truths: Sequence[dict[int, list[np.ndarray]]], attributes: Sequence[str], quantile: float,
                          *, tolerance: int = 0, ceiling: tuple[int, int] | None = None,
                          batch_size: int = 16) -> list[LocalizationScore]:
    """Score every method on every attribute. ``truths[i]`` holds, for image i, the ground-truth masks of each
    attribute index it is positive for (images without any are skipped); ``features(positions)`` gives
    their feature maps. With ``ceiling`` (the feature-map size) a last row per attribute scores
    ``ceiling_map``."""
    positions = [i for i, truth in enumerate(truths) if truth]
    names = [*methods, *(["ceiling (mask at map size)"] if ceiling else [])]
    maps: dict[tuple[str, int], list[np.ndarray]] = {(m, k): [] for m in names for k in range(len(attributes))}
    masks: dict[int, list[list[np.ndarray]]] = {k: [] for k in range(len(attributes))}
    for start in range(0, len(positions), batch_size):
        batch = positions[start:start + batch_size]
        feature_maps = features(batch)
        outputs = {name: method(feature_maps).numpy() for name, method in methods.items()}
        for row, position in enumerate(batch):
            for k, truth in truths[position].items():
                masks[k].append(truth)
                for name in methods:
                    maps[name, k].append(outputs[name][row, k])
                if ceiling:
                    maps[names[-1], k].append(ceiling_map(truth, ceiling))
    return [score(name, attributes[k], maps[name, k], masks[k], quantile, tolerance)
            for k in range(len(attributes)) for name in names]


def table(scores: Sequence[LocalizationScore]) -> str:
    """The paper-style table: one row per attribute and method."""
    near = f"pointing±{scores[0].tolerance}px" if scores else "pointing±"
    lines = [f"{'attribute':<15}{'method':<28}{'images':>7}{'IoU@0.25':>10}{'IoU@0.5':>9}{'pointing':>10}{near:>16}"
             f"{'mean IoU':>10}", "-" * 105]
    lines += [f"{s.attribute:<15}{s.method:<28}{s.images:>7}{s.iou_25:>10.3f}{s.iou_50:>9.3f}{s.pointing:>10.3f}"
              f"{s.pointing_near:>16.3f}{s.mean_iou:>10.3f}" for s in scores]
    return "\n".join(lines)
