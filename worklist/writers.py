"""A queue for SQLite's writers, so that concurrent writers wait for their turn instead of sleeping for it.

SQLite lets one writer in at a time. The others get SQLITE_BUSY and, with ``busy_timeout``, sleep and retry,
for 1, 2, 5, 10, ... up to 100 ms a try: a writer that comes a moment after another has committed sleeps on
anyway. With eight associations storing at once, the Storage SCP spent more time asleep than writing (8
associations: 25 instances/s with sleeps, 33 with this queue in one SCP process; 45 with four processes).

``WriterQueue.turn()`` is held around a write transaction: a ``threading.Lock`` orders the threads of a process,
and an exclusive ``flock`` on a file next to the database orders the processes (the SCP processes of
``scp_processes``); the kernel wakes the next waiter as soon as the lock is released. Writers that do not take
it (the scheduler, the workers) are still served by SQLite's own locking, as before. PostgreSQL needs no queue:
its writers lock rows, not the database.

A turn not had within ``TURN_TIMEOUT_SECONDS`` (SQLite's own busy timeout here) raises ``TimeoutError``: a writer
stuck in another process (a hung disk) makes the others fail with "out of resources", as SQLite's "database is
locked" did, instead of piling up. Waiting for another process's lock polls it every 0.5 ms (``flock`` itself
has no timeout); the threads of one process wait on their lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine

TURN_TIMEOUT_SECONDS = 30.0
RETRY_SECONDS = 0.0005


class WriterQueue:
    """Turns at writing to one SQLite database file (nothing to wait for elsewhere)."""

    def __init__(self, lock_file: Path | None, timeout: float = TURN_TIMEOUT_SECONDS) -> None:
        self.lock_file = lock_file
        self.timeout = timeout
        self._threads = threading.Lock()

    @classmethod
    def for_engine(cls, engine: Engine) -> WriterQueue:
        """The queue of ``engine``'s database: ``<database file>.writers`` for an SQLite file, none otherwise."""
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return cls(None)
        return cls(Path(database + ".writers"))

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for this thread's turn to write, and keep it until the block ends."""
        if self.lock_file is None:
            yield
            return
        deadline = time.monotonic() + self.timeout
        if not self._threads.acquire(timeout=self.timeout):
            raise self._late()
        try:
            descriptor = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise self._late() from None
                        time.sleep(RETRY_SECONDS)
                yield
            finally:
                os.close(descriptor)  # releases the lock (nothing is kept open between turns)
        finally:
            self._threads.release()

    def _late(self) -> TimeoutError:
        return TimeoutError(errno.ETIMEDOUT, f"no turn to write to the database within {self.timeout:.0f} s "
                                             f"(another writer holds {self.lock_file.name})")
