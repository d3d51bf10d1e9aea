"""Storage SCP ingest: the node against DCMTK storescp, both fed the same synthetic MG files by storescu.

Each run starts a fresh receiver, launches N ``/usr/bin/storescu`` processes at once (one association each,
each sending every Nth file) and times from their launch until the last one exits. Every run is then checked:
all instances must be on disk (and, for the node, in the worklist database), or the benchmark stops.

- Baseline: ``/usr/bin/storescp --fork +xa +B -pdu 131072``: one child process per association (its default
  single-process mode would serve concurrent associations one after the other), every transfer syntax
  accepted, the data written as received, the largest PDU storescu sends (the node accepts any size).
  It does NOT fsync.
- storescu and storescp run with ``TCP_NODELAY=1``: this DCMTK build leaves Nagle's algorithm on by default,
  and its split PDU writes then wait on delayed ACKs (~40 ms per instance, whatever the receiver does), which
  would make every single-association number a measure of that timer.
- Node: ``dicom_node.scp_pool.ScpPool`` with ``--scp-processes`` SCP processes sharing the port (SO_REUSEPORT;
  the node's ``scp_processes`` setting), each with an ``InstanceStore`` on a fresh database (SQLite in WAL mode
  with synchronous=FULL, or a temporary PostgreSQL database with ``--db-url``): Success is answered only after
  the file is fsynced (and its folder) and its row committed. Even one SCP process runs apart from the
  benchmark, so that the benchmark's own work does not share the receiver's GIL; within a process,
  associations are threads, as in production. The SCPs log at WARNING (no line per instance).
- Disk: the node's durable write path alone (``dicom_node.durable_files.atomic_write``: each file staged,
  fsynced, renamed into place and its folder fsynced), the same files' bytes from memory, by as many threads as
  associations: no network, no decoding, no database. No receiver that makes each instance durable before its
  Success, as the node does, can beat it on this disk: a node at that row's speed is limited by the disk, not
  by its own work.

The project target is node >= 0.5x storescp at 8 associations.

    python benchmarks/ingest.py                       # 32 studies (128 x ~6.8 MB), 1 and 8 associations,
                                                      # 1 and min(4, cores) SCP processes
    python benchmarks/ingest.py --scp-processes 4     # only 4 SCP processes
    python benchmarks/ingest.py --quick               # 4 studies of 1024x832, one run each
    python benchmarks/ingest.py --db-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python benchmarks/ingest.py --quick --json rows.json   # also write the summary rows as JSON
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from shutil import rmtree

from dcmtk_peers import DCMTK_ENV, STORESCP, STORESCP_OPTIONS, STORESCU, storescp
from sqlalchemy import create_engine, func, make_url, select, text

from dicom_node.demo import free_port
from dicom_node.durable_files import atomic_write
from dicom_node.scp_pool import ScpPool
from dicom_node.settings import Settings, load_settings
from training.synthetic import write_studies
from worklist.db import make_engine, session_factory, sqlite_url, upgrade
from worklist.models import Instance

SENDER_AE = "INGEST_BENCH"
NODE_AE = "MAMMO_AI"
STORESCP_AE = "STORESCP"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Cpu:
    """CPU seconds, user and system."""

    user: float = 0.0
    system: float = 0.0

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user + other.user, self.system + other.system)


def children_cpu() -> Cpu:
    """The CPU of this process's children that have been waited for (and of their own waited-for children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Cpu(usage.ru_utime, usage.ru_stime)


def adopt_orphans() -> None:
    """Make this process the child subreaper of its descendants (Linux prctl PR_SET_CHILD_SUBREAPER): the
    association children of ``storescp --fork`` that outlive it are re-parented here, so that ``reap_orphans``
    can wait for them and ``children_cpu`` count them."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_orphans(timeout: float = 10.0) -> None:
    """Wait for every child left (only storescp's re-parented association children run at that point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)
    raise SystemExit(f"storescp's association processes still run {timeout} s after it stopped")


def processes_cpu(pids: list[int]) -> Cpu:
    """The CPU the running processes ``pids`` have used so far (``/proc/<pid>/stat``: utime, stime)."""
    total = Cpu()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += Cpu(int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)
    return total


@contextmanager
def node(settings: Settings, processes: int) -> Iterator[ScpPool]:
    """The node's Storage SCP in ``processes`` child processes, listening once this is entered."""
    pool = ScpPool(settings, processes).start()
    try:
        yield pool
    finally:
        pool.shutdown()


@contextmanager
def database(server_url: str | None, data_dir: Path) -> Iterator[str]:
    """A fresh, migrated worklist database: SQLite under ``data_dir``, or a temporary PostgreSQL database
    on ``server_url``'s server, dropped afterwards."""
    if server_url is None:
        url = sqlite_url(data_dir)
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
        return
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"mammo_ingest_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def machine_busy() -> float:
    """Seconds of CPU the whole machine has spent busy (``/proc/stat``: all but idle and I/O wait)."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split()[1:9]]  # user nice system idle iowait ...
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def send(files: list[Path], associations: int, called_ae: str, port: int) -> tuple[float, Cpu, float]:
    """Seconds for ``associations`` concurrent storescu processes to send ``files`` (every Nth file each), the
    senders' CPU, and the machine's busy CPU seconds meanwhile."""
    shares = [files[index::associations] for index in range(associations)]
    senders_before = children_cpu()
    machine_before = machine_busy()
    start = time.perf_counter()
    senders = [subprocess.Popen([STORESCU, "-R", "-aet", SENDER_AE, "-aec", called_ae, "127.0.0.1", str(port),
                                 *map(str, share)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=DCMTK_ENV)
               for share in shares if share]
    errors = [sender.communicate()[1] for sender in senders]
    elapsed = time.perf_counter() - start
    machine = machine_busy() - machine_before
    for sender, error in zip(senders, errors, strict=True):
        if sender.returncode != 0:
            raise SystemExit(f"storescu to {called_ae} exited with {sender.returncode}:\n{error}")
    return elapsed, children_cpu() - senders_before, machine


@dataclass(frozen=True)
class Run:
    """One verified run: its seconds, the receiver's CPU (senders excluded) and the machine's busy CPU seconds."""

    seconds: float
    cpu: Cpu
    machine: float


def own_cpu() -> Cpu:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Cpu(usage.ru_utime, usage.ru_stime)


def write_durably(files: list[Path], threads: int, workdir: Path) -> tuple[float, Cpu, float]:
    """Seconds for ``threads`` threads to write ``files``' bytes (read beforehand) with the node's durable write,
    one folder per study as the node files them; this process's CPU and the machine's busy CPU meanwhile."""
    data = [path.read_bytes() for path in files]
    targets = [workdir / path.parent.name / path.name for path in files]
    cpu_before, machine_before = own_cpu(), machine_busy()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(atomic_write, targets, data))
    return time.perf_counter() - start, own_cpu() - cpu_before, machine_busy() - machine_before


def run_once(receiver: str, files: list[Path], associations: int, workdir: Path, db_server: str | None,
             processes: int = 1) -> Run:
    """Ingest ``files`` over ``associations`` associations (the node in ``processes`` SCP processes), timed, with
    the receiver's CPU; stops if any instance is missing. storescp's CPU is that of it and its forked children
    (all waited for once it exits), less the senders'; the node's is that of its SCP processes while the senders
    ran (not their start-up)."""
    port = free_port()
    if receiver == "disk":
        out = workdir / "disk"
        seconds, cpu, machine = write_durably(files, associations, out)
        counts = {"files": sum(1 for _ in out.rglob("*.dcm"))}
    elif receiver == "storescp":
        out = workdir / "storescp"
        out.mkdir(parents=True)
        before = children_cpu()
        with storescp(out, port, STORESCP_AE):
            seconds, senders, machine = send(files, associations, STORESCP_AE, port)
        reap_orphans()
        cpu = children_cpu() - before - senders
        counts = {"files": sum(1 for path in out.iterdir() if path.is_file())}
    else:
        data_dir = workdir / "node"
        data_dir.mkdir(parents=True)
        with database(db_server, data_dir) as url:
            settings = load_settings(data_dir=data_dir, port=port, db_url=url, ae_title=NODE_AE, log_level="WARNING",
                                     allowed_calling_aes=[SENDER_AE], maximum_associations=max(associations, 10))
            with node(settings, processes) as pool:
                before = processes_cpu(pool.pids())
                seconds, _, machine = send(files, associations, NODE_AE, port)
                cpu = processes_cpu(pool.pids()) - before
            engine = make_engine(url)
            with session_factory(engine)() as session:
                rows = session.scalar(select(func.count()).select_from(Instance))
            engine.dispose()
        counts = {"files": sum(1 for _ in settings.incoming_dir.rglob("*.dcm")), "DB rows": rows}
    for what, count in counts.items():
        if count != len(files):
            raise SystemExit(f"{receiver}, {associations} associations: {count} {what} for {len(files)} instances")
    return Run(seconds, cpu, machine)


def median_run(receiver: str, files: list[Path], associations: int, scratch: str, args: argparse.Namespace,
               processes: int = 1) -> Run:
    """The median run by time over ``args.repeats`` verified runs, each in a fresh folder (the faster of the two
    middle runs for an even count: a run's time and CPU are reported together, not averaged)."""
    runs = []
    for repeat in range(args.repeats):
        workdir = Path(scratch, f"{receiver}-{processes}-{associations}-{repeat}")
        runs.append(run_once(receiver, files, associations, workdir, args.db_url, processes))
        rmtree(workdir)
    return sorted(runs, key=lambda run: run.seconds)[(len(runs) - 1) // 2]


def print_row(receiver: str, associations: int, files: list[Path], megabytes: float, run: Run,
              ratio: str = "") -> None:
    per_instance = 1000 / len(files)
    print(f"{receiver:<10}{associations:6d}{len(files):10d}{megabytes:9.1f}{run.seconds:9.2f}"
          f"{len(files) / run.seconds:9.1f}{megabytes / run.seconds:9.1f}{run.cpu.user * per_instance:8.1f}"
          f"{run.cpu.system * per_instance:8.1f}{run.machine * per_instance:11.1f}{ratio}")


def load_average() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=32, help="synthetic four-view studies to send")
    parser.add_argument("--size", default="2048x1664", help="ROWSxCOLS of the 16-bit synthetic images")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 8], help="concurrent associations")
    parser.add_argument("--scp-processes", type=int, nargs="+", default=sorted({1, min(4, os.cpu_count() or 1)}),
                        help="SCP process counts of the node to measure (default: 1 and min(4, cores))")
    parser.add_argument("--repeats", type=int, default=3, help="runs per receiver and count (median reported)")
    parser.add_argument("--db-url", help="PostgreSQL server URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/"
                                         "postgres): a temporary database is created there per run and dropped; "
                                         "default: a SQLite file per run")
    parser.add_argument("--quick", action="store_true", help="shorthand for --studies 4 --size 1024x832 --repeats 1")
    parser.add_argument("--json", type=Path, help="write the summary rows (inst/s against storescp) here")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.size, args.repeats = 4, "1024x832", 1
    rows, cols = (int(value) for value in args.size.lower().split("x"))
    adopt_orphans()

    with tempfile.TemporaryDirectory(prefix="mammo-ingest-") as scratch:
        source = Path(scratch, "source")
        start = time.perf_counter()
        write_studies(source, args.studies, seed=0, rows=rows, cols=cols, progress=False)
        files = sorted(source.glob("*/*.dcm"))
        megabytes = sum(path.stat().st_size for path in files) / 1e6
        version = subprocess.run([STORESCP, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        print(f"{len(files)} MG instances ({args.studies} studies of {rows}x{cols} 16-bit, {megabytes:.1f} MB), "
              f"written in {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs, {load_average()}; "
              f"node database: {'PostgreSQL' if args.db_url else 'SQLite'}")
        print(f"senders: {STORESCU}, one process per association; baseline: "
              f"{version.strip(' $').removeprefix('dcmtk: ')} {' '.join(STORESCP_OPTIONS)}; DCMTK tools with "
              f"TCP_NODELAY=1; median of {args.repeats} run(s); node-Np: N SCP processes (scp_processes = N)")
        print(f"{'receiver':<10}{'assoc':>6}{'instances':>10}{'MB':>9}{'seconds':>9}{'inst/s':>9}{'MB/s':>9}"
              f"{'usr ms':>8}{'sys ms':>8}{'machine ms':>11}{'node/storescp':>15}")
        baseline: dict[int, Run] = {}
        disk: dict[int, Run] = {}
        ratios: dict[int, float] = {}
        summary: list[dict[str, object]] = []
        for processes in args.scp_processes:
            name = "node" if processes == 1 else f"node-{processes}p"
            for associations in args.associations:
                if associations not in baseline:
                    baseline[associations] = median_run("storescp", files, associations, scratch, args)
                    print_row("storescp", associations, files, megabytes, baseline[associations])
                    disk[associations] = median_run("disk", files, associations, scratch, args)
                    print_row("disk", associations, files, megabytes, disk[associations],
                              f"{baseline[associations].seconds / disk[associations].seconds:14.2f}x")
                run = median_run("node", files, associations, scratch, args, processes)
                ratio = baseline[associations].seconds / run.seconds
                print_row(name, associations, files, megabytes, run, f"{ratio:14.2f}x")
                if associations == 8:
                    ratios[processes] = ratio
                summary.append({"name": f"ingest: {processes} SCP process(es), {associations} association(s)",
                                "figure": round(len(files) / run.seconds, 1), "unit": "inst/s",
                                "baseline": round(len(files) / baseline[associations].seconds, 1),
                                "ratio": round(ratio, 2),
                                "disk_ceiling_ratio": round(baseline[associations].seconds
                                                            / disk[associations].seconds, 2),
                                "target": ">= 0.5x" if associations == 8 else None,
                                "met": ratio >= 0.5 if associations == 8 else None})
    print("every run verified: all instances on disk (node: and in the database) before its time counted")
    print("usr/sys ms: the receiver's CPU per instance, user and system (the senders' excluded); machine ms: the "
          "whole machine's busy CPU per instance while the senders ran (senders, receiver, kernel; 2 cores give "
          f"{1000 * (os.cpu_count() or 1)} ms a second)")
    print("fsync: the node fsyncs each file and its folder and commits its row before answering Success; "
          "storescp does not fsync (page cache only); disk: the node's durable write alone (fsynced file, rename, "
          "folder fsync) from memory by as many threads as associations, the ceiling of any receiver that "
          "fsyncs each instance on this disk (usr/sys ms: the benchmark process's own)")
    print(f"after the runs: {load_average()} (other work on the machine makes these numbers lower bounds)")
    for processes, ratio in ratios.items():
        verdict = "met" if ratio >= 0.5 else "NOT met"
        ceiling = baseline[8].seconds / disk[8].seconds
        print(f"target node >= 0.5x storescp at 8 associations, {processes} SCP process(es): {verdict} ({ratio:.2f}x; "
              f"the disk alone allows {ceiling:.2f}x, the node reaches {ratio / ceiling:.0%} of it)")
    if args.json:
        args.json.write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
