"""End-to-end latency: last instance received -> SR delivered, split into stages, on embedded defaults.

A node (SCP, scheduler, embedded Celery worker on the SQLite broker, SQLite worklist) and a local destination
SCP run on this machine. Each synthetic four-view study is sent by C-STORE; the stages are read back from
the worklist's own timestamps:

    settle      last instance received -> study READY (the configured settle time)
    queue       READY -> a worker claimed the job (scheduler tick, broker, worker pick-up)
    preprocess, model, heatmaps, encode   the analysis stages (the worker's stopwatch)
    record      analysis finished -> result committed
    export      result committed -> every object delivered (queue + C-STORE)

The overlay PNGs are drawn after the result is committed and its exports queued, while the results travel (they
are for the triage page, not for PACS): they are not a stage of this path. The worker runs as the embedded
default does, with two task slots, so an export does not wait for the overlays of its own study.

The destination PACS is the demo's (a pynetdicom Storage SCP in this process), or with ``--destination storescp``
DCMTK's storescp (C++, like the archives a node sends to: Orthanc, dcm4chee): the export stage includes the
destination's own receiving, and a Python receiver spends ~55 ms of CPU per 7 MB object (benchmarks/ingest.py).

The baseline is the model time measured in the same run: the project's target is total <= model + 2 s.

    python benchmarks/latency.py                       # demo model (trained once if missing), 1024x832 studies
    python benchmarks/latency.py --model /models/b5.tar --text-encoder /models/bioclinicalbert --size 4096x3328
    python benchmarks/latency.py --size 4096x3328 --destination storescp   # clinical size, a native PACS
    python benchmarks/latency.py --quick --json rows.json   # 2 studies of 512x416; summary rows as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from dcmtk_peers import storescp
from sqlalchemy import func, select

from dicom_node.demo import LocalReceiver, free_port
from dicom_node.node import Node
from dicom_node.scu import send_files
from dicom_node.settings import Destination, Settings, load_settings
from training.synthetic import write_studies
from worklist.db import make_engine, upgrade
from worklist.models import Export, ExportState, Instance, Job, JobState, Study

STAGES = ("settle", "queue", "preprocess", "model", "heatmaps", "encode", "record", "export")


def seconds(later, earlier) -> float:
    return (later.replace(tzinfo=None) - earlier.replace(tzinfo=None)).total_seconds()


def stage_times(node: Node, study_uid: str) -> dict[str, float] | None:
    """The stages of the study's finished job, or None while it is not delivered."""
    with node.sessions() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        job = session.scalar(select(Job).where(Job.study_id == study.id)) if study else None
        if job is None or job.state not in (JobState.DONE, JobState.FAILED):
            return None
        if job.state == JobState.FAILED:
            raise SystemExit(f"job failed: {job.error}")
        exports = session.scalars(select(Export).where(Export.job_id == job.id)).all()
        if any(e.state != ExportState.DELIVERED for e in exports):
            return None
        last_instance = session.scalar(select(func.max(Instance.received_at)).where(Instance.study_id == study.id))
        delivered = max(e.delivered_at for e in exports)
        analysis = dict(job.timings)
        times = {"settle": seconds(job.created_at, last_instance), "queue": seconds(job.started_at, job.created_at),
                 **analysis, "record": seconds(job.finished_at, job.started_at) - sum(analysis.values()),
                 "export": seconds(delivered, job.finished_at)}
        times["total"] = seconds(delivered, last_instance)
        return times


PACS_AE = "DEMO_PACS"


@contextmanager
def destination(kind: str, folder: Path) -> Iterator[int]:
    """The destination PACS writing into ``folder``, listening on the port yielded: the demo's pynetdicom SCP or
    DCMTK's storescp."""
    if kind == "storescp":
        folder.mkdir(parents=True)
        port = free_port()
        with storescp(folder, port, PACS_AE):
            yield port
        return
    receiver = LocalReceiver(folder)
    try:
        yield receiver.start()
    finally:
        receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint or model version (default: the demo model)")
    parser.add_argument("--text-encoder", type=Path, help="text encoder directory for a reference .tar")
    parser.add_argument("--studies", type=int, default=3, help="studies to send; the medians leave out the first, "
                                                                   "which also waits for the worker's start-up")
    parser.add_argument("--size", default="1024x832", help="ROWSxCOLS of the synthetic images")
    parser.add_argument("--settle", type=float, default=0.5, help="study settle time (s)")
    parser.add_argument("--data-dir", type=Path, help="where the node keeps its files (default: a temp dir)")
    parser.add_argument("--destination", choices=("demo", "storescp"), default="demo",
                        help="the PACS the results go to: the demo's pynetdicom SCP or DCMTK's storescp")
    parser.add_argument("--quick", action="store_true", help="2 studies of 512x416: a smoke run")
    parser.add_argument("--json", type=Path, help="write the summary row (total against model + 2 s) here")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.size = 2, "512x416"
    rows, cols = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="mammo-latency-") as scratch:
        root = Path(scratch)
        data_dir = args.data_dir or root / "data"
        model = args.model
        if model is None:
            from training.demo import ensure_demo_model

            model = ensure_demo_model(load_settings().data_dir / "cache")  # the demo's own cache
        with destination(args.destination, root / "pacs") as pacs_port:
            settings = Settings(data_dir=data_dir, port=free_port(), model_path=model,
                                text_encoder_path=args.text_encoder, study_settle_seconds=args.settle,
                                destinations=[Destination(name="bench", ae_title=PACS_AE, host="127.0.0.1",
                                                          port=pacs_port)])
            data_dir.mkdir(parents=True, exist_ok=True)
            upgrade(make_engine(settings.database_url()))
            write_studies(root / "studies", args.studies, seed=500, rows=rows, cols=cols, progress=False)
            folders = sorted(p for p in (root / "studies").iterdir() if p.is_dir())
            results = []
            with Node(settings) as node:
                for folder in folders:
                    files = sorted(folder.glob("*.dcm"))
                    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                    send_files(Destination(name="node", ae_title=settings.ae_title, host="127.0.0.1",
                                           port=node.port), files, "BENCH")
                    deadline = time.monotonic() + 900
                    while (times := stage_times(node, study_uid)) is None:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"study {study_uid} not delivered in 900 s")
                        time.sleep(0.05)
                    results.append(times)

    print(f"\nlast instance received -> SR and SEGs delivered to {args.destination}; {args.studies} studies of "
          f"4 x {rows}x{cols}, model {model}")
    warm = results[1:] or results  # the first study also waits for the worker's start-up and model load
    print(f"{'stage':<12}" + "".join(f"{'study ' + str(i + 1):>10}" for i in range(len(results))) + f"{'median':>10}")
    for stage in (*STAGES, "total"):
        values = [r.get(stage, 0.0) for r in results]
        median = statistics.median(r.get(stage, 0.0) for r in warm)
        print(f"{stage:<12}" + "".join(f"{v:10.2f}" for v in values) + f"{median:10.2f}")
    model_time = statistics.median(r["model"] for r in warm)
    total = statistics.median(r["total"] for r in warm)
    print(f"\nmedian total {total:.2f} s = model {model_time:.2f} s + {total - model_time:.2f} s "
          f"(target: model + 2 s at most); total / model = {total / model_time:.2f}x")
    print(("The medians leave out study 1, which" if len(results) > 1 else "The one study") +
          " also waits for the worker's start-up. Not a clinical model unless --model says otherwise.")
    if args.json:
        args.json.write_text(json.dumps([{
            "name": f"end to end: last instance -> SR delivered to {args.destination} ({rows}x{cols}, median of "
                    f"{len(warm)} after a warm-up study)" if len(results) > 1 else
                    f"end to end: last instance -> SR delivered to {args.destination} ({rows}x{cols}, one study "
                    "with the worker's start-up)",
            "figure": round(total, 2), "baseline": round(model_time, 2), "unit": "s",
            "ratio": None, "target": "<= model + 2 s", "met": total <= model_time + 2}]))


if __name__ == "__main__":
    main()
