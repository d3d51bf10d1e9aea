"""Four-view study forward pass: the reference-style eager path against the node's optimized path.

Baseline ("reference"): lukemelas' EfficientNet-PyTorch (the code the reference vendors), fp32, one image at a
time under ``torch.no_grad``, as the reference's evaluator runs it. Ours: ``models.optimize.inference_copy``
(batch-norm folded into the convolutions, channels-last weights) through ``models.inference.embed_views``
(``torch.inference_mode``; the four views in one batch with bf16 autocast on CUDA, one view at a time on CPU).
Both use the same random weights, so the embeddings must agree (max |delta| is printed).

On CUDA (TF32 off, so float32 is float32), three of our paths are timed against the reference: float32 with the
four views in one batch (the identity check, max |delta| < 1e-4), bf16 one view at a time, and bf16 batched (what
the worker runs). Each row gives studies/min and the peak GPU memory of the path, weights included: the memory one
analysis worker process needs for the image tower (the copy's weights plus the path's own peak above what
was already allocated).

    python benchmarks/inference.py                      # B2 and B5 at 1520x912 on the best device
    python benchmarks/inference.py --variants b2 --repeats 3 --device cpu
    python benchmarks/inference.py --quick --json rows.json   # B2 at 760x456, one repeat; summary rows as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig

from models.clip import ClipConfig, MammoClip
from models.device_memory import peak_cuda_memory
from models.inference import SCREENING_VIEWS, embed_views
from models.optimize import inference_copy
from models.text_encoder import TextEncoder


def build(variant: str, device: str) -> tuple[MammoClip, torch.nn.Module]:
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    tiny_text = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = MammoClip(ClipConfig(image_encoder=f"efficientnet-{variant}"), TextEncoder.from_config(tiny_text))
    for module in model.image_encoder.modules():  # trained-like batch-norm statistics, so folding is exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
    reference = EfficientNet.from_name(f"efficientnet-{variant}", num_classes=1)
    reference.load_state_dict({**reference.state_dict(), **model.image_encoder.state_dict()})
    return model.to(device).eval(), reference.to(device).eval()


def reference_study(model: MammoClip, reference: torch.nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for image in views:
            pooled = torch.flatten(F.adaptive_avg_pool2d(reference.extract_features(image[None]), 1), 1)
            rows.append(F.normalize(model.image_projection(pooled), dim=-1))
    return torch.cat(rows).cpu()


def our_paths(device: str) -> list[tuple[str, int | None, torch.dtype | None]]:
    """(label, views per batch, CUDA autocast dtype) of each path of ours to time on ``device``."""
    if device != "cuda":
        return [("ours", None, None)]
    return [("fp32 batched", 4, None), ("bf16 one by one", 1, torch.bfloat16), ("ours", 4, torch.bfloat16)]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def timed(function, repeats: int, device: str) -> tuple[float, object]:
    result = function()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["b2", "b5"], choices=["b0", "b2", "b5"])
    parser.add_argument("--height", type=int, default=1520)
    parser.add_argument("--width", type=int, default=912)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="B2 at 760x456, one repeat: a smoke run")
    parser.add_argument("--json", type=Path, help="write the summary rows (speed-up, max |delta|) here")
    args = parser.parse_args()
    if args.quick:
        args.variants, args.height, args.width, args.repeats = ["b2"], 760, 456, 1
    rows: list[dict[str, object]] = []
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"input={args.height}x{args.width}, 4 views per study")
    print(f"{'model':<6}{'path':<18}{'ref s/study':>12}{'ours s/study':>14}{'speed-up':>10}{'studies/min':>13}"
          f"{'max|d emb|':>12}" + (f"{'peak GiB':>9}" if args.device == "cuda" else ""))
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for variant in args.variants:
        model, reference = build(variant, args.device)
        torch.manual_seed(1)
        views = [torch.randn(3, args.height, args.width, device=args.device) for _ in SCREENING_VIEWS]
        ref_time, ref_emb = timed(partial(reference_study, model, reference, views), args.repeats, args.device)
        images = dict(zip(SCREENING_VIEWS, views, strict=True))
        fast = inference_copy(model)
        name = f"inference {variant.upper()} 4 views {args.height}x{args.width} {args.device}"
        for path, batch_size, autocast in our_paths(args.device):
            resident = torch.cuda.memory_allocated() if args.device == "cuda" else 0  # both models, the inputs
            with peak_cuda_memory(args.device) as peak:
                our_time, ours = timed(partial(embed_views, fast, images, batch_size, autocast), args.repeats,
                                       args.device)
            delta = float((torch.stack([ours[key] for key in SCREENING_VIEWS]) - ref_emb).abs().max())
            shown = f"{(weight_bytes(fast) + peak.bytes - resident) / 2**30:9.2f}" if peak.bytes is not None else ""
            print(f"{variant:<6}{path:<18}{ref_time:12.3f}{our_time:14.4f}{ref_time / our_time:9.2f}x"
                  f"{60 / our_time:13.1f}{delta:12.2e}{shown}")
            label = name if path == "ours" else f"{name} {path}"
            rows.append({"name": label, "figure": round(our_time, 4), "baseline": round(ref_time, 4),
                         "unit": "s/study", "ratio": round(ref_time / our_time, 2), "target": ">= 2x",
                         "met": ref_time / our_time >= 2})
            if autocast is None:
                rows.append({"name": f"{label}: max abs delta of embeddings", "figure": delta, "baseline": None,
                             "unit": "", "ratio": None, "target": "< 1e-4", "met": delta < 1e-4})
    if args.json:
        args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
