"""Database access: engine creation (SQLite WAL or PostgreSQL), sessions, migrations."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def default_data_dir() -> Path:
    return Path(os.environ.get("FWCM_DATA_DIR", "fwcm-data"))


def database_url(data_dir: Path | None = None) -> str:
    """``FWCM_DATABASE_URL`` if set, else a SQLite file in the data directory."""
    url = os.environ.get("FWCM_DATABASE_URL")
    if url:
        return normalize_url(url)
    d = data_dir or default_data_dir()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(d / 'fwcm.db').resolve()}"


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _begin(conn: Any) -> None:
    readonly = conn.get_execution_options().get("fwcm_readonly", False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        # Writers BEGIN IMMEDIATE so they queue on the lock instead of failing with "database is
        # locked" when a read transaction is upgraded; read-only sessions (see Database.read) use a
        # plain BEGIN, which in WAL mode never waits for a writer.
        event.listen(engine, "begin", _begin)

        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


class Database:
    """An engine plus a session factory; ``session()`` commits on success, rolls back on error."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessions = sessionmaker(
            self.engine.execution_options(fwcm_readonly=True), expire_on_commit=False
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction: on SQLite it does not take the write lock."""
        with self.read_sessions() as s, s.begin():
            yield s
            s.rollback()

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        log.debug("database at newest revision")

    def dispose(self) -> None:
        self.engine.dispose()
