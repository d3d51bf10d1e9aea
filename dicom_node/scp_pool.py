"""Several Storage SCP processes on one port, so that concurrent associations do not share one interpreter lock.

``ScpPool`` starts ``scp_processes`` children (``python -m dicom_node.scp_pool``). Each is the SCP of
``dicom_node.scp`` with its own database engine, its listening socket bound with SO_REUSEPORT, and the Linux
kernel spreads incoming connections over them. Every guarantee of the in-process SCP holds in each child: Success
only once the file is fsynced and its row committed, the AE title, allow-list, TLS, C-ECHO and C-FIND;
``maximum_associations`` applies to each child (the kernel hashes connections, it does not balance them).

- Settings reach a child as ``MAMMO_*`` variables (``Settings.to_env``; no settings file is read), like the
  embedded worker; it configures logging from them and writes to the node's stderr.
- Metrics: each child counts in prometheus_client's multiprocess mode under ``data_dir/prometheus`` (emptied at
  start); the node serves the sums (``dicom_node.metrics.aggregate``).
- Supervision: a child that exits is restarted within a second; a child whose node is gone stops by itself.
- Stop: SIGTERM; a child stops listening, gives its associations up to ``STOP_GRACE_SECONDS`` to end, and exits
  (an instance cut short was never answered Success, so its sender sends it again).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

from dicom_node import metrics
from dicom_node.settings import CONFIG_ENV, Settings
from models.errors import NodeError

log = logging.getLogger("dicom_node.scp_pool")  # also when run as __main__ (a child)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STOP_GRACE_SECONDS = 10.0
START_TIMEOUT_SECONDS = 120.0


class _Child:
    """One SCP process, and the pipe on which it says that it listens."""

    def __init__(self, env: dict[str, str]) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "dicom_node.scp_pool", str(write_fd)], env=env,
                                            pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._pipe: int | None = read_fd
        self.ready = False

    def wait_ready(self, timeout: float) -> bool:
        """Whether the child listens, waiting up to ``timeout`` seconds for it to say so."""
        if self._pipe is not None and select.select([self._pipe], [], [], max(timeout, 0.0))[0]:
            self.ready = os.read(self._pipe, 1) == b"1"  # b"": it exited first
            self._close_pipe()
        return self.ready

    def stop(self, timeout: float) -> None:
        """Wait for the (signalled) child to exit; kill it after ``timeout`` seconds."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("SCP process %d did not stop within %.0f s: killing it", self.process.pid, timeout)
            self.process.kill()
            self.process.wait()
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None


class ScpPool:
    """``processes`` SCP child processes listening on ``settings.port``, restarted when they die.

    It stands in for the in-process server: ``server_address`` and ``shutdown()``.
    """

    def __init__(self, settings: Settings, processes: int | None = None) -> None:
        self.settings = settings
        self.processes = processes or settings.scp_processes
        self.metrics_dir = Path(settings.data_dir) / "prometheus"
        self.env = {**os.environ, **settings.to_env(), CONFIG_ENV: os.devnull, MULTIPROC_ENV: str(self.metrics_dir)}
        self.children: list[_Child] = []
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.settings.bind_host, self.settings.port

    def pids(self) -> list[int]:
        """The process ids of the current children."""
        return [child.process.pid for child in self.children]

    def start(self) -> ScpPool:
        """Start the children and return once each listens; ``OSError`` if the port is taken, ``NodeError`` if a
        child exits first (its log says why)."""
        if not hasattr(socket, "SO_REUSEPORT"):
            raise NodeError("scp_processes > 1 needs SO_REUSEPORT (Linux); set scp_processes = 1")
        self.settings.server_ssl_context()  # a bad certificate fails here, as with the in-process SCP
        require_free_port(self.settings.bind_host, self.settings.port)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.metrics_dir.glob("*.db"):
            stale.unlink()
        try:
            for _ in range(self.processes):
                self.children.append(_Child(self.env))
            self.wait_ready(START_TIMEOUT_SECONDS)
        except BaseException:
            self._stop_children()
            raise
        metrics.aggregate(self.metrics_dir)
        self._supervisor = threading.Thread(target=self._supervise, name="scp-supervisor", daemon=True)
        self._supervisor.start()
        log.info("Storage SCP %s listening on %s:%d in %d processes %s", self.settings.ae_title,
                 self.settings.bind_host, self.settings.port, self.processes, self.pids())
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait until every current child listens; ``NodeError`` if one exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        for child in list(self.children):
            if not child.wait_ready(deadline - time.monotonic()):
                code = child.process.poll()
                state = "did not listen in time" if code is None else f"exited with code {code} before listening"
                raise NodeError(f"SCP process {child.process.pid} {state} (its log is above)")

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            for index, child in enumerate(self.children):
                code = child.process.poll()
                if code is None:
                    continue
                log.error("SCP process %d exited with code %s: restarting it", child.process.pid, code)
                child.stop(0)
                try:
                    self.children[index] = _Child(self.env)
                except OSError as error:
                    log.error("could not restart an SCP process: %s", error)

    def shutdown(self) -> None:
        """Stop supervising, then stop every child (SIGTERM, then SIGKILL after the grace period)."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join()
        self._stop_children()
        metrics.aggregate(None)
        log.info("Storage SCP processes stopped")

    def _stop_children(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.terminate()
        for child in self.children:
            child.stop(STOP_GRACE_SECONDS + 5.0)


def require_free_port(host: str, port: int) -> None:
    """``OSError`` (address in use) if anything listens on the port: with SO_REUSEPORT the children would
    otherwise share it with a stale node of the same user instead of failing as the in-process SCP does."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def _serve(ready_fd: int) -> None:
    """A child's body: listen, say so on ``ready_fd``, serve until SIGTERM or until the node process is gone."""
    from dicom_node.logs import configure_logging
    from dicom_node.memory import freeze_startup_objects, retain_freed_memory
    from dicom_node.scp import make_shared_port_server
    from dicom_node.storage import InstanceStore
    from worklist.db import make_engine, session_factory

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.retain_freed_memory:
        retain_freed_memory()
    if settings.log_level != "DEBUG":  # as `mammo-node serve`: the node logs each stored instance itself
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the node stops us
    engine = make_engine(settings.database_url())
    server = make_shared_port_server(settings, InstanceStore(settings.incoming_dir, session_factory(engine)),
                                     settings.server_ssl_context())
    threading.Thread(target=_stop_when_told, args=(server, stop, os.getppid()), daemon=True).start()
    freeze_startup_objects()
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    engine.dispose()
    log.info("SCP process %d stopped", os.getpid())


def _stop_when_told(server: socketserver.BaseServer, stop: threading.Event, parent: int) -> None:
    while not stop.wait(0.5) and os.getppid() == parent:
        pass
    socketserver.BaseServer.shutdown(server)  # stops serve_forever (pynetdicom's shutdown is for start_server)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
