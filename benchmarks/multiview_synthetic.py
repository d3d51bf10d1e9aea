"""Four-view CLIP with adapters on synthetic phantoms: studies -> index -> conversion -> K-fold patient-level
cross-validation (``training.multiview_train``), printing the AUC per fold, mean ± SD and the stage times.

No pre-trained CLIP exists on the development machines, so by default the frozen backbone is a random-weight CLIP
(``write_random_clip``: hidden 128, 4 layers, 8 px patches); only the adapters (about 1%) learn. Pass
``--clip-dir`` for a real local CLIP (e.g. ViT-B/16 with ``--size 448x288``, on a GPU). Synthetic AUCs show that
the pipeline runs end to end, not that any model is clinical.

    python benchmarks/multiview_synthetic.py                          # 120 studies at 96x64, random CLIP
    python benchmarks/multiview_synthetic.py --quick --out /tmp/mv-bench
    python benchmarks/multiview_synthetic.py --clip-dir CLIP_DIR --size 448x288 --studies 400
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from models.multiview import MultiViewConfig
from models.preprocess import PreprocessConfig
from training.archive.indexer import index_archive
from training.archive.store import open_index
from training.convert import convert_archive
from training.multiview_train import MultiviewTrainConfig, train_multiview, write_random_clip
from training.synthetic import write_studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=120)
    parser.add_argument("--size", default="96x64", help="model input HxW (a multiple of the patch size)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--k-shot", type=int)
    parser.add_argument("--clip-dir", type=Path, help="a local Hugging Face CLIP directory (default: random)")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="conversion processes (default: all cores; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="20 studies, 2 folds, 1 epoch, converted in this process: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.folds, args.epochs, args.workers = 20, 2, 1, args.workers or 1
    height, width = (int(v) for v in args.size.lower().split("x"))
    out = args.out or Path(tempfile.mkdtemp(prefix="multiview-bench-"))
    times: dict[str, float] = {}

    def stage(name: str, start: float) -> None:
        times[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {times[name]} s", flush=True)

    start = time.perf_counter()
    manifest = write_studies(out / "studies", args.studies, seed=args.seed, rows=2 * height, cols=2 * width,
                             finding_prevalence=1.0, malignancy_prevalence=0.5, progress=False)
    stage("synthetic studies", start)
    start = time.perf_counter()
    index_archive(out / "studies", open_index(out / "index"), None, manifest, seed=args.seed, progress=False)
    convert_archive(open_index(out / "index"), out / "cache", PreprocessConfig(height, width), workers=args.workers,
                    progress=False)
    stage("index and conversion", start)
    clip_dir = args.clip_dir or write_random_clip(out / "random-clip", hidden=128, layers=4, seed=args.seed)
    config = MultiviewTrainConfig(protocol="cv", folds=args.folds, k_shot=args.k_shot, epochs=args.epochs,
                                  batch_size=8, learning_rate=3e-3, seed=args.seed, synthetic_data=True,
                                  progress=False)
    start = time.perf_counter()
    run = train_multiview(out / "index", clip_dir, out / "run", config=config,
                          model_config=MultiViewConfig(input_height=height, input_width=width))
    stage("cross-validation", start)
    metrics = json.loads((run / "metrics.json").read_text())
    summary = {"studies": args.studies, "size": f"{height}x{width}", "backbone": str(args.clip_dir or "random"),
               "device": "cuda" if torch.cuda.is_available() else "cpu", "parameters": metrics["parameters"],
               "fold_aucs": [fold["auc"] for fold in metrics["folds"]], "auc_mean": metrics["auc_mean"],
               "auc_sd": metrics["auc_sd"], "out_of_fold_auc": metrics["out_of_fold"]["auc"], "seconds": times}
    print(json.dumps(summary, indent=2))
    print("Synthetic AUCs: the pipeline works end to end; NOT a clinical model.")


if __name__ == "__main__":
    main()
