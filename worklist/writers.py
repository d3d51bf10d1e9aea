"""A queue for SQLite's writers, so that concurrent writers wait for their turn instead of sleeping for it.

SQLite lets one writer in at a time. The others get SQLITE_BUSY and, with ``busy_timeout``, sleep and retry,
for 1, 2, 5, 10, ... up to 100 ms a try: a writer that comes a moment after another has committed sleeps on
anyway. With eight associations storing at once, the Storage SCP spent more time asleep than writing (8
associations: 25 instances/s with sleeps, 33 with this queue in one SCP process; 45 with four processes).

``WriterQueue.turn()`` is held around a write transaction: a ``threading.Lock`` orders the threads of a process,
and an exclusive ``flock`` on a file next to the database orders the processes (the SCP processes of
``scp_processes``, and the promotions of studies at an association's release and by the scheduler). Writers
that do not take it (the workers, the scheduler's other writes) are still served by SQLite's own locking.
PostgreSQL needs no queue: its writers lock rows, not the database.

A turn not had within ``TURN_TIMEOUT_SECONDS`` (SQLite's own busy timeout here) raises ``TimeoutError``: a writer
stuck in another process (a hung disk) makes the others fail with "out of resources", as SQLite's "database is
locked" did, instead of piling up. Waiting for another process's lock polls it every 0.5 ms (``flock`` itself
has no timeout); the threads of one process wait on their lock.

``GroupCommit`` goes further: the threads of a process that want to write at the same moment hand their work to
one of them, which writes it all in one turn and one transaction (one commit, one fsync of the database) while
the others wait for their outcome. A turn's cost is partly per transaction (BEGIN, the commit and its fsync):
waiting associations share one. On this VM's disk the gain was within the noise on SQLite (batches of ~2 at
~70 instances/s); on PostgreSQL one SCP process went from 61-62 to 66-68 instances/s. Slower commits (network
storage) gain more.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from sqlalchemy import Engine

TURN_TIMEOUT_SECONDS = 30.0
RETRY_SECONDS = 0.0005

Work = TypeVar("Work")
Outcome = TypeVar("Outcome")


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


@dataclass(eq=False)
class _Submitted(Generic[Work, Outcome]):
    work: Work
    done: bool = False
    outcome: Outcome | None = None
    error: BaseException | None = field(default=None, repr=False)


class GroupCommit(Generic[Work, Outcome]):
    """Concurrent threads' work, written in batches: ``submit`` queues the work; a thread that finds no batch being
    written leads the next one: it waits for the writers' ``turn`` (when given), takes everything queued by then
    (its own work and what came while it waited) and runs ``write_batch`` on it, while the others wait; each then
    gets its own outcome or exception.

    ``write_batch(works)`` returns one outcome per work, in order, where an exception instance stands for that
    work's failure (the others are not failed by it); an exception it raises fails the whole batch, and a turn
    not had fails the leader's own work. Work not taken into a batch within ``timeout`` seconds is withdrawn with
    ``TimeoutError``; work being written is waited for.
    """

    def __init__(self, write_batch: Callable[[list[Work]], Sequence[Outcome | BaseException]],
                 turn: Callable[[], AbstractContextManager[object]] = nullcontext,
                 timeout: float = TURN_TIMEOUT_SECONDS) -> None:
        self.write_batch = write_batch
        self.turn = turn
        self.timeout = timeout
        self._changed = threading.Condition()
        self._queued: list[_Submitted[Work, Outcome]] = []
        self._writing = False

    @property
    def queued(self) -> int:
        """How many works wait to be taken into a batch."""
        with self._changed:
            return len(self._queued)

    def submit(self, work: Work) -> Outcome:
        """Write ``work`` in a batch and return its outcome (or raise its exception)."""
        submitted: _Submitted[Work, Outcome] = _Submitted(work)
        deadline = time.monotonic() + self.timeout
        with self._changed:
            self._queued.append(submitted)
            while self._writing and not submitted.done:
                left = deadline - time.monotonic()
                if left <= 0 and submitted in self._queued:
                    self._queued.remove(submitted)
                    raise TimeoutError(errno.ETIMEDOUT, f"no turn to write within {self.timeout:.0f} s")
                self._changed.wait(max(left, RETRY_SECONDS * 100))
            leads = not submitted.done  # no batch is being written: this thread writes the next one
            self._writing = self._writing or leads
        if leads:
            self._lead(submitted)
        if submitted.error is not None:
            raise submitted.error
        return submitted.outcome  # type: ignore[return-value]

    def _lead(self, own: _Submitted[Work, Outcome]) -> None:
        batch: list[_Submitted[Work, Outcome]] = []
        try:
            with self.turn():
                batch = self._take()
                outcomes: Sequence[Outcome | BaseException] = self.write_batch([item.work for item in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"write_batch returned {len(outcomes)} outcomes for {len(batch)} works")
        except BaseException as error:  # every waiting thread of the batch gets it
            if not batch:  # no turn: only this thread's work fails; the others elect a leader of their own
                with self._changed:
                    self._queued.remove(own)
                batch = [own]
            outcomes = [error] * len(batch)
        with self._changed:
            for item, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    item.error = outcome
                else:
                    item.outcome = outcome
                item.done = True
            self._writing = False
            self._changed.notify_all()

    def _take(self) -> list[_Submitted[Work, Outcome]]:
        with self._changed:
            batch, self._queued = self._queued, []
        return batch
