"""Logging of every node process: text for people, or one JSON object per line for a log collector.

Log lines carry UIDs and job numbers, never patient names or IDs (a test sends real studies through the node
and checks every line). Structured context goes in ``extra``: ``log.info("...", extra={"study_uid": uid})``.
A logged exception shows its type and where it was raised, never its message: libraries put the values they
failed on into their messages (pydicom and highdicom quote dates and names), so a message is kept only where
patient data already lives (a failed job's error in the worklist, shown on its study page).
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from types import TracebackType

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("study_uid", "job_id", "sop_instance_uid", "calling_ae", "destination")


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error``, then the exception it was raised from or while handling, and so on (as Python prints them)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def traceback_without_messages(error: BaseException | None) -> str:
    """The traceback of ``error``, of the exceptions before it and of a group's members: frames and exception
    types, no messages."""
    blocks = []
    for exception in reversed(list(_chain(error))):
        kind = type(exception)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        frames = "".join(traceback.format_list(traceback.extract_tb(exception.__traceback__)))
        blocks.append(f"Traceback (most recent call last):\n{frames}{name} (message withheld from the log)")
        if isinstance(exception, BaseExceptionGroup):
            blocks += [traceback_without_messages(member) for member in exception.exceptions]
    return "\n\nDuring or because of that:\n\n".join(blocks)


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` lines; an exception as ``traceback_without_messages`` gives it."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        saved, record.exc_text = record.exc_text, None  # never another formatter's cached traceback, with messages
        try:
            return super().format(record)
        finally:
            record.exc_text = saved

    def formatException(self, ei: ExcInfo) -> str:  # noqa: N802 (logging's name)
        return traceback_without_messages(ei[1])


class JsonFormatter(TextFormatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, pid, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(), "pid": record.process}
        entry.update({name: getattr(record, name) for name in CONTEXT_FIELDS if hasattr(record, name)})
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Set the root logger of this process (the Celery worker keeps it: ``worker_hijack_root_logger`` is off)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
