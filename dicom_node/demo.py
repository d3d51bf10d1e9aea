"""``mammo-node demo``: the whole path on one machine with embedded defaults and no server to install.

A local destination SCP (standing in for the PACS) and the node start; a synthetic four-view study is sent
by C-STORE; the node analyses it and sends its SR and SEGs back; the scores, the triage list and the paths
of every returned object are printed, with a heatmap overlay PNG per view.
"""

from __future__ import annotations

import csv
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)
from sqlalchemy import select

from dicom_node.durable_files import atomic_write
from dicom_node.settings import Destination, Settings
from dicom_node.storage import validated_uid
from models.errors import NodeError
from worklist.models import Export, ExportState, Job, JobState, Result, Study, StudyState

log = logging.getLogger(__name__)

DEMO_PACS_AE = "DEMO_PACS"
DEMO_MODALITY_AE = "DEMO_MODALITY"
OVERLAY_WAIT_SECONDS = 60.0
RESULT_SOP_CLASSES = (Comprehensive3DSRStorage, SegmentationStorage, SecondaryCaptureImageStorage,
                      DigitalMammographyXRayImageStorageForPresentation)


class LocalReceiver:
    """A minimal Storage SCP that writes what it receives under ``folder`` (the demo's stand-in PACS).

    ``compressed``: it also accepts JPEG-LS and JPEG 2000 Lossless, as Orthanc does; False: uncompressed syntaxes
    only, as DCMTK's storescp by default (the node then sends its SEGs decompressed)."""

    def __init__(self, folder: Path, ae_title: str = DEMO_PACS_AE, compressed: bool = True) -> None:
        self.folder = Path(folder)
        self.ae = AE(ae_title=ae_title)
        self.ae.add_supported_context(Verification)
        syntaxes = [*DEFAULT_TRANSFER_SYNTAXES, *([JPEGLSLossless, JPEG2000Lossless] if compressed else [])]
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, syntaxes)
        self.server = None

    def _store(self, event: Event) -> int:
        ds: Dataset = event.dataset
        name = f"{ds.Modality}_{validated_uid(ds.SOPInstanceUID, 'SOPInstanceUID')}.dcm"
        atomic_write(self.folder / name, event.encoded_dataset())
        return 0x0000

    def start(self) -> int:
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self.server.server_address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DemoOutcome:
    """What the demo found at the end."""

    study_instance_uid: str
    state: str
    findings: dict | None
    timings: dict[str, float]
    result_files: list[Path]
    delivered_files: list[Path]
    overlays: list[Path]
    truth: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds_to_delivery: float = 0.0
    error: str | None = None


def demo_settings(settings: Settings, receiver_port: int) -> Settings:
    """The user's settings, with a free SCP port, the local destination, a short settle time, and the triage
    page on a free loopback port that lets this machine's browser in without credentials."""
    return settings.model_copy(update={
        "data_dir": Path(settings.data_dir).resolve(), "port": free_port(), "bind_host": "127.0.0.1",
        "api_bind_host": "127.0.0.1", "api_port": free_port(), "api_allow_local_unauthenticated": True,
        "destinations": [Destination(name="demo-pacs", ae_title=DEMO_PACS_AE, host="127.0.0.1",
                                     port=receiver_port)],
        "allowed_calling_aes": [*settings.allowed_calling_aes, DEMO_MODALITY_AE], "study_settle_seconds": 0.5})


def wait_for_delivery(sessions, study_uid: str, timeout: float,  # noqa: ANN001  (sessionmaker)
                      on_state: Callable[[str], None] = lambda state: None) -> tuple[str, int | None]:
    """Poll until the study is analysed and its exports settled (or it failed); returns (state, job id)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        with sessions() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            job = session.scalar(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())) \
                if study else None
            pending = session.scalar(select(Export.id).where(
                Export.job_id == job.id, Export.state == ExportState.PENDING).limit(1)) if job else None
        state = f"study {study.state if study else 'not received'}, job {job.state if job else '-'}"
        if state != last:
            on_state(state)
            last = state
        if job is not None and job.state == JobState.FAILED:
            return "FAILED", job.id
        if study is not None and study.state == StudyState.ANALYSED and job.state == JobState.DONE and not pending:
            return "DONE", job.id
        time.sleep(0.25)
    raise NodeError(f"the study was not analysed and delivered within {timeout:.0f} s ({last})")


def run_demo(settings: Settings, seed: int, timeout: float = 900.0,
             on_state: Callable[[str], None] = lambda state: None) -> DemoOutcome:
    """Start a destination and the node, send one synthetic study, wait for its results to come back."""
    from dicom_node.node import Node
    from dicom_node.scu import send_files
    from training.synthetic import write_studies
    from worklist.api import serve_api_in_thread
    from worklist.db import make_engine, upgrade

    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url())
    upgrade(engine)  # the demo creates or migrates its database itself
    engine.dispose()
    receiver = LocalReceiver(data_dir / "demo-pacs")
    node_settings = demo_settings(settings, receiver.start())
    study_dir = data_dir / "demo-study" / str(seed)
    manifest = write_studies(study_dir, 1, seed=1_000_000 + seed, rows=768, cols=480, progress=False)
    files = sorted(study_dir.glob("*/*.dcm"))
    try:
        with Node(node_settings, worker_log=data_dir / "demo-worker.log") as node, \
                serve_api_in_thread(node_settings, node.sessions) as api:
            on_state(f"node {node_settings.ae_title} on port {node.port}; destination {DEMO_PACS_AE} on port "
                     f"{node_settings.destinations[0].port}; triage page on {api.url}/")
            sent_at = time.monotonic()
            outcomes = send_files(Destination(name="node", ae_title=node_settings.ae_title, host="127.0.0.1",
                                              port=node.port), files, DEMO_MODALITY_AE)
            if not all(outcome.stored for outcome in outcomes):
                raise NodeError(f"the node refused the study: {[o.describe() for o in outcomes]}")
            on_state(f"sent {len(files)} images by C-STORE")
            study_uid = str(_read_uid(files[0]))
            state, job_id = wait_for_delivery(node.sessions, study_uid, timeout, on_state)
            elapsed = time.monotonic() - sent_at
            return _outcome(node.sessions, node_settings, study_uid, state, job_id, elapsed, manifest,
                            data_dir / "demo-pacs")
    finally:
        receiver.stop()


def _read_uid(path: Path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID


def _outcome(sessions, settings: Settings, study_uid: str, state: str, job_id: int | None,  # noqa: ANN001
             elapsed: float, manifest: Path, pacs: Path) -> DemoOutcome:
    with sessions() as session:
        job = session.get(Job, job_id)
        result = session.scalar(select(Result).where(Result.job_id == job_id))
        exports = session.scalars(select(Export).where(Export.job_id == job_id)).all()
        delivered = {e.sop_instance_uid for e in exports if e.state == ExportState.DELIVERED}
    folder = settings.results_dir / study_uid / str(job_id)
    views = len(result.scores["views"]) if result else 0
    deadline = time.monotonic() + OVERLAY_WAIT_SECONDS  # drawn by the worker once the results are on their way
    while len(list(folder.glob("overlay_[LR]*.png"))) < views and time.monotonic() < deadline:
        time.sleep(0.1)
    with manifest.open(newline="") as handle:
        truth = {row["laterality"]: row for row in csv.DictReader(handle)}
    return DemoOutcome(
        study_instance_uid=study_uid, state=state, findings=result.scores if result else None,
        timings=job.timings or {}, result_files=sorted(folder.glob("*.dcm")),
        delivered_files=sorted(p for p in pacs.glob("*.dcm") if p.stem.split("_", 1)[1] in delivered),
        overlays=sorted(folder.glob("overlay_*.png")), truth=truth, seconds_to_delivery=elapsed, error=job.error)
