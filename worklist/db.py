"""Engine, sessions and migrations of the worklist database.

SQLite (embedded default) runs in WAL mode with ``synchronous=FULL`` and foreign keys on, so a committed row
survives a power cut like the fsynced file it describes. PostgreSQL is used through ``MAMMO_DB_URL``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models.errors import ConfigurationError
from worklist.wildcards import SQLITE_LOWER

MIGRATIONS = Path(__file__).parent / "migrations"


def sqlite_url(data_dir: Path) -> str:
    """The embedded database file under the data directory."""
    return f"sqlite:///{(Path(data_dir) / 'worklist.sqlite').resolve()}"


def _sqlite_pragmas(connection, _record) -> None:  # noqa: ANN001  (DB-API connection)
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
    connection.create_function(SQLITE_LOWER, 1, _lower, deterministic=True)  # C-FIND's person-name matching


def _lower(text: str | None) -> str | None:
    return None if text is None else text.lower()


def make_engine(url: str) -> Engine:
    """An engine with the settings this node relies on (pre-ping; SQLite pragmas; no SQL parameters, which hold
    patient names and IDs, in its errors and thus the log)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply every migration up to ``revision``, the newest by default (``mammo-node db upgrade``)."""
    config = _alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Undo the migrations after ``revision`` (``mammo-node db downgrade``); ``ConfigurationError`` unless it is
    one of the revisions before the database's (never ``base``: that would drop every table)."""
    config = _alembic_config(engine)
    with engine.begin() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        older = [script.revision for script in ScriptDirectory.from_config(config).walk_revisions("base", current)
                 if script.revision != current] if current else []
        if revision not in older:
            raise ConfigurationError(f"cannot downgrade to {revision!r}: the database is at {current or 'no revision'}"
                                     f"; the revisions before it are {', '.join(reversed(older)) or 'none'}")
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def require_current(engine: Engine) -> None:
    """Refuse to run on a database that is not at the newest migration."""
    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as error:
        raise ConfigurationError(
            f"The worklist database ({engine.url.render_as_string(hide_password=True)}) cannot be opened "
            f"({type(error.orig or error).__name__}: {error.orig or error}). Check MAMMO_DB_URL / MAMMO_DATA_DIR, "
            "then run `mammo-node db upgrade`.") from None
    if current != head:
        raise ConfigurationError(
            f"The worklist database ({engine.url.render_as_string(hide_password=True)}) is at migration "
            f"{current or 'none'}, not {head}. Run `mammo-node db upgrade` first."
        )
