"""The reliability suite's machinery: synthetic studies, node processes, private Redis/PostgreSQL, real senders
(/usr/bin/storescu and pynetdicom) that retry like a modality does, and the instance-by-instance verification
that turns a run into one table ``Row``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicom_node.settings import Settings
from dicom_node.storage import content_digest, file_digest
from models import save_model_version
from tests.conftest import _postgres_admin_url, free_port, require_tool, tiny_model
from tests.peers import StoreSCP, wait_for_port
from tests.test_node_e2e import SEG_CLASS, SR_CLASS, node_settings
from tests.test_production_mode import Processes
from training.synthetic import write_studies
from worklist.db import make_engine, session_factory
from worklist.models import Export, ExportState, Instance, Job, JobState, Study, StudyState

ROWS, COLS = 256, 208  # small images: the suite measures the plumbing, not the model


# ---------------------------------------------------------------------------------------------- the studies


@dataclass(frozen=True)
class SyntheticStudy:
    """One four-view study on disk, with the UIDs a verification needs."""

    study_uid: str
    files: tuple[Path, ...]
    sop_uids: tuple[str, ...]


def make_studies(folder: Path, count: int, seed: int = 4242, distinct: int = 8) -> list[SyntheticStudy]:
    """``count`` four-view studies: ``distinct`` phantoms from ``training.synthetic``, the rest copies of them
    with new study, series and instance UIDs, patient ID and accession (so each is its own study)."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = min(distinct, count)
    write_studies(folder / "phantoms", distinct, seed=seed, rows=ROWS, cols=COLS, progress=False)
    phantoms = [sorted(d.glob("*.dcm")) for d in sorted((folder / "phantoms").iterdir()) if d.is_dir()]
    studies = []
    for index in range(count):
        source = phantoms[index % distinct]
        if index < distinct:
            files = source
        else:
            out = folder / f"copy{index:05d}"
            out.mkdir(exist_ok=True)
            study_uid, series = generate_uid(), {}
            files = []
            for path in source:
                ds = pydicom.dcmread(path)
                ds.StudyInstanceUID = study_uid
                ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), generate_uid())
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.PatientID = f"REL{index:07d}"
                ds.AccessionNumber = f"R{index:07d}"
                files.append(out / path.name)
                ds.save_as(files[-1], enforce_file_format=True)
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
        studies.append(SyntheticStudy(str(headers[0].StudyInstanceUID), tuple(files),
                                      tuple(str(h.SOPInstanceUID) for h in headers)))
    return studies


def model_versions(folder: Path) -> dict[str, Path]:
    """The tiny model every scenario serves (random weights: the scores mean nothing, the plumbing is real)."""
    return {"tiny": save_model_version(tiny_model(), folder / "tiny")}


# ------------------------------------------------------------------------------------ servers and processes


class RedisServer:
    """A private redis-server on a free port, its data in ``folder``: append-only file fsynced on every write,
    so queued (and unacked) messages survive a kill -9 and restart."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = require_tool("/usr/bin/redis-server")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--appendonly",
             "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=(self.folder / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process, "redis-server")
        return self

    def kill(self) -> None:
        """kill -9: no shutdown save; what survives is what the AOF already holds."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def postgres_available() -> bool:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    engine = create_engine(_postgres_admin_url())
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards), as tests/conftest.py's ``db_url`` fixture makes one.
    Fails (pytest.fail / pytest.skip outside CI) when the server is absent."""
    import pytest
    from sqlalchemy import create_engine, text

    from tests.conftest import IN_CI

    if not postgres_available():
        message = f"PostgreSQL is not reachable at {_postgres_admin_url()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    admin = create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
    name = f"mammo_rel_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield _postgres_admin_url().rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def terminate_backends(db_url: str) -> int:
    """pg_terminate_backend on every connection to ``db_url``'s database but this one; how many were cut."""
    from sqlalchemy import create_engine, text

    name = db_url.rsplit("/", 1)[1]
    admin = create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            return len(connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name "
                "AND pid <> pg_backend_pid()"), {"name": name}).all())
    finally:
        admin.dispose()


class Cluster(Processes):
    """``mammo-node`` processes (tests/test_production_mode.py's ``Processes``), each in its own session so that
    a crash can take a process and its children (the embedded worker) at once; logs are appended across
    restarts."""

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.running[name] = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", *args], env=self.env,
                                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.running[name]

    def kill(self, name: str, group: bool = True) -> int:
        """SIGKILL the process (and, with ``group``, every process of its session); returns its pid."""
        process = self.running[name]
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait(30)
        return process.pid

    def stop(self) -> None:
        super().stop()
        for process in self.running.values():  # an embedded worker left behind by its node
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def environment(settings: Settings) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MAMMO_")}, **settings.to_env(),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def make_settings(folder: Path, model: Path, pacs: StoreSCP, db_url: str | None = None,
                  broker_url: str | None = None, **overrides: object) -> Settings:
    """tests/test_node_e2e.py's ``node_settings`` (data dir, migrated DB, the PACS as destination) with the
    suite's overrides (anything, including the e2e defaults) applied on top."""
    base = {key: overrides.pop(key) for key in list(overrides) if key in {
        "study_settle_seconds", "job_stale_seconds", "export_backoff_seconds"}}
    settings = node_settings(folder, model, pacs, db_url=db_url, broker_url=broker_url, **overrides)
    return settings.model_copy(update=base) if base else settings


def start_node(cluster: Cluster, settings: Settings, embedded_worker: bool = True) -> subprocess.Popen:
    """``mammo-node serve`` (with or without its embedded worker), once it listens."""
    args = ["serve", "--no-api"] + ([] if embedded_worker else ["--no-worker"])
    process = cluster.start("node", *args)
    wait_for_port(settings.port, process, "the node", timeout=120)
    return process


# ------------------------------------------------------------------------------------------------- senders


@dataclass
class SendLog:
    """What one sender saw: associations refused (A-ASSOCIATE-RJ or aborted/refused connection) and
    instances answered with a failure status (or no answer), each of which it sent again."""

    refused: int = 0
    rejected: int = 0          # of which A-ASSOCIATE-RJ
    failed_statuses: Counter = field(default_factory=Counter)
    associations: int = 0
    confirmed: set[Path] = field(default_factory=set)
    unconfirmed: list[Path] = field(default_factory=list)


class Sender(threading.Thread):
    """A modality: sends its files over one association, and sends what was not confirmed again (after a
    backoff) until everything is confirmed or ``deadline`` (seconds) passes."""

    def __init__(self, name: str, port: int, called_ae: str, files: list[Path], deadline: float = 600.0,
                 hold: threading.Event | None = None, resend_all: bool = False, max_tries: int | None = None,
                 pace: float = 0.0) -> None:
        super().__init__(name=name, daemon=True)
        self.calling = name[:16]
        self.port, self.called = port, called_ae
        self.files = list(files)
        self.deadline = time.monotonic() + deadline
        self.hold = hold                   # after its first association sent everything: keep it open until set
        self.resend_all = resend_all       # after a failure send the whole batch again (a re-run), not the rest
        self.max_tries = max_tries
        self.pace = pace                   # seconds between two C-STOREs (pynetdicom): a sender that takes a while
        self.established = threading.Event()
        self.was_refused = threading.Event()
        self.log = SendLog()

    def run(self) -> None:
        pending, backoff, tries = list(self.files), 0.2, 0
        while pending and time.monotonic() < self.deadline and (self.max_tries is None or tries < self.max_tries):
            tries += 1
            confirmed = self.send_once(pending)
            self.log.confirmed |= confirmed
            left = [p for p in pending if p not in confirmed]
            if left and self.resend_all and confirmed != set(pending):
                left = list(self.files)
            pending = left
            if pending:
                time.sleep(backoff)
                backoff = min(backoff * 2, 3.0)
        self.log.unconfirmed = [p for p in self.files if p not in self.log.confirmed]

    def send_once(self, files: list[Path]) -> set[Path]:
        raise NotImplementedError

    def release_hold(self, keep_alive: Callable[[], object]) -> None:
        """Keep the association open until ``hold`` is set (at most 5 min), with a C-ECHO every 10 s so that the
        SCP's 60 s idle timeout never closes it: under load the 8 may take a while to be all in."""
        deadline = time.monotonic() + 300
        while self.hold is not None and not self.hold.wait(timeout=10) and time.monotonic() < deadline:
            keep_alive()


class PynetdicomSender(Sender):
    def send_once(self, files: list[Path]) -> set[Path]:
        headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in files}
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(Verification)  # the keep-alive of a held association
        for pair in sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers.values()}):
            ae.add_requested_context(*pair)
        try:
            assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called)
        except Exception:  # a refused connection
            self._refused(rejected=False)
            return set()
        if not assoc.is_established:
            self._refused(rejected=assoc.is_rejected)
            return set()
        self.log.associations += 1
        self.established.set()
        confirmed = set()
        try:
            for path in files:
                time.sleep(self.pace)
                try:
                    status = assoc.send_c_store(path)
                except Exception:
                    status = None
                code = int(status.Status) if status is not None and "Status" in status else None
                if code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF):
                    confirmed.add(path)
                    continue
                self.log.failed_statuses["no answer" if code is None else f"0x{code:04X}"] += 1
                if code is None or not assoc.is_established:
                    break
            if assoc.is_established and len(confirmed) == len(files):
                self.release_hold(assoc.send_c_echo)
        finally:
            if assoc.is_established:
                assoc.release()
        return confirmed

    def _refused(self, rejected: bool) -> None:
        self.log.refused += 1
        self.log.rejected += rejected
        self.was_refused.set()


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


class StorescuSender(Sender):
    """DCMTK's /usr/bin/storescu; which files were stored is read from its ``-v`` log."""

    def send_once(self, files: list[Path]) -> set[Path]:
        try:
            result = subprocess.run([require_tool("/usr/bin/storescu"), "-v", "-aet", self.calling, "-aec",
                                     self.called, "127.0.0.1", str(self.port), *map(str, files)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
            output = result.stdout
        except subprocess.TimeoutExpired as error:
            output = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else \
                (error.stdout or "")
        confirmed, current = set(), None
        for line in output.splitlines():
            if match := _SENDING.search(line):
                current = Path(match.group(1).strip())
            elif (match := _RESPONSE.search(line)) and current is not None:
                answer = match.group(1)
                if answer.startswith(("Success", "Warning")):
                    confirmed.add(current)
                else:
                    self.log.failed_statuses[answer.split(":")[0]] += 1
                current = None
        if "Association Accepted" in output:
            self.log.associations += 1
            self.established.set()
        elif "Association Rejected" in output or "Association Request Failed" in output:
            self.log.refused += 1
            self.log.rejected += "Association Rejected" in output
            self.was_refused.set()
        if current is not None:  # sent, never answered: the association died
            self.log.failed_statuses["no answer"] += 1
        return confirmed


def run_senders(senders: list[Sender]) -> list[Sender]:
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    return senders


def split(studies: list[SyntheticStudy], parts: int) -> list[list[Path]]:
    """The studies' files dealt round robin by study into ``parts`` batches (a study stays in one batch)."""
    batches: list[list[Path]] = [[] for _ in range(parts)]
    for index, study in enumerate(studies):
        batches[index % parts].extend(study.files)
    return batches


# ---------------------------------------------------------------------------------------------- verifying


@dataclass
class Row:
    """One line of the table. ``lost``: sent instances not (stored and analysed and delivered);
    ``duplicates``: extra copies of a study's SR or of a SEG at the destination."""

    scenario: str
    sent: int = 0
    stored: int = 0
    analysed: int = 0
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and not self.problems and self.sent > 0


def finished(sessions, study_uids: set[str]) -> bool:
    """Every study is settled: ANALYSED/FAILED, its newest job DONE/FAILED, none of that job's exports PENDING."""
    with sessions() as session:
        studies = {s.study_instance_uid: s for s in session.scalars(
            select(Study).where(Study.study_instance_uid.in_(study_uids)))}
        if set(studies) != study_uids or any(s.state not in (StudyState.ANALYSED, StudyState.FAILED)
                                             for s in studies.values()):
            return False
        ids = [s.id for s in studies.values()]
        jobs = {}
        for job in session.scalars(select(Job).where(Job.study_id.in_(ids)).order_by(Job.id)):
            jobs[job.study_id] = job
        if len(jobs) != len(ids) or any(j.state not in (JobState.DONE, JobState.FAILED) for j in jobs.values()):
            return False
        pending = session.scalar(select(Export.id).where(Export.job_id.in_([j.id for j in jobs.values()]),
                                                         Export.state == ExportState.PENDING))
        return pending is None


def wait_until_finished(settings: Settings, studies: list[SyntheticStudy], timeout: float) -> bool:
    engine = make_engine(settings.database_url())
    sessions = session_factory(engine)
    uids = {s.study_uid for s in studies}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                if finished(sessions, uids):
                    return True
            except Exception:  # the database is being cut in this scenario: look again
                pass
            time.sleep(1.0)
        return False
    finally:
        engine.dispose()


def count_instances(settings: Settings) -> int:
    from sqlalchemy import func

    engine = make_engine(settings.database_url())
    try:
        with session_factory(engine)() as session:
            return session.scalar(select(func.count()).select_from(Instance)) or 0
    finally:
        engine.dispose()


def complete_instance(path: Path) -> bool:
    """Whether a file is a whole DICOM instance: it parses and its pixel data has every byte."""
    try:
        ds = pydicom.dcmread(path)
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        return len(ds.PixelData) >= expected
    except Exception:
        return False


def storage_problems(settings: Settings, after_crash: bool = False) -> list[str]:
    """What a crash must never leave visible: a file under incoming/ that is not a complete, recorded instance
    (temporary ``.*.part`` names excepted), or a row whose file is missing or differs from what was recorded.
    ``after_crash``: a complete file without its row is allowed (renamed, not yet committed: the sender got no
    Success and sends it again), a partial one is not."""
    root = settings.incoming_dir
    engine = make_engine(settings.database_url())
    try:
        with session_factory(engine)() as session:
            rows = {row.path: row.content_digest for row in session.scalars(select(Instance))}
    finally:
        engine.dispose()
    problems = []
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()
    temporary = {p for p in on_disk if Path(p).name.startswith(".") and p.endswith(".part")}
    strays = sorted(on_disk - temporary - set(rows))
    if after_crash:
        strays = [path for path in strays if not (path.endswith(".dcm") and complete_instance(root / path))]
    if strays:
        problems.append(f"{len(strays)} file(s) under incoming/ with no row, e.g. {strays[0]}")
    bad = [path for path, digest in rows.items()
           if path not in on_disk or file_digest(root / path) != digest]
    if bad:
        problems.append(f"{len(bad)} row(s) without their complete file, e.g. {bad[0]}")
    return problems


def verify(scenario: str, settings: Settings, pacs_folder: Path, studies: list[SyntheticStudy]) -> Row:
    """Instance by instance: on disk (bytes as recorded), in the DB, analysed (its study's newest job DONE),
    and delivered (its study's SR and a SEG referencing it at the destination, all exports DELIVERED);
    duplicates: extra copies of an SR per study or of a SEG per source instance at the destination."""
    row = Row(scenario)
    root = settings.incoming_dir
    engine = make_engine(settings.database_url())
    try:
        with session_factory(engine)() as session:
            instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
            study_rows = {s.study_instance_uid: s for s in session.scalars(select(Study))}
            newest: dict[int, Job] = {}
            for job in session.scalars(select(Job).order_by(Job.id)):
                newest[job.study_id] = job
            exports_done = {}
            for job in newest.values():
                states = set(session.scalars(select(Export.state).where(Export.job_id == job.id)))
                exports_done[job.id] = bool(states) and states == {ExportState.DELIVERED}
    finally:
        engine.dispose()
    srs: Counter = Counter()
    segs: Counter = Counter()
    for path in sorted(pacs_folder.iterdir()) if pacs_folder.exists() else []:
        if not path.is_file():
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.SOPClassUID) == SR_CLASS:
            srs[str(ds.StudyInstanceUID)] += 1
        elif str(ds.SOPClassUID) == SEG_CLASS:
            for series in ds.get("ReferencedSeriesSequence", []):
                for item in series.ReferencedInstanceSequence:
                    segs[str(item.ReferencedSOPInstanceUID)] += 1
    sent_sops = {sop for study in studies for sop in study.sop_uids}
    row.duplicates = sum(n - 1 for n in srs.values() if n > 1) + sum(n - 1 for uid, n in segs.items()
                                                                      if n > 1 and uid in sent_sops)
    unrelated = set(srs) - {s.study_uid for s in studies}
    if unrelated:
        row.problems.append(f"{len(unrelated)} SR(s) at the destination for studies never sent")
    for study in studies:
        srow = study_rows.get(study.study_uid)
        job = newest.get(srow.id) if srow is not None else None
        analysed = job is not None and job.state == JobState.DONE and srow.state == StudyState.ANALYSED
        delivered_study = analysed and exports_done.get(job.id, False) and srs[study.study_uid] >= 1
        for path, sop in zip(study.files, study.sop_uids, strict=True):
            row.sent += 1
            instance = instances.get(sop)
            file = root / instance.path if instance is not None else None
            data = file.read_bytes() if file is not None and file.is_file() else b""
            stored = srow is not None and instance is not None and instance.study_id == srow.id and \
                content_digest([data]) == instance.content_digest and data.endswith(path.read_bytes()[-4096:])
            row.stored += stored
            row.analysed += stored and analysed
            delivered = stored and delivered_study and segs[sop] >= 1
            row.delivered += delivered
            row.lost += not delivered
    return row


def finish_row(row: Row, senders: list[Sender], started: float) -> Row:
    """Add what the senders saw to the row's notes (refusals, failure statuses, what stayed unconfirmed)."""
    refused = sum(s.log.refused for s in senders)
    rejected = sum(s.log.rejected for s in senders)
    failures: Counter = Counter()
    for sender in senders:
        failures.update(sender.log.failed_statuses)
    unconfirmed = sum(len(s.log.unconfirmed) for s in senders)
    if refused:
        row.notes.append(f"{refused} association(s) refused ({rejected} A-ASSOCIATE-RJ), then retried")
    if failures:
        row.notes.append("failed C-STOREs resent: " + ", ".join(f"{k} x{v}" for k, v in sorted(failures.items())))
    if unconfirmed:
        row.problems.append(f"{unconfirmed} instance(s) the senders never got a Success for")
    row.seconds = time.monotonic() - started
    return row


def unexpected(error: BaseException) -> bool:
    """Whether an exception is a real error rather than a pytest skip (tool/service absent)."""
    import pytest

    return not isinstance(error, pytest.skip.Exception)


Fault = Callable[[], None]


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
