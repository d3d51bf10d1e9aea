"""DICOM wildcard matching (PS3.4 C.2.2.2.4: ``*`` any run of characters, ``?`` one character) in SQL.

Matched by the database's own pattern operators, which take time linear in the text for each row: GLOB on
SQLite, LIKE on PostgreSQL, both case-sensitive as the standard wants for most VRs. Person names match without
regard to case (``matches(..., ignore_case=True)``) on lower-cased text: PostgreSQL's ``lower``, and on SQLite
``unicode_lower`` (Python's ``str.lower``, registered on each connection by ``worklist.db``; SQLite's own
``lower`` folds ASCII only). A regular expression would backtrack: ``*A*A*A*A*A*A*A*A*Z`` against a long name
took seconds per row, with the interpreter lock held.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Boolean, ColumnElement, String, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement, GenericFunction

SQLITE_LOWER = "unicode_lower"  # the name worklist.db registers str.lower under on SQLite connections


class _Lowered(GenericFunction[str]):
    """Lower-cased text, Unicode-aware on both databases: ``lower``, on SQLite ``SQLITE_LOWER``."""

    type = String()
    inherit_cache = True
    name = "lower"
    _register = False  # not func.lower


@compiles(_Lowered, "sqlite")
def _lowered_on_sqlite(element: _Lowered, compiler: Any, **kw: Any) -> str:
    return f"{SQLITE_LOWER}({compiler.process(element.clauses, **kw)})"


class _Matches(FunctionElement[bool]):
    """(text, GLOB pattern, LIKE pattern): the text matches; each database reads its own pattern."""

    type = Boolean()
    inherit_cache = True
    name = "dicom_wildcard_match"


@compiles(_Matches, "sqlite")
def _glob(element: _Matches, compiler: Any, **kw: Any) -> str:
    text, pattern, _ = element.clauses
    return f"({compiler.process(text, **kw)} GLOB {compiler.process(pattern, **kw)})"


@compiles(_Matches)
def _like(element: _Matches, compiler: Any, **kw: Any) -> str:
    text, _, pattern = element.clauses
    return f"({compiler.process(text, **kw)} LIKE {compiler.process(pattern, **kw)} ESCAPE '\\')"


def glob_pattern(value: str) -> str:
    """The SQLite GLOB pattern of a wildcard value: ``[`` stands for itself as ``[[]``."""
    return re.sub(r"\*+", "*", value).replace("[", "[[]")


def like_pattern(value: str) -> str:
    """The LIKE pattern (escape ``\\``) of a wildcard value: ``\\``, ``%`` and ``_`` stand for themselves."""
    escaped = re.sub(r"([\\%_])", r"\\\1", re.sub(r"\*+", "*", value))
    return escaped.replace("*", "%").replace("?", "_")


def matches(column: ColumnElement[str | None], value: str, ignore_case: bool = False) -> ColumnElement[bool]:
    """``column`` matches the wildcard ``value``; ``ignore_case`` for person names."""
    if ignore_case:
        column, value = _Lowered(column), value.lower()
    return _Matches(column, literal(glob_pattern(value)), literal(like_pattern(value)))


def wildcard_matches(value: str, text: str) -> bool:
    """``matches`` in Python, for a few short strings (the study states): the classic two-pointer match, which
    goes back only to the last ``*`` (time ~ len(value) * len(text) at worst, never exponential)."""
    at, position, star, resume = 0, 0, -1, 0
    while position < len(text):
        if at < len(value) and value[at] == "*":
            star, resume, at = at, position, at + 1
        elif at < len(value) and value[at] in ("?", text[position]):
            at, position = at + 1, position + 1
        elif star >= 0:
            at, resume = star + 1, resume + 1
            position = resume
        else:
            return False
    return all(char == "*" for char in value[at:])
