"""Prometheus counters of the Storage SCP, in the default registry (served by the triage API's /metrics).

They count events since the node started; the worklist's totals (studies, jobs, exports by state) are read
from the database by ``worklist.api_metrics`` instead.

With several SCP processes (``scp_processes`` > 1, ``dicom_node.scp_pool``) each child counts in
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``: one file per process under
``data_dir/prometheus``), and the node process, which receives nothing itself, serves the totals summed over
those files (``aggregate``): a restarted child's counts are kept, so the totals never go down.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# Reasons a C-STORE is refused (the status the SCP answers is in brackets).
MALFORMED = "malformed"          # invalid UID or malformed dataset [0xC000]
UNDECODABLE = "undecodable"      # the dataset could not be decoded [0xC000]
DISK_FULL = "disk_full"          # ENOSPC writing the file [0xA700]
IO_ERROR = "io_error"            # another OSError writing the file [0xA700]
DATABASE_ERROR = "database_error"  # the instance's row could not be committed [0xA700]
OUT_OF_MEMORY = "out_of_memory"  # no memory to decode or store it [0xA700]
INTERNAL_ERROR = "internal_error"  # the node failed storing a valid dataset (shutting down, a bug) [0xA700]
REJECT_REASONS = (MALFORMED, UNDECODABLE, DISK_FULL, IO_ERROR, DATABASE_ERROR, OUT_OF_MEMORY, INTERNAL_ERROR)

INSTANCES_STORED = Counter("mammo_scp_instances_stored", "Instances stored and committed (C-STORE answered Success).",
                           ["analysable"], registry=None)
ASSOCIATIONS = Counter("mammo_scp_associations", "Associations requested of the SCP, by outcome.", ["outcome"],
                       registry=None)
STORE_REJECTS = Counter("mammo_scp_store_rejects", "C-STORE requests refused, by reason.", ["reason"], registry=None)
COUNTERS = (INSTANCES_STORED, ASSOCIATIONS, STORE_REJECTS)
NAMES = frozenset(metric.name for counter in COUNTERS for metric in counter.describe())

for _value in ("true", "false"):
    INSTANCES_STORED.labels(_value)
for _value in ("accepted", "rejected"):
    ASSOCIATIONS.labels(_value)
for _value in REJECT_REASONS:
    STORE_REJECTS.labels(_value)


class ScpCollector(Collector):
    """The SCP counters: this process's own, or the sums over the SCP processes' files in ``directory``."""

    def __init__(self) -> None:
        self.directory: Path | None = None

    def describe(self) -> Iterator[Metric]:
        for counter in COUNTERS:
            yield from counter.describe()

    def collect(self) -> Iterator[Metric]:
        if self.directory is None:
            for counter in COUNTERS:
                yield from counter.collect()
        else:
            metrics = MultiProcessCollector(None, str(self.directory)).collect()
            yield from (metric for metric in metrics if metric.name in NAMES)


SCP_COLLECTOR = ScpCollector()
REGISTRY.register(SCP_COLLECTOR)


def aggregate(directory: Path | None) -> None:
    """Serve the totals of the SCP processes counting in ``directory`` (``None``: this process's counters)."""
    SCP_COLLECTOR.directory = directory


def stored(analysable: bool) -> None:
    INSTANCES_STORED.labels("true" if analysable else "false").inc()


def association(accepted: bool) -> None:
    ASSOCIATIONS.labels("accepted" if accepted else "rejected").inc()


def rejected(reason: str) -> None:
    STORE_REJECTS.labels(reason).inc()
