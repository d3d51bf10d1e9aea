"""A sender that releases its association has sent what it meant to: its complete studies need not settle.

The SCP notes the studies each association stored analysable instances to. When the peer releases the
association normally (A-RELEASE, not an abort), every one of those studies that now holds the four screening
views becomes READY at once instead of after ``study_settle_seconds``. A study with views missing still waits
for the inactivity timeout, and an instance arriving later re-opens the study (it is then analysed again).

While an open association's latest instance was of a study, and came less than ``BUSY_SECONDS`` ago, that
study is ``busy``: the scheduler does not promote it by the settle time, since the sender may be sending it
another image (a fifth view, a slow large one) and would have it analysed twice. It is promoted when the
sender releases, moves on to another study, or goes quiet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

from pynetdicom.events import Event
from sqlalchemy.orm import Session, sessionmaker

from worklist.completeness import Readiness, Turn, promote_studies

log = logging.getLogger(__name__)

BUSY_SECONDS = 60.0  # an open association quiet for this long is no longer sending its latest study


class ReleaseTracker:
    """Study UIDs per live association; ``released`` promotes them, ``closed`` forgets them."""

    def __init__(self, sessions: sessionmaker[Session], inactivity_timeout: float,
                 on_ready: Callable[[], None] | None = None, turn: Turn = nullcontext) -> None:
        """``on_ready`` is called after a release made a job READY (the node wakes its scheduler with it); each
        promotion is written in a ``turn`` of the database's writers."""
        self.sessions = sessions
        self.turn = turn
        self.readiness = Readiness.from_seconds(0.0, inactivity_timeout)
        self.on_ready = on_ready
        self._studies: dict[int, set[str]] = {}
        self._latest: dict[int, tuple[str, float]] = {}  # association -> (study of its latest instance, when)
        self._lock = threading.Lock()

    def stored(self, event: Event, study_uid: str) -> None:
        with self._lock:
            self._studies.setdefault(id(event.assoc), set()).add(study_uid)
            self._latest[id(event.assoc)] = (study_uid, time.monotonic())

    def busy(self) -> set[str]:
        """The studies open associations are still sending (see the module docstring)."""
        now = time.monotonic()
        with self._lock:
            return {study for study, when in self._latest.values() if now - when < BUSY_SECONDS}

    def _take(self, event: Event) -> set[str]:
        with self._lock:
            self._latest.pop(id(event.assoc), None)
            return self._studies.pop(id(event.assoc), set())

    def released(self, event: Event) -> None:
        """EVT_RELEASED: promote the association's complete studies now."""
        study_uids = self._take(event)
        if not study_uids:
            return
        try:
            jobs = promote_studies(self.sessions, sorted(study_uids), self.readiness, turn=self.turn)
        except Exception as error:  # the scheduler promotes them after the settle time anyway
            log.warning("could not promote the studies of a released association: %s", type(error).__name__)
            return
        if jobs and self.on_ready is not None:
            self.on_ready()

    def closed(self, event: Event) -> None:
        """EVT_CONN_CLOSE: an aborted or dropped association leaves its studies to the settle time."""
        self._take(event)
