"""The node's Storage SCP in a process of its own, so that the fuzz tests can watch its memory and its log.

``python -m tests.fuzz_node DATA_DIR PORT``: migrates the SQLite worklist under DATA_DIR, serves the same
``start_scp`` + ``InstanceStore`` as ``mammo-node serve`` (without scheduler and worker), prints ``ready``, and
stops when its standard input closes. It logs to standard error at INFO level.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore
from worklist.db import make_engine, session_factory, upgrade


def main(argv: list[str]) -> None:
    """Serve until standard input closes."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(data_dir=Path(argv[0]), port=int(argv[1]))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url())
    upgrade(engine)
    server = start_scp(settings, InstanceStore(settings.incoming_dir, session_factory(engine)))
    print("ready", flush=True)
    sys.stdin.read()
    server.shutdown()
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1:])
