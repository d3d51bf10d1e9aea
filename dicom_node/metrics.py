"""Prometheus counters of the Storage SCP, in the default registry (served by the triage API's /metrics).

They count events of this process since it started; the worklist's totals (studies, jobs, exports by state)
are read from the database by ``worklist.api_metrics`` instead.
"""

from __future__ import annotations

from prometheus_client import Counter

# Reasons a C-STORE is refused (the status the SCP answers is in brackets).
MALFORMED = "malformed"          # invalid UID or malformed dataset [0xC000]
UNDECODABLE = "undecodable"      # the dataset could not be decoded [0xC000]
DISK_FULL = "disk_full"          # ENOSPC writing the file [0xA700]
IO_ERROR = "io_error"            # another OSError writing the file [0xA700]
DATABASE_ERROR = "database_error"  # the instance's row could not be committed [0xA700]
REJECT_REASONS = (MALFORMED, UNDECODABLE, DISK_FULL, IO_ERROR, DATABASE_ERROR)

INSTANCES_STORED = Counter(
    "mammo_scp_instances_stored", "Instances stored and committed (C-STORE answered Success).", ["analysable"])
ASSOCIATIONS = Counter("mammo_scp_associations", "Associations requested of the SCP, by outcome.", ["outcome"])
STORE_REJECTS = Counter("mammo_scp_store_rejects", "C-STORE requests refused, by reason.", ["reason"])

for _value in ("true", "false"):
    INSTANCES_STORED.labels(_value)
for _value in ("accepted", "rejected"):
    ASSOCIATIONS.labels(_value)
for _value in REJECT_REASONS:
    STORE_REJECTS.labels(_value)


def stored(analysable: bool) -> None:
    INSTANCES_STORED.labels("true" if analysable else "false").inc()


def association(accepted: bool) -> None:
    ASSOCIATIONS.labels("accepted" if accepted else "rejected").inc()


def rejected(reason: str) -> None:
    STORE_REJECTS.labels(reason).inc()
