"""Files the node writes are readable by its user only: the CLI runs with umask 077."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port
from tests.peers import wait_for_port


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_and_received_instances_are_private(tmp_path: Path, synthetic_root: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MAMMO_")}, "MAMMO_DATA_DIR": str(data),
           "MAMMO_PORT": str(port), "MAMMO_API_PORT": str(free_port())}
    cli = [sys.executable, "-m", "dicom_node.cli"]
    assert subprocess.run([*cli, "db", "upgrade"], env=env, capture_output=True, timeout=120).returncode == 0
    node = subprocess.Popen([*cli, "serve", "--no-worker"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for_port(port, node, "the node", timeout=60)
        study = next(p for p in sorted(synthetic_root.iterdir()) if p.is_dir())
        sent = subprocess.run([*cli, "send", *map(str, sorted(study.glob("*.dcm"))), "--host", "127.0.0.1",
                               "--port", str(port), "--aec", "MAMMO_AI"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert sent.returncode == 0, sent.stderr
    finally:
        node.terminate()
        node.wait(timeout=60)
    written = [data / "worklist.sqlite", data / "worklist.sqlite.writers", *(data / "incoming").rglob("*")]
    assert len([path for path in written if path.suffix == ".dcm"]) == 4
    for path in written:
        assert _mode(path) & 0o077 == 0, f"{path} has mode {oct(_mode(path))}"
