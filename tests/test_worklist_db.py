"""Worklist database: migrations on SQLite and PostgreSQL, refusal of an un-migrated DB, atomic files."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from dicom_node.storage import validated_uid
from models.errors import ConfigurationError
from worklist.db import downgrade, make_engine, require_current, upgrade


def test_migrations_create_every_table(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        require_current(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"study", "series", "instance", "job", "result", "export", "model_version"} <= tables
        upgrade(engine)  # idempotent
    finally:
        engine.dispose()


def test_migration_0008_backfills_views_complete_from_the_instances(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    upgrade(engine, "0007")
    with engine.begin() as connection:
        for number, (state, views) in enumerate((("ANALYSED", "LCC RCC LMLO RMLO"), ("ANALYSED", "LCC RCC LMLO"),
                                                 ("FAILED", "LCC RCC LMLO RMLO")), start=1):
            connection.execute(text("INSERT INTO study (id, study_instance_uid, state, suspicion, first_received_at, "
                                    "last_received_at) VALUES (:id, :uid, :state, 0.5, '2026-11-01', '2026-11-01')"),
                               {"id": number, "uid": f"1.2.{number}", "state": state})
            connection.execute(text("INSERT INTO series (id, study_id, series_instance_uid) VALUES (:id, :id, :uid)"),
                               {"id": number, "uid": f"1.2.{number}.1"})
            for index, name in enumerate(views.split()):
                connection.execute(text(
                    "INSERT INTO instance (study_id, series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid,"
                    " laterality, view, analysable, path, size_bytes, sha256, received_at) VALUES (:study, :study,"
                    " :uid, '1.2.840.10008.5.1.4.1.1.1.2', '1.2.840.10008.1.2.1', :side, :view, 1, 'p', 1, 'x',"
                    " '2026-11-01')"), {"study": number, "uid": f"1.2.{number}.1.{index}", "side": name[0],
                                       "view": name[1:]})
    upgrade(engine)
    with engine.connect() as connection:
        flags = dict(connection.execute(text("SELECT id, views_complete FROM study")).all())
        instances = connection.scalar(text("SELECT COUNT(*) FROM instance"))
    engine.dispose()
    assert flags == {1: True, 2: False, 3: False}
    assert instances == 11  # an SQLite batch "move and copy" of study would have cascaded them away



def test_migration_0010_keeps_the_stored_digests_with_their_algorithm(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        downgrade(engine, "0009")
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO study (id, study_instance_uid, state, suspicion, first_received_at,"
                                    " last_received_at) VALUES (1, '1.2.1', 'RECEIVING', 0, '2026-11-01', "
                                    "'2026-11-01')"))
            connection.execute(text("INSERT INTO series (id, study_id, series_instance_uid) VALUES (1, 1, '1.2.1.1')"))
            connection.execute(text(
                "INSERT INTO instance (study_id, series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid,"
                " analysable, path, size_bytes, sha256, received_at) VALUES (1, 1, '1.2.1.1.1', '1.2', '1.2', true,"
                " 'p', 1, :digest, '2026-11-01')"), {"digest": "ab" * 32})
        upgrade(engine)
        digest = "SELECT content_digest FROM instance"
        with engine.begin() as connection:
            assert connection.scalar(text(digest)) == "sha256:" + "ab" * 32
            connection.execute(text("UPDATE instance SET content_digest = :new"), {"new": "blake3:" + "cd" * 32})
        downgrade(engine, "0009")  # a BLAKE3 digest is not a SHA-256 one: emptied, a resend records it again
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT sha256 FROM instance")) == ""
        upgrade(engine)
    finally:
        engine.dispose()

def test_an_unmigrated_database_is_refused_with_the_fix(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with pytest.raises(ConfigurationError, match="mammo-node db upgrade"):
        require_current(engine)
    upgrade(engine)
    require_current(engine)
    engine.dispose()


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.03", "1..2", "", "1.2.3 ", "١.٢", "1." + "2" * 70])
def test_invalid_uids_are_refused(uid: str) -> None:
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        validated_uid(uid, "SOPInstanceUID")


def test_valid_uid_passes() -> None:
    assert validated_uid("1.2.840.10008.5.1.4.1.1.1.2", "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.1.2"
