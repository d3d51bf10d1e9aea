"""``mammo-node archive``: index a site's archive of screening studies and reports, and convert it for training."""

from __future__ import annotations

from pathlib import Path

import click

from dicom_node.settings import Settings
from models.errors import NodeError


def _index_location(settings: Settings, index: str | None) -> str:
    return index or str(settings.data_dir / "archive")


@click.group()
def archive() -> None:
    """Index a local archive of screening mammograms and reports, and convert it for training.

    \b
    All of it stays on this machine. Typical use:
      mammo-node archive index /pacs-export --reports ris_reports.csv
      mammo-node archive convert --workers 8
      mammo-node archive show
    The index is an SQLite file under MAMMO_DATA_DIR/archive/ (or a database URL with --index).
    """


@archive.command("index")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--reports", type=click.Path(exists=True, path_type=Path),
              help="Reports: a CSV or JSON-lines file keyed by AccessionNumber or StudyInstanceUID, or a folder "
                   "of <accession>.txt files. Text SR objects found under ROOT are read too.")
@click.option("--labels", "label_table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Label CSV, its layout told by its header: VinDr-Mammo (breast-level_annotations.csv, or "
                   "finding_annotations.csv for mass and calcification too), RSNA (train.csv), or study_instance_uid/"
                   "accession_number, laterality, mass, calcification, malignant, density, birads. Rows are matched "
                   "by image file name (VinDr/RSNA image_id), then study folder name (study_id/patient_id), then "
                   "study UID or accession; they win over labels read from reports.")
@click.option("--index", help="Index folder, .sqlite file or database URL (default: MAMMO_DATA_DIR/archive).")
@click.option("--seed", default=0, show_default=True, help="Seed of the patient split (fixed at the first run).")
@click.pass_obj
def index_command(settings: Settings, root: Path, reports: Path | None, label_table: Path | None,
                  index: str | None, seed: int) -> None:
    """Index every DICOM file under ROOT (any nesting) and pair each study with its report.

    Screening views (CC/MLO, MG For Presentation or For Processing) are indexed; anything else is
    skipped and counted with its reason. Labels (BI-RADS, density, mass, calcification, side) are read
    from the report text, or taken from --labels; a study labelled there that has no report gets a
    report-style text synthesized from its labels. Patients are split train/validation/test (70/10/20,
    stratified by findings). Running it again adds what is new and keeps every patient's split.
    """
    from training.archive.indexer import index_archive
    from training.archive.store import open_index

    try:
        summary = index_archive(root, open_index(_index_location(settings, index)), reports, label_table, seed)
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    for line in summary.lines():
        click.echo(line)


@archive.command("convert")
@click.option("--index", help="Index folder, .sqlite file or database URL (default: MAMMO_DATA_DIR/archive).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the converted images go (default: MAMMO_DATA_DIR/archive/cache).")
@click.option("--size", default="1520x912", show_default=True, help="Model input HEIGHTxWIDTH.")
@click.option("--workers", type=int, help="Processes (default: all cores).")
@click.option("--retry-failed", is_flag=True, help="Try again the images that failed to convert before.")
@click.option("--voi/--no-voi", "apply_voi", default=False, show_default=True,
              help="Start from the VOI-windowed pixels: only for training from a model version this node trained "
                   "before the reference's unwindowed input became the default (`model show` has no apply_voi "
                   "in its config); reference checkpoints and new models read unwindowed pixels.")
@click.pass_obj
def convert_command(settings: Settings, index: str | None, cache_dir: Path | None, size: str, workers: int | None,
                    retry_failed: bool, apply_voi: bool) -> None:
    """Turn each indexed image into the model's uint8 input once, with the preprocessing inference uses.

    Resumable and idempotent: only images without a current cache file are converted. Conversions with and
    without --voi, or at another --size, are kept apart.
    """
    from dicom_node.cli import parse_size
    from models.preprocess import PreprocessConfig
    from training.archive.store import open_index
    from training.convert import convert_archive

    height, width = parse_size(size)
    try:
        sessions = open_index(_index_location(settings, index), create=False)
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    folder = cache_dir or settings.data_dir / "archive" / "cache"
    summary = convert_archive(sessions, folder, PreprocessConfig(height=height, width=width, apply_voi=apply_voi),
                              workers, retry_failed)
    click.echo(f"converted {summary.converted}, failed {summary.failed}, reused from an earlier conversion at these "
               f"settings {summary.reused}, already done or failed before {summary.already_current}; "
               f"cache: {summary.cache_folder}")
    if summary.failed:
        click.echo("failed images keep their reason in the index (`mammo-node archive show --failures`); "
                   "--retry-failed tries them again")


@archive.command("show")
@click.option("--index", help="Index folder, .sqlite file or database URL (default: MAMMO_DATA_DIR/archive).")
@click.option("--failures", is_flag=True, help="List images that failed to convert, with the reason.")
@click.pass_obj
def show_command(settings: Settings, index: str | None, failures: bool) -> None:
    """Counts of the index: studies and images per split, labels, reports, conversions, skipped files."""
    from training.archive.overview import describe_index, failed_conversions
    from training.archive.store import open_index

    try:
        sessions = open_index(_index_location(settings, index), create=False)
    except NodeError as error:
        raise click.ClickException(str(error)) from None
    for line in describe_index(sessions):
        click.echo(line)
    if failures:
        for uid, reason in failed_conversions(sessions):
            click.echo(f"  {uid}: {reason}")
