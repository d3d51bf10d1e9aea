"""``mammo-node`` commands that run and operate the node: serve, worker, echo, send, status, studies,
retry-exports, drift."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import click
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Destination, Settings
from models.errors import NodeError


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


def worklist_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the worklist database, which must be at the newest schema."""
    from worklist.db import make_engine, require_current, session_factory

    engine = make_engine(settings.database_url())
    require_current(engine)
    return session_factory(engine)


@click.command()
@click.option("--worker/--no-worker", "embedded_worker", default=True, show_default=True,
              help="Run an analysis worker beside the SCP (embedded mode). Use --no-worker when separate "
                   "`mammo-node worker` processes serve the queues (production, Redis broker).")
@click.option("--worker-concurrency", default=2, show_default=True, help="Tasks the embedded worker runs at once.")
@click.option("--api/--no-api", "with_api", default=True, show_default=True,
              help="Serve the triage page and HTTP API on MAMMO_API_BIND_HOST:MAMMO_API_PORT (127.0.0.1:8080). "
                   "It refuses every request until MAMMO_API_TOKEN or MAMMO_API_BASIC_USER/PASSWORD is set.")
@click.pass_obj
def serve(settings: Settings, embedded_worker: bool, worker_concurrency: int, with_api: bool) -> None:
    """Run the node: Storage SCP, scheduler and (by default) an analysis worker, until Ctrl-C.

    \b
    Every received instance is fsynced to disk and recorded in the worklist database before the
    node answers Success. A study is analysed once its four views (LCC, RCC, LMLO, RMLO) are in, or
    after MAMMO_STUDY_INACTIVITY_TIMEOUT seconds; its SR and SEGs go to MAMMO_DESTINATIONS.
    Try it with DCMTK:
      /usr/bin/echoscu  -aec MAMMO_AI 127.0.0.1 11112
      /usr/bin/storescu -aec MAMMO_AI 127.0.0.1 11112 study/*.dcm
      mammo-node studies
    On start, every job left QUEUED or RUNNING by a crash is sent again.
    """
    from dicom_node.memory import freeze_startup_objects
    from dicom_node.node import Node
    from dicom_node.serving import NOT_CLINICAL_BANNER
    from worklist.api import serve_api_in_thread

    api = node = None
    try:
        node = Node(settings, embedded_worker=embedded_worker, worker_concurrency=worker_concurrency)
        if settings.model_path is None and embedded_worker:
            from training.demo import ensure_demo_model

            click.echo(NOT_CLINICAL_BANNER, err=True)
            ensure_demo_model(settings.data_dir / "cache")  # trained once, in the foreground, with progress
        freeze_startup_objects()
        node.start()
        if with_api:
            api = serve_api_in_thread(settings, node.sessions)
    except (NodeError, OSError) as error:
        if node is not None and node.server is not None:
            node.stop()
        raise _fail(error) from None
    click.echo(f"{settings.ae_title} listening on {settings.bind_host}:{node.port}"
               f"{' with an embedded worker' if embedded_worker else ''} (Ctrl-C to stop)")
    if api is not None:
        click.echo(f"triage page and API on {api.url}/")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        if api is not None:
            api.stop()
        node.stop()


@click.command()
@click.option("-Q", "--queues", default="gpu,io", show_default=True,
              help="Queues to serve: gpu (analysis; one process per GPU) and/or io (sending results).")
@click.option("-c", "--concurrency", default=1, show_default=True,
              help="Tasks at once. 1 runs them in the main process (one model per process); more uses threads.")
@click.pass_obj
def worker(settings: Settings, queues: str, concurrency: int) -> None:
    """Run a Celery worker for the node's queues (production: one per GPU with -Q gpu, one -Q io).

    \b
    Examples:
      MAMMO_BROKER_URL=redis://127.0.0.1:6379/0 CUDA_VISIBLE_DEVICES=0 mammo-node worker -Q gpu
      MAMMO_BROKER_URL=redis://127.0.0.1:6379/0 mammo-node worker -Q io -c 4
    The model is loaded, and the result writer's helpers started, once, at start, when the gpu queue is
    served.
    """
    from dicom_node.tasks import GPU_QUEUE, configure, context, worker_name

    names = [name.strip() for name in queues.split(",") if name.strip()]
    app = configure(settings)
    if GPU_QUEUE in names:
        if settings.retain_freed_memory:
            from dicom_node.memory import retain_freed_memory

            retain_freed_memory()
        try:
            context().analyzer  # noqa: B018  (load the model before taking the first task)
        except NodeError as error:
            raise _fail(error) from None
        context().start_writer()
    pool = "solo" if concurrency == 1 else "threads"
    quiet = ["--quiet"] if logging.getLevelName(settings.log_level) > logging.INFO else []  # no banner
    app.worker_main([*quiet, "worker", "-Q", ",".join(names), "--pool", pool, "--concurrency", str(concurrency),
                     "--loglevel", settings.log_level, "-n", f"mammo-{worker_name().replace(':', '-')}@%h",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"])


def _peer(settings: Settings, to: str | None, host: str | None, port: int | None, aec: str | None) -> Destination:
    """A configured destination by name, an explicit peer, or the node itself."""
    if to:
        for destination in settings.destinations:
            if destination.name == to:
                return destination
        names = ", ".join(d.name for d in settings.destinations) or "none configured"
        raise click.UsageError(f"no destination named {to!r} (destinations: {names})")
    return Destination(name="peer", ae_title=aec or settings.ae_title, host=host or settings.bind_host,
                       port=port or settings.port)


def _peer_options(function):  # noqa: ANN001
    for option in reversed([
        click.option("--to", help="A configured destination's name (MAMMO_DESTINATIONS)."),
        click.option("--host", help="Peer host (default: this node's bind_host)."),
        click.option("--port", type=int, help="Peer port (default: this node's port)."),
        click.option("--aec", help="Peer (called) AE title (default: this node's AE title)."),
    ]):
        function = option(function)
    return function


@click.command()
@_peer_options
@click.pass_obj
def echo(settings: Settings, to: str | None, host: str | None, port: int | None, aec: str | None) -> None:
    """C-ECHO a peer: the node itself by default, or a destination (--to pacs), or --host/--port/--aec.

    \b
    The DCMTK equivalent: /usr/bin/echoscu -aec MAMMO_AI 127.0.0.1 11112
    """
    from dicom_node.scu import echo as c_echo

    peer = _peer(settings, to, host, port, aec)
    try:
        status = c_echo(peer, settings.ae_title)
    except NodeError as error:
        raise _fail(error) from None
    if status != 0:
        raise click.ClickException(f"C-ECHO to {peer.ae_title}@{peer.host}:{peer.port} returned 0x{status:04X}")
    click.echo(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: success")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_peer_options
@click.pass_obj
def send(settings: Settings, paths: tuple[Path, ...], to: str | None, host: str | None, port: int | None,
         aec: str | None) -> None:
    """C-STORE DICOM files (folders are searched recursively) to the node itself or another peer.

    \b
    Examples:
      mammo-node synth study --studies 1 --size 1024x832 && mammo-node send study
      mammo-node send results/ --to pacs
    The DCMTK equivalent: /usr/bin/storescu -aec MAMMO_AI +sd 127.0.0.1 11112 study/
    """
    from dicom_node.scu import send_files

    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()
                    and f.suffix.lower() in {".dcm", ""}})
    peer = _peer(settings, to, host, port, aec)
    try:
        outcomes = send_files(peer, files, settings.ae_title)
    except (NodeError, OSError) as error:
        raise _fail(error) from None
    failed = [o for o in outcomes if not o.stored]
    for outcome in failed:
        click.echo(f"{outcome.path}: {outcome.describe()}", err=True)
    click.echo(f"sent {len(outcomes) - len(failed)} of {len(files)} file(s) to {peer.ae_title}@{peer.host}:"
               f"{peer.port}")
    if failed:
        raise click.exceptions.Exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def status(settings: Settings, as_json: bool) -> None:
    """Counts of studies, jobs and exports by state, and where the node keeps things."""
    from worklist.queries import node_status

    try:
        report = node_status(worklist_sessions(settings))
    except NodeError as error:
        raise _fail(error) from None
    from dicom_node.tasks import broker_url

    report["database"] = _redacted(settings.database_url())
    report["broker"] = _redacted(broker_url(settings))
    report["destinations"] = [f"{d.name}={d.ae_title}@{d.host}:{d.port}" for d in settings.destinations]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:<13}{value if not isinstance(value, dict) else _counts(value)}")


def redacted_settings(settings: Settings) -> dict[str, object]:
    """The settings as JSON values; tokens and passwords replaced by ``***``, URLs without their password."""
    values = settings.model_dump(mode="json")
    for name, value in values.items():
        if value and ("token" in name or "password" in name):
            values[name] = "***"
        elif value and name.endswith("_url"):
            values[name] = _redacted(value)
    return values


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


@click.command()
@click.option("--limit", default=50, show_default=True, help="How many studies to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def studies(settings: Settings, limit: int, as_json: bool) -> None:
    """The triage list: analysed studies by suspicion (highest first), then waiting and failed ones.

    Patient names and IDs are never shown; studies are listed by accession and Study Instance UID.
    """
    from worklist.queries import triage_list

    try:
        rows = triage_list(worklist_sessions(settings), limit)
    except NodeError as error:
        raise _fail(error) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'#':>3}  {'suspicion':>9}  {'state':<10}{'accession':<17}{'views':<19}{'exports':<22}study UID")
    for rank, row in enumerate(rows, start=1):
        score = f"{row['suspicion']:.3f}" if row["suspicion"] is not None else "-"
        views = ",".join(row["views"]) or "-"
        click.echo(f"{rank:>3}  {score:>9}  {row['state']:<10}{row['accession'] or '-':<17}{views:<19}"
                   f"{_counts(row['exports']):<22}{row['study_instance_uid']}")


@click.command("retry-exports")
@click.pass_obj
def retry_exports(settings: Settings) -> None:
    """Send every FAILED export again (the running node's scheduler picks them up within a second).

    Delivered objects are never sent again.
    """
    from worklist.exports import retry_failed

    try:
        count = retry_failed(worklist_sessions(settings))
    except NodeError as error:
        raise _fail(error) from None
    click.echo(f"{count} failed export(s) queued again")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def drift(settings: Settings, as_json: bool) -> None:
    """Suspicion-score drift: per model version and ISO week (UTC), the results, their mean score and the PSI
    of their distribution against the version's reference week.

    \b
    The reference is the version's first full week with at least MAMMO_DRIFT_MIN_STUDIES results; a PSI
    above MAMMO_DRIFT_PSI_THRESHOLD (0.2) is a significant shift, which the running node logs as a warning.
    """
    from worklist.drift import drift_report

    try:
        report = drift_report(worklist_sessions(settings), settings)
    except NodeError as error:
        raise _fail(error) from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    width = max((len(version.version) for version in report.versions), default=13) + 2
    click.echo(f"{'model version':<{width}}{'week':<10}{'results':>8}{'mean':>8}{'PSI':>8}")
    for version in report.versions:
        for week in version.weeks:
            psi = "-" if week.psi is None else f"{week.psi:.3f}"
            mark = "reference" if week == version.reference else "DRIFT" if report.over(week) else ""
            click.echo(f"{version.version:<{width}}{week.week:<10}{week.n:>8}{week.mean:>8.3f}{psi:>8}  {mark}")
    click.echo(f"PSI threshold {report.threshold:g}; weeks with fewer than {report.min_studies} results are not "
               f"compared; model in service: {report.in_service or '-'}")
    if alert := report.alert():
        click.echo(alert)


COMMANDS = (serve, worker, echo, send, status, studies, retry_exports, drift)
