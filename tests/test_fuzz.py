"""Hostile and malformed input: a seeded fuzz corpus (tests/fuzz_corpus.py) sent over real associations to the
node's Storage SCP in its own process, the limits of dicom_node.validation, duplicate UIDs across patients, and
the analysis of stored but semantically hostile images. See docs/fuzzing.md.

``MAMMO_FUZZ_CASES=5000`` sends that many random structural mutations instead of the default few hundred.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pynetdicom._config
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE
from sqlalchemy import func, select

from dicom_node.storage import content_digest
from dicom_node.validation import (
    MAX_ELEMENTS,
    MAX_FRAME_PIXELS,
    MAX_INFLATED_BYTES,
    MalformedInstanceError,
    check_instance,
    decode_received,
    inflate,
)
from models.errors import ImageDecodeError
from models.sop_classes import MG_FOR_PRESENTATION
from tests.conftest import free_port, tiny_model
from tests.fuzz_corpus import (
    EITHER,
    NO_CONTEXT,
    REFUSED,
    STORED,
    UNDEFINED,
    Case,
    Corpus,
    base_datasets,
    dataset_part,
    deflate_bomb,
    encode,
    find,
    j2k_with_size,
    with_length,
)
from tests.test_scp import _send, _start
from worklist.db import make_engine, session_factory
from worklist.models import Instance, Series, Study

SEED = 20261129
STRUCTURAL_CASES = int(os.environ.get("MAMMO_FUZZ_CASES", "240"))
BATCH = 25
FAILURES = (0xA900, 0xC000)  # Error: Data Set does not match SOP Class; Error: Cannot understand
NODE_PEAK_RSS_LIMIT_MIB = 1024  # the node idles at ~110 MiB; the largest case is a 32 MiB element
REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


@dataclass
class FuzzNode:
    """The Storage SCP process under test (tests/fuzz_node.py), its worklist and its log."""

    process: subprocess.Popen[str]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def incoming(self) -> Path:
        return self.data_dir / "incoming"

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.process.pid}/status")

    def peak_rss_mib(self) -> float:
        return self._status("VmHWM") / 1024

    def reset_peak_rss(self) -> None:
        """Start a new peak (``/proc/PID/clear_refs``: 5 resets VmHWM to the current RSS), where allowed."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def rows(self) -> list[Instance]:
        engine = make_engine(f"sqlite:///{self.data_dir / 'worklist.sqlite'}")
        try:
            with session_factory(engine)() as session:
                return list(session.scalars(select(Instance)))
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def chunked_send() -> Iterator[None]:
    """pynetdicom sends a file's dataset bytes exactly as they are, instead of decoding and re-encoding them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
        yield


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return base_datasets(tmp_path_factory.mktemp("fuzz-seeds"), SEED)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzNode]:
    if not Path("/proc/self/status").exists():
        pytest.skip("the node's memory is read from /proc (Linux)")
    folder = tmp_path_factory.mktemp("fuzz-node")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAMMO_")}
    log_path = folder / "node.log"
    with log_path.open("w") as log_handle:
        process = subprocess.Popen([sys.executable, "-m", "tests.fuzz_node", str(folder / "data"), str(port)],
                                   cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=log_handle, text=True)
    ready = threading.Timer(60, process.kill)  # a node that never starts fails the test instead of hanging it
    ready.start()
    try:
        line = process.stdout.readline()
    finally:
        ready.cancel()
    assert line.strip() == "ready", log_path.read_text()[-3000:]
    node = FuzzNode(process, port, folder / "data", log_path)
    yield node
    process.stdin.close()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _association(port: int, contexts: set[tuple[str, str]]):
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30  # a hung node fails the test, never hangs it
    for sop_class, syntax in sorted(contexts | {(MG_FOR_PRESENTATION, ExplicitVRLittleEndian)}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMO_AI")
    assert assoc.is_established, "the node refused a new association"
    return assoc


def send_batch(port: int, cases: list[Case], folder: Path) -> list[int | None]:
    """C-STORE each case's bytes on one association: its status, or None when its context was not accepted."""
    assoc = _association(port, {(case.sop_class, case.transfer_syntax) for case in cases})
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    statuses: list[int | None] = []
    try:
        for case in cases:
            if (case.sop_class, case.transfer_syntax) not in accepted:
                statuses.append(None)
                continue
            path = case.write(folder)
            response = assoc.send_c_store(path)
            path.unlink()
            assert assoc.is_established, f"{case.name}: the node dropped the association"
            assert "Status" in response, f"{case.name}: no response from the node (hang?)"
            statuses.append(int(response.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _expected(case: Case, status: int | None) -> bool:
    return {REFUSED: status in FAILURES, STORED: status == 0x0000, EITHER: status in (0x0000, *FAILURES),
            NO_CONTEXT: status is None}[case.expect]


def _check_stored_file(root: Path, row: Instance) -> None:
    """A stored instance is complete, is what its row says, and fully decodes (pixels included)."""
    data = (root / row.path).read_bytes()
    assert content_digest([data]) == row.content_digest and len(data) == row.size_bytes
    decode_received(dataset_part(data), row.transfer_syntax_uid)  # the structure walk of the SCP
    dataset = pydicom.dcmread(root / row.path)
    check_instance(dataset, row.transfer_syntax_uid)
    assert str(dataset.SOPInstanceUID) == row.sop_instance_uid
    if "PixelData" in dataset:
        assert dataset.pixel_array.size >= 1


@pytest.mark.timeout(900)
def test_hostile_inputs_get_clean_statuses_and_leave_nothing_half_written(
        fuzz_node: FuzzNode, seeds: list[Dataset], chunked_send: None, tmp_path: Path) -> None:
    corpus = Corpus(seeds, SEED)
    cases = corpus.all(STRUCTURAL_CASES)
    successes, wrong, outcomes = len(fuzz_node.rows()), [], {}
    fuzz_node.reset_peak_rss()
    for start in range(0, len(cases), BATCH):
        batch = cases[start:start + BATCH]
        for case, status in zip(batch, send_batch(fuzz_node.port, batch, tmp_path), strict=True):
            outcomes.setdefault(case.kind, set()).add(status)
            successes += status == 0x0000
            if not _expected(case, status):
                wrong.append(f"{case.name}: expected {case.expect}, got {status if status is None else hex(status)}")
        valid = corpus.fresh()  # the node still serves a new association with a valid instance
        assert send_batch(fuzz_node.port, [corpus.case("valid", encode(valid), STORED, valid)], tmp_path) == [0]
        successes += 1
    peak = fuzz_node.peak_rss_mib()
    log.info("fuzz: %d cases, %d stored, node peak RSS %.0f MiB, outcomes %s", len(cases), successes, peak,
             {kind: sorted(hex(s) if s is not None else "no context" for s in found)
              for kind, found in sorted(outcomes.items())})
    assert wrong == [], wrong
    # The worklist holds exactly the Success answers, each a complete file; nothing else is on disk.
    rows = fuzz_node.rows()
    assert len(rows) == successes
    for row in rows:
        _check_stored_file(fuzz_node.incoming, row)
    on_disk = {p.relative_to(fuzz_node.incoming).as_posix() for p in fuzz_node.incoming.rglob("*") if p.is_file()}
    assert on_disk == {row.path for row in rows}  # no temp files, no orphans
    # No hostile UID became a path outside the store.
    outside = [p for p in fuzz_node.data_dir.rglob("*") if p.is_file() and fuzz_node.incoming not in p.parents
               and p.name not in ("worklist.sqlite", "worklist.sqlite-journal", "worklist.sqlite-wal",
                                  "worklist.sqlite-shm", "worklist.sqlite.writers")]
    assert outside == [] and not (fuzz_node.data_dir.parent / "etc").exists()
    assert peak < NODE_PEAK_RSS_LIMIT_MIB, f"node peak RSS {peak:.0f} MiB"
    assert fuzz_node.process.poll() is None


@pytest.mark.timeout(300)
def test_a_deflate_bomb_is_refused_before_it_inflates(fuzz_node: FuzzNode, seeds: list[Dataset],
                                                      chunked_send: None, tmp_path: Path) -> None:
    corpus = Corpus(seeds, SEED + 1)
    ds = corpus.fresh()
    bomb = corpus.case("deflate-bomb", deflate_bomb(ds, MAX_INFLATED_BYTES + (32 << 20)), REFUSED, ds,
                       DeflatedExplicitVRLittleEndian)  # 288 MiB inflated, ~290 KiB on the wire
    before = len(fuzz_node.rows())
    fuzz_node.reset_peak_rss()
    rss = fuzz_node._status("VmRSS") / 1024
    assert send_batch(fuzz_node.port, [bomb], tmp_path) == [0xC000]
    assert len(fuzz_node.rows()) == before
    growth = fuzz_node.peak_rss_mib() - rss
    assert growth < 128, f"the node grew by {growth:.0f} MiB for a {len(bomb.body) >> 10} KiB request"


def test_command_and_dataset_uids_must_agree(fuzz_node: FuzzNode, seeds: list[Dataset], chunked_send: None,
                                             tmp_path: Path) -> None:
    corpus = Corpus(seeds, SEED + 2)
    ds = corpus.fresh()
    other = generate_uid(entropy_srcs=[str(SEED), "other instance"])
    body = encode(ds)
    case = Case("uid-mismatch", "uid-mismatch", str(ds.SOPClassUID), other, ExplicitVRLittleEndian, body, REFUSED)
    assert send_batch(fuzz_node.port, [case], tmp_path) == [0xC000]  # stored under ds.SOPInstanceUID today


def test_a_sequence_without_its_delimiter_is_not_answered_out_of_resources(
        fuzz_node: FuzzNode, seeds: list[Dataset], chunked_send: None, tmp_path: Path) -> None:
    corpus = Corpus(seeds, SEED + 5)
    ds = corpus.fresh()
    body = encode(ds)
    body = with_length(body, find(body, 0x00082218), UNDEFINED)  # Anatomic Region Sequence: no delimiter follows
    case = corpus.case("sequence-without-delimiter", body, REFUSED, ds)
    assert send_batch(fuzz_node.port, [case], tmp_path) == [0xC000]  # 0xA700 today: the sender retries forever


# --- the limits themselves, without a network ---


def _j2k_dataset(seeds: list[Dataset], rows: int, columns: int, header: tuple[int, int] | None = None) -> Dataset:
    ds = copy.deepcopy(seeds[0])
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = encapsulate([j2k_with_size(frame, *(header or (rows, columns)))])
    return ds


def test_declared_size_limit_is_checked_before_decoding(seeds: list[Dataset]) -> None:
    assert MAX_FRAME_PIXELS == 100_000_000
    check_instance(_j2k_dataset(seeds, 10_000, 10_000), JPEG2000Lossless)  # 100 MP: accepted, nothing decoded
    with pytest.raises(MalformedInstanceError, match="at most 100000000 per frame"):
        check_instance(_j2k_dataset(seeds, 10_000, 10_001), JPEG2000Lossless)
    with pytest.raises(MalformedInstanceError, match="declares 20000 x 20000 pixels"):
        check_instance(_j2k_dataset(seeds, 128, 96, header=(20_000, 20_000)), JPEG2000Lossless)
    many = _j2k_dataset(seeds, 128, 96)
    many.NumberOfFrames = 200_000
    with pytest.raises(MalformedInstanceError, match="one frame, not 200000"):  # an MG image
        check_instance(many, JPEG2000Lossless)
    many.SOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.3"  # tomosynthesis: many frames, but not that many
    with pytest.raises(MalformedInstanceError, match="once decoded"):
        check_instance(many, JPEG2000Lossless)


def test_a_jp2_wrapper_cannot_hide_the_codestream_size(seeds: list[Dataset]) -> None:
    """A box before the codestream that holds a small SOC-SIZ header: the size is read from the jp2c box."""
    import struct

    honest = _j2k_dataset(seeds, 128, 96)
    (codestream,) = generate_frames(honest.PixelData, number_of_frames=1)

    def box(kind: bytes, content: bytes) -> bytes:
        return struct.pack(">I", 8 + len(content)) + kind + content

    def jp2(decoy: bytes, real: bytes) -> bytes:
        return b"\x00\x00\x00\x0cjP  \r\n\x87\n" + box(b"xml ", decoy) + box(b"jp2c", real)

    wrapped = copy.deepcopy(honest)
    wrapped.PixelData = encapsulate([jp2(codestream[:64], codestream)])
    check_instance(wrapped, JPEG2000Lossless)  # a true JP2 file: tolerated, its codestream checked
    wrapped.PixelData = encapsulate([jp2(codestream[:64], j2k_with_size(codestream, 20_000, 20_000))])
    with pytest.raises(MalformedInstanceError, match="declares 20000 x 20000 pixels"):
        check_instance(wrapped, JPEG2000Lossless)
    wrapped.PixelData = encapsulate([b"junk" + codestream])  # not at the start: no codestream
    with pytest.raises(MalformedInstanceError, match="no readable codestream header"):
        check_instance(wrapped, JPEG2000Lossless)


def test_inflate_refuses_a_bomb_without_holding_it() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(bytes(64 << 20)) + packer.flush()
    with pytest.raises(MalformedInstanceError, match="deflate bomb"):
        inflate(bomb, limit=16 << 20)
    assert inflate(bomb) == bytes(64 << 20)
    for broken in (bomb[:-4], bomb + b"xyz", b"not deflate at all"):
        with pytest.raises(MalformedInstanceError):
            inflate(broken)


def test_decode_received_checks_the_structure_before_pydicom_builds_it(seeds: list[Dataset]) -> None:
    ds = copy.deepcopy(seeds[0])
    assert decode_received(encode(ds), ExplicitVRLittleEndian).SOPInstanceUID == ds.SOPInstanceUID
    deflated = decode_received(encode(ds, DeflatedExplicitVRLittleEndian), DeflatedExplicitVRLittleEndian)
    assert deflated.PixelData == ds.PixelData
    corpus = Corpus(seeds, SEED + 3)
    (flood,) = corpus.element_flood(MAX_ELEMENTS + 1)
    with pytest.raises(MalformedInstanceError, match="more than"):
        decode_received(flood.body, ExplicitVRLittleEndian)
    structural = {"lying-pixel-length", "lying-header-length", "nested-3000", "nested-300-defined", "lying-item-length"}
    cases = [case for case in [*corpus.lengths(), *corpus.nesting()] if case.kind in structural]
    assert len(cases) == 7
    for case in cases:
        with pytest.raises(MalformedInstanceError):
            decode_received(case.body, case.transfer_syntax)



@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_decode_received_reads_native_pixel_data_in_place_and_keeps_what_follows_it(
        seeds: list[Dataset], syntax: str) -> None:
    ds = copy.deepcopy(seeds[0])
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.add_new(0x7FE10010, "LO", "AFTER PIXELS")  # a private creator after the pixel data
    signed = Dataset()
    signed.PatientName = "Grün^Anna"  # decoded with the dataset's character set, not the default one
    ds.add_new(0xFFFAFFFA, "SQ", Sequence([signed]))  # Digital Signatures Sequence, of undefined length
    ds[0xFFFAFFFA].is_undefined_length = True
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 6)  # Data Set Trailing Padding
    body = encode(ds, syntax)
    decoded = decode_received(body, syntax)
    whole = read_dataset(BytesIO(zlib.decompress(body, -zlib.MAX_WBITS) if syntax == DeflatedExplicitVRLittleEndian
                                 else body), syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
    assert isinstance(decoded.PixelData, memoryview)  # not copied out of the received bytes
    assert [element.tag for element in decoded] == [element.tag for element in whole]
    for element in whole:
        if element.tag == 0x7FE00010:
            assert bytes(decoded.PixelData) == element.value
        else:
            assert decoded[element.tag] == element
    assert decoded[0xFFFAFFFA].value[0].PatientName == "Grün^Anna"
    check_instance(decoded, syntax)


def test_decode_received_reads_encapsulated_or_repeated_pixel_data_as_pydicom_does(seeds: list[Dataset]) -> None:
    """Pixel data of defined length under a compressed syntax (not conformant: fragments belong in an undefined
    length), and a second top-level pixel data element, are read by pydicom as a whole, not in place."""
    ds = copy.deepcopy(seeds[0])
    body = encode(ds)
    header = body.index(b"\xe0\x7f\x10\x00")  # the pixel data element in explicit VR little endian
    repeated = body + body[header:]  # a second (7FE0,0010) at the top level
    decoded = decode_received(repeated, ExplicitVRLittleEndian)
    assert isinstance(decoded.PixelData, bytes) and decoded.PixelData == ds.PixelData
    defined = decode_received(body, JPEG2000Lossless)
    assert isinstance(defined.PixelData, bytes)


def test_valid_objects_pass_the_stricter_checks(seeds: list[Dataset], tmp_path: Path) -> None:
    """The node's own SR and (JPEG 2000, multi-frame) SEG, and the seeds in every syntax the corpus uses."""
    from tests.test_results import heatmaps_for, make_findings, write_seg, write_sr

    views = [copy.deepcopy(d) for d in seeds[:4]]
    for path in (write_sr(make_findings(views), views, tmp_path / "sr.dcm"),
                 write_seg(views[0], heatmaps_for(views[0]), tmp_path / "seg.dcm")):
        dataset = pydicom.dcmread(path)
        syntax = str(dataset.file_meta.TransferSyntaxUID)
        decode_received(dataset_part(path.read_bytes()), syntax)
        check_instance(dataset, syntax)
        assert decode_received(encode(dataset, syntax), syntax).SOPInstanceUID == dataset.SOPInstanceUID
    corpus = Corpus(seeds, SEED + 4)
    for case in [*corpus.compressed(), *corpus.syntaxes()]:
        if case.expect == STORED:
            check_instance(decode_received(case.body, case.transfer_syntax), case.transfer_syntax)


# --- the same SOP Instance UID for two patients ---


def test_a_sop_instance_uid_is_filed_under_one_study_and_patient(db_url: str, tmp_path: Path, seeds: list[Dataset],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    node, (server, engine) = _start(db_url, tmp_path)
    try:
        first = copy.deepcopy(seeds[0])
        assert _send(node, first) == 0x0000
        stored = next(node.root.rglob("*.dcm"))
        digest = hashlib.sha256(stored.read_bytes()).hexdigest()

        def variant(**changes: str) -> Dataset:
            ds = copy.deepcopy(first)
            for keyword, value in changes.items():
                setattr(ds, keyword, value)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            return ds

        new_uid = generate_uid
        clashes = {
            "same SOP, other patient and study": variant(PatientID="OTHER-PATIENT-77", StudyInstanceUID=new_uid(),
                                                         SeriesInstanceUID=new_uid()),
            "same SOP and study, other patient": variant(PatientID="OTHER-PATIENT-77"),
            "same SOP and patient, other study": variant(StudyInstanceUID=new_uid(), SeriesInstanceUID=new_uid()),
            "same SOP, other series": variant(SeriesInstanceUID=new_uid()),
            "same study, other patient": variant(SOPInstanceUID=new_uid(), PatientID="OTHER-PATIENT-77"),
            "same series, other study": variant(SOPInstanceUID=new_uid(), StudyInstanceUID=new_uid()),
        }
        with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
            for name, dataset in clashes.items():
                assert _send(node, dataset) == 0xC000, name
        refusals = [r.getMessage() for r in caplog.records if "refused instance" in r.getMessage()]
        assert len(refusals) == len(clashes)
        assert all("already stored" in line for line in refusals)
        assert "OTHER-PATIENT-77" not in caplog.text and str(first.PatientID) not in caplog.text
        assert _send(node, first) == 0x0000  # an identical resend stays idempotent
        with node.sessions() as session:
            (row,) = session.scalars(select(Instance)).all()
            assert row.study.study_instance_uid == first.StudyInstanceUID
            assert session.scalar(select(func.count()).select_from(Study)) == 1
            assert session.scalar(select(func.count()).select_from(Series)) == 1
            assert row.study.patient_id == first.PatientID
        assert [p for p in node.root.rglob("*") if p.is_file()] == [stored]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    finally:
        server.shutdown()
        engine.dispose()


# --- analysis of images that were stored but are semantically hostile ---


def _resize(rows: int, columns: int) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = ds.PixelData[:rows * columns * 2]
    return edit


def _set(**values: object) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return edit


def _element(tag: int, vr: str, value: object, **values: object) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        _set(**values)(ds)
        ds[tag] = DataElement(tag, vr, value)
    return edit


def _blank(ds: Dataset) -> None:
    ds.PixelData = bytes(len(ds.PixelData))


def _two_frames(ds: Dataset) -> None:
    ds.NumberOfFrames, ds.PixelData = 2, ds.PixelData * 2


def _rgb(ds: Dataset) -> None:
    grey = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0


def _bad_voi_lut(ds: Dataset) -> None:
    del ds.WindowCenter, ds.WindowWidth
    ds.VOILUTSequence = Sequence([Dataset()])


def _voi_lut(descriptor: list[int], data: bytes) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        del ds.WindowCenter, ds.WindowWidth
        item = Dataset()
        item.LUTDescriptor, item.LUTData = descriptor, data
        item["LUTData"].VR = "OW"
        ds.VOILUTSequence = Sequence([item])

    return edit


HOSTILE_IMAGES = [
    pytest.param(_resize(1, 1), id="1x1"),
    pytest.param(_resize(1, 96), id="1x96"),
    pytest.param(_resize(12, 12), id="12x12"),
    pytest.param(_blank, id="blank"),
    pytest.param(_two_frames, id="two-frames"),
    pytest.param(_rgb, id="rgb"),
    pytest.param(_set(PhotometricInterpretation="YBR_FULL"), id="ybr-one-sample"),
    pytest.param(_set(PhotometricInterpretation="MONOCHROME1", WindowCenter="1e300", WindowWidth=1),
                 id="monochrome1-window-centre-1e300"),
    pytest.param(_set(PhotometricInterpretation="MONOCHROME1", WindowWidth="NaN"), id="monochrome1-window-nan"),
    pytest.param(_set(PhotometricInterpretation="MONOCHROME1", BitsStored=64), id="monochrome1-bits-stored-64"),
    pytest.param(_set(RescaleSlope=0), id="rescale-slope-0"),
    pytest.param(_set(RescaleSlope="1e300"), id="rescale-slope-1e300"),
    pytest.param(_set(BitsStored=0), id="bits-stored-0"),
    pytest.param(_set(PhotometricInterpretation="MONOCHROME1", WindowWidth=0, VOILUTFunction="LINEAR_EXACT"),
                 id="monochrome1-window-0-linear-exact"),
    pytest.param(_set(PhotometricInterpretation="MONOCHROME1", WindowWidth=0, VOILUTFunction="SIGMOID"),
                 id="monochrome1-window-0-sigmoid"),
    pytest.param(_set(PhotometricInterpretation="MONOCHROME1", WindowWidth=-500), id="monochrome1-window-negative"),
    pytest.param(_set(PhotometricInterpretation="RGB"), id="rgb-label-one-sample"),
    pytest.param(_set(PhotometricInterpretation="PALETTE COLOR"), id="palette-without-lut"),
    pytest.param(_element(0x00281050, "LO", "abc", PhotometricInterpretation="MONOCHROME1"), id="window-centre-text"),
    pytest.param(_element(0x00281051, "SQ", Sequence([Dataset()])), id="window-width-sequence"),
    pytest.param(_element(0x00281053, "LO", "x"), id="rescale-slope-text"),
    pytest.param(_set(WindowCenter=[], WindowWidth=[]), id="window-empty"),
    pytest.param(_bad_voi_lut, id="voi-lut-item-without-descriptor"),
    pytest.param(_voi_lut([256, 0, 9], bytes(512)), id="voi-lut-9-bit-entries"),  # NotImplementedError in pydicom
    pytest.param(_voi_lut([256, 0, 16], bytes(10)), id="voi-lut-data-shorter-than-described"),  # struct.error
]


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory):
    from dicom_node.analysis import Analyzer
    from dicom_node.serving import model_identity

    model = tiny_model()
    return Analyzer(model, model_identity(model), tmp_path_factory.mktemp("fuzz-results"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("edit", HOSTILE_IMAGES)
def test_a_hostile_stored_image_fails_its_analysis_with_a_reason(analyzer, seeds: list[Dataset], tmp_path: Path,
                                                                 edit: Callable[[Dataset], None]) -> None:
    from dicom_node.analysis import SourceInstance

    ds = copy.deepcopy(next(d for d in seeds if d.PhotometricInterpretation == "MONOCHROME2"))
    edit(ds)
    path = tmp_path / "hostile.dcm"
    ds.save_as(path, enforce_file_format=True)
    instance = SourceInstance(path, str(ds.SOPInstanceUID), str(ds.ImageLaterality), str(ds.ViewPosition))
    try:
        output = analyzer.analyse(str(ds.StudyInstanceUID), 1, [instance])
    except ImageDecodeError as error:  # the job fails at once (PERMANENT_ERRORS), with this reason
        assert str(ds.SOPInstanceUID) in str(error) or "image" in str(error)
        return
    raise AssertionError(f"analysed without an error: {[v.scores for v in output.findings.views]}")


def test_an_unreadable_view_costs_that_view_only(analyzer, seeds: list[Dataset], tmp_path: Path) -> None:
    """A resend of RCC that cannot be decoded: the earlier RCC is analysed. An LCC with no readable instance:
    the study is analysed on its three other views, LCC reported missing, as a view not received."""
    from dicom_node.analysis import SourceInstance

    study = [copy.deepcopy(ds) for ds in seeds if ds.PhotometricInterpretation == "MONOCHROME2"]
    assert len(study) == 4

    def stored(ds: Dataset, name: str) -> SourceInstance:
        ds.save_as(tmp_path / name, enforce_file_format=True)
        return SourceInstance(tmp_path / name, str(ds.SOPInstanceUID), str(ds.ImageLaterality), str(ds.ViewPosition))

    instances = [stored(ds, f"{ds.ImageLaterality}{ds.ViewPosition}.dcm") for ds in study]
    for ds in study:
        if (ds.ImageLaterality, ds.ViewPosition) in (("R", "CC"), ("L", "CC")):
            broken = copy.deepcopy(ds)
            broken.SOPInstanceUID = f"{ds.SOPInstanceUID}.9"
            broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]  # cut short: cannot be decoded
            instances.append(stored(broken, f"broken-{ds.ImageLaterality}{ds.ViewPosition}.dcm"))
    good_lcc = next(i for i in instances if (i.laterality, i.view) == ("L", "CC"))
    instances.remove(good_lcc)  # LCC: only its broken instance
    output = analyzer.analyse(str(study[0].StudyInstanceUID), 7, instances)
    used = {(v.laterality, v.view): v.sop_instance_uid for v in output.findings.views}
    rcc = next(ds for ds in study if (ds.ImageLaterality, ds.ViewPosition) == ("R", "CC"))
    assert set(used) == {("R", "CC"), ("L", "MLO"), ("R", "MLO")} and used[("R", "CC")] == str(rcc.SOPInstanceUID)
    assert output.findings.missing_views == ["LCC"]
    assert list(output.findings.unreadable_views) == ["LCC"] and "cannot be decoded" in \
        output.findings.unreadable_views["LCC"]  # the reason, for the study page
    sr = pydicom.dcmread(output.objects[0].path)  # the SR first
    texts = [element.value for element in sr.iterall() if element.keyword == "TextValue"]
    assert any(text.startswith("Missing views: LCC (received, image unreadable).") for text in texts), texts
