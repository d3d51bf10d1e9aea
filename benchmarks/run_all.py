"""Every benchmark in one command, then one summary table of their figures against their baselines and targets.

Each benchmark runs as its own subprocess, one after the other (with ``--quick``: its own quick size), its output
in ``<logs>/<name>.log``. Those that take ``--json PATH`` write their summary rows there, each
``{name, figure, baseline, unit, ratio, target, met}`` (``ratio``: the benchmark's own comparison with its
baseline, e.g. speed-up or node/storescp; ``met``: null where there is no target or the run is a smoke size);
the others (the synthetic-training smoke runs) show their exit status and wall time only. A benchmark that exits
non-zero, times out or writes no rows is a FAILED row (with any rows it wrote), and the exit status is 1; the
others still run. A target
not met is a figure, not a failure.

    python benchmarks/run_all.py                      # every benchmark at full size (over an hour on 2 cores)
    python benchmarks/run_all.py --quick              # every benchmark at its smoke size
    python benchmarks/run_all.py --quick --full inference ingest triage_query   # these at full size
    python benchmarks/run_all.py --only triage_query drift_query --db-url postgresql+psycopg://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Benchmark:
    """A script in benchmarks/: ``rows`` if it writes ``--json`` rows, ``db`` if it takes ``--db-url``."""

    name: str
    rows: bool = True
    db: bool = False
    quick: tuple[str, ...] = ("--quick",)


BENCHMARKS = (
    Benchmark("inference"),
    Benchmark("ingest", db=True),
    Benchmark("latency"),
    Benchmark("scaling", db=True),
    Benchmark("triage_query", db=True),
    Benchmark("drift_query", db=True),
    Benchmark("train_throughput"),
    Benchmark("train_synthetic"),
    Benchmark("multiview_synthetic", rows=False),
    Benchmark("detector_synthetic", rows=False, quick=("--quick", "--no-progress")),
    Benchmark("factor_localization", rows=False),
)


@dataclass
class Outcome:
    """One benchmark's run: exit status (None: timed out), wall time, summary rows, the end of its output."""

    name: str
    returncode: int | None
    seconds: float
    rows: list[dict[str, object]] = field(default_factory=list)
    tail: str = ""
    expects_rows: bool = True

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or (self.expects_rows and not self.rows)


def run(benchmark: Benchmark, quick: bool, db_url: str | None, logs: Path, timeout: float) -> Outcome:
    """Run one benchmark script in its own process group (killed whole on timeout) and read its rows."""
    rows_file = logs / f"{benchmark.name}.json"
    command = [sys.executable, str(HERE / f"{benchmark.name}.py"), *(benchmark.quick if quick else ())]
    command += ["--json", str(rows_file)] if benchmark.rows else []
    command += ["--db-url", db_url] if db_url and benchmark.db else []
    log_file = logs / f"{benchmark.name}.log"
    rows_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with log_file.open("w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode: int | None = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the benchmark and the servers it started
            process.wait()
            returncode = None
    rows = json.loads(rows_file.read_text()) if benchmark.rows and rows_file.exists() else []
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
    return Outcome(benchmark.name, returncode, time.perf_counter() - start, rows, tail, benchmark.rows)


def number(value: object, unit: str = "") -> str:
    """A figure for the table with its unit: whole from 100 up, else 3 significant digits."""
    if value is None:
        return "-"
    text = (f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}") if isinstance(value, float) else str(value)
    return f"{text} {unit}".strip()


def table(outcomes: list[Outcome]) -> tuple[str, int]:
    """The Markdown summary table and the exit status: 1 when any benchmark FAILED, else 0."""
    lines = ["| benchmark | ours | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]
    for outcome in outcomes:
        if outcome.failed:
            why = "timed out" if outcome.returncode is None else (
                f"exit {outcome.returncode}" if outcome.returncode else "no summary rows")
            lines.append(f"| {outcome.name} | FAILED ({why}) | - | - | - | FAILED |")
        elif not outcome.rows:
            lines.append(f"| {outcome.name} | ran in {outcome.seconds:.0f} s (figures in its log) | - | - | - | - |")
        for row in outcome.rows:
            unit = str(row.get("unit") or "")
            ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"
            met = {True: "met", False: "NOT met", None: "-"}[row.get("met")]
            cells = [str(row["name"]), number(row["figure"], unit), number(row.get("baseline"), unit), ratio,
                     str(row.get("target") or "-"), met]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines), int(any(outcome.failed for outcome in outcomes))


def machine() -> str:
    """CPU model, cores, RAM and GPUs of this machine."""
    cpu = platform.processor() or platform.machine()
    memory = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    gpus = "none"
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        gpus = "; ".join(listed.splitlines()) or "none"
    return f"{cpu}, {os.cpu_count()} cores{memory}, GPU: {gpus}"


def load_average() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    names = [benchmark.name for benchmark in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each benchmark at its smoke size")
    parser.add_argument("--full", nargs="+", default=[], choices=names, metavar="NAME",
                        help="with --quick: run these at full size")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help="run only these")
    parser.add_argument("--db-url", help="PostgreSQL server URL for the benchmarks that take one (default: SQLite)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each benchmark may take")
    parser.add_argument("--logs", type=Path, help="folder for the logs, rows and summary "
                                                  "(default: benchmarks/results/<UTC time>)")
    args = parser.parse_args(argv)
    logs = (args.logs or HERE / "results" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    chosen = [benchmark for benchmark in BENCHMARKS if not args.only or benchmark.name in args.only]
    header = [f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", f"machine: {machine()}",
              f"before: {load_average()}", f"mode: {'quick' if args.quick else 'full'}"
              + (f" (full: {', '.join(args.full)})" if args.quick and args.full else ""), f"logs: {logs}"]
    print("\n".join(header), flush=True)
    outcomes = []
    for index, benchmark in enumerate(chosen, start=1):
        print(f"[{index}/{len(chosen)}] {benchmark.name} ...", end=" ", flush=True)
        outcome = run(benchmark, args.quick and benchmark.name not in args.full, args.db_url, logs, args.timeout)
        outcomes.append(outcome)
        print(f"{'FAILED' if outcome.failed else 'ok'} in {outcome.seconds:.0f} s, {load_average()}", flush=True)
        if outcome.failed:
            print(outcome.tail, flush=True)
    text, status = table(outcomes)
    footer = [f"after: {load_average()}", "wall time: " + ", ".join(f"{o.name} {o.seconds:.0f} s" for o in outcomes)]
    (logs / "summary.md").write_text("\n".join([*header, "", text, "", *footer]) + "\n")
    print("\n" + "\n".join([text, "", *footer]))
    return status


if __name__ == "__main__":
    sys.exit(main())
