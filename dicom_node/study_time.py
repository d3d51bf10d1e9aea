"""DICOM TM values (PS3.5 6.2: ``HH``, ``HHMM``, ``HHMMSS``, ``HHMMSS.F`` to ``.FFFFFF``) as sortable text.

A time is kept as ``HHMMSS.FFFFFF`` so that the database compares times as strings; the missing parts of a
partial time are filled in as its earliest moment (``08`` -> ``080000.000000``), or, for the end of a range,
its latest (``08`` -> ``085959.999999``), so that ``-08`` takes in 08:30.
"""

from __future__ import annotations

import re

_TM = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")


def sortable_time(value: object, latest: bool = False) -> str | None:
    """``value`` (a TM, with or without the colons of old ACR-NEMA times) as ``HHMMSS.FFFFFF``; None when it is
    empty or not a valid time."""
    text = str(value or "").strip().replace(":", "")
    match = _TM.fullmatch(text)
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return None
    unset, fill = ("59", "9") if latest else ("00", "0")  # a missing minute or second, a missing fraction digit
    return f"{hours}{minutes or unset}{seconds or unset}.{(fraction or '').ljust(6, fill)}"
