"""Worker scaling on CPU: studies/min and per-study latency with 1, 2 and 4 analysis worker processes, through the
production path, each against the 1-worker run of the same invocation.

One node runs for every measurement: ``python -m dicom_node.cli serve --no-worker --no-api`` on a Redis broker (a
private database: the first of 8-12 holding no key, claimed with a marker key and flushed afterwards) and a fresh
worklist database (a SQLite file, or a temporary PostgreSQL database with ``--db-url``), one
``worker -Q io -c 2`` sending results to ``/usr/bin/storescp`` (the PACS), and for each count N, N
``python -m dicom_node.cli worker -Q gpu -c 1`` processes: the supported way to run several analysis processes
(``-c`` > 1 runs threads that share one model and one interpreter lock). Each analysis worker gets
``OMP_NUM_THREADS = max(1, cores // N)`` so that N workers do not oversubscribe the cores.

Once every worker answers a Celery ping (its model loaded), a batch of new synthetic studies is sent by one
``/usr/bin/storescu`` association; the time runs from the send until the last job of the batch is DONE (the
jobs' own ``finished_at``). Per-study latency: the study's last instance received -> its job DONE (queue wait
included). Then every study must be ANALYSED with its five exports (SR + 4 SEG) delivered and the instance count
right, or the benchmark stops: no run is counted with a lost study. The model is the demo architecture
(``efficientnet-demo`` at 256x160, untrained: the same work as the trained demo model) unless ``--model``.

    python benchmarks/scaling.py                 # 16 studies of 1024x832 per run, 1, 2 and 4 workers
    python benchmarks/scaling.py --quick         # 3 studies of 512x416, 1 and 2 workers
    python benchmarks/scaling.py --db-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import redis
from celery import Celery
from ingest import DCMTK_ENV, STORESCP_AE, STORESCU, load_average, storescp  # sibling scripts (benchmarks/)
from latency import seconds
from sqlalchemy import func, select
from triage_query import scratch_database

from dicom_node.demo import free_port
from dicom_node.settings import Destination, Settings
from models import new_model, save_model_version
from training.demo import DemoRecipe
from training.synthetic import write_studies
from worklist.db import make_engine, session_factory, upgrade
from worklist.models import Export, ExportState, Instance, Job, JobState, Study, StudyState

REDIS_SERVER = "redis://127.0.0.1:6379"
REDIS_DATABASES = range(8, 13)
MARKER = "mammo-bench-scaling"
SENDER_AE = "SCALING_BENCH"
EXPORTS_PER_STUDY = 5  # SR + one SEG per view


@dataclass(frozen=True)
class Run:
    """One measured batch: N analysis workers, the wall time to the last DONE job, per-study latencies."""

    workers: int
    studies: int
    seconds: float
    latencies: list[float]
    model_seconds: float

    @property
    def per_minute(self) -> float:
        return 60 * self.studies / self.seconds


@contextmanager
def private_redis(server: str) -> Iterator[str]:
    """A Redis database of this run's own (see the module docstring); flushed on the way out."""
    for number in REDIS_DATABASES:
        client = redis.Redis.from_url(f"{server}/{number}")
        if not client.set(MARKER, os.getpid(), nx=True, ex=6 * 3600):
            continue
        if client.dbsize() != 1:  # someone else's keys: leave it
            client.delete(MARKER)
            continue
        try:
            yield f"{server}/{number}"
        finally:
            client.flushdb()
        return
    raise SystemExit(f"no free Redis database among {REDIS_DATABASES.start}-{REDIS_DATABASES.stop - 1} on {server}")


class Processes:
    """``python -m dicom_node.cli`` child processes, each logging to its own file; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.running[name] = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", *args],
                                                  env={**self.env, **(env or {})}, stdout=log,
                                                  stderr=subprocess.STDOUT)
        return self.running[name]

    def check(self) -> None:
        """Stop the benchmark when a child has exited, with the tail of its log."""
        for name, process in self.running.items():
            if process.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} exited with {process.returncode}:\n{tail}")

    def stop(self, names: list[str] | None = None) -> None:
        chosen = [name for name in (names or list(self.running)) if name in self.running]
        for name in chosen:
            self.running[name].send_signal(signal.SIGTERM)
        for name in chosen:
            process = self.running.pop(name)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until(condition, processes: Processes, timeout: float, what: str) -> None:
    """Poll ``condition`` until true; stop on a dead child or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        processes.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def pinged(app: Celery, pids: set[int]) -> bool:
    """Every worker process in ``pids`` answers a ping (worker names are ``mammo-<host>-<pid>@<host>``)."""
    replies = app.control.ping(timeout=1.0) or []
    answered = {int(name.split("@")[0].rsplit("-", 1)[1]) for reply in replies for name in reply}
    return pids <= answered


def batch_state(sessions, uids: list[str]) -> dict[str, int]:
    """The batch's jobs by state."""
    with sessions() as session:
        rows = session.execute(select(Job.state, func.count()).join(Study, Study.id == Job.study_id)
                               .where(Study.study_instance_uid.in_(uids)).group_by(Job.state)).all()
    return {str(state): count for state, count in rows}


def verify(sessions, uids: list[str], pacs_dir: Path, pacs_before: int) -> tuple[list[float], float, float]:
    """Every study analysed, its job DONE, its 4 instances stored, its exports delivered, the PACS holding them;
    returns the per-study latencies, the batch's last DONE time as UTC and the median model time."""
    with sessions() as session:
        rows = session.execute(select(Study, Job).join(Job, Job.study_id == Study.id)
                               .where(Study.study_instance_uid.in_(uids))).all()
        problems = [f"{study.study_instance_uid}: study {study.state}, job {job.state} {job.error or ''}"
                    for study, job in rows if study.state != StudyState.ANALYSED or job.state != JobState.DONE]
        if len(rows) != len(uids):
            problems.append(f"{len(rows)} jobs for {len(uids)} studies")
        instances = session.scalar(select(func.count()).select_from(Instance).join(Study)
                                   .where(Study.study_instance_uid.in_(uids)))
        exports = session.execute(select(Export.state, func.count()).where(Export.job_id.in_([j.id for _, j in rows]))
                                  .group_by(Export.state)).all()
        delivered = dict(exports).get(ExportState.DELIVERED, 0)
        if instances != 4 * len(uids) or delivered != EXPORTS_PER_STUDY * len(uids):
            problems.append(f"{instances} instances, exports {dict(exports)} for {len(uids)} studies")
        stored = sum(1 for path in pacs_dir.iterdir() if path.is_file()) - pacs_before
        if stored != EXPORTS_PER_STUDY * len(uids):
            problems.append(f"the PACS received {stored} objects for {len(uids)} studies")
        if problems:
            raise SystemExit("verification failed:\n  " + "\n  ".join(problems))
        latencies = [seconds(job.finished_at, study.last_received_at) for study, job in rows]
        last = max(job.finished_at for _, job in rows)
        last = last if last.tzinfo else last.replace(tzinfo=UTC)  # SQLite keeps UTC without a zone
        model = statistics.median(job.timings.get("model", 0.0) for _, job in rows)
    return latencies, last.timestamp(), model


def measure(workers: int, folders: list[Path], processes: Processes, settings: Settings, sessions, app: Celery,
            pacs_dir: Path, threads: int | None, timeout: float) -> Run:
    """Start ``workers`` analysis workers, send ``folders`` once they answer, wait for DONE, verify, stop them."""
    names = [f"gpu-{workers}-{index}" for index in range(workers)]
    omp = {"OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 1) // workers))}
    pids = {processes.start(name, "worker", "-Q", "gpu", "-c", "1", env=omp).pid for name in names}
    try:
        begin = time.perf_counter()
        wait_until(lambda: pinged(app, pids), processes, 300, f"{workers} analysis worker(s) to answer")
        print(f"{workers} worker(s) answered after {time.perf_counter() - begin:.1f} s", flush=True)
        files = [path for folder in folders for path in sorted(folder.glob("*.dcm"))]
        uids = [str(pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True).StudyInstanceUID)
                for folder in folders]
        pacs_before = sum(1 for path in pacs_dir.iterdir() if path.is_file())
        start = datetime.now(UTC).timestamp()
        sender = subprocess.Popen([STORESCU, "-aet", SENDER_AE, "-aec", settings.ae_title, "127.0.0.1",
                                   str(settings.port), *map(str, files)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env=DCMTK_ENV)

        def done() -> bool:
            if sender.poll():
                raise SystemExit(f"storescu exited with {sender.returncode}: {sender.stderr.read()}")
            states = batch_state(sessions, uids)
            if states.get(JobState.FAILED.value):
                raise SystemExit(f"{states[JobState.FAILED.value]} job(s) FAILED: see {processes.logs}")
            return states.get(JobState.DONE.value, 0) == len(uids)

        wait_until(done, processes, timeout, f"{len(uids)} studies to be analysed by {workers} worker(s)")
        if sender.wait(60) != 0:
            raise SystemExit(f"storescu exited with {sender.returncode}: {sender.stderr.read()}")

        def exported() -> bool:
            with sessions() as session:
                return not session.scalar(select(func.count()).select_from(Export).join(Job).join(Study).where(
                    Study.study_instance_uid.in_(uids), Export.state != ExportState.DELIVERED))

        wait_until(exported, processes, 120, "the batch's exports to be delivered")
        latencies, last, model = verify(sessions, uids, pacs_dir, pacs_before)
    finally:
        processes.stop(names)
    return Run(workers, len(uids), last - start, latencies, model)


def measure_all(args: argparse.Namespace, scratch: Path) -> list[Run]:
    """Write the studies and the model, start the node, the io worker and the PACS, and measure each count."""
    batches = len(args.workers)
    write_studies(scratch / "studies", args.studies * batches, seed=7000, rows=args.rows, cols=args.cols,
                  progress=False)
    folders = sorted(path for path in (scratch / "studies").iterdir() if path.is_dir())
    model = args.model or save_model_version(new_model(DemoRecipe().clip_config()), scratch / "model")
    pacs_dir = scratch / "pacs"
    pacs_dir.mkdir()
    with private_redis(args.redis) as broker, scratch_database(args.db_url, scratch / "worklist.sqlite") as db_url, \
            storescp(pacs_dir, pacs_port := free_port()):
        settings = Settings(data_dir=scratch / "data", port=free_port(), model_path=model, db_url=db_url,
                            broker_url=broker, device="cpu", log_level="INFO", study_settle_seconds=args.settle,
                            export_backoff_seconds=0.5, allowed_calling_aes=[SENDER_AE],
                            destinations=[Destination(name="pacs", ae_title=STORESCP_AE, host="127.0.0.1",
                                                      port=pacs_port)])
        settings.data_dir.mkdir()
        engine = make_engine(settings.database_url())
        upgrade(engine)
        sessions = session_factory(engine)
        print(f"broker {broker}, database {'PostgreSQL' if args.db_url else 'SQLite'}, model {model}, "
              f"{args.studies} studies of 4 x {args.rows}x{args.cols} per run; logs in {scratch}", flush=True)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MAMMO_")}, **settings.to_env()}
        processes = Processes(env, scratch)
        app = Celery(broker=broker)
        try:
            processes.start("node", "serve", "--no-worker", "--no-api")
            processes.start("io", "worker", "-Q", "io", "-c", "2")
            wait_until(lambda: listening(settings.port), processes, 120, "the node to listen")
            runs = []
            for index, workers in enumerate(args.workers):
                batch = folders[index * args.studies:(index + 1) * args.studies]
                runs.append(measure(workers, batch, processes, settings, sessions, app, pacs_dir, args.threads,
                                    args.timeout))
                print(f"{workers} worker(s): {runs[-1].per_minute:.1f} studies/min, {load_average()}", flush=True)
        finally:
            processes.stop()
            app.close()
            engine.dispose()
    return runs


def report(runs: list[Run]) -> list[dict[str, object]]:
    """Print the table; the summary rows for ``--json`` (ratios against the first, 1-worker, run)."""
    base = runs[0]
    print(f"\n{'workers':>7}{'studies':>9}{'seconds':>9}{'studies/min':>13}{'vs 1':>7}{'latency median':>16}"
          f"{'max':>7}{'model s':>9}")
    rows: list[dict[str, object]] = []
    for run in runs:
        ratio = run.per_minute / base.per_minute
        print(f"{run.workers:>7}{run.studies:>9}{run.seconds:>9.1f}{run.per_minute:>13.1f}{ratio:>6.2f}x"
              f"{statistics.median(run.latencies):>15.1f}s{max(run.latencies):>6.1f}s{run.model_seconds:>9.2f}")
        rows.append({"name": f"scaling: {run.workers} worker process(es)", "figure": round(run.per_minute, 2),
                     "baseline": round(base.per_minute, 2), "unit": "studies/min", "ratio": round(ratio, 2),
                     "target": None, "met": None})
    print("time: first instance sent -> last job DONE; latency: a study's last instance received -> its job DONE")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="analysis worker processes "
                        "(the first count is the baseline)")
    parser.add_argument("--studies", type=int, default=16, help="studies per run")
    parser.add_argument("--size", default="1024x832", help="ROWSxCOLS of the synthetic images")
    parser.add_argument("--model", type=Path, help="model version or checkpoint (default: the demo architecture)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each analysis worker (default: cores // N)")
    parser.add_argument("--settle", type=float, default=0.5, help="study settle time (s)")
    parser.add_argument("--db-url", help="a PostgreSQL server URL (a temporary database is created on it); "
                                         "default: a SQLite file")
    parser.add_argument("--redis", default=REDIS_SERVER, help="Redis server (a free database 8-12 is used)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    parser.add_argument("--quick", action="store_true", help="3 studies of 512x416, 1 and 2 workers")
    parser.add_argument("--json", type=Path, help="write the summary rows here")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.size, args.workers = 3, "512x416", [1, 2]
    args.rows, args.cols = (int(value) for value in args.size.lower().split("x"))
    print(f"{os.cpu_count()} CPUs, {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mammo-scaling-") as scratch:
        runs = measure_all(args, Path(scratch))
    rows = report(runs)
    print(f"every run verified: each study ANALYSED, its job DONE, its exports delivered to storescp; "
          f"after the runs: {load_average()} (other work on the machine makes these numbers lower bounds)")
    if args.json:
        args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
