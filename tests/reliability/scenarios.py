"""The scenarios. Each starts its own node (a real ``mammo-node`` process), destination PACS (DCMTK storescp,
one file per received object) and, for production mode, a private Redis and a fresh PostgreSQL database; sends
real studies from real clients; applies its fault; waits until every study is settled; and verifies instance by
instance (``harness.verify``). ``full`` selects the long version."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from dicom_node.settings import Settings
from tests.peers import StoreSCP
from tests.reliability.harness import (
    Cluster,
    PynetdicomSender,
    RedisServer,
    Row,
    Sender,
    StorescuSender,
    SyntheticStudy,
    count_instances,
    environment,
    finish_row,
    make_settings,
    postgres_database,
    run_senders,
    split,
    start_node,
    storage_problems,
    terminate_backends,
    verify,
    wait_until_finished,
)
from worklist.db import make_engine, session_factory
from worklist.models import Export, ExportState, Job, JobState

MIB = 1024 * 1024


@dataclass
class Suite:
    """What every scenario shares: a work folder, the model, a pool of studies, and the version to run."""

    work: Path
    model: Path
    pool: list[SyntheticStudy]
    full: bool = False

    def folder(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def studies(self, short: int, full: int) -> list[SyntheticStudy]:
        count = full if self.full else short
        if count > len(self.pool):
            raise ValueError(f"the pool has {len(self.pool)} studies, the scenario needs {count}")
        return self.pool[:count]  # every scenario has its own node, database and PACS: the same studies do


def _settle(settings, studies: list[SyntheticStudy], timeout: float, row_name: str, pacs: StoreSCP,
            senders: list[Sender], started: float, quiet: float = 3.0) -> Row:
    """Wait for every study to be settled, give a duplicate the time to show up, then verify."""
    settled = wait_until_finished(settings, studies, timeout)
    time.sleep(quiet)  # nothing more may arrive at the PACS once everything is DELIVERED
    row = verify(row_name, settings, pacs.folder, studies)
    if not settled:
        row.problems.append(f"not settled after {timeout:.0f} s (a hang)")
    return finish_row(row, senders, started)


def _wait(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # a database being cut: look again
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------------------------ 1. load


def load(suite: Suite) -> Row:
    """1000+ (short: 96) instances over 8 concurrent pynetdicom associations (``maximum_associations`` = 8),
    while three more senders (two /usr/bin/storescu, one pynetdicom) ask for associations over the limit: each
    is refused (A-ASSOCIATE-RJ) at least once, then gets in on a retry once the 8 release."""
    started = time.monotonic()
    studies = suite.studies(24, 264)
    folder = suite.folder("load")
    pacs = StoreSCP(folder / "pacs", unique_filenames=True).start()
    settings = make_settings(folder, suite.model, pacs, maximum_associations=8, study_settle_seconds=0.5)
    cluster = Cluster(environment(settings), folder)
    try:
        start_node(cluster, settings)
        batches = split(studies, 11)
        hold = threading.Event()
        holders = [PynetdicomSender(f"LOAD{i}", settings.port, settings.ae_title, batches[i], hold=hold)
                   for i in range(8)]
        for sender in holders:
            sender.start()
        _wait(lambda: all(s.established.is_set() for s in holders), 120, "8 associations established")
        extras: list[Sender] = [
            StorescuSender("OVER_DCMTK1", settings.port, settings.ae_title, batches[8]),
            StorescuSender("OVER_DCMTK2", settings.port, settings.ae_title, batches[9]),
            PynetdicomSender("OVER_PYNETDICOM", settings.port, settings.ae_title, batches[10])]
        for sender in extras:
            sender.start()
        refused_all = _refused(extras, timeout=90)
        hold.set()  # the 8 release; the extras get in on their next try
        for sender in holders + extras:
            sender.join()
        senders = holders + extras
        row = _settle(settings, studies, 300 + 6 * len(studies), "load", pacs, senders, started)
        row.notes.insert(0, f"8 concurrent associations + 3 over maximum_associations=8 "
                            f"({sum(len(b) for b in batches[8:])} instances from the 3)")
        if not refused_all:
            row.problems.append("an association over maximum_associations was not refused")
        return row
    finally:
        cluster.stop()
        pacs.stop()


def _refused(senders: list[Sender], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.was_refused.is_set() for s in senders):
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------------------------------- 2. worker kill


Production = tuple[Settings, Cluster, StoreSCP, str, RedisServer]


@contextmanager
def _production(suite: Suite, folder: Path, **overrides: object) -> Iterator[Production]:
    """The node (`serve --no-worker`), a gpu-queue worker and an io-queue worker as three processes, on a fresh
    PostgreSQL database and a private Redis, delivering to a storescp in ``folder``; all stopped afterwards.
    Yields the settings, the processes, the PACS, the database URL and the Redis server."""
    with postgres_database() as db_url:
        redis = RedisServer(folder / "redis").start()
        pacs = StoreSCP(folder / "pacs", unique_filenames=True).start()
        cluster = None
        try:
            settings = make_settings(folder, suite.model, pacs, db_url=db_url, broker_url=redis.url,
                                     study_settle_seconds=0.5, **overrides)
            cluster = Cluster(environment(settings), folder)
            start_node(cluster, settings, embedded_worker=False)
            cluster.start("gpu", "worker", "-Q", "gpu")
            cluster.start("io", "worker", "-Q", "io", "-c", "2")
            yield settings, cluster, pacs, db_url, redis
        finally:
            if cluster is not None:
                cluster.stop()
            pacs.stop()
            redis.stop()


def worker_kill(suite: Suite) -> Row:
    """Production mode: the gpu worker is SIGKILLed while a job is RUNNING on it (1 kill; full: 3), and started
    again (as systemd's Restart=always would). Tasks ack late and are rejected on worker loss; the job's stale
    heartbeat lets the next delivery take it over, so it finishes, and its results go out once."""
    started = time.monotonic()
    studies = suite.studies(4, 12)
    kills = 3 if suite.full else 1
    folder = suite.folder("worker_kill")
    with _production(suite, folder, job_stale_seconds=6) as (settings, cluster, pacs, db_url, _redis):
        sessions = session_factory(make_engine(db_url))
        senders = [StorescuSender("MODALITY", settings.port, settings.ae_title,
                                  [f for s in studies for f in s.files])]
        senders[0].start()
        host, mid_job, victims = socket.gethostname(), 0, []
        for _ in range(kills + 3):
            if mid_job == kills:
                break
            pid = cluster.running["gpu"].pid

            def running(pid: int = pid) -> int | None:
                with sessions() as session:
                    return session.scalar(select(Job.id).where(Job.state == JobState.RUNNING,
                                                               Job.worker == f"{host}:{pid}"))

            try:
                job_id = _wait(running, 240, "a job RUNNING on the gpu worker")
            except AssertionError:
                break  # every study analysed before the worker took another one
            cluster.kill("gpu")
            with sessions() as session:
                job = session.get(Job, job_id)
                if job.state == JobState.RUNNING and job.worker == f"{host}:{pid}":
                    mid_job += 1
                    victims.append(job_id)
            cluster.start("gpu", "worker", "-Q", "gpu")
        senders[0].join()
        row = _settle(settings, studies, 300, "worker_kill", pacs, senders, started)
        with sessions() as session:
            attempts = [session.get(Job, job_id).attempts for job_id in victims]
        sessions.kw["bind"].dispose()
        row.notes.insert(0, f"gpu worker SIGKILLed mid-job {mid_job} time(s); those jobs took "
                            f"{attempts} attempts")
        if mid_job < kills:
            row.problems.append(f"only {mid_job} of {kills} kill(s) landed mid-job")
        return row


# --------------------------------------------------------------------------------------------- 3. node kill


def node_kill(suite: Suite) -> Row:
    """Embedded mode: the node process (with its embedded worker: its whole process group, as a crash of the
    service would) is SIGKILLed while four senders are mid-association (1 kill; full: 3), and restarted. Right
    after each kill nothing half-written may be visible; the senders resend what was not confirmed (the two
    storescu senders re-run their whole batch, as a person re-running storescu would)."""
    started = time.monotonic()
    studies = suite.studies(8, 32)
    kills = 3 if suite.full else 1
    folder = suite.folder("node_kill")
    pacs = StoreSCP(folder / "pacs", unique_filenames=True).start()
    settings = make_settings(folder, suite.model, pacs, study_settle_seconds=0.5)
    cluster = Cluster(environment(settings), folder)
    try:
        start_node(cluster, settings)
        batches = split(studies, 4)
        senders: list[Sender] = [
            StorescuSender("DCMTK1", settings.port, settings.ae_title, batches[0], resend_all=True),
            StorescuSender("DCMTK2", settings.port, settings.ae_title, batches[1], resend_all=True),
            PynetdicomSender("PYNETDICOM1", settings.port, settings.ae_title, batches[2], pace=0.05),
            PynetdicomSender("PYNETDICOM2", settings.port, settings.ae_title, batches[3], pace=0.05)]
        total = sum(len(b) for b in batches)
        for sender in senders:
            sender.start()
        at_kill, problems = [], []
        for index in range(kills):
            threshold = total * (index + 1) // (kills + 2)
            _wait(lambda threshold=threshold: count_instances(settings) >= threshold, 240,
                  f"{threshold} instances stored")
            cluster.kill("node")
            at_kill.append(count_instances(settings))
            problems += [f"after kill {index + 1}: {p}" for p in storage_problems(settings, after_crash=True)]
            time.sleep(2)
            start_node(cluster, settings)
        for sender in senders:
            sender.join()
        row = _settle(settings, studies, 300, "node_kill", pacs, senders, started)
        row.problems += problems + storage_problems(settings)
        row.notes.insert(0, f"node SIGKILLed {kills} time(s) mid-association, at {at_kill} instances stored; "
                            "nothing half-written after each")
        return row
    finally:
        cluster.stop()
        pacs.stop()


# ------------------------------------------------------------------------------- 4. Redis restart, PG cut


def redis_pg(suite: Suite) -> Row:
    """Production mode while it receives: every PostgreSQL connection to the node's database is cut
    (pg_terminate_backend: node, workers) three times, and Redis is killed (-9) and restarted in between (its
    append-only file, fsynced always, keeps the queued and unacked messages)."""
    started = time.monotonic()
    studies = suite.studies(8, 24)
    folder = suite.folder("redis_pg")
    with _production(suite, folder, job_stale_seconds=10) as (settings, _cluster, pacs, db_url, redis):
        batches = split(studies, 4)
        total = sum(len(b) for b in batches)
        pace = 0.4 if suite.full else 0.25
        senders: list[Sender] = [
            StorescuSender("DCMTK1", settings.port, settings.ae_title, batches[0]),
            PynetdicomSender("PYNETDICOM1", settings.port, settings.ae_title, batches[1], pace=pace),
            PynetdicomSender("PYNETDICOM2", settings.port, settings.ae_title, batches[2], pace=pace),
            PynetdicomSender("PYNETDICOM3", settings.port, settings.ae_title, batches[3], pace=pace)]
        for sender in senders:
            sender.start()
        cut, events = [], []
        for fraction, fault in ((0.2, "pg"), (0.4, "redis"), (0.6, "pg"), (0.8, "pg")):
            _wait(lambda n=int(total * fraction): count_instances(settings) >= n, 240, f"{fraction:.0%} stored")
            if fault == "pg":
                cut.append(terminate_backends(db_url))
                events.append(f"pg cut ({cut[-1]} connections)")
            else:
                redis.kill()
                time.sleep(3)
                redis.start()
                events.append("redis -9 + restart (3 s down)")
        for sender in senders:
            sender.join()
        row = _settle(settings, studies, 300, "redis_pg", pacs, senders, started)
        row.notes.insert(0, "while receiving: " + ", ".join(events))
        return row


# ---------------------------------------------------------------------------------------- 5. PACS down


def destination_down(suite: Suite) -> Row:
    """The destination PACS is down from the start for ~20 s (full: 4 min) while results wait with
    backoff, then up: everything is delivered exactly once."""
    started = time.monotonic()
    studies = suite.studies(2, 4)
    down = 240.0 if suite.full else 20.0
    folder = suite.folder("destination_down")
    pacs = StoreSCP(folder / "pacs", unique_filenames=True)  # not started: down
    settings = make_settings(folder, suite.model, pacs, study_settle_seconds=0.5,
                             export_backoff_seconds=2.0 if suite.full else 0.5)
    cluster = Cluster(environment(settings), folder)
    try:
        start_node(cluster, settings)
        senders = run_senders([StorescuSender("MODALITY", settings.port, settings.ae_title,
                                              [f for s in studies for f in s.files])])
        sessions = session_factory(make_engine(settings.database_url()))

        def failing() -> bool:
            with sessions() as session:
                exports = session.scalars(select(Export)).all()
                return len(exports) == 5 * len(studies) and all(e.attempts >= 2 for e in exports)

        _wait(failing, 300, "two failed export attempts per object")
        time.sleep(max(0.0, down - (time.monotonic() - started)))
        with sessions() as session:
            attempts = max(session.scalars(select(Export.attempts)).all())
            failed = session.scalar(select(Export.id).where(Export.state == ExportState.FAILED))
        sessions.kw["bind"].dispose()
        down_for = time.monotonic() - started
        pacs.start()
        row = _settle(settings, studies, 300 + down, "destination_down", pacs, senders, started)
        row.notes.insert(0, f"PACS down for the first {down_for:.0f} s; up to {attempts} failed attempts per "
                            "object before it came back")
        if failed is not None:
            row.problems.append("an export was FAILED while the PACS was down")
        return row
    finally:
        cluster.stop()
        pacs.stop()


# --------------------------------------------------------------------------------------------- 6. disk full


def disk_full(suite: Suite) -> Row:
    """``min_free_disk_mb`` is set 1 GiB under the free space; a 4 GiB filler file (allocated) in the data directory
    crosses it: every instance is refused with 0xA700 (storescu and pynetdicom, one try each), nothing of them
    is stored, the node logs why (UIDs only). The filler is deleted: the resent instances are stored."""
    started = time.monotonic()
    studies = suite.studies(3, 6)
    before, during = studies[:1], studies[1:]
    folder = suite.folder("disk_full")
    pacs = StoreSCP(folder / "pacs", unique_filenames=True).start()
    threshold = (shutil.disk_usage(folder).free - 1024 * MIB) / MIB
    settings = make_settings(folder, suite.model, pacs, study_settle_seconds=0.5, min_free_disk_mb=threshold)
    cluster = Cluster(environment(settings), folder)
    filler = settings.data_dir / "filler.bin"
    try:
        start_node(cluster, settings)
        files_before = [f for s in before for f in s.files]
        first = run_senders([PynetdicomSender("BEFORE", settings.port, settings.ae_title, files_before)])
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(descriptor, 0, 4096 * MIB)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        problems = []
        free_mb = shutil.disk_usage(folder).free / MIB
        if free_mb >= threshold:
            problems.append(f"the filler did not cross the threshold ({free_mb:.0f} >= {threshold:.0f} MiB)")
        time.sleep(1.5)  # the SCP looks at the free space at most once a second
        batches = split(during, 2)
        refused = run_senders([
            PynetdicomSender("FULL_PYNETDICOM", settings.port, settings.ae_title, batches[0], max_tries=1),
            StorescuSender("FULL_DCMTK", settings.port, settings.ae_title, batches[1], max_tries=1)])
        accepted = sum(len(s.log.confirmed) for s in refused)
        statuses = {k for s in refused for k in s.log.failed_statuses}
        stored_while_full = count_instances(settings) - len(files_before)
        if accepted or stored_while_full:
            problems.append(f"{accepted} instance(s) accepted, {stored_while_full} stored while the disk was low "
                            f"(free {shutil.disk_usage(folder).free / MIB:.0f} MiB, threshold {threshold:.0f} MiB)")
        log = (folder / "node.log").read_text(errors="replace")
        lines = [line for line in log.splitlines() if "below min_free_disk_mb" in line]
        if not lines:
            problems.append("no log line says why instances were refused")
        if any("REL0" in line or "SYN0" in line for line in lines):
            problems.append("a refusal log line names a patient")
        filler.unlink()
        time.sleep(1.5)
        after = run_senders([
            PynetdicomSender("AFTER_PYNETDICOM", settings.port, settings.ae_title, batches[0]),
            StorescuSender("AFTER_DCMTK", settings.port, settings.ae_title, batches[1])])
        row = _settle(settings, studies, 300, "disk_full", pacs, first + after, started)
        row.problems += problems
        row.notes.insert(0, f"while low: {sum(len(b) for b in batches)} instances refused "
                            f"({', '.join(sorted(statuses))}), {len(lines)} log line(s); resent after")
        return row
    finally:
        filler.unlink(missing_ok=True)
        cluster.stop()
        pacs.stop()


SCENARIOS: dict[str, Callable[[Suite], Row]] = {
    "load": load, "worker_kill": worker_kill, "node_kill": node_kill, "redis_pg": redis_pg,
    "destination_down": destination_down, "disk_full": disk_full,
}
