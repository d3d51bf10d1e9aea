"""A logged exception keeps its type and frames and loses its message, in both log formats."""

from __future__ import annotations

import io
import json
import logging

import pytest

from dicom_node.logs import JsonFormatter, TextFormatter
from models.errors import ImageDecodeError

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
