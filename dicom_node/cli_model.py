"""``mammo-node model``: the registry of model versions the node serves."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dicom_node.cli_node import worklist_sessions
from dicom_node.settings import Settings
from models.errors import NodeError


def _run(action):  # noqa: ANN001  (a callable returning what to print)
    try:
        return action()
    except NodeError as error:
        raise click.ClickException(str(error)) from None


@click.group()
def model() -> None:
    """Register, inspect, activate and roll back the model versions the node serves.

    \b
    The active version is served by every worker from its next job on, without a restart; with no
    active version the node serves MAMMO_MODEL_PATH (or the demo model). Each result records the
    version that produced it, and the SR names it.
      mammo-node model register runs/pretrain-2026-11/model --name site-b5-v1
      mammo-node model register /models/b5.tar --text-encoder /models/Bio_ClinicalBERT
      mammo-node model register runs/pretrain-2026-11/model --name site-b5-v2 \\
          --head runs/finetune-mass --head runs/finetune-density
      mammo-node model activate site-b5-v1
      mammo-node model rollback
    """


@model.command("register")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="Version name (default: the card's name and the weights hash).")
@click.option("--text-encoder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local text-encoder directory, for a reference .tar checkpoint.")
@click.option("--head", "heads", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A head folder written by `mammo-node train finetune`, trained on PATH's encoder; its scores "
                   "replace the zero-shot ones for its target. Repeat for several targets.")
@click.option("--multiview", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A four-view fusion model folder (`mammo-node train multiview`); it gives the study "
                   "score (suspicion) in place of the highest breast probability.")
@click.option("--detector", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A lesion detector folder (`mammo-node train detector`): its boxes go into the SR.")
@click.option("--factor", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Mammo-FActOR projectors trained on PATH's encoder (`mammo-node train factor`): their "
                   "attribute maps go into each view's SEG as their own segments.")
@click.pass_obj
def register_command(settings: Settings, path: Path, name: str | None, text_encoder: Path | None,
                     heads: tuple[Path, ...], multiview: Path | None, detector: Path | None,
                     factor: Path | None) -> None:
    """Check that PATH loads (a model-version folder or a reference .tar), and that each --head fits it, and add
    them to the registry as one version."""
    from training.registry import register

    version = _run(lambda: register(worklist_sessions(settings), path, name, text_encoder, heads, multiview,
                                    detector, factor))
    click.echo(f"registered {version.name} ({version.sha256[:12]}) from {version.path}")
    for target, folder in (version.heads or {}).items():
        click.echo(f"  trained {target} head: {folder}")
    for label, folder in (("four-view fusion model (study score)", version.multiview_path),
                          ("lesion detector (SR regions)", version.detector_path),
                          ("Mammo-FActOR (SEG segments)", version.factor_path)):
        if folder:
            click.echo(f"  {label}: {folder}")


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_command(settings: Settings, as_json: bool) -> None:
    """Every registered version; the active one is marked with *."""
    from training.registry import versions

    rows = versions(worklist_sessions(settings))
    if as_json:
        click.echo(json.dumps([{"name": v.name, "active": v.active, "sha256": v.sha256, "path": v.path,
                                "heads": v.heads or {}, "clinical_use": bool(v.card.get("clinical_use", False)),
                                "rolled_back_at": v.rolled_back_at.isoformat() if v.rolled_back_at else None}
                               for v in rows], indent=2))
        return
    if not rows:
        click.echo("no registered model versions: the node serves MAMMO_MODEL_PATH or the demo model")
    for version in rows:
        clinical = "" if version.card.get("clinical_use") else "  (not for clinical use)"
        heads = f"  heads: {', '.join(version.heads)}" if version.heads else ""
        retired = f"  (rolled back {version.rolled_back_at:%Y-%m-%d %H:%M})" if version.rolled_back_at else ""
        click.echo(f"{'*' if version.active else ' '} {version.name:<32} {version.sha256[:12]}  "
                   f"{version.created_at:%Y-%m-%d %H:%M}  {version.path}{heads}{clinical}{retired}")


@model.command("show")
@click.argument("name")
@click.pass_obj
def show_command(settings: Settings, name: str) -> None:
    """The version's card: training data summary, metrics, intended use."""
    from training.registry import get_version

    version = _run(lambda: get_version(worklist_sessions(settings), name))
    click.echo(json.dumps({"name": version.name, "active": version.active, "path": version.path,
                           "sha256": version.sha256, "text_encoder_path": version.text_encoder_path,
                           "heads": version.heads or {}, "multiview": version.multiview_path,
                           "detector": version.detector_path, "factor": version.factor_path,
                           "card": version.card}, indent=2, default=str))


@model.command("activate")
@click.argument("name")
@click.pass_obj
def activate_command(settings: Settings, name: str) -> None:
    """Serve NAME from the workers' next job on."""
    from training.registry import activate

    version = _run(lambda: activate(worklist_sessions(settings), name))
    click.echo(f"{version.name} is active; workers load it before their next job")


@model.command("rollback")
@click.pass_obj
def rollback_command(settings: Settings) -> None:
    """Re-activate the version that was active before the current one.

    The current one is marked rolled back: a second rollback goes further back, never to it (activate it by
    name to serve it again)."""
    from training.registry import rollback

    version = _run(lambda: rollback(worklist_sessions(settings)))
    click.echo(f"rolled back: {version.name} is active again")
