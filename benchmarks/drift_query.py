"""Drift report time (``worklist.drift.drift_report``) at 10k and 100k results, on SQLite (default) or
PostgreSQL (``--db-url``).

Each database gets one study, one DONE job and one result per count, received over ``--weeks`` weeks (about
the same number a day) under two model versions (the second from half-way). Then, with the database reopened
as the node opens it, the median and best time over ``--repeats`` runs of:

    report     drift_report(): the GROUP BY version, day, bin query and the weekly PSIs (what the scheduler,
               /api/drift, /drift, the triage page's banner and /metrics run)
    rows       the alternative it replaces: every (version, created_at, suspicion) row fetched into Python

    python benchmarks/drift_query.py
    python benchmarks/drift_query.py --results 1000 --repeats 3
    python benchmarks/drift_query.py --db-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python benchmarks/drift_query.py --quick --json rows.json   # 10k only, 3 repeats; summary rows as JSON
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select, text
from triage_query import scratch_database, timed  # the sibling script: benchmarks/ is on sys.path when it runs

from dicom_node.settings import Settings
from worklist.db import make_engine, session_factory, upgrade
from worklist.drift import drift_report
from worklist.models import Job, Result, Study

BATCH = 10_000
START = datetime(2025, 1, 6, tzinfo=UTC)  # a Monday


def fill(url: str, count: int, weeks: int, seed: int = 0) -> None:
    """``count`` analysed studies with a job and a result each, spread evenly over ``weeks`` weeks."""
    rng = random.Random(seed)
    engine = make_engine(url)
    upgrade(engine)
    step = timedelta(weeks=weeks) / count
    rows: dict[type, list[dict]] = {Study: [], Job: [], Result: []}
    with engine.begin() as connection:
        if url.startswith("sqlite"):
            connection.exec_driver_sql("PRAGMA synchronous=OFF")
        for number in range(1, count + 1):
            at = START + step * number
            version = "site-v1@0123456789ab" if number < count // 2 else "site-v2@ba9876543210"
            rows[Study].append({"id": number, "study_instance_uid": f"1.2.826.0.1.3680043.10.{seed}.{number}",
                                "state": "ANALYSED", "first_received_at": at, "last_received_at": at})
            rows[Job].append({"id": number, "study_id": number, "state": "DONE", "attempts": 1,
                              "model_version": version, "created_at": at, "updated_at": at})
            rows[Result].append({"job_id": number, "scores": {}, "suspicion": rng.betavariate(2, 5),
                                 "created_at": at})
            if number % BATCH == 0 or number == count:
                for table, batch in rows.items():
                    connection.execute(insert(table), batch)
                    batch.clear()
        if not url.startswith("sqlite"):
            connection.execute(text("ANALYZE"))
    engine.dispose()


def measure(url: str, count: int, repeats: int) -> dict[str, float]:
    """Print the report's and the row fetch's median and best time; returns the medians (ms)."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    settings = Settings()
    today = date(2026, 1, 1)
    report = drift_report(sessions, settings, today)
    weeks = sum(len(version.weeks) for version in report.versions)
    assert sum(week.n for version in report.versions for week in version.weeks) == count

    def rows() -> None:
        with sessions() as session:
            session.execute(select(Job.model_version, Result.created_at, Result.suspicion)
                            .join(Job, Job.id == Result.job_id)).all()

    medians = {}
    for name, function in (("report", lambda: drift_report(sessions, settings, today)), ("rows", rows)):
        medians[name], best = timed(function, repeats)
        print(f"{count:>8} results  {name:<7} median {medians[name]:7.1f} ms   best {best:7.1f} ms   "
              f"({weeks} version-weeks)")
    engine.dispose()
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--weeks", type=int, default=52)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--db-url", help="a PostgreSQL server URL (a temporary database is created on it)")
    parser.add_argument("--quick", action="store_true", help="10k results only, 3 repeats")
    parser.add_argument("--json", type=Path, help="write the summary rows (report against fetching the rows) here")
    args = parser.parse_args()
    if args.quick:
        args.results, args.repeats = [10_000], 3
    backend = "PostgreSQL" if args.db_url else "SQLite"
    summary: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as folder:
        for count in args.results:
            begin = time.perf_counter()
            with scratch_database(args.db_url, Path(folder) / f"drift-{count}.sqlite") as url:
                fill(url, count, args.weeks)
                print(f"{count:>8} results  filled in {time.perf_counter() - begin:.1f} s")
                medians = measure(url, count, args.repeats)
            summary.append({"name": f"drift report, {count:,} results ({backend})",
                            "figure": round(medians["report"], 1), "baseline": round(medians["rows"], 1),
                            "unit": "ms", "ratio": round(medians["rows"] / medians["report"], 2), "target": None,
                            "met": None})
    if args.json:
        args.json.write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
