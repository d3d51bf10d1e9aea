"""No patient name or ID ever reaches a log line: a real node (SCP, scheduler, embedded worker) at DEBUG level
with JSON logs receives a study by /usr/bin/storescu, is asked for it by /usr/bin/findscu, analyses it and
delivers the results; every line it wrote is checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.settings import Settings
from tests.conftest import free_port, require_tool
from tests.peers import StoreSCP, wait_for_port
from tests.test_node_e2e import model_version, studies  # noqa: F401  (fixtures)

# no "^" in the name: highdicom warns about such a name, quoting it
PATIENT_NAME, PATIENT_ID = "PRIVACY PRUDENCE QUINN", "PID-SECRET-4711"
OTHER_NAME = "Confidential^Ceridwen"  # given in a C-FIND query only
BIRTH_DATE = "1941-03-02"  # ISO 8601, not DICOM's form: pydicom warns with the value, highdicom refuses it


def identifiable_study(files: list[Path], folder: Path) -> list[Path]:
    """The study's files with a distinctive patient name, ID and (malformed) birth date."""
    folder.mkdir()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        ds.save_as(folder / path.name)
        out.append(folder / path.name)
    return out


def status(env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout) if result.returncode == 0 and result.stdout.strip() else {}


@pytest.mark.slow
def test_no_patient_identifier_reaches_a_log_line(tmp_path: Path, model_version: Path,  # noqa: F811
                                                  studies: list[list[Path]]) -> None:  # noqa: F811
    files = identifiable_study(studies[0], tmp_path / "study")
    pacs = StoreSCP(tmp_path / "pacs").start()
    settings = Settings(data_dir=tmp_path / "data", port=free_port(), api_port=free_port(), model_path=model_version,
                        device="cpu", study_settle_seconds=0.2, log_level="DEBUG", log_format="json",
                        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MAMMO_")}, **settings.to_env()}
    upgraded = subprocess.run([sys.executable, "-m", "dicom_node.cli", "db", "upgrade"], env=env, capture_output=True,
                              text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr
    log_path = tmp_path / "node.log"
    with log_path.open("wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "-v", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_port(settings.port, node, "the node", timeout=90)
        sent = subprocess.run([require_tool("/usr/bin/storescu"), "-aet", "MODALITY", "-aec", settings.ae_title,
                               "127.0.0.1", str(settings.port), *map(str, files)], capture_output=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        found = subprocess.run([require_tool("/usr/bin/findscu"), "-S", "-aet", "PACS", "-aec", settings.ae_title,
                                "127.0.0.1", str(settings.port), "-k", "QueryRetrieveLevel=STUDY",
                                "-k", f"PatientName={OTHER_NAME}", "-k", f"PatientID={PATIENT_ID}",
                                "-k", "StudyInstanceUID"], capture_output=True, timeout=60)
        assert found.returncode == 0, found.stderr
        deadline = time.monotonic() + 240
        while status(env).get("exports", {}).get("DELIVERED", 0) < 5:
            assert node.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        pacs.stop()

    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) > 20 and any("analysed" in record["message"] for record in records)
    assert any(record.get("study_uid") for record in records), "no record carries its study UID"
    forbidden = [PATIENT_ID, OTHER_NAME, *PATIENT_NAME.split(), PATIENT_NAME, BIRTH_DATE, "19410302"]
    leaks = [line for line in lines if any(value.lower() in line.lower() for value in forbidden)]
    assert leaks == [], leaks[:5]
