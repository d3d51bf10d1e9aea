"""The running node: Storage SCP, scheduler, and (embedded mode) a supervised Celery worker process.

The SCP runs in this process, or with ``scp_processes`` > 1 in that many supervised child processes sharing
the port (``dicom_node.scp_pool``).

``mammo-node serve`` builds one ``Node``; the demo and the tests build one in-process the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.memory import retain_freed_memory
from dicom_node.release import ReleaseTracker
from dicom_node.scheduler import Scheduler
from dicom_node.scp import start_scp
from dicom_node.scp_pool import ScpPool
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore
from worklist.db import make_engine, require_current, session_factory

log = logging.getLogger(__name__)

WORKER_QUEUES = "gpu,io"


class WorkerProcess:
    """A ``mammo-node worker`` child process, restarted when it dies."""

    def __init__(self, settings: Settings, concurrency: int, log_file: Path | None = None) -> None:
        self.argv = [sys.executable, "-m", "dicom_node.cli", "worker", "--queues", WORKER_QUEUES,
                     "--concurrency", str(concurrency)]
        self.env = {**os.environ, **settings.to_env()}
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self.name = ""

    def start(self) -> None:
        import socket

        if self.log_file is None:
            self.process = subprocess.Popen(self.argv, env=self.env)
        else:
            with self.log_file.open("ab") as log_handle:  # the child keeps its own copy of the descriptor
                self.process = subprocess.Popen(self.argv, env=self.env, stdout=log_handle,
                                                stderr=subprocess.STDOUT)
        self.name = f"{socket.gethostname()}:{self.process.pid}"
        log.info("worker process %s started", self.name)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # Celery warm shutdown: finish or re-queue the current task
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Node:
    """Everything ``serve`` runs, started and stopped together."""

    def __init__(self, settings: Settings, embedded_worker: bool = True, worker_concurrency: int = 2,
                 worker_log: Path | None = None) -> None:
        """``worker_log``: a file for the embedded worker's output (default: this process's stdout)."""
        from dicom_node.tasks import configure, send_analysis, send_export

        self.settings = settings
        configure(settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = make_engine(settings.database_url())
        require_current(self.engine)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        self.scheduler = Scheduler(settings, self.sessions, send_analysis, send_export)
        self.worker = WorkerProcess(settings, worker_concurrency, worker_log) if embedded_worker else None
        self.scheduler.on_stale = self._stale_worker
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.server: ThreadedAssociationServer | ScpPool | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> Node:
        """Reconcile, then listen, schedule and (embedded) run the worker."""
        self.scheduler.reconcile(release_running=self.worker is not None and self.settings.broker_url is None)
        self.server = self._start_scp()
        if self.worker is not None:
            self.worker.start()
            self._spawn(self._supervise, "worker-supervisor")
        self._spawn(lambda: self.scheduler.run(self._stop), "scheduler")
        return self

    def _start_scp(self) -> ThreadedAssociationServer | ScpPool:
        if self.settings.scp_processes > 1:
            return ScpPool(self.settings).start()
        if self.settings.retain_freed_memory:  # the SCP runs in this process
            retain_freed_memory()
        store = InstanceStore(self.settings.incoming_dir, self.sessions)
        senders = ReleaseTracker(self.sessions, self.settings.study_inactivity_timeout, self.scheduler.wake.set,
                                 store.writers.turn)
        self.scheduler.busy = senders.busy  # the studies its associations are still sending wait for them
        return start_scp(self.settings, store, self.settings.server_ssl_context(), senders=senders)

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            code = self.worker.exited()
            if code is None:
                continue
            log.error("worker process %s exited with code %s: restarting it", self.worker.name, code)
            dead = self.worker.name
            try:
                self.worker.start()
            except OSError as error:  # no memory or process slot right now: the next round tries again
                log.error("could not start a worker process (%s): trying again in 1 s", error)
                continue
            try:
                self.scheduler.worker_died(dead)
            except Exception as error:
                log.error("could not re-send the jobs of worker %s: %s", dead, error)

    def _stale_worker(self, worker: str) -> None:
        """A job of ``worker`` sent no heartbeat for ``job_stale_seconds``: when that is the embedded worker, it
        runs no Python (its heartbeat thread is stopped too: a hang in C code with the GIL held, which its own
        time limit cannot end), so it is killed, then restarted like any worker that died."""
        if self.worker is not None and worker == self.worker.name and self.worker.exited() is None:
            log.error("worker process %s has sent no heartbeat for %.0f s: killing it (hung)", worker,
                      self.settings.job_stale_seconds)
            self.worker.kill()

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.wake.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.server is not None:
            self.server.shutdown()
        if self.worker is not None:
            self.worker.stop()
        self.engine.dispose()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
