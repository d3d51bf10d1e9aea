"""SQLite's writers queue for their turn (``worklist.writers``): one at a time across threads and processes."""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from tests.conftest import wait_for
from worklist.writers import GroupCommit, WriterQueue

HOLD_UNTIL_TOLD = """
import sys
from pathlib import Path
from tests.conftest import wait_for
from worklist.writers import GroupCommit, WriterQueue
with WriterQueue(Path(sys.argv[1])).turn():
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_the_queue_is_a_file_next_to_an_sqlite_database_and_nothing_elsewhere(tmp_path: Path) -> None:
    database = tmp_path / "worklist.sqlite"
    assert WriterQueue.for_engine(create_engine(f"sqlite:///{database}")).lock_file == Path(f"{database}.writers")
    assert WriterQueue.for_engine(create_engine("sqlite://")).lock_file is None
    assert WriterQueue.for_engine(create_engine("postgresql+psycopg://u@127.0.0.1/x")).lock_file is None


def test_threads_take_their_turns_one_at_a_time(tmp_path: Path) -> None:
    queue = WriterQueue(tmp_path / "db.writers")
    inside, most, turns = [0], [0], [0]

    def write() -> None:
        for _ in range(25):
            with queue.turn():
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                inside[0] -= 1
                turns[0] += 1

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert turns[0] == 200 and most[0] == 1


def test_a_process_waits_while_another_process_holds_the_turn(tmp_path: Path) -> None:
    lock_file = tmp_path / "db.writers"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_TOLD, str(lock_file)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        ours = threading.Event()

        def take_turn() -> None:
            with WriterQueue(lock_file).turn():
                ours.set()

        waiter = threading.Thread(target=take_turn)
        waiter.start()
        assert not ours.wait(0.5)  # the other process holds it until told
        with pytest.raises(TimeoutError, match="no turn to write"), WriterQueue(lock_file, timeout=0.2).turn():
            pass
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert ours.wait(30)
        waiter.join()
    finally:
        holder.kill()
        holder.wait()


def _submit_all(commit: GroupCommit, works: list[object]) -> dict[object, object]:
    """Submit each work from a thread of its own; its outcome, or the exception it raised, by work."""
    outcomes: dict[object, object] = {}

    def submit(work: object) -> None:
        try:
            outcomes[work] = commit.submit(work)
        except Exception as error:
            outcomes[work] = error

    threads = [threading.Thread(target=submit, args=(work,)) for work in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def _gate() -> tuple[threading.Event, object]:
    """A turn that is had once the event is set."""
    opened = threading.Event()

    @contextmanager
    def turn() -> Iterator[None]:
        assert opened.wait(30)
        yield

    return opened, turn


def test_works_queued_while_the_turn_is_awaited_are_written_in_one_batch_each_with_its_own_outcome() -> None:
    batches: list[list[int]] = []

    def write_batch(works: list[int]) -> list[object]:
        batches.append(works)
        return [ValueError(f"odd {work}") if work % 2 else work * 10 for work in works]

    opened, turn = _gate()
    commit = GroupCommit(write_batch, turn)
    outcomes: dict[object, object] = {}
    waiting = threading.Thread(target=lambda: outcomes.update(_submit_all(commit, list(range(6)))))
    waiting.start()
    wait_for(lambda: commit.queued == 6, "six works queued")
    opened.set()
    waiting.join(30)
    assert len(batches) == 1 and sorted(batches[0]) == list(range(6))
    assert {work: outcomes[work] for work in (0, 2, 4)} == {0: 0, 2: 20, 4: 40}
    assert all(isinstance(outcomes[work], ValueError) and str(outcomes[work]) == f"odd {work}" for work in (1, 3, 5))
    assert commit.submit(8) == 80 and batches[-1] == [8]  # a lone work is written at once


def test_a_batch_that_raises_fails_every_work_in_it_and_the_next_batch_is_written() -> None:
    def write_batch(works: list[int]) -> list[int]:
        if 13 in works:
            raise OSError(errno.EIO, "the disk failed")
        return works

    outcomes = _submit_all(GroupCommit(write_batch), [13])
    assert isinstance(outcomes[13], OSError)
    commit = GroupCommit(write_batch)
    assert commit.submit(1) == 1


def test_a_turn_not_had_fails_the_batch_and_work_not_taken_in_time_is_withdrawn(tmp_path: Path) -> None:
    lock_file = tmp_path / "db.writers"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_TOLD, str(lock_file)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    written: list[list[int]] = []
    try:
        assert holder.stdout.readline().strip() == "holding"
        commit = GroupCommit(lambda works: written.append(works) or works,
                             WriterQueue(lock_file, timeout=0.5).turn, timeout=0.2)
        outcomes = _submit_all(commit, [1, 2, 3])
        assert all(isinstance(outcome, TimeoutError) for outcome in outcomes.values()) and written == []
        assert commit.queued == 0  # nothing is left queued for a later batch to write
    finally:
        holder.kill()
        holder.wait()
    assert commit.submit(4) == 4 and written == [[4]]
