"""Triage list query time at 10k and 100k studies, on SQLite (default) or PostgreSQL (``--db-url``).

Each database is filled with synthetic rows through SQLAlchemy Core (a study has one series, four analysable
instances — three for ``--incomplete`` of the studies, 3% by default —, one job, one result with a realistic
findings JSON and five exports; 5% of the studies failed, 2% are still in progress; suspicion rounded to 2
decimals, so ties are common). Then, with the database reopened as the node opens it, each query's median and
best time over ``--repeats`` runs:

    ranked        the ranked section's SELECT (ORDER BY ... LIMIT 50): the query the triage index serves
    incomplete    the "analysed on fewer than four views" section: scans analysed studies by suspicion until
                  it has 50, so it costs ~50/rate rows (the rarer such studies, the longer)
    failed, in_progress   by state, longest waiting first
    page          worklist.triage.triage(): every section and the rows described (views, jobs, scores,
                  exports), i.e. the database work of GET /api/studies

The target (issue "Triage worklist page and API") is the ranked query < 50 ms at 100k studies.

    python benchmarks/triage_query.py                      # 10k and 100k on SQLite in a temp folder
    python benchmarks/triage_query.py --studies 1000 --repeats 3 --incomplete 0.001
    python benchmarks/triage_query.py --db-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python benchmarks/triage_query.py --quick --json rows.json   # 10k only, 5 repeats; summary rows as JSON
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from worklist.db import make_engine, session_factory, upgrade
from worklist.models import Export, Instance, Job, Result, Series, Study
from worklist.triage import DEFAULT_KEYS, Section, section_query, triage

VIEWS = (("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))
BATCH = 5000


def findings(rng: random.Random, uid: str) -> dict:
    def assessment() -> dict:
        return {"scores": {t: rng.random() for t in ("malignancy", "mass", "calcification")},
                "density": {c: 0.25 for c in "ABCD"}, "birads": {c: 0.2 for c in "12345"}}

    return {"study_instance_uid": uid, "model": {"name": "Mammo-CLIP", "software_version": "0.1.0",
                                                 "model_version": "demo@0123456789ab", "clinical": False},
            "views": [{**assessment(), "sop_instance_uid": f"{uid}.{n}", "laterality": lat, "view": view}
                      for n, (lat, view) in enumerate(VIEWS)],
            "breasts": [{**assessment(), "laterality": side} for side in "LR"], "missing_views": []}


def fill(url: str, count: int, incomplete: float = 0.03, seed: int = 0) -> None:
    """``count`` studies with their series, instances, jobs, results and exports."""
    rng = random.Random(seed)
    engine = make_engine(url)
    upgrade(engine)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows: dict[type, list[dict]] = {table: [] for table in (Study, Series, Instance, Job, Result, Export)}
    with engine.begin() as connection:
        if url.startswith("sqlite"):
            connection.exec_driver_sql("PRAGMA synchronous=OFF")
        for number in range(1, count + 1):
            uid = f"1.2.826.0.1.3680043.10.{seed}.{number}"
            draw = rng.random()
            state = "FAILED" if draw < 0.05 else "RECEIVING" if draw < 0.07 else "ANALYSED"
            received = start + timedelta(seconds=30 * number + rng.randint(0, 20))
            suspicion = round(rng.random(), 2) if state == "ANALYSED" else None
            rows[Study].append({"id": number, "study_instance_uid": uid, "accession_number": f"A{number}",
                                "patient_id": f"P{number}", "patient_name": f"DOE^{number}", "state": state,
                                "first_received_at": received, "last_received_at": received, "suspicion": suspicion})
            views = VIEWS[:3] if rng.random() < incomplete else VIEWS
            rows[Study][-1]["views_complete"] = state == "ANALYSED" and views == VIEWS
            rows[Series].append({"id": number, "study_id": number, "series_instance_uid": f"{uid}.1",
                                 "modality": "MG"})
            for n, (laterality, view) in enumerate(views):
                rows[Instance].append({
                    "study_id": number, "series_id": number, "sop_instance_uid": f"{uid}.1.{n}",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.2", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "laterality": laterality, "view": view, "analysable": True,
                    "path": f"{uid}/{uid}.1/{uid}.1.{n}.dcm", "size_bytes": 6_800_000,
                    "content_digest": "blake3:" + uuid.uuid4().hex * 2, "calling_ae": "MODALITY",
                    "received_at": received})
            if state != "RECEIVING":
                done = state == "ANALYSED"
                rows[Job].append({"id": number, "study_id": number, "state": "DONE" if done else "FAILED",
                                  "attempts": 1, "model_version": "demo@0123456789ab", "created_at": received,
                                  "updated_at": received, "started_at": received, "finished_at": received,
                                  "error": None if done else "ImageDecodeError: cut short",
                                  "timings": {"preprocess": 0.4, "model": 1.2, "heatmaps": 0.3}})
                if done:
                    rows[Result].append({"job_id": number, "scores": findings(rng, uid), "suspicion": suspicion,
                                         "created_at": received})
                    for n in range(5):
                        rows[Export].append({"job_id": number, "destination": "pacs", "state": "DELIVERED",
                                             "sop_instance_uid": f"{uid}.9.{n}", "attempts": 1,
                                             "path": f"results/{uid}/{number}/{n}.dcm", "delivered_at": received})
            if number % BATCH == 0 or number == count:
                for table, batch in rows.items():
                    if batch:
                        connection.execute(insert(table), batch)
                    batch.clear()
        if not url.startswith("sqlite"):
            connection.execute(text("ANALYZE"))
    engine.dispose()


def timed(function, repeats: int) -> tuple[float, float]:
    """(median, best) milliseconds over ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        function()
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times), min(times)


def measure(url: str, count: int, repeats: int) -> dict[str, float]:
    """Print each query's median and best time; returns the medians (ms) by query."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    ranked = section_query(Section.RANKED, DEFAULT_KEYS, 50)
    with sessions() as session:
        assert len(session.scalars(ranked).all()) == 50
        if url.startswith("sqlite"):
            compiled = ranked.compile(engine, compile_kwargs={"literal_binds": True})
            plan = [row[-1] for row in session.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))]
            print(f"  ranked plan: {plan[0]}")

    def run(query):
        def execute() -> None:
            with sessions() as session:
                session.scalars(query).all()
        return execute

    functions = {section.value: run(section_query(section, DEFAULT_KEYS, 50)) for section in Section}
    functions["page"] = lambda: triage(sessions, DEFAULT_KEYS)
    medians = {}
    for name, function in functions.items():
        medians[name], best = timed(function, repeats)
        print(f"{count:>8} studies  {name:<12} median {medians[name]:7.1f} ms   best {best:7.1f} ms")
    engine.dispose()
    return medians


@contextmanager
def scratch_database(server_url: str | None, sqlite_file: Path) -> Iterator[str]:
    """A fresh database for one measurement: a temporary one on ``server_url`` (PostgreSQL), dropped after,
    else the SQLite file ``sqlite_file``."""
    if not server_url:
        yield f"sqlite:///{sqlite_file}"
        return
    name = f"mammo_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--incomplete", type=float, default=0.03, help="share of studies with three views")
    parser.add_argument("--db-url", help="a PostgreSQL server URL (a temporary database is created on it)")
    parser.add_argument("--quick", action="store_true", help="10k studies only, 5 repeats")
    parser.add_argument("--json", type=Path, help="write the summary rows (ranked query against 50 ms) here")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.repeats = [10_000], 5
    backend = "PostgreSQL" if args.db_url else "SQLite"
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as folder:
        for count in args.studies:
            begin = time.perf_counter()
            with scratch_database(args.db_url, Path(folder) / f"triage-{count}.sqlite") as url:
                fill(url, count, args.incomplete)
                print(f"{count:>8} studies  filled in {time.perf_counter() - begin:.1f} s")
                medians = measure(url, count, args.repeats)
            ranked = medians[Section.RANKED.value]
            rows += [{"name": f"triage ranked query, {count:,} studies ({backend})", "figure": round(ranked, 2),
                      "baseline": None, "unit": "ms", "ratio": None, "target": "< 50 ms", "met": ranked < 50},
                     {"name": f"triage whole page, {count:,} studies ({backend})",
                      "figure": round(medians["page"], 1), "baseline": None, "unit": "ms", "ratio": None,
                      "target": None, "met": None}]
    if args.json:
        args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
