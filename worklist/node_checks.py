"""What the triage API reports about the node: readiness checks, the model in service, broker queue depths.

Queue depth is read from the broker itself: for Redis, ``LLEN`` of each queue's lists (kombu keeps one list
per queue and priority step); for the embedded SQLite broker, the messages still visible (not yet taken by a
worker) in kombu's ``kombu_message`` table. Other brokers report no depth.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from dicom_node.tasks import GPU_QUEUE, IO_QUEUE, broker_url
from worklist.models import ModelVersion

QUEUES = (GPU_QUEUE, IO_QUEUE)
BROKER_TIMEOUT = 1.0  # seconds for a Redis connect or PING
REDIS_PRIORITY_SEPARATOR, REDIS_PRIORITY_STEPS = "\x06\x16", (3, 6, 9)  # kombu's Redis transport defaults
DEMO_MODEL = Path("cache") / "demo-model" / "model"  # under data_dir: training.demo.ensure_demo_model's folder
CARD_FILE = "card.json"


@dataclass(frozen=True)
class Check:
    """One readiness check; ``required`` checks decide readiness, the others only inform."""

    ok: bool | None
    detail: str
    required: bool = True


@dataclass(frozen=True)
class ServedModel:
    """The model the workers serve: the registry's active version, else the configured model, else the demo."""

    name: str
    source: str  # "registry", "configured" or "demo"
    path: Path
    card: dict[str, Any]

    @property
    def clinical(self) -> bool | None:
        """The card's ``clinical_use`` (None: the model has no card, e.g. a reference .tar checkpoint)."""
        return self.card.get("clinical_use") if self.card else None


def served_model(settings: Settings, sessions: sessionmaker[Session]) -> ServedModel:
    with sessions() as session:
        active = session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))
        if active is not None:
            return ServedModel(active.name, "registry", Path(active.path), dict(active.card or {}))
    if settings.model_path is not None:
        path = Path(settings.model_path)
        return ServedModel(path.name, "configured", path, _card(path))
    path = Path(settings.data_dir) / DEMO_MODEL
    return ServedModel("demo", "demo", path, _card(path) or {"clinical_use": False})


def _card(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        return {}


def readiness(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Check]:
    """Database, broker, free disk space in data_dir, and (informational) the served model's files."""
    checks = {"database": _database(sessions), "broker": _broker(broker_url(settings)),
              "disk": _disk(Path(settings.data_dir), settings.api_min_free_disk_mb)}
    try:
        model = served_model(settings, sessions)
    except SQLAlchemyError as error:
        checks["model"] = Check(None, f"unknown: database error {type(error).__name__}", required=False)
    else:
        checks["model"] = Check(model.path.exists(), f"{model.source} model {model.name}: files "
                                f"{'present' if model.path.exists() else 'missing'} at {model.path}; it is loaded "
                                "by the worker processes, which this check cannot see", required=False)
    return checks


def is_ready(checks: dict[str, Check]) -> bool:
    return all(check.ok for check in checks.values() if check.required)


def as_json(checks: dict[str, Check]) -> dict[str, Any]:
    return {"ready": is_ready(checks), "checks": {name: asdict(check) for name, check in checks.items()}}


def _database(sessions: sessionmaker[Session]) -> Check:
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        return Check(False, f"unreachable: {type(error).__name__}")
    return Check(True, "reachable (SELECT 1)")


def _broker(url: str) -> Check:
    if url.startswith(("redis://", "rediss://")):
        import redis

        try:
            redis.Redis.from_url(url, socket_connect_timeout=BROKER_TIMEOUT, socket_timeout=BROKER_TIMEOUT).ping()
        except (redis.RedisError, OSError) as error:
            return Check(False, f"Redis PING failed: {type(error).__name__}")
        return Check(True, "Redis answered PING")
    if url.startswith("sqla+sqlite:///"):
        folder = Path(url.removeprefix("sqla+sqlite:///")).parent
        writable = folder.is_dir() and os.access(folder, os.W_OK)
        return Check(writable, f"embedded SQLite broker: folder {folder} {'writable' if writable else 'not writable'}")
    return Check(None, f"not checked ({url.split(':', 1)[0]} broker)", required=False)


def _disk(folder: Path, minimum_mb: float) -> Check:
    try:
        free = shutil.disk_usage(folder).free / 2**20
    except OSError as error:
        return Check(False, f"{folder}: {error.strerror}")
    return Check(free >= minimum_mb, f"{free:.0f} MiB free in {folder} (minimum {minimum_mb:.0f} MiB)")


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in the broker per queue; empty when the broker cannot say (or cannot be reached)."""
    url = broker_url(settings)
    if url.startswith(("redis://", "rediss://")):
        import redis

        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=BROKER_TIMEOUT, socket_timeout=BROKER_TIMEOUT)
            return {queue: sum(client.llen(key) for key in (queue, *(f"{queue}{REDIS_PRIORITY_SEPARATOR}{step}"
                                                                      for step in REDIS_PRIORITY_STEPS)))
                    for queue in QUEUES}
        except (redis.RedisError, OSError):
            return {}
    if url.startswith("sqla+sqlite:///"):
        return _embedded_depths(Path(url.removeprefix("sqla+sqlite:///")))
    return {}


def _embedded_depths(path: Path) -> dict[str, int]:
    if not path.exists():
        return dict.fromkeys(QUEUES, 0)
    engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        with engine.connect() as connection:
            counts = dict(connection.execute(text(
                "SELECT q.name, count(m.id) FROM kombu_queue q LEFT JOIN kombu_message m "
                "ON m.queue_id = q.id AND m.visible GROUP BY q.name")).all())
    except SQLAlchemyError:  # locked, or not a kombu database: no depth rather than a wrong one
        return {}
    finally:
        engine.dispose()
    return {queue: int(counts.get(queue, 0)) for queue in QUEUES}
