"""``mammo-node archive convert``: each indexed image becomes the model's uint8 input, once.

The conversion is ``models.preprocess.dicom_to_uint8``, the very function inference uses, so training sees
what the node will see. Each result is a ``.npy`` file (memory-mappable) written atomically under
``cache_dir/<cache key>/``; the key hashes the preprocessing settings, so changing the input size converts
again into a new folder and never mixes sizes. The index points each image at one file; going back to settings
converted before re-points it at that file, still on disk, without converting again. Work is spread over
processes with a progress bar; a rerun converts only images without a current cache file (resumable after a
kill, idempotent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from dicom_node.durable_files import atomic_write
from models.preprocess import PreprocessConfig
from training.archive.store import ArchiveImage
from worklist.models import utcnow

log = logging.getLogger(__name__)

CONVERT_VERSION = 1
COMMIT_EVERY = 200


def cache_key(config: PreprocessConfig) -> str:
    """Names the preprocessing that produced a cache file (the normalization is applied later, at load). Windowed
    conversions keep the key they had before ``apply_voi`` existed (they were all windowed): still current."""
    fields = {name: value for name, value in asdict(config).items()
              if name not in ("mean", "std") and not (name == "apply_voi" and value)}
    text = json.dumps({"version": CONVERT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_file(cache_dir: Path, key: str, sop_instance_uid: str) -> Path:
    name = hashlib.sha1(sop_instance_uid.encode()).hexdigest()
    return Path(cache_dir, key, name[:2], f"{name}.npy")


@dataclass(frozen=True)
class ConvertTask:
    image_id: int
    source: str
    target: str


@dataclass(frozen=True)
class ConvertOutcome:
    image_id: int
    target: str
    error: str | None


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one image per process: no nested thread pools


def _convert(task: ConvertTask, config: PreprocessConfig) -> ConvertOutcome:
    from models.preprocess import dicom_to_uint8

    try:
        image = dicom_to_uint8(Path(task.source), config)
    except Exception as error:  # one bad file must not stop the archive; it is recorded with its reason
        return ConvertOutcome(task.image_id, task.target, f"{type(error).__name__}: {error}"[:500])
    buffer = BytesIO()
    np.save(buffer, np.ascontiguousarray(image, dtype=np.uint8))
    atomic_write(Path(task.target), buffer.getvalue())
    return ConvertOutcome(task.image_id, task.target, None)


def _pending(session: Session, cache_dir: Path, key: str, retry_failed: bool) -> tuple[
        list[ConvertTask], list[ConvertOutcome]]:
    """The images to convert, and those whose file for ``key`` is already on disk (``_reusable``)."""
    query = select(ArchiveImage.id, ArchiveImage.sop_instance_uid, ArchiveImage.path).where(
        or_(ArchiveImage.cache_key.is_(None), ArchiveImage.cache_key != key))
    if not retry_failed:
        query = query.where(ArchiveImage.convert_error.is_(None))
    tasks: list[ConvertTask] = []
    reused: list[ConvertOutcome] = []
    for image_id, sop, path in session.execute(query.order_by(ArchiveImage.id)):
        target = cache_file(cache_dir, key, sop)
        if _reusable(target, Path(path)):
            reused.append(ConvertOutcome(image_id, str(target), None))
        else:
            tasks.append(ConvertTask(image_id, path, str(target)))
    return tasks, reused


def _reusable(target: Path, source: Path) -> bool:
    """Whether an earlier conversion with these settings left ``target`` (the index now points at another
    size's file: converting at 1520x912, then 1024x512, then 1520x912 again reconverts nothing) and the source
    has not changed since it was written. Files are written whole (``atomic_write``) or not at all."""
    try:
        return target.stat().st_mtime_ns >= source.stat().st_mtime_ns
    except OSError:
        return False


def _run(tasks: list[ConvertTask], config: PreprocessConfig, workers: int) -> Iterator[ConvertOutcome]:
    if workers <= 1:
        _init_worker()
        yield from (_convert(task, config) for task in tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_Converter(config), tasks, chunksize=4)


class _Converter:
    """A picklable ``_convert`` bound to the configuration (for the process pool)."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config

    def __call__(self, task: ConvertTask) -> ConvertOutcome:
        return _convert(task, self.config)


@dataclass
class ConvertSummary:
    """``already_current``: images the index pointed at a file of these settings; ``reused``: images it pointed
    at another size's file whose file of these settings was still on disk (re-pointed, not reconverted)."""

    converted: int
    failed: int
    already_current: int
    cache_folder: Path
    reused: int = 0


def convert_archive(sessions: sessionmaker[Session], cache_dir: Path, config: PreprocessConfig,
                    workers: int | None = None, retry_failed: bool = False, progress: bool = True) -> ConvertSummary:
    """Convert every indexed image that has no current cache file; record each outcome in the index."""
    key = cache_key(config)
    with sessions() as session:
        tasks, reused = _pending(session, cache_dir, key, retry_failed)
        total = session.query(ArchiveImage).count()
    _record(sessions, reused, key)
    workers = workers or max(1, min(os.cpu_count() or 1, len(tasks)))
    converted = failed = 0
    batch: list[ConvertOutcome] = []
    for outcome in tqdm(_run(tasks, config, workers), total=len(tasks), desc="converting", unit="image",
                        disable=not progress):
        batch.append(outcome)
        converted += outcome.error is None
        failed += outcome.error is not None
        if len(batch) >= COMMIT_EVERY:
            _record(sessions, batch, key)
            batch = []
    _record(sessions, batch, key)
    log.info("converted %d images (%d failed, %d earlier conversions reused) into %s", converted, failed,
             len(reused), Path(cache_dir, key))
    return ConvertSummary(converted, failed, total - len(tasks) - len(reused), Path(cache_dir, key), len(reused))


def _record(sessions: sessionmaker[Session], outcomes: list[ConvertOutcome], key: str) -> None:
    with sessions.begin() as session:
        for outcome in outcomes:
            ok = outcome.error is None
            session.execute(update(ArchiveImage).where(ArchiveImage.id == outcome.image_id).values(
                cache_path=outcome.target if ok else None, cache_key=key if ok else None,
                converted_at=utcnow() if ok else None, convert_error=outcome.error))
