"""The C-FIND SCP (Study Root, STUDY level) against DCMTK findscu and a pynetdicom SCU, over localhost."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.find_scp import QueryError, handle_find, parse_query
from dicom_node.scp import start_scp
from dicom_node.settings import Settings
from dicom_node.storage import InstanceStore
from dicom_node.study_time import sortable_time
from tests.conftest import free_port, require_tool
from worklist.db import make_engine, session_factory
from worklist.models import Instance, Job, JobState, Series, Study, StudyState

STUDY_ROOT_FIND = StudyRootQueryRetrieveInformationModelFind
MG, SR = "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.88.33"
UIDS = {n: f"1.2.826.0.1.3680043.8.498.{n}" for n in (1, 2, 3, 4)}
# number: accession, patient ID, patient name, study date, state, suspicion, modalities and instances
STUDIES = {
    1: ("ACC1001", "PID-A", "DOE^JANE", "20240105", StudyState.ANALYSED, 0.87, {"MG": 4, "SR": 1}),
    2: ("ACC1002", "PID-B", "Müller^Anna", "20240120", StudyState.READY, None, {"MG": 4}),
    3: ("XYZ2001", "PID-C", "ROE^RICHARD", "20240302", StudyState.RECEIVING, None, {"MG": 2}),
    4: ("ACC1003", "PID-D", "DOE^JOHN", "20231231", StudyState.FAILED, None, {"MG": 4, "OT": 1}),
}
TIMES = {1: ("080512.5", "S1001"), 2: ("0930", "S1002"), 3: ("23:59:59", "T2001"), 4: (None, None)}  # 4: neither
PRIVATE = {"PrivateCreator": ("0041,0010", "MAMMO_CLIP_NODE"), "state": ("0041,1001", ""),
           "suspicion": ("0041,1002", ""), "model": ("0041,1003", "")}


@dataclass
class FindNode:
    settings: Settings
    sessions: sessionmaker[Session]


def _populate(sessions: sessionmaker[Session]) -> None:
    """Four studies in every state; study 1 was analysed twice, the newer model gave its score."""
    with sessions.begin() as session:
        for number, (accession, patient_id, name, date, state, suspicion, modalities) in STUDIES.items():
            time, study_id = TIMES[number]
            study = Study(study_instance_uid=UIDS[number], accession_number=accession, patient_id=patient_id,
                          patient_name=name, study_date=date, state=state, suspicion=suspicion,
                          study_time=sortable_time(time), dicom_study_id=study_id)
            for index, (modality, count) in enumerate(modalities.items()):
                series = Series(study=study, series_instance_uid=f"{UIDS[number]}.{index}", modality=modality)
                for instance in range(count):
                    session.add(Instance(
                        study=study, series=series, sop_instance_uid=f"{series.series_instance_uid}.{instance}",
                        sop_class_uid=SR if modality == "SR" else MG, transfer_syntax_uid="1.2.840.10008.1.2.1",
                        analysable=modality == "MG", path="unused.dcm", size_bytes=1,
                        content_digest="blake3:" + "0" * 64))
            if state == StudyState.ANALYSED:
                session.add_all([Job(study=study, state=JobState.DONE, model_version="old-model"),
                                 Job(study=study, state=JobState.DONE, model_version="mammo-clip-demo-1")])
            elif state == StudyState.FAILED:
                session.add(Job(study=study, state=JobState.FAILED, model_version="mammo-clip-demo-1"))


@pytest.fixture
def node_factory(db_url: str, tmp_path: Path) -> Iterator[Callable[..., FindNode]]:
    """Start the node's SCP on the populated worklist (settings overrides as keywords)."""
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    _populate(sessions)
    servers = []

    def start(**overrides: object) -> FindNode:
        settings = Settings(data_dir=tmp_path / "data", port=free_port(), db_url=db_url, **overrides)
        servers.append(start_scp(settings, InstanceStore(settings.incoming_dir, sessions)))
        return FindNode(settings, sessions)

    yield start
    for server in servers:
        server.shutdown()
    engine.dispose()


@pytest.fixture
def node(node_factory: Callable[..., FindNode]) -> FindNode:
    return node_factory()


def findscu(node: FindNode, folder: Path, *keys: str, calling: str = "PACS") -> tuple[str, list[Dataset]]:
    """Run DCMTK findscu (Study Root) with ``-k`` keys: its log (responses shown) and the files it wrote (``-X``)."""
    folder.mkdir(exist_ok=True)
    arguments = [argument for key in keys for argument in ("-k", key)]
    result = subprocess.run([require_tool("/usr/bin/findscu"), "-v", "+sr", "-S", "-aet", calling, "-aec",
                             node.settings.ae_title, "-X", "-od", str(folder), "127.0.0.1", str(node.settings.port),
                             *arguments], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr, [pydicom.dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


def query(**keys: object) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return identifier


def with_private_block(identifier: Dataset, state: str = "", slot: int = 0x10) -> Dataset:
    identifier.add_new((0x0041, slot), "LO", "MAMMO_CLIP_NODE")
    for offset, vr, value in ((0x01, "CS", state), (0x02, "DS", None), (0x03, "LO", None)):
        identifier.add_new((0x0041, slot << 8 | offset), vr, value)
    return identifier


def c_find(node: FindNode, identifier: Dataset, calling: str = "PACS") -> tuple[list[Dataset], list[Dataset]]:
    """The status datasets and the Pending identifiers of one C-FIND from a pynetdicom SCU."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_find(identifier, STUDY_ROOT_FIND))
    finally:
        assoc.release()
    return [status for status, _ in responses], [found for _, found in responses if found is not None]


def matched(node: FindNode, identifier: Dataset) -> set[int]:
    statuses, found = c_find(node, identifier)
    assert [int(s.Status) for s in statuses] == [0xFF00] * len(found) + [0x0000]
    by_uid = {uid: number for number, uid in UIDS.items()}
    return {by_uid[dataset.StudyInstanceUID] for dataset in found}


def test_findscu_shows_state_and_suspicion_in_the_private_block(node: FindNode, tmp_path: Path) -> None:
    log, responses = findscu(node, tmp_path / "rsp", "QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                             "AccessionNumber", "StudyDate=20240101-20240131", "(0041,0010)=MAMMO_CLIP_NODE",
                             "(0041,1001)", "(0041,1002)", "(0041,1003)")
    assert "(0041,1002) DS [0.8700]" in log and "(0041,1001) CS [ANALYSED]" in log, log
    assert "Received Final Find Response (Success)" in log
    found = {r.StudyInstanceUID: r for r in responses}
    assert set(found) == {UIDS[1], UIDS[2]}
    analysed, ready = found[UIDS[1]], found[UIDS[2]]
    assert analysed.AccessionNumber == "ACC1001" and analysed.StudyDate == "20240105"
    assert analysed.RetrieveAETitle == node.settings.ae_title and analysed.QueryRetrieveLevel == "STUDY"
    block = analysed.private_block(0x0041, "MAMMO_CLIP_NODE")
    assert (block[0x01].value, float(block[0x02].value), block[0x03].value) == (
        "ANALYSED", 0.87, "mammo-clip-demo-1")
    block = ready.private_block(0x0041, "MAMMO_CLIP_NODE")
    assert block[0x01].value == "READY" and block[0x02].value in (None, "") and block[0x03].value in (None, "")
    assert "PatientName" not in analysed and "PatientID" not in analysed


def test_findscu_matching_uid_list_accession_wildcard_and_open_range(node: FindNode, tmp_path: Path) -> None:
    cases = {
        f"StudyInstanceUID={UIDS[1]}\\{UIDS[3]}": {1, 3},
        "AccessionNumber=ACC100?": {1, 2, 4},
        "StudyDate=20240120-": {2, 3},
        "StudyDate=-20231231": {4},
        "ModalitiesInStudy=SR": {1},
    }
    for index, (key, expected) in enumerate(cases.items()):
        log, responses = findscu(node, tmp_path / str(index), "QueryRetrieveLevel=STUDY", "StudyInstanceUID", key)
        assert {r.StudyInstanceUID for r in responses} == {UIDS[n] for n in expected}, (key, log)


MATCHING = [  # keys besides StudyInstanceUID (universal, returned), and the studies they match
    ({}, {1, 2, 3, 4}),
    ({"StudyInstanceUID": UIDS[1]}, {1}),
    ({"StudyInstanceUID": [UIDS[1], UIDS[3]]}, {1, 3}),
    ({"AccessionNumber": "ACC1002"}, {2}),
    ({"AccessionNumber": "ACC10*"}, {1, 2, 4}),
    ({"AccessionNumber": "acc1001"}, set()),  # case-sensitive
    ({"AccessionNumber": "ACC.00*"}, set()),  # "." is a character, not a regular expression
    ({"AccessionNumber": "*"}, {1, 2, 3, 4}),
    ({"PatientID": "PID-C"}, {3}),
    ({"PatientID": ""}, {1, 2, 3, 4}),
    ({"PatientName": "doe^j*"}, {1, 4}),  # PN: case-insensitive
    ({"PatientName": "M?ller*"}, {2}),
    ({"StudyDate": "20240101-20240131"}, {1, 2}),
    ({"StudyDate": "20240302"}, {3}),
    ({"StudyDate": "20240101-20240131", "AccessionNumber": "ACC*"}, {1, 2}),
    ({"ModalitiesInStudy": ["OT", "SR"]}, {1, 4}),
    ({"ModalitiesInStudy": "MG"}, {1, 2, 3, 4}),
    ({"StudyTime": "080512.5"}, {1}),
    ({"StudyTime": "08"}, {1}),  # a partial time: its whole hour
    ({"StudyTime": "0800-0930"}, {1, 2}),
    ({"StudyTime": "1000-"}, {3}),
    ({"StudyTime": "-09"}, {1, 2}),
    ({"StudyID": "S100*"}, {1, 2}),
    ({"StudyID": "T2001"}, {3}),
]


def test_matching(node: FindNode) -> None:
    results = [(keys, matched(node, query(**{"StudyInstanceUID": "", **keys}))) for keys, _ in MATCHING]
    assert results == MATCHING


def test_studies_are_read_a_page_at_a_time(node: FindNode, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node import find_scp

    pages = []
    read = find_scp.find_studies
    monkeypatch.setattr(find_scp, "FIND_PAGE", 3)
    monkeypatch.setattr(find_scp, "find_studies", lambda *args: pages.append(args[2:]) or read(*args))
    assert matched(node, query(StudyInstanceUID="", AccessionNumber="ACC*")) == {1, 2, 4}
    assert [limit for _, limit in pages] == [3, 3] and pages[0][0] == 0  # 3 studies, then none after them


def test_matching_on_the_private_state(node: FindNode) -> None:
    assert matched(node, with_private_block(query(StudyInstanceUID=""), "ANALYSED")) == {1}
    identifier = with_private_block(query(StudyInstanceUID=""), "RE*")  # a wildcard: valid in a query
    assert matched(node, identifier) == {2, 3}  # READY, RECEIVING


def test_universal_query_returns_the_requested_keys_with_values(node: FindNode) -> None:
    identifier = query(StudyInstanceUID="", AccessionNumber="", StudyDate="", PatientID="", PatientName="",
                       ModalitiesInStudy="", NumberOfStudyRelatedSeries=None, NumberOfStudyRelatedInstances=None,
                       StudyTime="", StudyID="")
    _, found = c_find(node, identifier)
    by_uid = {dataset.StudyInstanceUID: dataset for dataset in found}
    assert set(by_uid) == set(UIDS.values())
    for number, (accession, patient_id, name, date, _, _, modalities) in STUDIES.items():
        dataset = by_uid[UIDS[number]]
        assert (dataset.AccessionNumber, dataset.PatientID, str(dataset.PatientName), dataset.StudyDate) == (
            accession, patient_id, name, date)
        found_modalities = dataset.ModalitiesInStudy  # a str when there is one
        assert sorted([found_modalities] if isinstance(found_modalities, str) else found_modalities) == sorted(
            modalities)
        assert dataset.NumberOfStudyRelatedSeries == len(modalities)
        assert dataset.NumberOfStudyRelatedInstances == sum(modalities.values())
        time, study_id = TIMES[number]
        assert (dataset.StudyTime, dataset.StudyID) == (sortable_time(time) or "", study_id or "")
        assert "SpecificCharacterSet" not in dataset or dataset.SpecificCharacterSet == "ISO_IR 192"
        assert not any(element.tag.group == 0x0041 for element in dataset)  # the block was not asked for
    assert by_uid[UIDS[2]].SpecificCharacterSet == "ISO_IR 192"  # Müller


def test_only_the_requested_keys_are_returned(node: FindNode) -> None:
    _, found = c_find(node, query(StudyInstanceUID=UIDS[1]))
    assert [element.keyword for element in found[0]] == ["QueryRetrieveLevel", "RetrieveAETitle",
                                                         "StudyInstanceUID"]


def test_the_private_block_follows_the_requester_slot(node: FindNode) -> None:
    _, (found,) = c_find(node, with_private_block(query(StudyInstanceUID=UIDS[1]), slot=0x42))
    assert found[0x00410042].value == "MAMMO_CLIP_NODE"
    assert (found[0x00414201].value, found[0x00414202].value, found[0x00414203].value) == (
        "ANALYSED", "0.8700", "mammo-clip-demo-1")


def test_another_vendors_private_keys_are_not_returned(node: FindNode) -> None:
    """A request that carries another creator's block beside ours gets ours back and none of theirs (an empty
    creator would leave its elements orphaned); a value to match in their block is not supported (0xFF01)."""
    identifier = with_private_block(query(StudyInstanceUID=UIDS[1]))
    identifier.private_block(0x0009, "GEMS_IDEN_01", create=True).add_new(0x01, "LO", "")
    statuses, (found,) = c_find(node, identifier)
    assert [int(s.Status) for s in statuses] == [0xFF00, 0x0000]
    assert not any(element.tag.group == 0x0009 for element in found)
    assert found[0x00410010].value == "MAMMO_CLIP_NODE" and found[0x00411001].value == "ANALYSED"
    identifier.private_block(0x0009, "GEMS_IDEN_01").add_new(0x01, "LO", "X*")
    statuses, (found,) = c_find(node, identifier)
    assert [int(s.Status) for s in statuses] == [0xFF01, 0x0000]
    assert not any(element.tag.group == 0x0009 for element in found)


def test_unsupported_key_values_give_a_pending_warning(node: FindNode) -> None:
    statuses, found = c_find(node, query(StudyInstanceUID=UIDS[1], StudyDescription="SCREENING*"))
    assert [int(s.Status) for s in statuses] == [0xFF01, 0x0000]
    assert found[0].StudyDescription == ""
    empty_sequence = query(StudyInstanceUID=UIDS[1], ReferencedStudySequence=[], StudyDescription="")
    statuses, found = c_find(node, empty_sequence)  # universal keys: no warning
    assert [int(s.Status) for s in statuses] == [0xFF00, 0x0000]
    assert found[0].ReferencedStudySequence == [] and found[0].StudyDescription == ""


@pytest.mark.parametrize(("level", "status"), [("IMAGE", 0xA900), ("SERIES", 0xA900), ("", 0xA900)])
def test_another_level_is_refused(node: FindNode, tmp_path: Path, level: str, status: int) -> None:
    identifier = query(StudyInstanceUID="", SOPInstanceUID="")
    identifier.QueryRetrieveLevel = level
    statuses, found = c_find(node, identifier)
    assert [int(s.Status) for s in statuses] == [status] and not found
    assert "STUDY" in statuses[0].ErrorComment
    log, responses = findscu(node, tmp_path, "QueryRetrieveLevel=IMAGE", "SOPInstanceUID")
    assert "DataSetDoesNotMatchSOPClass" in log and not responses


def test_a_malformed_date_is_refused(node: FindNode) -> None:
    identifier = query(StudyDate="2024")
    statuses, found = c_find(node, identifier)
    assert [int(s.Status) for s in statuses] == [0xC000] and not found
    assert "StudyDate" in statuses[0].ErrorComment
    with pytest.raises(QueryError, match="StudyDate"):  # digits of another script (as decoded from UTF-8)
        parse_query(query(StudyDate="\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0661-"))


def test_unknown_calling_ae_is_refused_when_an_allow_list_is_set(node_factory: Callable[..., FindNode],
                                                                 tmp_path: Path) -> None:
    node = node_factory(allowed_calling_aes=["PACS"])
    log, responses = findscu(node, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", calling="INTRUDER")
    assert "Association Rejected" in log and not responses
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assert not ae.associate("127.0.0.1", node.settings.port, ae_title=node.settings.ae_title).is_established
    assert matched(node, query(StudyInstanceUID=UIDS[4])) == {4}  # calling AE PACS is on the list


def test_patient_names_and_ids_are_never_logged(node: FindNode, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        _, found = c_find(node, query(StudyInstanceUID="", PatientName="DOE*", PatientID=""))
        log, responses = findscu(node, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=ROE*", "PatientID")
    assert len(found) == 2 and [r.PatientID for r in responses] == ["PID-C"], log
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert UIDS[1] in messages and "2 studies match" in messages
    for number, (_, patient_id, name, *_) in STUDIES.items():
        assert patient_id not in messages and name.split("^")[0] not in messages, number
    assert "DOE" not in messages and "ROE" not in messages


def test_a_cancel_stops_the_responses(node: FindNode) -> None:
    event = SimpleNamespace(identifier=query(StudyInstanceUID=""), is_cancelled=True,
                            assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="PACS")))
    assert list(handle_find(event, node.sessions, "MAMMO_AI")) == [(0xFE00, None)]


def test_a_database_failure_is_out_of_resources(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'not-migrated.sqlite'}")  # no tables: every select fails
    event = SimpleNamespace(identifier=query(StudyInstanceUID=""), is_cancelled=False,
                            assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="PACS")))
    try:
        assert list(handle_find(event, session_factory(engine), "MAMMO_AI")) == [(0xA700, None)]
    finally:
        engine.dispose()


@pytest.mark.parametrize(("value", "latest", "expected"), [
    ("080512.5", False, "080512.500000"), ("08", False, "080000.000000"), ("08", True, "085959.999999"),
    ("0930", True, "093059.999999"), ("23:59:59", False, "235959.000000"), ("", False, None),
    ("2460", False, None), ("0860", False, None), ("08.5", False, None), ("12345", False, None),
])
def test_study_times_become_sortable_text(value: str, latest: bool, expected: str | None) -> None:
    assert sortable_time(value, latest) == expected
