"""SQLite's writers queue for their turn (``worklist.writers``): one at a time across threads and processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from worklist.writers import WriterQueue

HOLD_UNTIL_TOLD = """
import sys
from pathlib import Path
from worklist.writers import WriterQueue
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
