"""Real DICOM peers the tests send to: DCMTK's storescp and Orthanc, each on free localhost ports."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom

from tests.conftest import free_port, require_tool


def wait_for_port(port: int, process: subprocess.Popen, name: str, timeout: float = 20.0) -> None:
    """Return once something listens on ``port``; fail if ``process`` exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            stderr = process.stderr.read().decode(errors="replace") if process.poll() is not None and \
                process.stderr else ""
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start listening on {port}: {stderr[-2000:]}") from None
            time.sleep(0.05)


class StoreSCP:
    """DCMTK's storescp (AE ``PACS``, every transfer syntax it knows) writing into a folder."""

    def __init__(self, folder: Path, unique_filenames: bool = False) -> None:
        """``unique_filenames``: every received object gets its own file (``+uf``), so a second copy of the same
        SOP instance is counted instead of overwriting the first (the default names files by SOP UID)."""
        self.folder = folder
        self.port = free_port()
        self.unique_filenames = unique_filenames
        self.process: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        naming = ["+uf"] if self.unique_filenames else []
        self.process = subprocess.Popen([require_tool("/usr/bin/storescp"), "-aet", "PACS", "+xa", *naming, "-od",
                                         str(self.folder), str(self.port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        wait_for_port(self.port, self.process, "storescp")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(path) for path in sorted(self.folder.iterdir()) if path.is_file()]


class Orthanc:
    """The Debian ``orthanc`` server with its own configuration, storage and ports (AE ``ORTHANC``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        binary = require_tool("/usr/sbin/Orthanc")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "mammo-node-test", "StorageDirectory": str(self.folder / "storage"),
                  "IndexDirectory": str(self.folder / "index"), "HttpPort": self.http_port,
                  "DicomPort": self.dicom_port, "DicomAet": "ORTHANC", "DicomCheckCalledAet": True,
                  "DicomAlwaysAllowStore": True, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "Plugins": [], "StorageCompression": False}
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        self.process = subprocess.Popen([binary, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.http_port, self.process, "Orthanc")
        wait_for_port(self.dicom_port, self.process, "Orthanc")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(20)

    def _get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def stored(self) -> dict[str, dict]:
        """Every stored instance by SOP Instance UID: its tags (``simplified-tags``) and its transfer syntax."""
        instances = {}
        for orthanc_id in self._get("/instances"):
            tags = self._get(f"/instances/{orthanc_id}/simplified-tags")
            syntax = self._get(f"/instances/{orthanc_id}/metadata?expand").get("TransferSyntax")
            instances[tags["SOPInstanceUID"]] = {**tags, "TransferSyntax": syntax}
        return instances
