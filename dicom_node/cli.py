"""``mammo-node``: the one command-line entry point of the Mammo-CLIP node."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
import numpy as np

from dicom_node.cli_archive import archive
from dicom_node.cli_model import model
from dicom_node.cli_node import COMMANDS
from dicom_node.cli_train import train
from dicom_node.logs import JsonFormatter, TextFormatter, configure_logging
from dicom_node.serving import NOT_CLINICAL_BANNER
from dicom_node.settings import Settings, load_settings
from models.errors import NodeError

log = logging.getLogger("mammo_node")



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

    Receives screening studies by C-STORE, analyses them with Mammo-CLIP when the four views are in,
    and sends a Structured Report (TID 1500) and heatmap SEGs back to the PACS.

    \b
    Start here:
      mammo-node demo                  the whole path on this machine, with a synthetic study
      mammo-node db upgrade            create or migrate the worklist database
      mammo-node serve                 run the node: SCP + scheduler + embedded worker
      mammo-node worker -Q gpu         a separate analysis worker (production, Redis broker)
      mammo-node echo / send PATH...   C-ECHO / C-STORE to the node or to a destination
      mammo-node status / studies      counts by state / the triage list by suspicion
      mammo-node retry-exports         send FAILED exports again
      mammo-node archive index ROOT    index a site archive of studies and reports for training
      mammo-node train pretrain|finetune|evaluate  train and evaluate on the indexed archive
      mammo-node train multiview|detector|factor   the four-view model, lesion boxes, FActOR maps
      mammo-node drift / config example            score drift per model version / every setting
      mammo-node model list / activate the registry of model versions the node serves
      mammo-node synth OUT --studies 8 write synthetic four-view MG studies with masks and reports
      mammo-node classify STUDY_DIR    zero-shot scores for a folder of DICOM, without the node
      mammo-node embed FILES...        image or text embeddings to .npy

    \b
    Settings come from a TOML file (--config, ./mammo-node.toml or $MAMMO_CONFIG) and MAMMO_*
    environment variables, e.g. MAMMO_MODEL_PATH, MAMMO_DATA_DIR, MAMMO_DB_URL, MAMMO_BROKER_URL,
    MAMMO_DESTINATIONS='[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}]'.
    Not for clinical use.
    """
    os.umask(0o077)  # everything the node writes holds patient data or derives from it: owner only
    try:
        settings = load_settings(config_file)
    except NodeError as error:
        raise click.UsageError(str(error)) from None
    configure_logging("DEBUG" if verbose else settings.log_level, settings.log_format)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if not verbose:  # pynetdicom logs every DIMSE message at INFO; the node logs each stored instance itself
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ctx.obj = settings


def _log_to_file(path: Path) -> None:
    """Keep the terminal for results: INFO and below go to ``path``, warnings still show."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setLevel(logging.WARNING)
    file_handler = logging.FileHandler(path)
    json_logs = any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers)
    file_handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    root.addHandler(file_handler)


def _model_options(function: click.decorators.FC) -> click.decorators.FC:
    function = click.option("--text-encoder", type=click.Path(exists=True, path_type=Path),
                            help="Local Hugging Face text-encoder directory (Bio_ClinicalBERT) for a .tar.")(function)
    return click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path),
                        help="Reference .tar checkpoint or model-version folder (default: the demo model).")(function)


def _load(settings: Settings, model_path: Path | None, text_encoder: Path | None, progress: bool = True):
    from dicom_node.serving import load_serving_model

    if (model_path or settings.model_path) is None:
        click.echo(NOT_CLINICAL_BANNER, err=True)
    return load_serving_model(settings, model_path, text_encoder, progress)


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
@click.option("--seed", default=7, show_default=True, help="Seed of the synthetic study to send.")
@click.pass_obj
def demo(settings: Settings, model_path: Path | None, text_encoder: Path | None, seed: int) -> None:
    """The whole path on this machine: a synthetic study goes by C-STORE to the node, which analyses it
    and sends an SR and heatmap SEGs back to a local stand-in PACS.

    \b
    1. starts a local destination SCP and the node (SCP, scheduler, worker; SQLite, embedded queue);
    2. generates a synthetic four-view study and sends it by C-STORE;
    3. waits for the analysis and the delivery of the results;
    4. prints the scores, the triage list and the paths of the returned SR and SEGs;
    5. writes a heatmap overlay PNG per view.
    Uses the demo model (trained on synthetic phantoms on first run, then cached under the data
    directory) unless --model is given. Not a clinical model.
    """
    from dicom_node.demo import run_demo
    from dicom_node.serving import load_serving_model

    if not click.get_current_context().find_root().params["verbose"]:
        _log_to_file(settings.data_dir / "demo.log")
        click.echo(f"logs: {settings.data_dir / 'demo.log'} and {settings.data_dir / 'demo-worker.log'} "
                   "(-v shows them here)")
    try:
        if model_path or text_encoder:
            settings = settings.model_copy(update={"model_path": model_path or settings.model_path,
                                                   "text_encoder_path": text_encoder or settings.text_encoder_path})
        if settings.model_path is None:
            click.echo(NOT_CLINICAL_BANNER, err=True)
        model = load_serving_model(settings)  # trains and caches the demo model on first run
        click.echo(f"model: {model.load_report.source}")
        del model
        outcome = run_demo(settings, seed, on_state=lambda state: click.echo(f"  ... {state}"))
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    _print_outcome(outcome)
    ctx = click.get_current_context()
    ctx.invoke(studies, limit=5, as_json=False)
    click.echo(NOT_CLINICAL_BANNER)
    if outcome.state != "DONE":
        raise click.ClickException(f"analysis failed: {outcome.error}")


def _print_outcome(outcome) -> None:  # noqa: ANN001  (dicom_node.demo.DemoOutcome)
    click.echo(f"\nstudy {outcome.study_instance_uid}: {outcome.state} "
               f"{outcome.seconds_to_delivery:.1f} s after the C-STORE")
    if outcome.timings:
        click.echo("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items()))
    findings = outcome.findings
    if findings:
        click.echo(f"{'':<10}{'malignancy':>11}{'mass':>7}{'calc':>7}  density  BI-RADS")
        for row in [*findings["views"], *findings["breasts"]]:
            label = row.get("laterality", "") + row.get("view", "") if "view" in row else f"{row['laterality']} breast"
            density = max(row["density"], key=row["density"].get)
            birads = max(row["birads"], key=row["birads"].get)
            line = (f"{label:<10}{row['scores']['malignancy']:11.2f}{row['scores']['mass']:7.2f}"
                    f"{row['scores']['calcification']:7.2f}  {density:<9}{birads}")
            truth = outcome.truth.get(row["laterality"]) if "view" not in row else None
            if truth:
                line += (f"   truth: mass={truth['mass']} calc={truth['calcification']} "
                         f"malignant={truth['malignant']} density={truth['density']}")
            click.echo(line)
        click.echo(f"study suspicion: {findings['suspicion']:.3f}; model {findings['model']['model_version']}")
        if findings["missing_views"]:
            click.echo("missing views: " + ", ".join(findings["missing_views"]))
    click.echo("results written by the node:")
    for path in outcome.result_files:
        click.echo(f"  {path}")
    click.echo("received by the destination (demo PACS):")
    for path in outcome.delivered_files:
        click.echo(f"  {path}")
    click.echo("heatmap overlays:")
    for path in outcome.overlays:
        click.echo(f"  {path}")


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


@db.command("downgrade")
@click.argument("revision")
@click.pass_obj
def db_downgrade(settings: Settings, revision: str) -> None:
    """Undo the migrations after REVISION, to run an older node version on this database.

    REVISION is a migration number such as 0009 (`mammo-node db upgrade` goes back to the newest). Stop the
    node first. Each migration says what its downgrade loses: 0010 empties the content digests of
    instances stored since (BLAKE3, not SHA-256), so that the older node takes a resend of such an instance
    for a changed one and analyses its study again.
    """
    from worklist.db import downgrade, make_engine

    engine = make_engine(settings.database_url())
    try:
        downgrade(engine, revision)
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"database at {engine.url.render_as_string(hide_password=True)} is at revision {revision}")


@main.group()
def config() -> None:
    """The node's settings: an example file with every setting, and the settings in effect."""


@config.command("example")
def config_example() -> None:
    """Print a mammo-node.toml with every setting commented out at its default (deploy/mammo-node.toml).

    \b
      mammo-node config example > /etc/mammo-node/mammo-node.toml
    """
    from dicom_node.config_example import example_toml

    click.echo(example_toml(), nl=False)


@config.command("show")
@click.pass_obj
def config_show(settings: Settings) -> None:
    """Print the settings in effect (file + environment), as JSON, with secrets and passwords hidden."""
    from dicom_node.cli_node import redacted_settings

    click.echo(json.dumps(redacted_settings(settings), indent=2))


for _command in (*COMMANDS, archive, model, train):
    main.add_command(_command)
studies = next(command for command in COMMANDS if command.name == "studies")


if __name__ == "__main__":
    sys.exit(main())
