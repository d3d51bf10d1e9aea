"""``mammo-node``: the one command-line entry point of the Mammo-CLIP node."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from dicom_node.settings import Settings, load_settings
from models.errors import NodeError

log = logging.getLogger("mammo_node")

NOT_CLINICAL_BANNER = (
    "NOTE: the demo model is trained on synthetic phantoms. It is NOT a clinical model and its scores\n"
    "say nothing about real patients. Load real Mammo-CLIP weights with --model / MAMMO_MODEL_PATH."
)


def parse_size(value: str) -> tuple[int, int]:
    """'ROWSxCOLS' (e.g. 4096x3328) -> (rows, cols)."""
    try:
        rows, cols = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not ROWSxCOLS, for example 4096x3328 or 256x160") from None
    if rows < 64 or cols < 64:
        raise click.BadParameter("images must be at least 64x64")
    return rows, cols


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML settings file (default: ./mammo-node.toml or $MAMMO_CONFIG).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, verbose: bool) -> None:
    """Mammo-CLIP node: mammography AI beside the PACS (research and triage support, not clinical).

    This release holds the models, the synthetic study generator, zero-shot scoring and the Storage
    SCP with its worklist database; analysis workers and result export are being built on top of them.

    \b
    Start here:
      mammo-node demo                  synthetic study -> model -> scores (trains a demo model once)
      mammo-node synth OUT --studies 8 write synthetic four-view MG studies with masks and reports
      mammo-node classify STUDY_DIR    zero-shot scores per view and per breast for a folder of DICOM
      mammo-node embed FILES...        image or text embeddings to .npy
      mammo-node db upgrade            create or migrate the worklist database
      mammo-node serve                 run the Storage SCP (receive studies over C-STORE)

    Settings come from a TOML file and MAMMO_* environment variables (e.g. MAMMO_MODEL_PATH,
    MAMMO_TEXT_ENCODER_PATH, MAMMO_DEVICE, MAMMO_DATA_DIR). Not for clinical use.
    """
    try:
        settings = load_settings(config_file)
    except NodeError as error:
        raise click.UsageError(str(error)) from None
    logging.basicConfig(level="DEBUG" if verbose else settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = settings


def _model_options(function: click.decorators.FC) -> click.decorators.FC:
    function = click.option("--text-encoder", type=click.Path(exists=True, path_type=Path),
                            help="Local Hugging Face text-encoder directory (Bio_ClinicalBERT) for a .tar.")(function)
    return click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path),
                        help="Reference .tar checkpoint or model-version folder (default: the demo model).")(function)


def _load(settings: Settings, model_path: Path | None, text_encoder: Path | None, progress: bool = True):
    from models import load_model
    from training.demo import ensure_demo_model

    path = model_path or settings.model_path
    if path is None:
        click.echo(NOT_CLINICAL_BANNER, err=True)
        path = ensure_demo_model(settings.data_dir / "cache", progress=progress)
    return load_model(path, text_encoder=text_encoder or settings.text_encoder_path,
                      device=settings.resolved_device())


def _print_study(scores, truth: dict[str, dict[str, object]] | None = None) -> None:  # noqa: ANN001
    click.echo(f"{'view':<8}{'mass':>7}{'calc':>7}{'malig':>7}  density")
    for (laterality, view), probs in sorted(scores.views.items()):
        density = "ABCD"[int(probs["density"].argmax())]
        click.echo(f"{laterality + ' ' + view:<8}{float(probs['mass'][1]):7.2f}{float(probs['calcification'][1]):7.2f}"
                   f"{float(probs['malignancy'][1]):7.2f}  {density}")
    for side, probs in sorted(scores.breasts.items()):
        line = (f"{side + ' breast':<8}{float(probs['mass'][1]):7.2f}{float(probs['calcification'][1]):7.2f}"
                f"{float(probs['malignancy'][1]):7.2f}  {'ABCD'[int(probs['density'].argmax())]}")
        if truth and side in truth:
            t = truth[side]
            line += (f"   truth: mass={t['mass']} calc={t['calcification']} malignant={t['malignant']} "
                     f"density={t['density']} BI-RADS={t['birads']}")
        click.echo(line)
    if scores.missing_views:
        click.echo("missing views: " + ", ".join(" ".join(v) for v in scores.missing_views))


@main.command()
@_model_options
@click.option("--seed", default=7, show_default=True, help="Seed of the synthetic study to analyse.")
@click.pass_obj
def demo(settings: Settings, model_path: Path | None, text_encoder: Path | None, seed: int) -> None:
    """Generate a synthetic screening study, run Mammo-CLIP on it and print the scores.

    Uses the demo model (trained on synthetic phantoms on first run, then cached under the data
    directory) unless --model is given.
    """
    from models.inference import load_study_images, score_views
    from models.zero_shot import ZeroShotClassifier
    from training.synthetic import write_studies

    try:
        model = _load(settings, model_path, text_encoder)
        study_dir = settings.data_dir / "demo-study"
        manifest = write_studies(study_dir, 1, seed=1_000_000 + seed, rows=768, cols=480, progress=False)
        paths = sorted((study_dir).glob("*/*.dcm"))
        scores = score_views(ZeroShotClassifier(model), load_study_images(paths, model))
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    truth = _truth_by_side(manifest)
    click.echo(f"Synthetic study written to {study_dir} ({len(paths)} images); model: {model.load_report.source}")
    _print_study(scores, truth)
    card = getattr(model, "card", {})
    if card.get("metrics_held_out_zero_shot"):
        click.echo(f"Model card metrics on held-out synthetic studies: {card['metrics_held_out_zero_shot']}")
    if card.get("clinical_use") is False:
        click.echo(NOT_CLINICAL_BANNER)


def _truth_by_side(manifest: Path) -> dict[str, dict[str, object]]:
    import csv

    with manifest.open(newline="") as handle:
        return {row["laterality"]: row for row in csv.DictReader(handle)}


@main.command()
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--studies", default=4, show_default=True, help="Number of four-view studies.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same files).")
@click.option("--size", "size", default="4096x3328", show_default=True, callback=lambda c, p, v: parse_size(v),
              help="ROWSxCOLS of each image; real units are about 4096x3328. Use 256x160 for tests.")
@click.option("--malignancy-prevalence", default=0.3, show_default=True,
              help="Share of finding-bearing studies with a malignant finding (real screening: ~0.005-0.01).")
@click.option("--finding-prevalence", default=0.5, show_default=True, help="Share of studies with any finding.")
def synth(outdir: Path, studies: int, seed: int, size: tuple[int, int], malignancy_prevalence: float,
          finding_prevalence: float) -> None:
    """Write synthetic four-view screening mammography studies (DICOM MG, masks, reports, manifest.csv).

    Phantoms for testing and demos only: a model trained on them is not clinical.
    """
    from training.synthetic import write_studies

    manifest = write_studies(outdir, studies, seed=seed, rows=size[0], cols=size[1],
                             malignancy_prevalence=malignancy_prevalence, finding_prevalence=finding_prevalence)
    click.echo(f"wrote {studies} studies; manifest: {manifest}")


@main.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--text", "texts", multiple=True, help="A text to embed (repeatable).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("embeddings.npy"), show_default=True)
@_model_options
@click.pass_obj
def embed(settings: Settings, files: tuple[Path, ...], texts: tuple[str, ...], output: Path,
          model_path: Path | None, text_encoder: Path | None) -> None:
    """Embed images (DICOM or PNG) and/or texts into the shared 512-d space; rows in argument order
    (files first, then texts) are written to a .npy file."""
    import torch

    from models.preprocess import preprocess_file

    if not files and not texts:
        raise click.UsageError("give image FILES and/or --text")
    try:
        model = _load(settings, model_path, text_encoder)
        rows = []
        with torch.inference_mode():
            config = model.config.preprocess()
            for path in files:
                rows.append(model.encode_images(preprocess_file(path, config)[None].to(model.device)).cpu())
            if texts:
                rows.append(model.encode_texts(list(texts)).cpu())
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    array = torch.cat(rows).numpy().astype(np.float32)
    np.save(output, array)
    click.echo(f"wrote {array.shape[0]} embeddings of size {array.shape[1]} to {output}")


@main.command()
@click.argument("study_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_model_options
@click.pass_obj
def classify(settings: Settings, study_dir: Path, as_json: bool, model_path: Path | None,
             text_encoder: Path | None) -> None:
    """Zero-shot scores (mass, calcification, malignancy, density, BI-RADS) per view and per breast
    for the DICOM mammograms of one study folder."""
    from models.inference import load_study_images, score_views
    from models.zero_shot import ZeroShotClassifier

    paths = [p for p in sorted(study_dir.rglob("*")) if p.is_file() and p.suffix.lower() in {".dcm", ""}]
    try:
        model = _load(settings, model_path, text_encoder, progress=not as_json)
        scores = score_views(ZeroShotClassifier(model), load_study_images(paths, model))
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        payload = {
            "views": {f"{k[0]}_{k[1]}": {t: v.tolist() for t, v in p.items()} for k, p in scores.views.items()},
            "breasts": {side: {t: v.tolist() for t, v in p.items()} for side, p in scores.breasts.items()},
            "missing_views": [f"{k[0]}_{k[1]}" for k in scores.missing_views],
        }
        click.echo(json.dumps(payload, indent=2))
    else:
        _print_study(scores)


@main.group()
def db() -> None:
    """The worklist database (SQLite by default, PostgreSQL through MAMMO_DB_URL)."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(settings: Settings) -> None:
    """Create or migrate the worklist database to the newest schema (Alembic)."""
    from worklist.db import make_engine, upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    click.echo(f"database at {engine.url.render_as_string(hide_password=True)} is up to date")


@main.command()
@click.pass_obj
def serve(settings: Settings) -> None:
    """Run the Storage SCP (C-ECHO, C-STORE) until interrupted.

    \b
    Every received instance is fsynced to disk and recorded in the worklist database before the
    node answers Success. Try it with DCMTK:
      echoscu -aec MAMMO_AI 127.0.0.1 11112
      storescu -aec MAMMO_AI 127.0.0.1 11112 study/*.dcm
    Analysis workers and result export are not part of this release yet.
    """
    import threading

    from dicom_node.scp import start_scp, storage_root
    from dicom_node.storage import InstanceStore
    from worklist.db import make_engine, require_current, session_factory

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url())
    try:
        require_current(engine)
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    server = start_scp(settings, InstanceStore(storage_root(settings), session_factory(engine)))
    click.echo(f"{settings.ae_title} listening on {settings.bind_host}:{settings.port} (Ctrl-C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        server.shutdown()
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
