"""A logged exception keeps its type and frames and loses its message, in both log formats; database errors carry
no SQL parameters."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from dicom_node.logs import JsonFormatter, TextFormatter, traceback_without_messages
from models.errors import ImageDecodeError
from worklist.db import make_engine, upgrade

SECRET = "Doe^Jane 19410302"


def _decode(value: str) -> None:
    raise ValueError(f"cannot read {value!r}")


def _analyse() -> None:
    try:
        _decode(SECRET)
    except ValueError as error:
        raise ImageDecodeError(f"instance 1.2.3: {error}") from error


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_logged_exception_shows_types_and_frames_never_messages(formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("tests.logs")
    log.addHandler(handler)
    try:
        try:
            _analyse()
        except ImageDecodeError:
            log.exception("job %d failed", 7)
        log.warning("after it, study %s", "1.2.3")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    lines = [json.loads(line)["message"] + json.loads(line).get("exception", "") for line in text.splitlines()] \
        if isinstance(formatter, JsonFormatter) else [text]
    output = "\n".join(lines)
    assert "job 7 failed" in output and "after it, study 1.2.3" in output
    assert "ValueError (message withheld from the log)" in output
    assert "models.errors.ImageDecodeError (message withheld from the log)" in output
    assert output.index("ValueError") < output.index("ImageDecodeError"), "the first cause first, as Python prints"
    assert "in _decode" in output and "in _analyse" in output
    assert "Doe" not in output and "19410302" not in output  # the frames' source lines are code, not values


def test_another_formatters_traceback_is_not_reused() -> None:
    """logging caches a record's formatted traceback: a stock formatter that ran first must not lend ours its text."""
    stock, ours = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(stock), logging.StreamHandler(ours)]
    handlers[1].setFormatter(TextFormatter())
    log = logging.getLogger("tests.logs.two")
    for handler in handlers:
        log.addHandler(handler)
    try:
        try:
            _decode(SECRET)
        except ValueError:
            log.exception("failed")
    finally:
        for handler in handlers:
            log.removeHandler(handler)
    assert SECRET in stock.getvalue()  # the stock formatter is unchanged
    assert SECRET not in ours.getvalue() and "ValueError (message withheld from the log)" in ours.getvalue()


def test_database_errors_carry_no_sql_parameters(tmp_path: Path) -> None:
    """A failed statement's error (logged by the scheduler, say) names the SQL, not the values bound to it."""
    engine = make_engine(f"sqlite:///{tmp_path / 'worklist.sqlite'}")
    upgrade(engine)
    insert = text("INSERT INTO study (study_instance_uid, patient_name) VALUES ('1.2.3', :name)")  # NOT NULLs
    with pytest.raises(IntegrityError) as raised, engine.begin() as connection:
        connection.execute(insert, {"name": "Doe^Jane"})
    assert "INSERT INTO study" in str(raised.value) and "Doe" not in str(raised.value)
    engine.dispose()


def test_a_groups_members_are_shown_without_their_messages() -> None:
    try:
        _decode(SECRET)
    except ValueError as error:
        group = ExceptionGroup("two failures", [error, KeyError(SECRET)])
    shown = traceback_without_messages(group)
    assert "ExceptionGroup (message" in shown and "ValueError (message" in shown and "KeyError (message" in shown
    assert "in _decode" in shown and "Doe" not in shown
