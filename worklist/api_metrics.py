"""The worklist's Prometheus metrics, read from the database at each scrape.

- ``mammo_instances``, ``mammo_studies{state}``, ``mammo_jobs{state}``, ``mammo_exports{state}``: row counts;
- ``mammo_job_stage_seconds{stage}``: histogram of the analysis stages each DONE job recorded (``Job.timings``).
  It is cumulative over this process's life: each scrape adds only the jobs that finished since the last
  one (the first scrape reads every finished job once);
- ``mammo_gpu_memory_peak_bytes{worker}``: per worker, the peak CUDA memory (model weights included) of its
  newest DONE job that recorded one (absent for a worker that never ran a job on CUDA); read with the histogram;
- ``mammo_model_info{name, source, clinical}``: the model in service (registry, configured or demo);
- ``mammo_queue_depth{queue}``: messages waiting in the broker (see ``worklist.node_checks``);
- ``mammo_suspicion_psi{model_version, week}``: per model version, the PSI of its newest compared week of
  suspicion scores against its reference week (``worklist.drift``; a version with none yet is absent).

The SCP's own counters (``dicom_node.metrics``) live in the default registry, served beside these.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from worklist.drift import DriftReport
from worklist.models import ExportState, Job, JobState, StudyState
from worklist.node_checks import queue_depths, served_model
from worklist.queries import node_status

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TERMINAL = (JobState.DONE, JobState.FAILED)


class FinishedJobs:
    """What the finished jobs recorded, updated incrementally: per-stage bucket counts of the DONE jobs'
    timings, and per worker the GPU memory peak of its newest (highest id) DONE job that recorded one.

    Every job with an id at or below ``watermark`` is terminal and counted; above it, ``seen`` holds the
    terminal jobs already counted while an older job was still running. A scrape reads only the jobs above the
    watermark (a primary-key range), so the GPU gauge needs no query of its own: ``job`` has no index on
    ``worker``, ``finished_at`` or the peak, and a per-worker MAX would scan the whole table at each scrape.
    """

    def __init__(self) -> None:
        self.watermark = 0
        self.seen: set[int] = set()
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.gpu_peaks: dict[str, tuple[int, int]] = {}  # worker -> (job id, peak bytes)
        self.lock = threading.Lock()

    def update(self, session: Session) -> None:
        with self.lock:
            rows = session.execute(select(Job.id, Job.state, Job.timings, Job.worker, Job.gpu_memory_peak_bytes)
                                   .where(Job.id > self.watermark).order_by(Job.id)).all()
            for job_id, state, timings, worker, peak in rows:
                if state in TERMINAL and job_id not in self.seen:
                    self.seen.add(job_id)
                    for stage, seconds in (timings or {}).items() if state == JobState.DONE else ():
                        self._observe(stage, float(seconds))
                    newest = self.gpu_peaks.get(worker or "", (0, 0))[0]
                    if state == JobState.DONE and worker and peak is not None and job_id > newest:
                        self.gpu_peaks[worker] = (job_id, peak)
            running = [row.id for row in rows if row.state not in TERMINAL]
            self.watermark = min(running) - 1 if running else max((row[0] for row in rows), default=self.watermark)
            self.seen = {job_id for job_id in self.seen if job_id > self.watermark}

    def _observe(self, stage: str, seconds: float) -> None:
        counts = self.buckets.setdefault(stage, [0] * (len(STAGE_BUCKETS) + 1))
        counts[next((n for n, bound in enumerate(STAGE_BUCKETS) if seconds <= bound), len(STAGE_BUCKETS))] += 1
        self.sums[stage] = self.sums.get(stage, 0.0) + seconds

    def stage_metric(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily("mammo_job_stage_seconds", "Analysis stage durations of DONE jobs.",
                                       labels=["stage"])
        with self.lock:
            for stage, counts in sorted(self.buckets.items()):
                cumulative, total = [], 0
                for bound, count in zip((*map(str, STAGE_BUCKETS), "+Inf"), counts, strict=True):
                    total += count
                    cumulative.append((bound, total))
                family.add_metric([stage], cumulative, self.sums[stage])
        return family

    def gpu_metric(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("mammo_gpu_memory_peak_bytes", "Peak CUDA memory of each worker's newest DONE "
                                   "job that ran on CUDA.", labels=["worker"])
        with self.lock:
            for worker, (_, peak) in sorted(self.gpu_peaks.items()):
                family.add_metric([worker], peak)
        return family


class WorklistCollector(Collector):
    """Reads the worklist (and the broker's queue depth) at each scrape; ``drift`` gives the drift report."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], drift: Callable[[], DriftReport]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.drift = drift
        self.finished = FinishedJobs()

    def collect(self) -> Iterator[Metric]:
        status = node_status(self.sessions)
        yield GaugeMetricFamily("mammo_instances", "Instances stored in the worklist.", value=status["instances"])
        for name, kinds, helptext in (("studies", StudyState, "Studies by state."),
                                      ("jobs", JobState, "Analysis jobs by state."),
                                      ("exports", ExportState, "Result exports (object x destination) by state.")):
            yield _by_label(f"mammo_{name}", helptext, "state",
                            {str(kind): status[name].get(str(kind), 0) for kind in kinds})
        with self.sessions() as session:
            self.finished.update(session)
        yield self.finished.stage_metric()
        yield self.finished.gpu_metric()
        model = served_model(self.settings, self.sessions)
        info = InfoMetricFamily("mammo_model", "The model in service.")
        info.add_metric([], {"name": model.name, "source": model.source, "clinical": str(model.clinical).lower()})
        yield info
        yield _by_label("mammo_queue_depth", "Messages waiting in the broker, by queue.", "queue",
                        queue_depths(self.settings))
        psi = GaugeMetricFamily("mammo_suspicion_psi", "PSI of the newest compared week of suspicion scores against "
                                "the model version's reference week.", labels=["model_version", "week"])
        for version in self.drift().versions:
            if version.latest is not None:
                psi.add_metric([version.version, version.latest.week], version.latest.psi)
        yield psi


def _by_label(name: str, helptext: str, label: str, values: dict[str, Any]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, helptext, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def worklist_registry(settings: Settings, sessions: sessionmaker[Session],
                      drift: Callable[[], DriftReport]) -> CollectorRegistry:
    """A registry of its own per app (the default registry holds the process and SCP metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorklistCollector(settings, sessions, drift))
    return registry
