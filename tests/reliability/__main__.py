"""``python -m tests.reliability [--full] [--only NAME ...] [--work DIR]``: run the scenarios, print the table,
exit non-zero when any row lost or duplicated anything (or could not run)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.reliability.harness import Row, make_studies, model_versions, unexpected
from tests.reliability.scenarios import SCENARIOS, Suite

POOL = {False: 24, True: 264}


def table(rows: list[Row]) -> str:
    """The result table (markdown), then each row's notes and problems."""
    header = ("scenario", "sent", "stored", "analysed", "delivered", "duplicates", "lost", "result", "time")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(f"| {row.scenario} | {row.sent} | {row.stored} | {row.analysed} | {row.delivered} | "
                     f"{row.duplicates} | {row.lost} | {'ok' if row.ok else 'FAIL'} | {row.seconds:.0f} s |")
    for row in rows:
        for note in row.notes:
            lines.append(f"- {row.scenario}: {note}")
        for problem in row.problems:
            lines.append(f"- {row.scenario}: PROBLEM: {problem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    parser.add_argument("--full", action="store_true", help="the long versions (1000+ instances, minutes down)")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--work", type=Path, help="keep the run's files (logs, data, PACS) in this folder")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mammo-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    suite = Suite(work, model_versions(work / "model")["tiny"], make_studies(work / "studies", POOL[args.full]),
                  full=args.full)
    rows = []
    for name in args.only or list(SCENARIOS):
        print(f"--- {name}{' (full)' if args.full else ''}", flush=True)
        started = time.monotonic()
        try:
            row = SCENARIOS[name](suite)
        except BaseException as error:  # a scenario that cannot run (or crashes) is a failed row
            if isinstance(error, KeyboardInterrupt):
                raise
            row = Row(name, seconds=time.monotonic() - started)
            row.problems.append(f"did not run to the end: {type(error).__name__}: {error}")
            if unexpected(error):
                traceback.print_exc()
        print(table([row]).splitlines()[2], flush=True)
        rows.append(row)
    print()
    print(table(rows))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
