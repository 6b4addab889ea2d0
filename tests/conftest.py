"""Shared fixtures: databases (SQLite file, PostgreSQL when configured) and an API client.

``database_url`` runs a test once on a fresh SQLite file and, when ``FWCM_TEST_DATABASE_URL`` is
set, once more on PostgreSQL in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from fwcm.config import Settings
from fwcm.store import repo
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
            _tenant, key = repo.create_tenant(s, slug, slug.title())
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
        tenant, key = repo.create_tenant(s, "acme", "Acme Corp")
        tenant_id = tenant.id
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    env = ApiEnv(app, db, settings, client, tenant_id, "acme", key)
    try:
        yield env
    finally:
        for c in [client, *env._clients]:
            c.close()
