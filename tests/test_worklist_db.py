"""Worklist database: migrations on SQLite and PostgreSQL, refusal of an un-migrated DB, atomic files."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from dicom_node.storage import atomic_write, validated_uid
from models.errors import ConfigurationError
from worklist.db import make_engine, require_current, upgrade


def test_migrations_create_every_table(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        require_current(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"study", "series", "instance", "job", "result", "export", "model_version"} <= tables
        upgrade(engine)  # idempotent
    finally:
        engine.dispose()


def test_an_unmigrated_database_is_refused_with_the_fix(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with pytest.raises(ConfigurationError, match="mammo-node db upgrade"):
        require_current(engine)
    upgrade(engine)
    require_current(engine)
    engine.dispose()


def test_atomic_write_never_leaves_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "1.2.3.dcm"
    atomic_write(target, b"first")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["1.2.3.dcm"]
    assert target.stat().st_mode & 0o007 == 0  # never world-readable


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.03", "1..2", "", "1.2.3 ", "١.٢", "1." + "2" * 70])
def test_invalid_uids_are_refused(uid: str) -> None:
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        validated_uid(uid, "SOPInstanceUID")


def test_valid_uid_passes() -> None:
    assert validated_uid("1.2.840.10008.5.1.4.1.1.1.2", "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.1.2"
