"""DCMTK peers of the benchmarks: storescu as a sender, storescp as a receiver (the Debian binaries, by path:
pynetdicom installs apps of the same names)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
# One child process per association (its default single-process mode would serve concurrent associations one
# after the other), every transfer syntax accepted, the data written as received, the largest PDU storescu sends.
# It does NOT fsync.
STORESCP_OPTIONS = ("--fork", "+xa", "+B", "-pdu", "131072")
# This DCMTK build leaves Nagle's algorithm on by default, and its split PDU writes then wait on delayed ACKs
# (~40 ms per instance, whatever the peer does).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@contextmanager
def storescp(out: Path, port: int, ae_title: str) -> Iterator[None]:
    """DCMTK's storescp as ``ae_title`` writing into ``out`` (its log next to it), listening once this is
    entered."""
    with (out.parent / "storescp.log").open("w") as log:
        process = subprocess.Popen([STORESCP, *STORESCP_OPTIONS, "-aet", ae_title, "-od", str(out), str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        try:
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"storescp exited with {process.returncode}:\n{Path(log.name).read_text()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield
        finally:
            process.terminate()
            process.wait(30)
