"""``mammo-node train``: pretrain and fine-tune on an indexed archive (see ``mammo-node archive``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dicom_node.settings import Settings
from models.errors import NodeError

DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "Where the model runs; auto: cuda when available, else cpu. Default: the node's `device` setting."


def _device(settings: Settings, device: str | None) -> str:
    """``--device`` (else the ``device`` setting) with ``auto`` resolved; a usage error for cuda without a GPU."""
    resolved = settings.model_copy(update={"device": device or settings.device}).resolved_device()
    if resolved == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda: no CUDA device is visible")
    return resolved


def _subgroup_lines(subgroups: dict[str, Any]) -> list[str]:
    """A compact subgroup table from ``metrics.json``: one line per attribute with each value's cases and AUC
    (gap to overall), or why it has none."""
    if "unavailable" in subgroups:
        return [f"  subgroups: {subgroups['unavailable']}"]
    by_attribute: dict[str, list[str]] = {}
    for row in subgroups["rows"]:
        result = f"AUC {row['auc']:.3f} ({row['gap']:+.3f})" if row["auc"] is not None else row["reason"]
        by_attribute.setdefault(row["attribute"], []).append(f"{row['value']} n={row['n']} {result}")
    return [f"  subgroups ({subgroups['level']} level), overall AUC {subgroups['overall_auc']:.3f}:",
            *(f"    {attribute:<13} " + "; ".join(values) for attribute, values in by_attribute.items())]


@click.group()
def train() -> None:
    """Pretrain Mammo-CLIP and fine-tune heads on the site's indexed, converted archive.

    \b
      mammo-node archive index /pacs-export --reports ris.csv && mammo-node archive convert
      mammo-node train pretrain mammo-data/archive runs/pre-1 --start-from b5.tar --text-encoder BERT_DIR
      mammo-node train finetune mammo-data/archive runs/pre-1/model runs/mass-1 --target mass
      mammo-node train evaluate mammo-data/archive runs/pre-1/model runs/eval-1   (zero-shot)
      mammo-node train multiview mammo-data/archive /models/clip-vit-b16 runs/mv-1 --protocol split
      mammo-node train detector --manifest phantoms/manifest.csv --model runs/pre-1/model --out runs/det-1
      mammo-node train factor mammo-data/archive runs/pre-1/model runs/factor-1 --masks phantoms/manifest.csv
      mammo-node model register runs/pre-1/model --name site-v1 && mammo-node model activate site-v1
      mammo-node model register runs/pre-1/model --name site-v1-loc --detector runs/det-1 --factor runs/factor-1
    Several GPUs: python -m torch.distributed.run --nproc_per_node=4 -m training.pretrain INDEX OUT ...
    Models trained on synthetic data (--synthetic) are marked NOT clinical in their cards.
    """


@train.command("pretrain", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                             "help_option_names": []})
@click.pass_context
def pretrain_command(ctx: click.Context) -> None:
    """Contrastive pretraining (image-text, CC-MLO, text-text) on INDEX into OUT; `--help` lists its options.

    The same program torchrun runs as `-m training.pretrain`; one process here.
    """
    from training.pretrain import main as pretrain_main

    try:
        pretrain_main(ctx.args)
    except NodeError as error:
        raise click.ClickException(str(error)) from None


@train.command("multiview", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                              "help_option_names": []})
@click.pass_context
def multiview_command(ctx: click.Context) -> None:
    """The four-view fusion CLIP with adapters (Chen et al.): INDEX CLIP_DIR OUT; `--help` lists its options.

    \b
    5-fold patient-level cross-validation (--protocol cv, the paper's), or train/validation/test (--protocol
    split), optionally few-shot (--k-shot K); then `mammo-node model register BASE --multiview OUT/model`.
    """
    from training.multiview_train import main as multiview_main

    try:
        multiview_main(ctx.args)
    except NodeError as error:
        raise click.ClickException(str(error)) from None


@train.command("detector", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                             "help_option_names": []})
@click.pass_context
def detector_command(ctx: click.Context) -> None:
    """The lesion detector (RetinaNet, mass and calcification boxes): --manifest or --boxes, --out OUT; `--help`
    lists its options.

    \b
    Trains on a synthetic manifest.csv or a VinDr-style box CSV, prints held-out mAP@0.5 per class, writes the
    detector folder OUT; then `mammo-node model register BASE --detector OUT`. Synthetic: NOT clinical.
    """
    from training.detector_train import main as detector_main

    try:
        detector_main(ctx.args, prog="mammo-node train detector")
    except NodeError as error:
        raise click.ClickException(str(error)) from None


@train.command("factor", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                           "help_option_names": []})
@click.pass_context
def factor_command(ctx: click.Context) -> None:
    """Mammo-FActOR projectors on a frozen encoder: INDEX MODEL OUT [--masks manifest.csv | --boxes CSV]; `--help`
    lists its options.

    \b
    Trains on the indexed archive, prints IoU@0.25/0.5 and the pointing game per attribute on the test split,
    writes the FActOR folder OUT; then `mammo-node model register MODEL --factor OUT`. Synthetic: NOT clinical.
    """
    from training.factor.train import main as factor_main

    try:
        factor_main(ctx.args, prog="mammo-node train factor")
    except NodeError as error:
        raise click.ClickException(str(error)) from None


@train.command("finetune")
@click.argument("index")
@click.argument("model_path", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["malignancy", "mass", "calcification", "density", "birads"]),
              default="malignancy", show_default=True)
@click.option("--mode", type=click.Choice(["linear", "full", "adapter"]), default="linear", show_default=True,
              help="linear: frozen encoder + logistic layer; full: encoder too; adapter: bottleneck adapters.")
@click.option("--k-shot", type=int, help="Few-shot: K training images per class.")
@click.option("--steps", type=int, default=500, show_default=True, help="Optimizer steps (linear).")
@click.option("--epochs", type=int, default=5, show_default=True, help="Epochs (full, adapter).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--synthetic", is_flag=True, help="The archive is synthetic phantoms (the card says NOT clinical).")
@click.option("--device", type=click.Choice(DEVICES), help=DEVICE_HELP)
@click.pass_obj
def finetune_command(settings: Settings, index: str, model_path: Path, out: Path, target: str, mode: str,
                     k_shot: int | None, steps: int, epochs: int, seed: int, synthetic: bool,
                     device: str | None) -> None:
    """Train a TARGET head on INDEX's train split for MODEL_PATH, select on validation, report on test.

    Writes head weights, head.json (thresholds at 90/95% specificity), metrics.json, roc.png and
    report.html into OUT; prints the test split's subgroup AUCs (density, age band, manufacturer, view).
    """
    from training.finetune import METRICS_FILE, FinetuneConfig, finetune

    try:
        config = FinetuneConfig(target=target, mode=mode, k_shot=k_shot, steps=steps, epochs=epochs, seed=seed,
                                synthetic_data=synthetic)
        folder = finetune(index, model_path, out, config=config, device=_device(settings, device))
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    metrics = json.loads((folder / METRICS_FILE).read_text())
    click.echo("\n".join([*_subgroup_lines(metrics["subgroups"]), metrics["test_studies_seen"]]))
    click.echo(f"head written to {folder}; open {folder / 'report.html'}")


@train.command("evaluate")
@click.argument("index")
@click.argument("model_path", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
@click.option("--text-encoder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local text-encoder directory, for a reference .tar checkpoint.")
@click.option("--device", type=click.Choice(DEVICES), help=DEVICE_HELP)
@click.option("--prompts", type=click.Choice(["node", "reference"]), default="node", show_default=True,
              help="node: the node's prompt templates (what it serves); reference: the reference's own prompts "
                   "and scoring, to reproduce its published zero-shot figures with its checkpoints.")
@click.pass_obj
def evaluate_command(settings: Settings, index: str, model_path: Path, out: Path, split: str,
                     text_encoder: Path | None, device: str | None, prompts: str) -> None:
    """Zero-shot evaluation of MODEL_PATH on INDEX's split: mass, calcification and malignancy AUC with 95% CI
    and sensitivity at 90/95% specificity, per image, breast and study, and image-level subgroup AUCs (density,
    age band, manufacturer, view); metrics.json, roc.png, report.html. With no validation split, the operating
    points are fitted on the evaluated split itself (optimistic)."""
    from training.zero_shot_eval import zero_shot_evaluation

    try:
        results = zero_shot_evaluation(index, model_path, out, split=split, text_encoder=text_encoder,
                                       device=_device(settings, device), prompts=prompts)
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    for target, levels in results.items():
        breast = levels.get("breast", levels.get("unavailable"))
        line = f"AUC {breast['auc']:.3f}" if isinstance(breast, dict) else str(breast)
        click.echo(f"{target:<14} breast level: {line}")
        if "subgroups" in levels:
            click.echo("\n".join(_subgroup_lines(levels["subgroups"])))
    click.echo(json.loads((out / "metrics.json").read_text())["studies_seen"])
    click.echo(f"report: {out / 'report.html'}")
