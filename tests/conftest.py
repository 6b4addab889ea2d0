"""Shared fixtures: databases (SQLite file, PostgreSQL when configured) and an API client.

``database_url`` runs a test once on a fresh SQLite file and, when ``FWCM_TEST_DATABASE_URL`` is
set, once more on PostgreSQL in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from fwcm.config import Settings
from fwcm.store import tenants
from fwcm.store.db import Database, normalize_url

PG_ENV = "FWCM_TEST_DATABASE_URL"


def _pg_schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a temp SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fwcm.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set")
    base = normalize_url(base)
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield _pg_schema_url(base, schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A migrated database, disposed after the test."""
    database = Database(database_url)
    database.migrate()
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url)


@dataclass
class ApiEnv:
    """A running app with one tenant; ``client`` sends that tenant's key on every request."""

    app: object
    db: Database
    settings: Settings
    client: TestClient
    tenant_id: int
    slug: str
    key: str
    _clients: list[TestClient] = field(default_factory=list)

    def new_tenant(self, slug: str) -> TestClient:
        """Another tenant on the same app, with its own authenticated client."""
        with self.db.session() as s:
            _tenant, key = tenants.create_tenant(s, slug, slug.title())
        c = TestClient(self.app, headers={"Authorization": f"Bearer {key}"})  # type: ignore[arg-type]
        self._clients.append(c)
        return c

    def anonymous(self) -> TestClient:
        c = TestClient(self.app)  # type: ignore[arg-type]
        self._clients.append(c)
        return c


@pytest.fixture
def api(db: Database, settings: Settings) -> Iterator[ApiEnv]:
    from fwcm.api import create_app

    app = create_app(db, settings)
    with db.session() as s:
        tenant, key = tenants.create_tenant(s, "acme", "Acme Corp")
        tenant_id = tenant.id
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    env = ApiEnv(app, db, settings, client, tenant_id, "acme", key)
    try:
        yield env
    finally:
        for c in [client, *env._clients]:
            c.close()


@pytest.fixture
def live_api(api: ApiEnv) -> Iterator[str]:
    """The ``api`` app behind a real uvicorn listener on loopback (for the CLI and httpx); its base
    URL, ``http://127.0.0.1:PORT``."""
    config = uvicorn.Config(api.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


# -- a private PostgreSQL --------------------------------------------------------------------------
# Tests that stop and restart the database under a running fwcm get a cluster of their own: the
# shared one (FWCM_TEST_DATABASE_URL) must stay up for everyone else. ``initdb`` into a temporary
# directory, ``pg_ctl`` on a free loopback port, as the ``postgres`` user when the tests run as
# root (as in CI).


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL server binaries, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """One PostgreSQL cluster on 127.0.0.1; :meth:`stop` and :meth:`start` as often as a test likes."""

    def __init__(self, binaries: Path) -> None:
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="fwcm-pg-"))
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres")
        self.start()
        self._psql("CREATE DATABASE fwcm")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/fwcm"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def _psql(self, sql: str) -> None:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-qc", sql],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.root / "data"),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; ``immediate`` is what a crash looks like to its clients."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    binaries = pg_bin()
    if binaries is None:
        pytest.skip("needs the PostgreSQL server binaries (installed by .ci/run)")
    pg = PrivatePostgres(binaries)
    try:
        yield pg
    finally:
        pg.close()
