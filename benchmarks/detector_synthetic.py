"""Detector benchmark on synthetic phantoms: boxes from the generator's masks -> short RetinaNet training ->
mAP@0.5 per class on held-out studies, against the same detector before training (the baseline, same run).

The training studies all carry a finding; the held-out studies use the generator's enriched default (half of
them). The encoder is random-initialized ``efficientnet-test`` unless ``--model`` names a Mammo-CLIP model
(its image encoder becomes the backbone). Both detectors are scored at score threshold 0 (all top-100
detections: AP cannot drop when low-score boxes are added); the trained one also at the reference's 0.2.
Synthetic mAPs show that the detection pipeline learns; they say nothing about clinical performance.

Measured on 2 shared CPU cores (random encoder, 40 + 10 studies, 12 epochs, 22 minutes of training): the loss
goes down, but held-out mAP@0.5 stays at chance (0.000 mass, 0.001 calcification, as before training). A
RetinaNet from random weights needs far more steps than a CPU run allows. Use ``--model`` (a Mammo-CLIP encoder)
and more ``--epochs`` on a GPU for a meaningful figure.

    python benchmarks/detector_synthetic.py --model mammo-data/demo-model --epochs 40
    python benchmarks/detector_synthetic.py --quick    # smoke test, under a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from models import load_model
from models.detector import DetectorConfig, MammoDetector, detector_from_clip
from training.detector_train import (
    DetectionMetrics,
    DetectorTrainConfig,
    annotations_from_manifest,
    evaluate,
    prepare_samples,
    train_detector,
)
from training.synthetic import write_studies

STATEMENT = ("Synthetic mAPs say that the detector pipeline learns; they say nothing about clinical performance. "
             "The model is NOT a clinical model.")


def build_detector(model: Path | None, height: int, width: int) -> MammoDetector:
    """A detector on the Mammo-CLIP encoder of ``model``, else on a random ``efficientnet-test``."""
    shape = {"input_height": height, "input_width": width, "fpn_channels": 64, "anchor_size": 8.0}
    if model is not None:
        return detector_from_clip(load_model(model), **shape)
    return MammoDetector(DetectorConfig(image_encoder="efficientnet-test", **shape))


def run(out: Path, studies: int, held_studies: int, epochs: int, size: tuple[int, int], seed: int,
        model: Path | None, progress: bool) -> dict[str, object]:
    """All stages; returns the per-class AP of the untrained and the trained detector and the timings."""
    torch.manual_seed(seed)
    rows, cols = 2 * size[0], 2 * size[1]
    start = time.perf_counter()
    train_manifest = write_studies(out / "train", studies, seed=seed, rows=rows, cols=cols, finding_prevalence=1.0,
                                   progress=progress)
    test_manifest = write_studies(out / "test", held_studies, seed=seed + 100_000, rows=rows, cols=cols,
                                  progress=progress)
    detector = build_detector(model, *size)
    train = prepare_samples(annotations_from_manifest(train_manifest), detector.config, progress=progress)
    test = prepare_samples(annotations_from_manifest(test_manifest), detector.config, progress=progress)
    prepared = time.perf_counter()
    baseline = evaluate(detector, test, score_threshold=0.0)
    config = DetectorTrainConfig(epochs=epochs, batch_size=8, learning_rate=1e-3, grad_clip=10.0,
                                 batch_norm_momentum=0.1, seed=seed, progress=progress)
    history = train_detector(detector, train, config)
    trained = time.perf_counter()
    results = {"untrained (score >= 0)": baseline,
               "trained (score >= 0)": evaluate(detector, test, score_threshold=0.0),
               "trained (score >= 0.2)": evaluate(detector, test, score_threshold=0.2)}
    return {"results": {name: m.to_dict() for name, m in results.items()},
            "loss_first_last": [history.losses[0], history.losses[-1]], "train_images": len(train),
            "test_images": len(test), "seconds": {"data": prepared - start, "training": trained - prepared},
            "_metrics": results}


def print_table(results: dict[str, DetectionMetrics]) -> None:
    classes = list(next(iter(results.values())).average_precision)
    print(f"{'detector':<24}" + "".join(f"{name:>15}" for name in [*classes, "mAP@0.5"]))
    for name, metrics in results.items():
        values = [*(metrics.average_precision[c] for c in classes), metrics.mean_average_precision]
        print(f"{name:<24}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>15}" for v in values))
    first = next(iter(results.values()))
    print("held-out ground-truth boxes:", first.ground_truth_boxes, "images:", first.images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 + 2 studies, 1 epoch")
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--held-out", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", nargs=2, type=int, default=(192, 128), metavar=("H", "W"))
    parser.add_argument("--model", type=Path, help="Mammo-CLIP checkpoint or model version for the backbone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep the data and summary.json here (default: a temp folder)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    studies, held, epochs = (4, 2, 1) if args.quick else (args.studies, args.held_out, args.epochs)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        summary = run(out, studies, held, epochs, tuple(args.size), args.seed, args.model, not args.no_progress)
        print_table(summary.pop("_metrics"))
        print(f"loss {summary['loss_first_last'][0]:.3f} -> {summary['loss_first_last'][1]:.3f}; "
              f"{summary['train_images']} training / {summary['test_images']} held-out images; "
              f"data {summary['seconds']['data']:.0f} s, training {summary['seconds']['training']:.0f} s")
        print(STATEMENT)
        if args.out:
            (args.out / "summary.json").write_text(json.dumps({**summary, "statement": STATEMENT}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
